//! The state directory belongs to one daemon at a time. `channeld run` takes an exclusive lock on
//! `<state_dir>/lock` before it touches anything else there, and writes its pid into that file; a
//! second daemon with the same state directory refuses in one line naming the first one's pid,
//! and leaves the first one's token and address files alone.
//!
//! The lock is an advisory `flock` on an open file: the kernel drops it when the process exits,
//! however it exits, so a crashed daemon never leaves a stale lock behind.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "lock";

/// The state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another daemon holds it.
    #[error(
        "state directory {} is in use by another channeld (pid {pid}); stop it first or give this \
         one another [host] state_dir",
        dir.display()
    )]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// The holder's pid as it wrote it (`unknown` while it is still writing it).
        pid: String,
    },
    /// The lock file could not be opened, locked or written.
    #[error("state directory {}: lock file {LOCK_FILE}: {error}", dir.display())]
    Io {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock on `dir` (which must exist) for this process, without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |error| LockError::Io {
            dir: dir.to_owned(),
            error,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    pid: if pid.is_empty() { "unknown" } else { pid }.to_owned(),
                });
            }
            Err(TryLockError::Error(error)) => return Err(io(error)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_pid_and_the_lock_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open in this process
        // conflicts just as another process would.
        let err = StateLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        StateLock::acquire(dir.path()).expect("released on drop");
    }
}
