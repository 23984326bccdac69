//! Hot plugins, from the supervisor's side: moving a channel to a new plugin version, and removing
//! a channel whose plugin file is gone. The owner of the channel map (the catalog, or the
//! supervisor's own table where none exists) switches what serves the channel; these calls then
//! move the accounts. The old version's tasks have fully ended (or been cancelled
//! and reported) before any task of the new version starts for the same account.

use std::{collections::HashSet, sync::Arc};

use futures_util::future::join_all;

use super::{Channel, StartMode, StartOutcome, StopOutcome, Supervisor, SupervisorError};
use crate::{config::ChannelSection, host::AccountKey, plugin::Plugin};

/// `lastError` of the accounts of a channel whose plugin was removed.
pub const REMOVED: &str = "the plugin providing this channel was removed";

impl Supervisor {
    /// Moves a running channel to `plugin`, a new version of it, in the supervisor's own table
    /// (where no catalog is the source): registers the new version (an error leaves the old one
    /// running), makes it serve the channel, then [`Supervisor::switch_over`].
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: dropped after the registration, it leaves the old version's accounts
    /// stopped and none started on the new one.
    pub async fn replace_channel(
        &self,
        plugin: Arc<dyn Plugin>,
        section: ChannelSection,
    ) -> Result<Vec<(AccountKey, StartOutcome)>, SupervisorError> {
        let table = self.table()?;
        let old = self.channel(&plugin.info().channel_id)?;
        let new = self.register(plugin, section).await?;
        table.insert(new.clone());
        Ok(self.switch_over(&old, &new).await)
    }

    /// Once `new` serves the channel (its owner answers it, so new starts, revivals and
    /// reconfigures go to it), stops every account `old` runs, then starts on `new` every account
    /// a user had not stopped. Each old task ends on the version it started on, and has fully
    /// ended (or been reported stuck) before the new version's task for the same account starts.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: dropped midway, it leaves the old version's accounts stopped and none
    /// started on the new one. The catalog runs it inside a tracked task, so no caller can drop
    /// it.
    pub async fn switch_over(
        &self,
        old: &Arc<Channel>,
        new: &Arc<Channel>,
    ) -> Vec<(AccountKey, StartOutcome)> {
        let id = &new.id;
        let (running, user_stopped): (Vec<AccountKey>, HashSet<AccountKey>) = {
            let state = self.lock();
            let running = old
                .accounts
                .iter()
                .map(|a| AccountKey::new(id.clone(), a.clone()))
                .filter(|k| state.accounts.get(k).is_some_and(|e| e.lifecycle.is_some()))
                .collect();
            let user_stopped = state
                .accounts
                .iter()
                .filter(|(k, e)| k.channel == *id && e.manual_stop)
                .map(|(k, _)| AccountKey::clone(k))
                .collect();
            (running, user_stopped)
        };
        let stops = self.stop_keys(&running).await;
        for (key, outcome) in running.iter().zip(&stops) {
            if let StopOutcome::Stuck(reason) = outcome {
                tracing::error!(account = %key, "old version's task is stuck: {reason}");
            }
        }
        let starts = new
            .accounts
            .iter()
            .map(|a| AccountKey::new(id.clone(), a.clone()))
            .filter(|k| !user_stopped.contains(k))
            .map(|key| async move {
                let outcome = self
                    .start_account(
                        new,
                        &key,
                        StartMode::Revive {
                            reset_counter: true,
                        },
                    )
                    .await;
                (key, outcome)
            });
        join_all(starts).await
    }

    /// Removes a channel whose plugin file is gone from the supervisor's own table (where no
    /// catalog is the source): [`Supervisor::stop_removed`], then the channel shows as removed.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: dropped midway, some accounts may be stopped and the channel still
    /// served.
    pub async fn remove_channel(&self, id: &str) -> Result<(), SupervisorError> {
        let table = self.table()?;
        let ch = self.channel(id)?;
        self.stop_removed(&ch).await;
        table.remove(id);
        Ok(())
    }

    /// Stops the accounts of `ch`, a registration whose plugin file is gone, and marks them
    /// removed on the status board (the snapshot keeps them under the channel while the source
    /// lists it removed).
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: dropped midway, some accounts may be left running. The catalog runs it
    /// inside a tracked task.
    pub async fn stop_removed(&self, ch: &Channel) {
        let keys: Vec<AccountKey> = ch
            .accounts
            .iter()
            .map(|a| AccountKey::new(ch.id.clone(), a.clone()))
            .collect();
        self.stop_keys(&keys).await;
        {
            let mut state = self.lock();
            for key in &keys {
                // Not a user's stop: if the plugin comes back, its accounts start again.
                if let Some(entry) = state.accounts.get_mut(key) {
                    entry.manual_stop = false;
                }
            }
        }
        for key in &keys {
            self.inner.board.update(key, |s| {
                if s.state != crate::status::AccountState::Stuck {
                    s.set_state(crate::status::AccountState::Stopped);
                }
                s.last_error = Some(REMOVED.into());
            });
        }
    }
}
