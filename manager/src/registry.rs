//! Loading plugin files: the [`Loader`] (stage → load → `init`, one error per bad file) and its
//! errors. What is loaded is kept by the catalog ([`crate::catalog::Catalog`]), which runs every
//! load through its bounded reconcile step, for the daemon and for `channeld check` alike.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use channeld_plugin_abi::abi::LogLevel;

use crate::{
    clock::Clock,
    ffi::FfiPlugin,
    host::HostSink,
    load::{LoadError, load_root_module_named},
    plugin::{Plugin, PluginCallError, PluginInfo},
    stage::{self, StageError, Staged, StagingDir},
};

/// Why one plugin file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginFileError {
    /// Refused or broken before loading.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The loader refused it.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Another file already provides this channel.
    #[error("{}: duplicate channel id {channel:?}: already loaded from {}", path.display(), existing.display())]
    Duplicate {
        /// The refused file.
        path: PathBuf,
        /// The channel id.
        channel: String,
        /// The file that provides it.
        existing: PathBuf,
    },
    /// The plugin's child process (process isolation) did not start or did not load it.
    #[error(transparent)]
    Isolated(#[from] crate::isolate::SpawnError),
    /// `init` failed.
    #[error("{}: {error}", path.display())]
    Init {
        /// The file.
        path: PathBuf,
        /// The plugin's error.
        error: PluginCallError,
    },
}

impl PluginFileError {
    /// A short class name for logs and listings.
    pub fn class(&self) -> &'static str {
        use crate::discover::FileCheckError as F;
        match self {
            Self::Stage(StageError::Check(F::DanglingSymlink { .. })) => "dangling-symlink",
            Self::Stage(StageError::Check(F::WritableByOthers { .. })) => "writable-by-others",
            Self::Stage(StageError::Check(F::ForeignOwner { .. })) => "foreign-owner",
            Self::Stage(StageError::Check(F::Unreadable { .. })) => "unreadable",
            Self::Stage(StageError::Empty { .. }) => "empty",
            Self::Stage(StageError::NotElf { .. }) => "not-a-library",
            Self::Stage(StageError::Truncated { .. }) => "truncated",
            Self::Stage(StageError::Io { .. }) => "io",
            Self::Load(e) => e.class(),
            Self::Duplicate { .. } => "duplicate-channel",
            Self::Init { .. } => "init-failed",
            Self::Isolated(e) => match e.class.as_str() {
                "crashed-while-loading" => "crashed-while-loading",
                "handshake-timed-out" => "handshake-timed-out",
                "bad-isolation" => "bad-isolation",
                "duplicate-channel" => "duplicate-channel",
                "init-failed" => "init-failed",
                _ => "isolated-load-failed",
            },
        }
    }

    /// The plugin file the error is about.
    pub fn path(&self) -> &Path {
        use crate::discover::FileCheckError as F;
        match self {
            Self::Stage(StageError::Check(
                F::DanglingSymlink { path }
                | F::WritableByOthers { path, .. }
                | F::ForeignOwner { path, .. }
                | F::Unreadable { path, .. },
            ))
            | Self::Stage(
                StageError::Empty { path }
                | StageError::NotElf { path, .. }
                | StageError::Truncated { path, .. }
                | StageError::Io { path, .. },
            )
            | Self::Duplicate { path, .. }
            | Self::Init { path, .. } => path,
            Self::Load(e) => e.path(),
            Self::Isolated(e) => &e.source_file,
        }
    }

    /// The full diagnostic, for debug logs.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Load(e) => e.detail(),
            _ => None,
        }
    }
}

/// A loaded plugin and where it came from.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// Its metadata.
    pub info: PluginInfo,
    /// The staged copy it was loaded from (with the source path and content hash).
    pub staged: Staged,
    /// When it was loaded, ms since the epoch.
    pub loaded_at_ms: i64,
    /// The plugin.
    pub plugin: Arc<dyn Plugin>,
}

