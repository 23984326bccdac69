//! One account's lifecycle (a future its driver polls, see `driver.rs`): boot → run → (crash)
//! backoff → boot …, until a user stops it, it is given up on, or it is disabled / not configured.
//! It is the only code that starts or ends the account's plugin task, which is how "at most one
//! task per account, ever" holds: a boot never abandons the plugin's start call (its result may be
//! a task), and a task is only replaced once it has ended, been cancelled and seen to end, or been
//! reported stuck (which refuses starts until it ends).

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt as _, future::Either};
use tokio::{sync::oneshot, time::timeout};

use super::{AccountEntry, Channel, Inner, Phase, Shared, StartOutcome, policy::backoff_delay};
use crate::{
    host::{AccountKey, AccountLink, HostSink},
    plugin::{BootStep, Plugin, RunningTask},
    status::{AccountSnapshot, AccountState},
};

/// What a lifecycle needs to talk to its account; cloneable so a detached watcher can finish a
/// job the lifecycle had to leave (a stuck start, a stuck task).
#[derive(Clone)]
pub(super) struct AccountCtx {
    pub(super) inner: Arc<Inner>,
    pub(super) channel: Arc<Channel>,
    /// Shared with the account's links (no copy per boot).
    pub(super) key: Arc<AccountKey>,
}

pub(super) struct Lifecycle {
    pub(super) ctx: AccountCtx,
    pub(super) id: u64,
    pub(super) shared: Arc<Shared>,
}

/// The generation whose first poll a lifecycle waits for before it shows the account running
/// (`None`: the plugin does not report it, a 1.0 plugin, and "running" means "start returned").
type Polled = Option<u64>;

/// What one boot produced.
pub(super) enum Boot {
    Started(RunningTask, Polled),
    Disabled(String),
    NotConfigured(String),
    Failed(String),
    /// A stop arrived before the plugin's start was called (or instead of it).
    Stopped,
    /// A stop arrived while the plugin's start was running, and the start did not return within
    /// the stop timeout: the account is reported stuck and a detached watcher owns the call.
    Stuck,
    /// The start gate refused it (with why): the plugin was not called.
    Held(String),
}

/// How a run ended.
enum RunEnd {
    /// The task ended by itself.
    Exited(Ended),
    /// A user stopped it (the stop sequence has run).
    Stopped,
}

/// A run that ended without a stop (its task ended, or its boot failed), as the one write that
/// follows records it: that write retires the run's generation, says why it ended, and sets the
/// state that comes next (restart-pending, gave-up, or stopped when a stop raced the end).
struct Ended {
    /// The task's error, or "channel exited without an error" (a clean end is a crash too).
    error: String,
    /// How long the task ran (zero for a failed boot).
    ran_for: Duration,
    /// When the task ended, for `lastStopAt` (`None` for a failed boot: no task stopped).
    at: Option<i64>,
}

type BootCall = oneshot::Receiver<Result<Boot, String>>;

/// How a stop hook went, as the stop reports it.
enum HookEnd {
    /// It returned, or hung past the stop's bound (not waited for).
    Done,
    /// It failed or panicked (the outcome and `lastError` say so).
    Failed(String),
    /// It was not called: no blocking slot within the stop's bound (`lastError` says so).
    Skipped(String),
}

impl std::fmt::Display for HookEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done => f.write_str("stop hook done"),
            Self::Failed(why) | Self::Skipped(why) => f.write_str(why),
        }
    }
}

/// How a stop hook's call went, as the stop reports it: a hook that hung past its bound is not a
/// failure of the stop.
fn hook_outcome(
    result: Result<Result<(), crate::plugin::PluginCallError>, super::calls::CallError>,
) -> HookEnd {
    use super::calls::CallError;
    match result {
        Ok(Ok(())) | Err(CallError::TimedOut(_)) => HookEnd::Done,
        Ok(Err(e)) => HookEnd::Failed(format!("stop hook failed: {e}")),
        Err(e @ CallError::Saturated(_)) => HookEnd::Skipped(format!("stop hook {e}")),
        Err(e) => HookEnd::Failed(format!("stop hook {e}")),
    }
}

