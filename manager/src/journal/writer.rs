//! The journal's writer thread: group commit, sequence numbers, retention and checkpoints.
//!
//! It blocks on its queue; when a request arrives it takes every other request already waiting
//! (up to [`MAX_BATCH`]) and commits them all in one transaction, then answers each. Between
//! batches, and at least every [`HOUSEKEEPING`], it prunes by age and runs a passive WAL
//! checkpoint (readers never hold a snapshot for long, so the checkpoint can always finish).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use rusqlite::{Connection, ErrorCode};

use super::{Append, Refusal, Shared, now_ms, schema};

/// Most deliveries in one transaction.
const MAX_BATCH: usize = 8192;
/// How often retention and checkpoints run.
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// Sequence numbers reserved in `journal.seq` at a time.
const RESERVE_BLOCK: u64 = 1 << 16;
/// Rows deleted per pruning transaction, so a large prune never stalls the writer for long.
const PRUNE_CHUNK: u64 = 10_000;
/// Bytes a row costs beyond its text, for the size estimate before a commit.
const ROW_OVERHEAD: u64 = 64;

/// The reserved upper bound in `path` (0 when the file does not exist).
pub(super) fn read_reserved(path: &Path) -> std::io::Result<u64> {
    match fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("expected a sequence number, found {:?}", text.trim()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Durably replaces `path`'s content with `value`.
fn write_reserved(path: &Path, value: u64) -> std::io::Result<()> {
    let temp = path.with_extension("seq.tmp");
    let mut file = fs::File::create(&temp)?;
    file.write_all(format!("{value}\n").as_bytes())?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub(super) struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    seq_path: PathBuf,
    /// The last committed sequence number.
    last: u64,
    /// Numbers up to this one may be used without touching `journal.seq`.
    reserved: u64,
    page_size: u64,
    last_housekeeping: Instant,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        shared: Arc<Shared>,
        seq_path: PathBuf,
        last: u64,
        reserved: u64,
    ) -> rusqlite::Result<Self> {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let writer = Self {
            conn,
            shared,
            seq_path,
            last,
            reserved,
            page_size: page_size as u64,
            last_housekeeping: Instant::now() - HOUSEKEEPING,
        };
        Ok(writer)
    }

    pub(super) fn run(mut self, requests: mpsc::Receiver<Append>) {
        self.housekeeping();
        let mut batch = Vec::with_capacity(64);
        loop {
            match requests.recv_timeout(HOUSEKEEPING) {
                Ok(first) => batch.push(first),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.housekeeping();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
            if self.last_housekeeping.elapsed() >= HOUSEKEEPING {
                self.housekeeping();
            }
        }
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        tracing::debug!(last_seq = self.last, "journal closed");
    }

    fn commit(&mut self, batch: &mut Vec<Append>) {
        let result = self.write(batch);
        match result {
            Ok(first) => {
                self.shared.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .counters
                    .appended
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.shared
                    .messages
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.shared.latest.send_replace(self.last);
                for (i, request) in batch.drain(..).enumerate() {
                    let _ = request.done.send(Ok(first + i as u64));
                }
            }
            Err(refusal) => {
                tracing::warn!(messages = batch.len(), "{refusal}");
                for request in batch.drain(..) {
                    self.shared.count_refusal(&refusal);
                    let _ = request.done.send(Err(refusal.clone()));
                }
            }
        }
        self.update_used_bytes();
    }

    /// Commits `batch`; the first sequence number used.
    fn write(&mut self, batch: &[Append]) -> Result<u64, Refusal> {
        let incoming: u64 = batch.iter().map(|r| r.record.bytes() + ROW_OVERHEAD).sum();
        self.make_room(incoming)?;
        let first = self.last + 1;
        let last = self.last + batch.len() as u64;
        if last > self.reserved {
            let reserved = last + RESERVE_BLOCK;
            write_reserved(&self.seq_path, reserved)
                .map_err(|e| Refusal::Write(format!("{}: {e}", self.seq_path.display())))?;
            self.reserved = reserved;
        }
        let tx = self.conn.transaction().map_err(refusal)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO messages (seq, channel, account, conversation, sender, text, \
                     message_id, sent_ms, received_ms, extra) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(refusal)?;
            for (i, request) in batch.iter().enumerate() {
                let r = &request.record;
                insert
                    .execute(rusqlite::params![
                        (first + i as u64) as i64,
                        r.channel,
                        r.account,
                        r.conversation,
                        r.sender,
                        r.text,
                        r.message_id,
                        r.sent_ms,
                        r.received_ms,
                        r.extra,
                    ])
                    .map_err(refusal)?;
            }
        }
        schema::set_meta(&tx, schema::HIGH_WATER, last).map_err(refusal)?;
        tx.commit().map_err(refusal)?;
        self.last = last;
        Ok(first)
    }

    fn used_bytes(&self) -> rusqlite::Result<u64> {
        let pages: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok((pages - free).max(0) as u64 * self.page_size)
    }

    fn update_used_bytes(&self) {
        if let Ok(used) = self.used_bytes() {
            self.shared.used_bytes.store(used, Ordering::Relaxed);
        }
    }

    /// Prunes the oldest messages until `incoming` more bytes fit in `max_size`; `Full` when
    /// they do not fit even with nothing left to prune.
    fn make_room(&mut self, incoming: u64) -> Result<(), Refusal> {
        let max = self.shared.settings.max_size.as_u64();
        loop {
            let used = self.used_bytes().map_err(refusal)?;
            if used + incoming <= max {
                return Ok(());
            }
            let rows = self.shared.messages.load(Ordering::Relaxed);
            if rows == 0 {
                return Err(Refusal::Full(format!(
                    "max_size {} reached with nothing left to prune",
                    self.shared.settings.max_size
                )));
            }
            // Down to 90 % of the limit, so the next batches do not prune again at once.
            let excess = used + incoming - max * 9 / 10;
            let share = (rows as u128 * excess as u128 / used.max(1) as u128) as u64;
            let count = share.clamp(1, rows).min(PRUNE_CHUNK);
            let through: Option<i64> = self
                .conn
                .query_row(
                    "SELECT seq FROM messages ORDER BY seq LIMIT 1 OFFSET ?1",
                    [count as i64 - 1],
                    |r| r.get(0),
                )
                .map_err(refusal)?;
            let Some(through) = through else {
                return Ok(());
            };
            self.prune_through(through as u64, "size")
                .map_err(refusal)?;
        }
    }

    /// Deletes every message up to `through` in one transaction and records it as pruned.
    fn prune_through(&mut self, through: u64, why: &str) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        let deleted = tx
            .prepare_cached("DELETE FROM messages WHERE seq <= ?1")?
            .execute([through as i64])?;
        let before = schema::meta(&tx, schema::PRUNED_THROUGH)?;
        if through > before {
            schema::set_meta(&tx, schema::PRUNED_THROUGH, through)?;
        }
        tx.commit()?;
        self.shared
            .pruned_through
            .fetch_max(through, Ordering::Relaxed);
        let _ = self
            .shared
            .messages
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(m.saturating_sub(deleted as u64))
            });
        tracing::debug!(deleted, through, why, "journal pruned");
        Ok(())
    }

    /// Age pruning and a passive checkpoint.
    fn housekeeping(&mut self) {
        self.last_housekeeping = Instant::now();
        let retain = self.shared.settings.retain.as_millis() as i64;
        let cutoff = now_ms().saturating_sub(retain);
        if let Err(e) = self.prune_older_than(cutoff) {
            tracing::warn!(file = %self.shared.path.display(), "journal pruning failed: {e}");
        }
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        self.update_used_bytes();
    }

    fn prune_older_than(&mut self, cutoff: i64) -> rusqlite::Result<()> {
        loop {
            // Messages are in arrival order, so the old ones are a prefix: walk it from the
            // oldest, one chunk at a time, and stop at the first message young enough to keep
            // (clocks can step back).
            let (through, scanned, young) = {
                let mut statement = self.conn.prepare_cached(
                    "SELECT seq, received_ms FROM messages ORDER BY seq LIMIT ?1",
                )?;
                let mut rows = statement.query([PRUNE_CHUNK as i64])?;
                let (mut through, mut scanned, mut young) = (None, 0u64, false);
                while let Some(row) = rows.next()? {
                    scanned += 1;
                    if row.get::<_, i64>(1)? >= cutoff {
                        young = true;
                        break;
                    }
                    through = Some(row.get::<_, i64>(0)? as u64);
                }
                (through, scanned, young)
            };
            let Some(through) = through else {
                return Ok(());
            };
            self.prune_through(through, "age")?;
            if young || scanned < PRUNE_CHUNK {
                return Ok(());
            }
        }
    }
}

fn refusal(e: rusqlite::Error) -> Refusal {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => Refusal::Full(e.to_string()),
        _ => Refusal::Write(e.to_string()),
    }
}
