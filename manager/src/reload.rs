//! Hot plugins: what a change in the plugins directory means, and carrying it out while the host
//! runs. A new file is staged, loaded, and its channel's accounts start. A changed file (new
//! content hash) is loaded first; only if it loads are the old version's accounts stopped (ended,
//! or cancelled and reported) and started on the new one — never two tasks for one account — and
//! the old version's runtime shut down once its accounts are gone. Its library stays mapped.
//! A file that fails to load leaves the old version running, with the error reported. A removed
//! file stops its channel's accounts and the channel shows as removed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;

use crate::{
    config::Config,
    discover,
    registry::{LoadedPlugin, Loader, PluginFileError, Registry, log_refused},
    supervise::{Supervisor, calls::bounded},
};

/// What one reconciliation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Change {
    /// A new channel came up.
    Added {
        /// The channel.
        channel: String,
        /// Its version.
        version: String,
    },
    /// A channel moved to a new version.
    Replaced {
        /// The channel.
        channel: String,
        /// The version that ran before.
        from: String,
        /// The version that runs now.
        to: String,
    },
    /// A channel's plugin file was removed.
    Removed {
        /// The channel.
        channel: String,
    },
    /// Nothing to do (same content, or not a plugin path).
    Unchanged,
    /// The file did not load; whatever ran before keeps running.
    Failed {
        /// The file.
        file: String,
        /// The class of error.
        class: String,
        /// The one-line error.
        error: String,
    },
}

/// One plugin file's entry in `channeld plugins`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginListing {
    /// The channel id (empty for a file that never loaded).
    pub channel: String,
    /// `loaded`, `failed` (the file never loaded), or `removed`.
    pub state: &'static str,
    /// The running version.
    pub version: Option<String>,
    /// The file in the plugins directory.
    pub file: String,
    /// The content hash of the running version.
    pub hash: Option<String>,
    /// When the running version was loaded (ms since the epoch).
    pub loaded_at: Option<i64>,
    /// The last load error for this file, if its last change failed to load.
    pub load_error: Option<String>,
    /// Versions of this channel mapped in the process (libraries are never unloaded).
    pub versions_mapped: usize,
}

/// Reconciles the plugins directory with what runs.
pub struct HotPlugins {
    config: Arc<Config>,
    registry: Arc<Mutex<Registry>>,
    loader: Arc<Loader>,
    supervisor: Supervisor,
    /// One reconciliation at a time: changes to one channel must not interleave.
    turn: tokio::sync::Mutex<()>,
    state: Mutex<ListingState>,
}

#[derive(Default)]
struct ListingState {
    /// Last load error per file.
    errors: BTreeMap<PathBuf, String>,
    /// Versions mapped per channel (current + retired).
    mapped: BTreeMap<String, usize>,
    /// Channels whose file was removed, with their last file and version.
    removed: BTreeMap<String, (PathBuf, String)>,
}