/// One account's boot, as the channel's boot pool queues it.
pub(super) struct BootJob {
    inner: Arc<Inner>,
    plugin: Arc<dyn Plugin>,
    key: Arc<AccountKey>,
    link: AccountLink,
    shared: Arc<Shared>,
    polled: Polled,
    reply: oneshot::Sender<Result<Boot, String>>,
}

impl super::boot::Claim for BootJob {
    fn claim(&self) -> bool {
        self.shared.claim_boot()
    }
}

/// A channel's boot pool: at most `max` accounts booting at once, each batch booted by
/// [`boot_batch`].
pub(super) fn boot_pool(max: usize) -> super::boot::BootPool<BootJob> {
    super::boot::BootPool::new(max, Arc::new(boot_batch))
}

/// Boots a batch of one channel's accounts (a thread of its boot pool calls it) with one
/// [`Plugin::boot_accounts`] call: enabled? configured? start, for each. An account stopped
/// before the call, or refused by the start gate (asked right before the call), is left out; one
/// stopped while the plugin checks the batch is not started either (its link says so, see
/// [`AccountLink::stop_requested`]), and one whose start had begun when its stop landed hands
/// over its task, which its lifecycle stops at once.
pub(super) fn boot_batch(jobs: Vec<BootJob>) {
    let Some(plugin) = jobs.first().map(|job| job.plugin.clone()) else {
        return;
    };
    let mut accounts = Vec::with_capacity(jobs.len());
    let mut waiting = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.shared.stop_requested() {
            let _ = job.reply.send(Ok(Boot::Stopped));
            continue;
        }
        if let Some(reason) = job.inner.gate_refuses(&job.key) {
            let _ = job.reply.send(Ok(Boot::Held(reason)));
            continue;
        }
        accounts.push((job.key.account.as_str().to_owned(), job.link));
        waiting.push((job.reply, job.polled, job.shared));
    }
    if accounts.is_empty() {
        return;
    }
    let mut steps = plugin.boot_accounts(accounts).into_iter();
    for (reply, polled, shared) in waiting {
        let boot = match steps.next() {
            Some(Ok(BootStep::Started(task))) => {
                crate::metrics::record_start();
                Ok(Boot::Started(task, polled))
            }
            Some(Ok(BootStep::Disabled(reason))) => {
                Ok(Boot::Disabled(reason.unwrap_or_else(|| "disabled".into())))
            }
            Some(Ok(BootStep::NotConfigured(reason))) => Ok(Boot::NotConfigured(
                reason.unwrap_or_else(|| "not configured".into()),
            )),
            // No task, and a stop has landed: the stop wins (the plugin's start was not called,
            // or failed).
            Some(Err(_)) if shared.stop_requested() => Ok(Boot::Stopped),
            Some(Err(error)) => Err(error.to_string()),
            None => Err(format!(
                "channel {}: boot_accounts returned fewer results than accounts",
                plugin.info().channel_id
            )),
        };
        let _ = reply.send(boot);
    }
}

