//! The status board: every account's live snapshot, and the sink for host-service calls. It owns
//! each account's current task generation, so calls from a task the host has given up on are
//! dropped and counted instead of corrupting the replacement's status.

use std::{
    any::Any,
    borrow::Cow,
    collections::BTreeMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use channeld_plugin_abi::abi::{EventKind, InboundMessage};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::{
    clock::Clock,
    events::state::{StatePublisher, derive},
    host::{AccountKey, HostSink},
    inbound::{CountingSink, MessageSink},
    plugin::BoxFuture,
    status_patch::StatusPatch,
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
    pub account_id: CompactString,
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
    pub extra: Extra,
}

/// The plugin's own fields of a snapshot, in key order. A plugin sets a few, so they are kept in
/// a small sorted vector (a map's first node alone takes ≈ 640 bytes per account), each key in
/// place when it is short (up to 24 bytes: no allocation of its own, and a patch's search for it
/// reads no other memory); it serialises as the map's entries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extra(Vec<(CompactString, Value)>);

impl Extra {
    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// `key`'s value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Sets `key` to `value`; the value it had.
    pub fn insert(&mut self, key: String, value: Value) -> Option<Value> {
        let old = self.set(Cow::Owned(key), value);
        self.shrink();
        old
    }

    /// Sets `key` to `value` without giving back spare room, copying the key only when it is new
    /// here; the value it had. For several keys in a row: room for the new ones first
    /// ([`reserve_exact`](Self::reserve_exact)), one [`shrink`](Self::shrink) after.
    fn set(&mut self, key: Cow<'_, str>, value: Value) -> Option<Value> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (CompactString::from(key), value));
                None
            }
        }
    }

    /// Room for `more` keys, exactly.
    fn reserve_exact(&mut self, more: usize) {
        self.0.reserve_exact(more);
    }

    /// Gives back spare room: new keys are rare (a plugin sets the same few over and over).
    fn shrink(&mut self) {
        if self.0.capacity() > self.0.len() {
            self.0.shrink_to_fit();
        }
    }

    /// Whether `key` is set.
    fn contains(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Removes `key`; the value it had.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.find(key).ok()?;
        Some(self.0.remove(i).1)
    }

    /// How many fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(key, value)` pairs, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl std::ops::Index<&str> for Extra {
    type Output = Value;

    /// `key`'s value, `null` when it has none (as a JSON object's index).
    fn index(&self, key: &str) -> &Value {
        self.get(key).unwrap_or(&Value::Null)
    }
}

impl Serialize for Extra {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k.as_str(), v)))
    }
}

impl<'de> Deserialize<'de> for Extra {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A map has each key once, in order.
        let map = Map::<String, Value>::deserialize(deserializer)?;
        Ok(Self(
            map.into_iter()
                .map(|(k, v)| (CompactString::from(k), v))
                .collect(),
        ))
    }
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

/// An account's entry beside its snapshot: the task generation its host calls must carry, and the
/// monotonic times of its run.
struct Entry {
    generation: u64,
    liveness: Liveness,
}

/// How many accounts' snapshots one [`Chunk`] holds.
const CHUNK: usize = 64;

/// The snapshots of [`CHUNK`] consecutive slots of a channel. A chunk is shared with the
/// snapshots taken while it was unchanged, and so is each account's snapshot in it. A write
/// copies the chunk (its references, not the accounts) only while a snapshot still holds it, and
/// then the account's snapshot only while a snapshot still holds that.
type Chunk = Vec<Arc<AccountSnapshot>>;

/// A channel's chunks, in slot order. The list itself is shared too: taking a channel's snapshot
/// clones one reference (the board's lock is held that long, whatever the channel's size), and the
/// first write after it copies the list (one reference per chunk) only while that snapshot still
/// holds it.
type Chunks = Arc<Vec<Arc<Chunk>>>;

/// An entry being written: its fields, and its snapshot in its chunk.
struct EntryMut<'a> {
    generation: &'a mut u64,
    liveness: &'a mut Liveness,
    chunk: &'a mut Arc<Chunk>,
    i: usize,
}

impl EntryMut<'_> {
    /// The snapshot as it stands.
    fn snapshot(&self) -> &AccountSnapshot {
        &self.chunk[self.i]
    }

    /// The snapshot to write to (its chunk, then itself, copied first if a snapshot still shares
    /// them).
    fn snapshot_mut(&mut self) -> &mut AccountSnapshot {
        self.parts_mut().0
    }

    /// [`snapshot_mut`](Self::snapshot_mut) and the entry's liveness, together.
    fn parts_mut(&mut self) -> (&mut AccountSnapshot, &mut Liveness) {
        (
            Arc::make_mut(&mut Arc::make_mut(self.chunk)[self.i]),
            self.liveness,
        )
    }
}

/// An entry being read.
struct EntryRef<'a> {
    generation: u64,
    liveness: Liveness,
    snapshot: &'a Arc<AccountSnapshot>,
}

/// Every account's entry, by channel and then by account: a channel's accounts are found (and
/// read for a snapshot) without building a key per account. The maps hash with hashbrown's
/// default (foldhash, seeded per process) rather than SipHash: ids come from the config and the
/// plugins, and an account's start and stop look them up several times. Channels and entries are
/// kept in vectors and never removed, so an entry's [`Place`] stays valid for the life of the
/// board: an account's lifecycle finds it once and writes through it without a lookup.
#[derive(Default)]
struct Entries {
    /// By channel id, kept in place as the key's (no other memory read to compare one).
    index: hashbrown::HashMap<CompactString, u32>,
    channels: Vec<ChannelEntries>,
}

/// Where an account's entry is on its board (see [`Entries`]).
#[derive(Debug, Clone, Copy)]
struct Place {
    channel: u32,
    slot: u32,
}

/// One channel's entries: kept in slots (entries are never removed), the snapshots in chunks of
/// [`CHUNK`] slots, found by account id through an index (whose ids, like the snapshots', are kept
/// in place up to 24 bytes: no allocation of their own, and no other memory read to compare one),
/// with the sorted view its last snapshot used.
#[derive(Default)]
struct ChannelEntries {
    slots: Vec<Entry>,
    chunks: Chunks,
    index: hashbrown::HashMap<CompactString, u32>,
    view: Option<View>,
}

