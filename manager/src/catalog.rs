//! The plugin catalog: the one owner of plugin files, their content hashes, their staged copies,
//! the loaded versions, which version serves each channel, load errors, removed channels and the
//! retirement of old versions. The API and the CLI ask it; nothing else keeps a copy.
//!
//! It is also the reconciler: each change — the initial load of the directory, a path the watcher
//! reports, a rescan — is one step, serialised with every other step, that brings what runs in
//! line with the file as it is now, and either completes or leaves the previous state in place:
//!
//! * a new file is staged, loaded (bounded by `load_timeout`, on a thread of its own so a
//!   constructor that never returns costs that thread and a `timed-out` error, never the daemon),
//!   its channel registered, and its accounts started;
//! * a changed file (new content) is loaded first; the channel moves to it only if the supervisor
//!   accepts it (`configure` and the account listing succeed). Then the old version's accounts
//!   are stopped and started on the new one (never two tasks for one account) and the old
//!   version retired: its runtime shut down, its library kept mapped. If the new version is
//!   refused, the old one keeps serving and the change is reported `failed` with why;
//! * a removed file stops its channel's accounts and the channel shows as removed;
//! * a file refused once is not read, nor logged, again until it changes.
//!
//! The supervisor asks the catalog which registration serves a channel, and which channels were
//! removed with which accounts, through [`Serving`] (installed by [`Catalog::open`]); it keeps
//! no copy. Each channel's entry holds the loaded version and the supervisor's registration of
//! it (its config and accounts) together, written in one place: on add, on replace (before the
//! accounts move, so every start from then on uses the new version; a refused version never
//! enters) and on a config reload; a removal moves the channel and its accounts to the removed
//! list before they stop.
//!
//! Steps run as tasks the catalog tracks: a caller that goes away (an HTTP client that
//! disconnects) changes nothing about the outcome, and [`Catalog::close`] waits for the step in
//! flight.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use serde::Serialize;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    clock::Clock,
    config::Config,
    discover::{self, DirError},
    registry::{LoadedPlugin, Loader, PluginFileError, log_refused},
    stage::{StageError, Staged},
    supervise::{Channel, Serving, StartOutcome, Supervisor, calls::bounded},
    watch::{ChangeQueue, Signature, signature},
};

/// What one reconcile step did.
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
    /// Nothing to do (same content, a file already refused as it is, or not a plugin path).
    Unchanged,
    /// The file did not load or was refused; whatever ran before keeps running.
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
    /// For a channel isolated in a child process: the mode and the child's pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::isolate::IsolationInfo>,
}

/// `GET /v1/plugins`: every plugin file, and how many reconcile steps ran.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// Every loaded, failed and removed plugin file.
    pub plugins: Vec<PluginListing>,
    /// Reconcile steps run since the start (the initial load's included).
    pub reconciles: u64,
    /// When the last step ran (ms since the epoch).
    pub last_reconcile_at: Option<i64>,
}

/// The catalog's bounds.
#[derive(Debug, Clone, Copy)]
pub struct CatalogSettings {
    /// How long loading one file may take (staging, opening, constructor, `init`).
    pub load_timeout: std::time::Duration,
    /// How long a retired version's runtime may take to shut down.
    pub shutdown_timeout: std::time::Duration,
}

impl CatalogSettings {
    /// The bounds of `config`.
    pub fn of(config: &Config) -> Self {
        Self {
            load_timeout: config.host.load_timeout,
            shutdown_timeout: config.host.plugin_shutdown_timeout,
        }
    }
}

/// The version serving a channel, the supervisor's registration of it, and what its file looked
/// like when it was taken.
struct Current {
    loaded: LoadedPlugin,
    /// The registration new starts use (same plugin as `loaded`; a reload swaps it).
    channel: Arc<Channel>,
    seen: Option<Signature>,
}

/// A channel whose file was removed.
struct Removed {
    file: PathBuf,
    version: String,
    /// Its accounts, kept in the snapshot marked removed.
    accounts: Vec<String>,
}