impl Lifecycle {
    /// The lifecycle's future. A plain function returning an `async move` block (not an
    /// `async fn`, whose future would hold `self` twice: as its argument and as the block's
    /// copy); it is the bulk of a running account's memory, so its states stay small.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's future holds its arguments twice"
    )]
    pub(super) fn run(self) -> impl std::future::Future<Output = ()> + Send + 'static {
        async move {
            let ctx = &self.ctx;
            'life: loop {
                self.set_phase(Phase::Booting);
                // A new generation with the `starting` state, in one write: handles of the last task
                // are stale from here. The first one hands out the account's part of the board.
                let starting = |s: &mut AccountSnapshot| s.set_state(AccountState::Starting);
                let generation = match self.shared.board_after_first_boot() {
                    Some(board) => board.begin_generation_and(&ctx.key, starting),
                    None => {
                        let (generation, board) =
                            ctx.inner.board.begin_first_generation(&ctx.key, starting);
                        self.shared.set_account_board(board);
                        generation
                    }
                };
                // The boot's value lives only in this block (not beside the running task's wait).
                let ended = 'ran: {
                    let (task, polled) = {
                        let boot = self.boot(generation).await;
                        match boot {
                            Boot::Stopped => {
                                self.publish(StartOutcome::Stopped);
                                ctx.record_stopped();
                                break 'life;
                            }
                            Boot::Stuck => {
                                self.publish(StartOutcome::Stopped);
                                break 'life;
                            }
                            Boot::Held(reason) => {
                                let now = ctx.inner.clock.wall_ms();
                                ctx.set_state(AccountState::Stopped, |s| {
                                    s.last_stop_at = Some(now);
                                    s.last_error = Some(reason.clone());
                                });
                                self.publish(StartOutcome::Refused(reason));
                                break 'life;
                            }
                            Boot::Disabled(reason) => {
                                ctx.set_state(AccountState::Disabled, |s| {
                                    s.last_error = Some(reason.clone());
                                });
                                self.publish(StartOutcome::Disabled(reason));
                                break 'life;
                            }
                            Boot::NotConfigured(reason) => {
                                ctx.set_state(AccountState::NotConfigured, |s| {
                                    s.last_error = Some(reason.clone());
                                });
                                self.publish(StartOutcome::NotConfigured(reason));
                                break 'life;
                            }
                            Boot::Failed(error) => {
                                tracing::warn!(account = %ctx.key, "start failed: {error}");
                                // Still `starting` until the restart is scheduled (or the stop
                                // recorded), in one write with why.
                                self.publish(StartOutcome::Failed(error.clone()));
                                break 'ran Ended {
                                    error,
                                    ran_for: Duration::ZERO,
                                    at: None,
                                };
                            }
                            Boot::Started(task, polled) => (task, polled),
                        }
                    };
                    if self.shared.stop_requested() {
                        // The start returned its task after a stop arrived: the stop wins, and
                        // the task gets the whole stop sequence (it never counts as running).
                        Box::pin(ctx.stop_task(task, false, &self.shared)).await;
                        self.publish(StartOutcome::Stopped);
                        break 'life;
                    }
                    match self.run_task(task, polled).await {
                        RunEnd::Stopped => break 'life,
                        RunEnd::Exited(ended) => ended,
                    }
                };
                if self.shared.stop_requested() {
                    // A stop raced with the end of the task: the stop wins, and says so.
                    let now = ctx.inner.clock.wall_ms();
                    self.shared
                        .link_board()
                        .retire_generation_and(&ctx.key, |s| {
                            s.set_state(AccountState::Stopped);
                            s.last_stop_at = Some(now);
                            s.last_error = Some(ended.error.clone());
                        });
                    break 'life;
                }
                if !Box::pin(self.schedule_restart(ended)).await {
                    break 'life;
                }
            }
            // `finish` runs when `self` drops here, as it does on a panic anywhere above.
        }
    }

    /// Queues the boot on the channel's boot pool, which asks the plugin (off the async workers,
    /// in a batch with other accounts of the channel) whether the account is enabled and
    /// configured, and starts it — unless a stop arrived meanwhile, in which case the plugin's
    /// start is never called (see [`boot_batch`]).
    ///
    /// The call is never abandoned: whoever waits for a start gives up after the start timeout
    /// (see `Supervisor::start_account`), but the lifecycle keeps the call, because a start that
    /// returns late still hands over a task, and a second boot beside it would start a second
    /// one. A stop bounds the wait by the stop timeout (then [`Boot::Stuck`]).
    async fn boot(&self, generation: u64) -> Boot {
        let ctx = &self.ctx;
        if self.shared.stop_requested() {
            return Boot::Stopped;
        }
        if let Some(reason) = ctx.inner.gate_refuses(&ctx.key) {
            return Boot::Held(reason);
        }
        if ctx.channel.disabled.contains(&ctx.key.account) {
            // The host's own `enabled = false`: the plugin is not asked.
            return Boot::Disabled("disabled".into());
        }
        // The link's host calls go straight to the account's entry on the board (this cell's).
        let sink: Arc<dyn HostSink> = self.shared.clone();
        let link = AccountLink::for_shared_account(ctx.key.clone(), generation, sink);
        let plugin = ctx.channel.plugin.clone();
        let polled = plugin.reports_task_polled().then_some(generation);
        let link = link.with_signals(self.shared.clone());
        let (reply, mut call): (_, BootCall) = oneshot::channel();
        // Queued on the channel's boot pool, which boots up to the startup fan-out of accounts at
        // once, in batches: a thread of the pool taking it (claiming its mark) is the slot
        // reservation.
        self.shared.unclaim_boot();
        ctx.channel.boots.submit(BootJob {
            inner: ctx.inner.clone(),
            plugin,
            key: ctx.key.clone(),
            link,
            shared: self.shared.clone(),
            polled,
            reply,
        });
        // The arms only say what happened: the rare wait after a stop (with its timer) is boxed,
        // so a booting account's future stays small.
        let joined = tokio::select! {
            biased;
            joined = &mut call => Some(joined),
            () = self.shared.stopped() => None,
        };
        let joined = match joined {
            Some(joined) => joined,
            None => {
                if self.shared.claim_boot() {
                    // Still waiting for a thread of the pool: no plugin call was made.
                    return Boot::Stopped;
                }
                let limit = ctx.inner.policy().stop_timeout;
                match Box::pin(timeout(limit, &mut call)).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        ctx.detach_stuck_start(call, &self.shared);
                        return Boot::Stuck;
                    }
                }
            }
        };
        match joined {
            Ok(Ok(boot)) => boot,
            Ok(Err(error)) => Boot::Failed(error),
            Err(_) => Boot::Failed("start failed: the boot's plugin calls panicked".into()),
        }
    }

    /// Runs a started task until it ends or a user stops it. With a plugin that reports the first
    /// poll of its tasks, the account counts as running only from that report: a task the
    /// plugin's runtime never polls (its workers are all blocked) is never shown running.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's future holds its arguments twice"
    )]
    fn run_task(
        &self,
        mut task: RunningTask,
        polled: Polled,
    ) -> impl std::future::Future<Output = RunEnd> + Send + '_ {
        // Not an `async fn`: its arguments are moved into the block once, not held twice.
        async move {
            let ctx = &self.ctx;
            let id = task.id;
            // A stop from here on aborts it in its batch; cleared however this run ends.
            self.shared.set_task(id);
            let _clear = ClearTask(&self.shared);
            // A task that ends before its first poll is reported (it ended, polled or not): its end,
            // seen here, is handled below as if seen while running.
            let mut ended_early = None;
            // The task's end is polled once, then only when it wakes (see `Shared::poll_end`).
            let mut first_poll = true;
            if let Some(generation) = polled {
                let shared = &self.shared;
                shared.await_poll(generation);
                let _done_waiting = AwaitPoll(shared);
                let stopped = tokio::select! {
                    biased;
                    () = shared.until(|s| s.stop_requested() || s.polled(generation)) => {
                        shared.stop_requested()
                    }
                    result = std::future::poll_fn(|_| shared.poll_end(&mut task.done, &mut first_poll)) => {
                        ended_early = Some(result);
                        false
                    }
                };
                if stopped {
                    Box::pin(ctx.stop_task(task, shared.aborted(id), shared)).await;
                    return RunEnd::Stopped;
                }
            }
            // Read without the state's lock: its owner mirrors every change into `shared`.
            let attempts = self.shared.attempts();
            // Stamps lastStartAt and the monotonic start the health monitor measures from.
            self.shared.link_board().mark_started(&ctx.key, |s| {
                s.set_state(AccountState::Running);
                s.last_error = None;
                s.reconnect_attempts = attempts;
            });
            self.set_phase(Phase::Running);
            self.publish(StartOutcome::Started);
            let started = ctx.inner.clock.now();
            let result = match ended_early {
                Some(result) => result,
                None => {
                    let shared = &self.shared;
                    let ended = tokio::select! {
                        // A stop that coincides with the end of the task still runs the stop
                        // sequence.
                        biased;
                        () = shared.stopped() => None,
                        result = std::future::poll_fn(|_| shared.poll_end(&mut task.done, &mut first_poll)) => Some(result),
                    };
                    match ended {
                        Some(result) => result,
                        None => {
                            // Boxed, here and at every stop: a running account's future does not
                            // carry the stop sequence's state.
                            let aborted = self.shared.aborted(id);
                            Box::pin(ctx.stop_task(task, aborted, &self.shared)).await;
                            return RunEnd::Stopped;
                        }
                    }
                }
            };
            let ran_for = ctx.inner.clock.now().duration_since(started);
            // Why it ended is written with the state that follows at once (restart-pending,
            // gave-up, or stopped when a stop raced the end), in one write: the stream shows no
            // `stopped` flashing before a restart.
            RunEnd::Exited(Ended {
                error: result
                    .err()
                    .unwrap_or_else(|| "channel exited without an error".to_owned()),
                ran_for,
                at: Some(ctx.inner.clock.wall_ms()),
            })
        }
    }

    /// After an unrequested end: count it, give up past the maximum, else wait the backoff.
    /// Returns whether to boot again. Every way out records why; the first write also retires
    /// the run's generation and says why it ended (handles of the task are stale from there).
    async fn schedule_restart(&self, ended: Ended) -> bool {
        let Ended { error, ran_for, at } = ended;
        let ctx = &self.ctx;
        let policy = ctx.inner.policy();
        crate::metrics::record_crash();
        // The lifecycle's cell has the count while it runs: no state lock per crash.
        let attempt = self.shared.count_crash(ran_for >= policy.stable_run);
        let now = ctx.inner.clock.now();
        // Why the run ended, with the state that follows, in one write.
        let ended = |s: &mut AccountSnapshot, state: AccountState, error: String| {
            s.set_state(state);
            s.reconnect_attempts = attempt;
            s.last_error = Some(error);
            if let Some(at) = at {
                s.last_stop_at = Some(at);
            }
        };
        if attempt > policy.max_restarts {
            crate::metrics::record_give_up();
            let message = format!("giving up after {} restart attempts", policy.max_restarts);
            tracing::debug!(account = %ctx.key, "{error}; {message}");
            ctx.inner.restart_log.record(&ctx.key.channel, true, now);
            let why = format!("{error}; {message}");
            self.shared
                .link_board()
                .retire_generation_and(&ctx.key, |s| ended(s, AccountState::GaveUp, why));
            return false;
        }
        let delay = backoff_delay(&policy, attempt, ctx.inner.jitter.next());
        tracing::debug!(
            account = %ctx.key,
            attempt,
            max = policy.max_restarts,
            delay_ms = delay.as_millis() as u64,
            "task ended ({error}); restarting after backoff"
        );
        ctx.inner.restart_log.record(&ctx.key.channel, false, now);
        self.shared
            .link_board()
            .retire_generation_and(&ctx.key, |s| ended(s, AccountState::RestartPending, error));
        self.shared.clear_woken();
        self.set_phase(Phase::Backoff);
        let deadline = ctx.inner.clock.now() + delay;
        let shared = &self.shared;
        tokio::select! {
            // Biased: a stop wins over everything.
            biased;
            () = shared.until(|s| s.stop_requested() || s.woken()) => {
                if shared.stop_requested() {
                    ctx.record_stopped();
                    false
                } else {
                    true
                }
            }
            () = tokio::time::sleep_until(deadline) => true,
        }
    }

    /// Sets the phase the state shows; `Stopping` (set by a stop) is final.
    fn set_phase(&self, phase: Phase) {
        self.shared.set_phase(phase);
    }

    fn publish(&self, outcome: StartOutcome) {
        self.shared.publish(|event| {
            event.seq += 1;
            event.outcome = Some(outcome);
        });
    }

    /// Frees the slot (if it is still this lifecycle's: the account's bookkeeping takes its
    /// restart count back) and wakes whoever waits for the end. Runs from `Drop`, so a lifecycle
    /// that panics (or whose task is dropped) still frees its account.
    fn finish(&self) {
        {
            let mut state = self.ctx.inner.lock();
            if let Some(entry) = state.accounts.get_mut(&self.ctx.key) {
                entry.end_lifecycle(&self.shared);
            }
        }
        self.shared.publish(|event| event.ended = true);
    }
}