impl ChannelEntries {
    fn read(&self, slot: u32) -> EntryRef<'_> {
        let (slot, entry) = (slot as usize, &self.slots[slot as usize]);
        EntryRef {
            generation: entry.generation,
            liveness: entry.liveness,
            snapshot: &self.chunks[slot / CHUNK][slot % CHUNK],
        }
    }

    fn write(&mut self, slot: u32) -> EntryMut<'_> {
        let (slot, entry) = (slot as usize, &mut self.slots[slot as usize]);
        EntryMut {
            generation: &mut entry.generation,
            liveness: &mut entry.liveness,
            chunk: &mut Arc::make_mut(&mut self.chunks)[slot / CHUNK],
            i: slot % CHUNK,
        }
    }

    fn get(&self, account: &str) -> Option<EntryRef<'_>> {
        self.index.get(account).map(|&slot| self.read(slot))
    }

    fn get_mut(&mut self, account: &str) -> Option<EntryMut<'_>> {
        let slot = *self.index.get(account)?;
        Some(self.write(slot))
    }

    /// Adds `account`'s entry in the next slot; returns the slot.
    fn push(&mut self, account: &str, snapshot: AccountSnapshot) -> u32 {
        let slot = self.slots.len();
        let id = u32::try_from(slot).expect("fewer than 2^32 accounts in a channel");
        let chunks = Arc::make_mut(&mut self.chunks);
        if slot.is_multiple_of(CHUNK) {
            chunks.push(Arc::new(Vec::with_capacity(CHUNK)));
        }
        let chunk = chunks.last_mut().expect("a chunk has room");
        Arc::make_mut(chunk).push(Arc::new(snapshot));
        self.slots.push(Entry {
            generation: 0,
            liveness: Liveness::default(),
        });
        self.index.insert(CompactString::from(account), id);
        id
    }

    /// The channel's accounts `ids` in account-id order (each once), as slots of this channel or
    /// `missing(id)` for an id without an entry (left out when that is `None`).
    fn sorted_view<S: AsRef<str>>(
        &self,
        ids: impl IntoIterator<Item = S>,
        missing: impl Fn(&str) -> Option<AccountSnapshot>,
    ) -> Arc<[Item]> {
        let mut items: Vec<(S, Item)> = ids
            .into_iter()
            .filter_map(|id| {
                let item = match self.index.get(id.as_ref()) {
                    Some(&slot) => Item::Slot(slot),
                    None => Item::Unwritten(Arc::new(missing(id.as_ref())?)),
                };
                Some((id, item))
            })
            .collect();
        // Listings are usually sorted already: this is then one pass.
        items.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        items.dedup_by(|a, b| a.0.as_ref() == b.0.as_ref());
        items.into_iter().map(|(_, item)| item).collect()
    }

    /// The snapshot of `items` (in their order): a reference to the chunks and to the items.
    fn materialise(&self, items: &Arc<[Item]>) -> ChannelSnapshot {
        ChannelSnapshot {
            chunks: self.chunks.clone(),
            items: items.clone(),
        }
    }
}

/// A channel's sorted view for one listing of its accounts (see
/// [`StatusBoard::listed_snapshot`]): valid while that listing lives and no entry was added.
struct View {
    listing: Weak<dyn Any + Send + Sync>,
    slots: usize,
    items: Arc<[Item]>,
}

/// One account of a view: its entry's slot, or the snapshot shown before it has an entry.
enum Item {
    Slot(u32),
    Unwritten(Arc<AccountSnapshot>),
}

impl Entries {
    fn channel(&self, channel: &str) -> Option<&ChannelEntries> {
        self.index.get(channel).map(|&i| &self.channels[i as usize])
    }

    fn channel_mut(&mut self, channel: &str) -> Option<&mut ChannelEntries> {
        let i = *self.index.get(channel)?;
        Some(&mut self.channels[i as usize])
    }

    fn get(&self, key: &AccountKey) -> Option<EntryRef<'_>> {
        self.channel(&key.channel)?.get(&key.account)
    }

    fn get_mut(&mut self, key: &AccountKey) -> Option<EntryMut<'_>> {
        self.channel_mut(&key.channel)?.get_mut(&key.account)
    }

    /// The entry at `place` (a place this board handed out: entries are never removed).
    fn at(&mut self, place: Place) -> EntryMut<'_> {
        self.channels[place.channel as usize].write(place.slot)
    }

    /// `key`'s entry, created if needed (allocating only then).
    fn entry(&mut self, key: &AccountKey) -> EntryMut<'_> {
        let (place, _) = self.place_or_new(key);
        self.at(place)
    }

    /// Where `key`'s entry is, created if needed, and whether it was (one lookup either way).
    fn place_or_new(&mut self, key: &AccountKey) -> (Place, bool) {
        let channel = match self.index.get(key.channel.as_str()) {
            Some(&i) => i,
            None => {
                let i = u32::try_from(self.channels.len()).expect("fewer than 2^32 channels");
                self.channels.push(ChannelEntries::default());
                self.index.insert(key.channel.clone(), i);
                i
            }
        };
        let entries = &mut self.channels[channel as usize];
        let (slot, new) = match entries.index.get(key.account.as_str()) {
            Some(&slot) => (slot, false),
            None => (entries.push(&key.account, new_snapshot(key)), true),
        };
        (Place { channel, slot }, new)
    }
}

/// One channel's accounts in a snapshot, in account-id order, keyed by their `accountId`. It
/// shares the status board's chunks of account snapshots (taking one copies no account and no
/// chunk: it clones one reference to the channel's list of chunks); a later change on the board
/// does not change a snapshot already taken. Serialises as a JSON object `{account: snapshot, …}`.
#[derive(Clone, Default)]
pub struct ChannelSnapshot {
    /// The channel's chunks as they were when it was taken.
    chunks: Chunks,
    /// Its accounts, in order: slots of `chunks`, or a snapshot of their own.
    items: Arc<[Item]>,
}

impl ChannelSnapshot {
    fn item<'a>(&'a self, item: &'a Item) -> &'a AccountSnapshot {
        match item {
            Item::Slot(slot) => {
                let slot = *slot as usize;
                &self.chunks[slot / CHUNK][slot % CHUNK]
            }
            Item::Unwritten(snapshot) => snapshot,
        }
    }

