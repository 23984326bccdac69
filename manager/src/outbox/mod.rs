//! The outbox: messages applications ask channeld to send (`POST /v1/messages`,
//! `channeld send`), made durable in the journal's database (table `outbox`) before they are
//! acknowledged, then handed to the channel plugin's send entry by one sender task.
//!
//! * A message is handed over only when its account is running and has not reported itself
//!   disconnected (an account that never reported a connection counts as connected).
//! * Per account and conversation, order is kept: only the oldest unfinished message of a
//!   conversation is ever sent; the next one waits until it is sent, failed or cancelled.
//! * A failed send is retried after `retry_initial`, doubling up to `retry_max`; a message not
//!   sent within `deadline` of its acceptance is marked failed with the last error.
//! * An idempotency key is unique per channel:account for `retain`: the same key again gives the
//!   first message's id and sends nothing.
//! * Caps: `max_queued_per_account` and `max_queued` unfinished messages; beyond them a new
//!   message is refused (the API answers 429).
//! * A message whose account is no longer configured fails with "account removed".
//! * Delivery is at least once: a message that was being sent when the daemon died is sent again
//!   after the restart (counted as `resentAfterRestart`), because channeld cannot know whether the
//!   channel took it.
//!
//! Writes are grouped, like the journal's: messages accepted at the same time share one
//! transaction (each caller is answered only once it is committed), and the sender records the
//! outcomes of every send that ended since its last pass, and marks the messages it hands over
//! now, in one transaction per pass. A message is marked `sending` durably before its plugin gets
//! it, so a crash never sends a message that is not counted by `resentAfterRestart`; an outcome
//! not yet recorded when the daemon dies leaves its message `sending`, which is sent again and
//! counted, as before.
//!
//! Whose turn it is comes from memory (`outbox/heads.rs`: every conversation's unfinished
//! messages, read once at open and kept in step with each committed write), not from a query per
//! pass. When a pass hands a conversation's head over (or finds it in flight) it also marks the
//! message behind it `sending` ahead, in the same transaction; that one is handed over as soon as
//! the head is sent (by the next pass before it commits, or right after the current pass's
//! commit), so a conversation is not held to one message per commit. A marked-ahead message whose
//! head fails, or whose account is not ready, is put back to `queued`.

pub mod cli;
pub mod gateway;
mod heads;
mod held;
pub mod http;
pub mod settings;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::heads::{Conversation, Heads, Open};
use crate::{
    host::AccountKey,
    journal::{Journal, SyncMode, now_ms},
    plugin::Outbound,
    supervise::{Channel, Supervisor},
};
pub use settings::OutboxConfig;

/// The states of a message.
pub mod state {
    /// Waiting to be handed to the plugin (or for its next attempt).
    pub const QUEUED: &str = "queued";
    /// Handed to the plugin; no answer yet.
    pub const SENDING: &str = "sending";
    /// The channel took it.
    pub const SENT: &str = "sent";
    /// Given up on, with why.
    pub const FAILED: &str = "failed";
    /// Cancelled by a user before it was sent.
    pub const CANCELLED: &str = "cancelled";
}

/// Why an outbox operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No such channel or account.
    #[error("{0}")]
    Unknown(String),
    /// A cap is reached.
    #[error("{key}: outbox full ({queued} messages waiting, the {which} is {max}); retry later")]
    Full {
        /// The account.
        key: AccountKey,
        /// Messages waiting (for the account or in all).
        queued: u64,
        /// Which cap.
        which: &'static str,
        /// Its value.
        max: u64,
    },
    /// No message with this id.
    #[error("no message {0} in the outbox")]
    NotFound(u64),
    /// The message is past the point of cancelling.
    #[error("message {id} is {state}: only a queued message can be cancelled")]
    NotCancellable {
        /// The message.
        id: u64,
        /// Its state.
        state: String,
    },
    /// The database failed.
    #[error("outbox {}: {reason}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason.
        reason: String,
    },
}

/// A message to send, as `POST /v1/messages` takes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewMessage {
    /// Channel id.
    pub channel: String,
    /// Account id (normalised on arrival).
    pub account: String,
    /// Where to send it.
    pub conversation: String,
    /// What.
    pub text: String,
    /// The channel's id of the message this answers.
    #[serde(default, alias = "reply_to", skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Sending the same key twice (per channel:account) sends once.
    #[serde(
        default,
        alias = "idempotency_key",
        skip_serializing_if = "Option::is_none"
    )]
    pub idempotency_key: Option<String>,
    /// Further fields for the plugin, a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

