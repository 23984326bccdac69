//! The status board: every account's live snapshot, and the sink for host-service calls. It owns
//! each account's current task generation, so calls from a task the host has given up on are
//! dropped and counted instead of corrupting the replacement's status.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use channeld_plugin_abi::abi::{EventKind, InboundMessage};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::{
    clock::Clock,
    events::state::{StatePublisher, derive},
    host::{AccountKey, HostSink},
    inbound::{CountingSink, MessageSink},
    plugin::BoxFuture,
};

/// An account's run state, as the supervisor (its one owner) decides it at each change. The older
/// flags of the snapshot (`running`, `restartPending`, …) are derived from it
/// ([`AccountSnapshot::set_state`]); docs/status.md lists every value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccountState {
    /// A boot is in flight: the plugin's start was (or is about to be) called, and the task has
    /// not been seen running yet (for an ABI 1.1 plugin: not polled yet).
    Starting,
    /// The task runs (ABI 1.1: its runtime polled it; ABI 1.0: the start returned it).
    Running,
    /// A stop is in progress.
    Stopping,
    /// Not running, and nothing is scheduled.
    #[default]
    Stopped,
    /// The task ended by itself; an automatic restart is scheduled after the backoff.
    RestartPending,
    /// The task ended too often: no more automatic restarts until a user starts it.
    GaveUp,
    /// The task (or the start it was booting with) would not end: it blocks a thread, and starts
    /// are refused until it ends.
    Stuck,
    /// Disabled by the config or the plugin.
    Disabled,
    /// The plugin says the account lacks what it needs to start.
    NotConfigured,
    /// A user logged it out; it stays stopped until started.
    LoggedOut,
}

impl AccountState {
    /// The word users see (`running`, `restart-pending`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::RestartPending => "restart-pending",
            Self::GaveUp => "gave-up",
            Self::Stuck => "stuck",
            Self::Disabled => "disabled",
            Self::NotConfigured => "not-configured",
            Self::LoggedOut => "logged-out",
        }
    }

    /// Whether a task of the account exists (the old `running` flag: running, being stopped, or
    /// stuck).
    pub fn has_task(self) -> bool {
        matches!(self, Self::Running | Self::Stopping | Self::Stuck)
    }
}

impl std::fmt::Display for AccountState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One account's snapshot, as users see it (`GET /status`, `channeld status --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountSnapshot {
    /// The normalised account id.
    pub account_id: String,
    /// The run state; the flags below are derived from it.
    #[serde(default)]
    pub state: AccountState,
    /// Enabled in the config.
    pub enabled: bool,
    /// Has what it needs to start.
    pub configured: bool,
    /// A task exists: derived from `state` (running, stopping or stuck).
    pub running: bool,
    /// The plugin's connection report, once it made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// An automatic restart is scheduled: derived from `state` (`restart-pending`).
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

impl AccountSnapshot {
    /// Sets the run state and the flags derived from it: `running`, `restartPending`, and
    /// `enabled` / `configured` for the states that say otherwise. When no task exists any more,
    /// the plugin's `connected` report is cleared (a stopped account is not connected). The
    /// board's [`StatusBoard::update`], through which the supervisor calls it, publishes the
    /// change to the event stream.
    pub fn set_state(&mut self, state: AccountState) {
        self.state = state;
        self.running = state.has_task();
        self.restart_pending = state == AccountState::RestartPending;
        match state {
            AccountState::Disabled => self.enabled = false,
            AccountState::NotConfigured => {
                self.enabled = true;
                self.configured = false;
            }
            AccountState::Starting | AccountState::Running => {
                self.enabled = true;
                self.configured = true;
            }
            _ => {}
        }
        if !state.has_task() && state != AccountState::Starting && self.connected.is_some() {
            self.connected = Some(false);
        }
    }
}

