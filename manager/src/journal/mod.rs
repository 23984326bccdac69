//! The journal: every inbound message a plugin delivers, made durable in an embedded SQLite
//! database (`<state_dir>/journal.db`, WAL mode) before the delivery is acknowledged, numbered
//! with a sequence number that is strictly increasing and never reused.
//!
//! * Writes go through one dedicated writer thread: it takes every delivery waiting
//!   in its queue and commits them in one transaction (group commit), so one disk sync
//!   acknowledges many deliveries. Deliveries made one after another through one handle are
//!   queued, and so numbered, in call order.
//! * Sequence numbers: the highest one ever committed is kept in the database (it survives
//!   pruning to empty), and blocks of numbers are reserved in `journal.seq` beside it before they
//!   are used, so a journal recreated from scratch continues above every number handed out.
//! * Readers ([`Journal::read_after`]) use their own connections and hold a read transaction only
//!   for one short batch, so the WAL can always be checkpointed, however slowly a consumer reads.
//! * Retention: messages older than `retain` and, oldest first, those beyond `max_size` are
//!   pruned; [`Journal::read_after`] reports a cursor that fell behind as a pruned range.
//! * A message over `max_message_bytes`, or one that does not fit in `max_size` even with the
//!   journal pruned empty (or on a full disk), is refused with a one-line reason and counted.
//! * Only one process may use a journal: `journal.lock` is locked while it is open.

pub mod schema;
pub mod settings;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{SystemTime, UNIX_EPOCH},
};

use channeld_plugin_abi::abi::InboundMessage;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use crate::{host::AccountKey, inbound::MessageSink, plugin::BoxFuture};
pub use settings::{JournalConfig, SyncMode};

/// The database's file name in the state directory.
pub const DB_FILE: &str = "journal.db";
/// The file holding the reserved sequence numbers' upper bound.
pub const SEQ_FILE: &str = "journal.seq";
/// The lock file that keeps a second process out.
pub const LOCK_FILE: &str = "journal.lock";

/// The journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file is not a usable SQLite database.
    #[error(
        "journal {}: not a usable journal database ({reason}); move it away to start with an empty journal",
        path.display()
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason.
        reason: String,
    },
    /// Another process holds the journal.
    #[error(
        "journal {}: locked by another process ({reason}); is another channeld running with this state_dir?",
        path.display()
    )]
    Locked {
        /// The database file.
        path: PathBuf,
        /// What was locked.
        reason: String,
    },
    /// Written by a newer channeld.
    #[error(
        "journal {}: schema version {found} was written by a newer channeld (this one knows up to {supported}); upgrade channeld or move the file away",
        path.display()
    )]
    Newer {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// Ours.
        supported: u32,
    },
    /// Any other failure (permissions, I/O).
    #[error("journal {}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl JournalError {
    fn from_sqlite(path: &Path, e: rusqlite::Error) -> Self {
        let path = path.to_owned();
        let reason = e.to_string();
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                Self::Corrupt { path, reason }
            }
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                Self::Locked { path, reason }
            }
            _ => Self::Io { path, reason },
        }
    }
}

/// Why one delivery was refused. Its text is what the plugin receives.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// Over `max_message_bytes`.
    #[error("message of {bytes} bytes is over the journal's max_message_bytes ({max}); refused")]
    TooLarge {
        /// Its size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// `extra` is not a JSON object.
    #[error("message extra is not a JSON object ({0}); refused")]
    BadExtra(String),
    /// No room: `max_size` reached with nothing left to prune, or the disk is full.
    #[error("journal full ({0}); message refused")]
    Full(String),
    /// The write failed.
    #[error("journal write failed ({0}); message refused")]
    Write(String),
    /// The journal is closed (the daemon is stopping).
    #[error("the journal is closed; message refused")]
    Closed,
}

/// One message as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Channel id.
    pub channel: String,
    /// Account id.
    pub account: String,
    /// Conversation.
    pub conversation: String,
    /// Sender.
    pub sender: String,
    /// Text.
    pub text: String,
    /// The channel's message id (`None`: it has none).
    pub message_id: Option<String>,
    /// Sent, ms since the epoch.
    pub sent_ms: i64,
    /// Received by channeld, ms since the epoch.
    pub received_ms: i64,
    /// Further fields, a JSON object.
    pub extra: Option<String>,
}

