//! `GET /metrics`: the daemon's figures in the Prometheus (OpenMetrics) text format, encoded by
//! the `prometheus-client` crate.
//!
//! Two kinds of figures:
//! * **counters the code bumps** as things happen, through the small `pub fn` hooks of this
//!   module ([`record_start`], [`record_crash`], …). They live for the whole process (the
//!   daemon is one per process) and only grow;
//! * **figures read at scrape time** from their one owner: account states and flags from the
//!   supervisor's snapshot, plugin files from the catalog, the journal's size and oldest
//!   retained sequence number, the outbox's messages per state, and the lag of every connected
//!   event stream.
//!
//! | metric | what |
//! |---|---|
//! | `channeld_account_state{channel,account,state}` | 1 for the account's current state (per account) |
//! | `channeld_account_connected{channel,account}` | 1 connected, 0 not (per account, when reported) |
//! | `channeld_account_restart_attempts{channel,account}` | the restart counter (per account) |
//! | `channeld_accounts{state}` | how many accounts are in each state (always) |
//! | `channeld_starts_total` | plugin tasks started (every automatic restart included) |
//! | `channeld_crashes_total` | tasks that ended without a user's stop |
//! | `channeld_give_ups_total` | accounts given up on after the maximum of restarts |
//! | `channeld_monitor_restarts_total` | restarts by the health monitor |
//! | `channeld_inbound_messages_total` | messages the journal took |
//! | `channeld_outbound_messages_total`, `channeld_send_failures_total` | sends the outbox handed to plugins: taken, and failed attempts |
//! | `channeld_stale_handle_calls_total` | host-service calls dropped from a stale task |
//! | `channeld_starved_runtime_events_total` | plugin runtimes reported starved (every worker blocked past the threshold) |
//! | `channeld_plugin_call_duration_seconds` | histogram of blocking plugin calls |
//! | `channeld_plugin_load_duration_seconds{file}` | how long the file's last load took |
//! | `channeld_plugin_loaded_timestamp_seconds{channel,file,version}` | when it was loaded |
//! | `channeld_plugin_load_error{channel,file}` | 1 per file whose load failed |
//! | `channeld_plugin_versions_mapped{channel}` | versions of the channel's code still mapped |
//! | `channeld_reconciles_total` | catalog reconcile steps |
//! | `channeld_journal_size_bytes`, `channeld_journal_messages`, `channeld_journal_oldest_seq`, `channeld_journal_last_seq` | the journal |
//! | `channeld_outbox_messages{state}` | messages the outbox holds: `queued`, `sending`, and until pruned `sent`, `failed`, `cancelled` |
//! | `channeld_event_streams`, `channeld_consumer_lag_max`, `channeld_consumer_lag` (histogram) | connected event streams, behind the journal's last seq |
//!
//! Per-account series are switched by `[metrics] per_account`: unset, they are on up to
//! [`PER_ACCOUNT_AUTO_LIMIT`] accounts and off above it (said once in the log).
//!
//! The token rule is the API's (either token may read); `[metrics] public = true` lets a scraper
//! in without one.

use std::{
    collections::BTreeMap,
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use crossbeam_utils::CachePadded;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::{catalog::Catalog, events::EventHub, status::AccountSnapshot, supervise::Supervisor};

/// Above this many accounts, per-account series are off unless `[metrics] per_account = true`.
pub const PER_ACCOUNT_AUTO_LIMIT: usize = 1_000;

/// The content type of the answer (`prometheus-client` encodes OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Per-account series (state, connected, restart attempts). Unset: on up to
    /// [`PER_ACCOUNT_AUTO_LIMIT`] accounts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_account: Option<bool>,
    /// Serve `/metrics` without a token.
    pub public: bool,
}

/// The process-wide counters the hooks bump.
struct Counters {
    starts: Striped,
    crashes: Striped,
    give_ups: Striped,
    monitor_restarts: Counter,
    outbound: Counter,
    send_failures: Counter,
    starved: Counter,
    plugin_calls: Histogram,
    load_durations: Mutex<BTreeMap<String, f64>>,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    starts: Striped::default(),
    crashes: Striped::default(),
    give_ups: Striped::default(),
    monitor_restarts: Counter::default(),
    outbound: Counter::default(),
    send_failures: Counter::default(),
    starved: Counter::default(),
    // 100 µs … ≈ 100 s.
    plugin_calls: Histogram::new(exponential_buckets(0.0001, 4.0, 11)),
    load_durations: Mutex::new(BTreeMap::new()),
});

