//! The restart backoff: delay = min(cap, round(base + base·jitter·random)), base =
//! initial·factor^(attempt−1), with `random` in [0, 1) from an injected source.

use std::time::Duration;

use crate::config::SupervisorConfig;

/// A source of randomness in [0, 1), injected so tests can pin the jitter.
pub trait Jitter: Send + Sync + 'static {
    /// The next value in [0, 1).
    fn next(&self) -> f64;
}

/// Jitter from the thread-local RNG.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn next(&self) -> f64 {
        rand::random::<f64>()
    }
}

/// A fixed jitter value (tests).
#[derive(Debug, Clone, Copy)]
pub struct FixedJitter(pub f64);

impl Jitter for FixedJitter {
    fn next(&self) -> f64 {
        self.0
    }
}

/// The delay before restart `attempt` (1-based).
pub fn backoff_delay(policy: &SupervisorConfig, attempt: u32, random: f64) -> Duration {
    let initial = policy.initial_backoff.as_secs_f64() * 1000.0;
    let exponent = attempt.saturating_sub(1).min(1000) as i32;
    let base = initial * policy.backoff_factor.powi(exponent);
    let jittered = (base + base * policy.jitter * random).round();
    let cap = policy.max_backoff.as_secs_f64() * 1000.0;
    Duration::from_millis(jittered.min(cap) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_jitter_are_5_10_20_40_80_160_then_300_s() {
        let policy = SupervisorConfig::default();
        let secs: Vec<u64> = (1..=10)
            .map(|a| backoff_delay(&policy, a, 0.0).as_secs())
            .collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]);
    }

    #[test]
    fn jitter_adds_at_most_ten_percent_and_never_passes_the_cap() {
        let policy = SupervisorConfig::default();
        assert_eq!(
            backoff_delay(&policy, 1, 0.999_999),
            Duration::from_millis(5500)
        );
        assert_eq!(backoff_delay(&policy, 1, 0.5), Duration::from_millis(5250));
        assert_eq!(
            backoff_delay(&policy, 6, 0.999_999),
            Duration::from_millis(176_000)
        );
        assert_eq!(
            backoff_delay(&policy, 7, 0.999_999),
            Duration::from_secs(300)
        );
    }
}