/// A file whose last change was refused.
struct Refusal {
    channel: Option<String>,
    error: String,
    seen: Option<Signature>,
}

#[derive(Default)]
struct State {
    /// Channel → the version serving it.
    current: BTreeMap<String, Current>,
    /// File → why its last change was refused.
    refused: BTreeMap<PathBuf, Refusal>,
    /// Versions mapped per channel (current, retired and refused ones).
    mapped: BTreeMap<String, usize>,
    /// Channels whose file was removed, with their last file, version and accounts.
    removed: BTreeMap<String, Removed>,
    reconciles: u64,
    last_reconcile_ms: Option<i64>,
}

/// The catalog (see the module docs).
pub struct Catalog {
    dir: PathBuf,
    /// The daemon's current config (a reload swaps it whole, between two steps).
    config: Mutex<Arc<Config>>,
    loader: Arc<Loader>,
    supervisor: Supervisor,
    clock: Arc<dyn Clock>,
    settings: CatalogSettings,
    /// One step at a time.
    turn: tokio::sync::Mutex<()>,
    state: Arc<Mutex<State>>,
    tasks: TaskTracker,
    closed: CancellationToken,
    /// The idle loader thread's job queue.
    loader_thread: Mutex<Option<std::sync::mpsc::Sender<LoadJob>>>,
}

/// Work for the loader thread.
type LoadJob = Box<dyn FnOnce() + Send>;

/// A thread that runs loader jobs until its queue is dropped.
fn spawn_loader_thread() -> Result<std::sync::mpsc::Sender<LoadJob>, String> {
    let (tx, rx) = std::sync::mpsc::channel::<LoadJob>();
    std::thread::Builder::new()
        .name("channeld-load".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        })
        .map_err(|e| format!("cannot start a loader thread: {e}"))?;
    Ok(tx)
}

/// What loading a file on the loader thread produced.
enum Loaded {
    /// The same content as the version serving it.
    Same,
    /// New content, loaded or refused.
    New(Box<Result<LoadedPlugin, PluginFileError>>),
}

