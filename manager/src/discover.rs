//! Discovery: which entries of the plugins directory are plugin files, and the permission checks
//! that decide whether the directory and each file may be trusted at all. Nothing here opens a
//! file: FIFOs, sockets and directories are skipped from their metadata alone.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// The suffix of a plugin file on this platform.
pub const PLUGIN_SUFFIX: &str = if cfg!(target_os = "macos") {
    ".dylib"
} else {
    ".so"
};

/// The whole plugins directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// It cannot be listed.
    #[error("plugins directory {}: cannot be read: {error}", path.display())]
    Unreadable {
        /// The directory.
        path: PathBuf,
        /// Why (in the message, not a `source`, so error chains print it once).
        error: std::io::Error,
    },
    /// Others than its owner can write to it, so anyone could plant code the host would run.
    #[error(
        "plugins directory {}: refused: it is writable by others than its owner (mode {mode:o}); run `chmod go-w {}`",
        path.display(),
        path.display()
    )]
    WritableByOthers {
        /// The directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// A plugin file that is refused before it is read.
#[derive(Debug, thiserror::Error)]
pub enum FileCheckError {
    /// A symlink to nothing.
    #[error("{}: dangling symlink: its target does not exist", path.display())]
    DanglingSymlink {
        /// The file.
        path: PathBuf,
    },
    /// Writable by group or others.
    #[error("{}: refused: writable by others than its owner (mode {mode:o}); run `chmod go-w` on it", path.display())]
    WritableByOthers {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Owned by someone other than the host's user or root.
    #[error("{}: refused: owned by uid {owner}, not by channeld's user (uid {host}) or root", path.display())]
    ForeignOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The host's uid.
        host: u32,
    },
    /// No read permission.
    #[error("{}: unreadable: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The effective uid of this process.
pub fn host_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks the directory itself: it must be a directory, readable, and not writable by group or
/// others (only its parent's trust is not checked: `/tmp` is 1777, and that is fine).
pub fn check_dir(dir: &Path) -> Result<(), DirError> {
    let meta = fs::metadata(dir).map_err(|error| DirError::Unreadable {
        path: dir.to_owned(),
        error,
    })?;
    if !meta.is_dir() {
        return Err(DirError::Unreadable {
            path: dir.to_owned(),
            error: std::io::Error::other("not a directory"),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::WritableByOthers {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The plugin files of `dir` (by suffix, regular files or symlinks), sorted by name. Other
/// entries are skipped without being opened.
pub fn plugin_paths(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    check_dir(dir)?;
    let entries = fs::read_dir(dir).map_err(|error| DirError::Unreadable {
        path: dir.to_owned(),
        error,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry.file_name().to_string_lossy().ends_with(PLUGIN_SUFFIX)
                && entry
                    .file_type()
                    .is_ok_and(|t| t.is_file() || t.is_symlink())
        })
        .map(|entry| entry.path())
        .collect();
    paths.sort();
    Ok(paths)
}

/// Whether `path` names a plugin file by its name alone.
pub fn is_plugin_name(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(PLUGIN_SUFFIX))
}

/// Checks one file before it is read: it resolves, is a regular file, is readable, is not
/// writable by others, and belongs to the host's user or root. Returns its size.
pub fn check_file(path: &Path) -> Result<u64, FileCheckError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            return Err(if is_link {
                FileCheckError::DanglingSymlink {
                    path: path.to_owned(),
                }
            } else {
                FileCheckError::Unreadable {
                    path: path.to_owned(),
                    reason: "the file is gone".into(),
                }
            });
        }
        Err(e) => {
            return Err(FileCheckError::Unreadable {
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    if !meta.is_file() {
        return Err(FileCheckError::Unreadable {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(FileCheckError::WritableByOthers {
            path: path.to_owned(),
            mode,
        });
    }
    let host = host_uid();
    if meta.uid() != host && meta.uid() != 0 {
        return Err(FileCheckError::ForeignOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            host,
        });
    }
    // Root reads anything; a file with no read bit at all was still meant not to be read.
    if mode & 0o444 == 0 {
        return Err(FileCheckError::Unreadable {
            path: path.to_owned(),
            reason: format!("no read permission (mode {mode:o}); run `chmod u+r` on it"),
        });
    }
    Ok(meta.len())
}
