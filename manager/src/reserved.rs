//! The keys the host owns in a channel's table and in each account's table. The host reads them
//! itself and strips them from the table before a plugin sees it (`validate_channel` and
//! `configure`), so a plugin that refuses unknown keys keeps working as the host grows new ones.
//! The list, with what each key means, is in `docs/reserved-keys.md`.

use std::collections::HashSet;

use channeld_plugin_abi::normalize_account_id;
use serde_json::{Map, Value};

/// Every key the host owns, in a channel's table and in an account's table alike.
pub const RESERVED_KEYS: &[&str] = &[
    "enabled",
    "health_monitor",
    "isolation",
    "memory_limit",
    // The plugin's runtime (crate::runtime_settings::KEYS).
    "worker_threads",
    "runtime_shutdown_timeout",
    "starvation_threshold",
];

/// `channel_table` without the host's keys: removed from the channel's own level and from every
/// table under `accounts`. Everything else is the plugin's, unchanged.
pub fn strip(channel_table: &Value) -> Value {
    let mut table = channel_table.clone();
    if let Value::Object(channel) = &mut table {
        strip_map(channel);
        if let Some(Value::Object(accounts)) = channel.get_mut("accounts") {
            for account in accounts.values_mut() {
                if let Value::Object(account) = account {
                    strip_map(account);
                }
            }
        }
    }
    table
}

fn strip_map(map: &mut Map<String, Value>) {
    for key in RESERVED_KEYS {
        map.remove(*key);
    }
}

/// The accounts the config switches off (`enabled = false` in an account's table, or in the
/// channel's table for all of them). The host decides this itself: the plugin never sees the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disabled {
    all: bool,
    accounts: HashSet<String>,
}

impl Disabled {
    /// Reads the switches of `channel_table` (account keys normalised).
    pub fn from_table(channel_table: &Value) -> Self {
        let off = |table: &Value| table.get("enabled").and_then(Value::as_bool) == Some(false);
        let accounts = channel_table
            .get("accounts")
            .and_then(Value::as_object)
            .map(|accounts| {
                accounts
                    .iter()
                    .filter(|(_, table)| off(table))
                    .map(|(key, _)| normalize_account_id(key))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            all: off(channel_table),
            accounts,
        }
    }

    /// Whether the (normalised) account is switched off.
    pub fn contains(&self, account: &str) -> bool {
        self.all || self.accounts.contains(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_keys_are_stripped_at_both_levels_and_the_rest_is_kept() {
        let table = json!({
            "enabled": true,
            "isolation": "process",
            "mode": "x",
            "accounts": {
                "Main": { "enabled": false, "health_monitor": { "enabled": false },
                          "memory_limit": "64MiB", "token": "t" },
                "b": "not a table",
            }
        });
        assert_eq!(
            strip(&table),
            json!({ "mode": "x", "accounts": { "Main": { "token": "t" }, "b": "not a table" } })
        );
        let disabled = Disabled::from_table(&table);
        assert!(disabled.contains("main"));
        assert!(!disabled.contains("b"));
        assert!(Disabled::from_table(&json!({ "enabled": false })).contains("any"));
    }
}
