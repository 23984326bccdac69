//! The running account tasks, so the host can abort (cooperatively) or cancel (at the next await
//! point) one by id. The registry is sharded by id, so the host's threads starting accounts and
//! the runtime's threads ending them rarely wait for one another.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

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
    with_tasks(id, |tasks| tasks.get(&id).map(|c| c.abort.cancel()).is_some())
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
