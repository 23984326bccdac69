//! `channeld run`: loads the plugins, starts every account under the supervisor, serves the API,
//! and on SIGINT/SIGTERM stops every account within the stop timeout, shuts every plugin's runtime
//! down, and returns. A second signal exits at once.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use channeld_plugin_abi::abi::LogLevel;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{self, ApiState},
    clock::{Clock, SystemClock},
    config::{Config, Secret},
    events::EventHub,
    health::HealthMonitor,
    journal::{Journal, JournalError},
    registry::PluginFileError,
    registry::{Loader, Registry},
    reload::HotPlugins,
    stage::StagingDir,
    status::StatusBoard,
    supervise::{Supervisor, calls::bounded, policy::RandomJitter},
    watch::{self, WatchConfig},
};

/// The daemon could not start (or run).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory is unusable.
    #[error("state directory {}: {reason}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The plugins directory is unusable.
    #[error(transparent)]
    PluginsDir(#[from] crate::discover::DirError),
    /// The API could not start.
    #[error("{0}")]
    Api(String),
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// The name of the generated API token file in the state directory.
pub const TOKEN_FILE: &str = "api-token";

/// The file in the state directory that holds the API's bound address (useful with port 0).
pub const ADDRESS_FILE: &str = "api-address";

/// Threads of plugin runtimes still alive in this process (the SDK names them `chd-<channel>`).
pub fn plugin_runtime_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("chd-"))
                .count()
        })
        .unwrap_or(0)
}

/// The API token: the config's, or a fresh random one written (mode 0600) to the state directory.
pub fn api_token(config: &Config) -> Result<Secret, DaemonError> {
    if let Some(token) = &config.host.api_token {
        return Ok(token.clone());
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let path = config.host.state_dir.join(TOKEN_FILE);
    let state_err = |e: std::io::Error| DaemonError::StateDir {
        path: config.host.state_dir.clone(),
        reason: format!("writing {}: {e}", path.display()),
    };
    let _ = fs::remove_file(&path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(state_err)?;
    file.write_all(token.as_bytes()).map_err(state_err)?;
    Ok(Secret::new(token))
}

/// Creates the state directory (0700).
pub fn prepare_state_dir(dir: &Path) -> Result<(), DaemonError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| DaemonError::StateDir {
            path: dir.to_owned(),
            reason: e.to_string(),
        })
}

/// Everything a running daemon holds.
pub struct Daemon {
    /// The config.
    pub config: Config,
    /// Statuses.
    pub board: Arc<StatusBoard>,
    /// The supervisor.
    pub supervisor: Supervisor,
    /// Loaded plugins.
    pub registry: Arc<Mutex<Registry>>,
    /// How plugins are loaded.
    pub loader: Arc<Loader>,
    /// The plugin files the first load refused.
    pub load_errors: Vec<PluginFileError>,
    /// The journal every delivered message goes to.
    pub journal: Arc<Journal>,
}

impl Daemon {
    /// Builds the pieces and loads the plugins directory (bad files are reported, not fatal).
    pub async fn load(config: Config) -> Result<Self, DaemonError> {
        prepare_state_dir(&config.host.state_dir)?;
        let journal = Journal::open(&config.host.state_dir, config.journal.clone())?;
        Self::load_with(config, journal).await
    }

    /// [`Daemon::load`] with the journal already open.
    pub async fn load_with(config: Config, journal: Arc<Journal>) -> Result<Self, DaemonError> {
        prepare_state_dir(&config.host.state_dir)?;
        let staging_path = config.host.state_dir.join("staging");
        let staging = StagingDir::open(&staging_path).map_err(|e| DaemonError::StateDir {
            path: staging_path,
            reason: e.to_string(),
        })?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let board = Arc::new(StatusBoard::new(clock.clone()));
        board.set_message_sink(journal.clone());
        let mut loader = Loader::new(staging, board.clone(), clock.clone());
        loader.worker_threads = config.host.plugin_worker_threads;
        loader.max_log_level = max_log_level();
        let supervisor = Supervisor::new(
            config.supervisor.clone(),
            config.host.plugin_call_timeout,
            board.clone(),
            clock,
            Arc::new(RandomJitter),
        );
        let mut registry = Registry::default();
        let report = registry.load_dir(&loader, &config.host.plugins_dir)?;
        for channel in config.channels.keys() {
            if registry.get(channel).is_none() {
                tracing::warn!(
                    channel = %channel,
                    "the config has [channels.{channel}] but no plugin in {} provides it",
                    config.host.plugins_dir.display()
                );
            }
        }
        tracing::info!(
            loaded = registry.len(),
            refused = report.failed.len(),
            dir = %config.host.plugins_dir.display(),
            "plugins directory loaded"
        );
        let daemon = Self {
            config,
            board,
            supervisor,
            registry: Arc::new(Mutex::new(registry)),
            loader: Arc::new(loader),
            load_errors: report.failed,
            journal,
        };
        let plugins: Vec<_> = daemon.registry().iter().cloned().collect();
        for plugin in plugins {
            let section = daemon.config.channel(&plugin.info.channel_id);
            if let Err(e) = daemon
                .supervisor
                .add_channel(plugin.plugin.clone(), section)
                .await
            {
                tracing::error!(channel = %plugin.info.channel_id, "channel not started: {e}");
            }
        }
        Ok(daemon)
    }