/// How many slots a [`Striped`] counter has (threads share them when there are more).
const STRIPES: usize = 16;

/// The next slot a thread's [`STRIPE`] takes.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot in every [`Striped`] counter (handed out in turn).
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

/// A counter that every account's start or crash bumps, from several threads at once (the boot
/// threads, the host's workers): each thread adds to a slot of its own, on a cache line of its
/// own, and a scrape sums the slots. One atomic would pass its cache line from core to core on
/// every bump (`scripts/bench S2`, the crash storm, runs about 2 % faster with the slots).
#[derive(Default)]
struct Striped {
    slots: [CachePadded<AtomicU64>; STRIPES],
}

impl Striped {
    fn inc(&self) {
        STRIPE.with(|&slot| self.slots[slot].fetch_add(1, Ordering::Relaxed));
    }

    fn get(&self) -> u64 {
        self.slots
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .sum()
    }
}

/// An account's plugin task was started (the plugin's start handed over its task).
pub fn record_start() {
    COUNTERS.starts.inc();
}

/// An account's task ended without a user's stop (an error or a clean exit).
pub fn record_crash() {
    COUNTERS.crashes.inc();
}

/// The supervisor gave up on an account after the maximum of restarts.
pub fn record_give_up() {
    COUNTERS.give_ups.inc();
}

/// The health monitor restarted an account.
pub fn record_monitor_restart() {
    COUNTERS.monitor_restarts.inc();
}

/// A message was sent through a plugin (the hook for the outbox's sender).
pub fn record_outbound_message() {
    COUNTERS.outbound.inc();
}

/// A send through a plugin failed (the hook for the outbox's sender).
pub fn record_send_failure() {
    COUNTERS.send_failures.inc();
}

/// A plugin's runtime was reported starved: every worker blocked past its threshold
/// ([`crate::health::starvation`]).
pub fn record_starved_runtime() {
    COUNTERS.starved.inc();
}

/// A blocking plugin call took `took`.
pub fn observe_plugin_call(took: Duration) {
    COUNTERS.plugin_calls.observe(took.as_secs_f64());
}

/// Loading the plugin file `file` took `took` (the last load of each file is shown).
pub fn record_plugin_load(file: &str, took: Duration) {
    COUNTERS
        .load_durations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(file.to_owned(), took.as_secs_f64());
}

/// Where the figures read at scrape time come from.
#[derive(Clone)]
pub struct Sources {
    /// The supervisor (snapshot, stale calls).
    pub supervisor: Supervisor,
    /// The plugin catalog, if the daemon manages a plugins directory.
    pub catalog: Option<std::sync::Arc<Catalog>>,
    /// The event hub (journal, connected streams), if the daemon has one.
    pub events: Option<std::sync::Arc<EventHub>>,
    /// The outbox (messages per state), if the daemon has one.
    pub outbox: Option<std::sync::Arc<crate::outbox::Outbox>>,
    /// `[metrics]`.
    pub config: MetricsConfig,
}

type Labels = Vec<(&'static str, String)>;

/// The state an account is in, as one word, from its snapshot.
pub fn account_state(s: &AccountSnapshot) -> &'static str {
    let error = s.last_error.as_deref().unwrap_or("");
    if error.starts_with("stuck") {
        "stuck"
    } else if s.running {
        "running"
    } else if s.restart_pending {
        "restart-pending"
    } else if !s.enabled {
        "disabled"
    } else if !s.configured {
        "not-configured"
    } else if error.contains("giving up after") {
        "gave-up"
    } else if error == "logged out" {
        "logged-out"
    } else {
        "stopped"
    }
}

/// Logged once: per-account series went off by themselves.
static SAID_PER_ACCOUNT_OFF: AtomicBool = AtomicBool::new(false);

fn per_account(config: &MetricsConfig, accounts: usize) -> bool {
    match config.per_account {
        Some(on) => on,
        None if accounts <= PER_ACCOUNT_AUTO_LIMIT => true,
        None => {
            if !SAID_PER_ACCOUNT_OFF.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    accounts,
                    limit = PER_ACCOUNT_AUTO_LIMIT,
                    "metrics: more accounts than the limit, per-account series are off (set [metrics] per_account = true to keep them)"
                );
            }
            false
        }
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