impl HotPlugins {
    /// Reconciler over the daemon's pieces.
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Mutex<Registry>>,
        loader: Arc<Loader>,
        supervisor: Supervisor,
    ) -> Arc<Self> {
        let mapped = registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| (p.info.channel_id.clone(), 1))
            .collect();
        Arc::new(Self {
            config,
            registry,
            loader,
            supervisor,
            turn: tokio::sync::Mutex::new(()),
            state: Mutex::new(ListingState {
                mapped,
                ..ListingState::default()
            }),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listing_state(&self) -> std::sync::MutexGuard<'_, ListingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a load error at startup (the initial directory load happens before this exists).
    pub fn note_error(&self, error: &PluginFileError) {
        self.listing_state()
            .errors
            .insert(error.path().to_owned(), error.to_string());
    }

    /// Brings what runs in line with `path` as it is now.
    pub async fn reconcile(&self, path: &Path) -> Change {
        let _turn = self.turn.lock().await;
        if !discover::is_plugin_name(path) {
            return Change::Unchanged;
        }
        let current = self
            .registry()
            .iter()
            .find(|p| p.staged.source == path)
            .cloned();
        let present = std::fs::symlink_metadata(path).is_ok();
        if !present {
            return match current {
                Some(old) => self.remove(old).await,
                None => {
                    self.listing_state().errors.remove(path);
                    Change::Unchanged
                }
            };
        }
        // Stage and load off the async workers (file I/O, dlopen, a plugin's constructor).
        let loader = self.loader.clone();
        let owned = path.to_owned();
        let claimed: BTreeMap<String, PathBuf> = self
            .registry()
            .iter()
            .filter(|p| p.staged.source != path)
            .map(|p| (p.info.channel_id.clone(), p.staged.source.clone()))
            .collect();
        let current_hash = current.as_ref().map(|c| c.staged.hash.clone());
        let loaded = bounded(Duration::from_secs(60), move || {
            let staged = loader.stage_all(std::slice::from_ref(&owned)).pop()?;
            let staged = match staged {
                Ok(staged) if Some(&staged.hash) == current_hash.as_ref() => return None,
                Ok(staged) => staged,
                Err(e) => return Some(Err(PluginFileError::from(e))),
            };
            Some(loader.load_staged(staged, |channel| claimed.get(channel).cloned()))
        })
        .await;
        let loaded = match loaded {
            Ok(None) => {
                self.listing_state().errors.remove(path);
                return Change::Unchanged;
            }
            Ok(Some(result)) => result,
            Err(e) => {
                return self.failed(
                    path,
                    "timed-out",
                    format!("{}: loading {e}", path.display()),
                );
            }
        };
        let new = match loaded {
            Ok(new) => new,
            Err(error) => {
                log_refused(&error);
                let class = error.class();
                return self.failed(path, class, error.to_string());
            }
        };
        self.listing_state().errors.remove(path);
        match current {
            Some(old) if old.info.channel_id == new.info.channel_id => self.replace(old, new).await,
            Some(old) => {
                // The file now provides another channel: the old one goes, the new one comes.
                self.remove(old).await;
                self.add(new).await
            }
            None => self.add(new).await,
        }
    }

    fn failed(&self, path: &Path, class: &str, error: String) -> Change {
        self.listing_state()
            .errors
            .insert(path.to_owned(), error.clone());
        Change::Failed {
            file: path.display().to_string(),
            class: class.to_owned(),
            error,
        }
    }

    async fn add(&self, new: LoadedPlugin) -> Change {
        let channel = new.info.channel_id.clone();
        let version = new.info.plugin_version.clone();
        let section = self.config.channel(&channel);
        {
            let mut state = self.listing_state();
            *state.mapped.entry(channel.clone()).or_default() += 1;
            state.removed.remove(&channel);
        }
        self.registry().insert(new.clone());
        if let Err(e) = self
            .supervisor
            .add_channel(new.plugin.clone(), section)
            .await
        {
            tracing::error!(channel = %channel, "new channel not started: {e}");
            return self.failed(&new.staged.source, "channel-failed", e.to_string());
        }
        match self.supervisor.start(&channel, None).await {
            Ok(outcomes) => tracing::info!(
                channel = %channel,
                version = %version,
                accounts = outcomes.len(),
                "plugin added"
            ),
            Err(e) => tracing::error!(channel = %channel, "starting the new channel: {e}"),
        }
        Change::Added { channel, version }
    }

    async fn replace(&self, old: LoadedPlugin, new: LoadedPlugin) -> Change {
        let channel = new.info.channel_id.clone();
        let (from, to) = (
            old.info.plugin_version.clone(),
            new.info.plugin_version.clone(),
        );
        let section = self.config.channel(&channel);
        *self
            .listing_state()
            .mapped
            .entry(channel.clone())
            .or_default() += 1;
        self.registry().insert(new.clone());
        match self
            .supervisor
            .replace_channel(new.plugin.clone(), section)
            .await
        {
            Ok(restarted) => tracing::info!(
                channel = %channel,
                from = %from,
                to = %to,
                accounts = restarted.len(),
                "plugin replaced"
            ),
            Err(e) => tracing::error!(channel = %channel, "replacing the channel: {e}"),
        }
        self.retire(old).await;
        Change::Replaced { channel, from, to }
    }

    async fn remove(&self, old: LoadedPlugin) -> Change {
        let channel = old.info.channel_id.clone();
        if let Err(e) = self.supervisor.remove_channel(&channel).await {
            tracing::error!(channel = %channel, "removing the channel: {e}");
        }
        self.registry().remove(&channel);
        self.listing_state().removed.insert(
            channel.clone(),
            (old.staged.source.clone(), old.info.plugin_version.clone()),
        );
        tracing::info!(channel = %channel, file = %old.staged.source.display(), "plugin removed");
        self.retire(old).await;
        Change::Removed { channel }
    }

    /// Shuts an old version's runtime down once its accounts are gone. Its library stays mapped
    /// (unloading a library whose threads or TLS destructors may still run crashes).
    async fn retire(&self, old: LoadedPlugin) {
        self.loader.retire(&old.staged);
        let plugin = old.plugin.clone();
        let channel = old.info.channel_id.clone();
        match bounded(Duration::from_secs(10), move || plugin.shutdown()).await {
            Ok(Ok(())) => {
                tracing::debug!(channel = %channel, version = %old.info.plugin_version, "old version shut down")
            }
            Ok(Err(e)) => tracing::warn!(channel = %channel, "old version's shutdown: {e}"),
            Err(e) => tracing::warn!(channel = %channel, "old version's shutdown {e}"),
        }
    }

    /// Reconciles every plugin path in the directory and every loaded plugin's file.
    pub async fn rescan(&self) -> Vec<(String, Change)> {
        let mut paths: Vec<PathBuf> =
            discover::plugin_paths(&self.config.host.plugins_dir).unwrap_or_default();
        for plugin in self.registry().iter() {
            if !paths.contains(&plugin.staged.source) {
                paths.push(plugin.staged.source.clone());
            }
        }
        let mut changes = Vec::new();
        for path in paths {
            let change = self.reconcile(&path).await;
            changes.push((path.display().to_string(), change));
        }
        changes
    }

    /// `channeld plugins`: every loaded, failed and removed plugin file.
    pub fn listing(&self) -> Vec<PluginListing> {
        let state = self.listing_state();
        let registry = self.registry();
        let mut out: Vec<PluginListing> = registry
            .iter()
            .map(|p| PluginListing {
                channel: p.info.channel_id.clone(),
                state: "loaded",
                version: Some(p.info.plugin_version.clone()),
                file: p.staged.source.display().to_string(),
                hash: Some(p.staged.hash.clone()),
                loaded_at: Some(p.loaded_at_ms),
                load_error: state.errors.get(&p.staged.source).cloned(),
                versions_mapped: state.mapped.get(&p.info.channel_id).copied().unwrap_or(1),
            })
            .collect();
        for (file, error) in &state.errors {
            if !out.iter().any(|l| Path::new(&l.file) == file) {
                out.push(PluginListing {
                    channel: String::new(),
                    state: "failed",
                    version: None,
                    file: file.display().to_string(),
                    hash: None,
                    loaded_at: None,
                    load_error: Some(error.clone()),
                    versions_mapped: 0,
                });
            }
        }
        for (channel, (file, version)) in &state.removed {
            out.push(PluginListing {
                channel: channel.clone(),
                state: "removed",
                version: Some(version.clone()),
                file: file.display().to_string(),
                hash: None,
                loaded_at: None,
                load_error: None,
                versions_mapped: state.mapped.get(channel).copied().unwrap_or(0),
            });
        }
        out
    }
}