impl Record {
    /// A record of `message` delivered by `key` now. The account key is authoritative for the
    /// channel and account; an unknown send time is the arrival time.
    pub fn from_inbound(key: &AccountKey, message: InboundMessage) -> Self {
        let received_ms = now_ms();
        let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
        Self {
            channel: key.channel.to_string(),
            account: key.account.to_string(),
            conversation: message.conversation.into_string(),
            sender: message.sender.into_string(),
            text: message.text.into_string(),
            message_id: none_if_empty(message.id.into_string()),
            sent_ms: if message.time_ms == 0 {
                received_ms
            } else {
                message.time_ms
            },
            received_ms,
            extra: none_if_empty(message.extra.into_string()),
        }
    }

    /// The bytes `max_message_bytes` counts.
    pub fn bytes(&self) -> u64 {
        (self.conversation.len()
            + self.sender.len()
            + self.text.len()
            + self.message_id.as_ref().map_or(0, String::len)
            + self.extra.as_ref().map_or(0, String::len)) as u64
    }
}

/// One journaled message, as consumers see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// Sequence number.
    pub seq: u64,
    /// Channel id.
    pub channel: String,
    /// Account id.
    pub account: String,
    /// Conversation.
    pub conversation: String,
    /// Sender.
    pub sender: String,
    /// Text.
    pub text: String,
    /// The channel's message id.
    pub message_id: Option<String>,
    /// Sent, ms since the epoch.
    pub sent_at: i64,
    /// Received by channeld, ms since the epoch.
    pub received_at: i64,
    /// Further fields.
    pub extra: Option<Value>,
}

/// Which messages a consumer wants (`None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this channel.
    pub channel: Option<String>,
    /// Only this (normalised) account id.
    pub account: Option<String>,
    /// Only this conversation.
    pub conversation: Option<String>,
}

/// One read of the journal after a cursor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Sequence numbers after the cursor that were pruned before it could read them: `from..=to`.
    pub pruned: Option<(u64, u64)>,
    /// The messages read, in order.
    pub messages: Vec<Message>,
    /// The cursor to read after next time (past every number looked at, matched or not).
    pub cursor: u64,
}

/// Counters for `GET /v1/journal`.
#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    commits: AtomicU64,
    refused_too_large: AtomicU64,
    refused_full: AtomicU64,
    refused_other: AtomicU64,
}

/// What the writer and the readers share.
struct Shared {
    path: PathBuf,
    settings: JournalConfig,
    latest: watch::Sender<u64>,
    pruned_through: AtomicU64,
    messages: AtomicU64,
    used_bytes: AtomicU64,
    counters: Counters,
}

/// A request to the writer thread.
struct Append {
    record: Record,
    done: oneshot::Sender<Result<u64, Refusal>>,
}

/// The open journal. Dropping it (or [`Journal::close`]) lets the writer finish what is queued.
pub struct Journal {
    shared: Arc<Shared>,
    queue: Mutex<Option<mpsc::Sender<Append>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    _lock: fs::File,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(2))?;
    Ok(conn)
}

