//! The range of every host-owned duration, count and fraction in the config. A value outside its
//! range is refused at load with the file and line of the key ([`crate::config`]): an interval of
//! `1ns` would spin, a call timeout of `0s` would fail every call.
//!
//! The minimums admit the short timings tests and benches use (milliseconds for backoffs, tens of
//! milliseconds for health intervals and timeouts). Some durations also accept `0s` with a
//! meaning of its own (`[health] interval = "0s"` disables the monitor).

use std::time::Duration;

/// A setting's value, as the range check sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A duration.
    Duration(Duration),
    /// A whole number.
    Count(u64),
    /// A real number.
    Fraction(f64),
}

/// One setting's allowed range (inclusive).
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// `host`, `supervisor`, `health`, `journal` or `outbox`.
    pub section: &'static str,
    /// The key.
    pub key: &'static str,
    /// The smallest value.
    pub min: Value,
    /// The largest value.
    pub max: Value,
    /// Whether zero is allowed below `min`, and what it means.
    pub zero: Option<&'static str>,
}

const fn ms(n: u64) -> Value {
    Value::Duration(Duration::from_millis(n))
}

const fn secs(n: u64) -> Value {
    Value::Duration(Duration::from_secs(n))
}

const fn count(n: u64) -> Value {
    Value::Count(n)
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const WEEK: u64 = 7 * DAY;
/// A year as humantime counts it (365.25 days), so the bound prints as "10years".
const YEAR: u64 = 31_557_600;

macro_rules! range {
    ($section:literal, $key:literal, $min:expr, $max:expr) => {
        Range {
            section: $section,
            key: $key,
            min: $min,
            max: $max,
            zero: None,
        }
    };
    ($section:literal, $key:literal, $min:expr, $max:expr, zero = $zero:literal) => {
        Range {
            section: $section,
            key: $key,
            min: $min,
            max: $max,
            zero: Some($zero),
        }
    };
}

/// Every checked setting.
pub const RANGES: &[Range] = &[
    range!("host", "plugin_worker_threads", count(1), count(64)),
    range!("host", "plugin_call_timeout", ms(10), secs(10 * MINUTE)),
    range!("host", "settle", ms(10), secs(MINUTE)),
    range!("host", "load_timeout", ms(10), secs(HOUR)),
    range!("host", "plugin_shutdown_timeout", ms(10), secs(10 * MINUTE)),
    range!("host", "isolation_handshake_timeout", ms(10), secs(HOUR)),
    range!(
        "host",
        "rescan_interval",
        ms(100),
        secs(DAY),
        zero = "never rescan"
    ),
    range!("supervisor", "initial_backoff", ms(1), secs(DAY)),
    range!(
        "supervisor",
        "backoff_factor",
        Value::Fraction(1.0),
        Value::Fraction(10.0)
    ),
    range!("supervisor", "max_backoff", ms(1), secs(DAY)),
    range!(
        "supervisor",
        "jitter",
        Value::Fraction(0.0),
        Value::Fraction(1.0)
    ),
    range!("supervisor", "max_restarts", count(0), count(1_000_000)),
    range!("supervisor", "stable_run", ms(10), secs(WEEK)),
    range!("supervisor", "stop_timeout", ms(10), secs(10 * MINUTE)),
    range!("supervisor", "start_timeout", ms(10), secs(HOUR)),
    range!("supervisor", "cancel_grace", ms(1), secs(10 * MINUTE)),
    range!(
        "supervisor",
        "startup_accounts_per_channel",
        count(1),
        count(10_000)
    ),
    range!("supervisor", "startup_channels", count(1), count(10_000)),
    range!("supervisor", "restart_log_interval", ms(10), secs(DAY)),
    range!(
        "health",
        "interval",
        ms(10),
        secs(DAY),
        zero = "disables the monitor"
    ),
    range!("health", "startup_grace", secs(0), secs(DAY)),
    range!("health", "connect_grace", secs(0), secs(DAY)),
    range!("health", "stale_event_threshold", ms(10), secs(WEEK)),
    range!("health", "busy_stuck_threshold", ms(10), secs(WEEK)),
    range!("health", "cooldown_cycles", count(0), count(1_000)),
    range!("health", "max_restarts_per_hour", count(0), count(100_000)),
    range!("journal", "retain", ms(100), secs(10 * YEAR)),
    range!("journal", "max_size", count(4096), count(1 << 50)),
    range!("journal", "max_message_bytes", count(1), count(64 << 20)),
    range!("outbox", "retry_initial", ms(1), secs(HOUR)),
    range!("outbox", "retry_max", ms(1), secs(DAY)),
    range!("outbox", "deadline", ms(10), secs(30 * DAY)),
    range!("outbox", "poll_interval", ms(5), secs(MINUTE)),
    range!("outbox", "retain", ms(100), secs(YEAR)),
    range!("outbox", "max_queued_per_account", count(1), count(1 << 32)),
    range!("outbox", "max_queued", count(1), count(1 << 32)),
    range!("outbox", "max_in_flight", count(1), count(65_536)),
    range!("outbox", "hop_limit", count(1), count(64)),
    range!("cluster", "lease_ttl", secs(2), secs(HOUR)),
];

/// The range of `section.key`, if it has one.
pub fn range_of(section: &str, key: &str) -> Option<&'static Range> {
    RANGES.iter().find(|r| r.section == section && r.key == key)
}

