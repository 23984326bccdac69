//! Staging: the host never `dlopen`s a file inside the plugins directory (a half-written file
//! there kills the process with SIGBUS, and glibc hands back the old library when a path is
//! reopened after its file changed). It reads the file once, hashes what
//! it read, writes that into a private staging directory under the content hash, checks on the
//! private copy that the ELF headers and every `PT_LOAD` segment lie inside the file, and only
//! then hands the copy to the loader.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use goblin::elf::{Elf, program_header::PT_LOAD};

use crate::discover::{self, FileCheckError};

/// A file that could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Refused before reading.
    #[error(transparent)]
    Check(#[from] FileCheckError),
    /// Zero bytes.
    #[error("{}: empty file (0 bytes): not a plugin, or still being written", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Not ELF at all.
    #[error("{}: not a shared library: {reason}", path.display())]
    NotElf {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// ELF, but cut short (still being written, or a broken copy).
    #[error(
        "{}: incomplete shared library: {reason} (file has {len} bytes); still being written, or truncated",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What lies past the end.
        reason: String,
        /// The file's length.
        len: u64,
    },
    /// I/O on the file or the staging directory failed.
    #[error("{}: staging failed: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A staged, checked private copy of a plugin file.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The file in the plugins directory.
    pub source: PathBuf,
    /// The private copy to load.
    pub copy: PathBuf,
    /// blake3 of the content, hex.
    pub hash: String,
    /// Bytes.
    pub len: u64,
}

/// The private staging directory.
#[derive(Debug, Clone)]
pub struct StagingDir {
    dir: PathBuf,
    /// How many times each content hash's library was retired (shut down). Libraries are never
    /// unloaded and `dlopen` of a file it has mapped returns the mapped instance, so content that
    /// comes back after its library was shut down (a removed file put back, a rollback) is staged
    /// under a fresh name: a new file, a new inode, a fresh instance.
    retired: Arc<Mutex<HashMap<String, u32>>>,
}

impl StagingDir {
    /// Creates (mode 0700) or reuses `dir`, and removes copies a previous run left there.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        for entry in fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if path.is_file() {
                fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            retired: Arc::default(),
        })
    }

    /// Records that the library staged from `hash` was shut down: the next staging of the same
    /// content gets a fresh copy.
    pub fn retire(&self, hash: &str) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        *retired.entry(hash.to_owned()).or_default() += 1;
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads, hashes, copies and checks `source`.
    pub fn stage(&self, source: &Path) -> Result<Staged, StageError> {
        discover::check_file(source)?;
        let io = |e: std::io::Error| StageError::Io {
            path: source.to_owned(),
            reason: e.to_string(),
        };
        let bytes = fs::read(source).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                StageError::Check(FileCheckError::Unreadable {
                    path: source.to_owned(),
                    reason: e.to_string(),
                })
            } else {
                io(e)
            }
        })?;
        if bytes.is_empty() {
            return Err(StageError::Empty {
                path: source.to_owned(),
            });
        }
        // Check the bytes that will be written before writing them: a copy that cannot load
        // never lands in the staging directory.
        check_elf(source, &bytes)?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let incarnation = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .copied()
            .unwrap_or(0);
        let name = if incarnation == 0 {
            hash.clone()
        } else {
            format!("{hash}-{incarnation}")
        };
        let copy = self.dir.join(format!("{name}{}", discover::PLUGIN_SUFFIX));
        if !copy.exists() {
            // Written under a temporary name and persisted (renamed) over the staged name, so
            // that name only ever holds a complete file; a failed write leaves no temporary
            // file behind.
            let mut file = tempfile::Builder::new()
                .prefix(&format!(".{hash}."))
                .suffix(".tmp")
                .permissions(fs::Permissions::from_mode(0o500))
                .tempfile_in(&self.dir)
                .map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            // No fsync: the copy only has to be complete for this process's dlopen, which the
            // page cache guarantees, and every start wipes the staging directory anyway. (The
            // fsync was half of a plugin's load time: `scripts/bench load`.)
            file.persist(&copy).map_err(|e| io(e.error))?;
        }
        // The check that matters is on what will be mapped: re-read the private copy's length.
        let staged_len = fs::metadata(&copy).map_err(io)?.len();
        if staged_len != bytes.len() as u64 {
            return Err(StageError::Io {
                path: source.to_owned(),
                reason: format!(
                    "staged copy {} has {staged_len} bytes, expected {}",
                    copy.display(),
                    bytes.len()
                ),
            });
        }
        Ok(Staged {
            source: source.to_owned(),
            copy,
            hash,
            len: bytes.len() as u64,
        })
    }
}

