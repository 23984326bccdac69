//! The channel's config table and one account's part of it, as the host hands them over.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::PluginError;
use crate::normalize_account_id;

/// The channel's config table: `[channels.<id>]` of the host's TOML, as JSON, with secrets
/// resolved. Account tables live under `accounts`.
#[derive(Debug, Clone, Default)]
pub struct ChannelConfig {
    channel: String,
    table: Map<String, Value>,
}

impl ChannelConfig {
    /// Parses the JSON the host passes to `configure`. An empty string is an empty table.
    pub fn from_json(channel: &str, json: &str) -> Result<Self, PluginError> {
        let table = if json.trim().is_empty() {
            Map::new()
        } else {
            match serde_json::from_str::<Value>(json)? {
                Value::Object(map) => map,
                other => {
                    return Err(PluginError::new(format!(
                        "channel config must be a table, got {other}"
                    )));
                }
            }
        };
        Ok(Self {
            channel: channel.to_owned(),
            table,
        })
    }

    /// The channel id this config belongs to.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The whole table.
    pub fn table(&self) -> &Map<String, Value> {
        &self.table
    }

    /// One key of the channel's table.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.table.get(key)
    }

    /// The `accounts` table, if there is one.
    pub fn accounts(&self) -> Option<&Map<String, Value>> {
        self.table.get("accounts").and_then(Value::as_object)
    }

    /// The keys of the `accounts` table, as written (the host normalises them).
    pub fn account_keys(&self) -> Vec<String> {
        self.accounts()
            .map(|accounts| accounts.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The account's table: matched by its key exactly, else by normalised id; an account the
    /// table does not list resolves to an empty table.
    pub fn account(&self, id: &str) -> Account {
        let config = self.accounts().and_then(|accounts| {
            accounts.get(id).or_else(|| {
                let wanted = normalize_account_id(id);
                accounts
                    .iter()
                    .find(|(key, _)| normalize_account_id(key) == wanted)
                    .map(|(_, value)| value)
            })
        });
        Account {
            channel: self.channel.clone(),
            id: id.to_owned(),
            config: config.cloned().unwrap_or_else(|| Value::Object(Map::new())),
        }
    }
}

/// One account: its id and its config table.
#[derive(Debug, Clone)]
pub struct Account {
    /// The channel id.
    pub channel: String,
    /// The (normalised) account id.
    pub id: String,
    /// The account's table, including the host-owned `enabled` and `health_monitor` keys.
    pub config: Value,
}

impl Account {
    /// `channel:account`, the key the host shows.
    pub fn key(&self) -> String {
        format!("{}:{}", self.channel, self.id)
    }

    /// False only when the table says `enabled = false`. A channeld of plugin-abi 1.1 or later
    /// owns that key: it decides itself and removes the key before the plugin sees the table, so
    /// there this is always true for the accounts the plugin is asked about.
    pub fn enabled(&self) -> bool {
        self.config.get("enabled").and_then(Value::as_bool) != Some(false)
    }

    /// One key of the account's table.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.config.get(key)
    }

    /// The account's table as the plugin's own settings type. Unknown keys are the plugin's
    /// business: use `#[serde(deny_unknown_fields)]` on `T` to refuse them (the host-owned
    /// `enabled` and `health_monitor` keys are removed first).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, PluginError> {
        let mut table = self.config.clone();
        if let Value::Object(map) = &mut table {
            map.remove("enabled");
            map.remove("health_monitor");
        }
        serde_json::from_value(table)
            .map_err(|e| PluginError::new(format!("account {}: {e}", self.key())))
    }
}