    /// The registry, locked.
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every account, then shuts every plugin's runtime down (bounded per plugin).
    pub async fn shutdown(&self) {
        self.supervisor.shutdown().await;
        let plugins: Vec<_> = self.registry().iter().cloned().collect();
        for plugin in plugins {
            let channel = plugin.info.channel_id.clone();
            let call = plugin.plugin.clone();
            match bounded(Duration::from_secs(10), move || call.shutdown()).await {
                Ok(Ok(())) => tracing::debug!(channel = %channel, "plugin runtime shut down"),
                Ok(Err(e)) => tracing::warn!(channel = %channel, "plugin shutdown: {e}"),
                Err(e) => tracing::warn!(channel = %channel, "plugin shutdown {e}"),
            }
        }
    }
}

fn max_log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::ERROR => LogLevel::Error,
        LevelFilter::WARN => LogLevel::Warn,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::DEBUG => LogLevel::Debug,
        _ => LogLevel::Trace,
    }
}

/// Feeds the reconciler every plugin path the watcher reports.
pub fn watch_plugins(config: &Config, hot: Arc<HotPlugins>, stop: CancellationToken) {
    let (changes, mut paths) = tokio::sync::mpsc::unbounded_channel();
    let watching = watch::spawn(
        WatchConfig {
            dir: config.host.plugins_dir.clone(),
            settle: config.host.settle,
            rescan_interval: config.host.rescan_interval,
            use_events: config.host.watch,
        },
        changes,
        stop,
    );
    tracing::info!(
        dir = %config.host.plugins_dir.display(),
        events = watching,
        rescan = %humantime::format_duration(config.host.rescan_interval),
        "watching the plugins directory"
    );
    tokio::spawn(async move {
        while let Some(path) = paths.recv().await {
            let change = hot.reconcile(&path).await;
            tracing::debug!(file = %path.display(), ?change, "plugins directory change");
        }
    });
}

/// Runs the daemon until a signal, then shuts down in order.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Api(e.to_string()))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Api(e.to_string()))?;
    prepare_state_dir(&config.host.state_dir)?;
    // First: a journal held by another daemon must stop this one before it touches the token and
    // address files that daemon's clients read.
    let journal = Journal::open(&config.host.state_dir, config.journal.clone())?;
    let token = api_token(&config)?;
    let listener = api::bind(config.host.api_address)
        .await
        .map_err(DaemonError::Api)?;
    let api_address = listener.local_addr().ok();
    if let Some(address) = api_address {
        let path = config.host.state_dir.join(ADDRESS_FILE);
        fs::write(&path, address.to_string()).map_err(|e| DaemonError::StateDir {
            path: config.host.state_dir.clone(),
            reason: format!("writing {}: {e}", path.display()),
        })?;
    }
    let daemon = Arc::new(Daemon::load_with(config, journal).await?);
    let background = CancellationToken::new();
    let hot = HotPlugins::new(
        Arc::new(daemon.config.clone()),
        daemon.registry.clone(),
        daemon.loader.clone(),
        daemon.supervisor.clone(),
    );
    for error in &daemon.load_errors {
        hot.note_error(error);
    }
    watch_plugins(&daemon.config, hot.clone(), background.clone());
    let monitor = HealthMonitor::new(
        daemon.config.health.clone(),
        Arc::new(daemon.supervisor.clone()),
        tokio::time::Instant::now(),
    );
    tokio::spawn(monitor.run(background.clone()));
    let events = EventHub::new(daemon.journal.clone());
    tokio::spawn(crate::events::state::watch(
        daemon.supervisor.clone(),
        events.states().clone(),
        background.clone(),
    ));
    let stop_api = CancellationToken::new();
    let api_task = tokio::spawn(api::serve(
        listener,
        ApiState {
            supervisor: daemon.supervisor.clone(),
            token,
            hot: Some(hot),
            read_token: daemon.config.api.read_token.clone(),
            events: Some(events.clone()),
        },
        stop_api.clone(),
    ));
    if let Some(address) = api_address {
        tracing::info!(%address, "API listening");
    }

    let starter = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let summary = daemon.supervisor.start_all().await;
            for (channel, s) in &summary {
                tracing::info!(
                    channel = %channel,
                    attempted = s.attempted,
                    started = s.started,
                    failed = s.failed,
                    timed_out = s.timed_out,
                    "channel started"
                );
            }
        })
    };

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping every account"),
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping every account"),
    }
    // A second signal means "now".
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
        eprintln!("channeld: second signal, exiting at once");
        std::process::exit(130);
    });
    starter.abort();
    background.cancel();
    stop_api.cancel();
    // Event streams never end by themselves: end them so the API can finish.
    events.close();
    daemon.shutdown().await;
    let _ = api_task.await;
    // Every account is stopped: commit what is queued and close the journal.
    let journal = daemon.journal.clone();
    let _ = tokio::task::spawn_blocking(move || journal.close()).await;
    // The address is no longer ours: a client must not reach whoever binds the port next.
    let _ = fs::remove_file(daemon.config.host.state_dir.join(ADDRESS_FILE));
    tracing::info!(
        plugin_threads = plugin_runtime_threads(),
        "stopped: every account stopped and every plugin runtime shut down"
    );
    Ok(())
}