    /// How many accounts.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it has no account.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// `account`'s snapshot (a binary search by account id).
    pub fn get(&self, account: &str) -> Option<&AccountSnapshot> {
        self.items
            .binary_search_by(|item| self.item(item).account_id.as_str().cmp(account))
            .ok()
            .map(|i| self.item(&self.items[i]))
    }

    /// The account ids, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values().map(|s| s.account_id.as_str())
    }

    /// The snapshots, in account-id order.
    pub fn values(&self) -> impl Iterator<Item = &AccountSnapshot> {
        self.items.iter().map(|item| self.item(item))
    }

    /// `(account id, snapshot)` pairs, in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            snapshot: self,
            items: self.items.iter(),
        }
    }

    /// The snapshots `missing(id)` of `ids` (a channel without any entry yet), sorted, each once.
    fn unwritten<S: AsRef<str>>(
        ids: impl IntoIterator<Item = S>,
        missing: impl Fn(&str) -> Option<AccountSnapshot>,
    ) -> Self {
        let empty = ChannelEntries::default();
        empty.materialise(&empty.sorted_view(ids, missing))
    }
}

/// The `(account id, snapshot)` pairs of a [`ChannelSnapshot`], in order.
pub struct Iter<'a> {
    snapshot: &'a ChannelSnapshot,
    items: std::slice::Iter<'a, Item>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a AccountSnapshot);

    fn next(&mut self) -> Option<Self::Item> {
        let s = self.snapshot.item(self.items.next()?);
        Some((s.account_id.as_str(), s))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.items.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl std::fmt::Debug for ChannelSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl PartialEq for ChannelSnapshot {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.values().eq(other.values())
    }
}

impl std::ops::Index<&str> for ChannelSnapshot {
    type Output = AccountSnapshot;

    fn index(&self, account: &str) -> &AccountSnapshot {
        self.get(account)
            .unwrap_or_else(|| panic!("no account {account:?} in the snapshot"))
    }
}

impl IntoIterator for ChannelSnapshot {
    type Item = (String, AccountSnapshot);
    type IntoIter = std::vec::IntoIter<(String, AccountSnapshot)>;

    /// Owned pairs: each snapshot is copied (the board shares it).
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
            .map(|(id, s)| (id.to_owned(), s.clone()))
            .collect::<Vec<_>>()
            .into_iter()
    }
}

impl<'a> IntoIterator for &'a ChannelSnapshot {
    type Item = (&'a str, &'a AccountSnapshot);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Serialize for ChannelSnapshot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// Every channel's accounts (`GET /v1/status`'s content), by channel id.
pub type Snapshot = BTreeMap<String, ChannelSnapshot>;

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
        if let Some(mut entry) = self.lock().get_mut(key)
            && *entry.generation == generation
        {
            let before = derive(entry.snapshot());
            let snapshot = entry.snapshot_mut();
            f(snapshot);
            self.states.publish(key, Some(before), snapshot);
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
        *self.lock().entry(key).generation = generation;
        generation
    }

    /// [`begin_generation`](Self::begin_generation) and [`update`](Self::update) with `f`, under
    /// one lock (a boot's first write).
    pub fn begin_generation_and(
        &self,
        key: &AccountKey,
        f: impl FnOnce(&mut AccountSnapshot),
    ) -> u64 {
        self.begin_generation_at(key, None, f).0
    }

    /// [`begin_generation_and`](Self::begin_generation_and), which also hands out the account's
    /// part of the board: its later writes and its tasks' host calls go straight to its entry.
    pub(crate) fn begin_first_generation(
        self: &Arc<Self>,
        key: &AccountKey,
        f: impl FnOnce(&mut AccountSnapshot),
    ) -> (u64, AccountBoard) {
        let (generation, place) = self.begin_generation_at(key, None, f);
        let board = AccountBoard {
            board: self.clone(),
            place,
        };
        (generation, board)
    }