/// Stages several files at once, on up to `workers` threads (reading, hashing and copying are
/// independent per file; loading stays sequential). Results come back in the order of `paths`.
pub fn stage_all(
    staging: &StagingDir,
    paths: &[PathBuf],
    workers: usize,
) -> Vec<Result<Staged, StageError>> {
    let workers = workers.clamp(1, paths.len().max(1));
    if workers == 1 {
        return paths.iter().map(|p| staging.stage(p)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<Staged, StageError>>> = paths.iter().map(|_| None).collect();
    let slots = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(path) = paths.get(i) else { break };
                    let staged = staging.stage(path);
                    slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(staged);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every path was staged"))
        .collect()
}

/// Checks that `bytes` is a complete ELF shared object: the program and section header tables and
/// every `PT_LOAD` segment's file extent lie inside it.
fn check_elf(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let len = bytes.len() as u64;
    let truncated = |reason: String| StageError::Truncated {
        path: path.to_owned(),
        reason,
        len,
    };
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(StageError::NotElf {
            path: path.to_owned(),
            reason: "no ELF magic number at the start of the file".into(),
        });
    }
    let header = Elf::parse_header(bytes).map_err(|e| truncated(format!("ELF header: {e}")))?;
    if header.e_type != goblin::elf::header::ET_DYN {
        return Err(StageError::NotElf {
            path: path.to_owned(),
            reason: format!("ELF type {} is not a shared object", header.e_type),
        });
    }
    // Checked: offsets come from the file, and a wrapped sum would pass the bound.
    let table_end = |off: u64, num: u16, size: u16| {
        u64::from(num)
            .checked_mul(u64::from(size))
            .and_then(|bytes| off.checked_add(bytes))
    };
    match table_end(header.e_phoff, header.e_phnum, header.e_phentsize) {
        Some(end) if end <= len => {}
        Some(end) => return Err(truncated(format!("program headers end at byte {end}"))),
        None => return Err(truncated("program headers end past 2^64 bytes".into())),
    }
    match table_end(header.e_shoff, header.e_shnum, header.e_shentsize) {
        Some(end) if end <= len => {}
        Some(end) => return Err(truncated(format!("section headers end at byte {end}"))),
        None => return Err(truncated("section headers end past 2^64 bytes".into())),
    }
    let elf = Elf::parse(bytes).map_err(|e| truncated(format!("ELF tables: {e}")))?;
    for segment in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let end = segment.p_offset.saturating_add(segment.p_filesz);
        if end > len {
            return Err(truncated(format!("a PT_LOAD segment ends at byte {end}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_library() -> Vec<u8> {
        // Any shared object will do for the header checks: the C library is always there.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
            "/usr/lib/libc.so.6",
        ]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("a libc.so.6 to test ELF checks on");
        fs::read(libc).unwrap()
    }

    #[test]
    fn a_complete_library_passes_and_every_cut_fails() {
        let bytes = own_library();
        let path = Path::new("x.so");
        check_elf(path, &bytes).unwrap();
        for percent in [1, 10, 50, 70, 99] {
            let cut = &bytes[..bytes.len() * percent / 100];
            let err = check_elf(path, cut).unwrap_err();
            assert!(
                matches!(err, StageError::Truncated { .. }),
                "{percent}%: {err}"
            );
        }
    }

    #[test]
    fn text_is_not_elf() {
        let err = check_elf(Path::new("x.so"), b"hello, I am text").unwrap_err();
        assert!(matches!(err, StageError::NotElf { .. }), "{err}");
    }

    #[test]
    fn header_tables_past_the_end_of_the_address_space_are_refused_not_overflowed() {
        let mut bytes = own_library();
        // e_phoff (ELF64: 8 bytes at 0x20) near u64::MAX: offset + count * size wraps.
        bytes[0x20..0x28].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        let err = check_elf(Path::new("wrap.so"), &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("program headers end past 2^64 bytes"), "{err}");
        let mut bytes = own_library();
        bytes[0x28..0x30].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        let err = check_elf(Path::new("wrap.so"), &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("section headers end past 2^64 bytes"), "{err}");
    }
}
