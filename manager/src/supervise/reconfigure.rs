//! Config reload, from the supervisor's side: a channel's table changes while it runs. The
//! plugin is asked first whether it accepts the new table ([`Supervisor::validate_section`], which
//! changes nothing); then [`Supervisor::reconfigure_channel`] hands it over, compares every
//! account's *resolved* config (what the plugin's resolve hook returns, secrets included) and the
//! host's `enabled` before and after, and touches only the accounts whose config changed: new
//! ones start, removed ones stop and leave the snapshot, changed ones restart with a fresh
//! restart counter, unchanged ones keep their task and counter. A user's stop always wins: a
//! manually stopped account is never started by a reload.

use std::collections::{BTreeMap, HashMap};

use channeld_plugin_abi::normalize_account_id;
use compact_str::CompactString;
use futures_util::future::join_all;
use serde_json::Value;

use super::{
    AccountIds, Channel, StartMode, StartOutcome, Supervisor, SupervisorError, calls::bounded,
    seeds,
};
use crate::{config::ChannelSection, host::AccountKey};

/// What a reload did to one channel's accounts (account ids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelReload {
    /// New accounts (started unless disabled).
    pub added: Vec<String>,
    /// Accounts no longer configured: stopped and gone from the snapshot.
    pub removed: Vec<String>,
    /// Accounts whose resolved config changed and that run again on it.
    pub restarted: Vec<String>,
    /// Accounts whose config changed and that are not running now (disabled, or stopped by a
    /// user: a reload never starts those).
    pub stopped: Vec<String>,
    /// Accounts whose resolved config is the same: not touched.
    pub unchanged: Vec<String>,
}

/// One account's config as the plugin resolves it, and whether the host switches it off.
#[derive(Debug, Clone, PartialEq)]
struct Resolved {
    config: Result<Value, String>,
    disabled: bool,
}

impl Supervisor {
    /// Asks `id`'s plugin whether it accepts `section` (its `validate` hook, ABI 1.1; a 1.0
    /// plugin accepts everything). Nothing changes either way.
    pub async fn validate_section(
        &self,
        id: &str,
        section: &ChannelSection,
    ) -> Result<(), SupervisorError> {
        let plugin = self.channel(id)?.plugin.clone();
        let table = crate::reserved::strip(&section.table);
        bounded(self.inner.call_timeout, move || {
            plugin.validate_channel(&table)
        })
        .await
        .map_err(|e| SupervisorError::Plugin(format!("channel {id}: validate {e}")))?
        .map_err(|e| SupervisorError::Plugin(format!("channel {id}: {e}")))
    }

