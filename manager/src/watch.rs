//! Watching the plugins directory. The watcher's one job is to say "this plugin path may have
//! changed, and what is there now is complete". Only real changes count:
//!
//! * a file renamed into the directory is complete at once;
//! * a file written in place (`IN_CREATE`, `IN_MODIFY`, `IN_CLOSE_WRITE`, `IN_ATTRIB`) is reported
//!   after a quiet period (`settle`) during which its size, times and inode held still;
//! * a file deleted or renamed away is reported at once;
//! * reads never count: opening and closing a file without writing (as staging does) is not a
//!   change, so the host's own reads cannot feed the watcher.
//!
//! A periodic rescan compares the directory with what was last reported and catches what inotify
//! missed; with `watch = false`, or when inotify cannot start (e.g. at its limit), the rescan alone
//! stands in for it and the task sleeps between rescans. What changed — new, replaced, removed — is
//! decided by the catalog from the file itself.
//!
//! Queues are bounded and coalesced: raw inotify events go through a bounded channel (when it is
//! full the watcher rescans the directory instead), and reported paths through a [`ChangeQueue`]
//! that holds each pending path once.
//!
//! Paths are named once: every reported path is `<canonical plugins dir>/<file name>`, whatever
//! name inotify used.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, ModifyKind, RenameMode},
};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;

use crate::discover::is_plugin_name;

/// Raw events held between inotify's thread and the watcher task; past this, a rescan replaces
/// the events that did not fit.
const RAW_QUEUE: usize = 256;

/// How the directory is watched.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The plugins directory (canonical).
    pub dir: PathBuf,
    /// Quiet period before a file written in place is reported.
    pub settle: Duration,
    /// Time between rescans (zero: no rescans).
    pub rescan_interval: Duration,
    /// Whether to use inotify at all (false: rescans only).
    pub use_events: bool,
}

/// Paths waiting for the reconciler: each pending path once, in name order, so a burst of events
/// for one file is one reconcile. Closing it drops what is pending and ends [`ChangeQueue::pop`].
#[derive(Default)]
pub struct ChangeQueue {
    pending: Mutex<(BTreeSet<PathBuf>, bool)>,
    ready: Notify,
}

impl ChangeQueue {
    /// An empty, open queue.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeSet<PathBuf>, bool)> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `path` (once, however often it is pushed before it is taken).
    pub fn push(&self, path: PathBuf) {
        let mut pending = self.lock();
        if !pending.1 {
            pending.0.insert(path);
            drop(pending);
            self.ready.notify_one();
        }
    }

    /// Closes the queue: pending paths are dropped and [`ChangeQueue::pop`] returns `None`.
    pub fn close(&self) {
        let mut pending = self.lock();
        pending.1 = true;
        pending.0.clear();
        drop(pending);
        self.ready.notify_waiters();
        self.ready.notify_one();
    }

    /// How many paths are pending.
    pub fn len(&self) -> usize {
        self.lock().0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next pending path; `None` once closed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: a path is taken out of the queue only in the poll that returns it.
    pub async fn pop(&self) -> Option<PathBuf> {
        loop {
            let notified = self.ready.notified();
            {
                let mut pending = self.lock();
                if pending.1 {
                    return None;
                }
                if let Some(path) = pending.0.pop_first() {
                    return Some(path);
                }
            }
            notified.await;
        }
    }
}

/// What a file looked like at the last look: changes in any of these mean new content (or new
/// permissions, which decide whether it may load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    inode: u64,
}

/// `path`'s signature, `None` if it is gone.
pub fn signature(path: &Path) -> Option<Signature> {
    let meta = fs::metadata(path).ok()?;
    Some(Signature {
        len: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        inode: meta.ino(),
    })
}

/// A raw filesystem event, reduced to what the watcher acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Raw {
    /// Arrived complete (renamed into place): report at once.
    Complete(PathBuf),
    /// Being written (or its metadata changed): report once quiet.
    Touched(PathBuf),
    /// Gone (removed or renamed away): report at once.
    Gone(PathBuf),
    /// Events were lost: compare the whole directory.
    Rescan,
}

fn classify(event: notify::Event) -> Vec<Raw> {
    if event.need_rescan() {
        return vec![Raw::Rescan];
    }
    let plugin_paths = |paths: Vec<PathBuf>, raw: fn(PathBuf) -> Raw| {
        paths
            .into_iter()
            .filter(|p| is_plugin_name(p))
            .map(raw)
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
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            plugin_paths(event.paths, Raw::Complete)
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
            plugin_paths(event.paths, Raw::Gone)
        }
        // A writer closing the file: the write is over, but another may follow (chunked
        // writers open and close per chunk), so it settles like any write.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            plugin_paths(event.paths, Raw::Touched)
        }
        // Opening, reading, closing after reading: nobody changed anything (staging reads).
        EventKind::Access(_) | EventKind::Other => Vec::new(),
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any => {
            plugin_paths(event.paths, Raw::Touched)
        }
    }
}

