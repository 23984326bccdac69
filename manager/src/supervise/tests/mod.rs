//! The supervisor's rules (docs/behaviour.md: starting, stopping, backoff, giving up, and the
//! failures 1, 3, 4, 5 it avoids) tested with a paused clock against an in-process plugin double.
//!
//! How the tests keep time: every test runs on a current-thread runtime with a paused clock.
//! Tokio advances the paused clock only when every task is idle *and* no blocking call is
//! running (see `calls.rs`), so a test that sleeps `d` of virtual time resumes once everything
//! due before then has happened, in a fixed order, with no real waiting. The double's task
//! futures are tokio timers, so their lifetimes are virtual too.
//!
//! The double's sync entries run on the blocking pool like a real plugin's. A gate ([`Gate`])
//! holds a call's thread until the test opens it; while it does, paused time stands still (only
//! `tokio::time::advance` moves it), so a test never *sleeps* while a gate holds a thread.
//! [`TestPlugin::release_on_drop`] opens every gate and releases every held task when a test ends
//! (also when it fails), so the runtime can shut its blocking pool down.

/// Rule 6: crashes, the backoff numbers with and without jitter, giving up.
mod backoff;
/// The reference's failures 1, 3, 4 and 5, one regression test (or two) each.
mod failures;
/// The health monitor over the real supervisor: failure 2, the 2-hour bound, revival.
mod health;
/// Logout, mark logged out, the health-monitor gate, the snapshot.
mod operations;
/// The supervisor asks its source which version serves a channel and which were removed.
mod serving;
/// Rule 7: start-all's summary, and the startup fan-out limits.
mod start_all;
/// Rules 2–5 and the stop: joining starts, disabled accounts, stops in every phase, slow starts.
mod start_stop;
/// The explicit `state` field and the flags derived from it.
mod state;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Supervisor, policy::FixedJitter};
use crate::{
    clock::SystemClock,
    config::{ChannelSection, SupervisorConfig},
    host::{AccountKey, AccountLink},
    plugin::{BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo, RunningTask},
    status::{AccountSnapshot, StatusBoard},
};

/// One second, for the durations in assertions.
pub(super) const SEC: Duration = Duration::from_secs(1);

/// One scripted run of an account's task (what the next `start_account` does).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Run {
    /// Ends `Ok(())` after this long (earlier if aborted; `Err("cancelled")` if cancelled).
    Ok(Duration),
    /// Ends `Err(message)` after this long (earlier if aborted or cancelled, as above).
    Err(Duration, String),
    /// Runs until aborted (then ends `Ok`) or cancelled.
    UntilAborted,
    /// Ignores the abort: ends only when cancelled on the plugin's runtime (or dropped).
    IgnoreAbort,
    /// Blocks its thread: ignores abort and cancel, stays alive even if the host drops its
    /// future; ends only when the test calls [`TestPlugin::release`].
    BlockThread,
    /// `start_account` fails with this message (no task).
    FailStart(String),
}

/// A sync entry of the plugin, for gates and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Entry {
    IsEnabled,
    IsConfigured,
    Start,
    Stop,
    Logout,
}

/// How often each entry was called for one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Calls {
    pub(super) is_enabled: u32,
    pub(super) is_configured: u32,
    pub(super) start: u32,
    pub(super) stop: u32,
    pub(super) logout: u32,
    pub(super) abort: u32,
    pub(super) cancel: u32,
}

/// Holds the threads that call an entry until the test lets them pass; counts who came.
pub(super) struct Gate {
    state: Mutex<GateState>,
    turn: Condvar,
    entered: watch::Sender<usize>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    passes: usize,
    inside: usize,
    max_inside: usize,
}

