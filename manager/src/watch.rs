//! Watching the plugins directory. The watcher's one job is to say "this plugin path may have
//! changed, and what is there now is complete": a file that arrives by rename is complete at once;
//! a file written in place is reported after a quiet period (`settle`) with no further events; a
//! periodic rescan catches what inotify missed (and replaces the watcher entirely when it cannot
//! start, e.g. at the inotify limit). What changed — new, replaced, removed — is decided by the
//! reconciler from the file itself.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{ModifyKind, RenameMode},
};
use tokio::{
    sync::mpsc,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;

use crate::discover::is_plugin_name;

/// How the directory is watched.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The plugins directory.
    pub dir: PathBuf,
    /// Quiet period before a file written in place is reported.
    pub settle: Duration,
    /// Time between rescans (zero: no rescans).
    pub rescan_interval: Duration,
    /// Whether to use inotify at all (false: rescans only).
    pub use_events: bool,
}

/// What a file looked like at the last look: changes in any of these mean new content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn signature(path: &Path) -> Option<Signature> {
    let meta = fs::metadata(path).ok()?;
    Some(Signature {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode: meta.ino(),
    })
}

/// A raw filesystem event, reduced to what the watcher acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Raw {
    /// Arrived complete (renamed into place): report at once.
    Complete(PathBuf),
    /// Being written (or otherwise touched): report once quiet.
    Touched(PathBuf),
    /// Gone (removed or renamed away): report at once.
    Gone(PathBuf),
}

fn classify(event: notify::Event) -> Vec<Raw> {
    let plugin_paths = |paths: Vec<PathBuf>| {
        paths
            .into_iter()
            .filter(|p| is_plugin_name(p))
            .collect::<Vec<_>>()
    };
    match event.kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            let mut paths = event.paths.into_iter();
            let from = paths.next();
            let to = paths.next();
            let mut out = Vec::new();
            if let Some(from) = from.filter(|p| is_plugin_name(p)) {
                out.push(Raw::Gone(from));
            }
            if let Some(to) = to.filter(|p| is_plugin_name(p)) {
                out.push(Raw::Complete(to));
            }
            out
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => plugin_paths(event.paths)
            .into_iter()
            .map(Raw::Complete)
            .collect(),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
            plugin_paths(event.paths)
                .into_iter()
                .map(Raw::Gone)
                .collect()
        }
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Access(_) | EventKind::Any => {
            plugin_paths(event.paths)
                .into_iter()
                .map(Raw::Touched)
                .collect()
        }
        EventKind::Other => Vec::new(),
    }
}

/// Watches `config.dir` until `stop` fires, sending each plugin path that may have changed to
/// `changes` (complete files only; removed paths too). Returns whether inotify is in use.
pub fn spawn(
    config: WatchConfig,
    changes: mpsc::UnboundedSender<PathBuf>,
    stop: CancellationToken,
) -> bool {
    let (raw_tx, raw_rx) = mpsc::unbounded_channel::<Raw>();
    let watcher = if config.use_events {
        start_watcher(&config.dir, raw_tx)
    } else {
        None
    };
    let watching = watcher.is_some();
    if config.use_events && !watching {
        tracing::warn!(
            dir = %config.dir.display(),
            every = %humantime::format_duration(config.rescan_interval),
            "cannot watch the plugins directory for changes (inotify limit?); falling back to rescans"
        );
    }
    tokio::spawn(run(config, watcher, raw_rx, changes, stop));
    watching
}

fn start_watcher(
    dir: &Path,
    raw: mpsc::UnboundedSender<Raw>,
) -> Option<notify::RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) => {
                for r in classify(event) {
                    let _ = raw.send(r);
                }
            }
            Err(e) => tracing::warn!("plugins directory watcher: {e}"),
        })
        .map_err(|e| tracing::debug!("cannot create a watcher: {e}"))
        .ok()?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::debug!("cannot watch {}: {e}", dir.display()))
        .ok()?;
    Some(watcher)
}