/// A started watcher: whether inotify is in use, and its task.
pub struct Watching {
    /// Whether inotify events are used (false: periodic rescans only).
    pub events: bool,
    /// The watcher's task; it ends when the stop token fires.
    pub task: JoinHandle<()>,
}

/// Watches `config.dir` until `stop` fires, pushing each plugin path that may have changed to
/// `changes` (complete files only; removed paths too). The directory is read for the baseline
/// before this returns, so a file that appears afterwards is always seen.
pub fn spawn(config: WatchConfig, changes: Arc<ChangeQueue>, stop: CancellationToken) -> Watching {
    let (raw_tx, raw_rx) = mpsc::channel::<Raw>(RAW_QUEUE);
    let overflow = Arc::new(AtomicBool::new(false));
    let watcher = if config.use_events {
        start_watcher(&config.dir, raw_tx, overflow.clone())
    } else {
        None
    };
    let events = watcher.is_some();
    if config.use_events && !events {
        tracing::warn!(
            dir = %config.dir.display(),
            every = %humantime::format_duration(config.rescan_interval),
            "cannot watch the plugins directory for changes (inotify limit?); falling back to rescans"
        );
    }
    let known = scan(&config.dir);
    let raw = watcher.as_ref().map(|_| raw_rx);
    let task = tokio::spawn(run(config, watcher, raw, overflow, known, changes, stop));
    Watching { events, task }
}