/// How plugins are loaded: where copies are staged, what `init` is given.
pub struct Loader {
    staging: StagingDir,
    sink: Arc<dyn HostSink>,
    clock: Arc<dyn Clock>,
    /// Worker threads of each plugin's runtime.
    pub worker_threads: u32,
    /// The most verbose plugin log level recorded.
    pub max_log_level: LogLevel,
    /// Which channels run their plugin in a child process.
    pub isolation: crate::isolate::Settings,
    /// How long an isolated plugin's child may take to load its plugin and answer.
    pub handshake_timeout: std::time::Duration,
    /// The runtime isolated plugins' sockets are served on.
    runtime: Option<tokio::runtime::Handle>,
    /// Each channel's plugin runtime settings (`worker_threads`, … in its table); a channel it
    /// does not name gets `worker_threads` above and the default durations.
    pub runtime_settings: Option<crate::runtime_settings::RuntimeSettings>,
}

impl Loader {
    /// A loader staging into `staging`.
    pub fn new(staging: StagingDir, sink: Arc<dyn HostSink>, clock: Arc<dyn Clock>) -> Self {
        Self {
            staging,
            sink,
            clock,
            worker_threads: 0,
            max_log_level: LogLevel::Info,
            isolation: crate::isolate::Settings::default(),
            handshake_timeout: crate::isolate::HANDSHAKE_TIMEOUT,
            runtime: tokio::runtime::Handle::try_current().ok(),
            runtime_settings: None,
        }
    }

    /// Stages and loads one file. `claimed` says which file already provides a channel id, so a
    /// duplicate is refused before the plugin is initialised.
    pub fn load_file(
        &self,
        path: &Path,
        claimed: impl Fn(&str) -> Option<PathBuf>,
    ) -> Result<LoadedPlugin, PluginFileError> {
        let staged = self.staging.stage(path)?;
        self.load_staged(staged, claimed)
    }

    /// Stages one file (see [`StagingDir::stage`]).
    pub fn stage(&self, path: &Path) -> Result<Staged, StageError> {
        self.staging.stage(path)
    }

    /// Records that a loaded version was shut down (see [`StagingDir::retire`]).
    pub fn retire(&self, staged: &Staged) {
        self.staging.retire(&staged.hash);
    }

    /// Stages several files in parallel (see [`stage::stage_all`]).
    pub fn stage_all(&self, paths: &[PathBuf]) -> Vec<Result<Staged, StageError>> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        stage::stage_all(&self.staging, paths, workers)
    }

    /// Loads a staged copy (opening it, checking version and layout, reading metadata), refuses a
    /// duplicate channel id, and calls `init`.
    pub fn load_staged(
        &self,
        staged: Staged,
        claimed: impl Fn(&str) -> Option<PathBuf>,
    ) -> Result<LoadedPlugin, PluginFileError> {
        let path = staged.source.clone();
        let path = path.as_path();
        if self.isolation.any()
            && let Some(runtime) = &self.runtime
            && let Some(isolated) = self.load_isolated(&staged, runtime, &claimed)?
        {
            return Ok(LoadedPlugin {
                info: isolated.info().clone(),
                staged,
                loaded_at_ms: self.clock.wall_ms(),
                plugin: isolated,
            });
        }
        let module = load_root_module_named(&staged.copy, path)?;
        let plugin = FfiPlugin::new(module, path)?;
        let channel = plugin.info().channel_id.clone();
        if let Some(existing) = claimed(&channel) {
            return Err(PluginFileError::Duplicate {
                path: path.to_owned(),
                channel,
                existing,
            });
        }
        let init = match &self.runtime_settings {
            None => plugin.init(self.worker_threads, self.max_log_level, self.sink.clone()),
            Some(settings) => settings
                .channel(&channel)
                .map_err(|message| crate::plugin::PluginCallError {
                    channel: channel.clone(),
                    entry: "init",
                    message,
                })
                .and_then(|runtime| {
                    plugin.init_with(
                        runtime.worker_threads,
                        self.max_log_level,
                        self.sink.clone(),
                        runtime.extra(),
                    )
                }),
        };
        init.map_err(|error| PluginFileError::Init {
            path: path.to_owned(),
            error,
        })?;
        Ok(LoadedPlugin {
            info: plugin.info().clone(),
            staged,
            loaded_at_ms: self.clock.wall_ms(),
            plugin: Arc::new(plugin),
        })
    }
}

