//! The status board: every account's live snapshot, and the sink for host-service calls. It owns
//! each account's current task generation, so calls from a task the host has given up on are
//! dropped and counted instead of corrupting the replacement's status.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use channeld_plugin_abi::abi::{EventKind, InboundMessage};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::{
    clock::Clock,
    host::{AccountKey, HostSink},
    inbound::MessageSink,
};

/// One account's snapshot, as users see it (`GET /status`, `channeld status --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountSnapshot {
    /// The normalised account id.
    pub account_id: String,
    /// Enabled in the config.
    pub enabled: bool,
    /// Has what it needs to start.
    pub configured: bool,
    /// A task is running (or stuck: see `lastError`).
    pub running: bool,
    /// The plugin's connection report, once it made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// An automatic restart is scheduled.
    pub restart_pending: bool,
    /// Restart attempts in the current crash loop.
    pub reconnect_attempts: u32,
    /// Last start, ms since the epoch.
    pub last_start_at: Option<i64>,
    /// Last stop.
    pub last_stop_at: Option<i64>,
    /// Why the account is not running, or what its last run ended with.
    pub last_error: Option<String>,
    /// Last time the plugin reported connected.
    pub last_connected_at: Option<i64>,
    /// Last traffic of any kind.
    pub last_event_at: Option<i64>,
    /// Last inbound traffic.
    pub last_inbound_at: Option<i64>,
    /// Last outbound traffic.
    pub last_outbound_at: Option<i64>,
    /// The plugin's mode (e.g. `webhook`, `socket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Runs are active.
    pub busy: bool,
    /// How many.
    pub active_runs: u32,
    /// Last change of `activeRuns`.
    pub last_run_activity_at: Option<i64>,
    /// Inbound messages delivered by this account since the host started.
    pub inbound_messages: u64,
    /// The plugin has reported event liveness at least once.
    pub reports_events: bool,
    /// The health monitor's last verdict on the account (`ok`, `disconnected`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_verdict: Option<String>,
    /// When the health monitor last restarted the account, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_restart_at: Option<i64>,
    /// The plugin's own fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Keys of the snapshot that only the host sets; a plugin's status patch may not contain them.
pub const HOST_OWNED_KEYS: &[&str] = &[
    "accountId",
    "enabled",
    "configured",
    "running",
    "restartPending",
    "reconnectAttempts",
    "lastStartAt",
    "lastStopAt",
    "lastError",
    "inboundMessages",
    "reportsEvents",
    "healthVerdict",
    "healthRestartAt",
];

/// Monotonic times of an account's run, for the health monitor (tokio's clock, so tests can pause
/// it; the snapshot's wall-clock fields are for display only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Liveness {
    /// When the current run started.
    pub started_at: Option<Instant>,
    /// Last traffic.
    pub last_event_at: Option<Instant>,
    /// Last change of the active runs.
    pub last_run_activity_at: Option<Instant>,
}

struct Entry {
    generation: u64,
    snapshot: AccountSnapshot,
    liveness: Liveness,
}

/// Every account's status. Cheap to share (`Arc`); its lock is held only for field updates.
pub struct StatusBoard {
    entries: Mutex<HashMap<AccountKey, Entry>>,
    clock: Arc<dyn Clock>,
    next_generation: AtomicU64,
    stale_calls: AtomicU64,
    messages: OnceLock<Arc<dyn MessageSink>>,
}

