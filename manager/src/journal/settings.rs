//! `[journal]`: how durable, how long and how large the journal is.

use std::time::Duration;

use serde::Deserialize;

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every commit is on the disk before `deliver` returns (SQLite `synchronous = FULL`): an
    /// acknowledged message survives a crash of the process and of the machine.
    #[default]
    Full,
    /// Commits survive a crash of the process, but the last ones may be lost if the machine
    /// loses power (SQLite `synchronous = NORMAL` in WAL mode).
    Normal,
}

/// `[journal]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// `full` (default) or `normal`.
    pub sync: SyncMode,
    /// Messages older than this are pruned (e.g. `"7d"`).
    #[serde(with = "humantime_serde")]
    pub retain: Duration,
    /// The journal's largest size (e.g. `"1GiB"`); the oldest messages are pruned to stay below.
    pub max_size: bytesize::ByteSize,
    /// The largest message (conversation, sender, text, id and `extra` together), in bytes.
    pub max_message_bytes: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            sync: SyncMode::Full,
            retain: Duration::from_secs(7 * 24 * 3600),
            max_size: bytesize::ByteSize::gib(1),
            max_message_bytes: 65536,
        }
    }
}

impl JournalConfig {
    /// Checks the values: the key that is wrong and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.retain.is_zero() {
            return Err(("retain", "retain must be longer than 0s".into()));
        }
        if self.max_size.as_u64() == 0 {
            return Err(("max_size", "max_size must be more than 0 bytes".into()));
        }
        if self.max_message_bytes == 0 {
            return Err((
                "max_message_bytes",
                "max_message_bytes must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