impl Gate {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(GateState::default()),
            turn: Condvar::new(),
            entered: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the plugin's entry, on a blocking thread: waits until let through.
    fn pass(&self) {
        let mut state = self.lock();
        state.inside += 1;
        state.max_inside = state.max_inside.max(state.inside);
        self.entered.send_modify(|n| *n += 1);
        while !state.open && state.passes == 0 {
            state = self.turn.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if !state.open {
            state.passes -= 1;
        }
        state.inside -= 1;
    }

    /// Waits (without letting time pass) until `n` calls have arrived at the gate in all.
    pub(super) async fn entered(&self, n: usize) {
        let mut entered = self.entered.subscribe();
        let _ = entered.wait_for(|count| *count >= n).await;
    }

    /// How many calls have arrived so far.
    pub(super) fn arrivals(&self) -> usize {
        *self.entered.borrow()
    }

    /// Lets every call through, now and later.
    pub(super) fn open(&self) {
        self.lock().open = true;
        self.turn.notify_all();
    }

    /// Lets `n` more calls through.
    pub(super) fn allow(&self, n: usize) {
        self.lock().passes += n;
        self.turn.notify_all();
    }

    /// The most calls ever held at once.
    pub(super) fn max_inside(&self) -> usize {
        self.lock().max_inside
    }
}

/// One account's script and record.
struct AccountState {
    enabled: Check,
    configured: Check,
    described_configured: Option<bool>,
    entry_error: HashMap<Entry, String>,
    gates: HashMap<Entry, Arc<Gate>>,
    work: HashMap<Entry, Duration>,
    runs: VecDeque<Run>,
    default_run: Run,
    logout_clears: bool,
    calls: Calls,
    live: usize,
    max_live: usize,
    starts_in_flight: usize,
    max_starts_in_flight: usize,
    start_times: Vec<Duration>,
    last_link: Option<AccountLink>,
}

impl Default for AccountState {
    fn default() -> Self {
        Self {
            enabled: Check::Yes,
            configured: Check::Yes,
            described_configured: None,
            entry_error: HashMap::new(),
            gates: HashMap::new(),
            work: HashMap::new(),
            runs: VecDeque::new(),
            default_run: Run::UntilAborted,
            logout_clears: true,
            calls: Calls::default(),
            live: 0,
            max_live: 0,
            starts_in_flight: 0,
            max_starts_in_flight: 0,
            start_times: Vec::new(),
            last_link: None,
        }
    }
}

/// A started task's controls.
struct TaskCtl {
    account: String,
    abort: CancellationToken,
    cancel: CancellationToken,
    release: CancellationToken,
    /// Held here (not in the future) for a thread-blocking task: it lives until released.
    held: Option<LiveGuard>,
}

#[derive(Default)]
struct Shared {
    accounts: HashMap<String, AccountState>,
    tasks: HashMap<u64, TaskCtl>,
}

/// Counts a task as live for as long as it exists.
struct LiveGuard {
    shared: Arc<Mutex<Shared>>,
    account: String,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = shared.accounts.get_mut(&self.account) {
            a.live -= 1;
        }
    }
}

static NEXT_TASK: AtomicU64 = AtomicU64::new(1);

/// An in-process channel plugin with programmable accounts. Entries count their calls; tasks are
/// tokio timers; the most tasks ever alive at once per account is recorded (it must stay 1).
pub(super) struct TestPlugin {
    info: PluginInfo,
    listed: Mutex<Result<Vec<String>, String>>,
    default_account: Mutex<Option<String>>,
    shared: Arc<Mutex<Shared>>,
    epoch: Instant,
    /// Accounts inside `boot_accounts` calls now (a batch of k counts k).
    booting: watch::Sender<usize>,
    /// The most accounts ever inside `boot_accounts` calls at once.
    max_booting: AtomicU64,
    /// How long `abort_task` keeps its caller after firing the abort (the task ends meanwhile).
    abort_linger: Mutex<Duration>,
    /// Whether the plugin reports each task's first poll (as a 1.1 plugin does): its tasks report
    /// it at the first poll of their end, which is where a test double's task runs.
    reports_polled: AtomicBool,
    /// How many times the host has polled the tasks' ends.
    end_polls: Arc<AtomicU64>,
}

