//! The restart supervisor: every configured account of every channel runs as a long-lived task,
//! restarted with exponential backoff and jitter when it ends, given up on after the maximum, and
//! stopped for good when a user says so (a manual stop always wins).
//!
//! Shape: one lifecycle per account (boot → run → backoff → boot …, in `lifecycle.rs`), a future
//! run by one of a few lifecycle drivers (`driver.rs`: one task per core polling its lifecycles,
//! woken once for many of them), not a tokio task each. It is kept small: its future is a few
//! hundred bytes (the boot, the backoff and the stop sequence boxed, as they are passing states),
//! and one shared cell (`Shared`) carries its phase, its stop signal,
//! the first-poll report of its task, its boot outcomes and its end, with no watch channel,
//! cancellation token or flag per boot. One lock covers all accounts' bookkeeping (`State`),
//! never held across a plugin call or an await. A start or stop of many accounts is one batch:
//! its first steps run under one lock of `State`, one deadline bounds its starts, and its stops
//! fire their tasks' aborts with one call per plugin version. A channel's boots run on its boot
//! pool (`boot.rs`): a few blocking threads that take queued boots in batches, at most the startup
//! fan-out of accounts booting at once, each batch one `Plugin::boot_accounts` call. Other
//! synchronous plugin calls run on the blocking pool with time bounds ([`calls`]). The drivers are
//! tracked, and a driver lives exactly as long as it has lifecycles, so shutdown is close, cancel,
//! wait.
//!
//! Which registration (plugin version, config, accounts) serves a channel, and which channels were
//! removed, are not the supervisor's to keep: it asks its [`Serving`] source every time (the
//! catalog in the daemon, see [`serving`]).
//!
//! The `tests` module checks every rule with a paused clock against an in-process plugin double.
//!
//! The rules are those of docs/behaviour.md (starting, stopping, backoff, giving up), including
//! the fixes for the known failures 1 (zombie after a stop timeout), 3 (dead forever after the 10th
//! crash), 4 (restart lost when an abort races the backoff) and 5 (duplicate tasks).

mod account_ids;
mod boot;
pub mod calls;
mod driver;
mod hot;
mod lifecycle;
mod monitor;
pub mod policy;
mod reconfigure;
mod restart_log;
pub mod serving;
#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use channeld_plugin_abi::{DEFAULT_ACCOUNT_ID, normalize_account_id};
use futures_util::future::join_all;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use self::account_ids::AccountIds;
pub use self::reconfigure::ChannelReload;
pub use self::serving::Serving;
use self::{
    calls::bounded,
    policy::Jitter,
    restart_log::RestartLog,
    serving::{Source, Table},
};
use crate::{
    clock::Clock,
    config::{ChannelSection, SupervisorConfig},
    host::AccountKey,
    plugin::{Check, Plugin},
    status::{AccountBoard, AccountSnapshot, AccountState, Snapshot, StatusBoard},
};

/// What a start did, per account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "kebab-case")]
pub enum StartOutcome {
    /// The task is running.
    Started,
    /// It was running already; nothing changed.
    AlreadyRunning,
    /// Disabled in the config (with the reason shown).
    Disabled(String),
    /// Not configured (with the reason shown).
    NotConfigured(String),
    /// The plugin's start (or a config hook) failed; an automatic restart is scheduled.
    Failed(String),
    /// The start did not hand over its task within the start timeout (the boot goes on: a task
    /// the plugin hands over later runs as the account's task).
    TimedOut(String),
    /// Refused: a previous task is stuck (with the reason).
    Refused(String),
    /// A stop arrived while it was booting: the plugin's start was not called.
    Stopped,
}

/// What a stop did, per account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "kebab-case")]
pub enum StopOutcome {
    /// Not running (any more).
    Stopped,
    /// The task ignored its abort and was cancelled on the plugin's runtime after the timeout.
    Cancelled,
    /// The task would not end (it blocks its thread), or the plugin's start it was booting with
    /// did not return; it is reported as stuck and starts are refused until it ends.
    Stuck(String),
    /// The task ended, but the plugin's stop hook failed (an error or a panic, with why; also in
    /// the account's `lastError`).
    HookFailed(String),
}

/// A request the supervisor refuses as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// No plugin provides the channel.
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    /// The channel's config does not list the account.
    #[error("unknown account {0}")]
    UnknownAccount(AccountKey),
    /// A plugin call failed.
    #[error("{0}")]
    Plugin(String),
    /// The supervisor is shutting down.
    #[error("channeld is shutting down")]
    ShuttingDown,
}

/// Per channel: how many starts were attempted, and how they went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChannelStartSummary {
    /// Accounts whose start was attempted.
    pub attempted: usize,
    /// Running afterwards (including already running).
    pub started: usize,
    /// Failed (including disabled, not configured, refused).
    pub failed: usize,
    /// Did not hand over their task within the start timeout.
    pub timed_out: usize,
    /// A channel-level failure (e.g. listing its accounts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Who starts an account, which decides what the start resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartMode {
    /// A user: clears the manual-stop mark and the restart counter.
    User,
    /// The health monitor or a plugin replacement bringing back an account the host stopped
    /// itself: clears the manual-stop mark its own stop set, and resets the counter only when
    /// asked (a gave-up account gets one start, not a fresh budget).
    Revive {
        /// Whether to reset the restart counter.
        reset_counter: bool,
    },
}

/// The phase of a lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Booting,
    Running,
    Backoff,
    Stopping,
}

/// What a lifecycle, its handle and its account's links share: the phase (written by the
/// lifecycle without taking the state's lock; a stop's `Stopping` is final), the stop signal, the
/// first-poll report of the current task, what the lifecycle publishes, and the wake-up a user start
/// gives a backoff. One allocation per account for all of it: no cancellation token (a child of
/// one shared parent, whose lock every account's start, stop and end would take), no flag per boot.
#[derive(Debug)]
struct Shared {
    phase: std::sync::atomic::AtomicU8,
    /// A stop has landed (set once: a later start makes a new lifecycle).
    stop: std::sync::atomic::AtomicBool,
    /// The generation whose task the plugin's runtime has polled (0: none yet).
    polled: std::sync::atomic::AtomicU64,
    /// The generation whose first poll the lifecycle is waiting for (0: none): a first poll wakes
    /// the lifecycle only then (one reported while the boot is still being answered needs no
    /// wake-up, the lifecycle sees it when it gets there).
    awaiting_poll: std::sync::atomic::AtomicU64,
    /// The plugin's id of the account's running task (0: none).
    task: std::sync::atomic::AtomicU64,
    /// The task a stop has aborted already (0: none), so its stop sequence skips the abort.
    aborted: std::sync::atomic::AtomicU64,
    /// A user start asked the lifecycle to cut its backoff short (see `wake_backoff`).
    woken: std::sync::atomic::AtomicBool,
    /// The running task's end has woken the lifecycle since its end was last polled (see
    /// [`Shared::poll_end`]).
    end_woken: std::sync::atomic::AtomicBool,
    /// The mark of the lifecycle's boot queued on the channel's boot pool (it has at most one
    /// there): set by the pool's thread that takes it, or by the lifecycle withdrawing it
    /// (`boot::Claim`); cleared before each boot is queued.
    boot_claimed: std::sync::atomic::AtomicBool,
    /// The account's restart count while this lifecycle lives (its one owner then: the account's
    /// bookkeeping reads and writes it here, see `AccountEntry::attempts`, and takes it back when
    /// the lifecycle ends). The lifecycle counts a crash here without the state's lock.
    attempts: std::sync::atomic::AtomicU32,
    /// The account's part of the status board, from the lifecycle's first boot on (the account's
    /// entry may not exist before: an account never written shows as unwritten). Its task's links
    /// report through it, with this cell as their sink.
    board: std::sync::OnceLock<AccountBoard>,
    /// What the lifecycle publishes (its boot outcomes and its end), and the batches waiting for
    /// it (see [`Batch`]: every wait for a lifecycle is one).
    event: Mutex<BootEvent>,
    /// Wakes the lifecycle itself at the stop or a first poll (it alone waits for those: a
    /// waker slot, a few bytes in its future where a `Notify` wait would take dozens).
    lifecycle: futures_util::task::AtomicWaker,
}