/// Keys of the snapshot that only the host sets; a plugin's status patch may not contain them.
pub const HOST_OWNED_KEYS: &[&str] = &[
    "accountId",
    "state",
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

/// Every account's entry, by channel and then by account: a channel's accounts are found (and
/// read for a snapshot) without building a key per account.
#[derive(Default)]
struct Entries {
    channels: HashMap<String, HashMap<String, Entry>>,
}

impl Entries {
    fn get(&self, key: &AccountKey) -> Option<&Entry> {
        self.channels.get(&key.channel)?.get(&key.account)
    }

    fn get_mut(&mut self, key: &AccountKey) -> Option<&mut Entry> {
        self.channels.get_mut(&key.channel)?.get_mut(&key.account)
    }

    /// `key`'s entry, created if needed (allocating only then).
    fn entry(&mut self, key: &AccountKey) -> &mut Entry {
        if !self.channels.contains_key(&key.channel) {
            self.channels.insert(key.channel.clone(), HashMap::new());
        }
        let accounts = self
            .channels
            .get_mut(&key.channel)
            .expect("the channel was just inserted");
        if !accounts.contains_key(&key.account) {
            accounts.insert(key.account.clone(), new_entry(key));
        }
        accounts
            .get_mut(&key.account)
            .expect("the account was just inserted")
    }
}

/// Every account's status. Cheap to share (`Arc`); its lock is held only for field updates.
pub struct StatusBoard {
    entries: Mutex<Entries>,
    clock: Arc<dyn Clock>,
    next_generation: AtomicU64,
    stale_calls: AtomicU64,
    messages: Arc<dyn MessageSink>,
    /// Hears every change of an account's state or connection (the event stream).
    states: StatePublisher,
    /// What each plugin's SDK last reported about its runtime (starved or not).
    runtimes: crate::health::starvation::Runtimes,
}

impl StatusBoard {
    /// An empty board whose inbound messages go to a [`CountingSink`].
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self::with_message_sink(clock, Arc::new(CountingSink::default()))
    }

    /// An empty board whose inbound messages go to `messages`.
    pub fn with_message_sink(clock: Arc<dyn Clock>, messages: Arc<dyn MessageSink>) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            clock,
            next_generation: AtomicU64::new(1),
            stale_calls: AtomicU64::new(0),
            messages,
            states: StatePublisher::default(),
            runtimes: Default::default(),
        }
    }

    /// Each plugin runtime's last report (see [`crate::health::starvation`]).
    pub fn runtimes(&self) -> &crate::health::starvation::Runtimes {
        &self.runtimes
    }

    /// `key`'s current task generation, if it has an entry.
    pub fn generation(&self, key: &AccountKey) -> Option<u64> {
        self.lock().get(key).map(|e| e.generation)
    }

    /// Applies `f` to `key`'s snapshot only while its generation is still `generation` (the same
    /// task), under one lock.
    pub fn update_if_generation(
        &self,
        key: &AccountKey,
        generation: u64,
        f: impl FnOnce(&mut AccountSnapshot),
    ) {
        if let Some(entry) = self.lock().get_mut(key)
            && entry.generation == generation
        {
            let before = derive(&entry.snapshot);
            f(&mut entry.snapshot);
            self.states.publish(key, Some(before), &entry.snapshot);
        }
    }

    /// Where every change of an account's state or connection is published.
    pub fn states(&self) -> &StatePublisher {
        &self.states
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new task generation for `key`: handles of earlier generations become stale.
    pub fn begin_generation(&self, key: &AccountKey) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(key).generation = generation;
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
        let before = entries.get(key).map(|entry| derive(&entry.snapshot));
        let snapshot = &mut entries.entry(key).snapshot;
        f(snapshot);
        // The publish hook of every `set_state`: under the lock, so changes go out in order.
        self.states.publish(key, before, snapshot);
    }

    /// The snapshots of `channel`'s accounts `ids`, read under one lock, keyed by account id;
    /// an account never written gets `missing(id)`. No key is built per account.
    pub fn channel_snapshots<'i>(
        &self,
        channel: &str,
        ids: impl IntoIterator<Item = &'i String>,
        missing: impl Fn(&str) -> Option<AccountSnapshot>,
    ) -> std::collections::BTreeMap<String, AccountSnapshot> {
        let entries = self.lock();
        let accounts = entries.channels.get(channel);
        ids.into_iter()
            .filter_map(|id| {
                let snapshot = match accounts.and_then(|a| a.get(id)) {
                    Some(entry) => entry.snapshot.clone(),
                    None => missing(id)?,
                };
                Some((id.clone(), snapshot))
            })
            .collect()
    }

    /// Marks the start of a run: stamps `lastStartAt` and the monotonic start the health monitor
    /// measures from.
    pub fn mark_started(&self, key: &AccountKey) {
        let (now, wall) = (self.clock.now(), self.clock.wall_ms());
        let mut entries = self.lock();
        let entry = entries.entry(key);
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

impl HostSink for StatusBoard {
    fn runtime_report(&self, channel: &str, fields: &str) {
        self.runtimes.report(channel, fields, self.clock.wall_ms());
    }

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
            |snapshot, _, _| {
                let before = derive(snapshot);
                let applied = apply_patch(snapshot, patch).map_err(|e| format!("{key}: {e}"));
                self.states.publish(key, Some(before), snapshot);
                applied
            },
        )
    }

    fn set_connected(&self, key: &AccountKey, generation: u64, connected: bool) {
        self.if_current(
            key,
            generation,
            || (),
            |snapshot, _, now| {
                let before = derive(snapshot);
                snapshot.connected = Some(connected);
                if connected {
                    snapshot.last_connected_at = Some(now.wall);
                }
                self.states.publish(key, Some(before), snapshot);
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
    ) -> BoxFuture<Result<u64, String>> {
        let current = self.if_current(
            key,
            generation,
            || Err(stale_error(key)),
            |snapshot, liveness, now| {
                snapshot.inbound_messages += 1;
                mark_event(snapshot, liveness, EventKind::Inbound, now);
                Ok(())
            },
        );
        if let Err(stale) = current {
            return Box::pin(std::future::ready(Err(stale)));
        }
        tracing::debug!(
            account = %key,
            conversation = message.conversation.as_str(),
            sender = message.sender.as_str(),
            bytes = message.text.len(),
            "inbound message"
        );
        self.messages.accept(key, message)
    }
}