    /// [`begin_generation_and`](Self::begin_generation_and) at `place` (else found by `key`).
    fn begin_generation_at(
        &self,
        key: &AccountKey,
        place: Option<Place>,
        f: impl FnOnce(&mut AccountSnapshot),
    ) -> (u64, Place) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let place = self.write(key, place, |entry| *entry.generation = generation, f);
        (generation, place)
    }

    /// Makes every handle of `key` stale (the host gave up on its task).
    pub fn retire_generation(&self, key: &AccountKey) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = self.lock().get_mut(key) {
            *entry.generation = generation;
        }
    }

    /// [`retire_generation`](Self::retire_generation) and [`update`](Self::update) with `f`,
    /// under one lock (the write at the end of a run).
    pub fn retire_generation_and(&self, key: &AccountKey, f: impl FnOnce(&mut AccountSnapshot)) {
        self.retire_generation_at(key, None, f);
    }

    /// [`retire_generation_and`](Self::retire_generation_and) at `place` (else found by `key`).
    fn retire_generation_at(
        &self,
        key: &AccountKey,
        place: Option<Place>,
        f: impl FnOnce(&mut AccountSnapshot),
    ) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.write(key, place, |entry| *entry.generation = generation, f);
    }

    /// Applies `f` to `key`'s snapshot (creating it if needed) and returns the result.
    pub fn update(&self, key: &AccountKey, f: impl FnOnce(&mut AccountSnapshot)) {
        self.write(key, None, |_| {}, f);
    }

    /// [`update`](Self::update) with `f` for each of `keys`, under one lock (a stop of many
    /// accounts).
    pub fn update_each<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k AccountKey>,
        f: impl Fn(&mut AccountSnapshot),
    ) {
        self.update_each_at(keys.into_iter().map(|key| (key, None)), f);
    }

    /// [`update_each`](Self::update_each) for accounts given with their part of this board when
    /// it is known (then no lookup is made).
    pub(crate) fn update_each_at<'k>(
        &self,
        accounts: impl IntoIterator<Item = (&'k AccountKey, Option<&'k AccountBoard>)>,
        f: impl Fn(&mut AccountSnapshot),
    ) {
        let mut entries = self.lock();
        for (key, account) in accounts {
            let place = account.and_then(|a| std::ptr::eq(&*a.board, self).then_some(a.place));
            self.write_locked(&mut entries, key, place, |_| {}, &f);
        }
    }

    /// Under one lock: `entry` on `key`'s entry (at `place`, else found by `key` and created if
    /// needed), then `f` on its snapshot, then the state change published. Returns the place.
    fn write(
        &self,
        key: &AccountKey,
        place: Option<Place>,
        entry: impl FnOnce(&mut EntryMut<'_>),
        f: impl FnOnce(&mut AccountSnapshot),
    ) -> Place {
        self.write_locked(&mut self.lock(), key, place, entry, f)
    }

    /// [`write`](Self::write), under a lock the caller holds.
    fn write_locked(
        &self,
        entries: &mut Entries,
        key: &AccountKey,
        place: Option<Place>,
        entry: impl FnOnce(&mut EntryMut<'_>),
        f: impl FnOnce(&mut AccountSnapshot),
    ) -> Place {
        let (place, new) = match place {
            Some(place) => (place, false),
            None => entries.place_or_new(key),
        };
        let mut written = entries.at(place);
        let before = (!new).then(|| derive(written.snapshot()));
        entry(&mut written);
        let snapshot = written.snapshot_mut();
        f(snapshot);
        // The publish hook of every `set_state`: under the lock, so changes go out in order.
        self.states.publish(key, before, snapshot);
        place
    }

    /// The snapshots of `channel`'s accounts `ids`, read under one lock, keyed by account id;
    /// an account never written gets `missing(id)`. No key is built per account.
    pub fn channel_snapshots<'i>(
        &self,
        channel: &str,
        ids: impl IntoIterator<Item = &'i String>,
        missing: impl Fn(&str) -> Option<AccountSnapshot>,
    ) -> std::collections::BTreeMap<String, AccountSnapshot> {
        self.channel_snapshot(channel, ids.into_iter().map(String::as_str), missing)
            .into_iter()
            .collect()
    }

    /// The snapshots of `channel`'s accounts `ids` (each once, in account-id order), read under
    /// one lock and shared with the board; an account never written gets `missing(id)` (left out
    /// when that is `None`).
    pub fn channel_snapshot<'i>(
        &self,
        channel: &str,
        ids: impl IntoIterator<Item = &'i str>,
        missing: impl Fn(&str) -> Option<AccountSnapshot>,
    ) -> ChannelSnapshot {
        let entries = self.lock();
        match entries.channel(channel) {
            Some(accounts) => accounts.materialise(&accounts.sorted_view(ids, missing)),
            None => ChannelSnapshot::unwritten(ids, missing),
        }
    }

    /// [`StatusBoard::channel_snapshot`] for one listing of the channel's accounts: `listing`
    /// stands for the list (`ids` must give the same accounts as long as it lives). The sorted
    /// view of that list is kept and reused until the listing is dropped or the channel gains an
    /// entry, so a snapshot costs one reference clone per chunk of accounts; `ids` is read only
    /// to build a new view.
    pub fn listed_snapshot<S: AsRef<str>, I: IntoIterator<Item = S>>(
        &self,
        channel: &str,
        listing: Weak<dyn Any + Send + Sync>,
        ids: impl FnOnce() -> I,
        missing: impl Fn(&str) -> Option<AccountSnapshot>,
    ) -> ChannelSnapshot {
        let mut entries = self.lock();
        let Some(accounts) = entries.channel_mut(channel) else {
            return ChannelSnapshot::unwritten(ids(), missing);
        };
        let fresh = accounts.view.as_ref().is_some_and(|view| {
            view.slots == accounts.slots.len() && Weak::ptr_eq(&view.listing, &listing)
        });
        if !fresh {
            let items = accounts.sorted_view(ids(), missing);
            accounts.view = Some(View {
                listing,
                slots: accounts.slots.len(),
                items,
            });
        }
        let view = accounts.view.as_ref().expect("the view was just set");
        accounts.materialise(&view.items)
    }

    /// `key`'s snapshot, shared with the board (no copy; later changes do not reach it).
    #[cfg(test)]
    fn get_shared(&self, key: &AccountKey) -> Option<Arc<AccountSnapshot>> {
        self.lock().get(key).map(|e| e.snapshot.clone())
    }

    /// Marks the start of a run (stamps `lastStartAt` and the monotonic start the health monitor
    /// measures from) and applies `f` to the snapshot, under one lock.
    pub fn mark_started(&self, key: &AccountKey, f: impl FnOnce(&mut AccountSnapshot)) {
        self.mark_started_at(key, None, f);
    }

    /// [`mark_started`](Self::mark_started) at `place` (else found by `key`).
    fn mark_started_at(
        &self,
        key: &AccountKey,
        place: Option<Place>,
        f: impl FnOnce(&mut AccountSnapshot),
    ) {
        let (now, wall) = (self.clock.now(), self.clock.wall_ms());
        self.write(
            key,
            place,
            |entry| entry.liveness.started_at = Some(now),
            |s| {
                s.last_start_at = Some(wall);
                f(s);
            },
        );
    }

    /// `key`'s snapshot and run times together (one lock).
    pub fn get_with_liveness(&self, key: &AccountKey) -> Option<(AccountSnapshot, Liveness)> {
        self.lock()
            .get(key)
            .map(|e| (AccountSnapshot::clone(e.snapshot), e.liveness))
    }

    /// `key`'s snapshot.
    pub fn get(&self, key: &AccountKey) -> Option<AccountSnapshot> {
        self.lock()
            .get(key)
            .map(|e| AccountSnapshot::clone(e.snapshot))
    }

    /// Host-service calls dropped because they came from a stale generation.
    pub fn stale_calls(&self) -> u64 {
        self.stale_calls.load(Ordering::Relaxed)
    }

    /// Runs `f` on `key`'s snapshot if `generation` is current; counts the call otherwise and
    /// returns `stale()` (built only then: this is the hot path of every message). `f` reads the
    /// clock only for what it stamps (a patch stamps nothing).
    fn if_current<T>(
        &self,
        at: At<'_>,
        generation: u64,
        stale: impl FnOnce() -> T,
        f: impl FnOnce(&mut AccountSnapshot, &mut Liveness, &dyn Clock) -> T,
    ) -> T {
        let key = at.key;
        let mut entries = self.lock();
        let entry = match at.place {
            Some(place) => Some(entries.at(place)),
            None => entries.get_mut(key),
        };
        match entry {
            Some(mut entry) if *entry.generation == generation => {
                let (snapshot, liveness) = entry.parts_mut();
                f(snapshot, liveness, &*self.clock)
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

/// The snapshot of an account the board has just met.
fn new_snapshot(key: &AccountKey) -> AccountSnapshot {
    AccountSnapshot {
        account_id: key.account.clone(),
        enabled: true,
        configured: true,
        ..AccountSnapshot::default()
    }
}

/// The error a plugin hears for a call from a task that has been replaced or has ended.
pub(crate) fn stale_error(key: &AccountKey) -> String {
    format!("{key}: this task has been replaced; the call was dropped")
}

/// Refuses a status patch that sets a host-owned key (before the generation check), with the
/// error the plugin hears.
pub(crate) fn refuse_host_owned(key: &AccountKey, patch: &StatusPatch<'_>) -> Result<(), String> {
    match patch.keys().find(|k| HOST_OWNED_KEYS.contains(k)) {
        Some(owned) => Err(format!("{key}: status key {owned:?} is owned by the host")),
        None => Ok(()),
    }
}

/// Checks the typed fields of a status patch as applying it checks them (after the generation
/// check), with the error the plugin hears, without a snapshot: an isolated child answers its
/// plugin with this and sends the patch to the host one way.
pub(crate) fn check_patch_types(key: &AccountKey, patch: &StatusPatch<'_>) -> Result<(), String> {
    apply_patch(&mut AccountSnapshot::default(), patch.clone()).map_err(|e| format!("{key}: {e}"))
}

/// Merges a plugin's status patch into the snapshot, key by key (no JSON round trip of the whole
/// snapshot under the board's lock): the plugin-settable typed fields are checked and set; every
/// other key is the plugin's own, copied only when it is new to the account (the plugin's own
/// fields get room for the new ones at once, and keep none spare). Host-owned keys were refused
/// before.
fn apply_patch(snapshot: &mut AccountSnapshot, patch: StatusPatch<'_>) -> Result<(), String> {
    let new_keys = patch
        .keys()
        .filter(|key| typed_status_field(key).is_none() && !snapshot.extra.contains(key))
        .count();
    snapshot.extra.reserve_exact(new_keys);
    let applied = patch.into_fields().try_for_each(|(key, value)| {
        match typed_status_field(&key) {
            Some(set) => {
                set(snapshot, value).map_err(|e| format!("bad status patch for {key:?}: {e}"))?
            }
            None => {
                snapshot.extra.set(key, value);
            }
        }
        Ok(())
    });
    // Spare room is left only by a key given twice, or a bad field that ended the patch early.
    snapshot.extra.shrink();
    applied
}

/// How a typed field of the snapshot is set from a patch's value (refused if of the wrong type).
type SetTyped = fn(&mut AccountSnapshot, Value) -> serde_json::Result<()>;

/// The entries of [`TYPED_STATUS_FIELDS`]: each key with the setter of its field.
macro_rules! typed_status_fields {
    ($($key:literal => $field:ident),* $(,)?) => {
        [$(($key, |s: &mut AccountSnapshot, v| {
            s.$field = serde_json::from_value(v)?;
            Ok(())
        })),*]
    };
}

/// The snapshot's typed fields a plugin may set, by their key in a patch.
const TYPED_STATUS_FIELDS: [(&str, SetTyped); 9] = typed_status_fields![
    "connected" => connected,
    "lastConnectedAt" => last_connected_at,
    "lastEventAt" => last_event_at,
    "lastInboundAt" => last_inbound_at,
    "lastOutboundAt" => last_outbound_at,
    "mode" => mode,
    "busy" => busy,
    "activeRuns" => active_runs,
    "lastRunActivityAt" => last_run_activity_at,
];

/// How the typed field `key` is set, if `key` is one (see [`TYPED_STATUS_FIELDS`]).
fn typed_status_field(key: &str) -> Option<SetTyped> {
    TYPED_STATUS_FIELDS
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, set)| *set)
}

/// The time of a host-service call, in both clocks.
#[derive(Clone, Copy)]
struct Stamp {
    wall: i64,
    mono: Instant,
}

impl Stamp {
    fn read(clock: &dyn Clock) -> Self {
        Self {
            wall: clock.wall_ms(),
            mono: clock.now(),
        }
    }
}

/// Stamps traffic. Only an explicit `record_event` opts the account into stale-socket checks
/// (`reportsEvents`): a delivered message is traffic too, but a quiet chat is not a dead socket.
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

/// An account a host call is for: its key, and its place on the board when the caller knows it
/// (then no lookup is made).
#[derive(Clone, Copy)]
struct At<'a> {
    key: &'a AccountKey,
    place: Option<Place>,
}

