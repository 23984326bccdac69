//! `channeld run`: loads the plugins, starts every account under the supervisor, serves the API,
//! and on SIGINT/SIGTERM stops every account within the stop timeout, shuts every plugin's runtime
//! down, and returns. A second signal exits at once.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use channeld_plugin_abi::abi::LogLevel;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{self, ApiState},
    catalog::Catalog,
    clock::{Clock, SystemClock},
    config::{Config, Secret},
    events::EventHub,
    health::HealthMonitor,
    journal::{Journal, JournalError},
    registry::Loader,
    reload::{CurrentConfig, Reloader},
    stage::StagingDir,
    status::StatusBoard,
    supervise::{Supervisor, policy::RandomJitter},
    watch::{self, ChangeQueue, WatchConfig},
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
    /// Another daemon holds the state directory.
    #[error(transparent)]
    Locked(#[from] crate::state_lock::LockError),
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Shut down, but not every account stopped: their tasks block their threads (each is
    /// logged with what it is blocked in). `channeld run` exits with [`EXIT_NOT_ALL_STOPPED`].
    #[error("shut down, but {} account(s) did not stop: {}", .0.len(), .0.join(", "))]
    NotEveryAccountStopped(Vec<String>),
}

/// How long a complete shutdown waits for the plugin threads it joined to be gone from the
/// process (see [`plugin_runtime_threads_settled`]).
const PLUGIN_THREADS_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// The name of the generated API token file in the state directory.
pub const TOKEN_FILE: &str = "api-token";

/// The file in the state directory that holds the API's bound address (useful with port 0).
pub const ADDRESS_FILE: &str = "api-address";

/// Threads of plugin runtimes still alive in this process (the SDK names them `chd-<channel>`).
pub fn plugin_runtime_threads() -> usize {
    threads_named("chd-")
}

/// [`plugin_runtime_threads`] once the threads a runtime's shutdown has joined are gone, waiting
/// at most `limit`. A joined thread can still be listed for a moment: the kernel wakes the thread
/// that joins it before it has finished exiting, which a loaded machine can stretch to
/// milliseconds. Read at once, the count could then call a clean shutdown blocked.
pub async fn plugin_runtime_threads_settled(limit: std::time::Duration) -> usize {
    threads_settled("chd-", limit).await
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// [`threads_named`] polled until none is left or `limit` has passed.
async fn threads_settled(prefix: &str, limit: std::time::Duration) -> usize {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = threads_named(prefix);
        if left == 0 || std::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
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
    /// The plugin catalog: files, versions, which version serves each channel, load errors.
    pub catalog: Arc<Catalog>,
    /// Paths the watcher reported, waiting for the catalog.
    pub changes: Arc<ChangeQueue>,
    /// Tasks the daemon runs on behalf of API callers.
    pub tasks: TaskTracker,
    /// The journal every delivered message goes to.
    pub journal: Arc<Journal>,
    /// The config's gateways (they bridge once [`crate::outbox::gateway::Gateways::attach`]ed).
    pub gateways: Arc<crate::outbox::gateway::Gateways>,
    /// Config reload; its [`CurrentConfig`] is the config in force (`config` above is the one
    /// the daemon started with, whose restart-only settings stay in force).
    pub reloader: Arc<Reloader>,
}

impl Daemon {
    /// Builds the pieces (nothing is loaded yet: see [`Daemon::load`] and
    /// [`Catalog::load_initial`]).
    pub fn new(config: Config) -> Result<Self, DaemonError> {
        prepare_state_dir(&config.host.state_dir)?;
        let journal = Journal::open(&config.host.state_dir, config.journal.clone())?;
        Self::with_journal(config, journal)
    }

    /// [`Daemon::new`] with the journal already open.
    pub fn with_journal(config: Config, journal: Arc<Journal>) -> Result<Self, DaemonError> {
        prepare_state_dir(&config.host.state_dir)?;
        let staging_path = config.host.state_dir.join("staging");
        let staging = StagingDir::open(&staging_path).map_err(|e| DaemonError::StateDir {
            path: staging_path,
            reason: e.to_string(),
        })?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        // The config in force: the reloader swaps it, and the gateways read theirs from it.
        let current = CurrentConfig::new(config.clone());
        // Where plugins' inbound messages go (both deliver and deliver_async): the journal,
        // through the gateways in force (none at start, some after a reload: gateway.rs).
        let gateways =
            crate::outbox::gateway::Gateways::new(current.clone(), config.outbox.hop_limit);
        let sink: Arc<dyn crate::inbound::MessageSink> =
            Arc::new(crate::outbox::gateway::GatewaySink {
                inner: journal.clone(),
                gateways: gateways.clone(),
            });
        let board = Arc::new(StatusBoard::with_message_sink(clock.clone(), sink));
        let (supervisor, catalog) =
            open_catalog(Arc::new(config.clone()), staging, board.clone(), clock)?;
        let reloader = Reloader::new(current, catalog.clone(), supervisor.clone());
        Ok(Self {
            config,
            board,
            supervisor,
            catalog,
            reloader,
            changes: ChangeQueue::new(),
            tasks: TaskTracker::new(),
            journal,
            gateways,
        })
    }

    /// Builds the pieces and loads the plugins directory through the catalog (bad files are
    /// reported, not fatal).
    pub async fn load(config: Config) -> Result<Self, DaemonError> {
        let daemon = Self::new(config)?;
        daemon.catalog.load_initial().await?;
        Ok(daemon)
    }

    /// Shutdown in order: the reconciler first (no new step; the step in flight completes),
    /// then every account, then every plugin's runtime (bounded per plugin), then the API's
    /// operations still running.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel-safe: a dropped future leaves the shutdown half done.
    pub async fn shutdown(&self) -> Vec<(crate::host::AccountKey, String)> {
        self.changes.close();
        self.catalog.close().await;
        let stuck = self.supervisor.shutdown().await;
        self.catalog.shutdown_plugins().await;
        self.tasks.close();
        let limit = self.config.host.plugin_shutdown_timeout;
        if tokio::time::timeout(limit, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("API operations still running at exit");
        }
        stuck
    }

    /// Watches the plugins directory and feeds the catalog every path the watcher reports, one
    /// step at a time ([`Daemon::shutdown`] ends it). The watcher
    /// reads its baseline before this returns, so call it before the initial load.
    pub fn watch_plugins(&self, stop: CancellationToken) -> bool {
        let config = &self.config;
        let watching = watch::spawn(
            WatchConfig {
                dir: self.catalog.dir().to_owned(),
                settle: config.host.settle,
                rescan_interval: config.host.rescan_interval,
                use_events: config.host.watch,
            },
            self.changes.clone(),
            stop,
        );
        tracing::info!(
            dir = %self.catalog.dir().display(),
            events = watching.events,
            rescan = %humantime::format_duration(config.host.rescan_interval),
            "watching the plugins directory"
        );
        self.catalog.follow(self.changes.clone());
        watching.events
    }
}

/// The supervisor and the catalog for `config`, over `board`, as the daemon wires them: the
/// loader stages plugins in `staging` and builds their runtimes with the config's settings
/// (worker threads, per-channel runtime keys, isolation, the process's log level). Nothing is
/// loaded yet ([`Catalog::load_initial`] does).
pub fn open_catalog(
    config: Arc<Config>,
    staging: StagingDir,
    board: Arc<StatusBoard>,
    clock: Arc<dyn Clock>,
) -> Result<(Supervisor, Arc<Catalog>), crate::discover::DirError> {
    let mut loader = Loader::new(staging, board.clone(), clock.clone());
    loader.worker_threads = config.host.plugin_worker_threads;
    loader.runtime_settings = Some(crate::runtime_settings::RuntimeSettings::of(&config));
    loader.max_log_level = max_log_level();
    loader.isolation = crate::isolate::Settings::of(&config);
    loader.handshake_timeout = config.host.isolation_handshake_timeout;
    let supervisor = Supervisor::new(
        config.supervisor.clone(),
        config.host.plugin_call_timeout,
        board,
        clock.clone(),
        Arc::new(RandomJitter),
    );
    let catalog = Catalog::open(config, Arc::new(loader), supervisor.clone(), clock)?;
    Ok((supervisor, catalog))
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

/// `channeld run`'s exit status when it shut down but not every account stopped.
pub const EXIT_NOT_ALL_STOPPED: u8 = 4;

/// Runs the daemon until a signal, then shuts down in order. An account still stuck at the end is
/// logged with what it is blocked in, and the result is
/// [`DaemonError::NotEveryAccountStopped`] (exit status [`EXIT_NOT_ALL_STOPPED`]).
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Api(e.to_string()))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Api(e.to_string()))?;
    let mut hangup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Api(e.to_string()))?;
    prepare_state_dir(&config.host.state_dir)?;
    // Before anything else in the state directory: a second daemon must not touch the first's
    // token or address files.
    let _state_lock = crate::state_lock::StateLock::acquire(&config.host.state_dir)?;
    // Then the journal: a corrupt or newer one stops this daemon before it touches the token
    // and address files.
    let journal = Journal::open(&config.host.state_dir, config.journal.clone())?;
    let listener = api::bind(config.host.api_address)
        .await
        .map_err(DaemonError::Api)?;
    // Only once the bind succeeded: a daemon that cannot serve leaves the files as they were.
    let token = api_token(&config)?;
    let api_address = listener.local_addr().ok();
    if let Some(address) = api_address {
        let path = config.host.state_dir.join(ADDRESS_FILE);
        fs::write(&path, address.to_string()).map_err(|e| DaemonError::StateDir {
            path: config.host.state_dir.clone(),
            reason: format!("writing {}: {e}", path.display()),
        })?;
    }
    let daemon = Arc::new(Daemon::with_journal(config, journal)?);
    let background = CancellationToken::new();
    // The watcher's baseline comes before the initial load: a file added meanwhile is seen.
    daemon.watch_plugins(background.clone());
    if daemon.config.host.watch_config {
        daemon.reloader.watch(background.clone());
    }
    let events = EventHub::with_states(
        daemon.journal.clone(),
        daemon.supervisor.board().states().clone(),
        crate::events::current_states(daemon.supervisor.clone()),
    );
    // Starved plugin runtimes (their SDKs report them) become account states.
    tokio::spawn(crate::health::starvation::follow(
        daemon.supervisor.clone(),
        background.clone(),
    ));
    // The outbox shares the journal's database; its sender runs until the accounts stop.
    let outbox = crate::outbox::Outbox::open(
        &daemon.journal,
        daemon.config.outbox.clone(),
        daemon.supervisor.clone(),
    )
    .map_err(|e| DaemonError::Api(e.to_string()))?;
    daemon
        .gateways
        .attach(outbox.clone(), daemon.journal.clone());
    daemon.reloader.on_account_removed(outbox.clone());
    {
        // A reload's gateways (read from the config in force) route the messages that arrive
        // after it; the bridging mark is written (gateway.rs).
        let (gateways, supervisor) = (daemon.gateways.clone(), daemon.supervisor.clone());
        daemon
            .reloader
            .on_applied(Arc::new(move |_| gateways.reloaded(&supervisor)));
    }
    let sends = TaskTracker::new();
    tokio::spawn(outbox.clone().run(background.clone(), sends.clone()));
    // Bridged copies the outbox refused for a transient reason, retried (gateway.rs).
    tokio::spawn(daemon.gateways.clone().retry_held(background.clone()));
    let observe = crate::service::Observe::new(daemon.config.metrics.clone());
    let stop_api = CancellationToken::new();
    let api_task = tokio::spawn(api::serve(
        listener,
        ApiState {
            supervisor: daemon.supervisor.clone(),
            token,
            hot: Some(daemon.catalog.clone()),
            tasks: daemon.tasks.clone(),
            read_token: daemon.config.api.read_token.clone(),
            events: Some(events.clone()),
            outbox: Some(outbox.clone()),
            observe: Some(observe.clone()),
            reload: Some(daemon.reloader.clone()),
        },
        stop_api.clone(),
    ));
    if let Some(address) = api_address {
        tracing::info!(%address, "API listening");
    }
    // A cluster node starts only the accounts it holds (docs/cluster.md).
    let cluster_stop = CancellationToken::new();
    #[cfg(feature = "cluster")]
    let cluster = crate::cluster::node::start(
        &daemon.config,
        daemon.supervisor.clone(),
        api_address,
        cluster_stop.clone(),
    );

    // The API serves while the plugins load: a plugin that blocks its constructor is reported
    // as timed out after the load timeout, and the rest start.
    // The health monitor's task (it waits for its checks when it stops): shutdown waits for it.
    let health = TaskTracker::new();
    let starter = {
        let daemon = daemon.clone();
        let health = health.clone();
        let background = background.clone();
        let observe = observe.clone();
        tokio::spawn(async move {
            if let Err(e) = daemon.catalog.load_initial().await {
                tracing::error!("plugins directory: {e}");
            }
            daemon.gateways.warn_unloaded(&daemon.supervisor);
            // Before any account starts: bridge what a crash left unbridged (gateway.rs).
            crate::outbox::gateway::recover_at_start(daemon.gateways.clone()).await;
            observe.readiness.plugins_loaded();
            let summary = if daemon.config.cluster.is_none() {
                daemon.supervisor.start_all().await
            } else {
                Default::default()
            };
            for (channel, s) in &summary {
                if let Some(error) = &s.error {
                    tracing::error!(channel = %channel, "start-all: {error}");
                }
                tracing::info!(
                    channel = %channel,
                    attempted = s.attempted,
                    started = s.started,
                    failed = s.failed,
                    timed_out = s.timed_out,
                    "channel started"
                );
            }
            // The health monitor looks at accounts once they had their first start (its startup
            // grace counts from here), never at ones still waiting for their plugin to load.
            let monitor = HealthMonitor::new(
                daemon.config.health.clone(),
                Arc::new(daemon.supervisor.clone()),
                tokio::time::Instant::now(),
            );
            {
                // A reload's [health] numbers apply from the monitor's next decision.
                let monitor = monitor.clone();
                daemon.reloader.on_applied(Arc::new(move |config| {
                    monitor.set_policy(config.health.clone())
                }));
            }
            health.spawn(monitor.run(background));
            observe.readiness.started();
            crate::notify::stall_supervisor(&daemon.supervisor).await;
            crate::notify::ready();
        })
    };

    crate::notify::spawn_watchdog(daemon.supervisor.clone());
    loop {
        tokio::select! {
            _ = terminate.recv() => break tracing::info!("SIGTERM: stopping every account"),
            _ = interrupt.recv() => break tracing::info!("SIGINT: stopping every account"),
            // Never fatal: a hangup reloads the config (in a task: signals keep being read).
            _ = hangup.recv() => crate::reload::on_hangup(&daemon.reloader),
        }
    }
    crate::notify::stopping();
    // A second signal means "now".
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
        eprintln!("channeld: second signal, exiting at once");
        crate::exit::exit_now(130);
    });
    starter.abort();
    // The cluster node stops its accounts and revokes its lease, so the others take over now.
    cluster_stop.cancel();
    #[cfg(feature = "cluster")]
    if let Some(cluster) = cluster {
        let limit = daemon.config.supervisor.stop_timeout * 2;
        let _ = tokio::time::timeout(limit, cluster).await;
    }
    background.cancel();
    stop_api.cancel();
    // Event streams never end by themselves: end them so the API can finish.
    events.close();
    // The whole shutdown is bounded (docs/shutdown.md): it runs as a task, and past the bound
    // the daemon stops waiting for it and reports what has not stopped.
    let bound = crate::exit::shutdown_bound(&daemon.supervisor);
    let deadline = tokio::time::Instant::now() + bound;
    let mut shutdown = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let stuck = daemon.shutdown().await;
            health.close();
            health.wait().await;
            stuck
        })
    };
    let (stuck, complete) = match tokio::time::timeout_at(deadline, &mut shutdown).await {
        Ok(Ok(stuck)) => (stuck, true),
        Ok(Err(e)) => {
            tracing::error!("the shutdown failed: {e}");
            (
                crate::exit::not_stopped(&daemon.supervisor, Vec::new()),
                false,
            )
        }
        Err(_) => {
            tracing::error!(
                "the shutdown did not finish within {} (stop timeout + cancel grace + {}): \
                 not waiting any longer",
                humantime::format_duration(bound),
                humantime::format_duration(crate::exit::SHUTDOWN_MARGIN)
            );
            (
                crate::exit::not_stopped(&daemon.supervisor, Vec::new()),
                false,
            )
        }
    };
    let starved = daemon.supervisor.board().runtimes().starved();
    for (key, reason) in &stuck {
        let reason = crate::exit::blocked_in(key, reason, &starved);
        tracing::error!(account = %key, "did not stop at shutdown: {reason}");
    }
    // Sends in flight ended with their accounts; their outcomes are recorded.
    sends.close();
    let _ = tokio::time::timeout_at(deadline, sends.wait()).await;
    let _ = tokio::time::timeout_at(deadline, api_task).await;
    // Every account is stopped (or reported): commit what is queued and close the journal.
    let journal = daemon.journal.clone();
    let gateways = daemon.gateways.clone();
    let _ = tokio::task::spawn_blocking(move || {
        // The gateways' bridging mark, as far as the routings that ended allow.
        if let Err(e) = gateways.flush_mark() {
            tracing::warn!("gateways: writing the bridging mark: {e}");
        }
        journal.close()
    })
    .await;
    // The address is no longer ours: a client must not reach whoever binds the port next.
    let _ = fs::remove_file(daemon.config.host.state_dir.join(ADDRESS_FILE));
    // Only a complete shutdown waits for its joined threads to be gone; after an incomplete one
    // some are known to be blocked.
    let plugin_threads = if complete {
        plugin_runtime_threads_settled(PLUGIN_THREADS_SETTLE).await
    } else {
        plugin_runtime_threads()
    };
    if complete && plugin_threads == 0 {
        tracing::info!(
            plugin_threads,
            "stopped: every account stopped and every plugin runtime shut down"
        );
    } else {
        // Plugin threads are still blocked (or the shutdown is still waiting on them): no exit
        // handler or library destructor may run under them.
        let code = if stuck.is_empty() {
            0
        } else {
            EXIT_NOT_ALL_STOPPED
        };
        tracing::error!(
            plugin_threads,
            "plugin threads are still blocked: exiting with status {code} without running exit \
             handlers"
        );
        if !stuck.is_empty() {
            let error = DaemonError::NotEveryAccountStopped(
                stuck.iter().map(|(key, _)| key.to_string()).collect(),
            );
            eprintln!("channeld: {error}");
        }
        crate::exit::exit_now(code);
    }
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(DaemonError::NotEveryAccountStopped(
            stuck.into_iter().map(|(key, _)| key.to_string()).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{threads_named, threads_settled};

    /// A thread that was let go is counted until it has exited; the settled count waits for that
    /// (bounded), where one read right after letting it go would still see it.
    #[tokio::test]
    async fn the_settled_count_waits_for_a_thread_that_is_exiting() {
        // A name no other test gives a thread (names are cut at 15 bytes).
        const NAME: &str = "settle-probe";
        let (go, wait) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(NAME.into())
            .spawn(move || {
                let _ = wait.recv();
                // Still alive a while after it was let go, as a thread whose exit the kernel is
                // still finishing is.
                std::thread::sleep(Duration::from_millis(50));
            })
            .expect("a thread");
        let named = std::time::Instant::now() + Duration::from_secs(30);
        while threads_named(NAME) != 1 {
            assert!(std::time::Instant::now() < named, "the thread never ran");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(go);
        assert_eq!(threads_settled(NAME, Duration::from_secs(30)).await, 0);
    }
}
