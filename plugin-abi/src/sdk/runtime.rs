//! The plugin's own tokio runtime. A plugin cannot use the host's runtime (each dylib has its own
//! copy of tokio's thread-locals, so the host's runtime is invisible inside it), so the SDK builds
//! one lazily, runs the author's futures on it, and drops it at `shutdown` so no plugin thread
//! outlives the plugin.
//!
//! The host sets, at `init`, the worker count, how long `shutdown` waits for the workers, and the
//! starvation threshold of the runtime's [watchdog](super::watchdog), which starts with the
//! runtime and ends at `shutdown`.

use std::{
    sync::{
        Mutex, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::runtime::{Builder, Handle, Runtime};

use super::watchdog::Watchdog;

/// Worker threads when the host does not say.
pub const DEFAULT_WORKER_THREADS: u32 = 2;

/// How long `shutdown` waits for the runtime's threads when the host does not say.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// After how long with every worker busy the runtime is reported starved, when the host does not
/// say.
pub const DEFAULT_STARVATION_THRESHOLD: Duration = Duration::from_secs(5);

static WORKERS: AtomicU32 = AtomicU32::new(DEFAULT_WORKER_THREADS);
static SHUTDOWN_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_SHUTDOWN_TIMEOUT.as_millis() as u64);
static STARVATION_MS: AtomicU64 = AtomicU64::new(DEFAULT_STARVATION_THRESHOLD.as_millis() as u64);

enum State {
    NotBuilt,
    Running(Runtime, Option<Watchdog>),
    ShutDown,
}

static STATE: Mutex<State> = Mutex::new(State::NotBuilt);
/// The running runtime's handle, for the calls after the first (readers do not wait for one
/// another); set when it is built, taken at `shutdown` (so no handle outlives it here).
static HANDLE: RwLock<Option<Handle>> = RwLock::new(None);

/// Sets the worker count for a runtime not yet built (0 keeps the default).
pub(crate) fn set_worker_threads(workers: u32) {
    if workers > 0 {
        WORKERS.store(workers, Ordering::Relaxed);
    }
}

/// Reads the runtime's settings from `init`'s `extra` JSON (keys it lacks keep their value).
pub(crate) fn configure(extra: &serde_json::Value) {
    use crate::abi::{RUNTIME_SHUTDOWN_TIMEOUT_MS_KEY, STARVATION_THRESHOLD_MS_KEY};
    if let Some(ms) = extra
        .get(RUNTIME_SHUTDOWN_TIMEOUT_MS_KEY)
        .and_then(serde_json::Value::as_u64)
    {
        SHUTDOWN_TIMEOUT_MS.store(ms, Ordering::Relaxed);
    }
    if let Some(ms) = extra
        .get(STARVATION_THRESHOLD_MS_KEY)
        .and_then(serde_json::Value::as_u64)
    {
        STARVATION_MS.store(ms, Ordering::Relaxed);
    }
}

/// A handle to the runtime, building it (and starting its watchdog, its threads named
/// `thread_name()`) on first use.
pub(crate) fn handle(thread_name: impl FnOnce() -> String) -> Result<Handle, String> {
    if let Some(handle) = &*HANDLE.read().unwrap_or_else(|p| p.into_inner()) {
        return Ok(handle.clone());
    }
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match &*state {
        State::Running(rt, _) => Ok(rt.handle().clone()),
        State::ShutDown => Err("the plugin has been shut down".to_owned()),
        State::NotBuilt => {
            let thread_name = thread_name();
            let thread_name = thread_name.as_str();
            let workers = WORKERS.load(Ordering::Relaxed);
            let rt = Builder::new_multi_thread()
                .worker_threads(workers as usize)
                .thread_name(thread_name)
                .on_thread_start(crate::grow_thread_arena)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot build the plugin's runtime: {e}"))?;
            let handle = rt.handle().clone();
            let threshold = Duration::from_millis(STARVATION_MS.load(Ordering::Relaxed));
            let watchdog = Watchdog::start(handle.clone(), workers, threshold, thread_name);
            *state = State::Running(rt, watchdog);
            *HANDLE.write().unwrap_or_else(|p| p.into_inner()) = Some(handle.clone());
            Ok(handle)
        }
    }
}

/// The runtime's handle if it is running (never builds it).
pub(crate) fn running() -> Option<Handle> {
    HANDLE.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Drops the runtime: every task is cancelled and every runtime thread is joined, up to the
/// shutdown timeout.
pub(crate) fn shutdown() {
    let previous = {
        let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
        *HANDLE.write().unwrap_or_else(|p| p.into_inner()) = None;
        std::mem::replace(&mut *state, State::ShutDown)
    };
    if let State::Running(rt, watchdog) = previous {
        drop(watchdog);
        // Dropping joins the worker threads; a task that blocks its thread forever would hang
        // the drop, so give up on those after the bound and let the host report it.
        rt.shutdown_timeout(Duration::from_millis(
            SHUTDOWN_TIMEOUT_MS.load(Ordering::Relaxed),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_extra_keys_set_the_shutdown_timeout_and_threshold() {
        configure(&serde_json::json!({
            crate::abi::RUNTIME_SHUTDOWN_TIMEOUT_MS_KEY: 1500,
            crate::abi::STARVATION_THRESHOLD_MS_KEY: 0,
            "unknown": true,
        }));
        assert_eq!(SHUTDOWN_TIMEOUT_MS.load(Ordering::Relaxed), 1500);
        assert_eq!(STARVATION_MS.load(Ordering::Relaxed), 0);
        // A key it lacks keeps its value.
        configure(&serde_json::json!({}));
        assert_eq!(SHUTDOWN_TIMEOUT_MS.load(Ordering::Relaxed), 1500);
    }
}