    /// Hands `section` to the running channel `id` and brings its accounts in line with it (see
    /// the module docs). If the plugin refuses the new table, it gets the old one back and
    /// nothing else changes.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: a dropped future may leave some accounts restarted and others not. The
    /// reloader runs it as a tracked task.
    pub async fn reconfigure_channel(
        &self,
        id: &str,
        section: ChannelSection,
    ) -> Result<ChannelReload, SupervisorError> {
        let old = self.channel(id)?;
        if old.section.table == section.table {
            return Ok(ChannelReload {
                unchanged: old.accounts.to_vec(),
                ..ChannelReload::default()
            });
        }
        let before = self.resolve_all(&old, &old.accounts).await?;
        let plugin = old.plugin.clone();
        let table = crate::reserved::strip(&section.table);
        let old_table = crate::reserved::strip(&old.section.table);
        let disabled = crate::reserved::Disabled::from_table(&section.table);
        let listed = bounded(self.inner.call_timeout, move || {
            let listed = (|| {
                plugin.validate_channel(&table)?;
                plugin.configure(&table)?;
                Ok::<_, crate::plugin::PluginCallError>((
                    plugin.list_account_ids()?,
                    plugin.default_account_id()?,
                ))
            })();
            if listed.is_err() {
                // The old table back: the accounts running on it keep a consistent plugin.
                let _ = plugin.configure(&old_table);
            }
            listed
        })
        .await
        .map_err(|e| SupervisorError::Plugin(format!("channel {id}: configure {e}")))?
        .map_err(|e| SupervisorError::Plugin(format!("channel {id}: configure: {e}")))?;
        let (raw_ids, default_account) = listed;
        let new = std::sync::Arc::new(Channel {
            id: id.to_owned(),
            plugin: old.plugin.clone(),
            section,
            accounts: AccountIds::new(raw_ids.iter().map(|raw| normalize_account_id(raw))),
            default_account: default_account.map(|a| normalize_account_id(&a)),
            boots: super::lifecycle::boot_pool(self.inner.policy().startup_accounts_per_channel),
            disabled,
            blocking_permits: old.blocking_permits.clone(),
        });
        let after = self.resolve_all(&new, &new.accounts).await?;
        // From here on, starts (a user's, the health monitor's) use the new table.
        // The owner records it only if `old`'s version still serves (see [`super::serving`]).
        self.serving().reconfigured(new.clone());

        let mut report = ChannelReload::default();
        for account in &old.accounts {
            if !after.contains_key(account) {
                report.removed.push(account.clone());
            }
        }
        let mut changed = Vec::new();
        for account in &new.accounts {
            match before.get(account) {
                None => report.added.push(account.clone()),
                Some(was) if Some(was) == after.get(account) => {
                    report.unchanged.push(account.clone())
                }
                Some(_) => changed.push(account.clone()),
            }
        }
        let key = |a: &String| AccountKey::new(id.to_owned(), a.clone());

        // Removed: stopped, then forgotten (the snapshot lists the channel's accounts only).
        join_all(report.removed.iter().map(|a| {
            let k = key(a);
            async move { self.stop_account_quietly(&k).await }
        }))
        .await;
        {
            let mut state = self.lock();
            for account in &report.removed {
                let k = key(account);
                if state
                    .accounts
                    .get(&k)
                    .is_some_and(|e| e.lifecycle.is_none())
                {
                    state.accounts.remove(&k);
                }
            }
        }
        // Changed: the old task ends before the new one starts (never two for one account).
        let user_stopped: Vec<bool> = changed
            .iter()
            .map(|a| self.is_manually_stopped(&key(a)))
            .collect();
        join_all(changed.iter().map(|a| {
            let k = key(a);
            async move { self.stop_account_quietly(&k).await }
        }))
        .await;
        self.seed_accounts(&new, report.added.iter().chain(&changed).cloned().collect())
            .await;
        let starts = changed
            .iter()
            .zip(&user_stopped)
            .filter(|(_, manual)| !**manual)
            .map(|(a, _)| a)
            .chain(&report.added)
            .map(|a| {
                let new = new.clone();
                let k = key(a);
                async move {
                    let outcome = self
                        .start_account(
                            &new,
                            &k,
                            StartMode::Revive {
                                reset_counter: true,
                            },
                        )
                        .await;
                    (k.account, outcome)
                }
            });
        let outcomes: HashMap<CompactString, StartOutcome> =
            join_all(starts).await.into_iter().collect();
        for (account, manual) in changed.iter().zip(user_stopped) {
            if manual {
                // Still the user's stop.
                if let Some(e) = self.lock().accounts.get_mut(&key(account)) {
                    e.manual_stop = true;
                }
                report.stopped.push(account.clone());
                continue;
            }
            match outcomes.get(account.as_str()) {
                Some(StartOutcome::Disabled(_)) => report.stopped.push(account.clone()),
                _ => report.restarted.push(account.clone()),
            }
        }
        Ok(report)
    }

    /// Stops an account for the host's own reasons: the task ends, but it is not marked as a
    /// user's stop (a later start by the host or a re-enable brings it back).
    async fn stop_account_quietly(&self, key: &AccountKey) {
        let running = self
            .lock()
            .accounts
            .get(key)
            .is_some_and(|e| e.lifecycle.is_some());
        if !running {
            return;
        }
        let manual = self.is_manually_stopped(key);
        let outcome = self.stop_account(key).await;
        if let super::StopOutcome::Stuck(reason) = outcome {
            tracing::error!(account = %key, "reload: the old task is stuck: {reason}");
        }
        if let Some(entry) = self.lock().accounts.get_mut(key) {
            entry.manual_stop = manual;
        }
    }

    /// Each account's resolved config (an account the plugin cannot resolve compares by its
    /// error), and whether the host disables it.
    async fn resolve_all(
        &self,
        ch: &std::sync::Arc<Channel>,
        accounts: &[String],
    ) -> Result<BTreeMap<String, Resolved>, SupervisorError> {
        let plugin = ch.plugin.clone();
        let ids = accounts.to_vec();
        let resolved = bounded(self.inner.call_timeout, move || {
            ids.into_iter()
                .map(|a| {
                    let config = plugin.resolve_account(&a).map_err(|e| e.to_string());
                    (a, config)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| SupervisorError::Plugin(format!("channel {}: resolve {e}", ch.id)))?;
        Ok(resolved
            .into_iter()
            .map(|(a, config)| {
                let disabled = ch.disabled.contains(&a);
                (a, Resolved { config, disabled })
            })
            .collect())
    }

    /// Writes what the plugin says about `accounts` (enabled, configured) to the snapshot.
    async fn seed_accounts(&self, ch: &std::sync::Arc<Channel>, accounts: Vec<String>) {
        if accounts.is_empty() {
            return;
        }
        let plugin = ch.plugin.clone();
        let disabled = ch.disabled.clone();
        let ids = accounts.clone();
        let seeds = bounded(self.inner.call_timeout, move || {
            seeds(&*plugin, &ids, &disabled)
        });
        match seeds.await {
            Ok(seeds) => {
                for (account, seed) in accounts.iter().zip(seeds) {
                    let key = AccountKey::new(ch.id.clone(), account.clone());
                    self.inner.board.update(&key, |s| seed.apply(s));
                }
            }
            Err(e) => tracing::warn!(channel = %ch.id, "reading accounts for the snapshot {e}"),
        }
    }
}