/// The host services' work on the board, for an account found by key or at its place.
impl StatusBoard {
    fn is_current_at(&self, at: At<'_>, generation: u64) -> bool {
        let mut entries = self.lock();
        match at.place {
            Some(place) => *entries.at(place).generation == generation,
            None => entries
                .get(at.key)
                .is_some_and(|e| e.generation == generation),
        }
    }

    fn patch_status_at(
        &self,
        at: At<'_>,
        generation: u64,
        patch: StatusPatch<'_>,
    ) -> Result<(), String> {
        let key = at.key;
        refuse_host_owned(key, &patch)?;
        self.if_current(
            at,
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

    fn set_connected_at(&self, at: At<'_>, generation: u64, connected: bool) {
        self.if_current(
            at,
            generation,
            || (),
            |snapshot, _, clock| {
                let before = derive(snapshot);
                snapshot.connected = Some(connected);
                if connected {
                    snapshot.last_connected_at = Some(clock.wall_ms());
                }
                self.states.publish(at.key, Some(before), snapshot);
            },
        );
    }

    fn record_event_at(&self, at: At<'_>, generation: u64, kind: EventKind) {
        self.if_current(
            at,
            generation,
            || (),
            |snapshot, liveness, clock| {
                snapshot.reports_events = true;
                mark_event(snapshot, liveness, kind, Stamp::read(clock))
            },
        );
    }

    fn set_busy_at(&self, at: At<'_>, generation: u64, active_runs: u32) {
        self.if_current(
            at,
            generation,
            || (),
            |snapshot, liveness, clock| {
                let now = Stamp::read(clock);
                snapshot.active_runs = active_runs;
                snapshot.busy = active_runs > 0;
                snapshot.last_run_activity_at = Some(now.wall);
                liveness.last_run_activity_at = Some(now.mono);
            },
        );
    }

    fn deliver_at(
        &self,
        at: At<'_>,
        generation: u64,
        message: InboundMessage,
    ) -> BoxFuture<Result<u64, String>> {
        let key = at.key;
        let current = self.if_current(
            at,
            generation,
            || Err(stale_error(key)),
            |snapshot, liveness, clock| {
                snapshot.inbound_messages += 1;
                mark_event(snapshot, liveness, EventKind::Inbound, Stamp::read(clock));
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

impl HostSink for StatusBoard {
    fn runtime_report(&self, channel: &str, fields: &str) {
        self.runtimes.report(channel, fields, self.clock.wall_ms());
    }

    fn is_current(&self, key: &AccountKey, generation: u64) -> bool {
        self.is_current_at(At { key, place: None }, generation)
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
        patch: StatusPatch<'_>,
    ) -> Result<(), String> {
        self.patch_status_at(At { key, place: None }, generation, patch)
    }

    fn set_connected(&self, key: &AccountKey, generation: u64, connected: bool) {
        self.set_connected_at(At { key, place: None }, generation, connected);
    }

    fn record_event(&self, key: &AccountKey, generation: u64, kind: EventKind) {
        self.record_event_at(At { key, place: None }, generation, kind);
    }

    fn set_busy(&self, key: &AccountKey, generation: u64, active_runs: u32) {
        self.set_busy_at(At { key, place: None }, generation, active_runs);
    }

    fn deliver(
        &self,
        key: &AccountKey,
        generation: u64,
        message: InboundMessage,
    ) -> BoxFuture<Result<u64, String>> {
        self.deliver_at(At { key, place: None }, generation, message)
    }
}

/// One account's part of the status board, handed out at its lifecycle's first boot
/// ([`StatusBoard::begin_first_generation`]): the lifecycle's later writes, its stops and the
/// host calls of the account's tasks go straight to the account's entry, without looking it up
/// by key under the board's lock. The board stays the entry's one owner; this only knows where
/// the entry is. Every call is for the account the board handed it out for: the key a call brings
/// names the account in errors and published changes.
pub(crate) struct AccountBoard {
    board: Arc<StatusBoard>,
    place: Place,
}

impl std::fmt::Debug for AccountBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountBoard")
            .field("place", &self.place)
            .finish_non_exhaustive()
    }
}

impl AccountBoard {
    fn at<'a>(&self, key: &'a AccountKey) -> At<'a> {
        At {
            key,
            place: Some(self.place),
        }
    }

    /// [`StatusBoard::begin_generation_and`], for this account.
    pub(crate) fn begin_generation_and(
        &self,
        key: &AccountKey,
        f: impl FnOnce(&mut AccountSnapshot),
    ) -> u64 {
        self.board.begin_generation_at(key, Some(self.place), f).0
    }

    /// [`StatusBoard::mark_started`], for this account.
    pub(crate) fn mark_started(&self, key: &AccountKey, f: impl FnOnce(&mut AccountSnapshot)) {
        self.board.mark_started_at(key, Some(self.place), f);
    }

    /// [`StatusBoard::retire_generation_and`], for this account.
    pub(crate) fn retire_generation_and(
        &self,
        key: &AccountKey,
        f: impl FnOnce(&mut AccountSnapshot),
    ) {
        self.board.retire_generation_at(key, Some(self.place), f);
    }
}

/// What holds an account's part of the board ([`AccountBoard`]; the supervisor's cell of the
/// account's lifecycle holds one): it is the sink of the account's task links, and their calls go
/// to the account's entry.
pub(crate) trait HoldsAccountBoard: Send + Sync + 'static {
    /// The account's part of the board.
    fn account_board(&self) -> &AccountBoard;
}

impl HoldsAccountBoard for AccountBoard {
    fn account_board(&self) -> &AccountBoard {
        self
    }
}

impl<T: HoldsAccountBoard> HostSink for T {
    fn runtime_report(&self, channel: &str, fields: &str) {
        self.account_board().board.runtime_report(channel, fields);
    }

