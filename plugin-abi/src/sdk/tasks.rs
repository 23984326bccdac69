//! The running account tasks, so the host can abort (cooperatively) or cancel (at the next await
//! point) one by id. The registry is sharded, so the host's threads starting accounts and the
//! runtime's threads ending them rarely wait for one another, and each shard keeps its tasks in a
//! slab: a task's id says where its entry is (its shard and slot), so finding it is an index, not
//! a hash lookup (at 100,000 accounts each lookup was a cache miss or two). A slot is reused once
//! its task has ended, so an id also carries a sequence number, and an entry answers only to the
//! exact id it was registered under: an id of an ended task never reaches a later task in its
//! slot.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use slab::Slab;
use tokio::task::AbortHandle;

use super::{
    log::{self, AccountScope},
    signal::TaskState,
    watchdog::{self, Owner},
};
use crate::abi::HostHandle;

struct Control {
    /// The id the task was registered under (its slot's later tasks have other ids).
    id: u64,
    abort: Arc<TaskState>,
    /// The runtime's handle of the task; `None` only while [`Registry::register`] spawns it (the
    /// host learns the id once the spawn has returned, so no cancel can come before it is set).
    cancel: Option<AbortHandle>,
}

/// Shards of the registry (tasks take turns by their sequence number).
const SHARDS: usize = 16;

/// An id's layout: the shard in its lowest bits, then the slot, then the sequence number; the
/// top bit stays clear (an id fits an `i64`).
const SHARD_BITS: u32 = SHARDS.trailing_zeros();
const SLOT_BITS: u32 = 28;
const SEQ_SHIFT: u32 = SHARD_BITS + SLOT_BITS;
/// Sequence numbers run from 1 to this (never 0: no id is 0, which the host reads as "none").
const SEQ_MAX: u64 = (1 << (63 - SEQ_SHIFT)) - 1;

/// The registry's shards, and the sequence its ids are numbered by.
struct Registry {
    shards: [Mutex<Slab<Control>>; SHARDS],
    next_seq: AtomicU64,
}

/// The plugin's running account tasks.
static TASKS: Registry = Registry::new();

/// The most slots an empty shard keeps.
const IDLE_SLOTS: usize = 64;

/// Where `id` would be: its shard and its slot.
fn place(id: u64) -> (usize, usize) {
    let shard = (id & (SHARDS as u64 - 1)) as usize;
    let slot = ((id >> SHARD_BITS) & ((1 << SLOT_BITS) - 1)) as usize;
    (shard, slot)
}

impl Registry {
    const fn new() -> Self {
        Self {
            shards: [const { Mutex::new(Slab::new()) }; SHARDS],
            next_seq: AtomicU64::new(0),
        }
    }

    fn shard(&self, index: usize) -> std::sync::MutexGuard<'_, Slab<Control>> {
        // Plain updates: a poisoned lock only means a panic between two of them.
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `f` on `id`'s entry, if `id` is registered.
    fn with_task<R>(&self, id: u64, f: impl FnOnce(&Control) -> R) -> Option<R> {
        let (index, slot) = place(id);
        self.shard(index).get(slot).filter(|c| c.id == id).map(f)
    }

    /// See [`register`].
    fn register<T>(
        &self,
        abort: Arc<TaskState>,
        spawn: impl FnOnce(u64) -> (AbortHandle, T),
    ) -> (u64, T) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) % SEQ_MAX + 1;
        let index = (seq % SHARDS as u64) as usize;
        // The entry first (the task's id says where it is), then the spawn, outside the shard's
        // lock: the runtime's spawn allocates and may wake a worker, and the threads ending the
        // shard's tasks would wait for it.
        let (id, slot) = {
            let mut tasks = self.shard(index);
            let entry = tasks.vacant_entry();
            let slot = entry.key();
            assert!(slot < 1 << SLOT_BITS, "2^28 account tasks in one shard");
            let id = seq << SEQ_SHIFT | (slot as u64) << SHARD_BITS | index as u64;
            entry.insert(Control {
                id,
                abort,
                cancel: None,
            });
            (id, slot)
        };
        let (cancel, out) = spawn(id);
        // A task that has ended already (or was dropped unpolled) removed its entry itself.
        if let Some(control) = self.shard(index).get_mut(slot).filter(|c| c.id == id) {
            control.cancel = Some(cancel);
        }
        (id, out)
    }

    fn unregister(&self, id: u64) {
        let (index, slot) = place(id);
        let mut tasks = self.shard(index);
        if tasks.get(slot).is_some_and(|c| c.id == id) {
            tasks.remove(slot);
            if tasks.is_empty() && tasks.capacity() > IDLE_SLOTS {
                // A fleet's slots are not kept once every task of the shard has ended.
                *tasks = Slab::new();
            }
        }
    }

    fn abort(&self, id: u64) -> bool {
        self.with_task(id, |c| c.abort.abort()).is_some()
    }

    fn cancel(&self, id: u64) -> bool {
        self.with_task(id, |c| {
            c.abort.abort();
            if let Some(cancel) = &c.cancel {
                cancel.abort();
            }
        })
        .is_some()
    }
}

/// Registers a task: `spawn` gets the task's fresh id, whose entry is in the registry already
/// (a task that ends at once unregisters it), and runs without the registry's lock.
///
/// # Panics
///
/// If a shard holds 2^28 tasks (268 million: far past what memory holds).
pub(crate) fn register<T>(
    abort: Arc<TaskState>,
    spawn: impl FnOnce(u64) -> (AbortHandle, T),
) -> (u64, T) {
    TASKS.register(abort, spawn)
}

