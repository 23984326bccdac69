//! `[outbox]`: how sends are retried, how long they may wait, and how many may wait.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[outbox]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// The wait before the first retry of a failed send; it doubles with every failure.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// A message not sent this long after it was accepted is marked failed with the last error.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// How often the sender looks again at accounts that were not ready (not running, or
    /// reported disconnected).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long finished messages (and so their idempotency keys) are kept.
    #[serde(with = "humantime_serde")]
    pub retain: Duration,
    /// The most messages waiting (queued or sending) for one account; beyond it, 429.
    pub max_queued_per_account: u64,
    /// The most messages waiting in all; beyond it, 429.
    pub max_queued: u64,
    /// The most sends in flight at once, over every account.
    pub max_in_flight: u64,
    /// A gateway does not bridge a message that already went through this many gateways.
    pub hop_limit: u32,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            deadline: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(250),
            retain: Duration::from_secs(7 * 24 * 3600),
            max_queued_per_account: 10_000,
            max_queued: 100_000,
            max_in_flight: 256,
            hop_limit: 3,
        }
    }
}

impl OutboxConfig {
    /// The wait after the `attempts`-th failure: `retry_initial · 2^(attempts-1)`, at most
    /// `retry_max`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(31));
        self.retry_initial
            .checked_mul(factor)
            .unwrap_or(self.retry_max)
            .min(self.retry_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let c = OutboxConfig {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(500),
            ..OutboxConfig::default()
        };
        let waits: Vec<u128> = (1..=5).map(|a| c.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        assert_eq!(c.backoff(1000), Duration::from_millis(500));
    }
}