fn show(value: Value) -> String {
    match value {
        Value::Duration(d) => format!("\"{}\"", humantime::format_duration(d)),
        Value::Count(n) => n.to_string(),
        Value::Fraction(x) => format!("{x:?}"),
    }
}

fn inside(value: Value, min: Value, max: Value) -> bool {
    match (value, min, max) {
        (Value::Duration(v), Value::Duration(lo), Value::Duration(hi)) => lo <= v && v <= hi,
        (Value::Count(v), Value::Count(lo), Value::Count(hi)) => lo <= v && v <= hi,
        (Value::Fraction(v), Value::Fraction(lo), Value::Fraction(hi)) => {
            v.is_finite() && lo <= v && v <= hi
        }
        _ => false,
    }
}

fn is_zero(value: Value) -> bool {
    match value {
        Value::Duration(d) => d.is_zero(),
        Value::Count(n) => n == 0,
        Value::Fraction(x) => x == 0.0,
    }
}

/// Checks `section.key = value` against its range; the error says what is allowed.
pub fn check(section: &str, key: &str, value: Value) -> Result<(), String> {
    let Some(range) = range_of(section, key) else {
        return Ok(());
    };
    if inside(value, range.min, range.max) {
        return Ok(());
    }
    if range.zero.is_some() && is_zero(value) {
        return Ok(());
    }
    let zero = range
        .zero
        .map(|meaning| format!(", or {} ({meaning})", show(zero_of(value))))
        .unwrap_or_default();
    Err(format!(
        "{key} = {} is out of range: expected {} to {}{zero}",
        show(value),
        show(range.min),
        show(range.max)
    ))
}

fn zero_of(value: Value) -> Value {
    match value {
        Value::Duration(_) => Value::Duration(Duration::ZERO),
        Value::Count(_) => Value::Count(0),
        Value::Fraction(_) => Value::Fraction(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_outside_their_range_are_refused_saying_what_is_allowed() {
        let err = check(
            "health",
            "interval",
            Value::Duration(Duration::from_nanos(1)),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "interval = \"1ns\" is out of range: expected \"10ms\" to \"1day\", or \"0s\" \
             (disables the monitor)"
        );
        assert!(check("health", "interval", Value::Duration(Duration::ZERO)).is_ok());
        assert!(check("health", "interval", ms(20)).is_ok(), "test timings");
        let err = check("host", "plugin_call_timeout", secs(0)).unwrap_err();
        assert!(err.contains("expected \"10ms\" to \"10m\""), "{err}");
        assert!(check("supervisor", "jitter", Value::Fraction(f64::NAN)).is_err());
        assert!(check("supervisor", "startup_channels", count(0)).is_err());
    }

    #[test]
    fn every_range_is_well_formed() {
        for range in RANGES {
            assert!(
                inside(range.min, range.min, range.max) && inside(range.max, range.min, range.max),
                "{}.{}",
                range.section,
                range.key
            );
        }
    }

    fn parse(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::parse(text, std::path::Path::new("/etc/channeld/channeld.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_one_nanosecond_health_interval_is_refused_with_its_line() {
        let err = parse("[health]\n\ninterval = \"1ns\"\n").unwrap_err();
        assert!(
            err.starts_with("/etc/channeld/channeld.toml:3:1: interval = \"1ns\" is out of range"),
            "{err}"
        );
        let err = parse("[host]\nplugin_call_timeout = \"0s\"\n").unwrap_err();
        assert!(
            err.starts_with("/etc/channeld/channeld.toml:2:1: "),
            "{err}"
        );
        parse("[health]\ninterval = \"20ms\"\n").expect("test timings are allowed");
    }

    #[test]
    fn a_non_loopback_api_address_needs_allow_remote() {
        let err = parse("[host]\napi_address = \"0.0.0.0:7878\"\n").unwrap_err();
        assert!(
            err.starts_with(
                "/etc/channeld/channeld.toml:2:1: api_address 0.0.0.0:7878 is not a loopback"
            ),
            "{err}"
        );
        assert!(err.contains("allow_remote = true"), "{err}");
        let config =
            parse("[host]\napi_address = \"0.0.0.0:7878\"\nallow_remote = true\n").unwrap();
        assert!(config.host.allow_remote);
        parse("[host]\napi_address = \"[::1]:7878\"\n").expect("IPv6 loopback");
    }

    #[test]
    fn every_duration_and_count_has_a_range() {
        let checked = crate::config::range_checked_keys();
        for range in RANGES {
            let key = format!("{}.{}", range.section, range.key);
            assert!(
                checked.contains(&key),
                "{key} has a range but is never checked"
            );
        }
        for (section, table) in crate::config::host_owned_defaults() {
            for (key, value) in table.as_table().unwrap() {
                let is_duration = value
                    .as_str()
                    .is_some_and(|s| humantime::parse_duration(s).is_ok());
                if is_duration || value.is_integer() || value.is_float() {
                    assert!(
                        range_of(&section, key).is_some(),
                        "[{section}] {key} is a duration or a number without a range in RANGES"
                    );
                }
            }
        }
    }
}