/// A message in the outbox, as `GET /v1/messages/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatus {
    /// The outbox's id.
    pub id: u64,
    /// Channel id.
    pub channel: String,
    /// Account id.
    pub account: String,
    /// Conversation.
    pub conversation: String,
    /// Text.
    pub text: String,
    /// `queued`, `sending`, `sent`, `failed` or `cancelled`.
    pub state: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Accepted, ms since the epoch.
    pub created_at: i64,
    /// Last change, ms since the epoch.
    pub updated_at: i64,
    /// The channel's id for the sent message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Why it failed (or why the last attempt failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The idempotency key it was accepted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The answer to an accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    /// Its id.
    pub id: u64,
    /// The idempotency key was seen before: this is the first message's id, nothing new is sent.
    pub duplicate: bool,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    refused_full: AtomicU64,
    attempts: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    resent_after_restart: AtomicU64,
    bridged: AtomicU64,
    hop_limit_stops: AtomicU64,
    /// Bridged copies refused for a transient reason and held for a retry (each counted once).
    bridge_refused: AtomicU64,
    /// Retries of held copies.
    bridge_retries: AtomicU64,
    /// Bridged copies let go without being queued (refused for good, or their gateway removed).
    bridge_dropped: AtomicU64,
    /// Copies held for a retry now.
    bridge_held: AtomicU64,
}

/// The outbox. Share it in an `Arc`; [`Outbox::run`] is its sender task.
pub struct Outbox {
    path: PathBuf,
    settings: OutboxConfig,
    /// The connection, and the unfinished messages in memory that every writer keeps in step
    /// with it.
    store: Mutex<Store>,
    supervisor: Supervisor,
    wake: Notify,
    in_flight: Mutex<HashSet<u64>>,
    counters: Counters,
    /// Messages checked and waiting for the next group commit.
    pending: Mutex<Vec<Pending>>,
    /// Outcomes of sends that ended, waiting for the sender's next pass to record them.
    outcomes: Mutex<Vec<Outcome>>,
    /// Set once the sender has stopped: a send ending after that records its own outcome.
    stopped: std::sync::atomic::AtomicBool,
    /// The gateways' bridging mark not yet written (0: none); the next group commit writes it
    /// (`gateway.rs`).
    bridged_through: AtomicU64,
}

/// The outbox's connection and what is kept in memory beside it.
struct Store {
    conn: Connection,
    /// The unfinished messages, as the committed database has them.
    heads: Heads,
    /// A write failed after `heads` took it in: read them again before using them.
    stale: bool,
}

impl Store {
    /// Reads the unfinished messages again if a failed write left `heads` out of step.
    fn fresh(&mut self) -> rusqlite::Result<()> {
        if self.stale {
            self.heads = Heads::load(&self.conn)?;
            self.stale = false;
        }
        Ok(())
    }
}