impl StatusBoard {
    /// An empty board.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            clock,
            next_generation: AtomicU64::new(1),
            stale_calls: AtomicU64::new(0),
            messages: OnceLock::new(),
        }
    }

    /// Sends every delivered message to `sink` (the journal) from now on; without one, messages
    /// are only counted. Set once; a second call is ignored.
    pub fn set_message_sink(&self, sink: Arc<dyn MessageSink>) {
        let _ = self.messages.set(sink);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AccountKey, Entry>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new task generation for `key`: handles of earlier generations become stale.
    pub fn begin_generation(&self, key: &AccountKey) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.lock();
        let entry = entries.entry(key.clone()).or_insert_with(|| new_entry(key));
        entry.generation = generation;
        generation
    }

    /// Makes every handle of `key` stale (the host gave up on its task).
    pub fn retire_generation(&self, key: &AccountKey) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = self.lock().get_mut(key) {
            entry.generation = generation;
        }
    }

    /// Applies `f` to `key`'s snapshot (creating it if needed) and returns the result.
    pub fn update(&self, key: &AccountKey, f: impl FnOnce(&mut AccountSnapshot)) {
        let mut entries = self.lock();
        // Look up before `entry`: the common case (the account exists) allocates no key.
        match entries.get_mut(key) {
            Some(entry) => f(&mut entry.snapshot),
            None => f(&mut entries
                .entry(key.clone())
                .or_insert_with(|| new_entry(key))
                .snapshot),
        }
    }

    /// The snapshots of `keys`, read under one lock (`None` for an account never written).
    pub fn get_many<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k AccountKey>,
    ) -> Vec<Option<AccountSnapshot>> {
        let entries = self.lock();
        keys.into_iter()
            .map(|k| entries.get(k).map(|e| e.snapshot.clone()))
            .collect()
    }

    /// Marks the start of a run: stamps `lastStartAt` and the monotonic start the health monitor
    /// measures from.
    pub fn mark_started(&self, key: &AccountKey) {
        let (now, wall) = (self.clock.now(), self.clock.wall_ms());
        let mut entries = self.lock();
        let entry = entries.entry(key.clone()).or_insert_with(|| new_entry(key));
        entry.liveness.started_at = Some(now);
        entry.snapshot.last_start_at = Some(wall);
    }

    /// `key`'s snapshot and run times together (one lock).
    pub fn get_with_liveness(&self, key: &AccountKey) -> Option<(AccountSnapshot, Liveness)> {
        self.lock()
            .get(key)
            .map(|e| (e.snapshot.clone(), e.liveness))
    }

    /// `key`'s snapshot.
    pub fn get(&self, key: &AccountKey) -> Option<AccountSnapshot> {
        self.lock().get(key).map(|e| e.snapshot.clone())
    }

    /// Host-service calls dropped because they came from a stale generation.
    pub fn stale_calls(&self) -> u64 {
        self.stale_calls.load(Ordering::Relaxed)
    }

    /// Runs `f` on `key`'s snapshot if `generation` is current; counts the call otherwise and
    /// returns `stale()` (built only then: this is the hot path of every message).
    fn if_current<T>(
        &self,
        key: &AccountKey,
        generation: u64,
        stale: impl FnOnce() -> T,
        f: impl FnOnce(&mut AccountSnapshot, &mut Liveness, Stamp) -> T,
    ) -> T {
        let now = Stamp {
            wall: self.clock.wall_ms(),
            mono: self.clock.now(),
        };
        let mut entries = self.lock();
        match entries.get_mut(key) {
            Some(entry) if entry.generation == generation => {
                f(&mut entry.snapshot, &mut entry.liveness, now)
            }
            _ => {
                drop(entries);
                self.stale_calls.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(account = %key, generation, "dropped a call from a stale task");
                stale()
            }
        }
    }
}

fn new_entry(key: &AccountKey) -> Entry {
    Entry {
        generation: 0,
        liveness: Liveness::default(),
        snapshot: AccountSnapshot {
            account_id: key.account.clone(),
            enabled: true,
            configured: true,
            ..AccountSnapshot::default()
        },
    }
}

fn stale_error(key: &AccountKey) -> String {
    format!("{key}: this task has been replaced; the call was dropped")
}

/// Stamps traffic. Only an explicit `record_event` opts the account into stale-socket checks
/// (`reportsEvents`): a delivered message is traffic too, but a quiet chat is not a dead socket.
/// Merges a plugin's status patch into the snapshot, key by key (no JSON round trip of the whole
/// snapshot under the board's lock): the plugin-settable typed fields are checked and set; every
/// other key is the plugin's own. Host-owned keys were refused before.
fn apply_patch(snapshot: &mut AccountSnapshot, patch: Map<String, Value>) -> Result<(), String> {
    fn typed<T: serde::de::DeserializeOwned>(key: &str, value: Value) -> Result<T, String> {
        serde_json::from_value(value).map_err(|e| format!("bad status patch for {key:?}: {e}"))
    }
    for (key, value) in patch {
        match key.as_str() {
            "connected" => snapshot.connected = typed(&key, value)?,
            "lastConnectedAt" => snapshot.last_connected_at = typed(&key, value)?,
            "lastEventAt" => snapshot.last_event_at = typed(&key, value)?,
            "lastInboundAt" => snapshot.last_inbound_at = typed(&key, value)?,
            "lastOutboundAt" => snapshot.last_outbound_at = typed(&key, value)?,
            "mode" => snapshot.mode = typed(&key, value)?,
            "busy" => snapshot.busy = typed(&key, value)?,
            "activeRuns" => snapshot.active_runs = typed(&key, value)?,
            "lastRunActivityAt" => snapshot.last_run_activity_at = typed(&key, value)?,
            _ => {
                snapshot.extra.insert(key, value);
            }
        }
    }
    Ok(())
}