impl TestPlugin {
    /// A plugin for `channel` listing `accounts` (each enabled, configured, running until
    /// aborted unless scripted otherwise).
    pub(super) fn new(channel: &str, accounts: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            info: PluginInfo {
                channel_id: channel.to_owned(),
                display_name: channel.to_owned(),
                plugin_version: "0.0.0".into(),
                abi_version: "test".into(),
                rustc_version: "test".into(),
            },
            listed: Mutex::new(Ok(accounts.iter().map(|a| (*a).to_owned()).collect())),
            default_account: Mutex::new(None),
            shared: Arc::default(),
            epoch: Instant::now(),
            booting: watch::channel(0).0,
            max_booting: AtomicU64::new(0),
            abort_linger: Mutex::new(Duration::ZERO),
            reports_polled: AtomicBool::new(false),
            end_polls: Arc::default(),
        })
    }

    /// Makes the plugin report each task's first poll (see the field).
    pub(super) fn report_first_polls(&self) {
        self.reports_polled.store(true, Ordering::SeqCst);
    }

    /// How many times the host has polled the tasks' ends.
    pub(super) fn end_polls(&self) -> u64 {
        self.end_polls.load(Ordering::SeqCst)
    }

    /// Makes `abort_task` keep its caller's thread for `linger` after it fires the abort (real
    /// time: for a multi-threaded runtime, where the task's end is seen meanwhile).
    pub(super) fn linger_in_abort(&self, linger: Duration) {
        *self.abort_linger.lock().unwrap() = linger;
    }

    /// Waits (without letting time pass) until at least `n` accounts are inside `boot_accounts`
    /// calls.
    pub(super) async fn booting(&self, n: usize) {
        let mut booting = self.booting.subscribe();
        let _ = booting.wait_for(|now| *now >= n).await;
    }

    /// Accounts inside `boot_accounts` calls now.
    pub(super) fn booting_now(&self) -> usize {
        *self.booting.borrow()
    }

    /// The most accounts ever inside `boot_accounts` calls at once.
    pub(super) fn max_booting(&self) -> usize {
        self.max_booting.load(Ordering::SeqCst) as usize
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, account: &str, f: impl FnOnce(&mut AccountState) -> T) -> T {
        f(self
            .shared()
            .accounts
            .entry(account.to_owned())
            .or_default())
    }

    fn error(&self, entry: &'static str, message: impl Into<String>) -> PluginCallError {
        PluginCallError {
            channel: self.info.channel_id.clone(),
            entry,
            message: message.into(),
        }
    }

    // --- programming ---

    /// Makes the account listing fail.
    pub(super) fn fail_listing(&self, message: &str) {
        *self.listed.lock().unwrap() = Err(message.to_owned());
    }

    /// Names the plugin's default account.
    pub(super) fn set_default_account(&self, account: Option<&str>) {
        *self.default_account.lock().unwrap() = account.map(str::to_owned);
    }

    /// Queues runs for the account's next starts.
    pub(super) fn script(&self, account: &str, runs: impl IntoIterator<Item = Run>) {
        self.with(account, |a| a.runs.extend(runs));
    }

    /// What a start does once the script is used up.
    pub(super) fn set_default_run(&self, account: &str, run: Run) {
        self.with(account, |a| a.default_run = run);
    }

    pub(super) fn set_enabled(&self, account: &str, check: Check) {
        self.with(account, |a| a.enabled = check);
    }

    pub(super) fn set_configured(&self, account: &str, check: Check) {
        self.with(account, |a| a.configured = check);
    }

    /// The `configured` boolean of the account's description (none: no description).
    pub(super) fn set_described_configured(&self, account: &str, configured: Option<bool>) {
        self.with(account, |a| a.described_configured = configured);
    }

    /// Makes the entry fail with `message` for the account.
    pub(super) fn fail_entry(&self, account: &str, entry: Entry, message: &str) {
        self.with(account, |a| a.entry_error.insert(entry, message.to_owned()));
    }

    pub(super) fn set_logout_clears(&self, account: &str, clears: bool) {
        self.with(account, |a| a.logout_clears = clears);
    }

    /// Makes the entry take `real` wall-clock time for the account (work, not synchronisation:
    /// it shows that a paused clock does not move while a plugin call runs).
    pub(super) fn set_work(&self, account: &str, entry: Entry, real: Duration) {
        self.with(account, |a| a.work.insert(entry, real));
    }

    /// Puts a new gate in front of the entry for the account.
    pub(super) fn gate(&self, account: &str, entry: Entry) -> Arc<Gate> {
        let gate = Gate::new();
        self.set_gate(account, entry, gate.clone());
        gate
    }

    /// Puts `gate` (maybe shared with other accounts) in front of the entry for the account.
    pub(super) fn set_gate(&self, account: &str, entry: Entry, gate: Arc<Gate>) {
        self.with(account, |a| a.gates.insert(entry, gate));
    }

    /// Ends the account's thread-blocking tasks.
    pub(super) fn release(&self, account: &str) {
        let held: Vec<LiveGuard> = {
            let mut shared = self.shared();
            shared
                .tasks
                .values_mut()
                .filter(|t| t.account == account)
                .filter_map(|t| {
                    t.release.cancel();
                    t.held.take()
                })
                .collect()
        };
        drop(held);
    }

    /// Opens every gate and ends every held task (see the module docs).
    pub(super) fn release_on_drop(self: &Arc<Self>) -> ReleaseOnDrop {
        ReleaseOnDrop(self.clone())
    }

    // --- record ---

    pub(super) fn calls(&self, account: &str) -> Calls {
        self.with(account, |a| a.calls)
    }

    /// Tasks of the account alive now.
    pub(super) fn live(&self, account: &str) -> usize {
        self.with(account, |a| a.live)
    }

    /// The most tasks of the account ever alive at once.
    pub(super) fn max_live(&self, account: &str) -> usize {
        self.with(account, |a| a.max_live)
    }

    /// The most `start_account` calls for the account ever in flight at once.
    pub(super) fn max_starts_in_flight(&self, account: &str) -> usize {
        self.with(account, |a| a.max_starts_in_flight)
    }

    /// When each `start_account` call came, since the plugin was made (paused time).
    pub(super) fn start_times(&self, account: &str) -> Vec<Duration> {
        self.with(account, |a| a.start_times.clone())
    }

    /// The host handle the account's last task received.
    pub(super) fn link(&self, account: &str) -> AccountLink {
        self.with(account, |a| a.last_link.clone())
            .expect("the account was started")
    }

    /// Counts a call and passes its gate, if any. Returns the entry's scripted error.
    fn enter(&self, account: &str, entry: Entry) -> Option<String> {
        let gate = self.with(account, |a| {
            let calls = &mut a.calls;
            match entry {
                Entry::IsEnabled => calls.is_enabled += 1,
                Entry::IsConfigured => calls.is_configured += 1,
                Entry::Start => calls.start += 1,
                Entry::Stop => calls.stop += 1,
                Entry::Logout => calls.logout += 1,
            }
            (a.gates.get(&entry).cloned(), a.work.get(&entry).copied())
        });
        let (gate, work) = gate;
        if let Some(gate) = gate {
            gate.pass();
        }
        if let Some(work) = work {
            std::thread::sleep(work);
        }
        self.with(account, |a| a.entry_error.get(&entry).cloned())
    }

    fn task_account(&self, task: u64) -> Option<String> {
        self.shared().tasks.get(&task).map(|t| t.account.clone())
    }

    fn spawn_task(&self, account: &str, run: Run, link: AccountLink) -> RunningTask {
        let id = NEXT_TASK.fetch_add(1, Ordering::Relaxed);
        let (abort, cancel, release) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let first_poll = self
            .reports_polled
            .load(Ordering::SeqCst)
            .then(|| link.clone());
        let guard = {
            let mut shared = self.shared();
            let a = shared.accounts.entry(account.to_owned()).or_default();
            a.live += 1;
            a.max_live = a.max_live.max(a.live);
            a.last_link = Some(link);
            LiveGuard {
                shared: self.shared.clone(),
                account: account.to_owned(),
            }
        };
        let blocks = run == Run::BlockThread;
        let (end, on_abort, on_cancel) = match run {
            Run::Ok(d) => (Some((d, Ok(()))), true, true),
            Run::Err(d, message) => (Some((d, Err(message))), true, true),
            Run::UntilAborted => (None, true, true),
            Run::IgnoreAbort => (None, false, true),
            Run::BlockThread => (None, false, false),
            Run::FailStart(_) => unreachable!("handled by start_account"),
        };
        let (in_future, held) = if blocks {
            (None, Some(guard))
        } else {
            (Some(guard), None)
        };
        self.shared().tasks.insert(
            id,
            TaskCtl {
                account: account.to_owned(),
                abort: abort.clone(),
                cancel: cancel.clone(),
                release: release.clone(),
                held,
            },
        );
        let end = end.map(|(d, result)| (Instant::now() + d, result));
        let done = async move {
            let _alive = in_future;
            let natural = async move {
                match end {
                    Some((deadline, result)) => {
                        tokio::time::sleep_until(deadline).await;
                        result
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = release.cancelled() => Ok(()),
                () = cancel.cancelled(), if on_cancel => Err("cancelled".to_owned()),
                () = abort.cancelled(), if on_abort => Ok(()),
                result = natural => result,
            }
        };
        let (polls, mut first_poll, mut done) =
            (self.end_polls.clone(), first_poll, Box::pin(done));
        let counted = std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            if let Some(link) = first_poll.take() {
                link.task_polled();
            }
            done.as_mut().poll(cx)
        });
        RunningTask {
            id,
            done: crate::plugin::TaskEnd::boxed(counted),
        }
    }
}