impl Shared {
    /// A lifecycle's cell, for an account whose restart count is `attempts`.
    fn new(attempts: u32) -> Self {
        Self {
            attempts: std::sync::atomic::AtomicU32::new(attempts),
            phase: std::sync::atomic::AtomicU8::new(Phase::Booting as u8),
            stop: std::sync::atomic::AtomicBool::new(false),
            polled: std::sync::atomic::AtomicU64::new(0),
            awaiting_poll: std::sync::atomic::AtomicU64::new(0),
            task: std::sync::atomic::AtomicU64::new(0),
            aborted: std::sync::atomic::AtomicU64::new(0),
            woken: std::sync::atomic::AtomicBool::new(false),
            end_woken: std::sync::atomic::AtomicBool::new(false),
            boot_claimed: std::sync::atomic::AtomicBool::new(false),
            board: std::sync::OnceLock::new(),
            event: Mutex::new(BootEvent::default()),
            lifecycle: futures_util::task::AtomicWaker::new(),
        }
    }

    /// The account's restart count (see the field).
    fn attempts(&self) -> u32 {
        self.attempts.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sets the restart count (a user's start or reset, through `AccountEntry::set_attempts`).
    fn set_attempts(&self, attempts: u32) {
        self.attempts
            .store(attempts, std::sync::atomic::Ordering::Release);
    }

    /// Counts a crash: the restart count after it, 1 if the run that ended had been stable
    /// (`reset`), else one more. One atomic step: a reset by a user's start at the same moment
    /// lands either before it (the count is then 1) or after it (0), as under a lock.
    fn count_crash(&self, reset: bool) -> u32 {
        use std::sync::atomic::Ordering;
        let next = |attempts: u32| if reset { 1 } else { attempts.saturating_add(1) };
        let previous = self
            .attempts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |attempts| {
                Some(next(attempts))
            })
            .unwrap_or_else(|attempts| attempts);
        next(previous)
    }

    fn event(&self) -> MutexGuard<'_, BootEvent> {
        // Plain fields: a poisoned lock only means a panic between two plain updates.
        self.event.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says the stop left news in the account's bookkeeping (see [`BootEvent::stop_news`]).
    fn mark_stop_news(&self) {
        self.event().stop_news = true;
    }

    /// Changes the published event and reports to every batch it satisfies.
    fn publish(&self, f: impl FnOnce(&mut BootEvent)) {
        let mut event = self.event();
        f(&mut event);
        event.report();
    }

    /// Cuts the lifecycle's backoff short (a user start does not wait it out).
    fn wake_backoff(&self) {
        self.woken.store(true, std::sync::atomic::Ordering::SeqCst);
        self.lifecycle.wake();
    }

    /// Clears the boot mark, before a boot is queued.
    fn unclaim_boot(&self) {
        self.boot_claimed
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Sets the boot mark; whether this call set it (then the caller owns the queued boot).
    fn claim_boot(&self) -> bool {
        !self
            .boot_claimed
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Whether a user start asked to cut the backoff short.
    fn woken(&self) -> bool {
        self.woken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets a wake-up left from an earlier backoff: called before a backoff begins, so a start
    /// that saw that backoff ending cannot cut the next one short (a start wakes only a lifecycle
    /// whose phase says backoff, which is set after this).
    fn clear_woken(&self) {
        self.woken.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Fires the stop signal and wakes the lifecycle.
    fn request_stop(&self) {
        self.mark_stop();
        self.lifecycle.wake();
    }

    /// Sets the stop signal without waking the lifecycle yet: a stop of many accounts sets every
    /// signal before it fires their tasks' aborts, so a lifecycle woken by its task's end (the
    /// abort) sees the stop, not a task that ended by itself.
    fn mark_stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records the running task's id (0: none), for a stop's batched abort.
    fn set_task(&self, task: u64) {
        self.task.store(task, std::sync::atomic::Ordering::Release);
    }

    /// The running task (0: none).
    fn task(&self) -> u64 {
        self.task.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records that a stop has fired `task`'s abort (so its stop sequence skips its own).
    fn mark_aborted(&self, task: u64) {
        self.aborted
            .store(task, std::sync::atomic::Ordering::Release);
    }

    /// Whether a stop has fired `task`'s abort already.
    fn aborted(&self, task: u64) -> bool {
        self.aborted.load(std::sync::atomic::Ordering::Acquire) == task
    }

    /// Whether the task of `generation` has been polled.
    fn polled(&self, generation: u64) -> bool {
        // SeqCst, with `await_poll` and `task_polled`: either this load sees the report, or the
        // report sees the lifecycle waiting and wakes it.
        self.polled.load(std::sync::atomic::Ordering::SeqCst) == generation
    }

    /// The lifecycle waits for the first poll of `generation`'s task from here (0: no more).
    fn await_poll(&self, generation: u64) {
        self.awaiting_poll
            .store(generation, std::sync::atomic::Ordering::SeqCst);
    }

    /// Completes once `done` holds, checked whenever the lifecycle is woken (by the stop or a
    /// first poll). Only the lifecycle's own task waits with it (one waker slot).
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: it changes nothing.
    fn until<'a>(
        &'a self,
        done: impl Fn(&Self) -> bool + 'a,
    ) -> impl std::future::Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            // Registered before the check, so a change between the two is not missed.
            self.lifecycle.register(cx.waker());
            if done(self) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// Completes once a stop has landed (the lifecycle's own wait, see [`until`](Self::until)).
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: the signal stays set for the next wait.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.until(Self::stop_requested)
    }

    /// Polls the running task's end only when it can have moved: at its first poll (`first`,
    /// which the caller then clears), and after the end's own wake-up since the last poll. The
    /// end is polled with this cell as its waker, which notes the wake-up and wakes the
    /// lifecycle: a lifecycle woken for something else (its task's first poll, a stop) does not
    /// poll its task's end across the plugin boundary again, which would hand the plugin's
    /// runtime a new waker to store each time.
    ///
    /// The lifecycle's waker must be registered in this cell before (every wait of the
    /// lifecycle's does that first, see [`until`](Self::until)), or the wake-up is noted but
    /// wakes nobody.
    fn poll_end(
        self: &Arc<Self>,
        end: &mut crate::plugin::TaskEnd,
        first: &mut bool,
    ) -> std::task::Poll<Result<(), String>> {
        use std::{future::Future, pin::Pin, sync::atomic::Ordering};
        if !std::mem::take(first) && !self.end_woken.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(self.clone());
        Pin::new(end).poll(&mut std::task::Context::from_waker(&waker))
    }

    fn phase(&self) -> Phase {
        match self.phase.load(std::sync::atomic::Ordering::Acquire) {
            0 => Phase::Booting,
            1 => Phase::Running,
            2 => Phase::Backoff,
            _ => Phase::Stopping,
        }
    }

    /// Sets `phase`, unless a stop has set `Stopping` (which no later phase undoes).
    fn set_phase(&self, phase: Phase) {
        let _ = self.phase.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |now| (now != Phase::Stopping as u8 || phase == Phase::Stopping).then_some(phase as u8),
        );
    }
}

/// The waker of the running task's end (see [`Shared::poll_end`]): notes the wake-up, and wakes
/// the lifecycle.
impl std::task::Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.end_woken
            .store(true, std::sync::atomic::Ordering::Release);
        self.lifecycle.wake();
    }
}

impl Shared {
    /// The account's part of the status board, once the lifecycle's first boot has begun.
    fn board_after_first_boot(&self) -> Option<&AccountBoard> {
        self.board.get()
    }

    /// Keeps the account's part of the status board (handed out at the lifecycle's first boot).
    fn set_account_board(&self, board: AccountBoard) {
        // Set once: only the lifecycle's first boot hands one out.
        let _ = self.board.set(board);
    }