async fn run(
    config: WatchConfig,
    watcher: Option<notify::RecommendedWatcher>,
    mut raw: mpsc::UnboundedReceiver<Raw>,
    changes: mpsc::UnboundedSender<PathBuf>,
    stop: CancellationToken,
) {
    // Kept alive for as long as this task runs: dropping it stops the events.
    let _watcher = watcher;
    let mut settling: HashMap<PathBuf, Instant> = HashMap::new();
    let mut known: HashMap<PathBuf, Signature> = scan(&config.dir);
    let far = Duration::from_secs(86_400 * 365);
    let rescan_every = if config.rescan_interval.is_zero() {
        far
    } else {
        config.rescan_interval
    };
    let mut next_rescan = Instant::now() + rescan_every;
    loop {
        let next_settle = settling.values().min().copied();
        let wake = next_settle.map_or(next_rescan, |s| s.min(next_rescan));
        tokio::select! {
            () = stop.cancelled() => return,
            event = raw.recv() => match event {
                None => {
                    // The watcher is gone: keep rescanning.
                    raw = mpsc::unbounded_channel().1;
                }
                Some(Raw::Complete(path)) => {
                    settling.remove(&path);
                    remember(&mut known, &path);
                    let _ = changes.send(path);
                }
                Some(Raw::Gone(path)) => {
                    settling.remove(&path);
                    known.remove(&path);
                    let _ = changes.send(path);
                }
                Some(Raw::Touched(path)) => {
                    settling.insert(path, Instant::now() + config.settle);
                }
            },
            () = sleep_until(wake) => {
                let now = Instant::now();
                let due: Vec<PathBuf> = settling
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                for path in due {
                    settling.remove(&path);
                    remember(&mut known, &path);
                    let _ = changes.send(path);
                }
                if now >= next_rescan {
                    next_rescan = now + rescan_every;
                    rescan(&config, &mut known, &mut settling, &changes);
                }
            }
        }
    }
}

fn remember(known: &mut HashMap<PathBuf, Signature>, path: &Path) {
    match signature(path) {
        Some(sig) => known.insert(path.to_owned(), sig),
        None => known.remove(path),
    };
}

fn scan(dir: &Path) -> HashMap<PathBuf, Signature> {
    crate::discover::plugin_paths(dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| signature(&p).map(|s| (p, s)))
        .collect()
}

/// Compares the directory with what was last seen. A changed file is reported only once its
/// signature holds still for the settle period (it goes through the settle queue); a vanished
/// file is reported at once.
fn rescan(
    config: &WatchConfig,
    known: &mut HashMap<PathBuf, Signature>,
    settling: &mut HashMap<PathBuf, Instant>,
    changes: &mpsc::UnboundedSender<PathBuf>,
) {
    let now_seen = scan(&config.dir);
    for (path, sig) in &now_seen {
        if known.get(path) != Some(sig) && !settling.contains_key(path) {
            tracing::debug!(file = %path.display(), "rescan found a change");
            settling.insert(path.clone(), Instant::now() + config.settle);
        }
    }
    let gone: Vec<PathBuf> = known
        .keys()
        .filter(|p| !now_seen.contains_key(*p))
        .cloned()
        .collect();
    for path in gone {
        tracing::debug!(file = %path.display(), "rescan found a removal");
        known.remove(&path);
        let _ = changes.send(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind};

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        notify::Event {
            kind,
            paths: paths.iter().map(PathBuf::from).collect(),
            attrs: Default::default(),
        }
    }

    #[test]
    fn renames_are_complete_writes_settle_and_other_names_are_ignored() {
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(
            classify(event(rename, &["/p/.x.tmp", "/p/x.so"])),
            [Raw::Complete("/p/x.so".into())]
        );
        assert_eq!(
            classify(event(rename, &["/p/old.so", "/p/new.so"])),
            [
                Raw::Gone("/p/old.so".into()),
                Raw::Complete("/p/new.so".into())
            ]
        );
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(
            classify(event(write, &["/p/x.so"])),
            [Raw::Touched("/p/x.so".into())]
        );
        assert_eq!(
            classify(event(EventKind::Create(CreateKind::File), &["/p/x.so"])),
            [Raw::Touched("/p/x.so".into())]
        );
        assert_eq!(
            classify(event(EventKind::Remove(RemoveKind::File), &["/p/x.so"])),
            [Raw::Gone("/p/x.so".into())]
        );
        assert!(classify(event(write, &["/p/notes.txt"])).is_empty());
        assert!(classify(event(write, &["/p/.x.tmp"])).is_empty());
    }
}