impl Journal {
    /// Opens (or creates) the journal in `state_dir`, migrating its schema. A corrupt, locked or
    /// newer journal is an error with one line.
    pub fn open(state_dir: &Path, settings: JournalConfig) -> Result<Arc<Self>, JournalError> {
        let path = state_dir.join(DB_FILE);
        let io = |p: &Path, e: std::io::Error| JournalError::Io {
            path: p.to_owned(),
            reason: e.to_string(),
        };
        let lock_path = state_dir.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        if lock.try_lock().is_err() {
            return Err(JournalError::Locked {
                path,
                reason: format!("{} is held", lock_path.display()),
            });
        }
        let sqlite = |e| JournalError::from_sqlite(&path, e);
        let mut conn = open_connection(&path).map_err(sqlite)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(JournalError::Io {
                path,
                reason: format!("cannot switch to WAL mode (got {mode})"),
            });
        }
        let migrated = schema::migrate(&mut conn).map_err(|e| match e {
            schema::SchemaError::Newer(found) => JournalError::Newer {
                path: path.clone(),
                found,
                supported: schema::CURRENT,
            },
            schema::SchemaError::Sqlite(e) => JournalError::from_sqlite(&path, e),
        })?;
        let sync = match settings.sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(sqlite)?;
        // The WAL file is cut back to this size after checkpoints instead of staying at its
        // largest.
        let _: i64 = conn
            .query_row("PRAGMA journal_size_limit = 67108864", [], |r| r.get(0))
            .map_err(sqlite)?;
        let high_water = schema::meta(&conn, schema::HIGH_WATER).map_err(sqlite)?;
        let pruned_through = schema::meta(&conn, schema::PRUNED_THROUGH).map_err(sqlite)?;
        let messages: i64 = conn
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .map_err(sqlite)?;
        let seq_path = state_dir.join(SEQ_FILE);
        let reserved = writer::read_reserved(&seq_path).map_err(|e| io(&seq_path, e))?;
        // A journal created just now continues above every number ever reserved; an existing
        // one knows its own high-water mark.
        let high_water = if migrated == schema::Migrated::Created {
            high_water.max(reserved)
        } else {
            high_water
        };
        if migrated == schema::Migrated::Created && high_water > 0 {
            schema::set_meta(&conn, schema::HIGH_WATER, high_water).map_err(sqlite)?;
            schema::set_meta(&conn, schema::PRUNED_THROUGH, high_water).map_err(sqlite)?;
        }
        let pruned_through = if migrated == schema::Migrated::Created {
            high_water
        } else {
            pruned_through
        };
        let (latest, _) = watch::channel(high_water);
        let shared = Arc::new(Shared {
            path: path.clone(),
            settings,
            latest,
            pruned_through: AtomicU64::new(pruned_through),
            messages: AtomicU64::new(messages as u64),
            used_bytes: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let (queue, requests) = mpsc::channel();
        let writer = writer::Writer::new(conn, shared.clone(), seq_path, high_water, reserved)
            .map_err(sqlite)?;
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(requests))
            .map_err(|e| io(&path, e))?;
        tracing::info!(
            file = %path.display(),
            messages,
            last_seq = high_water,
            schema = ?migrated,
            "journal open"
        );
        Ok(Arc::new(Self {
            shared,
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(handle)),
            readers: Mutex::new(Vec::new()),
            _lock: lock,
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &JournalConfig {
        &self.shared.settings
    }

    /// Appends `record`. The future completes once it is durable, with its sequence number, or
    /// with the reason it was refused. It needs no runtime: the writer thread completes it.
    ///
    /// # Cancellation safety
    /// Dropping the future does not withdraw the record: once this function returned, the
    /// record is committed (or refused) anyway; only the answer is lost.
    pub fn append(&self, record: Record) -> impl Future<Output = Result<u64, Refusal>> + use<> {
        let (done, answer) = oneshot::channel();
        let refused = self.check(&record).err().or_else(|| {
            let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            match queue.as_ref() {
                Some(queue) => queue
                    .send(Append { record, done })
                    .err()
                    .map(|_| Refusal::Closed),
                None => Some(Refusal::Closed),
            }
        });
        if let Some(refusal) = &refused {
            self.count_refusal(refusal);
        }
        async move {
            match refused {
                Some(refusal) => Err(refusal),
                None => answer.await.unwrap_or(Err(Refusal::Closed)),
            }
        }
    }

    fn check(&self, record: &Record) -> Result<(), Refusal> {
        let bytes = record.bytes();
        let max = self.shared.settings.max_message_bytes;
        if bytes > max {
            return Err(Refusal::TooLarge { bytes, max });
        }
        if let Some(extra) = &record.extra {
            match serde_json::from_str::<Value>(extra) {
                Ok(Value::Object(_)) => {}
                Ok(other) => return Err(Refusal::BadExtra(format!("got {other}"))),
                Err(e) => return Err(Refusal::BadExtra(e.to_string())),
            }
        }
        Ok(())
    }

    fn count_refusal(&self, refusal: &Refusal) {
        self.shared.count_refusal(refusal);
    }

    /// The highest committed sequence number, and a receiver that changes with it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.latest.subscribe()
    }

    /// The highest committed sequence number.
    pub fn last_seq(&self) -> u64 {
        *self.shared.latest.borrow()
    }

    /// Reads up to `limit` messages matching `filter` with a sequence number in
    /// `after+1..=upto`, in order, in one short read transaction. Blocking: call it from a
    /// blocking thread.
    pub fn read_after(
        &self,
        after: u64,
        upto: u64,
        filter: &Filter,
        limit: usize,
    ) -> Result<Batch, JournalError> {
        let conn = self.reader()?;
        let result = read_batch(&conn, after, upto, filter, limit);
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        result.map_err(|e| JournalError::from_sqlite(&self.shared.path, e))
    }

    fn reader(&self) -> Result<Connection, JournalError> {
        if let Some(conn) = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(conn);
        }
        let path = &self.shared.path;
        let conn = open_connection(path).map_err(|e| JournalError::from_sqlite(path, e))?;
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| JournalError::from_sqlite(path, e))?;
        Ok(conn)
    }