    /// The account's part of the status board, for the lifecycle's writes after its first boot
    /// began and for its task's links (made after that).
    fn link_board(&self) -> &AccountBoard {
        self.board_after_first_boot()
            .expect("the lifecycle's first boot has begun")
    }
}

/// A lifecycle's cell is its task's links' sink: their host calls go to the account's entry on
/// the board (see [`AccountBoard`]) without a lookup.
impl crate::status::HoldsAccountBoard for Shared {
    fn account_board(&self) -> &AccountBoard {
        self.link_board()
    }
}

impl crate::host::TaskSignals for Shared {
    fn task_polled(&self, generation: u64) {
        let before = self
            .polled
            .swap(generation, std::sync::atomic::Ordering::SeqCst);
        if before != generation
            && self.awaiting_poll.load(std::sync::atomic::Ordering::SeqCst) == generation
        {
            self.lifecycle.wake();
        }
    }

    fn stop_requested(&self) -> bool {
        Shared::stop_requested(self)
    }
}

/// What a lifecycle publishes: its boot outcomes, numbered so a joining start waits for the next
/// one, and its end; those waiting for either are batches registered here, told when it is
/// published.
#[derive(Debug, Default)]
struct BootEvent {
    seq: u64,
    outcome: Option<StartOutcome>,
    /// The lifecycle has ended (its slot is free).
    ended: bool,
    /// Its stop left news in the account's bookkeeping (stuck, cancelled, a failed hook): the
    /// stop's outcome is read there (otherwise it is a plain `stopped`).
    stop_news: bool,
    /// Batches of starts or stops waiting for this lifecycle (see [`Batch`]): usually one, kept
    /// in place (no allocation per start or stop waited for).
    waiting: smallvec::SmallVec<[Waiter; 1]>,
}

impl BootEvent {
    /// Reports to every waiting batch this event satisfies (and forgets them).
    fn report(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let (seq, ended) = (self.seq, self.ended);
        let outcome = &self.outcome;
        self.waiting.retain(|w| {
            let result = match w.after {
                // A start: the first boot outcome after `seen`, or `stopped` if the lifecycle
                // ended without one (a stop during the backoff).
                Some(seen) => match outcome {
                    Some(outcome) if seq > seen => Some(outcome.clone()),
                    _ if ended => Some(StartOutcome::Stopped),
                    _ => return true,
                },
                // A stop: the end.
                None if ended => None,
                None => return true,
            };
            w.batch.arrive(w.index, result);
            false
        });
        if self.waiting.spilled() && self.waiting.is_empty() {
            // Not kept for the life of the account: most accounts are waited for once or twice.
            self.waiting = smallvec::SmallVec::new();
        }
    }
}

/// A lifecycle's place in a [`Batch`].
#[derive(Debug)]
struct Waiter {
    batch: Arc<Batch>,
    index: usize,
    /// `Some(seen)`: a start waiting for a boot outcome published after `seen` (or the end);
    /// `None`: a stop waiting for the end.
    after: Option<u64>,
}

/// One wait for many lifecycles (a start or stop of many accounts): each reports to it when its
/// event satisfies the wait, instead of one waiting future per account.
#[derive(Debug)]
struct Batch {
    left: std::sync::atomic::AtomicUsize,
    /// What each start's lifecycle published (unset for a stop, or not yet): one slot per
    /// member, set without a lock shared by the members.
    results: Box<[std::sync::OnceLock<StartOutcome>]>,
    done: Notify,
}

impl Batch {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            left: std::sync::atomic::AtomicUsize::new(0),
            results: (0..size).map(|_| std::sync::OnceLock::new()).collect(),
            done: Notify::new(),
        })
    }

    /// Makes `shared` report to this batch as member `index` (`after` as in [`Waiter`]), or
    /// counts it as arrived at once if its event satisfies the wait already.
    fn join(self: &Arc<Self>, shared: &Shared, index: usize, after: Option<u64>) {
        self.left.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let mut event = shared.event();
        event.waiting.push(Waiter {
            batch: self.clone(),
            index,
            after,
        });
        event.report();
    }

    fn arrive(&self, index: usize, result: Option<StartOutcome>) {
        if let Some(result) = result
            && let Some(slot) = self.results.get(index)
        {
            let _ = slot.set(result);
        }
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Completes once every member has arrived.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: it changes nothing.
    async fn arrived(&self) {
        while self.left.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
    }

    /// What each start's lifecycle published (`None`: not yet).
    fn results(&self) -> Vec<Option<StartOutcome>> {
        self.results
            .iter()
            .map(|slot| slot.get().cloned())
            .collect()
    }
}

/// Where a start stands after a step under the state lock.
enum StartStep {
    /// It has its outcome.
    Done(StartOutcome),
    /// It waits for the lifecycle `shared`: for a boot outcome published after `seen`, or, while
    /// `stopping`, for the end of the stop in progress (then it steps again).
    Wait {
        shared: Arc<Shared>,
        seen: u64,
        stopping: bool,
    },
}

/// A running lifecycle, as the state sees it (its shared cell tells it from a later one).
struct LifecycleHandle {
    shared: Arc<Shared>,
    /// The registration the lifecycle runs on (its task's plugin version).
    channel: Arc<Channel>,
}

/// Bookkeeping for one account: 32 bytes in the map's slot (the map keeps room for more
/// accounts than it has, so its slots stay small; what is rarely set lives behind one box).
#[derive(Default)]
struct AccountEntry {
    manual_stop: bool,
    /// Whether the last stop had to cancel the task.
    last_stop_cancelled: bool,
    /// The restart count while no lifecycle runs (its lifecycle's cell has it meanwhile); read
    /// and changed only through [`attempts`](Self::attempts) and
    /// [`set_attempts`](Self::set_attempts), and taken back from the cell by
    /// [`end_lifecycle`](Self::end_lifecycle).
    attempts: u32,
    lifecycle: Option<LifecycleHandle>,
    /// What is rarely set (`None`: nothing is).
    rare: Option<Box<Rare>>,
}

/// The parts of an account's bookkeeping that are rarely set.
#[derive(Default)]
struct Rare {
    /// Why the last task could not be ended; a start is refused while it is set.
    stuck: Option<String>,
    /// Why the last stop's hook failed (its error or panic), if it did.
    last_stop_hook_failure: Option<String>,
}

impl AccountEntry {
    /// Why the last task could not be ended, if it could not (a start is refused meanwhile).
    fn stuck(&self) -> Option<&str> {
        self.rare.as_ref()?.stuck.as_deref()
    }

    fn set_stuck(&mut self, reason: Option<String>) {
        self.set_rare(|rare| rare.stuck = reason);
    }

    /// Why the last stop's hook failed, if it did.
    fn last_stop_hook_failure(&self) -> Option<&str> {
        self.rare.as_ref()?.last_stop_hook_failure.as_deref()
    }

    fn set_last_stop_hook_failure(&mut self, failure: Option<String>) {
        self.set_rare(|rare| rare.last_stop_hook_failure = failure);
    }

    /// The restart count: its lifecycle's while one runs (which counts crashes without the
    /// state's lock), else the one kept here.
    fn attempts(&self) -> u32 {
        match &self.lifecycle {
            Some(lc) => lc.shared.attempts(),
            None => self.attempts,
        }
    }

    /// Sets the restart count where it lives (see [`attempts`](Self::attempts)).
    fn set_attempts(&mut self, attempts: u32) {
        match &self.lifecycle {
            Some(lc) => lc.shared.set_attempts(attempts),
            None => self.attempts = attempts,
        }
    }

    /// Takes the restart count back from the lifecycle of `shared` as it ends (the entry's
    /// lifecycle goes with it); does nothing if the entry runs another lifecycle.
    fn end_lifecycle(&mut self, shared: &Arc<Shared>) {
        if self
            .lifecycle
            .as_ref()
            .is_some_and(|lc| Arc::ptr_eq(&lc.shared, shared))
        {
            self.attempts = shared.attempts();
            self.lifecycle = None;
        }
    }

    /// Changes the rare parts; the box is made only when something is set in it (clearing an
    /// unset part, as every stop does, allocates nothing), and goes once nothing is.
    fn set_rare(&mut self, f: impl FnOnce(&mut Rare)) {
        match &mut self.rare {
            Some(rare) => {
                f(rare);
                if !rare.is_set() {
                    self.rare = None;
                }
            }
            None => {
                let mut rare = Rare::default();
                f(&mut rare);
                if rare.is_set() {
                    self.rare = Some(Box::new(rare));
                }
            }
        }
    }
}

