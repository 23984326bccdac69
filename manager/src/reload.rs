//! Config reload: `channeld reload` (`POST /v1/reload`), `SIGHUP`, or a change of the config file
//! (`[host] watch_config`, its directory watched, debounced by `settle`) reads the file again and
//! applies it without touching what did not change.
//!
//! * **All or nothing.** The new file is parsed, range-checked and resolved whole (secrets
//!   included), and every running channel whose table changed is asked whether its plugin accepts
//!   it (`validate`). Any refusal (`file:line: why`) leaves the running config in place.
//! * **One owner.** [`CurrentConfig`] is the daemon's current config, swapped whole at a reload.
//!   Settings that only take effect at start (`[host]`, `[api]`, `[journal]`,
//!   `[supervisor] restart_log_interval`) keep their running values; those that differ are named
//!   in one line as needing a restart, and the rest of the reload still applies. `[supervisor]`
//!   and `[health]` numbers apply from the next decision they govern (docs/config-reload.md).
//! * **The diff** is on each account's *resolved* config (what the plugin's resolve hook returns,
//!   secrets resolved) and its `enabled`: see [`Supervisor::reconfigure_channel`].
//! * **Serialised** with the plugin catalog's steps ([`Catalog::serialised`]): a reload never runs
//!   beside a plugin change.
//! * **Removed accounts** are handed to an [`AccountRemoved`] hook (the outbox fails their queued
//!   sends with [`ACCOUNT_REMOVED`]) once they have stopped.
//!
//! Every reload, whatever triggered it, leaves one audit line with what it did.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use notify::Watcher as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    audit::AUDIT_TARGET,
    catalog::Catalog,
    config::{Config, ConfigError},
    host::AccountKey,
    supervise::Supervisor,
};

/// The reason queued work of a removed account fails with.
pub const ACCOUNT_REMOVED: &str = "account removed";

/// The daemon's current config, swapped whole at a reload. Cheap to read: a clone of an `Arc`.
#[derive(Debug)]
pub struct CurrentConfig(RwLock<Arc<Config>>);

impl CurrentConfig {
    /// Holds `config`.
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(config))))
    }

    /// The config in force now.
    pub fn get(&self) -> Arc<Config> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, config: Arc<Config>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

/// Told about every account a reload removed, once its task has ended (the outbox wires this to
/// fail the account's queued sends with [`ACCOUNT_REMOVED`]).
pub trait AccountRemoved: Send + Sync {
    /// `key` is no longer configured.
    fn account_removed(&self, key: &AccountKey);
}

/// What a reload did, each entry `channel:account` (`failed`: `channel: why`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    /// New accounts (started unless disabled).
    pub added: Vec<String>,
    /// Accounts no longer in the file: stopped and gone from the status.
    pub removed: Vec<String>,
    /// Accounts whose resolved config changed: restarted on the new one.
    pub restarted: Vec<String>,
    /// Accounts whose config changed and that are not running (disabled, or stopped by a user).
    pub stopped: Vec<String>,
    /// Accounts whose resolved config is the same: not touched.
    pub unchanged: Vec<String>,
    /// Settings that changed but only apply when channeld restarts.
    pub restart_needed: Vec<String>,
    /// Channels whose plugin refused the new table after validating it (they keep the old one).
    pub failed: Vec<String>,
}

/// A reload that was refused as a whole; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The daemon runs on built-in defaults.
    #[error("channeld was started without a config file: there is nothing to reload")]
    NoFile,
    /// The file does not read, parse, range-check or resolve.
    #[error("{0}; the running config stays")]
    Config(#[from] ConfigError),
    /// A plugin's `validate` refused its channel's new table.
    #[error("{}:{line}: [channels.{channel}] refused by its plugin: {error}; the running config stays", path.display())]
    Refused {
        /// The config file.
        path: PathBuf,
        /// The line of the channel's table.
        line: usize,
        /// The channel.
        channel: String,
        /// The plugin's reason.
        error: String,
    },
    /// The daemon is shutting down.
    #[error("channeld is shutting down")]
    ShuttingDown,
}

/// A part of the daemon that reads live settings from the config in force.
type LiveHook = Arc<dyn Fn(&Config) + Send + Sync>;

