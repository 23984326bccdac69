//! `[journal]`: how durable, how long and how large the journal is.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/channeld/channeld.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_defaults_and_every_key() {
        assert_eq!(parse("").unwrap().journal, JournalConfig::default());
        let config = parse(
            "[journal]\nsync = \"normal\"\nretain = \"36h\"\nmax_size = \"512MiB\"\n\
             max_message_bytes = 1000\n[api]\nread_token = \"r\"\n",
        )
        .unwrap();
        assert_eq!(config.journal.sync, SyncMode::Normal);
        assert_eq!(config.journal.retain, Duration::from_secs(36 * 3600));
        assert_eq!(config.journal.max_size, bytesize::ByteSize::mib(512));
        assert_eq!(config.journal.max_message_bytes, 1000);
        assert_eq!(config.api.read_token.unwrap().expose(), "r");
    }

    #[test]
    fn bad_values_name_the_file_line_and_key() {
        for (text, line, needle) in [
            ("[journal]\nsync = \"fast\"\n", 2, "fast"),
            ("[journal]\n\nmax_size = \"lots\"\n", 3, ""),
            (
                "[journal]\nretain = \"0s\"\n",
                2,
                "retain = \"0s\" is out of range",
            ),
            (
                "[journal]\nmax_message_bytes = 0\n",
                2,
                "max_message_bytes = 0 is out of range",
            ),
            ("[journal]\nsynch = \"full\"\n", 2, "unknown field `synch`"),
            (
                "[api]\nread_token = { env = \"CHANNELD_NOPE_UNSET_2\" }\n",
                2,
                "is not set",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with(&format!("/etc/channeld/channeld.toml:{line}:")),
                "{text:?}: {err}"
            );
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