/// See [`TestPlugin::release_on_drop`].
pub(super) struct ReleaseOnDrop(Arc<TestPlugin>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let (gates, accounts): (Vec<Arc<Gate>>, Vec<String>) = {
            let shared = self.0.shared();
            (
                shared
                    .accounts
                    .values()
                    .flat_map(|a| a.gates.values().cloned())
                    .collect(),
                shared.accounts.keys().cloned().collect(),
            )
        };
        for gate in gates {
            gate.open();
        }
        for account in accounts {
            self.0.release(&account);
        }
    }
}

impl Plugin for TestPlugin {
    fn info(&self) -> &PluginInfo {
        &self.info
    }

    fn configure(&self, _channel_config: &Value) -> Result<(), PluginCallError> {
        Ok(())
    }

    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError> {
        self.listed
            .lock()
            .unwrap()
            .clone()
            .map_err(|e| self.error("list_account_ids", e))
    }

    fn default_account_id(&self) -> Result<Option<String>, PluginCallError> {
        Ok(self.default_account.lock().unwrap().clone())
    }

    fn resolve_account(&self, _account: &str) -> Result<Value, PluginCallError> {
        Ok(json!({}))
    }

    fn is_enabled(&self, account: &str) -> Result<Check, PluginCallError> {
        if let Some(e) = self.enter(account, Entry::IsEnabled) {
            return Err(self.error("is_enabled", e));
        }
        Ok(self.with(account, |a| a.enabled.clone()))
    }