/// Forgets a task that has ended.
fn unregister(id: u64) {
    TASKS.unregister(id);
}

/// Fires the task's abort signal.
pub(crate) fn abort(id: u64) -> bool {
    TASKS.abort(id)
}

/// Cancels the task at its next await point.
pub(crate) fn cancel(id: u64) -> bool {
    TASKS.cancel(id)
}

/// Removes its task from the registry when the task's future is dropped, however it ended
/// (returned, panicked, cancelled, or dropped before its first poll by a runtime shutting down).
struct Unregister(u64);

impl Drop for Unregister {
    fn drop(&mut self) {
        unregister(self.0);
    }
}

pin_project! {
    /// One account's task as the runtime runs it: the author's future, polled in place (no
    /// second copy of it, as an `async` block that awaits a captured future would hold), with the
    /// SDK's part around it, all in one future so the runtime's task for it stays small: each poll
    /// runs in the account's log scope and is seen by the watchdog. At the first poll it tells the
    /// host the task is polled; once the author's future has ended (and been dropped), it fires
    /// the abort for the tasks the account spawned and ends when they have.
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

    /// A registered task is found by its id alone; once it has ended, its id finds nothing, not
    /// even the next task in its slot (which has an id of its own); every id is non-zero and
    /// leaves the top bit free.
    #[test]
    fn an_id_finds_its_own_task_and_an_ended_ones_finds_none() {
        // A registry of the test's own: the plugin's is shared with the other tests.
        let registry = Registry::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let spawn = |state: &Arc<TaskState>| {
            registry
                .register(state.clone(), |id| {
                    let join = runtime.spawn(std::future::pending::<()>());
                    (join.abort_handle(), id)
                })
                .0
        };
        let first_state = Arc::new(TaskState::default());
        let first = spawn(&first_state);
        assert!(registry.abort(first), "a registered task's abort");
        assert!(first_state.is_aborted());
        registry.unregister(first);
        assert!(!registry.abort(first), "an ended task's id found something");
        // Its slot goes to the next task of its shard, under an id of its own.
        let mut later = Vec::new();
        let reused = loop {
            let state = Arc::new(TaskState::default());
            let id = spawn(&state);
            later.push(id);
            if place(id) == place(first) {
                break (id, state);
            }
            assert!(later.len() < SHARDS, "the slot was not reused");
        };
        assert_ne!(reused.0, first);
        assert!(
            !registry.cancel(first),
            "the ended task's id cancelled its slot's next task"
        );
        assert!(!reused.1.is_aborted());
        assert!(registry.cancel(reused.0));
        assert!(reused.1.is_aborted());
        for id in later {
            assert!(id != 0 && id >> 63 == 0, "{id:#x}");
            registry.unregister(id);
        }
        assert!(!registry.abort(0), "no task has id 0");
    }

    /// A task's spawn runs without the registry's lock: a task that ends inside it (or is
    /// dropped there, unpolled) unregisters itself, and leaves no entry behind; a task still
    /// running afterwards has its entry, with the runtime's handle that cancels it.
    #[test]
    fn a_task_that_ends_while_it_is_spawned_leaves_no_entry() {
        let registry = Arc::new(Registry::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        // Run where a deadlock (the spawn under the shard's lock) fails the test instead of
        // hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        let ended = {
            let registry = registry.clone();
            std::thread::spawn(move || {
                let (id, ()) = registry.register(Arc::new(TaskState::default()), |id| {
                    // What the task's `Unregister` does when it ends at once.
                    registry.unregister(id);
                    (runtime.spawn(async {}).abort_handle(), ())
                });
                let _ = done.send(());
                id
            })
        };
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the spawn ran under the registry's lock");
        let ended = ended.join().expect("the register thread");
        assert!(!registry.abort(ended), "an ended task kept its entry");
        let (index, _) = place(ended);
        assert!(registry.shard(index).is_empty(), "a stale entry was left");
        // A task still running has its entry and its cancel handle.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let state = Arc::new(TaskState::default());
        let (running, join) = registry.register(state.clone(), |_| {
            let join = runtime.spawn(std::future::pending::<()>());
            (join.abort_handle(), join)
        });
        assert!(registry.cancel(running));
        assert!(state.is_aborted());
        let cancelled = runtime.block_on(join).expect_err("the task was cancelled");
        assert!(cancelled.is_cancelled());
        registry.unregister(running);
    }

    /// A task cancelled before its runtime first polled it (its future dropped unpolled) leaves
    /// no entry behind: its `Unregister` goes with the future, polled or not.
    #[test]
    fn a_task_cancelled_before_its_first_poll_leaves_no_entry() {
        // Not driven until the cancel: the task is never polled.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let (id, join) = register(Arc::new(TaskState::default()), |id| {
            // Held by the future from its creation, as an account task holds it.
            let unregister = Unregister(id);
            let join = runtime.spawn(async move {
                let _unregister = unregister;
                std::future::pending::<()>().await;
            });
            (join.abort_handle(), join)
        });
        assert!(cancel(id), "the registered task was not found");
        let cancelled = runtime.block_on(join).expect_err("the task was cancelled");
        assert!(cancelled.is_cancelled());
        assert!(!abort(id), "the cancelled task kept its entry");
    }

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