/// What the group commit decides for one message: accepted, or refused by a cap
/// (waiting, which cap, its value).
type Admission = Result<Accepted, (u64, &'static str, u64)>;

/// A message checked and waiting for the next group commit, and where its answer goes.
struct Pending {
    message: NewMessage,
    extra: Option<String>,
    now: i64,
    answer: std::sync::mpsc::SyncSender<Result<Admission, OutboxError>>,
}

/// How one send ended.
struct Outcome {
    id: u64,
    attempts: u32,
    created: i64,
    result: Result<String, String>,
    at: i64,
}

/// What a committed pass adds to the counters.
#[derive(Default)]
struct Effects {
    sent: u64,
    failed: u64,
    retries: u64,
    send_failures: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The error of an attempt the deadline cut short.
const TIMED_OUT: &str = "the last attempt did not complete within the deadline";

const COLUMNS: &str = "id, channel, account, conversation, text, state, attempts, created_ms, \
                       updated_ms, message_id, error, idempotency_key";

fn status_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageStatus> {
    Ok(MessageStatus {
        id: r.get::<_, i64>(0)? as u64,
        channel: r.get(1)?,
        account: r.get(2)?,
        conversation: r.get(3)?,
        text: r.get(4)?,
        state: r.get(5)?,
        attempts: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
        message_id: r.get(9)?,
        error: r.get(10)?,
        idempotency_key: r.get(11)?,
    })
}

/// A message marked `sending` in a pass, handed to its plugin once the pass is committed.
struct Handed {
    id: u64,
    created: i64,
    key: AccountKey,
    conversation: String,
    text: String,
    reply_to: Option<String>,
    extra: Option<String>,
    attempts: u32,
    channel: Arc<Channel>,
}

/// Whether an account's messages may go now, as a pass sees it.
#[derive(Clone)]
enum Turn {
    /// Its channel is not loaded: they wait.
    Unloaded,
    /// The account is no longer configured: they fail.
    Removed,
    /// Not running, or disconnected: they wait.
    NotReady,
    /// Running and connected: through this channel.
    Ready(Arc<Channel>),
}

impl Outbox {
    /// Opens the outbox in `journal`'s database (its schema is the journal's) and queues again
    /// every message that was being sent when the last daemon stopped.
    pub fn open(
        journal: &Journal,
        settings: OutboxConfig,
        supervisor: Supervisor,
    ) -> Result<Arc<Self>, OutboxError> {
        let path = journal.path().to_owned();
        let db = |e: rusqlite::Error| OutboxError::Database {
            path: path.clone(),
            reason: e.to_string(),
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        let sync = match journal.settings().sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync).map_err(db)?;
        let resent = conn
            .execute(
                "UPDATE outbox SET state = 'queued' WHERE state = 'sending'",
                [],
            )
            .map_err(db)?;
        if resent > 0 {
            tracing::warn!(
                messages = resent,
                "outbox: messages that were being sent when channeld stopped are sent again \
                 (at least once: the channel may already have them)"
            );
        }
        let heads = Heads::load(&conn).map_err(db)?;
        let counters = Counters::default();
        counters
            .resent_after_restart
            .store(resent as u64, Ordering::Relaxed);
        Ok(Arc::new(Self {
            path,
            settings,
            store: Mutex::new(Store {
                conn,
                heads,
                stale: false,
            }),
            supervisor,
            wake: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            counters,
            pending: Mutex::new(Vec::new()),
            outcomes: Mutex::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            bridged_through: AtomicU64::new(0),
        }))
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &OutboxConfig {
        &self.settings
    }

    fn db<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, OutboxError> {
        let store = lock(&self.store);
        f(&store.conn).map_err(|e| OutboxError::Database {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// Checks `message`, makes it durable and wakes the sender. Blocking (a SQLite commit,
    /// shared with the messages submitted at the same time): call it from a blocking thread.
    pub fn submit(&self, mut message: NewMessage) -> Result<Accepted, OutboxError> {
        message.account = channeld_plugin_abi::normalize_account_id(&message.account);
        let key = AccountKey::new(&message.channel, &message.account);
        for (name, value) in [
            ("channel", &message.channel),
            ("conversation", &message.conversation),
        ] {
            if value.trim().is_empty() {
                return Err(OutboxError::Invalid(format!("{key}: {name} is empty")));
            }
        }
        if message.idempotency_key.as_deref() == Some("") {
            return Err(OutboxError::Invalid(format!(
                "{key}: idempotency_key is empty"
            )));
        }
        let extra = match &message.extra {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(Value::Object(o.clone()).to_string()),
            Some(other) => {
                return Err(OutboxError::Invalid(format!(
                    "{key}: extra must be a JSON object, got {other}"
                )));
            }
        };
        match self.supervisor.channel(&message.channel) {
            Err(_) => {
                return Err(OutboxError::Unknown(format!(
                    "unknown channel {:?}",
                    message.channel
                )));
            }
            Ok(channel) if !channel.accounts.contains(&message.account) => {
                return Err(OutboxError::Unknown(format!("unknown account {key}")));
            }
            Ok(_) => {}
        }
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        lock(&self.pending).push(Pending {
            message,
            extra,
            now: now_ms(),
            answer,
        });
        self.commit_pending();
        let accepted = answered.recv().map_err(|_| OutboxError::Database {
            path: self.path.clone(),
            reason: "the commit was abandoned".to_owned(),
        })??;
        let counters = &self.counters;
        match accepted {
            Ok(accepted) => {
                if accepted.duplicate {
                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    self.wake.notify_one();
                }
                Ok(accepted)
            }
            Err((queued, which, max)) => {
                counters.refused_full.fetch_add(1, Ordering::Relaxed);
                Err(OutboxError::Full {
                    key,
                    queued,
                    which,
                    max,
                })
            }
        }
    }

    /// The group commit: whoever holds the connection commits every message waiting, in one
    /// transaction, and answers each; a caller whose message an earlier holder committed finds
    /// nothing left and just reads its answer.
    fn commit_pending(&self) {
        let mut store = lock(&self.store);
        let batch = std::mem::take(&mut *lock(&self.pending));
        if batch.is_empty() {
            return;
        }
        let settings = &self.settings;
        let fresh = store.fresh();
        let Store { conn, heads, .. } = &mut *store;
        let committed = fresh.and_then(|()| {
            let tx = conn.unchecked_transaction()?;
            let mut added = Added::default();
            let admissions = batch
                .iter()
                .map(|p| admit(&tx, settings, heads, &mut added, p))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mark = self.bridged_through.load(Ordering::Relaxed);
            if mark > 0 {
                write_mark(&tx, mark)?;
            }
            tx.commit()?;
            Ok::<_, rusqlite::Error>(admissions)
        });
        if let Ok(admissions) = &committed {
            for (p, admission) in batch.iter().zip(admissions) {
                if let Ok(Accepted {
                    id,
                    duplicate: false,
                }) = *admission
                {
                    heads.push(
                        Conversation {
                            key: AccountKey::new(&p.message.channel, &p.message.account),
                            conversation: p.message.conversation.clone(),
                        },
                        Open {
                            id,
                            created_ms: p.now,
                            next_ms: p.now,
                            sending: false,
                        },
                    );
                }
            }
        }
        drop(store);
        match committed {
            Ok(admissions) => {
                for (p, admission) in batch.into_iter().zip(admissions) {
                    let _ = p.answer.send(Ok(admission));
                }
            }
            Err(e) => {
                for p in batch {
                    let _ = p.answer.send(Err(OutboxError::Database {
                        path: self.path.clone(),
                        reason: e.to_string(),
                    }));
                }
            }
        }
    }

    /// Notes that every journal message up to `seq` has been routed through the gateways; the
    /// next group commit writes it (a mark written late only means more messages routed again,
    /// idempotently, at the next start).
    pub(crate) fn note_bridged_through(&self, seq: u64) {
        self.bridged_through.fetch_max(seq, Ordering::Relaxed);
    }

    /// The gateways' bridging mark as written. Blocking.
    pub(crate) fn bridged_through(&self) -> Result<u64, OutboxError> {
        self.db(|conn| crate::journal::schema::meta(conn, crate::journal::schema::BRIDGED_THROUGH))
    }

    /// Writes the gateways' bridging mark now (it never goes back). Blocking.
    pub(crate) fn write_bridged_through(&self, seq: u64) -> Result<(), OutboxError> {
        self.note_bridged_through(seq);
        self.db(|conn| write_mark(conn, seq))
    }

    /// One message. Blocking.
    pub fn get(&self, id: u64) -> Result<MessageStatus, OutboxError> {
        self.db(|conn| {
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM outbox WHERE id = ?1"))?
                .query_row([id as i64], status_row)
                .optional()
        })?
        .ok_or(OutboxError::NotFound(id))
    }

    /// Messages, newest first, optionally only those in `state`; at most `limit`. Blocking.
    pub fn list(
        &self,
        state: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MessageStatus>, OutboxError> {
        self.db(|conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE ?1 IS NULL OR state = ?1 \
                 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = statement.query_map(params![state, limit as i64], status_row)?;
            rows.collect()
        })
    }

    /// Cancels a queued message. Blocking.
    pub fn cancel(&self, id: u64) -> Result<MessageStatus, OutboxError> {
        let changed = {
            let mut store = lock(&self.store);
            let changed = store
                .conn
                .prepare_cached(
                    "UPDATE outbox SET state = 'cancelled', updated_ms = ?2 \
                     WHERE id = ?1 AND state = 'queued'",
                )
                .and_then(|mut s| s.execute(params![id as i64, now_ms()]))
                .map_err(|e| OutboxError::Database {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })?;
            if changed == 1 {
                store.heads.remove(id);
            }
            changed
        };
        let status = self.get(id)?;
        if changed == 0 {
            return Err(OutboxError::NotCancellable {
                id,
                state: status.state,
            });
        }
        // The next message of its conversation may go now.
        self.wake.notify_one();
        Ok(status)
    }

    /// Counts a message a gateway bridged.
    pub fn count_bridged(&self) {
        self.counters.bridged.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message a gateway did not bridge because it reached the hop limit.
    pub fn count_hop_limit_stop(&self) {
        self.counters
            .hop_limit_stops
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a bridged copy refused for a transient reason, now held for a retry.
    pub(crate) fn count_bridge_refused(&self) {
        self.counters.bridge_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a retry of a held copy.
    pub(crate) fn count_bridge_retry(&self) {
        self.counters.bridge_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a bridged copy let go without being queued.
    pub(crate) fn count_bridge_dropped(&self) {
        self.counters.bridge_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// How many copies the gateways hold for a retry now.
    pub(crate) fn set_bridge_held(&self, n: usize) {
        self.counters.bridge_held.store(n as u64, Ordering::Relaxed);
    }

    /// How many messages the outbox holds in each state (every state of [`state`], 0 when
    /// none; finished messages count until they are pruned). Blocking.
    pub fn counts_by_state(&self) -> Result<Vec<(&'static str, i64)>, OutboxError> {
        let held = self.db(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT state, count(*) FROM outbox GROUP BY state")?;
            let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<(String, i64)>>>()
        })?;
        Ok([
            state::QUEUED,
            state::SENDING,
            state::SENT,
            state::FAILED,
            state::CANCELLED,
        ]
        .into_iter()
        .map(|s| {
            let n = held.iter().find(|(h, _)| h == s).map_or(0, |(_, n)| *n);
            (s, n)
        })
        .collect())
    }

    /// The outbox's figures, as JSON.
    pub fn stats(&self) -> Value {
        let c = &self.counters;
        let waiting = lock(&self.store).heads.total();
        serde_json::json!({
            "waiting": waiting,
            "inFlight": self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len(),
            "accepted": c.accepted.load(Ordering::Relaxed),
            "duplicates": c.duplicates.load(Ordering::Relaxed),
            "refusedFull": c.refused_full.load(Ordering::Relaxed),
            "attempts": c.attempts.load(Ordering::Relaxed),
            "retries": c.retries.load(Ordering::Relaxed),
            "sent": c.sent.load(Ordering::Relaxed),
            "failed": c.failed.load(Ordering::Relaxed),
            "resentAfterRestart": c.resent_after_restart.load(Ordering::Relaxed),
            "bridged": c.bridged.load(Ordering::Relaxed),
            "hopLimitStops": c.hop_limit_stops.load(Ordering::Relaxed),
            "bridgeHeld": c.bridge_held.load(Ordering::Relaxed),
            "bridgeRefused": c.bridge_refused.load(Ordering::Relaxed),
            "bridgeRetries": c.bridge_retries.load(Ordering::Relaxed),
            "bridgeDropped": c.bridge_dropped.load(Ordering::Relaxed),
        })
    }

    /// The sender: hands every message whose turn it is to its plugin, until `stop` fires.
    /// Sends run as tasks `tasks` tracks.
    ///
    /// # Cancellation safety
    /// Dropping it stops handing over new messages; sends already handed over finish in their
    /// own tasks and record their outcome (those that ended before are recorded by a task
    /// `tasks` tracks).
    pub async fn run(self: Arc<Self>, stop: CancellationToken, tasks: TaskTracker) {
        let _stopped = Stopped {
            outbox: self.clone(),
            tasks: tasks.clone(),
        };
        let mut last_prune = 0i64;
        loop {
            let wake = self.wake.notified();
            let this = self.clone();
            let tasks2 = tasks.clone();
            let now = now_ms();
            let prune = now - last_prune > 60_000;
            if prune {
                last_prune = now;
            }
            let next = tokio::task::spawn_blocking(move || this.pump(&tasks2, prune))
                .await
                .unwrap_or(None);
            let poll = self.settings.poll_interval;
            let wait = next.map_or(poll, |at| {
                Duration::from_millis((at - now_ms()).max(0) as u64).min(poll)
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = wake => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass, one transaction: records the outcomes of the sends that ended since the last
    /// pass, then marks `sending` what may go now and, once that is committed, hands it over.
    /// Returns when the next retry is due, if any.
    fn pump(self: &Arc<Self>, tasks: &TaskTracker, prune: bool) -> Option<i64> {
        let now = now_ms();
        let mut store = lock(&self.store);
        if let Err(e) = store.fresh() {
            tracing::error!("outbox {}: {e}", self.path.display());
            return None;
        }
        let outcomes = std::mem::take(&mut *lock(&self.outcomes));
        let mut in_flight = lock(&self.in_flight);
        for o in &outcomes {
            in_flight.remove(&o.id);
        }
        let mut effects = Effects::default();
        let mut handed = Vec::new();
        let mut early = Vec::new();
        let mut next: Option<i64> = None;
        let deadline = self.settings.deadline.as_millis() as i64;
        // Whether each account's messages may go, decided once per pass.
        let mut turns: HashMap<AccountKey, Turn> = HashMap::new();
        let Store { conn, heads, stale } = &mut *store;
        let pass = (|| {
            let tx = conn.unchecked_transaction()?;
            if prune {
                let retain = self.settings.retain.as_millis() as i64;
                tx.execute(
                    "DELETE FROM outbox WHERE state IN ('sent', 'failed', 'cancelled') \
                     AND updated_ms < ?1",
                    [now - retain],
                )?;
            }
            for outcome in &outcomes {
                self.record(&tx, heads, outcome, &mut effects)?;
            }
            let fronts: Vec<Arc<Conversation>> = heads.fronts().map(|(_, c)| c.clone()).collect();
            'conversations: for conversation in fronts {
                // Its head, and the next one whenever the head is failed here.
                while let Some(head) = heads.front(&conversation) {
                    let id = head.id;
                    let key = &conversation.key;
                    if in_flight.contains(&id) {
                        if let Some(Turn::Ready(_)) = turns.get(key) {
                            mark_ahead(&tx, heads, &conversation, now, deadline)?;
                        } else if !turns.contains_key(key) {
                            let turn = self.turn(key);
                            if let Turn::Ready(_) = turn {
                                mark_ahead(&tx, heads, &conversation, now, deadline)?;
                            }
                            turns.insert(key.clone(), turn);
                        }
                        break;
                    }
                    let turn = match turns.get(key) {
                        Some(turn) => turn.clone(),
                        None => {
                            let turn = self.turn(key);
                            turns.insert(key.clone(), turn.clone());
                            turn
                        }
                    };
                    match turn {
                        // Not loaded (yet, or its file is being replaced): it waits.
                        Turn::Unloaded => break,
                        Turn::Removed => {
                            fail(&tx, id, "account removed", now)?;
                            heads.remove(id);
                            effects.failed += 1;
                            continue;
                        }
                        Turn::NotReady | Turn::Ready(_) => {}
                    }
                    if now >= head.created_ms + deadline {
                        let last = last_error(&tx, id)?;
                        let why = match last {
                            Some(e) => format!("not sent within the deadline; last error: {e}"),
                            None => {
                                "not sent within the deadline (the account was not ready)".into()
                            }
                        };
                        fail(&tx, id, &why, now)?;
                        heads.remove(id);
                        effects.failed += 1;
                        continue;
                    }
                    let Turn::Ready(channel) = turn else {
                        if head.sending {
                            // Marked ahead, but its account is not ready: queued again.
                            unmark(&tx, id, now)?;
                            heads.set_sending(id, false);
                        }
                        break;
                    };
                    if head.next_ms > now {
                        next = Some(next.map_or(head.next_ms, |n: i64| n.min(head.next_ms)));
                        break;
                    }
                    if (in_flight.len() + handed.len() + early.len()) as u64
                        >= self.settings.max_in_flight
                    {
                        break 'conversations;
                    }
                    if head.sending {
                        // Marked ahead by an earlier, committed pass: it goes now, while this
                        // pass writes.
                        let row = tx
                            .prepare_cached(
                                "SELECT text, reply_to, extra, attempts FROM outbox \
                                 WHERE id = ?1 AND state = 'sending'",
                            )?
                            .query_row([id as i64], |r| {
                                handed_row(r, id, head.created_ms, &conversation, &channel)
                            })
                            .optional()?;
                        early.extend(row);
                    } else {
                        let taken = tx
                            .prepare_cached(
                                "UPDATE outbox SET state = 'sending', updated_ms = ?2 \
                                 WHERE id = ?1 AND state = 'queued' \
                                 RETURNING text, reply_to, extra, attempts",
                            )?
                            .query_row(params![id as i64, now], |r| {
                                handed_row(r, id, head.created_ms, &conversation, &channel)
                            })
                            .optional()?;
                        if taken.is_none() {
                            break;
                        }
                        heads.set_sending(id, true);
                        handed.extend(taken);
                    }
                    mark_ahead(&tx, heads, &conversation, now, deadline)?;
                    break;
                }
            }
            // Already durably `sending`: handed over while the pass commits.
            for message in early.drain(..) {
                self.hand(tasks, &mut in_flight, message, now);
            }
            tx.commit()
        })();
        if let Err(e) = pass {
            // Nothing of the pass happened: its outcomes are recorded by the next one, which
            // first reads the unfinished messages again.
            tracing::error!("outbox {}: {e}", self.path.display());
            *stale = true;
            for o in &outcomes {
                in_flight.insert(o.id);
            }
            lock(&self.outcomes).extend(outcomes);
            return None;
        }
        // Sends that ended while the pass committed: the message marked ahead behind each (now
        // durably `sending`) goes at once; their outcomes are recorded by the next pass.
        let ended: Vec<u64> = lock(&self.outcomes)
            .iter()
            .filter(|o| o.result.is_ok())
            .map(|o| o.id)
            .collect();
        for id in ended {
            if (in_flight.len() + handed.len()) as u64 >= self.settings.max_in_flight {
                break;
            }
            let Some(conversation) = heads.conversation_of(id).cloned() else {
                continue;
            };
            let (Some(Turn::Ready(channel)), Some(head), Some(behind)) = (
                turns.get(&conversation.key),
                heads.front(&conversation),
                heads.second(&conversation),
            ) else {
                continue;
            };
            if head.id != id
                || !behind.sending
                || in_flight.contains(&behind.id)
                || behind.next_ms > now
                || now >= behind.created_ms + deadline
            {
                continue;
            }
            let row = conn
                .prepare_cached(
                    "SELECT text, reply_to, extra, attempts FROM outbox \
                     WHERE id = ?1 AND state = 'sending'",
                )
                .and_then(|mut s| {
                    s.query_row([behind.id as i64], |r| {
                        handed_row(r, behind.id, behind.created_ms, &conversation, channel)
                    })
                    .optional()
                });
            match row {
                Ok(row) => handed.extend(row),
                Err(e) => {
                    tracing::error!("outbox {}: {e}", self.path.display());
                    break;
                }
            }
        }
        drop(store);
        let c = &self.counters;
        c.sent.fetch_add(effects.sent, Ordering::Relaxed);
        c.failed.fetch_add(effects.failed, Ordering::Relaxed);
        c.retries.fetch_add(effects.retries, Ordering::Relaxed);
        for _ in 0..effects.sent {
            crate::metrics::record_outbound_message();
        }
        for _ in 0..effects.send_failures {
            crate::metrics::record_send_failure();
        }
        // Durably `sending` now: hand them over.
        for message in handed {
            self.hand(tasks, &mut in_flight, message, now);
        }
        next
    }

    /// Hands a durably `sending` message to its plugin; its outcome goes to the next pass.
    fn hand(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        in_flight: &mut HashSet<u64>,
        message: Handed,
        now: i64,
    ) {
        let Handed {
            id,
            created,
            key,
            conversation,
            text,
            reply_to,
            extra,
            attempts,
            channel,
        } = message;
        in_flight.insert(id);
        self.counters.attempts.fetch_add(1, Ordering::Relaxed);
        let send = channel.plugin.send(Outbound {
            account: key.account.into_string(),
            conversation,
            text,
            reply_to,
            extra,
        });
        let this = self.clone();
        let attempts = attempts + 1;
        let deadline = self.settings.deadline.as_millis() as i64;
        let limit = Duration::from_millis((created + deadline - now).max(1) as u64);
        tasks.spawn(async move {
            let result = match tokio::time::timeout(limit, send).await {
                Ok(Ok(message_id)) => Ok(message_id),
                Ok(Err(e)) => Err(e.message),
                Err(_) => Err(TIMED_OUT.into()),
            };
            let outcome = Outcome {
                id,
                attempts,
                created,
                result,
                at: now_ms(),
            };
            lock(&this.outcomes).push(outcome);
            if this.stopped.load(Ordering::SeqCst) {
                // No pass will come: record it now.
                tokio::task::spawn_blocking(move || this.flush()).await.ok();
            } else {
                this.wake.notify_one();
            }
        });
    }

    /// Whether `key`'s messages may be handed over now.
    fn turn(&self, key: &AccountKey) -> Turn {
        let Ok(channel) = self.supervisor.channel(&key.channel) else {
            return Turn::Unloaded;
        };
        if !channel.accounts.contains(&key.account) {
            return Turn::Removed;
        }
        let ready = self
            .supervisor
            .board()
            .get(key)
            .is_some_and(|s| s.running && s.connected != Some(false));
        if ready {
            Turn::Ready(channel)
        } else {
            Turn::NotReady
        }
    }

    /// Records the outcomes of sends that ended and no pass has recorded (the sender has
    /// stopped). Blocking.
    fn flush(&self) {
        let outcomes = std::mem::take(&mut *lock(&self.outcomes));
        if outcomes.is_empty() {
            return;
        }
        let mut effects = Effects::default();
        let mut store = lock(&self.store);
        let Store { conn, heads, stale } = &mut *store;
        let recorded = (|| {
            let tx = conn.unchecked_transaction()?;
            for outcome in &outcomes {
                self.record(&tx, heads, outcome, &mut effects)?;
            }
            tx.commit()
        })();
        if recorded.is_err() {
            *stale = true;
        }
        drop(store);
        match recorded {
            Ok(()) => {
                let c = &self.counters;
                c.sent.fetch_add(effects.sent, Ordering::Relaxed);
                c.failed.fetch_add(effects.failed, Ordering::Relaxed);
                c.retries.fetch_add(effects.retries, Ordering::Relaxed);
                let mut in_flight = lock(&self.in_flight);
                for o in &outcomes {
                    in_flight.remove(&o.id);
                }
            }
            // Left `sending`: sent again after the restart, and counted.
            Err(e) => tracing::error!("outbox {}: {e}", self.path.display()),
        }
    }

    /// Writes a send's outcome inside the pass's transaction, and into `heads` (which the
    /// caller reads again from the database if the transaction fails).
    fn record(
        &self,
        tx: &Connection,
        heads: &mut Heads,
        outcome: &Outcome,
        effects: &mut Effects,
    ) -> rusqlite::Result<()> {
        let Outcome {
            id,
            attempts,
            created,
            at,
            ..
        } = *outcome;
        match &outcome.result {
            Ok(message_id) => {
                effects.sent += 1;
                finish_with(tx, id, state::SENT, attempts, Some(message_id), None, at)?;
                heads.remove(id);
            }
            Err(error) => {
                effects.send_failures += 1;
                let next = at + self.settings.backoff(attempts).as_millis() as i64;
                if next >= created + self.settings.deadline.as_millis() as i64 {
                    // An attempt the deadline cut short keeps the plugin's last error in view.
                    let last = last_error(tx, id)?;
                    let error = match last {
                        Some(last) if error == TIMED_OUT => format!("{last} ({error})"),
                        _ => error.clone(),
                    };
                    tracing::warn!(id, attempts, %error, "outbox: send failed; giving up");
                    effects.failed += 1;
                    finish_with(tx, id, state::FAILED, attempts, None, Some(&error), at)?;
                    heads.remove(id);
                } else {
                    tracing::debug!(id, attempts, %error, "outbox: send failed; will retry");
                    effects.retries += 1;
                    tx.prepare_cached(
                        "UPDATE outbox SET state = 'queued', attempts = ?2, error = ?3, \
                         updated_ms = ?4, next_ms = ?5 WHERE id = ?1",
                    )?
                    .execute(params![id as i64, attempts, error, at, next])?;
                    heads.retry_at(id, next);
                    // The one marked ahead behind it waits: queued again.
                    if let Some(behind) = heads
                        .conversation_of(id)
                        .cloned()
                        .and_then(|c| heads.second(&c))
                        .filter(|b| b.sending)
                    {
                        unmark(tx, behind.id, at)?;
                        heads.set_sending(behind.id, false);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Set when the sender stops: sends ending later record their own outcome, and those that ended
/// before it are recorded by a tracked task.
struct Stopped {
    outbox: Arc<Outbox>,
    tasks: TaskTracker,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.outbox.stopped.store(true, Ordering::SeqCst);
        let outbox = self.outbox.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tasks.spawn(async move {
                tokio::task::spawn_blocking(move || outbox.flush())
                    .await
                    .ok();
            });
        } else {
            outbox.flush();
        }
    }
}

/// Marks `sending` ahead the message behind `conversation`'s head (which is being handed over,
/// or is in flight), so that it can go as soon as the head is sent.
fn mark_ahead(
    tx: &Connection,
    heads: &mut Heads,
    conversation: &Conversation,
    now: i64,
    deadline: i64,
) -> rusqlite::Result<()> {
    if let Some(behind) = heads.second(conversation)
        && !behind.sending
        && behind.next_ms <= now
        && now < behind.created_ms + deadline
    {
        let marked = tx
            .prepare_cached(
                "UPDATE outbox SET state = 'sending', updated_ms = ?2 \
                 WHERE id = ?1 AND state = 'queued'",
            )?
            .execute(params![behind.id as i64, now])?;
        if marked == 1 {
            heads.set_sending(behind.id, true);
        }
    }
    Ok(())
}

/// Puts a message marked `sending` ahead back to `queued`.
fn unmark(tx: &Connection, id: u64, now: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE outbox SET state = 'queued', updated_ms = ?2 WHERE id = ?1 AND state = 'sending'",
    )?
    .execute(params![id as i64, now])?;
    Ok(())
}

/// A message to hand over, from its row (`text, reply_to, extra, attempts`).
fn handed_row(
    r: &rusqlite::Row<'_>,
    id: u64,
    created: i64,
    conversation: &Conversation,
    channel: &Arc<Channel>,
) -> rusqlite::Result<Handed> {
    Ok(Handed {
        id,
        created,
        key: conversation.key.clone(),
        conversation: conversation.conversation.clone(),
        text: r.get(0)?,
        reply_to: r.get(1)?,
        extra: r.get(2)?,
        attempts: r.get(3)?,
        channel: channel.clone(),
    })
}

/// Marks a message failed with `why`, keeping its attempts.
/// The error the message's last attempt recorded, if any.
fn last_error(tx: &Connection, id: u64) -> rusqlite::Result<Option<String>> {
    Ok(tx
        .prepare_cached("SELECT error FROM outbox WHERE id = ?1")?
        .query_row([id as i64], |r| r.get(0))
        .optional()?
        .flatten())
}

fn fail(tx: &Connection, id: u64, why: &str, now: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE outbox SET state = 'failed', error = ?2, updated_ms = ?3 WHERE id = ?1",
    )?
    .execute(params![id as i64, why, now])?;
    Ok(())
}

fn finish_with(
    tx: &Connection,
    id: u64,
    to: &str,
    attempts: u32,
    message_id: Option<&str>,
    error: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE outbox SET state = ?2, attempts = ?3, message_id = ?4, \
         error = coalesce(?5, error), updated_ms = ?6 WHERE id = ?1",
    )?
    .execute(params![id as i64, to, attempts, message_id, error, now])?;
    Ok(())
}

/// Raises the gateways' bridging mark to `seq` (never lowers it).
fn write_mark(conn: &Connection, seq: u64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE meta SET value = ?2 WHERE key = ?1 AND value < ?2")?
        .execute(params![crate::journal::schema::BRIDGED_THROUGH, seq as i64])?;
    Ok(())
}

/// Messages a group commit has admitted so far, not yet in [`Heads`] (they go there once it is
/// committed).
#[derive(Default)]
struct Added {
    per_account: std::collections::HashMap<AccountKey, u64>,
    total: u64,
}

/// Decides one message of a group commit inside its transaction: the first message's id for a
/// known idempotency key, a refusal at a cap, or the new row. The caps count the unfinished
/// messages in `heads` and those this commit `added` before.
fn admit(
    tx: &Connection,
    settings: &OutboxConfig,
    heads: &Heads,
    added: &mut Added,
    p: &Pending,
) -> rusqlite::Result<Admission> {
    let message = &p.message;
    if let Some(k) = &message.idempotency_key {
        let found: Option<i64> = tx
            .prepare_cached(
                "SELECT id FROM outbox WHERE channel = ?1 AND account = ?2 \
                 AND idempotency_key = ?3",
            )?
            .query_row(params![message.channel, message.account, k], |r| r.get(0))
            .optional()?;
        if let Some(id) = found {
            return Ok(Ok(Accepted {
                id: id as u64,
                duplicate: true,
            }));
        }
    }
    let key = AccountKey::new(&message.channel, &message.account);
    let before = added.per_account.get(&key).copied().unwrap_or(0);
    let waiting = heads.waiting(&key) + before;
    if waiting >= settings.max_queued_per_account {
        return Ok(Err((
            waiting,
            "max_queued_per_account",
            settings.max_queued_per_account,
        )));
    }
    let all = heads.total() + added.total;
    if all >= settings.max_queued {
        return Ok(Err((all, "max_queued", settings.max_queued)));
    }
    tx.prepare_cached(
        "INSERT INTO outbox (channel, account, conversation, text, reply_to, extra, \
         idempotency_key, state, created_ms, updated_ms, next_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?8, ?8)",
    )?
    .execute(params![
        message.channel,
        message.account,
        message.conversation,
        message.text,
        message.reply_to,
        p.extra,
        message.idempotency_key,
        p.now
    ])?;
    added.per_account.insert(key, before + 1);
    added.total += 1;
    Ok(Ok(Accepted {
        id: tx.last_insert_rowid() as u64,
        duplicate: false,
    }))
}

/// A reload removed an account: wake the sender, whose next pass fails that account's queued
/// messages with "account removed" (the account is no longer in its channel's list).
impl crate::reload::AccountRemoved for Outbox {
    fn account_removed(&self, key: &AccountKey) {
        tracing::debug!(account = %key, "account removed: its queued messages will fail");
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests;
