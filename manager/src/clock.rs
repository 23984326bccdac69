//! Time for the supervisor and the health monitor: tokio's `Instant` for all time logic (so tests
//! can pause the clock), wall-clock milliseconds only for what users see.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// A source of time, injected so tests control it.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time for deadlines and ages.
    fn now(&self) -> Instant;
    /// Milliseconds since the Unix epoch, for display.
    fn wall_ms(&self) -> i64;
}

/// The real clock (tokio's clock, so a paused test runtime pauses it too).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}