/// Reloads the config (see the module docs).
pub struct Reloader {
    current: Arc<CurrentConfig>,
    catalog: Arc<Catalog>,
    supervisor: Supervisor,
    on_removed: Mutex<Option<Arc<dyn AccountRemoved>>>,
    /// Told the config in force after each reload (the health monitor's thresholds).
    live: Mutex<Vec<LiveHook>>,
    /// The file's text as last applied (a watcher event with the same text changes nothing).
    last_text: Mutex<Option<String>>,
}

impl Reloader {
    /// A reloader of `current`'s file.
    pub fn new(
        current: Arc<CurrentConfig>,
        catalog: Arc<Catalog>,
        supervisor: Supervisor,
    ) -> Arc<Self> {
        let last_text = current
            .get()
            .file
            .as_deref()
            .and_then(|f| std::fs::read_to_string(f).ok());
        Arc::new(Self {
            current,
            catalog,
            supervisor,
            on_removed: Mutex::new(None),
            live: Mutex::new(Vec::new()),
            last_text: Mutex::new(last_text),
        })
    }

    /// The config in force.
    pub fn current(&self) -> &Arc<CurrentConfig> {
        &self.current
    }

    /// Sets the hook told about removed accounts.
    pub fn on_account_removed(&self, hook: Arc<dyn AccountRemoved>) {
        *self.on_removed.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Calls `hook` with the config in force after every reload that applied (for parts of the
    /// daemon that keep their own copy of live settings, like the health monitor).
    pub fn on_applied(&self, hook: LiveHook) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Reads the config file again and applies it, as one step of the catalog's reconciler.
    /// `trigger` names who asked, for the audit line.
    ///
    /// # Cancellation safety
    ///
    /// Runs as a task the catalog tracks: dropping the future leaves the reload to complete.
    pub async fn reload(self: &Arc<Self>, trigger: &str) -> Result<ReloadReport, ReloadError> {
        let result = match self.current.get().file.clone() {
            None => Err(ReloadError::NoFile),
            Some(path) => {
                let me = self.clone();
                self.catalog
                    .serialised(move || async move { me.apply(&path).await })
                    .await
                    .unwrap_or(Err(ReloadError::ShuttingDown))
            }
        };
        match &result {
            Ok(r) => tracing::info!(
                target: AUDIT_TARGET,
                trigger,
                added = ?r.added,
                removed = ?r.removed,
                restarted = ?r.restarted,
                stopped = ?r.stopped,
                unchanged = ?r.unchanged,
                failed = ?r.failed,
                "config reloaded"
            ),
            Err(e) => tracing::warn!(target: AUDIT_TARGET, trigger, "config reload refused: {e}"),
        }
        result
    }

    async fn apply(&self, path: &Path) -> Result<ReloadReport, ReloadError> {
        let owned = path.to_owned();
        let (text, parsed) =
            tokio::task::spawn_blocking(move || match std::fs::read_to_string(&owned) {
                Ok(text) => {
                    let parsed = Config::parse(&text, &owned);
                    (text, parsed)
                }
                Err(error) => (String::new(), Err(ConfigError::Read { path: owned, error })),
            })
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        let mut new = parsed?;
        let old = self.current.get();
        let channels = self.supervisor.channels();
        for ch in &channels {
            let section = new.channel(&ch.id);
            if section.table != ch.section.table
                && let Err(e) = self.supervisor.validate_section(&ch.id, &section).await
            {
                return Err(ReloadError::Refused {
                    path: path.to_owned(),
                    line: channel_line(&text, &ch.id),
                    channel: ch.id.clone(),
                    error: e.to_string(),
                });
            }
        }
        let mut report = ReloadReport {
            restart_needed: restart_only_changes(&old, &new),
            ..ReloadReport::default()
        };
        // What only applies at start keeps its running value: the current config says what is
        // in force.
        new.file = old.file.clone();
        new.host = old.host.clone();
        new.api = old.api.clone();
        new.journal = old.journal.clone();
        new.supervisor.restart_log_interval = old.supervisor.restart_log_interval;
        if old.health.interval.is_zero() {
            // The monitor was off at start: it stays off until a restart.
            new.health.interval = old.health.interval;
        }
        let new = Arc::new(new);
        self.current.set(new.clone());
        self.catalog.set_config(new.clone());
        // [supervisor] and [health] numbers: from the next decision they govern.
        self.supervisor.set_policy(new.supervisor.clone());
        let hooks = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for hook in hooks {
            hook(&new);
        }
        *self.last_text.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
        if !report.restart_needed.is_empty() {
            tracing::warn!(
                "config reload: {} changed but only apply when channeld restarts; the rest applies",
                report.restart_needed.join(", ")
            );
        }
        let hook = self
            .on_removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ch in channels {
            let keys = |ids: Vec<String>| -> Vec<String> {
                ids.into_iter()
                    .map(|a| AccountKey::new(ch.id.clone(), a).to_string())
                    .collect()
            };
            match self
                .supervisor
                .reconfigure_channel(&ch.id, new.channel(&ch.id))
                .await
            {
                Ok(r) => {
                    if let Some(hook) = &hook {
                        for account in &r.removed {
                            hook.account_removed(&AccountKey::new(ch.id.clone(), account.clone()));
                        }
                    }
                    report.added.extend(keys(r.added));
                    report.removed.extend(keys(r.removed));
                    report.restarted.extend(keys(r.restarted));
                    report.stopped.extend(keys(r.stopped));
                    report.unchanged.extend(keys(r.unchanged));
                }
                Err(e) => {
                    tracing::error!(channel = %ch.id, "config reload: {e}");
                    report.failed.push(format!("{}: {e}", ch.id));
                }
            }
        }
        Ok(report)
    }

    /// With `[host] watch_config`, watches the config file's directory (editors replace files by
    /// rename) and reloads once the file has been quiet for `settle` and its text changed. Ends
    /// with `stop`. Returns whether watching started.
    pub fn watch(self: &Arc<Self>, stop: CancellationToken) -> bool {
        let config = self.current.get();
        let Some(file) = config.file.clone() else {
            return false;
        };
        let (Some(name), Some(dir)) = (file.file_name().map(ToOwned::to_owned), file.parent())
        else {
            return false;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watched = name.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let ours = match event {
                Ok(event) => event.paths.iter().any(|p| p.file_name() == Some(&watched)),
                // Lost events: look at the file anyway.
                Err(_) => true,
            };
            if ours {
                let _ = tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot watch the config file {}: {e}", file.display());
                return false;
            }
        };
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!("cannot watch the config file {}: {e}", file.display());
            return false;
        }
        let settle = config.host.settle.max(Duration::from_millis(10));
        let me = self.clone();
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    got = rx.recv() => if got.is_none() { return },
                }
                // Quiet for `settle` first: an editor's save is several events.
                while let Ok(Some(())) = tokio::time::timeout(settle, rx.recv()).await {}
                let text = tokio::fs::read_to_string(&file).await.ok();
                let same = text.is_some()
                    && *me.last_text.lock().unwrap_or_else(|p| p.into_inner()) == text;
                if same || stop.is_cancelled() {
                    continue;
                }
                if let Err(e) = me.reload("file change").await {
                    tracing::error!("config file changed: {e}");
                    // Not retried until it changes again.
                    *me.last_text.lock().unwrap_or_else(|p| p.into_inner()) = text;
                }
            }
        });
        tracing::info!(file = %config.file.as_deref().unwrap_or(Path::new("")).display(), "watching the config file");
        true
    }
}

