//! Each channel's plugin runtime settings, from the reserved keys of its table
//! (docs/reserved-keys.md): `worker_threads` (the runtime's worker threads; default
//! `[host] plugin_worker_threads`, itself 2), `runtime_shutdown_timeout` (how long the SDK's
//! `shutdown` waits for its threads; default 5 s) and `starvation_threshold` (after how long with
//! no worker free the SDK reports its runtime starved; default 5 s, `"0s"` turns the watch off).
//! The host hands them to the plugin's `init`: the worker count in `InitSettings.worker_threads`,
//! the two durations as keys of `InitSettings.extra`. The values are read at startup and the
//! runtime is built once, so a change needs a restart (docs/config-reload.md).

use std::{collections::BTreeMap, time::Duration};

use channeld_plugin_abi::abi::{RUNTIME_SHUTDOWN_TIMEOUT_MS_KEY, STARVATION_THRESHOLD_MS_KEY};
use serde_json::{Map, Value, json};

use crate::config::Config;

/// The reserved keys this module reads.
pub const KEYS: &[&str] = &[
    "worker_threads",
    "runtime_shutdown_timeout",
    "starvation_threshold",
];

/// How long the SDK's `shutdown` waits for its runtime's threads, unless a channel says.
pub const DEFAULT_RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// After how long with no worker free a runtime is reported starved, unless a channel says.
pub const DEFAULT_STARVATION_THRESHOLD: Duration = Duration::from_secs(5);

/// One channel's plugin runtime settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelRuntime {
    /// Worker threads (1..=64).
    pub worker_threads: u32,
    /// How long `shutdown` waits for the runtime's threads (at most 10 min).
    pub shutdown_timeout: Duration,
    /// Starvation threshold (0 = off; else 100 ms ..= 1 h).
    pub starvation_threshold: Duration,
}

impl ChannelRuntime {
    /// The keys for `InitSettings.extra`.
    pub fn extra(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert(
            RUNTIME_SHUTDOWN_TIMEOUT_MS_KEY.into(),
            json!(self.shutdown_timeout.as_millis() as u64),
        );
        map.insert(
            STARVATION_THRESHOLD_MS_KEY.into(),
            json!(self.starvation_threshold.as_millis() as u64),
        );
        map
    }
}

/// Every configured channel's settings (or why its table's keys are refused).
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    default: ChannelRuntime,
    channels: BTreeMap<String, Result<ChannelRuntime, String>>,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            default: ChannelRuntime {
                worker_threads: 2,
                shutdown_timeout: DEFAULT_RUNTIME_SHUTDOWN_TIMEOUT,
                starvation_threshold: DEFAULT_STARVATION_THRESHOLD,
            },
            channels: BTreeMap::new(),
        }
    }
}

impl RuntimeSettings {
    /// Reads every channel's table of `config`.
    pub fn of(config: &Config) -> Self {
        let default = ChannelRuntime {
            worker_threads: config.host.plugin_worker_threads,
            ..Self::default().default
        };
        let channels = config
            .channels
            .iter()
            .map(|(id, section)| (id.clone(), parse(id, &section.table, default)))
            .collect();
        Self { default, channels }
    }

    /// `channel`'s settings (the defaults for a channel the config does not name), or a one-line
    /// error naming the channel and the key.
    pub fn channel(&self, channel: &str) -> Result<ChannelRuntime, String> {
        self.channels
            .get(channel)
            .cloned()
            .unwrap_or(Ok(self.default))
    }
}

fn parse(channel: &str, table: &Value, default: ChannelRuntime) -> Result<ChannelRuntime, String> {
    let mut out = default;
    if let Some(value) = table.get("worker_threads") {
        out.worker_threads = value
            .as_u64()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                format!(
                    "channel {channel}: worker_threads = {value}: expected a whole number 1..=64"
                )
            })? as u32;
    }
    let duration = |key: &str,
                    max: Duration,
                    min_nonzero: Duration|
     -> Result<Option<Duration>, String> {
        let Some(value) = table.get(key) else {
            return Ok(None);
        };
        let parsed = value
            .as_str()
            .and_then(|s| humantime::parse_duration(s).ok())
            .ok_or_else(|| {
                format!("channel {channel}: {key} = {value}: expected a duration such as \"5s\"")
            })?;
        if parsed > max || (!parsed.is_zero() && parsed < min_nonzero) {
            return Err(format!(
                "channel {channel}: {key} = {value}: out of range ({} ..= {})",
                humantime::format_duration(min_nonzero),
                humantime::format_duration(max)
            ));
        }
        Ok(Some(parsed))
    };
    if let Some(d) = duration(
        "runtime_shutdown_timeout",
        Duration::from_secs(600),
        Duration::ZERO,
    )? {
        out.shutdown_timeout = d;
    }
    if let Some(d) = duration(
        "starvation_threshold",
        Duration::from_secs(3600),
        Duration::from_millis(100),
    )? {
        out.starvation_threshold = d;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: ChannelRuntime = ChannelRuntime {
        worker_threads: 2,
        shutdown_timeout: DEFAULT_RUNTIME_SHUTDOWN_TIMEOUT,
        starvation_threshold: DEFAULT_STARVATION_THRESHOLD,
    };

    #[test]
    fn keys_are_read_and_bad_values_name_the_channel_and_key() {
        let table = json!({
            "worker_threads": 4,
            "runtime_shutdown_timeout": "1s",
            "starvation_threshold": "0s",
        });
        let got = parse("fx", &table, DEFAULT).unwrap();
        assert_eq!(got.worker_threads, 4);
        assert_eq!(got.shutdown_timeout, Duration::from_secs(1));
        assert!(got.starvation_threshold.is_zero());
        assert_eq!(got.extra()[STARVATION_THRESHOLD_MS_KEY], json!(0));
        assert_eq!(parse("fx", &json!({}), DEFAULT).unwrap(), DEFAULT);
        for (bad, needle) in [
            (
                json!({ "worker_threads": 0 }),
                "channel fx: worker_threads = 0",
            ),
            (
                json!({ "worker_threads": "2" }),
                "channel fx: worker_threads",
            ),
            (
                json!({ "starvation_threshold": "soon" }),
                "channel fx: starvation_threshold",
            ),
            (json!({ "starvation_threshold": "10ms" }), "out of range"),
            (json!({ "runtime_shutdown_timeout": "2h" }), "out of range"),
        ] {
            let error = parse("fx", &bad, DEFAULT).unwrap_err();
            assert!(error.contains(needle), "{error}");
        }
    }
}