    fn is_configured(&self, account: &str) -> Result<Check, PluginCallError> {
        if let Some(e) = self.enter(account, Entry::IsConfigured) {
            return Err(self.error("is_configured", e));
        }
        Ok(self.with(account, |a| a.configured.clone()))
    }

    fn describe_account(&self, account: &str) -> Result<Option<Value>, PluginCallError> {
        Ok(self.with(account, |a| {
            a.described_configured
                .map(|configured| json!({ "configured": configured }))
        }))
    }

    fn start_account(
        &self,
        account: &str,
        link: AccountLink,
    ) -> Result<RunningTask, PluginCallError> {
        let now = Instant::now().duration_since(self.epoch);
        self.with(account, |a| {
            a.starts_in_flight += 1;
            a.max_starts_in_flight = a.max_starts_in_flight.max(a.starts_in_flight);
            a.start_times.push(now);
        });
        let error = self.enter(account, Entry::Start);
        let run = self.with(account, |a| {
            a.starts_in_flight -= 1;
            a.runs.pop_front().unwrap_or_else(|| a.default_run.clone())
        });
        if let Some(e) = error {
            return Err(self.error("start_account", e));
        }
        match run {
            Run::FailStart(message) => Err(self.error("start_account", message)),
            run => Ok(self.spawn_task(account, run, link)),
        }
    }

    fn abort_task(&self, task: u64) -> bool {
        let Some(account) = self.task_account(task) else {
            return false;
        };
        self.with(&account, |a| a.calls.abort += 1);
        if let Some(t) = self.shared().tasks.get(&task) {
            t.abort.cancel();
        }
        let linger = *self.abort_linger.lock().unwrap();
        if !linger.is_zero() {
            std::thread::sleep(linger);
        }
        true
    }

    fn cancel_task(&self, task: u64) -> bool {
        let Some(account) = self.task_account(task) else {
            return false;
        };
        self.with(&account, |a| a.calls.cancel += 1);
        if let Some(t) = self.shared().tasks.get(&task) {
            t.cancel.cancel();
        }
        true
    }

    fn stop_account(&self, account: &str) -> Result<(), PluginCallError> {
        match self.enter(account, Entry::Stop) {
            Some(e) => Err(self.error("stop_account", e)),
            None => Ok(()),
        }
    }

    fn logout(&self, account: &str) -> Result<bool, PluginCallError> {
        match self.enter(account, Entry::Logout) {
            Some(e) => Err(self.error("logout", e)),
            None => Ok(self.with(account, |a| a.logout_clears)),
        }
    }

