//! The running account tasks, so the host can abort (cooperatively) or cancel (at the next await
//! point) one by id. The registry is sharded by id, so the host's threads starting accounts and
//! the runtime's threads ending them rarely wait for one another.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use tokio::task::AbortHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::abi::HostHandle;

struct Control {
    abort: CancellationToken,
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
    abort: CancellationToken,
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
        tasks.get(&id).map(|c| c.abort.cancel()).is_some()
    })
}

/// Cancels the task at its next await point.
pub(crate) fn cancel(id: u64) -> bool {
    with_tasks(id, |tasks| {
        tasks
            .get(&id)
            .map(|c| {
                c.abort.cancel();
                c.cancel.abort();
            })
            .is_some()
    })
}

/// Removes this guard's task from the registry when the task's future is dropped, however it
/// ended (returned, panicked, cancelled).
pub(crate) struct Unregister(pub(crate) u64);

impl Drop for Unregister {
    fn drop(&mut self) {
        unregister(self.0);
    }
}

pin_project! {
    /// One account's task as the runtime runs it: the author's future, polled in place (no
    /// second copy of it, as an `async` block that awaits a captured future would hold), with the
    /// SDK's part around it. At the first poll it tells the host the task is polled and puts the
    /// task's [`Unregister`] in place; once the author's future has ended (and been dropped), it
    /// fires the abort for the tasks the account spawned and ends when they have.
    pub(crate) struct AccountTask<F, T> {
        #[pin]
        stage: Stage<F, T>,
        id: u64,
        polled: Option<HostHandle>,
        unregister: Option<Unregister>,
        abort: CancellationToken,
        tracker: TaskTracker,
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
    /// The task `id` running `task`; `polled` is told at its first poll; `abort` and `tracker`
    /// are the account's (its spawned tasks').
    pub(crate) fn new(
        id: u64,
        task: F,
        polled: HostHandle,
        abort: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            stage: Stage::Running { task },
            id,
            polled: Some(polled),
            unregister: None,
            abort,
            tracker,
        }
    }
}

impl<F: Future<Output = T>, T> Future for AccountTask<F, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut this = self.project();
        if let Some(polled) = this.polled.take() {
            *this.unregister = Some(Unregister(*this.id));
            // The runtime is polling the task: only now is the account running.
            polled.task_polled();
        }
        loop {
            match this.stage.as_mut().project() {
                StageProj::Running { task } => {
                    let result = ready!(task.poll(cx));
                    // Tasks the account spawned end with it, and it ends once they have.
                    this.abort.cancel();
                    this.tracker.close();
                    this.stage.set(Stage::Ending {
                        result: Some(result),
                        children: None,
                    });
                }
                StageProj::Ending { result, children } => {
                    if children.is_none() && !this.tracker.is_empty() {
                        let tracker = this.tracker.clone();
                        *children = Some(Box::pin(async move { tracker.wait().await }));
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
}
