//! Loading a plugin library through abi_stable, with its version and layout checks, and naming
//! each way a file can fail in one line. This module is the only place that opens libraries;
//! files are loaded by path with `lib_header_from_path(..).init_root_module()` rather than
//! `RootModule::load_from_file`, which caches one module per interface type and would hand back
//! the first plugin for every later file (abi_stable issue #92). Libraries are never unloaded.
//!
//! # Versions
//! abi_stable refuses another major, and accepts a newer minor; it also refuses a plugin whose
//! root module has fewer fields than the host's. So the loader:
//! * refuses a plugin of a newer minor than the host's itself, naming both versions (the host
//!   could not see the entries it adds);
//! * checks the plugin against the current (1.1) layout, and a 1.0 plugin against the frozen 1.0
//!   layouts the ABI crate keeps ([`v1_0`]), so every 1.0 plugin still loads.

use std::path::{Path, PathBuf};

use abi_stable::{
    library::{LibraryError, RootModule, lib_header_from_path},
    sabi_types::VersionNumber,
};
use channeld_plugin_abi::abi::{PluginMod_Ref, v1_0};

/// A checked root module, seen through the layout it was checked against.
#[derive(Clone, Copy)]
pub enum PluginModule {
    /// A plugin built against plugin-abi 1.1 (every entry).
    V1_1(PluginMod_Ref),
    /// A plugin built against plugin-abi 1.0, through the frozen 1.0 layout.
    V1_0(v1_0::PluginMod_Ref),
}

/// Why a file did not load. Every variant names the file; [`LoadError::detail`] has the full
/// diagnostic (e.g. abi_stable's layout dump) for debug logs.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `dlopen` refused the file.
    #[error("{}: not a loadable shared library: {reason}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// A shared library, but without channeld's root module.
    #[error("{}: not a channeld plugin: the library exports no channeld root module", path.display())]
    NotAPlugin {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        detail: String,
    },
    /// Built with an incompatible abi_stable.
    #[error("{}: incompatible abi_stable runtime: {reason}", path.display())]
    AbiHeader {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Built against a plugin-abi major this host does not load.
    #[error("{}: built for plugin-abi {plugin}, this host loads plugin-abi {host}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The plugin's plugin-abi version.
        plugin: String,
        /// The host's plugin-abi version requirement.
        host: String,
    },
    /// The root module's layout differs from the host's.
    #[error("{}: ABI layout mismatch: {summary} (the full layout report is logged at debug level)", path.display())]
    Layout {
        /// The file.
        path: PathBuf,
        /// The mismatch in one line.
        summary: String,
        /// abi_stable's full report.
        detail: String,
    },
    /// The plugin's constructor panicked or failed.
    #[error("{}: the plugin's constructor failed: {reason}", path.display())]
    Constructor {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The plugin's metadata is unusable.
    #[error("{}: bad plugin metadata: {reason}", path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl LoadError {
    /// A short class name for the error (for logs and the plugins listing).
    pub fn class(&self) -> &'static str {
        match self {
            Self::Open { .. } => "not-a-library",
            Self::NotAPlugin { .. } => "not-a-plugin",
            Self::AbiHeader { .. } => "abi-header",
            Self::Version { .. } => "version-mismatch",
            Self::Layout { .. } => "layout-mismatch",
            Self::Constructor { .. } => "constructor-failed",
            Self::Metadata { .. } => "bad-metadata",
        }
    }

    /// The full diagnostic, where there is more than the one line.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::NotAPlugin { detail, .. } | Self::Layout { detail, .. } => Some(detail),
            _ => None,
        }
    }
}

/// The plugin-abi version this host was built with.
pub fn host_abi_version() -> &'static str {
    PluginMod_Ref::VERSION_STRINGS.version.as_str()
}

/// Opens `path` and returns its checked root module. The file is mapped for the rest of the
/// process's life.
pub fn load_root_module(path: &Path) -> Result<PluginModule, LoadError> {
    load_root_module_named(path, path)
}