    fn send(&self, _message: Outbound) -> BoxFuture<Result<String, PluginCallError>> {
        let error = self.error("send", "the test double does not send");
        Box::pin(async move { Err(error) })
    }

    fn reports_task_polled(&self) -> bool {
        self.reports_polled.load(Ordering::SeqCst)
    }

    fn boot_accounts(
        &self,
        batch: Vec<(String, AccountLink)>,
    ) -> Vec<Result<crate::plugin::BootStep, PluginCallError>> {
        let size = batch.len();
        self.booting.send_modify(|now| {
            *now += size;
            self.max_booting.fetch_max(*now as u64, Ordering::SeqCst);
        });
        let steps = crate::plugin::boot_each(self, batch);
        self.booting.send_modify(|now| *now -= size);
        steps
    }

    fn shutdown(&self) -> Result<(), PluginCallError> {
        Ok(())
    }
}

// --- the supervisor under test ---

/// A supervisor with `policy`, the paused tokio clock and a fixed jitter.
pub(super) fn supervisor_with(policy: SupervisorConfig, jitter: f64) -> Supervisor {
    let clock = Arc::new(SystemClock);
    let board = Arc::new(StatusBoard::new(clock.clone()));
    Supervisor::new(
        policy,
        Duration::from_secs(10),
        board,
        clock,
        Arc::new(FixedJitter(jitter)),
    )
}

/// A supervisor with the default policy and no jitter.
pub(super) fn supervisor() -> Supervisor {
    supervisor_with(SupervisorConfig::default(), 0.0)
}

/// Registers `plugin` with an empty channel table.
pub(super) async fn add(sup: &Supervisor, plugin: &Arc<TestPlugin>) {
    add_with(sup, plugin, json!({})).await;
}

/// Registers `plugin` with `table` as its channel's config.
pub(super) async fn add_with(sup: &Supervisor, plugin: &Arc<TestPlugin>, table: Value) {
    let plugin: Arc<dyn Plugin> = plugin.clone();
    sup.add_channel(plugin, ChannelSection { table })
        .await
        .expect("the channel registers");
}

/// `channel:account`.
pub(super) fn key(channel: &str, account: &str) -> AccountKey {
    AccountKey::new(channel, account)
}

/// The account's status-board snapshot.
pub(super) fn snap(sup: &Supervisor, channel: &str, account: &str) -> AccountSnapshot {
    sup.board()
        .get(&key(channel, account))
        .expect("the account has a status")
}

/// Starts one account as a user; its outcome.
pub(super) async fn start(sup: &Supervisor, channel: &str, account: &str) -> super::StartOutcome {
    let mut outcomes = sup
        .start(channel, Some(account))
        .await
        .expect("known account");
    outcomes.pop().expect("one outcome").1
}

/// Stops one account as a user; its outcome.
pub(super) async fn stop(sup: &Supervisor, channel: &str, account: &str) -> super::StopOutcome {
    let mut outcomes = sup
        .stop(channel, Some(account))
        .await
        .expect("known account");
    outcomes.pop().expect("one outcome").1
}

/// The phase of the account's lifecycle, if it has one (the supervisor's own bookkeeping).
pub(super) fn phase(sup: &Supervisor, channel: &str, account: &str) -> Option<super::Phase> {
    sup.lock()
        .accounts
        .get(&key(channel, account))
        .and_then(|e| e.lifecycle.as_ref())
        .map(|lc| lc.shared.phase())
}

/// Runs `fut`, raising `polled` once it has been polled (a start joins a boot or reserves its
/// slot in its first poll, before any await).
pub(super) async fn flag_polled<F: std::future::Future>(
    polled: Arc<AtomicBool>,
    fut: F,
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        let result = fut.as_mut().poll(cx);
        polled.store(true, Ordering::SeqCst);
        result
    })
    .await
}

/// Lets virtual time pass (everything due in it happens first).
pub(super) async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Waits, without letting time pass, until `cond` holds (other tasks run meanwhile).
pub(super) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// Moves paused time forward by hand in `step`s until `done` holds (for when a gate holds a
/// thread and time would not move by itself); how much time that took (a woken task may need
/// one more step to finish, so callers compare with a range of one step).
pub(super) async fn advance_until(
    step: Duration,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let from = Instant::now();
    while !done() {
        assert!(from.elapsed() <= limit, "not done within {limit:?}");
        tokio::time::advance(step).await;
    }
    from.elapsed()
}
