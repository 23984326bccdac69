//! The plugin's own tokio runtime. A plugin cannot use the host's runtime (each dylib has its own
//! copy of tokio's thread-locals, so the host's runtime is invisible inside it), so the SDK builds
//! one lazily, runs the author's futures on it, and drops it at `shutdown` so no plugin thread
//! outlives the plugin.

use std::sync::{
    Mutex,
    atomic::{AtomicU32, Ordering},
};

use tokio::runtime::{Builder, Handle, Runtime};

/// Worker threads when the host does not say.
pub const DEFAULT_WORKER_THREADS: u32 = 2;

static WORKERS: AtomicU32 = AtomicU32::new(DEFAULT_WORKER_THREADS);

enum State {
    NotBuilt,
    Running(Runtime),
    ShutDown,
}

static STATE: Mutex<State> = Mutex::new(State::NotBuilt);

/// Sets the worker count for a runtime not yet built (0 keeps the default).
pub(crate) fn set_worker_threads(workers: u32) {
    if workers > 0 {
        WORKERS.store(workers, Ordering::Relaxed);
    }
}

/// A handle to the runtime, building it on first use.
pub(crate) fn handle(thread_name: &str) -> Result<Handle, String> {
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match &*state {
        State::Running(rt) => Ok(rt.handle().clone()),
        State::ShutDown => Err("the plugin has been shut down".to_owned()),
        State::NotBuilt => {
            let rt = Builder::new_multi_thread()
                .worker_threads(WORKERS.load(Ordering::Relaxed) as usize)
                .thread_name(thread_name)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot build the plugin's runtime: {e}"))?;
            let handle = rt.handle().clone();
            *state = State::Running(rt);
            Ok(handle)
        }
    }
}

/// Drops the runtime: every task is cancelled and every runtime thread is joined.
pub(crate) fn shutdown() {
    let previous = {
        let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *state, State::ShutDown)
    };
    if let State::Running(rt) = previous {
        // Dropping joins the worker threads; a task that blocks its thread forever would hang
        // the drop, so give up on those after a bound and let the host report it.
        rt.shutdown_timeout(std::time::Duration::from_secs(5));
    }
}