/// Ends the lifecycle's wait for a first poll, however it ends.
struct AwaitPoll<'a>(&'a Shared);

impl Drop for AwaitPoll<'_> {
    fn drop(&mut self) {
        self.0.await_poll(0);
    }
}

/// Clears the running task's id from the shared cell when a run ends.
struct ClearTask<'a>(&'a Shared);

impl Drop for ClearTask<'_> {
    fn drop(&mut self) {
        self.0.set_task(0);
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let now = self.ctx.inner.clock.wall_ms();
            self.ctx.set_state(AccountState::Stopped, |s| {
                s.last_stop_at = Some(now);
                s.last_error = Some("internal error: the account's lifecycle panicked".into());
            });
        }
        self.finish();
    }
}

impl AccountCtx {
    /// Sets the account's state (and the flags derived from it), then applies `f` to the rest of
    /// the snapshot, under one lock of the board: the only way the supervisor changes a state.
    pub(super) fn set_state(&self, state: AccountState, f: impl FnOnce(&mut AccountSnapshot)) {
        self.inner.board.update(&self.key, |s| {
            s.set_state(state);
            f(s);
        });
    }

    fn record_stopped(&self) {
        let now = self.inner.clock.wall_ms();
        self.set_state(AccountState::Stopped, |s| {
            s.last_stop_at = Some(now);
        });
    }

