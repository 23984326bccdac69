//! The running account tasks, so the host can abort (cooperatively) or cancel (at the next await
//! point) one by id. The registry is sharded by id, so the host's threads starting accounts and
//! the runtime's threads ending them rarely wait for one another.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use tokio::task::AbortHandle;

use super::{
    log::{self, AccountScope},
    signal::TaskState,
    watchdog::{self, Owner},
};
use crate::abi::HostHandle;

struct Control {
    abort: Arc<TaskState>,
    cancel: AbortHandle,
}

/// Shards of the registry (ids are handed out in sequence, so consecutive tasks take turns).
const SHARDS: usize = 16;

type Shard = Mutex<Option<HashMap<u64, Control>>>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static TASKS: [Shard; SHARDS] = [const { Mutex::new(None) }; SHARDS];

fn with_tasks<R>(id: u64, f: impl FnOnce(&mut HashMap<u64, Control>) -> R) -> R {
    let mut guard = TASKS[(id % SHARDS as u64) as usize]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

/// A fresh task id.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Registers a task. `spawn` runs under the registry's (shard's) lock so that a task which ends at once
/// cannot unregister itself before it was registered.
pub(crate) fn register<T>(
    id: u64,
    abort: Arc<TaskState>,
    spawn: impl FnOnce() -> (AbortHandle, T),
) -> T {
    with_tasks(id, |tasks| {
        let (cancel, out) = spawn();
        tasks.insert(id, Control { abort, cancel });
        out
    })
}

/// Forgets a task that has ended.
pub(crate) fn unregister(id: u64) {
    with_tasks(id, |tasks| tasks.remove(&id));
}

/// Fires the task's abort signal.
pub(crate) fn abort(id: u64) -> bool {
    with_tasks(id, |tasks| {
        tasks.get(&id).map(|c| c.abort.abort()).is_some()
    })
}

/// Cancels the task at its next await point.
pub(crate) fn cancel(id: u64) -> bool {
    with_tasks(id, |tasks| {
        tasks
            .get(&id)
            .map(|c| {
                c.abort.abort();
                c.cancel.abort();
            })
            .is_some()
    })
}

/// Set in an [`Unregister`] once its task has been polled (ids stay far below it).
const ARMED: u64 = 1 << 63;

/// Removes its task from the registry when the task's future is dropped, however it ended
/// (returned, panicked, cancelled), if the task was polled: only from then on is it armed (a
/// future dropped inside the spawn, which holds the registry's lock, must not take it again).
struct Unregister(u64);

impl Drop for Unregister {
    fn drop(&mut self) {
        if self.0 & ARMED != 0 {
            unregister(self.0 & !ARMED);
        }
    }
}

pin_project! {
    /// One account's task as the runtime runs it: the author's future, polled in place (no
    /// second copy of it, as an `async` block that awaits a captured future would hold), with the
    /// SDK's part around it, all in one future so the runtime's task for it stays small: each poll
    /// runs in the account's log scope and is seen by the watchdog. At the first poll it tells the
    /// host the task is polled and arms its [`Unregister`]; once the author's future has ended
    /// (and been dropped), it fires the abort for the tasks the account spawned and ends when they
    /// have.
    pub(crate) struct AccountTask<F, T> {
        #[pin]
        stage: Stage<F, T>,
        polled: Option<HostHandle>,
        state: Arc<TaskState>,
        // The account's log scope; `None` only while it is the thread's current one.
        scope: Option<AccountScope>,
        unregister: Unregister,
    }

    impl<F, T> PinnedDrop for AccountTask<F, T> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut stage = this.stage;
            // The author's future is dropped in the account's log scope, as it ran.
            log::enter_scope(this.scope, || {
                stage.set(Stage::Ending {
                    result: None,
                    children: None,
                });
            });
        }
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F, T> {
        Running { #[pin] task: F },
        /// The author's future has ended with `result`; `children` waits for the spawned tasks
        /// (boxed, and only made if there are any).
        Ending {
            result: Option<T>,
            children: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
        },
    }
}

impl<F, T> AccountTask<F, T> {
    /// The task `id` running `task` for `account`; `polled` is told at its first poll; `state`
    /// is the account's abort signal and count of spawned tasks.
    pub(crate) fn new(
        id: u64,
        task: F,
        polled: HostHandle,
        state: Arc<TaskState>,
        account: Arc<super::Account>,
    ) -> Self {
        Self {
            stage: Stage::Running { task },
            polled: Some(polled),
            state,
            scope: Some(AccountScope::new(account)),
            unregister: Unregister(id),
        }
    }
}

impl<F: Future<Output = T>, T> Future for AccountTask<F, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        if let Some(polled) = this.polled.take() {
            this.unregister.0 |= ARMED;
            // The runtime is polling the task: only now is the account running.
            polled.task_polled();
        }
        let (mut stage, state, scope) = (this.stage, this.state, this.scope);
        // The scope is in place between polls (`enter_scope` puts it back even when a poll
        // unwinds); were it not, the task would still be polled, unwatched and untagged.
        let Some(owner) = scope.as_ref().map(|s| Owner::Account(s.account().clone())) else {
            return poll_stage(stage.as_mut(), state, cx);
        };
        watchdog::watch_poll(
            || owner,
            "task",
            || log::enter_scope(scope, || poll_stage(stage.as_mut(), state, cx)),
        )
    }
}

/// One poll of the task's stages.
fn poll_stage<F: Future<Output = T>, T>(
    mut stage: Pin<&mut Stage<F, T>>,
    state: &Arc<TaskState>,
    cx: &mut Context<'_>,
) -> Poll<T> {
    loop {
        match stage.as_mut().project() {
            StageProj::Running { task } => {
                let result = ready!(task.poll(cx));
                // Tasks the account spawned end with it, and it ends once they have.
                state.abort();
                state.close();
                stage.set(Stage::Ending {
                    result: Some(result),
                    children: None,
                });
            }
            StageProj::Ending { result, children } => {
                if children.is_none() && state.children() != 0 {
                    let state = state.clone();
                    *children = Some(Box::pin(async move { state.children_ended().await }));
                }
                if let Some(wait) = children {
                    ready!(wait.as_mut().poll(cx));
                }
                return Poll::Ready(
                    result
                        .take()
                        .expect("an account task polled after it ended"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;
    use crate::sdk::{AccountContext, PluginError};

    /// An author's future of a given size (the fixture's `run` task is about this big).
    struct Author(#[allow(dead_code)] [u64; 25]);

    impl Future for Author {
        type Output = Result<(), PluginError>;

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Ready(Ok(()))
        }
    }

    /// What a running account costs the plugin, beyond the author's future, stays small: the
    /// runtime's task cell grows in steps of 128 bytes, so a few bytes more can cost 128.
    #[test]
    fn an_account_costs_few_bytes_beyond_the_authors_future() {
        let task = size_of::<AccountTask<Author, Result<(), PluginError>>>();
        assert!(
            task <= size_of::<Author>() + 64,
            "the account task adds {} bytes to the author's future",
            task - size_of::<Author>()
        );
        // Every author's future holds its context.
        assert!(
            size_of::<AccountContext>() <= 48,
            "{}",
            size_of::<AccountContext>()
        );
        // With the `Arc`'s counts, 56 bytes: one 64-byte allocation.
        assert!(size_of::<TaskState>() <= 40, "{}", size_of::<TaskState>());
    }
}