    fn is_current(&self, key: &AccountKey, generation: u64) -> bool {
        let account = self.account_board();
        account.board.is_current_at(account.at(key), generation)
    }

    fn status_json(&self, key: &AccountKey) -> Value {
        self.account_board().board.status_json(key)
    }

    fn patch_status(
        &self,
        key: &AccountKey,
        generation: u64,
        patch: StatusPatch<'_>,
    ) -> Result<(), String> {
        let account = self.account_board();
        account
            .board
            .patch_status_at(account.at(key), generation, patch)
    }

    fn set_connected(&self, key: &AccountKey, generation: u64, connected: bool) {
        let account = self.account_board();
        account
            .board
            .set_connected_at(account.at(key), generation, connected);
    }

    fn record_event(&self, key: &AccountKey, generation: u64, kind: EventKind) {
        let account = self.account_board();
        account
            .board
            .record_event_at(account.at(key), generation, kind);
    }

    fn set_busy(&self, key: &AccountKey, generation: u64, active_runs: u32) {
        let account = self.account_board();
        account
            .board
            .set_busy_at(account.at(key), generation, active_runs);
    }

    fn deliver(
        &self,
        key: &AccountKey,
        generation: u64,
        message: InboundMessage,
    ) -> BoxFuture<Result<u64, String>> {
        let account = self.account_board();
        account
            .board
            .deliver_at(account.at(key), generation, message)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use serde_json::json;

    use super::*;
    use crate::clock::SystemClock;

    fn board() -> StatusBoard {
        StatusBoard::new(Arc::new(SystemClock))
    }

    /// An account's part of the board writes to that account's entry (among others of its
    /// channel and of another channel), and drops and counts a call from a generation it has
    /// retired, as the board does for a call by key.
    #[test]
    fn an_account_board_writes_its_own_entry_and_drops_stale_calls() {
        let board = Arc::new(board());
        let (a, b) = (AccountKey::new("ch", "a"), AccountKey::new("ch", "b"));
        let other = AccountKey::new("other", "a");
        board.update(&b, |s| s.last_error = Some("b".into()));
        board.update(&other, |s| s.last_error = Some("other".into()));
        let (first, account) =
            board.begin_first_generation(&a, |s| s.set_state(AccountState::Starting));
        assert_eq!(board.generation(&a), Some(first));
        account
            .patch_status(&a, first, StatusPatch::parse(r#"{"x": 1}"#).unwrap())
            .unwrap();
        account.set_connected(&a, first, true);
        account.mark_started(&a, |s| s.set_state(AccountState::Running));
        let snapshot = board.get(&a).unwrap();
        assert_eq!(snapshot.extra.get("x"), Some(&serde_json::json!(1)));
        assert_eq!(snapshot.connected, Some(true));
        assert_eq!(snapshot.state, AccountState::Running);
        assert!(account.is_current(&a, first));
        // The next run: the first run's calls are stale from here.
        account.retire_generation_and(&a, |s| s.set_state(AccountState::RestartPending));
        let second = account.begin_generation_and(&a, |s| s.set_state(AccountState::Starting));
        assert_eq!(board.generation(&a), Some(second));
        assert!(!account.is_current(&a, first));
        let stale = account
            .patch_status(&a, first, StatusPatch::parse(r#"{"x": 2}"#).unwrap())
            .unwrap_err();
        assert_eq!(
            stale,
            "ch:a: this task has been replaced; the call was dropped"
        );
        // (The end of the run reported the connection down.)
        account.set_connected(&a, first, true);
        assert_eq!(board.stale_calls(), 2);
        let snapshot = board.get(&a).unwrap();
        assert_eq!(snapshot.extra.get("x"), Some(&serde_json::json!(1)));
        assert_eq!(snapshot.connected, Some(false));
        // The other entries were not written.
        assert_eq!(board.get(&b).unwrap().last_error.as_deref(), Some("b"));
        assert_eq!(
            board.get(&other).unwrap().last_error.as_deref(),
            Some("other")
        );
        assert_eq!(board.get(&b).unwrap().extra.get("x"), None);
    }

    fn unwritten(id: &str) -> Option<AccountSnapshot> {
        Some(AccountSnapshot {
            account_id: id.into(),
            last_error: Some("unwritten".into()),
            ..AccountSnapshot::default()
        })
    }

    /// A patch sets the typed fields it names and merges the plugin's own keys in key order (a
    /// key given twice: the last value); the plugin's fields keep no spare room, also when a bad
    /// typed field ends the patch early (the fields before it stay applied).
    #[test]
    fn a_patch_merges_its_fields_in_order_and_leaves_no_spare_room() {
        fn patch(text: &str) -> StatusPatch<'_> {
            StatusPatch::parse(text).unwrap()
        }
        let mut snapshot = AccountSnapshot::default();
        snapshot.extra.insert("b".into(), json!(0));
        apply_patch(
            &mut snapshot,
            patch(r#"{"b": 1, "connected": true, "a": 2, "c": 3, "c": 4}"#),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&snapshot.extra).unwrap(),
            json!({"a": 2, "b": 1, "c": 4})
        );
        assert_eq!(snapshot.connected, Some(true));
        assert_eq!(snapshot.extra.0.capacity(), snapshot.extra.len());
        // Only keys already there: nothing to make room for.
        apply_patch(&mut snapshot, patch(r#"{"a": 5, "b": 6}"#)).unwrap();
        assert_eq!(snapshot.extra["a"], json!(5));
        assert_eq!(snapshot.extra.0.capacity(), 3);

        let bad = apply_patch(&mut snapshot, patch(r#"{"n": 1, "busy": "no", "m": 2}"#));
        assert!(
            bad.unwrap_err()
                .starts_with("bad status patch for \"busy\"")
        );
        assert_eq!(snapshot.extra["n"], json!(1));
        assert_eq!(snapshot.extra.get("m"), None);
        assert_eq!(snapshot.extra.0.capacity(), snapshot.extra.len());
    }

    /// A snapshot shares the board's values, yet a later write on the board (which copies the
    /// shared value) does not change it; the next snapshot sees the write.
    #[test]
    fn a_snapshot_taken_keeps_its_values_after_the_board_changes() {
        let board = board();
        let key = AccountKey::new("c", "a");
        board.update(&key, |s| s.set_state(AccountState::Running));
        let before = board.channel_snapshot("c", ["a"], |_| None);
        let shared = board.get_shared(&key).unwrap();
        board.update(&key, |s| s.set_state(AccountState::GaveUp));
        assert_eq!(before["a"].state, AccountState::Running);
        assert_eq!(shared.state, AccountState::Running);
        let after = board.channel_snapshot("c", ["a"], |_| None);
        assert_eq!(after["a"].state, AccountState::GaveUp);
        assert_eq!(board.get(&key).unwrap().state, AccountState::GaveUp);
    }

    /// A listing's sorted view is built once and reused (its ids are not read again) while the
    /// listing lives and no entry is added; a new entry or another listing rebuilds it.
    #[test]
    fn a_listed_snapshot_reuses_its_view_until_the_listing_or_the_entries_change() {
        let board = board();
        for id in ["b", "a", "x"] {
            board.update(&AccountKey::new("c", id), |s| s.reconnect_attempts = 1);
        }
        let listing: Arc<dyn Any + Send + Sync> = Arc::new(());
        let reads = Cell::new(0);
        let ids = || {
            reads.set(reads.get() + 1);
            ["b", "c", "a", "b"]
        };
        let snapshot = |listing: &Arc<dyn Any + Send + Sync>, ids| {
            board.listed_snapshot("c", Arc::downgrade(listing), ids, unwritten)
        };

        let first = snapshot(&listing, &ids);
        // Sorted, each once, the unlisted `x` left out, the entry-less `c` from `missing`.
        assert_eq!(first.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(first["c"].last_error.as_deref(), Some("unwritten"));
        assert_eq!(first["a"].reconnect_attempts, 1);
        assert_eq!(reads.get(), 1);

        // Changed values show through the kept view; its ids are not read again.
        board.update(&AccountKey::new("c", "a"), |s| s.reconnect_attempts = 2);
        let second = snapshot(&listing, &ids);
        assert_eq!(second["a"].reconnect_attempts, 2);
        assert_eq!(first["a"].reconnect_attempts, 1);
        assert_eq!(reads.get(), 1);

        // `c` gets an entry: the view is rebuilt and shows it.
        board.update(&AccountKey::new("c", "c"), |s| s.reconnect_attempts = 3);
        let third = snapshot(&listing, &ids);
        assert_eq!(third["c"].reconnect_attempts, 3);
        assert_eq!(third["c"].last_error, None);
        assert_eq!(reads.get(), 2);

        // Another listing gets its own view.
        let other: Arc<dyn Any + Send + Sync> = Arc::new(());
        let fourth = board.listed_snapshot("c", Arc::downgrade(&other), || ["x"], unwritten);
        assert_eq!(fourth.keys().collect::<Vec<_>>(), ["x"]);
        assert_eq!(snapshot(&listing, &ids).len(), 3);
        assert_eq!(reads.get(), 3);

        // A channel the board has no entry of: every id from `missing`.
        let none = board.listed_snapshot("d", Arc::downgrade(&other), || ["z", "y"], unwritten);
        assert_eq!(none.keys().collect::<Vec<_>>(), ["y", "z"]);
    }

    /// A snapshot shares the board's chunks of snapshots: taking one copies no chunk; a write to an
    /// account copies only its chunk (its references; the other accounts' snapshots stay shared)
    /// and only while a snapshot holds it, and the snapshot taken before keeps the old values and
    /// the accounts it had, also after an account is added to its last chunk.
    #[test]
    fn a_snapshot_shares_the_boards_chunks_and_a_write_copies_only_its_own() {
        let board = board();
        let ids: Vec<String> = (0..3 * CHUNK + 5).map(|i| format!("a{i:04}")).collect();
        for id in &ids {
            board.update(&AccountKey::new("c", id), |s| s.reconnect_attempts = 1);
        }
        let listing: Arc<dyn Any + Send + Sync> = Arc::new(());
        let take = || board.listed_snapshot("c", Arc::downgrade(&listing), || &ids, unwritten);
        let first = take();
        assert_eq!(first.chunks.len(), 4);
        let again = take();
        let shared = |a: &ChannelSnapshot, b: &ChannelSnapshot, chunk: usize| {
            Arc::ptr_eq(&a.chunks[chunk], &b.chunks[chunk])
        };
        // Without a write between them, two snapshots share the list of chunks itself.
        assert!(Arc::ptr_eq(&first.chunks, &again.chunks));
        drop(again);

        // A write to an account of the second chunk, and a new account in the last.
        let written = &ids[CHUNK + 3];
        board.update(&AccountKey::new("c", written), |s| s.reconnect_attempts = 2);
        board.update(&AccountKey::new("c", "b"), |s| s.reconnect_attempts = 3);
        let second = board.listed_snapshot(
            "c",
            Arc::downgrade(&listing),
            || ids.iter().map(String::as_str).chain(["b"]),
            unwritten,
        );
        assert_eq!(
            (0..4)
                .map(|c| shared(&first, &second, c))
                .collect::<Vec<_>>(),
            [true, false, true, false]
        );
        // The copied chunk still shares the snapshots of its other accounts.
        let (old, new) = (&first.chunks[1], &second.chunks[1]);
        assert!(Arc::ptr_eq(&old[0], &new[0]));
        assert!(!Arc::ptr_eq(&old[3], &new[3]));
        assert_eq!(first[written.as_str()].reconnect_attempts, 1);
        assert_eq!(second[written.as_str()].reconnect_attempts, 2);
        assert_eq!((first.len(), second.len()), (ids.len(), ids.len() + 1));
        assert!(first.get("b").is_none());
        assert_eq!(second["b"].reconnect_attempts, 3);
        assert!(first.values().all(|s| s.reconnect_attempts == 1));

        // With no snapshot left, a write copies nothing (neither the list nor the chunk).
        drop((first, second));
        let list_and_chunk = || {
            let entries = board.lock();
            let chunks = &entries.channel("c").unwrap().chunks;
            (Arc::as_ptr(chunks), Arc::as_ptr(&chunks[1]))
        };
        let before = list_and_chunk();
        board.update(&AccountKey::new("c", written), |s| s.reconnect_attempts = 4);
        assert_eq!(list_and_chunk(), before);
    }

    /// A channel's snapshot serialises exactly as the map of account id to snapshot it replaces.
    #[test]
    fn a_channel_snapshot_serialises_as_a_map_by_account_id() {
        let board = board();
        for id in ["b", "a"] {
            board.update(&AccountKey::new("c", id), |s| {
                s.set_state(AccountState::Running);
                s.extra.insert("own".into(), Value::from(id));
            });
        }
        let snapshot = board.channel_snapshot("c", ["b", "a"], |_| None);
        let as_map: BTreeMap<String, AccountSnapshot> = snapshot.clone().into_iter().collect();
        assert_eq!(
            serde_json::to_string(&snapshot).unwrap(),
            serde_json::to_string(&as_map).unwrap()
        );
        assert_eq!(
            serde_json::to_value(&snapshot).unwrap(),
            serde_json::to_value(&as_map).unwrap()
        );
        assert_eq!(snapshot.get("b").unwrap().extra["own"], "b");
        assert!(snapshot.get("nope").is_none());
        assert_eq!(
            snapshot.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    /// The plugin's own fields serialise as the map they were (keys in order, flattened into the
    /// snapshot) and read back the same; a set key is replaced, a removed one gone.
    #[test]
    fn the_plugins_own_fields_serialise_and_read_back_as_a_map() {
        let mut snapshot = AccountSnapshot::default();
        let mut map = Map::new();
        for (key, value) in [
            ("zeta", json!(1)),
            ("alpha", json!("a")),
            ("mid", json!([2])),
        ] {
            assert_eq!(snapshot.extra.insert(key.into(), value.clone()), None);
            map.insert(key.into(), value);
        }
        assert_eq!(
            snapshot.extra.insert("zeta".into(), json!(3)),
            Some(json!(1))
        );
        map.insert("zeta".into(), json!(3));
        assert_eq!(snapshot.extra.remove("mid"), Some(json!([2])));
        map.remove("mid");
        assert_eq!(snapshot.extra.len(), 2);
        assert_eq!(snapshot.extra["zeta"], 3);
        assert_eq!(snapshot.extra["nope"], Value::Null);

        // The host's fields in their order, then the plugin's by key: what the map gave.
        let text = serde_json::to_string(&snapshot).unwrap();
        let host_only = serde_json::to_string(&AccountSnapshot::default()).unwrap();
        let plugins = serde_json::to_string(&map).unwrap();
        let expected = format!(
            "{},{}",
            host_only.strip_suffix('}').unwrap(),
            plugins.strip_prefix('{').unwrap()
        );
        assert_eq!(text, expected);
        let back: AccountSnapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back, snapshot);
    }
}