impl Catalog {
    /// A catalog of `config`'s plugins directory (its canonical name: one file, one name).
    pub fn open(
        config: Arc<Config>,
        loader: Arc<Loader>,
        supervisor: Supervisor,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, DirError> {
        let dir = &config.host.plugins_dir;
        discover::check_dir(dir)?;
        let dir = std::fs::canonicalize(dir).map_err(|error| DirError::Unreadable {
            path: dir.clone(),
            error,
        })?;
        let state = Arc::new(Mutex::new(State::default()));
        supervisor.set_serving(Arc::new(Answers(state.clone())));
        Ok(Arc::new(Self {
            dir,
            settings: CatalogSettings::of(&config),
            config: Mutex::new(config),
            loader,
            supervisor,
            clock,
            turn: tokio::sync::Mutex::new(()),
            state,
            tasks: TaskTracker::new(),
            closed: CancellationToken::new(),
            loader_thread: Mutex::new(None),
        }))
    }

    /// The plugins directory, canonical.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config the catalog hands to channels it adds or replaces.
    fn config(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `step` as one step of the reconciler: after the step in flight, before the next,
    /// as a task the catalog tracks (a config reload goes through here, never beside it).
    /// `None` once the catalog is closed.
    ///
    /// # Cancellation safety
    ///
    /// Runs as a tracked task: dropping the future leaves the step to complete.
    pub async fn serialised<T, F>(
        self: &Arc<Self>,
        step: impl FnOnce() -> F + Send + 'static,
    ) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send,
    {
        if self.closed.is_cancelled() {
            return None;
        }
        let me = self.clone();
        self.tracked(async move {
            let _turn = me.turn.lock().await;
            if me.closed.is_cancelled() {
                return None;
            }
            Some(step().await)
        })
        .await
        .flatten()
    }

    /// Swaps the config the catalog hands to channels (a reload, inside [`Catalog::serialised`]).
    pub fn set_config(&self, config: Arc<Config>) {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The version serving `channel`.
    pub fn plugin(&self, channel: &str) -> Option<LoadedPlugin> {
        self.state().current.get(channel).map(|c| c.loaded.clone())
    }

    /// Every version serving a channel, by channel id.
    pub fn plugins(&self) -> Vec<LoadedPlugin> {
        self.state()
            .current
            .values()
            .map(|c| c.loaded.clone())
            .collect()
    }

    /// Runs `step` as a task the catalog tracks and waits for it.
    async fn tracked<T: Send + 'static>(
        &self,
        step: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        self.tasks.spawn(step).await.ok()
    }

    /// The initial load: every plugin file of the directory through the same step (and bounds)
    /// as a hot change, registering each channel without starting its accounts (start-all does
    /// that with its fan-out limits). Staging runs in parallel first.
    ///
    /// # Cancellation safety
    ///
    /// Runs as a tracked task: dropping the future leaves the load to complete.
    pub async fn load_initial(self: &Arc<Self>) -> Result<(), DirError> {
        let me = self.clone();
        self.tracked(async move {
            let _turn = me.turn.lock().await;
            let paths = discover::plugin_paths(&me.dir)?;
            let mut staged = me
                .stage_all(&paths)
                .await
                .map(|s| s.into_iter().map(Some).collect::<Vec<_>>())
                .unwrap_or_default();
            let mut refused = 0;
            for (i, path) in paths.iter().enumerate() {
                let pre = staged.get_mut(i).and_then(Option::take);
                if let Change::Failed { .. } = me.step(path, pre, false).await {
                    refused += 1;
                }
            }
            let loaded = me.state().current.len();
            for channel in me.config().channels.keys() {
                if me.plugin(channel).is_none() {
                    tracing::warn!(
                        channel = %channel,
                        "the config has [channels.{channel}] but no plugin in {} provides it",
                        me.dir.display()
                    );
                }
            }
            tracing::info!(
                loaded,
                refused,
                dir = %me.dir.display(),
                "plugins directory loaded"
            );
            Ok(())
        })
        .await
        .unwrap_or(Ok(()))
    }

    /// Stages `paths` in parallel within the load bound; `None` if that did not finish (each
    /// file is then staged by its own bounded step).
    async fn stage_all(&self, paths: &[PathBuf]) -> Option<Vec<Result<Staged, StageError>>> {
        if paths.is_empty() {
            return Some(Vec::new());
        }
        let loader = self.loader.clone();
        let owned = paths.to_vec();
        self.on_load_thread(move || loader.stage_all(&owned))
            .await
            .ok()
    }

    /// Runs `f` on the loader thread (outside tokio's pools), waiting at most the load timeout.
    /// A thread that never returns (a plugin constructor blocking for good) is left behind,
    /// holding no lock and no runtime thread, and the next load gets a new one.
    async fn on_load_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: LoadJob = Box::new(move || {
            let _ = tx.send(f());
        });
        // The warm loader thread if there is one (steps are serialised, so it is idle), else a
        // new one.
        let worker = self
            .loader_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let worker = match worker {
            Some(worker) => worker,
            None => spawn_loader_thread()?,
        };
        worker
            .send(job)
            .map_err(|_| "the loader thread is gone".to_owned())?;
        let result = tokio::time::timeout(self.settings.load_timeout, rx).await;
        if let Ok(Ok(_)) = &result {
            // It finished its job: keep it for the next one. One that timed out is left to
            // its job (it ends if that ever returns), and the next load gets a new thread.
            *self.loader_thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(worker);
        }
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err("the loader thread panicked".into()),
            Err(_) => Err(format!(
                "loading did not return within {}",
                humantime::format_duration(self.settings.load_timeout)
            )),
        }
    }

