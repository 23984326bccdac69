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

use tokio::task::JoinHandle;

/// Why a bounded call produced no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// It did not return in time (its thread is left to finish on its own).
    #[error("did not return within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// The blocking task itself failed (host-side panic).
    #[error("failed: {0}")]
    Failed(String),
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
    tokio::task::spawn_blocking(f)
}
