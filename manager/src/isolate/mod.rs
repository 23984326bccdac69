//! Process isolation: a channel whose table says `isolation = "process"` runs its plugin in a
//! child process instead of in the daemon, so that a plugin that segfaults, aborts, exits, blows
//! its stack or runs out of memory takes down its own accounts, never the host. This is fault
//! isolation, not a security sandbox: the child runs as the same user, with the same files.
//! `isolation = "process-per-account"` gives each account a child of its own
//! ([`PerAccountPlugin`]), so accounts do not share a crash either.
//!
//! * The child is the `channeld` binary itself, run with the hidden `isolate-child` subcommand
//!   ([`child`]); it loads the staged copy of the plugin file through the normal loader and
//!   drives it through the same [`Plugin`](crate::plugin::Plugin) adapter as the daemon does.
//! * Host and child talk over a Unix socket pair (the child's descriptor 3) in length-delimited
//!   postcard frames ([`wire`]).
//! * On the host side, [`IsolatedPlugin`] implements [`Plugin`](crate::plugin::Plugin), so the
//!   supervisor is unchanged: host services the child's plugin calls (status patches,
//!   connectivity, events, `deliver` to the journal, `task_polled`, stale generations) are
//!   forwarded to the host's sink; the child's log lines go to the daemon's stderr with their
//!   channel and account fields.
//! * Batches cross in one round trip each: `boot_accounts` (the child asks the plugin
//!   whether each account is enabled and configured and starts those that are through the
//!   plugin's own batch entry), `start_accounts`, `abort_tasks` (one message) and
//!   `account_facts` (the snapshot's view of a channel's accounts at registration). Each account
//!   gets its own outcome; a child that dies before it answers fails every account of the batch
//!   with the cause.
//! * When the child dies, every pending call and every account task in it ends with an error that
//!   names the cause ("plugin process killed by SIGSEGV", "plugin process exited with code 3",
//!   "plugin process aborted (memory allocation failed)"); the supervisor restarts the accounts
//!   under its normal backoff and the next call starts a new child. The host reaps every child.
//!
//! The child's environment is the daemon's, plus `CHANNELD_ISOLATE_PARENT` (the daemon's pid: a
//! child whose parent is already gone exits at once) and, with a `memory_limit`,
//! `MALLOC_ARENA_MAX=2` (so glibc's per-thread arenas do not eat the address-space limit). Its
//! only inherited descriptors are stdin (`/dev/null`), stdout (`/dev/null`), stderr (a pipe the
//! host copies to its own stderr) and the socket. It dies with the daemon (`PR_SET_PDEATHSIG`)
//! and exits when the socket closes.

pub mod child;
mod per_account;
mod process;
pub mod wire;

use std::collections::BTreeMap;

use serde_json::Value;

pub use per_account::PerAccountPlugin;
pub use process::{ChildSpec, HANDSHAKE_TIMEOUT, IsolatedPlugin, SpawnError};

use crate::config::Config;

/// How a channel's plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// In the daemon's process (the default).
    #[default]
    None,
    /// One child process for the channel.
    Process,
    /// One child process per account ([`PerAccountPlugin`]).
    ProcessPerAccount,
}

/// One channel's isolation settings (`isolation`, `memory_limit` in its table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelIsolation {
    /// How it runs.
    pub mode: Mode,
    /// The child's address-space limit in bytes.
    pub memory_limit: Option<u64>,
}

/// Every channel's isolation settings, read from the config; a channel with a bad value is kept
/// with its one-line error, which refuses its plugin file.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    channels: BTreeMap<String, Result<ChannelIsolation, String>>,
}

impl Settings {
    /// Reads `[channels.<id>] isolation` and `memory_limit` of every channel.
    pub fn of(config: &Config) -> Self {
        let channels = config
            .channels
            .iter()
            .map(|(id, section)| (id.clone(), Self::parse(id, &section.table)))
            .collect();
        Self { channels }
    }

    fn parse(channel: &str, table: &Value) -> Result<ChannelIsolation, String> {
        let mode = match table.get("isolation") {
            None => Mode::None,
            Some(Value::String(s)) if s == "none" => Mode::None,
            Some(Value::String(s)) if s == "process" => Mode::Process,
            Some(Value::String(s)) if s == "process-per-account" => Mode::ProcessPerAccount,
            Some(other) => {
                return Err(format!(
                    "channel {channel}: isolation = {other}: expected \"none\", \"process\" or \
                     \"process-per-account\""
                ));
            }
        };
        let memory_limit = match table.get("memory_limit") {
            None => None,
            Some(Value::String(s)) => Some(
                s.parse::<bytesize::ByteSize>()
                    .map_err(|e| format!("channel {channel}: memory_limit = {s:?}: {e}"))?
                    .as_u64(),
            ),
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
            Some(other) => {
                return Err(format!(
                    "channel {channel}: memory_limit = {other}: expected a size such as \"256MiB\""
                ));
            }
        };
        if memory_limit.is_some() && mode == Mode::None {
            return Err(format!(
                "channel {channel}: memory_limit needs isolation = \"process\" or \
             \"process-per-account\""
            ));
        }
        Ok(ChannelIsolation { mode, memory_limit })
    }

    /// Whether any channel is isolated (or has a bad setting): then every plugin file is first
    /// opened in a child, to learn its channel without running its code in the daemon.
    pub fn any(&self) -> bool {
        self.channels
            .values()
            .any(|c| !matches!(c, Ok(c) if c.mode == Mode::None))
    }

    /// `channel`'s settings (the default for a channel the config does not name).
    pub fn channel(&self, channel: &str) -> Result<ChannelIsolation, String> {
        self.channels
            .get(channel)
            .cloned()
            .unwrap_or(Ok(ChannelIsolation::default()))
    }
}

/// What `channeld plugins` shows about an isolated channel.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IsolationInfo {
    /// `process` or `process-per-account`.
    pub mode: &'static str,
    /// The live child's pid, if one runs (with `process-per-account`: the child that answers
    /// the channel's calls and runs no account).
    pub pid: Option<u32>,
    /// How many children were started for this version (the first included).
    pub children_started: u64,
    /// With `process-per-account`: each account's live child's pid.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub accounts: BTreeMap<String, u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_parse_and_refuse_with_the_channel_named() {
        assert_eq!(
            Settings::parse(
                "c",
                &json!({ "isolation": "process", "memory_limit": "64MiB" })
            ),
            Ok(ChannelIsolation {
                mode: Mode::Process,
                memory_limit: Some(64 << 20)
            })
        );
        assert_eq!(
            Settings::parse("c", &json!({})),
            Ok(ChannelIsolation::default())
        );
        assert_eq!(
            Settings::parse("c", &json!({ "isolation": "process-per-account" })),
            Ok(ChannelIsolation {
                mode: Mode::ProcessPerAccount,
                memory_limit: None
            })
        );
        let bad = Settings::parse("c", &json!({ "isolation": "vm" })).unwrap_err();
        assert!(bad.starts_with("channel c: isolation"), "{bad}");
        let bad = Settings::parse("c", &json!({ "memory_limit": "1GiB" })).unwrap_err();
        assert!(bad.contains("needs isolation"), "{bad}");
    }
}