    /// Brings what runs in line with `path` as it is now (one step).
    ///
    /// # Cancellation safety
    ///
    /// Runs as a tracked task: dropping the future leaves the step to complete.
    pub async fn reconcile(self: &Arc<Self>, path: &Path) -> Change {
        let me = self.clone();
        let path = path.to_owned();
        self.tracked(async move {
            let _turn = me.turn.lock().await;
            me.step(&path, None, true).await
        })
        .await
        .unwrap_or(Change::Unchanged)
    }

    /// Follows `changes` (the watcher's queue): one step per path, in a task the catalog tracks,
    /// until the queue is closed. [`Catalog::close`] waits for the step in flight.
    pub fn follow(self: &Arc<Self>, changes: Arc<ChangeQueue>) {
        let me = self.clone();
        self.tasks.spawn(async move {
            while let Some(path) = changes.pop().await {
                if me.closed.is_cancelled() {
                    break;
                }
                let change = {
                    let _turn = me.turn.lock().await;
                    me.step(&path, None, true).await
                };
                tracing::debug!(file = %path.display(), ?change, "plugins directory change");
            }
        });
    }

    /// Reconciles every plugin path of the directory, every loaded plugin's file and every
    /// refused file, one step each.
    ///
    /// # Cancellation safety
    ///
    /// Runs as a tracked task: dropping the future leaves the rescan to complete.
    pub async fn rescan(self: &Arc<Self>) -> Vec<(String, Change)> {
        let me = self.clone();
        self.tracked(async move {
            let mut paths: Vec<PathBuf> = discover::plugin_paths(&me.dir).unwrap_or_default();
            {
                let state = me.state();
                let known = state
                    .current
                    .values()
                    .map(|c| c.loaded.staged.source.clone())
                    .chain(state.refused.keys().cloned());
                for path in known.collect::<Vec<_>>() {
                    if !paths.contains(&path) {
                        paths.push(path);
                    }
                }
            }
            let mut changes = Vec::new();
            for path in paths {
                let change = {
                    let _turn = me.turn.lock().await;
                    me.step(&path, None, true).await
                };
                changes.push((path.display().to_string(), change));
            }
            changes
        })
        .await
        .unwrap_or_default()
    }