/// Renders every metric as OpenMetrics text.
pub fn render(sources: &Sources) -> String {
    let mut registry = Registry::default();
    accounts(&mut registry, sources);
    let c = &*COUNTERS;
    for (name, help, striped) in [
        ("channeld_starts", "Plugin tasks started.", &c.starts),
        (
            "channeld_crashes",
            "Tasks that ended without a user's stop.",
            &c.crashes,
        ),
        (
            "channeld_give_ups",
            "Accounts given up on after the maximum of restarts.",
            &c.give_ups,
        ),
    ] {
        counter(&mut registry, name, help, striped.get());
    }
    for (name, help, metric) in [
        (
            "channeld_monitor_restarts",
            "Restarts by the health monitor.",
            &c.monitor_restarts,
        ),
        (
            "channeld_outbound_messages",
            "Messages sent through plugins.",
            &c.outbound,
        ),
        (
            "channeld_send_failures",
            "Sends through plugins that failed.",
            &c.send_failures,
        ),
        (
            "channeld_starved_runtime_events",
            "Plugin runtimes seen starved.",
            &c.starved,
        ),
    ] {
        registry.register(name, help, metric.clone());
    }
    counter(
        &mut registry,
        "channeld_stale_handle_calls",
        "Host-service calls dropped because they came from a stale task.",
        sources.supervisor.board().stale_calls(),
    );
    registry.register_with_unit(
        "channeld_plugin_call_duration",
        "Blocking plugin calls (config hooks, starts, 1.0 stop and logout hooks).",
        prometheus_client::registry::Unit::Seconds,
        c.plugin_calls.clone(),
    );
    plugins(&mut registry, sources);
    journal(&mut registry, sources);
    outbox(&mut registry, sources);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

fn accounts(registry: &mut Registry, sources: &Sources) {
    let snapshot = sources.supervisor.snapshot();
    let total: usize = snapshot
        .values()
        .map(crate::status::ChannelSnapshot::len)
        .sum();
    let detailed = per_account(&sources.config, total);
    let states = Family::<Labels, Gauge>::default();
    let connected = Family::<Labels, Gauge>::default();
    let attempts = Family::<Labels, Gauge>::default();
    let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
    for (channel, accounts) in &snapshot {
        for (account, s) in accounts {
            let state = account_state(s);
            *counts.entry(state).or_default() += 1;
            if !detailed {
                continue;
            }
            let who = vec![
                ("channel", channel.clone()),
                ("account", account.to_owned()),
            ];
            let mut with_state = who.clone();
            with_state.push(("state", state.to_owned()));
            states.get_or_create(&with_state).set(1);
            if let Some(c) = s.connected {
                connected.get_or_create(&who).set(i64::from(c));
            }
            attempts
                .get_or_create(&who)
                .set(i64::from(s.reconnect_attempts));
        }
    }
    let by_state = Family::<Labels, Gauge>::default();
    for (state, n) in counts {
        by_state
            .get_or_create(&vec![("state", state.to_owned())])
            .set(n);
    }
    registry.register("channeld_accounts", "Accounts in each state.", by_state);
    if detailed {
        registry.register(
            "channeld_account_state",
            "1 for the account's current state.",
            states,
        );
        registry.register(
            "channeld_account_connected",
            "1 when the plugin reports the account connected, 0 when not.",
            connected,
        );
        registry.register(
            "channeld_account_restart_attempts",
            "The account's restart counter.",
            attempts,
        );
    }
}

fn plugins(registry: &mut Registry, sources: &Sources) {
    let loads = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (file, took) in COUNTERS
        .load_durations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        loads
            .get_or_create(&vec![("file", file.clone())])
            .set(*took);
    }
    registry.register_with_unit(
        "channeld_plugin_load_duration",
        "How long the file's last load took.",
        prometheus_client::registry::Unit::Seconds,
        loads,
    );
    let Some(catalog) = &sources.catalog else {
        return;
    };
    let listing = catalog.listing();
    let loaded_at = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let errors = Family::<Labels, Gauge>::default();
    let mapped = Family::<Labels, Gauge>::default();
    for p in &listing.plugins {
        let who = vec![("channel", p.channel.clone()), ("file", p.file.clone())];
        if let (Some(at), Some(version)) = (p.loaded_at, &p.version) {
            let mut labels = who.clone();
            labels.push(("version", version.clone()));
            loaded_at.get_or_create(&labels).set(at as f64 / 1000.0);
        }
        if p.load_error.is_some() {
            errors.get_or_create(&who).set(1);
        }
        if p.state == "loaded" {
            mapped
                .get_or_create(&vec![("channel", p.channel.clone())])
                .set(p.versions_mapped as i64);
        }
    }
    registry.register(
        "channeld_plugin_loaded_timestamp_seconds",
        "When the file's code was loaded (seconds since the epoch).",
        loaded_at,
    );
    registry.register(
        "channeld_plugin_load_error",
        "1 for each plugin file whose load failed.",
        errors,
    );
    registry.register(
        "channeld_plugin_versions_mapped",
        "Versions of the channel's code mapped in the process (libraries are never unloaded).",
        mapped,
    );
    counter(
        registry,
        "channeld_reconciles",
        "Catalog reconcile steps.",
        listing.reconciles,
    );
}