/// The 1-based line of `[channels.<id>]` (or its first sub-table) in `text`; 1 if not found.
fn channel_line(text: &str, id: &str) -> usize {
    let heads = [
        format!("[channels.{id}]"),
        format!("[channels.{id}."),
        format!("[channels.\"{id}\""),
    ];
    text.lines()
        .position(|l| heads.iter().any(|h| l.trim_start().starts_with(h.as_str())))
        .or_else(|| {
            text.lines()
                .position(|l| l.contains(&format!("channels.{id}")))
        })
        .map_or(1, |i| i + 1)
}

/// The restart-only settings that differ between `old` and `new` (`[section] key`).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&old.host, &new.host);
    let mut changed = Vec::new();
    let mut host = |key: &str, differs: bool| {
        if differs {
            changed.push(format!("[host] {key}"));
        }
    };
    host("plugins_dir", a.plugins_dir != b.plugins_dir);
    host("state_dir", a.state_dir != b.state_dir);
    host("api_address", a.api_address != b.api_address);
    host("allow_remote", a.allow_remote != b.allow_remote);
    host("api_token", a.api_token != b.api_token);
    host(
        "plugin_worker_threads",
        a.plugin_worker_threads != b.plugin_worker_threads,
    );
    host(
        "plugin_call_timeout",
        a.plugin_call_timeout != b.plugin_call_timeout,
    );
    host("settle", a.settle != b.settle);
    host("rescan_interval", a.rescan_interval != b.rescan_interval);
    host("watch", a.watch != b.watch);
    host("watch_config", a.watch_config != b.watch_config);
    host("load_timeout", a.load_timeout != b.load_timeout);
    host(
        "plugin_shutdown_timeout",
        a.plugin_shutdown_timeout != b.plugin_shutdown_timeout,
    );
    host(
        "isolation_handshake_timeout",
        a.isolation_handshake_timeout != b.isolation_handshake_timeout,
    );
    if old.api.read_token != new.api.read_token {
        changed.push("[api] read_token".into());
    }
    if old.journal != new.journal {
        changed.push("[journal]".into());
    }
    if old.outbox != new.outbox {
        changed.push("[outbox]".into());
    }
    if old.metrics != new.metrics {
        changed.push("[metrics]".into());
    }
    if old.supervisor.restart_log_interval != new.supervisor.restart_log_interval {
        changed.push("[supervisor] restart_log_interval".into());
    }
    if old.health.interval.is_zero() && !new.health.interval.is_zero() {
        changed.push("[health] interval (the monitor was off at start)".into());
    }
    changed
}