/// Opens `path` (a staged copy) and returns its checked root module; errors name `shown` (the
/// file the user put in the plugins directory).
pub fn load_root_module_named(path: &Path, shown: &Path) -> Result<PluginModule, LoadError> {
    let header = lib_header_from_path(path).map_err(|e| classify(shown, e))?;
    let plugin = VersionNumber::new(header.version_strings()).map_err(|e| LoadError::Metadata {
        path: shown.to_owned(),
        reason: format!("unparsable plugin-abi version: {e}"),
    })?;
    let host = host_version();
    if plugin.major == host.major && plugin.minor > host.minor {
        return Err(LoadError::Version {
            path: shown.to_owned(),
            plugin: plugin.to_string(),
            host: format!("{}.x up to {host}", host.major),
        });
    }
    match header.init_root_module::<PluginMod_Ref>() {
        Ok(module) => Ok(PluginModule::V1_1(module)),
        Err(latest) if plugin.major == 1 && plugin.minor == 0 => {
            tracing::debug!(
                file = %shown.display(),
                "a plugin-abi 1.0 plugin; checking it against the frozen 1.0 layout ({})",
                layout_summary(&latest.to_string())
            );
            header
                .init_root_module::<v1_0::PluginMod_Ref>()
                .map(PluginModule::V1_0)
                .map_err(|e| classify(shown, e))
        }
        Err(latest) => Err(classify(shown, latest)),
    }
}

fn host_version() -> VersionNumber {
    // The host's own version strings are the crate's package version: always parsable.
    VersionNumber::new(PluginMod_Ref::VERSION_STRINGS).unwrap_or(VersionNumber {
        major: 1,
        minor: 1,
        patch: 0,
    })
}

impl LoadError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Open { path, .. }
            | Self::NotAPlugin { path, .. }
            | Self::AbiHeader { path, .. }
            | Self::Version { path, .. }
            | Self::Layout { path, .. }
            | Self::Constructor { path, .. }
            | Self::Metadata { path, .. } => path,
        }
    }
}

fn classify(path: &Path, error: LibraryError) -> LoadError {
    let path = path.to_owned();
    match error {
        LibraryError::OpenError { err, .. } => LoadError::Open {
            path,
            reason: one_line(&err.to_string()),
        },
        LibraryError::GetSymbolError { err, .. } => LoadError::NotAPlugin {
            path,
            detail: err.to_string(),
        },
        LibraryError::InvalidAbiHeader(header) => LoadError::AbiHeader {
            path,
            reason: format!("{header:?}"),
        },
        LibraryError::InvalidCAbi { expected, found } => LoadError::AbiHeader {
            path,
            reason: format!("C ABI check failed: expected {expected}, found {found}"),
        },
        LibraryError::ParseVersionError(e) => LoadError::Metadata {
            path,
            reason: format!("unparsable version: {e}"),
        },
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadError::Version {
            path,
            plugin: actual_version.to_string(),
            host: format!("{}.x (>= {})", expected_version.major, expected_version),
        },
        LibraryError::AbiInstability(report) => {
            let detail = report.to_string();
            LoadError::Layout {
                path,
                summary: layout_summary(&detail),
                detail,
            }
        }
        LibraryError::RootModule { err, .. } => LoadError::Constructor {
            path,
            reason: one_line(&err.to_string()),
        },
        other => LoadError::Metadata {
            path,
            reason: one_line(&other.to_string()),
        },
    }
}

/// Errors are shown one per line: fold whatever the loader said onto one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first mismatch abi_stable's layout report names, on one line: its `Error:` line and the
/// first line of its `Expected:` and `Found:` blocks (e.g. "unexpected field: expected
/// field_name:channel_id, found field_name:display_name").
fn layout_summary(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let Some(at) = lines.iter().position(|l| l.starts_with("Error:")) else {
        return lines.iter().find(|l| !l.is_empty()).map_or_else(
            || "layout differs".to_owned(),
            |l| l.chars().take(200).collect(),
        );
    };
    let error = lines[at].trim_start_matches("Error:").trim();
    let after = |label: &str| {
        lines[at..]
            .iter()
            .position(|l| *l == label)
            .and_then(|i| lines.get(at + i + 1))
            .copied()
    };
    let mut summary = error.to_owned();
    if let (Some(expected), Some(found)) = (after("Expected:"), after("Found:")) {
        summary = format!("{summary}: expected {expected}, found {found}");
    }
    summary.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::layout_summary;

    #[test]
    fn the_layout_summary_names_the_first_mismatch() {
        let report = "Compared <this>:\n  --- Type Layout ---\n  many lines\n\
                      Error:unexpected field\nExpected:\n    field_name:channel_id\n    type:RString\n\
                      Found:\n    field_name:display_name\n    type:RString\n\
                      Error:unexpected field\nExpected:\n    field_name:display_name\n";
        assert_eq!(
            layout_summary(report),
            "unexpected field: expected field_name:channel_id, found field_name:display_name"
        );
        assert_eq!(layout_summary("odd\nreport"), "odd");
    }
}