    /// The stop sequence: fire the abort, call the plugin's stop hook (bounded), wait for the task
    /// up to the stop timeout, then cancel it on the plugin's runtime; a task that still does not
    /// end is reported stuck, and its slot frees itself when it finally ends.
    /// `aborted`: a stop has fired the task's abort already (in a batch with other accounts').
    /// `shared` is the lifecycle's cell (the account's place on the board, and where the stop
    /// says it left news in the account's bookkeeping).
    async fn stop_task(&self, task: RunningTask, aborted: bool, shared: &Shared) {
        self.stop_task_at(task, aborted, Some(shared)).await;
    }

    /// [`stop_task`](Self::stop_task) for a task whose lifecycle has gone (a start that returned
    /// after its stop gave up on it): the account's entry is found by key.
    async fn stop_task_by_key(&self, task: RunningTask) {
        self.stop_task_at(task, false, None).await;
    }

    /// [`stop_task`](Self::stop_task), writing the end to the account's entry at its place on the
    /// board when the lifecycle's cell is known, else by key.
    async fn stop_task_at(&self, mut task: RunningTask, aborted: bool, shared: Option<&Shared>) {
        let plugin = &self.channel.plugin;
        let (stop_timeout, cancel_grace) = {
            let policy = self.inner.policy();
            (policy.stop_timeout, policy.cancel_grace)
        };
        if !aborted {
            plugin.abort_task(task.id);
        }
        // The hook runs beside the wait, and the stop waits for it only until the stop's own
        // deadline: a hook that hangs cannot delay the stop past its bound, and one that returns
        // in time has finished before the account counts as stopped (and before a retired
        // version's runtime is shut down under it).
        let deadline = self.inner.clock.now() + stop_timeout;
        // Set while a 1.0 hook waits for one of the plugin's blocking slots: a stop whose deadline
        // passes meanwhile reports the hook as skipped (the wait and the deadline are the same
        // instant, so the flag decides, not which timer fires first).
        let mut waiting_for_slot = None;
        // Polled beside the wait for the task, in this task (no task of its own per stop).
        let mut hook = match plugin.stop_account_async(&self.key.account) {
            // A 1.1 plugin's hook is a future on its own runtime, bounded by the deadline
            // below (dropped, and so cancelled, past it); mapped to its outcome in place
            // (no box of its own).
            Some(hook) => Either::Left(hook.map(|result| hook_outcome(Ok(result)))),
            // A 1.0 plugin's runs on a host thread, under the plugin's limit of blocking
            // calls in flight.
            None => {
                let waiting = Arc::new(std::sync::atomic::AtomicBool::new(true));
                waiting_for_slot = Some(waiting.clone());
                let (hook_plugin, account) = (plugin.clone(), self.key.account.clone());
                let permits = self.channel.blocking_permits.clone();
                Either::Right(Box::pin(async move {
                    let result = super::calls::bounded_with_permit_then(
                        &permits,
                        stop_timeout,
                        move || waiting.store(false, std::sync::atomic::Ordering::SeqCst),
                        move || hook_plugin.stop_account(&account),
                    )
                    .await;
                    hook_outcome(result)
                }))
            }
        };
        let mut hook_end = None;
        let mut ended = None;
        // One look first: a task that has ended already (its abort went out in a stop's batch)
        // and a hook with nothing to do need no deadline timer.
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(end) = task.done.poll_unpin(cx) {
                ended = Some(end);
            }
            if let std::task::Poll::Ready(end) = hook.poll_unpin(cx) {
                hook_end = Some(end);
            }
            std::task::Poll::Ready(())
        })
        .await;
        if ended.is_none() || hook_end.is_none() {
            let until_deadline = tokio::time::sleep_until(deadline);
            tokio::pin!(until_deadline);
            loop {
                tokio::select! {
                    biased;
                    end = &mut task.done, if ended.is_none() => {
                        ended = Some(end);
                        if hook_end.is_some() {
                            break;
                        }
                    }
                    end = &mut hook, if hook_end.is_none() => {
                        hook_end = Some(end);
                        if ended.is_some() {
                            break;
                        }
                    }
                    () = &mut until_deadline => break,
                }
            }
        }
        // Past the deadline, a hook still going is not waited for: still without a slot, it was
        // not called at all (1.0).
        let hook_done = hook_end.is_some();
        let hook_end = hook_end.unwrap_or_else(|| {
            if waiting_for_slot.is_some_and(|w| w.load(std::sync::atomic::Ordering::SeqCst)) {
                HookEnd::Skipped(format!(
                    "stop hook {}",
                    super::calls::CallError::Saturated(super::BLOCKING_CALLS_PER_PLUGIN)
                ))
            } else {
                HookEnd::Done
            }
        });
        if let HookEnd::Failed(why) | HookEnd::Skipped(why) = &hook_end {
            tracing::warn!(account = %self.key, "{why}");
        }
        // An isolated plugin's cancel kills its process: the task then ends saying so (`killed`).
        let (ended, cancelled, killed) = match ended {
            Some(_) => (true, false, None),
            None => {
                plugin.cancel_task(task.id);
                match timeout(cancel_grace, &mut task.done).await {
                    Ok(end) => (
                        true,
                        true,
                        end.err().filter(|_| plugin.isolation().is_some()),
                    ),
                    Err(_) => (false, true, None),
                }
            }
        };
        if !ended {
            self.inner.board.retire_generation(&self.key);
            if !hook_done {
                // The hook goes on by itself while the task is reported stuck (bounded as the
                // stop was).
                tokio::spawn(timeout(stop_timeout, hook));
            }
            let reason = format!(
                "stuck: the task did not end within {} of its abort nor when cancelled (it blocks \
                 its thread); starts are refused until it ends",
                humantime::format_duration(stop_timeout)
            );
            tracing::error!(account = %self.key, "{reason}");
            self.set_state(AccountState::Stuck, |s| {
                s.last_error = Some(reason.clone());
            });
            self.record_stop_news(shared, |entry| {
                entry.set_stuck(Some(reason.clone()));
                entry.last_stop_cancelled = true;
            });
            let ctx = self.clone();
            // Not tracked: shutdown must not wait on a thread that may never return.
            tokio::spawn(async move {
                let _ = task.done.await;
                ctx.clear_stuck(&reason, "the stuck task has ended");
            });
            return;
        }
        let (hook_failure, skipped) = match hook_end {
            HookEnd::Done => (None, None),
            HookEnd::Failed(failure) => (Some(failure), None),
            HookEnd::Skipped(reason) => (None, Some(reason)),
        };
        let now = self.inner.clock.wall_ms();
        let cancelled_note = cancelled.then(|| {
            format!(
                "did not stop within {} of its abort; {}",
                humantime::format_duration(stop_timeout),
                killed.as_deref().unwrap_or("cancelled")
            )
        });
        let error = [cancelled_note, hook_failure.clone(), skipped]
            .into_iter()
            .flatten()
            .reduce(|a, b| format!("{a}; {b}"));
        // Handles of the task are stale from here, in the same write as `stopped`.
        let stopped = |s: &mut AccountSnapshot| {
            s.set_state(AccountState::Stopped);
            s.last_stop_at = Some(now);
            if let Some(error) = error {
                s.last_error = Some(error);
            }
        };
        match shared {
            Some(shared) => shared
                .link_board()
                .retire_generation_and(&self.key, stopped),
            None => self.inner.board.retire_generation_and(&self.key, stopped),
        }
        // Both start out false/none at every stop (see `Supervisor::stop_accounts`): the lock is
        // taken only for news.
        if cancelled || hook_failure.is_some() {
            self.record_stop_news(shared, |entry| {
                entry.last_stop_cancelled = cancelled;
                entry.set_last_stop_hook_failure(hook_failure);
            });
        }
    }

    /// Writes what a stop learnt (stuck, cancelled, a failed hook) to the account's bookkeeping,
    /// and says so in the lifecycle's cell, when known: a stop of many accounts reads the
    /// outcome of those (and only those) there.
    fn record_stop_news(&self, shared: Option<&Shared>, write: impl FnOnce(&mut AccountEntry)) {
        if let Some(entry) = self.inner.lock().accounts.get_mut(&self.key) {
            write(entry);
        }
        if let Some(shared) = shared {
            shared.mark_stop_news();
        }
    }

    /// A stop arrived while the plugin's start was running, and the start has not returned within
    /// the stop timeout. The account is reported stuck (starts are refused, so no second start
    /// runs beside this one); a detached watcher waits for the call, stops the task it may still
    /// hand over, and then frees the account.
    fn detach_stuck_start(&self, call: BootCall, shared: &Shared) {
        let reason = format!(
            "stuck: the plugin's start did not return within {} of the stop (it blocks its \
             thread); starts are refused until it returns",
            humantime::format_duration(self.inner.policy().stop_timeout)
        );
        tracing::error!(account = %self.key, "{reason}");
        let now = self.inner.clock.wall_ms();
        self.set_state(AccountState::Stuck, |s| {
            // The one exception to the derived flags: a stuck start has no task yet, and the
            // compatible `running` says so (docs/status.md).
            s.running = false;
            s.last_stop_at = Some(now);
            s.last_error = Some(reason.clone());
        });
        self.record_stop_news(Some(shared), |entry| entry.set_stuck(Some(reason.clone())));
        // An isolated plugin kills the start's process, so the start returns now.
        self.channel.plugin.abandon_start(&self.key.account);
        let ctx = self.clone();
        // Not tracked, like a stuck task's watcher.
        tokio::spawn(async move {
            match call.await {
                Ok(Ok(Boot::Started(task, _))) => Box::pin(ctx.stop_task_by_key(task)).await,
                _ => ctx.inner.board.retire_generation(&ctx.key),
            }
            ctx.clear_stuck(&reason, "the stuck start has returned");
        });
    }

    /// Frees an account marked stuck for `reason` (unless something else is stuck now).
    fn clear_stuck(&self, reason: &str, message: &str) {
        {
            let mut state = self.inner.lock();
            match state.accounts.get_mut(&self.key) {
                Some(entry) if entry.stuck() == Some(reason) => entry.set_stuck(None),
                _ => return,
            }
        }
        let now = self.inner.clock.wall_ms();
        self.set_state(AccountState::Stopped, |s| {
            s.last_stop_at = Some(now);
            s.last_error = Some(message.into());
        });
        tracing::info!(account = %self.key, "{message}; the account can start again");
    }
}