impl Loader {
    /// With isolated channels configured, every file is first opened in a child process, so the
    /// daemon learns its channel without running the plugin's code itself. The child is kept if
    /// that channel is isolated (`Some`: with `process-per-account` it answers the channel's
    /// calls, and each account gets a child of its own); otherwise it is killed and the file is
    /// loaded in the daemon (`None`).
    fn load_isolated(
        &self,
        staged: &Staged,
        runtime: &tokio::runtime::Handle,
        claimed: &impl Fn(&str) -> Option<PathBuf>,
    ) -> Result<Option<Arc<dyn Plugin>>, PluginFileError> {
        use crate::isolate::{ChildSpec, IsolatedPlugin, Mode, PerAccountPlugin, SpawnError};
        let spec = |memory_limit, worker_threads| ChildSpec {
            plugin: staged.copy.clone(),
            source: staged.source.clone(),
            worker_threads,
            max_log_level: self.max_log_level,
            memory_limit,
            exe: None,
        };
        let spawn = |spec| {
            IsolatedPlugin::spawn_within(
                spec,
                self.handshake_timeout,
                runtime.clone(),
                self.sink.clone(),
            )
        };
        let probe = spawn(spec(None, self.worker_threads))?;
        let channel = probe.info().channel_id.clone();
        if let Some(existing) = claimed(&channel) {
            probe.kill();
            return Err(PluginFileError::Duplicate {
                path: staged.source.clone(),
                channel,
                existing,
            });
        }
        match self.isolation.channel(&channel) {
            Err(error) => {
                probe.kill();
                Err(SpawnError {
                    source_file: staged.source.clone(),
                    class: "bad-isolation".into(),
                    error,
                }
                .into())
            }
            Ok(settings) if settings.mode != Mode::None => {
                // The channel's own `worker_threads` sizes its children's plugin runtime.
                let workers = match &self.runtime_settings {
                    None => Ok(self.worker_threads),
                    Some(runtime) => runtime.channel(&channel).map(|r| r.worker_threads),
                };
                let workers = match workers {
                    Ok(workers) => workers,
                    Err(message) => {
                        probe.kill();
                        return Err(PluginFileError::Init {
                            path: staged.source.clone(),
                            error: crate::plugin::PluginCallError {
                                channel,
                                entry: "init",
                                message,
                            },
                        });
                    }
                };
                let control = if settings.memory_limit.is_none() && workers == self.worker_threads {
                    probe
                } else {
                    probe.kill();
                    spawn(spec(settings.memory_limit, workers))?
                };
                Ok(Some(match settings.mode {
                    Mode::ProcessPerAccount => Arc::new(PerAccountPlugin::new(
                        control,
                        spec(settings.memory_limit, workers),
                        self.handshake_timeout,
                        runtime.clone(),
                        self.sink.clone(),
                    )),
                    _ => Arc::new(control),
                }))
            }
            Ok(_) => {
                probe.kill();
                Ok(None)
            }
        }
    }
}

/// One warning line per refused file; the long detail only at debug.
pub fn log_refused(error: &PluginFileError) {
    tracing::warn!(class = error.class(), "plugin file refused: {error}");
    if let Some(detail) = error.detail() {
        tracing::debug!(class = error.class(), "full report: {detail}");
    }
}
