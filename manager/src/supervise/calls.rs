//! Calls into a plugin's synchronous entries, off the async workers and bounded in time, so a
//! plugin that hangs costs one blocking thread and an error, never the supervisor.
//!
//! # Paused clocks
//!
//! The calls run on tokio's blocking pool. On a current-thread runtime with a paused clock
//! (`#[tokio::test(start_paused = true)]`), tokio's `test-util` does not auto-advance time while
//! a blocking task is running, so a call's time bound cannot expire *because* a quick call took
//! real time: the paused clock stays put until the call returns, and tests are deterministic. The
//! other side of it: while a call blocks for good (a test double holding a thread at a gate),
//! paused time only moves when the test advances it with `tokio::time::advance`.

use std::time::Duration;

use tokio::{sync::Semaphore, task::JoinHandle};

/// Why a bounded call produced no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// It did not return in time (its thread is left to finish on its own).
    #[error("did not return within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// The blocking task itself failed (host-side panic).
    #[error("failed: {0}")]
    Failed(String),
    /// The plugin already has its limit of blocking calls in flight (earlier ones hang), and
    /// none returned within the time bound.
    #[error("not called: {0} earlier blocking calls of this plugin are still running (they hang)")]
    Saturated(usize),
}

/// Runs `f` on the blocking pool and waits at most `limit` for it.
pub async fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CallError> {
    let call = spawn_call(f);
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(CallError::Failed(e.to_string())),
        Err(_) => Err(CallError::TimedOut(limit)),
    }
}

/// Runs `f` on the blocking pool and hands back its handle, for a caller that must not abandon
/// the call (its result may be something to own, such as a started task) and bounds its own wait.
pub fn spawn_call<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    tokio::task::spawn_blocking(move || {
        let began = std::time::Instant::now();
        let value = f();
        crate::metrics::observe_plugin_call(began.elapsed());
        value
    })
}

/// Like [`bounded`], under a plugin's limit of blocking calls in flight: the call waits for one of
/// `permits` (within the same time bound), and keeps it until it returns, however long the caller
/// waited. So a plugin whose calls hang pins at most as many threads as there are permits.
pub async fn bounded_with_permit<T: Send + 'static>(
    permits: &std::sync::Arc<Semaphore>,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CallError> {
    bounded_with_permit_then(permits, limit, || {}, f).await
}

/// Like [`bounded_with_permit`], calling `got_slot` once the permit is held (before the call
/// starts), so a caller can tell "still waiting for a slot" from "running".
///
/// # Cancellation safety
/// Dropping it while it waits for a permit makes no call; once the call runs, it keeps its
/// permit until it returns, whoever waits.
pub async fn bounded_with_permit_then<T: Send + 'static>(
    permits: &std::sync::Arc<Semaphore>,
    limit: Duration,
    got_slot: impl FnOnce(),
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CallError> {
    // The deadline from the runtime's timer (no clock read here: a sleep knows its deadline).
    let deadline = tokio::time::sleep(limit).deadline();
    let permit = match tokio::time::timeout_at(deadline, permits.clone().acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_closed)) => {
            return Err(CallError::Failed(
                "the plugin's call limit is closed".into(),
            ));
        }
        Err(_) => {
            return Err(CallError::Saturated(super::BLOCKING_CALLS_PER_PLUGIN));
        }
    };
    got_slot();
    let call = spawn_call(move || {
        let _permit = permit;
        f()
    });
    match tokio::time::timeout_at(deadline, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(CallError::Failed(e.to_string())),
        Err(_) => Err(CallError::TimedOut(limit)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, mpsc};

    use super::*;
    use crate::supervise::BLOCKING_CALLS_PER_PLUGIN;

    /// A plugin whose blocking calls hang pins at most its limit of threads: once that many hang,
    /// the next call is not made, and says why; a call that returns frees its permit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hanging_blocking_calls_pin_at_most_the_plugin_limit() {
        let permits = Arc::new(Semaphore::new(BLOCKING_CALLS_PER_PLUGIN));
        let limit = Duration::from_millis(100);
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        for _ in 0..BLOCKING_CALLS_PER_PLUGIN {
            let gate = gate.clone();
            let hung = bounded_with_permit(&permits, limit, move || {
                let _ = gate.lock().unwrap().recv();
            })
            .await;
            assert_eq!(hung, Err(CallError::TimedOut(limit)));
        }
        // The hung calls still hold their permits: the next one is refused without a thread.
        let refused = bounded_with_permit(&permits, limit, || ()).await;
        assert_eq!(
            refused,
            Err(CallError::Saturated(BLOCKING_CALLS_PER_PLUGIN))
        );
        // One returns: its permit frees, and a call runs again.
        release.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while permits.available_permits() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no permit came back"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(bounded_with_permit(&permits, limit, || 7).await, Ok(7));
        drop(release);
    }
}