    /// Stops taking steps and waits for the one in flight (shutdown's first move).
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: the catalog is closed at the first poll; waiting can be resumed by calling
    /// it again.
    pub async fn close(&self) {
        self.closed.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Shuts down every serving version's runtime, each bounded (after the supervisor stopped
    /// every account).
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: a dropped future leaves the remaining runtimes running.
    pub async fn shutdown_plugins(&self) {
        for plugin in self.plugins() {
            let channel = plugin.info.channel_id.clone();
            let call = plugin.plugin.clone();
            match bounded(self.settings.shutdown_timeout, move || call.shutdown()).await {
                Ok(Ok(())) => tracing::debug!(channel = %channel, "plugin runtime shut down"),
                Ok(Err(e)) => tracing::warn!(channel = %channel, "plugin shutdown: {e}"),
                Err(e) => tracing::warn!(channel = %channel, "plugin shutdown {e}"),
            }
        }
    }

    /// One step for `path` (the caller holds the turn). `pre` is a staging already done.
    async fn step(
        &self,
        path: &Path,
        pre: Option<Result<Staged, StageError>>,
        start: bool,
    ) -> Change {
        {
            let mut state = self.state();
            state.reconciles += 1;
            state.last_reconcile_ms = Some(self.clock.wall_ms());
        }
        if self.closed.is_cancelled() || !discover::is_plugin_name(path) {
            return Change::Unchanged;
        }
        // One name per file: `<canonical dir>/<name>`.
        let path = match path.file_name() {
            Some(name) if path.parent() == Some(self.dir.as_path()) => self.dir.join(name),
            Some(name) => match path.parent().map(std::fs::canonicalize) {
                Some(Ok(parent)) if parent == self.dir => self.dir.join(name),
                _ => return Change::Unchanged,
            },
            None => return Change::Unchanged,
        };
        let path = path.as_path();
        let seen = signature(path);
        let (current, refused_as_is) = {
            let state = self.state();
            let current = state
                .current
                .values()
                .find(|c| c.loaded.staged.source == path)
                .map(|c| (c.loaded.clone(), c.seen));
            let refused_as_is =
                seen.is_some() && state.refused.get(path).is_some_and(|r| r.seen == seen);
            (current, refused_as_is)
        };
        let present = std::fs::symlink_metadata(path).is_ok();
        if !present {
            return match current {
                Some((old, _)) => self.remove(old).await,
                None => {
                    self.state().refused.remove(path);
                    Change::Unchanged
                }
            };
        }
        if refused_as_is {
            // Reported once already; not read again until it changes.
            return Change::Unchanged;
        }
        if let Some((_, current_seen)) = &current
            && seen.is_some()
            && *current_seen == seen
            && pre.is_none()
        {
            return Change::Unchanged;
        }
        let loader = self.loader.clone();
        let owned = path.to_owned();
        let current_hash = current.as_ref().map(|(c, _)| c.staged.hash.clone());
        let claimed: BTreeMap<String, PathBuf> = self
            .state()
            .current
            .values()
            .filter(|c| c.loaded.staged.source != path)
            .map(|c| {
                (
                    c.loaded.info.channel_id.clone(),
                    c.loaded.staged.source.clone(),
                )
            })
            .collect();
        let loaded = self
            .on_load_thread(move || {
                let staged = match pre {
                    Some(staged) => staged,
                    None => loader.stage(&owned),
                };
                match staged {
                    Ok(staged) if Some(&staged.hash) == current_hash.as_ref() => Loaded::Same,
                    Ok(staged) => {
                        let began = std::time::Instant::now();
                        let file = staged.source.display().to_string();
                        let loaded = loader.load_staged(staged, |c| claimed.get(c).cloned());
                        crate::metrics::record_plugin_load(&file, began.elapsed());
                        Loaded::New(Box::new(loaded))
                    }
                    Err(e) => Loaded::New(Box::new(Err(e.into()))),
                }
            })
            .await;
        let new = match loaded {
            Ok(Loaded::Same) => {
                let mut state = self.state();
                state.refused.remove(path);
                if let Some((old, _)) = &current
                    && let Some(c) = state.current.get_mut(&old.info.channel_id)
                {
                    c.seen = seen;
                }
                return Change::Unchanged;
            }
            Ok(Loaded::New(loaded)) => match *loaded {
                Ok(new) => new,
                Err(error) => {
                    log_refused(&error);
                    return self.refuse(path, None, error.class(), error.to_string(), seen);
                }
            },
            Err(why) => {
                let error = format!("{}: {why}", path.display());
                tracing::warn!(class = "timed-out", "plugin file refused: {error}");
                return self.refuse(path, None, "timed-out", error, seen);
            }
        };
        match current {
            Some((old, _)) if old.info.channel_id == new.info.channel_id => {
                self.replace(old, new, seen).await
            }
            Some((old, _)) => {
                // The file now provides another channel: the old one goes, the new one comes.
                self.remove(old).await;
                self.add(new, seen, start).await
            }
            None => self.add(new, seen, start).await,
        }
    }

    fn refuse(
        &self,
        path: &Path,
        channel: Option<String>,
        class: &str,
        error: String,
        seen: Option<Signature>,
    ) -> Change {
        self.state().refused.insert(
            path.to_owned(),
            Refusal {
                channel,
                error: error.clone(),
                seen,
            },
        );
        Change::Failed {
            file: path.display().to_string(),
            class: class.to_owned(),
            error,
        }
    }

    async fn add(&self, new: LoadedPlugin, seen: Option<Signature>, start: bool) -> Change {
        let channel = new.info.channel_id.clone();
        let version = new.info.plugin_version.clone();
        let path = new.staged.source.clone();
        let section = self.config().channel(&channel);
        *self.state().mapped.entry(channel.clone()).or_default() += 1;
        let registered = match self.supervisor.register(new.plugin.clone(), section).await {
            Ok(registered) => registered,
            Err(e) => {
                let error = format!("{}: channel {channel} {version}: {e}", path.display());
                tracing::error!(channel = %channel, "plugin file refused: {error}");
                self.retire(new).await;
                return self.refuse(&path, Some(channel), "channel-failed", error, seen);
            }
        };
        {
            let mut state = self.state();
            state.refused.remove(&path);
            state.removed.remove(&channel);
            state.current.insert(
                channel.clone(),
                Current {
                    loaded: new.clone(),
                    channel: registered,
                    seen,
                },
            );
        }
        tracing::info!(
            file = %path.display(),
            channel = %channel,
            version = %version,
            "plugin loaded"
        );
        if start {
            match self.supervisor.start(&channel, None).await {
                Ok(outcomes) => tracing::info!(
                    channel = %channel,
                    version = %version,
                    accounts = outcomes.len(),
                    "plugin added"
                ),
                Err(e) => tracing::error!(channel = %channel, "starting the new channel: {e}"),
            }
        }
        Change::Added { channel, version }
    }

    async fn replace(
        &self,
        old: LoadedPlugin,
        new: LoadedPlugin,
        seen: Option<Signature>,
    ) -> Change {
        let channel = new.info.channel_id.clone();
        let path = new.staged.source.clone();
        let (from, to) = (
            old.info.plugin_version.clone(),
            new.info.plugin_version.clone(),
        );
        let section = self.config().channel(&channel);
        *self.state().mapped.entry(channel.clone()).or_default() += 1;
        tracing::info!(channel = %channel, from = %from, to = %to, "replacing plugin");
        let registered = self.supervisor.register(new.plugin.clone(), section).await;
        match registered {
            Ok(registered) => {
                // From here on every start, revival and reconfigure uses the new version.
                let previous = {
                    let mut state = self.state();
                    state.refused.remove(&path);
                    state.current.insert(
                        channel.clone(),
                        Current {
                            loaded: new,
                            channel: registered.clone(),
                            seen,
                        },
                    )
                };
                let restarted = match previous {
                    Some(previous) => {
                        self.supervisor
                            .switch_over(&previous.channel, &registered)
                            .await
                    }
                    None => Vec::new(),
                };
                tracing::info!(
                    channel = %channel,
                    from = %from,
                    to = %to,
                    accounts = restarted.len(),
                    started = restarted
                        .iter()
                        .filter(|(_, o)| matches!(o, StartOutcome::Started))
                        .count(),
                    "plugin replaced"
                );
                self.retire(old).await;
                Change::Replaced { channel, from, to }
            }
            Err(e) => {
                let error = format!(
                    "{}: channel {channel} {to} refused, {from} keeps serving: {e}",
                    path.display()
                );
                tracing::warn!(class = "replace-failed", "plugin file refused: {error}");
                self.retire(new).await;
                self.refuse(&path, Some(channel), "replace-failed", error, seen)
            }
        }
    }

    async fn remove(&self, old: LoadedPlugin) -> Change {
        let channel = old.info.channel_id.clone();
        // Removed first: from here on no start finds the channel, and the snapshot keeps its
        // accounts marked removed while they stop.
        let registered = {
            let mut state = self.state();
            let current = state.current.remove(&channel);
            state.refused.remove(&old.staged.source);
            state.removed.insert(
                channel.clone(),
                Removed {
                    file: old.staged.source.clone(),
                    version: old.info.plugin_version.clone(),
                    accounts: current
                        .as_ref()
                        .map(|c| c.channel.accounts.to_vec())
                        .unwrap_or_default(),
                },
            );
            current.map(|c| c.channel)
        };
        if let Some(registered) = registered {
            self.supervisor.stop_removed(&registered).await;
        }
        tracing::info!(channel = %channel, file = %old.staged.source.display(), "plugin removed");
        self.retire(old).await;
        Change::Removed { channel }
    }

    /// Shuts a version's runtime down once its accounts are gone (or it never served any). Its
    /// library stays mapped (unloading a library whose threads or TLS destructors may still run
    /// crashes); content that comes back later is staged afresh.
    async fn retire(&self, old: LoadedPlugin) {
        self.loader.retire(&old.staged);
        let plugin = old.plugin.clone();
        let channel = old.info.channel_id.clone();
        match bounded(self.settings.shutdown_timeout, move || plugin.shutdown()).await {
            Ok(Ok(())) => {
                tracing::debug!(channel = %channel, version = %old.info.plugin_version, "version retired")
            }
            Ok(Err(e)) => tracing::warn!(channel = %channel, "retired version's shutdown: {e}"),
            Err(e) => tracing::warn!(channel = %channel, "retired version's shutdown {e}"),
        }
    }

    /// `channeld plugins`: every loaded, failed and removed plugin file, and the reconcile count.
    pub fn listing(&self) -> Listing {
        let state = self.state();
        let mut plugins: Vec<PluginListing> = state
            .current
            .values()
            .map(|c| {
                let p = &c.loaded;
                PluginListing {
                    channel: p.info.channel_id.clone(),
                    state: "loaded",
                    version: Some(p.info.plugin_version.clone()),
                    file: p.staged.source.display().to_string(),
                    hash: Some(p.staged.hash.clone()),
                    loaded_at: Some(p.loaded_at_ms),
                    load_error: state.refused.get(&p.staged.source).map(|r| r.error.clone()),
                    versions_mapped: state.mapped.get(&p.info.channel_id).copied().unwrap_or(1),
                    isolation: p.plugin.isolation(),
                }
            })
            .collect();
        for (file, refusal) in &state.refused {
            if !plugins.iter().any(|l| Path::new(&l.file) == file) {
                plugins.push(PluginListing {
                    channel: refusal.channel.clone().unwrap_or_default(),
                    state: "failed",
                    version: None,
                    file: file.display().to_string(),
                    hash: None,
                    loaded_at: None,
                    load_error: Some(refusal.error.clone()),
                    versions_mapped: 0,
                    isolation: None,
                });
            }
        }
        for (channel, removed) in &state.removed {
            plugins.push(PluginListing {
                channel: channel.clone(),
                state: "removed",
                version: Some(removed.version.clone()),
                file: removed.file.display().to_string(),
                hash: None,
                loaded_at: None,
                load_error: None,
                versions_mapped: state.mapped.get(channel).copied().unwrap_or(0),
                isolation: None,
            });
        }
        Listing {
            plugins,
            reconciles: state.reconciles,
            last_reconcile_at: state.last_reconcile_ms,
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The catalog's answers to the supervisor ([`Serving`]): read from the catalog's own state,
/// under its lock only (never the supervisor's, never across a call).
struct Answers(Arc<Mutex<State>>);

impl Serving for Answers {
    fn serving(&self, channel: &str) -> Option<Arc<Channel>> {
        lock(&self.0)
            .current
            .get(channel)
            .map(|c| c.channel.clone())
    }

    fn served(&self) -> Vec<Arc<Channel>> {
        lock(&self.0)
            .current
            .values()
            .map(|c| c.channel.clone())
            .collect()
    }

    fn removed(&self) -> Vec<(String, Vec<String>)> {
        lock(&self.0)
            .removed
            .iter()
            .map(|(id, r)| (id.clone(), r.accounts.clone()))
            .collect()
    }

    fn failed(&self) -> Vec<(String, String)> {
        // The refusals of files whose channel failed to register (or to replace a version).
        lock(&self.0)
            .refused
            .values()
            .filter_map(|r| Some((r.channel.clone()?, r.error.clone())))
            .collect()
    }

    fn reconfigured(&self, channel: Arc<Channel>) {
        let mut state = lock(&self.0);
        if let Some(current) = state.current.get_mut(&channel.id)
            && Arc::ptr_eq(&current.channel.plugin, &channel.plugin)
        {
            current.channel = channel;
        }
    }
}