/// `SIGHUP`: reloads in a task of its own (the signal loop goes on) and logs the outcome.
pub fn on_hangup(reloader: &Arc<Reloader>) {
    tracing::info!("SIGHUP: reloading the config");
    let reloader = reloader.clone();
    tokio::spawn(async move {
        // systemd hears RELOADING=1 now and READY=1 when this guard drops, after the reload.
        let _reloading = crate::notify::reloading();
        if let Err(e) = reloader.reload("SIGHUP").await {
            tracing::error!("SIGHUP: {e}");
        }
    });
}

/// `POST /v1/reload`: the [`ReloadReport`], or 400 with the refusal (`file:line: why`).
pub async fn api_reload(
    axum::extract::State(state): axum::extract::State<crate::api::ApiState>,
) -> Result<axum::Json<ReloadReport>, crate::api::ApiError> {
    use axum::http::StatusCode;
    let reloader = state.reload.clone().ok_or_else(|| {
        crate::api::ApiError(
            StatusCode::NOT_FOUND,
            "this daemon has no config reload".into(),
        )
    })?;
    let result =
        crate::api::tracked(&state.tasks, async move { reloader.reload("api").await }).await?;
    result.map(axum::Json).map_err(|e| {
        let status = match e {
            ReloadError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        crate::api::ApiError(status, e.to_string())
    })
}

/// The CLI's lines for a reload's answer: one per non-empty list, names in full.
pub fn report_lines(report: &ReloadReport) -> Vec<String> {
    let mut lines = Vec::new();
    for (what, names) in [
        ("added", &report.added),
        ("removed", &report.removed),
        ("restarted", &report.restarted),
        ("stopped", &report.stopped),
        ("unchanged", &report.unchanged),
        ("failed", &report.failed),
    ] {
        if !names.is_empty() {
            lines.push(format!("{what}: {}", names.join(", ")));
        }
    }
    if !report.restart_needed.is_empty() {
        lines.push(format!(
            "needs a restart of channeld: {}",
            report.restart_needed.join(", ")
        ));
    }
    if lines.is_empty() {
        lines.push("no accounts configured".into());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_is_located_by_its_table_or_a_sub_table() {
        let text = "[host]\nx = 1\n\n[channels.fixture.accounts.a]\nmode = \"run\"\n";
        assert_eq!(channel_line(text, "fixture"), 4);
        assert_eq!(channel_line("[channels.web]\n", "web"), 1);
        assert_eq!(channel_line("a = 1\n[channels.web]\n", "web"), 2);
        assert_eq!(channel_line("a = 1\n", "web"), 1);
    }

    #[test]
    fn restart_only_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let old = Config::parse("", &path).unwrap();
        let new = Config::parse(
            "[host]\napi_address = \"127.0.0.1:9\"\n[supervisor]\nmax_restarts = 2\n\
             restart_log_interval = \"2m\"\n",
            &path,
        )
        .unwrap();
        assert_eq!(
            restart_only_changes(&old, &new),
            vec![
                "[host] api_address".to_owned(),
                "[supervisor] restart_log_interval".to_owned()
            ],
            "max_restarts applies live: not named"
        );
        assert!(restart_only_changes(&old, &old).is_empty());
    }
}