fn journal(registry: &mut Registry, sources: &Sources) {
    let Some(hub) = &sources.events else {
        return;
    };
    let stats = hub.journal().stats();
    let field = |name: &str| stats.get(name).and_then(serde_json::Value::as_u64);
    let last = field("lastSeq").unwrap_or(0);
    counter(
        registry,
        "channeld_inbound_messages",
        "Inbound messages the journal took.",
        field("appended").unwrap_or(0),
    );
    gauge(
        registry,
        "channeld_journal_size_bytes",
        "Bytes the journal's messages use.",
        field("usedBytes").unwrap_or(0) as i64,
    );
    gauge(
        registry,
        "channeld_journal_messages",
        "Messages the journal retains.",
        field("messages").unwrap_or(0) as i64,
    );
    gauge(
        registry,
        "channeld_journal_last_seq",
        "The journal's last sequence number.",
        last as i64,
    );
    let oldest = field("prunedThrough").unwrap_or(0) + 1;
    gauge(
        registry,
        "channeld_journal_oldest_seq",
        "The oldest sequence number the journal retains (last seq + 1 when it is empty).",
        oldest.min(last + 1) as i64,
    );
    let lags: Vec<u64> = hub
        .consumer_cursors()
        .into_iter()
        .map(|cursor| last.saturating_sub(cursor))
        .collect();
    gauge(
        registry,
        "channeld_event_streams",
        "Connected event streams.",
        lags.len() as i64,
    );
    gauge(
        registry,
        "channeld_consumer_lag_max",
        "The most messages a connected event stream is behind the journal.",
        lags.iter().copied().max().unwrap_or(0) as i64,
    );
    let histogram = Histogram::new(exponential_buckets(1.0, 4.0, 10));
    for lag in lags {
        histogram.observe(lag as f64);
    }
    registry.register(
        "channeld_consumer_lag",
        "Messages each connected event stream is behind the journal.",
        histogram,
    );
}

fn outbox(registry: &mut Registry, sources: &Sources) {
    let Some(outbox) = &sources.outbox else {
        return;
    };
    let counts = match outbox.counts_by_state() {
        Ok(counts) => counts,
        Err(e) => {
            tracing::warn!("metrics: reading the outbox: {e}");
            return;
        }
    };
    let messages = Family::<Labels, Gauge>::default();
    for (state, n) in counts {
        messages
            .get_or_create(&vec![("state", state.to_owned())])
            .set(n);
    }
    registry.register(
        "channeld_outbox_messages",
        "Messages the outbox holds in each state (finished ones until they are pruned).",
        messages,
    );
}

#[cfg(test)]
mod tests {
    use super::Striped;

    /// Every bump counts once, from however many threads: more threads than slots share slots,
    /// and the sum is read across all of them.
    #[test]
    fn a_striped_counter_sums_every_threads_bumps() {
        let counter = Striped::default();
        std::thread::scope(|scope| {
            for _ in 0..super::STRIPES + 3 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        counter.inc();
                    }
                });
            }
        });
        assert_eq!(counter.get(), (super::STRIPES as u64 + 3) * 1_000);
    }
}