/// The end of the process without exit handlers ([`crate::exit::exit_now`]), here with the
/// loader as the only other place that needs `unsafe`.
pub mod exit_sys {
    /// `_exit(2)`: ends the process with `code` at once. No `atexit` handler, no destructor of
    /// any library and no Rust destructor runs, and stdio buffers are not flushed (the caller
    /// flushes what it wrote first).
    pub fn exit_immediately(code: i32) -> ! {
        // SAFETY: _exit has no preconditions; it never returns and touches no memory of the
        // process.
        unsafe { libc::_exit(code) }
    }
}

/// The system calls of process isolation ([`crate::isolate`]): preparing an isolated plugin's
/// child before `exec`, taking over its socket in the child, and killing it. They live here, with
/// the loader, as the only other place that needs `unsafe`.
pub mod isolation_sys {
    use std::{
        os::{
            fd::{FromRawFd as _, RawFd},
            unix::{net::UnixStream, process::CommandExt as _},
        },
        process::Command,
    };

    /// The descriptor the child finds its socket on.
    pub const CHILD_SOCKET_FD: RawFd = 3;

    /// Makes `command`'s child, between `fork` and `exec`: move `socket` to
    /// [`CHILD_SOCKET_FD`] (inheritable), mark every other descriptor above 2 close-on-exec (so the
    /// child inherits only stdin/stdout/stderr and the socket), die with SIGKILL when the thread
    /// that spawned it ends (`PR_SET_PDEATHSIG`: spawn from a thread that lives as long as the
    /// daemon), and, with `memory_limit`, cap its address space (`RLIMIT_AS`).
    pub fn prepare_child(command: &mut Command, socket: RawFd, memory_limit: Option<u64>) {
        let pre_exec = move || {
            // SAFETY: plain system calls on descriptors and limits of this (forked,
            // single-threaded) process, with valid arguments; none allocates.
            unsafe {
                if libc::dup2(socket, CHILD_SOCKET_FD) < 0
                    || libc::fcntl(CHILD_SOCKET_FD, libc::F_SETFD, 0) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close_range(
                    CHILD_SOCKET_FD as libc::c_uint + 1,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
                );
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(limit) = memory_limit {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        };
        // SAFETY: the closure only makes async-signal-safe system calls (dup2, fcntl, close_range,
        // prctl, setrlimit) and allocates nothing, as the forked child of a multi-threaded process
        // requires.
        unsafe {
            command.pre_exec(pre_exec);
        }
    }

    /// In the child: the socket the host left on [`CHILD_SOCKET_FD`], now close-on-exec so that
    /// processes the plugin starts do not inherit it. `None` if there is none.
    pub fn take_child_socket() -> Option<UnixStream> {
        // SAFETY: fcntl on a descriptor number only reads or sets its flags.
        let is_socket = unsafe {
            libc::fcntl(CHILD_SOCKET_FD, libc::F_GETFD) >= 0
                && libc::fcntl(CHILD_SOCKET_FD, libc::F_SETFD, libc::FD_CLOEXEC) >= 0
        };
        // SAFETY: the descriptor is open (checked above), was handed to this process for this
        // use only, and nothing else in the process owns it.
        is_socket.then(|| unsafe { UnixStream::from_raw_fd(CHILD_SOCKET_FD) })
    }

    /// The parent's pid.
    pub fn parent_pid() -> u32 {
        // SAFETY: getppid has no preconditions.
        unsafe { libc::getppid() as u32 }
    }

    /// Sends SIGKILL to `pid` (a child this process has not reaped yet).
    pub fn kill(pid: u32) {
        // SAFETY: kill has no memory-safety preconditions; the caller names its own unreaped
        // child, so the pid cannot have been reused.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}