fn start_watcher(
    dir: &Path,
    raw: mpsc::Sender<Raw>,
    overflow: Arc<AtomicBool>,
) -> Option<notify::RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) => {
                for r in classify(event) {
                    if raw.try_send(r).is_err() {
                        // Full (or the task is gone): the next turn rescans instead.
                        overflow.store(true, Ordering::Relaxed);
                        let _ = raw.try_send(Raw::Rescan);
                    }
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

/// The next raw event; never ready when there is no watcher (so the select below sleeps).
async fn next_raw(raw: &mut Option<mpsc::Receiver<Raw>>) -> Option<Raw> {
    match raw {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A path being written: when it is due, and what it looked like when last touched.
struct Settling {
    due: Instant,
    seen: Option<Signature>,
}

async fn run(
    config: WatchConfig,
    watcher: Option<notify::RecommendedWatcher>,
    mut raw: Option<mpsc::Receiver<Raw>>,
    overflow: Arc<AtomicBool>,
    mut known: HashMap<PathBuf, Signature>,
    changes: Arc<ChangeQueue>,
    stop: CancellationToken,
) {
    // Kept alive for as long as this task runs: dropping it stops the events.
    let _watcher = watcher;
    let mut settling: HashMap<PathBuf, Settling> = HashMap::new();
    let far = Duration::from_secs(86_400 * 365);
    let rescan_every = if config.rescan_interval.is_zero() {
        far
    } else {
        config.rescan_interval
    };
    let mut next_rescan = Instant::now() + rescan_every;
    loop {
        let next_settle = settling.values().map(|s| s.due).min();
        let wake = next_settle.map_or(next_rescan, |s| s.min(next_rescan));
        tokio::select! {
            () = stop.cancelled() => return,
            event = next_raw(&mut raw) => match event {
                // The watcher is gone: the periodic rescan goes on alone.
                None => raw = None,
                Some(Raw::Complete(path)) => {
                    let path = in_dir(&config.dir, &path);
                    settling.remove(&path);
                    let now_seen = signature(&path);
                    // inotify reports one rename twice (moved-to, then the pair): once is enough.
                    if now_seen.is_none() || known.get(&path) != now_seen.as_ref() {
                        remember(&mut known, &path);
                        changes.push(path);
                    }
                }
                Some(Raw::Gone(path)) => {
                    let path = in_dir(&config.dir, &path);
                    settling.remove(&path);
                    known.remove(&path);
                    changes.push(path);
                }
                Some(Raw::Touched(path)) => {
                    let path = in_dir(&config.dir, &path);
                    let seen = signature(&path);
                    settling.insert(path, Settling { due: Instant::now() + config.settle, seen });
                }
                Some(Raw::Rescan) => {
                    if overflow.swap(false, Ordering::Relaxed) {
                        tracing::debug!("plugins directory events overflowed; rescanning");
                    }
                    rescan(&config, &mut known, &mut settling, &changes);
                }
            },
            () = sleep_until(wake) => {
                let now = Instant::now();
                let due: Vec<PathBuf> = settling
                    .iter()
                    .filter(|(_, s)| s.due <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                for path in due {
                    let now_seen = signature(&path);
                    let Some(entry) = settling.get_mut(&path) else { continue };
                    if now_seen != entry.seen {
                        // Still being written: wait for another quiet period.
                        entry.seen = now_seen;
                        entry.due = now + config.settle;
                        continue;
                    }
                    settling.remove(&path);
                    if now_seen.is_some() && known.get(&path) == now_seen.as_ref() {
                        // Touched but not changed (e.g. metadata written back as it was).
                        continue;
                    }
                    remember(&mut known, &path);
                    changes.push(path);
                }
                if now >= next_rescan {
                    next_rescan = now + rescan_every;
                    rescan(&config, &mut known, &mut settling, &changes);
                }
            }
        }
    }
}

/// The one name of a path inotify reported: `<dir>/<file name>`.
fn in_dir(dir: &Path, path: &Path) -> PathBuf {
    path.file_name()
        .map_or_else(|| path.to_owned(), |name| dir.join(name))
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

/// Compares the directory with what was last reported. A changed file is reported only once its
/// signature holds still for the settle period (it goes through the settle queue); a vanished
/// file is reported at once.
fn rescan(
    config: &WatchConfig,
    known: &mut HashMap<PathBuf, Signature>,
    settling: &mut HashMap<PathBuf, Settling>,
    changes: &ChangeQueue,
) {
    let now_seen = scan(&config.dir);
    for (path, sig) in &now_seen {
        if known.get(path) != Some(sig) && !settling.contains_key(path) {
            tracing::debug!(file = %path.display(), "rescan found a change");
            settling.insert(
                path.clone(),
                Settling {
                    due: Instant::now() + config.settle,
                    seen: Some(*sig),
                },
            );
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
        changes.push(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};

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
            classify(event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &["/p/x.so"]
            )),
            [Raw::Touched("/p/x.so".into())]
        );
        assert_eq!(
            classify(event(
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                &["/p/x.so"]
            )),
            [Raw::Touched("/p/x.so".into())]
        );
        assert_eq!(
            classify(event(EventKind::Remove(RemoveKind::File), &["/p/x.so"])),
            [Raw::Gone("/p/x.so".into())]
        );
        assert!(classify(event(write, &["/p/notes.txt"])).is_empty());
        assert!(classify(event(write, &["/p/.x.tmp"])).is_empty());
    }

    #[test]
    fn reads_are_not_changes() {
        for kind in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Open(AccessMode::Read),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(
                classify(event(EventKind::Access(kind), &["/p/x.so"])).is_empty(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_lost_event_means_a_rescan() {
        let lost = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(classify(lost), [Raw::Rescan]);
    }

    /// The cause of a flaky periodic-rescan test: the baseline was read by the watcher's task
    /// when it first ran, so a file that arrived before that (a loaded machine, a quick test)
    /// was taken for part of the baseline and never reported. The baseline is read before
    /// `spawn` returns.
    #[tokio::test(start_paused = true)]
    async fn a_file_added_before_the_watchers_task_first_runs_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let dir = fs::canonicalize(dir.path()).unwrap();
        let queue = ChangeQueue::new();
        let stop = CancellationToken::new();
        let config = WatchConfig {
            dir: dir.clone(),
            settle: Duration::from_millis(100),
            rescan_interval: Duration::from_millis(100),
            use_events: false,
        };
        let watching = spawn(config, queue.clone(), stop.clone());
        // On this current-thread runtime the watcher's task has not run yet.
        fs::write(dir.join("x.so"), b"content").unwrap();
        let reported = tokio::time::timeout(Duration::from_secs(10), queue.pop()).await;
        assert_eq!(reported, Ok(Some(dir.join("x.so"))));
        stop.cancel();
        watching.task.await.unwrap();
    }

    #[tokio::test]
    async fn the_change_queue_holds_each_path_once_and_ends_when_closed() {
        let queue = ChangeQueue::new();
        for _ in 0..3 {
            queue.push("/p/b.so".into());
            queue.push("/p/a.so".into());
        }
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.pop().await, Some(PathBuf::from("/p/a.so")));
        assert_eq!(queue.pop().await, Some(PathBuf::from("/p/b.so")));
        assert!(queue.is_empty());
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop().await }
        });
        tokio::task::yield_now().await;
        queue.close();
        assert_eq!(waiter.await.unwrap(), None);
        queue.push("/p/c.so".into());
        assert!(queue.is_empty(), "a closed queue takes nothing");
    }
}
