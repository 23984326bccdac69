//! Hot plugins, from the supervisor's side: moving a channel to a new plugin version, and removing
//! a channel whose plugin file is gone. The old version's tasks have fully ended (or been cancelled
//! and reported) before any task of the new version starts for the same account.

use std::{collections::HashSet, sync::Arc};

use futures_util::future::join_all;

use super::{StartMode, StartOutcome, StopOutcome, Supervisor, SupervisorError};
use crate::{config::ChannelSection, host::AccountKey, plugin::Plugin};

/// `lastError` of the accounts of a channel whose plugin was removed.
pub const REMOVED: &str = "the plugin providing this channel was removed";

impl Supervisor {
    /// Moves a running channel to `plugin`, a new version of it: registers the new version (an
    /// error leaves the old one running), routes new starts to it, stops every account the old
    /// version runs, then starts on the new version every account a user had not stopped.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: dropped after the registration, it leaves the old version's accounts
    /// stopped and none started on the new one. The catalog runs it inside a tracked task, so
    /// no caller can drop it.
    pub async fn replace_channel(
        &self,
        plugin: Arc<dyn Plugin>,
        section: ChannelSection,
    ) -> Result<Vec<(AccountKey, StartOutcome)>, SupervisorError> {
        let id = plugin.info().channel_id.clone();
        let old = self.channel(&id)?;
        let new = self.register(plugin, section).await?;
        let (running, user_stopped): (Vec<AccountKey>, HashSet<AccountKey>) = {
            let mut state = self.lock();
            state.channels.insert(id.clone(), new.clone());
            let running = old
                .accounts
                .iter()
                .map(|a| AccountKey::new(id.clone(), a.clone()))
                .filter(|k| state.accounts.get(k).is_some_and(|e| e.lifecycle.is_some()))
                .collect();
            let user_stopped = state
                .accounts
                .iter()
                .filter(|(k, e)| k.channel == id && e.manual_stop)
                .map(|(k, _)| k.clone())
                .collect();
            (running, user_stopped)
        };
        let stops = join_all(running.iter().map(|key| self.stop_account(key))).await;
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
            .map(|key| {
                let new = new.clone();
                async move {
                    let outcome = self
                        .start_account(
                            &new,
                            &key,
                            StartMode::Revive {
                                reset_counter: true,
                            },
                        )
                        .await;
                    (key, outcome)
                }
            });
        Ok(join_all(starts).await)
    }

    /// Removes a channel whose plugin file is gone: stops its accounts and keeps them in the
    /// snapshot under the channel, marked removed.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: dropped midway, some accounts may be stopped and the channel still
    /// registered. The catalog runs it inside a tracked task.
    pub async fn remove_channel(&self, id: &str) -> Result<(), SupervisorError> {
        let ch = self.channel(id)?;
        let keys: Vec<AccountKey> = ch
            .accounts
            .iter()
            .map(|a| AccountKey::new(id.to_owned(), a.clone()))
            .collect();
        join_all(keys.iter().map(|key| self.stop_account(key))).await;
        {
            let mut state = self.lock();
            state.channels.remove(id);
            state.removed.insert(id.to_owned(), ch.accounts.clone());
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
        Ok(())
    }
}