    /// The journal's figures, as JSON.
    pub fn stats(&self) -> Value {
        let s = &self.shared;
        let c = &s.counters;
        serde_json::json!({
            "path": s.path.display().to_string(),
            "lastSeq": self.last_seq(),
            "prunedThrough": s.pruned_through.load(Ordering::Relaxed),
            "messages": s.messages.load(Ordering::Relaxed),
            "usedBytes": s.used_bytes.load(Ordering::Relaxed),
            "maxSize": s.settings.max_size.as_u64(),
            "appended": c.appended.load(Ordering::Relaxed),
            "commits": c.commits.load(Ordering::Relaxed),
            "refusedTooLarge": c.refused_too_large.load(Ordering::Relaxed),
            "refusedFull": c.refused_full.load(Ordering::Relaxed),
            "refusedOther": c.refused_other.load(Ordering::Relaxed),
        })
    }

    /// Stops taking messages, lets the writer commit what is queued, and waits for it.
    pub fn close(&self) {
        drop(self.queue.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn count_refusal(&self, refusal: &Refusal) {
        let counter = match refusal {
            Refusal::TooLarge { .. } => &self.counters.refused_too_large,
            Refusal::Full(_) => &self.counters.refused_full,
            _ => &self.counters.refused_other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

const COLUMNS: &str =
    "seq, channel, account, conversation, sender, text, message_id, sent_ms, received_ms, extra";

fn read_batch(
    conn: &Connection,
    after: u64,
    upto: u64,
    filter: &Filter,
    limit: usize,
) -> rusqlite::Result<Batch> {
    // One transaction: the pruned mark and the rows are from the same snapshot, so a prune
    // between them cannot hide a gap.
    conn.execute_batch("BEGIN DEFERRED")?;
    let result = (|| -> rusqlite::Result<Batch> {
        let pruned_through = schema::meta(conn, schema::PRUNED_THROUGH)?;
        let mut batch = Batch {
            cursor: after,
            ..Batch::default()
        };
        let mut from = after;
        if pruned_through > after {
            batch.pruned = Some((after + 1, pruned_through));
            from = pruned_through;
        }
        if from >= upto {
            batch.cursor = from.max(after);
            return Ok(batch);
        }
        let mut sql = format!("SELECT {COLUMNS} FROM messages WHERE seq > ?1 AND seq <= ?2");
        let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
        let (from_i, upto_i, limit_i) = (from as i64, upto as i64, limit as i64);
        args.push(&from_i);
        args.push(&upto_i);
        args.push(&limit_i);
        for (column, value) in [
            ("channel", &filter.channel),
            ("account", &filter.account),
            ("conversation", &filter.conversation),
        ] {
            if let Some(value) = value {
                args.push(value);
                sql.push_str(&format!(" AND {column} = ?{}", args.len()));
            }
        }
        sql.push_str(" ORDER BY seq LIMIT ?3");
        let mut statement = conn.prepare_cached(&sql)?;
        let rows = statement.query_map(args.as_slice(), |r| {
            let extra: Option<String> = r.get(9)?;
            Ok(Message {
                seq: r.get::<_, i64>(0)? as u64,
                channel: r.get(1)?,
                account: r.get(2)?,
                conversation: r.get(3)?,
                sender: r.get(4)?,
                text: r.get(5)?,
                message_id: r.get(6)?,
                sent_at: r.get(7)?,
                received_at: r.get(8)?,
                extra: extra.and_then(|e| serde_json::from_str(&e).ok()),
            })
        })?;
        for row in rows {
            batch.messages.push(row?);
        }
        batch.cursor = match batch.messages.last() {
            Some(last) if batch.messages.len() >= limit => last.seq,
            _ => upto,
        };
        Ok(batch)
    })();
    let end = conn.execute_batch("COMMIT");
    let batch = result?;
    end?;
    Ok(batch)
}

impl MessageSink for Journal {
    fn accept(&self, key: &AccountKey, message: InboundMessage) -> BoxFuture<Result<u64, String>> {
        let key = key.clone();
        let appended = self.append(Record::from_inbound(&key, message));
        Box::pin(async move { appended.await.map_err(|e| format!("{key}: {e}")) })
    }
}
