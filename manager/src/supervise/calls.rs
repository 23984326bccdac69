//! Calls into a plugin's synchronous entries, off the async workers and bounded in time, so a
//! plugin that hangs costs one blocking thread and an error, never the supervisor.

use std::time::Duration;

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
    let call = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(CallError::Failed(e.to_string())),
        Err(_) => Err(CallError::TimedOut(limit)),
    }
}