/// The time of a host-service call, in both clocks.
#[derive(Clone, Copy)]
struct Stamp {
    wall: i64,
    mono: Instant,
}

fn mark_event(
    snapshot: &mut AccountSnapshot,
    liveness: &mut Liveness,
    kind: EventKind,
    now: Stamp,
) {
    snapshot.last_event_at = Some(now.wall);
    liveness.last_event_at = Some(now.mono);
    match kind {
        EventKind::Inbound => snapshot.last_inbound_at = Some(now.wall),
        EventKind::Outbound => snapshot.last_outbound_at = Some(now.wall),
        EventKind::Other => {}
    }
}

impl StatusBoard {
    /// Counts an inbound message that goes nowhere (no message sink set).
    fn count_inbound(&self, key: &AccountKey, generation: u64) -> Result<(), String> {
        self.if_current(
            key,
            generation,
            || Err(stale_error(key)),
            |snapshot, liveness, now| {
                snapshot.inbound_messages += 1;
                mark_event(snapshot, liveness, EventKind::Inbound, now);
                Ok(())
            },
        )
    }
}

impl HostSink for StatusBoard {
    fn is_current(&self, key: &AccountKey, generation: u64) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|e| e.generation == generation)
    }

    fn status_json(&self, key: &AccountKey) -> Value {
        self.get(key)
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null)
    }

    fn patch_status(
        &self,
        key: &AccountKey,
        generation: u64,
        patch: Map<String, Value>,
    ) -> Result<(), String> {
        if let Some(owned) = patch.keys().find(|k| HOST_OWNED_KEYS.contains(&k.as_str())) {
            return Err(format!("{key}: status key {owned:?} is owned by the host"));
        }
        self.if_current(
            key,
            generation,
            || Err(stale_error(key)),
            |snapshot, _, _| apply_patch(snapshot, patch).map_err(|e| format!("{key}: {e}")),
        )
    }

    fn set_connected(&self, key: &AccountKey, generation: u64, connected: bool) {
        self.if_current(
            key,
            generation,
            || (),
            |snapshot, _, now| {
                snapshot.connected = Some(connected);
                if connected {
                    snapshot.last_connected_at = Some(now.wall);
                }
            },
        );
    }

    fn record_event(&self, key: &AccountKey, generation: u64, kind: EventKind) {
        self.if_current(
            key,
            generation,
            || (),
            |snapshot, liveness, now| {
                snapshot.reports_events = true;
                mark_event(snapshot, liveness, kind, now)
            },
        );
    }

    fn set_busy(&self, key: &AccountKey, generation: u64, active_runs: u32) {
        self.if_current(
            key,
            generation,
            || (),
            |snapshot, liveness, now| {
                snapshot.active_runs = active_runs;
                snapshot.busy = active_runs > 0;
                snapshot.last_run_activity_at = Some(now.wall);
                liveness.last_run_activity_at = Some(now.mono);
            },
        );
    }

    fn deliver(
        &self,
        key: &AccountKey,
        generation: u64,
        message: InboundMessage,
    ) -> Result<(), String> {
        let Some(sink) = self.messages.get() else {
            return self.count_inbound(key, generation);
        };
        if !self.is_current(key, generation) {
            self.stale_calls.fetch_add(1, Ordering::Relaxed);
            return Err(stale_error(key));
        }
        // A 1.0 plugin's synchronous deliver: wait on this (the plugin's) thread until the
        // message is durable. The slow path; ABI 1.1's deliver_async awaits the same sink.
        let seq = crate::journal::wait::block_on(sink.accept(key, message))?;
        tracing::trace!(account = %key, seq, "inbound message journaled");
        // Counted even if the task was replaced meanwhile: the message is in the journal.
        self.update(key, |snapshot| snapshot.inbound_messages += 1);
        self.if_current(
            key,
            generation,
            || (),
            |snapshot, liveness, now| mark_event(snapshot, liveness, EventKind::Inbound, now),
        );
        Ok(())
    }
}