impl Rare {
    fn is_set(&self) -> bool {
        self.stuck.is_some() || self.last_stop_hook_failure.is_some()
    }
}

/// A channel the supervisor runs.
pub struct Channel {
    /// The channel id.
    pub id: String,
    /// The plugin providing it.
    pub plugin: Arc<dyn Plugin>,
    /// Its config table.
    pub section: ChannelSection,
    /// Its accounts (normalised ids), as the plugin listed them at registration.
    pub accounts: AccountIds,
    /// The plugin's default account, if it named one.
    pub default_account: Option<String>,
    /// Runs the plugin calls of the channel's boots, at most the startup fan-out at once.
    boots: boot::BootPool<lifecycle::BootJob>,
    /// Accounts the config switches off (the host's `enabled` key).
    disabled: crate::reserved::Disabled,
    /// Bounds the plugin's blocking calls in flight (a 1.0 plugin's stop and logout hooks run
    /// on a host thread): a plugin whose hooks hang pins at most this many threads.
    blocking_permits: Arc<Semaphore>,
}

/// How many lifecycles a start of many accounts spawns before it hands them to their drivers.
const SPAWN_BUNCH: usize = 64;

/// The most blocking calls (1.0 stop and logout hooks) one plugin may have in flight.
pub const BLOCKING_CALLS_PER_PLUGIN: usize = 8;

#[derive(Default)]
struct State {
    /// Keyed by the account's shared key, which its lifecycle and links hold too (one copy of
    /// the ids per account). Hashed as the status board's maps are (foldhash).
    accounts: hashbrown::HashMap<Arc<AccountKey>, AccountEntry>,
    next_lifecycle: u64,
}

impl State {
    /// `key`'s bookkeeping, created if needed (the key is cloned only then), with the shared key
    /// it is kept under.
    fn account_with_key(&mut self, key: KeyRef<'_>) -> (Arc<AccountKey>, &mut AccountEntry) {
        // One lookup, found or inserted.
        match self.accounts.entry_ref(&key) {
            hashbrown::hash_map::EntryRef::Occupied(found) => {
                (found.key().clone(), found.into_mut())
            }
            hashbrown::hash_map::EntryRef::Vacant(vacant) => {
                let shared = Arc::new(AccountKey::new(key.channel, key.account));
                let entry = vacant.insert_with_key(shared.clone(), AccountEntry::default());
                (shared, entry)
            }
        }
    }
}

/// An account's key, borrowed: the supervisor's state is looked up with it without building an
/// [`AccountKey`] (it hashes as one, field by field).
#[derive(Clone, Copy)]
struct KeyRef<'a> {
    channel: &'a str,
    account: &'a str,
}

impl<'a> KeyRef<'a> {
    fn of(key: &'a AccountKey) -> Self {
        Self {
            channel: &key.channel,
            account: &key.account,
        }
    }
}

impl std::hash::Hash for KeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `AccountKey`'s derived hash: its fields in order (a `String` hashes as its `str`).
        self.channel.hash(state);
        self.account.hash(state);
    }
}

impl hashbrown::Equivalent<Arc<AccountKey>> for KeyRef<'_> {
    fn equivalent(&self, key: &Arc<AccountKey>) -> bool {
        key.channel == self.channel && key.account == self.account
    }
}

/// What registration learns about an account for the snapshot (docs/status.md:
/// `enabled` recomputed, `configured` from the plugin's description when it gives one).
struct Seed {
    enabled: Option<Check>,
    configured: Option<bool>,
    unconfigured_reason: Option<String>,
}

struct Inner {
    /// The restart policy in force (a config reload swaps it: it applies from the next decision).
    policy: std::sync::RwLock<Arc<SupervisorConfig>>,
    call_timeout: Duration,
    jitter: Arc<dyn Jitter>,
    clock: Arc<dyn Clock>,
    board: Arc<StatusBoard>,
    state: Mutex<State>,
    tracker: TaskTracker,
    closing: CancellationToken,
    restart_log: RestartLog,
    /// Run the lifecycles ([`driver`]).
    drivers: driver::Drivers,
    /// Decides, right before each boot calls the plugin, whether the account may start here
    /// (the cluster: only while this node holds the account and its lease is safe). Set once, so
    /// a boot reads it without a lock or a count.
    gate: std::sync::OnceLock<StartGate>,
    /// Where the supervisor asks which registration serves each channel ([`serving`]).
    serving: std::sync::RwLock<Source>,
}

/// Asked before every boot calls into the plugin: `Some(reason)` refuses the start (the account
/// stays stopped with that reason; nothing restarts it but a later start).
pub type StartGate = Arc<dyn Fn(&AccountKey) -> Option<String> + Send + Sync>;

/// The supervisor. Cheap to clone: every clone drives the same state.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// A supervisor with `policy`, writing statuses to `board`.
    pub fn new(
        policy: SupervisorConfig,
        call_timeout: Duration,
        board: Arc<StatusBoard>,
        clock: Arc<dyn Clock>,
        jitter: Arc<dyn Jitter>,
    ) -> Self {
        let restart_log = RestartLog::new(policy.restart_log_interval);
        Self {
            inner: Arc::new(Inner {
                policy: std::sync::RwLock::new(Arc::new(policy)),
                call_timeout,
                jitter,
                clock,
                board,
                state: Mutex::new(State::default()),
                tracker: TaskTracker::new(),
                closing: CancellationToken::new(),
                restart_log,
                drivers: driver::Drivers::per_core(),
                gate: std::sync::OnceLock::new(),
                serving: std::sync::RwLock::new(Source::Own(Arc::default())),
            }),
        }
    }

    /// Installs the gate every boot asks before it calls the plugin ([`StartGate`]). A
    /// supervisor has one gate for its life: a second is refused (and returned).
    pub fn set_start_gate(&self, gate: StartGate) -> Result<(), StartGate> {
        self.inner.gate.set(gate)
    }

    /// Makes `serving` (the catalog) the one source of which registration serves each channel
    /// and which channels were removed. The supervisor's own table goes: from here on
    /// `add_channel`, `replace_channel` and `remove_channel` are refused, and channels come and
    /// go only through the source (see [`serving`]).
    pub fn set_serving(&self, serving: Arc<dyn Serving>) {
        *self
            .inner
            .serving
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Source::From(serving);
    }

    /// The source of which registration serves each channel (never asked under the state lock).
    fn serving(&self) -> Arc<dyn Serving> {
        self.inner.serving()
    }

    /// The supervisor's own table, where no catalog is the source.
    fn table(&self) -> Result<Arc<Table>, SupervisorError> {
        match &*self.inner.serving.read().unwrap_or_else(|p| p.into_inner()) {
            Source::Own(table) => Ok(table.clone()),
            Source::From(_) => Err(SupervisorError::Plugin(
                "channels are added, replaced and removed through the plugin catalog".into(),
            )),
        }
    }

    /// The status board.
    pub fn board(&self) -> &Arc<StatusBoard> {
        &self.inner.board
    }

    /// The restart policy in force.
    pub fn policy(&self) -> Arc<SupervisorConfig> {
        self.inner.policy()
    }

    /// Puts `policy` in force (a config reload): each number applies from the next decision it
    /// governs (the next backoff, give-up check, start or stop bound).
    pub fn set_policy(&self, policy: SupervisorConfig) {
        *self.inner.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Registers a channel: strips the host's reserved keys from its table (the host reads them
    /// itself, see [`crate::reserved`]), lets the plugin validate the rest (ABI 1.1), hands it
    /// over, and lists its accounts. Two listed ids
    /// that normalise to the same account are an error naming both. Each account's `enabled`
    /// (and `configured`, when the plugin's description gives it) goes to the status board, so
    /// the snapshot shows a disabled or unconfigured account with its reason before any start.
    /// A failure is remembered for start-all's summary. The channel then serves from the
    /// supervisor's own table (where no catalog is the source: see [`serving`]).
    pub async fn add_channel(
        &self,
        plugin: Arc<dyn Plugin>,
        section: ChannelSection,
    ) -> Result<Arc<Channel>, SupervisorError> {
        let table = self.table()?;
        let id = plugin.info().channel_id.clone();
        match self.register(plugin, section).await {
            Ok(channel) => {
                table.insert(channel.clone());
                Ok(channel)
            }
            Err(e) => {
                // The table owns the failure too: start-all's summary lists it.
                table.fail(&id, e.to_string());
                Err(e)
            }
        }
    }

    /// Registers a version of a channel: the plugin checks and takes the table and lists its
    /// accounts, and the registration goes back to its owner (the catalog) to record: the
    /// supervisor keeps no copy, and nothing starts on it until the owner answers it for its
    /// channel. A failure changes nothing (a replace's old version keeps serving); the owner
    /// records it too, and answers it as [`Serving::failed`].
    pub async fn register(
        &self,
        plugin: Arc<dyn Plugin>,
        section: ChannelSection,
    ) -> Result<Arc<Channel>, SupervisorError> {
        let id = plugin.info().channel_id.clone();
        // The plugin never sees the host's keys (`enabled`, `health_monitor`, …).
        let table = crate::reserved::strip(&section.table);
        let disabled = crate::reserved::Disabled::from_table(&section.table);
        let call_plugin = plugin.clone();
        let listed = bounded(self.inner.call_timeout, move || {
            call_plugin.validate_channel(&table)?;
            call_plugin.configure(&table)?;
            Ok::<_, crate::plugin::PluginCallError>((
                call_plugin.list_account_ids()?,
                call_plugin.default_account_id()?,
            ))
        })
        .await
        .map_err(|e| SupervisorError::Plugin(format!("channel {id}: configure: {e}")))?
        .map_err(|e| SupervisorError::Plugin(e.to_string()))?;
        let (raw_ids, default_account) = listed;
        let mut accounts = AccountIds::default();
        for raw in &raw_ids {
            // Positions match `raw_ids` up to the first repeat, which ends the registration.
            if let Err(at) = accounts.push(normalize_account_id(raw)) {
                let (first, normalised) = (&raw_ids[at], &accounts[at]);
                return Err(SupervisorError::Plugin(format!(
                    "channel {id}: accounts {first:?} and {raw:?} both normalise to {normalised:?}"
                )));
            }
        }
        // The snapshot's view of each account; a plugin too slow for it only loses that.
        let call_plugin = plugin.clone();
        let ids = accounts.to_vec();
        let seed_disabled = disabled.clone();
        let seeds = bounded(self.inner.call_timeout, move || {
            seeds(&*call_plugin, &ids, &seed_disabled)
        });
        match seeds.await {
            Ok(seeds) => {
                for (account, seed) in accounts.iter().zip(seeds) {
                    let key = AccountKey::new(id.clone(), account.clone());
                    self.inner.board.update(&key, |s| seed.apply(s));
                }
            }
            Err(e) => tracing::warn!(channel = %id, "reading accounts for the snapshot {e}"),
        }
        Ok(Arc::new(Channel {
            id: id.clone(),
            plugin,
            section,
            accounts,
            default_account: default_account.map(|a| normalize_account_id(&a)),
            boots: lifecycle::boot_pool(self.inner.policy().startup_accounts_per_channel),
            disabled,
            blocking_permits: Arc::new(Semaphore::new(BLOCKING_CALLS_PER_PLUGIN)),
        }))
    }

    /// The registration serving this channel now (asked of the source, see [`serving`]).
    pub fn channel(&self, id: &str) -> Result<Arc<Channel>, SupervisorError> {
        self.serving()
            .serving(id)
            .ok_or_else(|| SupervisorError::UnknownChannel(id.to_owned()))
    }

    /// Every channel served now, by id (asked of the source).
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.serving().served()
    }

    /// Starts one account, or every account of a channel, as a user: clears the manual-stop mark
    /// and the restart counter. Returns once each start has taken effect.
    pub async fn start(
        &self,
        channel: &str,
        account: Option<&str>,
    ) -> Result<Vec<(AccountKey, StartOutcome)>, SupervisorError> {
        self.refuse_if_closing()?;
        let ch = self.channel(channel)?;
        let mut one = Vec::new();
        let ids = target_ids(&ch, account, &mut one)?;
        let outcomes = self.start_accounts(&ch, ids, StartMode::User).await;
        Ok(ids
            .iter()
            .map(|id| AccountKey::new(ch.id.clone(), id.clone()))
            .zip(outcomes)
            .collect())
    }

    /// A user's start is refused once shutdown has begun.
    fn refuse_if_closing(&self) -> Result<(), SupervisorError> {
        if self.inner.closing.is_cancelled() {
            return Err(SupervisorError::ShuttingDown);
        }
        Ok(())
    }

    /// Starts every account of every channel; one channel's failure does not stop the others.
    /// The summary has every channel, including those whose registration failed (with why).
    pub async fn start_all(&self) -> BTreeMap<String, ChannelStartSummary> {
        let channels = self.channels();
        let failed = self.serving().failed();
        let limit = Arc::new(Semaphore::new(self.inner.policy().startup_channels));
        let runs = channels.into_iter().map(|ch| {
            let this = self.clone();
            let limit = limit.clone();
            async move {
                let _permit = limit.acquire().await;
                let mut summary = ChannelStartSummary::default();
                // The channel's own listing: no copy of its ids, no key per account.
                let started = match this.refuse_if_closing() {
                    Ok(()) => Ok(this
                        .start_accounts(&ch, &ch.accounts, StartMode::User)
                        .await),
                    Err(e) => Err(e),
                };
                match started {
                    Ok(outcomes) => {
                        for outcome in outcomes {
                            summary.attempted += 1;
                            match outcome {
                                StartOutcome::Started | StartOutcome::AlreadyRunning => {
                                    summary.started += 1
                                }
                                StartOutcome::TimedOut(_) => summary.timed_out += 1,
                                _ => summary.failed += 1,
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(channel = %ch.id, "start-all: {e}");
                        summary.error = Some(e.to_string());
                    }
                }
                (ch.id.clone(), summary)
            }
        });
        let mut summaries: BTreeMap<_, _> = join_all(runs).await.into_iter().collect();
        for (id, error) in failed {
            summaries.entry(id).or_insert_with(|| ChannelStartSummary {
                error: Some(error),
                ..ChannelStartSummary::default()
            });
        }
        summaries
    }

    /// One account's start. It returns once the start has taken effect, or after the start
    /// timeout with [`StartOutcome::TimedOut`] (the boot itself goes on: see `Lifecycle::boot`).
    async fn start_account(
        &self,
        ch: &Arc<Channel>,
        key: &AccountKey,
        mode: StartMode,
    ) -> StartOutcome {
        let mut outcomes = self.start_accounts(ch, &[key.account.as_str()], mode).await;
        outcomes.pop().unwrap_or(StartOutcome::Stopped)
    }

    /// Starts the accounts `ids` of `ch` together (as [`start_account`](Self::start_account)
    /// does each): the first step of every start runs under one lock (spawning the lifecycles it
    /// needs), then each start waits for its outcome. One deadline bounds them all: a start
    /// still waiting at the start timeout returns [`StartOutcome::TimedOut`] (its boot goes on).
    /// The accounts are looked up by borrowed ids: no key is built for an account the
    /// supervisor knows already.
    async fn start_accounts<S: AsRef<str> + Sync>(
        &self,
        ch: &Arc<Channel>,
        ids: &[S],
        mode: StartMode,
    ) -> Vec<StartOutcome> {
        let deadline = self.inner.clock.now() + self.inner.policy().start_timeout;
        // One wait for the starts that join a lifecycle's boot; a start that must first wait for
        // a stop in progress (rare) waits by itself.
        let batch = Batch::new(ids.len());
        let mut outcomes: Vec<Option<StartOutcome>> = vec![None; ids.len()];
        let mut after_stops = Vec::new();
        {
            let mut state = self.lock();
            // A channel's first start-all adds all its accounts at once: the map is sized once
            // (not doubled, and its old tables freed, a dozen times on the way).
            let known = state.accounts.len();
            if known < ids.len() {
                state.accounts.reserve(ids.len() - known);
            }
            let mut spawned = Vec::with_capacity(SPAWN_BUNCH.min(ids.len()));
            for (i, id) in ids.iter().enumerate() {
                // Each step's wait is joined at once, while its lifecycle's cell is at hand.
                match self.start_step(&mut state, ch, id.as_ref(), mode, &mut spawned) {
                    StartStep::Done(outcome) => outcomes[i] = Some(outcome),
                    StartStep::Wait {
                        shared,
                        seen,
                        stopping: false,
                    } => batch.join(&shared, i, Some(seen)),
                    step => after_stops.push((i, step)),
                }
                if spawned.len() == SPAWN_BUNCH {
                    // The first bunch boots while the next ones are stepped.
                    self.submit_spawned(&mut spawned);
                }
            }
            self.submit_spawned(&mut spawned);
        }
        let finished: Vec<(usize, std::sync::OnceLock<StartOutcome>)> = after_stops
            .iter()
            .map(|(i, _)| (*i, std::sync::OnceLock::new()))
            .collect();
        let waits =
            after_stops
                .into_iter()
                .zip(&finished)
                .map(|((i, step), (_, out))| async move {
                    let outcome = self.finish_start(ch, ids[i].as_ref(), mode, step).await;
                    let _ = out.set(outcome);
                });
        let after_stops = join_all(waits);
        tokio::select! {
            biased;
            _ = async { tokio::join!(batch.arrived(), after_stops) } => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
        for (i, result) in batch.results().into_iter().enumerate() {
            if result.is_some() {
                outcomes[i] = result;
            }
        }
        for (i, out) in finished {
            if let Some(outcome) = out.into_inner() {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|out| {
                out.unwrap_or_else(|| {
                    StartOutcome::TimedOut(format!(
                        "the start did not hand over its task within {}",
                        humantime::format_duration(self.inner.policy().start_timeout)
                    ))
                })
            })
            .collect()
    }

    /// A start from its first step on: waits for what the step says, and steps again after a
    /// stop in progress has finished.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: dropping it abandons only the wait (a lifecycle it spawned goes on; its
    /// registration in the lifecycle's event is dropped at the next publish that satisfies it).
    async fn finish_start(
        &self,
        ch: &Arc<Channel>,
        account: &str,
        mode: StartMode,
        mut step: StartStep,
    ) -> StartOutcome {
        loop {
            let (shared, seen, stopping) = match step {
                StartStep::Done(outcome) => return outcome,
                StartStep::Wait {
                    shared,
                    seen,
                    stopping,
                } => (shared, seen, stopping),
            };
            // A batch of one: while `stopping`, the stop in progress finishes first (then this
            // start steps again); otherwise the boot outcome after `seen`, as `BootEvent::report`
            // decides it.
            let batch = Batch::new(1);
            batch.join(&shared, 0, (!stopping).then_some(seen));
            batch.arrived().await;
            if stopping {
                let mut spawned = Vec::new();
                step = self.start_step(&mut self.lock(), ch, account, mode, &mut spawned);
                self.submit_spawned(&mut spawned);
                continue;
            }
            return batch
                .results()
                .pop()
                .flatten()
                .unwrap_or(StartOutcome::Stopped);
        }
    }

    /// A start's step under the state lock: refuse it, find the account running, join the
    /// lifecycle's boot in flight (waking a backoff), wait for a stop in progress, or reserve the
    /// account's slot by spawning its lifecycle (added to `spawned`, which the caller hands to
    /// the drivers with [`submit_spawned`](Self::submit_spawned)).
    fn start_step(
        &self,
        state: &mut State,
        ch: &Arc<Channel>,
        account: &str,
        mode: StartMode,
        spawned: &mut Vec<lifecycle::Lifecycle>,
    ) -> StartStep {
        let next_id = state.next_lifecycle + 1;
        let (shared_key, entry) = state.account_with_key(KeyRef {
            channel: &ch.id,
            account,
        });
        if let Some(reason) = entry.stuck() {
            // Refused: nothing changes, not even the manual-stop mark.
            return StartStep::Done(StartOutcome::Refused(reason.to_owned()));
        }
        match mode {
            StartMode::User => {
                entry.manual_stop = false;
                entry.set_attempts(0);
            }
            StartMode::Revive { reset_counter } => {
                entry.manual_stop = false;
                if reset_counter {
                    entry.set_attempts(0);
                }
            }
        }
        let (shared, seen, stopping) = match &entry.lifecycle {
            Some(lc) if lc.shared.phase() == Phase::Stopping => (lc.shared.clone(), 0, true),
            Some(lc) if lc.shared.phase() == Phase::Running => {
                return StartStep::Done(StartOutcome::AlreadyRunning);
            }
            Some(lc) => {
                if lc.shared.phase() == Phase::Backoff {
                    // A user start does not wait out the backoff.
                    lc.shared.wake_backoff();
                }
                // Join the boot in flight (or the one the wake-up starts).
                let seen = lc.shared.event().seq;
                (lc.shared.clone(), seen, false)
            }
            None => {
                // The slot is reserved here, before any await.
                let (handle, run) =
                    self.new_lifecycle(next_id, ch.clone(), shared_key, entry.attempts());
                spawned.push(run);
                let shared = handle.shared.clone();
                entry.lifecycle = Some(handle);
                state.next_lifecycle = next_id;
                (shared, 0, false)
            }
        };
        StartStep::Wait {
            shared,
            seen,
            stopping,
        }
    }

    /// A new lifecycle for `key` (run by a driver once handed over with
    /// [`submit_spawned`](Self::submit_spawned)), and the handle the account's entry keeps.
    fn new_lifecycle(
        &self,
        id: u64,
        ch: Arc<Channel>,
        key: Arc<AccountKey>,
        attempts: u32,
    ) -> (LifecycleHandle, lifecycle::Lifecycle) {
        let shared = Arc::new(Shared::new(attempts));
        if self.inner.closing.is_cancelled() {
            // Shutting down: this one stops before it boots (shutdown stops the ones it finds).
            shared.request_stop();
        }
        let run = lifecycle::Lifecycle {
            ctx: lifecycle::AccountCtx {
                inner: self.inner.clone(),
                channel: ch.clone(),
                key,
            },
            id,
            shared: shared.clone(),
        };
        let handle = LifecycleHandle {
            shared,
            channel: ch,
        };
        (handle, run)
    }

    /// Hands lifecycles [`start_step`](Self::start_step) spawned to their drivers (emptying
    /// `spawned`): one lock of each driver's inbox and one wake-up per bunch, not per account.
    fn submit_spawned(&self, spawned: &mut Vec<lifecycle::Lifecycle>) {
        if !spawned.is_empty() {
            self.inner.drivers.submit_all(spawned, &self.inner.tracker);
        }
    }

    /// Stops one account, or every account of a channel, as a user: marks them manually stopped
    /// (no automatic restart), and returns once each task has ended or been reported stuck.
    pub async fn stop(
        &self,
        channel: &str,
        account: Option<&str>,
    ) -> Result<Vec<(Arc<AccountKey>, StopOutcome)>, SupervisorError> {
        let ch = self.channel(channel)?;
        let mut one = Vec::new();
        let ids = target_ids(&ch, account, &mut one)?;
        let keys: Vec<KeyRef<'_>> = ids
            .iter()
            .map(|id| KeyRef {
                channel: &ch.id,
                account: id,
            })
            .collect();
        Ok(self.stop_accounts(&keys).await)
    }

    /// [`stop_accounts`](Self::stop_accounts) for keys the caller owns; the outcomes, in order.
    async fn stop_keys(&self, keys: &[AccountKey]) -> Vec<StopOutcome> {
        let keys: Vec<KeyRef<'_>> = keys.iter().map(KeyRef::of).collect();
        let stopped = self.stop_accounts(&keys).await;
        stopped.into_iter().map(|(_, outcome)| outcome).collect()
    }

    async fn stop_account(&self, key: &AccountKey) -> StopOutcome {
        let mut stopped = self.stop_accounts(&[KeyRef::of(key)]).await;
        stopped
            .pop()
            .map_or(StopOutcome::Stopped, |(_, outcome)| outcome)
    }

    /// Stops `keys` as a user, together: marks them manually stopped under one lock, fires the
    /// abort of every running task with one call per plugin version, then signals each lifecycle
    /// (whose stop sequence finds its task aborted already), and returns each one's outcome, in
    /// order, once each has ended or been reported stuck, with the key the state keeps the
    /// account under (shared: the answer copies no key).
    async fn stop_accounts(&self, asked: &[KeyRef<'_>]) -> Vec<(Arc<AccountKey>, StopOutcome)> {
        let mut outcomes: Vec<Option<StopOutcome>> = vec![None; asked.len()];
        // Each lifecycle to stop, with its running task's id (0: none).
        let mut stopping: Vec<(usize, Arc<Shared>, u64)> = Vec::new();
        let mut idle = Vec::new();
        // The ids of the running tasks to abort, by the plugin version each runs on.
        let mut aborts: Vec<(Arc<Channel>, Vec<u64>)> = Vec::new();
        // The keys the state keeps its accounts under (shared, not built per stop).
        let mut keys: Vec<Arc<AccountKey>> = Vec::with_capacity(asked.len());
        {
            let mut state = self.lock();
            // One lookup per account: its marks, and what it has running.
            let mut running: Vec<(usize, Arc<Shared>, Arc<Channel>)> = Vec::new();
            for (i, asked) in asked.iter().enumerate() {
                let (key, entry) = state.account_with_key(*asked);
                keys.push(key);
                entry.manual_stop = true;
                entry.last_stop_cancelled = false;
                entry.set_last_stop_hook_failure(None);
                match &entry.lifecycle {
                    Some(lc) => running.push((i, lc.shared.clone(), lc.channel.clone())),
                    None => match entry.stuck() {
                        Some(reason) => outcomes[i] = Some(StopOutcome::Stuck(reason.to_owned())),
                        None => idle.push(i),
                    },
                }
            }
            // Every running one shows `stopping` first, in one write of the board, before its
            // signal is set: the lifecycle's own `stopped` (written once it sees the signal)
            // always lands after this.
            self.inner.board.update_each_at(
                running
                    .iter()
                    .map(|(i, shared, _)| (&*keys[*i], shared.board_after_first_boot())),
                |s| s.set_state(AccountState::Stopping),
            );
            for (i, shared, channel) in running {
                // From here on a start waits for this stop to finish, then starts anew.
                shared.set_phase(Phase::Stopping);
                // Set now, woken below once the aborts are out.
                shared.mark_stop();
                let task = shared.task();
                if task != 0 {
                    match aborts.iter_mut().find(|(ch, _)| Arc::ptr_eq(ch, &channel)) {
                        Some((_, ids)) => ids.push(task),
                        None => aborts.push((channel, vec![task])),
                    }
                }
                stopping.push((i, shared, task));
            }
        }
        // Every stop signal is set before any abort fires, so a lifecycle woken by its task's end
        // sees a stop, never a task that ended by itself. A stop sequence that begins before its
        // task's batched abort is marked fired aborts the task itself (twice is harmless), so the
        // order stays abort, then stop hook.
        for (ch, ids) in &aborts {
            ch.plugin.abort_tasks(ids);
        }
        // One pass over the lifecycles (each cell is read once more, not once per step): its
        // task's abort marked fired, its stop signalled, and one wait for its end.
        let batch = Batch::new(0);
        for (i, shared, task) in &stopping {
            if *task != 0 {
                shared.mark_aborted(*task);
            }
            shared.request_stop();
            batch.join(shared, *i, None);
        }
        if !idle.is_empty() {
            let now = self.inner.clock.wall_ms();
            self.inner
                .board
                .update_each(idle.iter().map(|&i| &*keys[i]), |s| {
                    // A disabled, unconfigured or logged-out account says so still.
                    if !matches!(
                        s.state,
                        AccountState::Disabled
                            | AccountState::NotConfigured
                            | AccountState::LoggedOut
                    ) {
                        s.set_state(AccountState::Stopped);
                    }
                    s.last_stop_at = Some(now);
                });
            for &i in &idle {
                outcomes[i] = Some(StopOutcome::Stopped);
            }
        }
        batch.arrived().await;
        // A plain stop's outcome is `stopped` (left unset here); only a stop with news looks its
        // outcome up in the account's bookkeeping.
        let news: Vec<usize> = stopping
            .iter()
            .filter(|(_, shared, _)| shared.event().stop_news)
            .map(|(i, ..)| *i)
            .collect();
        if !news.is_empty() {
            let state = self.lock();
            for i in news {
                let entry = state.accounts.get(&*keys[i]);
                outcomes[i] = Some(
                    match entry.map(|e| (e.stuck(), e.last_stop_hook_failure())) {
                        Some((Some(reason), _)) => StopOutcome::Stuck(reason.to_owned()),
                        Some((None, Some(failure))) => StopOutcome::HookFailed(failure.to_owned()),
                        _ if entry.is_some_and(|e| e.last_stop_cancelled) => StopOutcome::Cancelled,
                        _ => StopOutcome::Stopped,
                    },
                );
            }
        }
        keys.into_iter()
            .zip(outcomes)
            .map(|(key, o)| (key, o.unwrap_or(StopOutcome::Stopped)))
            .collect()
    }

    /// Stops, then starts, as a user.
    pub async fn restart(
        &self,
        channel: &str,
        account: Option<&str>,
    ) -> Result<Vec<(AccountKey, StartOutcome)>, SupervisorError> {
        target_ids(&*self.channel(channel)?, account, &mut Vec::new())?;
        self.stop(channel, account).await?;
        self.start(channel, account).await
    }

    /// Stops the account, asks the plugin to clear its credentials, and marks it logged out. It
    /// stays stopped until a user starts it.
    pub async fn logout(&self, channel: &str, account: &str) -> Result<bool, SupervisorError> {
        let ch = self.channel(channel)?;
        let mut one = Vec::new();
        let id = target_ids(&ch, Some(account), &mut one)?
            .first()
            .cloned()
            .unwrap_or_default();
        self.stop(channel, Some(&id)).await?;
        let cleared = match ch.plugin.logout_async(&id) {
            // 1.1: the hook runs on the plugin's runtime; no host thread waits for it.
            Some(hook) => tokio::time::timeout(self.inner.call_timeout, hook)
                .await
                .map_err(|_| {
                    SupervisorError::Plugin(format!(
                        "channel {channel}: logout {}",
                        calls::CallError::TimedOut(self.inner.call_timeout)
                    ))
                })?,
            None => {
                let plugin = ch.plugin.clone();
                let call_id = id.clone();
                calls::bounded_with_permit(
                    &ch.blocking_permits,
                    self.inner.call_timeout,
                    move || plugin.logout(&call_id),
                )
                .await
                .map_err(|e| SupervisorError::Plugin(format!("channel {channel}: logout {e}")))?
            }
        }
        .map_err(|e| SupervisorError::Plugin(e.to_string()))?;
        self.mark_logged_out(channel, cleared, Some(&id))?;
        Ok(cleared)
    }

    /// Marks an account logged out (default: the channel's default account, else its first,
    /// else `default`): not running, no restart pending, `lastError = "logged out"` if `cleared`,
    /// and `connected = false` if it had a value.
    pub fn mark_logged_out(
        &self,
        channel: &str,
        cleared: bool,
        account: Option<&str>,
    ) -> Result<(), SupervisorError> {
        let ch = self.channel(channel)?;
        let id = account
            .map(normalize_account_id)
            .unwrap_or_else(|| default_account_of(&ch));
        let key = AccountKey::new(channel, id);
        self.inner.board.update(&key, |s| {
            if cleared {
                s.set_state(AccountState::LoggedOut);
                s.last_error = Some("logged out".into());
            } else if s.state != AccountState::Stuck {
                s.set_state(AccountState::Stopped);
            }
            if s.connected.is_some() {
                s.connected = Some(false);
            }
        });
        Ok(())
    }

    /// Runs `answer` under the supervisor's state lock: its state owner answering a ping (the
    /// systemd watchdog, [`crate::notify`], sends `WATCHDOG=1` from inside the answer). Blocks
    /// while the state is held.
    pub fn ping<T>(&self, answer: impl FnOnce() -> T) -> T {
        let _state = self.lock();
        answer()
    }

    /// Whether the account was stopped by a user.
    pub fn is_manually_stopped(&self, key: &AccountKey) -> bool {
        self.lock().accounts.get(key).is_some_and(|e| e.manual_stop)
    }

    /// Clears the account's restart counter.
    pub fn reset_restart_attempts(&self, key: &AccountKey) {
        if let Some(entry) = self.lock().accounts.get_mut(key) {
            entry.set_attempts(0);
        }
        self.inner.board.update(key, |s| s.reconnect_attempts = 0);
    }

    /// The account's restart counter.
    pub fn restart_attempts(&self, key: &AccountKey) -> u32 {
        self.lock()
            .accounts
            .get(key)
            .map_or(0, AccountEntry::attempts)
    }

    /// Whether the health monitor may act on the account: its `health_monitor.enabled`, else the
    /// channel's, else true; false if the channel is unknown (fail closed).
    pub fn is_health_monitor_enabled(&self, channel: &str, account: &str) -> bool {
        match self.channel(channel) {
            Ok(ch) => ch.section.health_monitor_enabled(account).unwrap_or(true),
            Err(_) => false,
        }
    }

    /// Every listed account of every channel (plus each channel's default account), from the
    /// status board: no plugin is called.
    pub fn snapshot(&self) -> Snapshot {
        let serving = self.serving();
        let (channels, removed) = (serving.served(), serving.removed());
        let board = &self.inner.board;
        let mut out = Snapshot::new();
        for ch in channels {
            // The channel's listing is fixed for the life of its `Channel` value: the board keeps
            // its sorted view while that value lives.
            let listing: Arc<dyn std::any::Any + Send + Sync> = ch.clone();
            // The default account is listed too (once: the view keeps each id once).
            let ids = || {
                ch.accounts
                    .iter()
                    .map(|id| Cow::Borrowed(id.as_str()))
                    .chain([Cow::Owned(default_account_of(&ch))])
            };
            let accounts = board.listed_snapshot(&ch.id, Arc::downgrade(&listing), ids, |id| {
                Some(unwritten(id))
            });
            out.insert(ch.id.clone(), accounts);
        }
        for (channel, ids) in removed {
            let accounts =
                board.channel_snapshot(&channel, ids.iter().map(String::as_str), |_| None);
            out.entry(channel).or_insert(accounts);
        }
        out
    }

    /// One account's entry of [`Supervisor::snapshot`], read without building the others (what
    /// `GET /v1/status/{channel}/{account}` answers).
    pub fn account_snapshot(
        &self,
        channel: &str,
        account: &str,
    ) -> Result<AccountSnapshot, SupervisorError> {
        let id = channeld_plugin_abi::normalize_account_id(account);
        let serving = self.serving();
        let ch = serving.serving(channel);
        let removed = ch.is_none()
            && serving
                .removed()
                .iter()
                .any(|(c, ids)| c == channel && ids.contains(&id));
        let entry = || self.inner.board.get(&AccountKey::new(channel, id.as_str()));
        let found = match &ch {
            Some(ch) if ch.accounts.contains(&id) || default_account_of(ch) == id => {
                Some(entry().unwrap_or_else(|| unwritten(&id)))
            }
            Some(_) => None,
            None if removed => entry(),
            None => return Err(SupervisorError::UnknownChannel(channel.to_owned())),
        };
        found.ok_or_else(|| SupervisorError::UnknownAccount(AccountKey::new(channel, account)))
    }

    /// Stops every account and waits for every lifecycle: close, cancel, wait. Returns the
    /// accounts that did not stop (stuck, with what they are blocked in).
    pub async fn shutdown(&self) -> Vec<(AccountKey, String)> {
        self.inner.tracker.close();
        let channels = self.channels();
        let stops = channels.iter().map(|ch| self.stop(&ch.id, None));
        join_all(stops).await;
        self.inner.closing.cancel();
        // Lifecycles the stops above did not reach (started meanwhile by the health monitor or a
        // hot change): taken under the state lock, as every spawn is, so none is missed.
        for entry in self.lock().accounts.values() {
            if let Some(lc) = &entry.lifecycle {
                lc.shared.request_stop();
            }
        }
        self.inner.tracker.wait().await;
        self.inner.restart_log.flush();
        let mut stuck: Vec<(AccountKey, String)> = self
            .lock()
            .accounts
            .iter()
            .filter_map(|(key, e)| {
                e.stuck()
                    .map(|reason| (AccountKey::clone(key), reason.to_owned()))
            })
            .collect();
        stuck.sort_by_key(|(key, _)| key.to_string());
        stuck
    }
}

impl Inner {
    fn serving(&self) -> Arc<dyn Serving> {
        self.serving.read().unwrap_or_else(|p| p.into_inner()).get()
    }

    /// Why the gate refuses to start `key` now, if it does.
    fn gate_refuses(&self, key: &AccountKey) -> Option<String> {
        self.gate.get().and_then(|gate| gate(key))
    }

    fn policy(&self) -> Arc<SupervisorConfig> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The cores the machine lets this process run on, if it says (asked once: on Linux the answer
/// reads the cgroup's quota). The lifecycle drivers and the boot pools size themselves by it.
fn cores() -> Option<usize> {
    static CORES: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().ok().map(|n| n.get()))
}

/// The accounts an operation on `ch` applies to: its own listing (not copied), or `account`,
/// checked and normalised, kept in `one`.
fn target_ids<'a>(
    ch: &'a Channel,
    account: Option<&str>,
    one: &'a mut Vec<String>,
) -> Result<&'a [String], SupervisorError> {
    let Some(raw) = account else {
        return Ok(&ch.accounts);
    };
    let id = normalize_account_id(raw);
    if !ch.accounts.contains(&id) {
        return Err(SupervisorError::UnknownAccount(AccountKey::new(
            ch.id.clone(),
            raw,
        )));
    }
    one.push(id);
    Ok(one)
}

/// What the snapshot shows for a listed account the board has no entry for yet.
fn unwritten(id: &str) -> AccountSnapshot {
    AccountSnapshot {
        account_id: id.into(),
        enabled: true,
        configured: true,
        ..AccountSnapshot::default()
    }
}

fn default_account_of(ch: &Channel) -> String {
    ch.default_account
        .clone()
        .or_else(|| ch.accounts.first().cloned())
        .unwrap_or_else(|| DEFAULT_ACCOUNT_ID.to_owned())
}

/// Asks the plugin what the snapshot needs to know about accounts before any start, in one call
/// (one round trip for an isolated plugin); a failed question leaves its field unknown.
fn seeds(
    plugin: &dyn Plugin,
    accounts: &[String],
    disabled: &crate::reserved::Disabled,
) -> Vec<Seed> {
    let asked: Vec<(String, bool)> = accounts
        .iter()
        .map(|account| (account.clone(), disabled.contains(account)))
        .collect();
    plugin
        .account_facts(&asked)
        .into_iter()
        .map(|facts| Seed {
            enabled: facts.enabled,
            configured: facts.configured,
            unconfigured_reason: facts.unconfigured_reason,
        })
        .collect()
}

impl Seed {
    /// Writes what was learnt; a reason goes to `lastError` only when the account is not running
    /// and has no error yet (as the reference's snapshot does).
    fn apply(self, s: &mut AccountSnapshot) {
        if let Some(check) = &self.enabled {
            s.enabled = *check == Check::Yes;
        }
        if let Some(configured) = self.configured {
            s.configured = configured;
        }
        if !s.state.has_task() && s.state != AccountState::Starting {
            if matches!(self.enabled, Some(Check::No(_))) {
                s.set_state(AccountState::Disabled);
            } else if self.configured == Some(false) {
                s.set_state(AccountState::NotConfigured);
            } else if matches!(
                s.state,
                AccountState::Disabled | AccountState::NotConfigured
            ) {
                s.set_state(AccountState::Stopped);
            }
        }
        if s.running || s.last_error.is_some() {
            return;
        }
        if let Some(Check::No(reason)) = self.enabled {
            s.last_error = Some(reason.unwrap_or_else(|| "disabled".into()));
        } else if self.configured == Some(false) {
            s.last_error = Some(
                self.unconfigured_reason
                    .unwrap_or_else(|| "not configured".into()),
            );
        }
    }
}
