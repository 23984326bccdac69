//! One account's lifecycle task: boot → run → (crash) backoff → boot …, until a user stops it, it
//! is given up on, or it is disabled / not configured. It is the only code that starts or ends
//! the account's plugin task, which is how "at most one task per account, ever" holds: a boot
//! never abandons the plugin's start call (its result may be a task), and a task is only replaced
//! once it has ended, been cancelled and seen to end, or been reported stuck (which refuses starts
//! until it ends).

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};
use tokio_util::sync::CancellationToken;

use super::{
    BootEvent, Channel, Inner, Phase, StartOutcome, calls::spawn_call, policy::backoff_delay,
};
use crate::{
    host::{AccountKey, AccountLink, HostSink},
    plugin::{Check, RunningTask},
};

/// What a lifecycle needs to talk to its account; cloneable so a detached watcher can finish a
/// job the lifecycle had to leave (a stuck start, a stuck task).
#[derive(Clone)]
pub(super) struct AccountCtx {
    pub(super) inner: Arc<Inner>,
    pub(super) channel: Arc<Channel>,
    pub(super) key: AccountKey,
}

pub(super) struct Lifecycle {
    pub(super) ctx: AccountCtx,
    pub(super) id: u64,
    pub(super) token: CancellationToken,
    pub(super) wake: Arc<Notify>,
    pub(super) events: watch::Sender<BootEvent>,
    pub(super) ended: watch::Sender<bool>,
}

/// Tells a lifecycle when the plugin's runtime first polled the task (`None`: the plugin does not
/// report it, a 1.0 plugin, and "running" means "start returned").
type Polled = Option<watch::Receiver<bool>>;

/// What one boot produced.
enum Boot {
    Started(RunningTask, Polled),
    Disabled(String),
    NotConfigured(String),
    Failed(String),
    /// A stop arrived before the plugin's start was called (or instead of it).
    Stopped,
    /// A stop arrived while the plugin's start was running, and the start did not return within
    /// the stop timeout: the account is reported stuck and a detached watcher owns the call.
    Stuck,
}

/// How a run ended.
enum RunEnd {
    /// The task ended by itself, after running this long.
    Exited(Result<(), String>, Duration),
    /// A user stopped it (the stop sequence has run).
    Stopped,
}

type BootCall = JoinHandle<Result<Boot, String>>;

impl Lifecycle {
    pub(super) async fn run(self) {
        let ctx = &self.ctx;
        loop {
            self.set_phase(Phase::Booting);
            let (result, ran_for) = match self.boot().await {
                Boot::Stopped => {
                    self.publish(StartOutcome::Stopped);
                    ctx.record_stopped();
                    break;
                }
                Boot::Stuck => {
                    self.publish(StartOutcome::Stopped);
                    break;
                }
                Boot::Disabled(reason) => {
                    ctx.inner.board.update(&ctx.key, |s| {
                        s.enabled = false;
                        s.running = false;
                        s.restart_pending = false;
                        s.last_error = Some(reason.clone());
                    });
                    self.publish(StartOutcome::Disabled(reason));
                    break;
                }
                Boot::NotConfigured(reason) => {
                    ctx.inner.board.update(&ctx.key, |s| {
                        s.enabled = true;
                        s.configured = false;
                        s.running = false;
                        s.restart_pending = false;
                        s.last_error = Some(reason.clone());
                    });
                    self.publish(StartOutcome::NotConfigured(reason));
                    break;
                }
                Boot::Failed(error) => {
                    tracing::warn!(account = %ctx.key, "start failed: {error}");
                    ctx.inner.board.retire_generation(&ctx.key);
                    ctx.inner.board.update(&ctx.key, |s| {
                        s.running = false;
                        s.last_error = Some(error.clone());
                    });
                    self.publish(StartOutcome::Failed(error.clone()));
                    (Err(error), Duration::ZERO)
                }
                Boot::Started(task, _) if self.token.is_cancelled() => {
                    // The start returned its task after a stop arrived: the stop wins, and the
                    // task gets the whole stop sequence (it never counts as running).
                    ctx.stop_task(task).await;
                    self.publish(StartOutcome::Stopped);
                    break;
                }
                Boot::Started(task, polled) => match self.run_task(task, polled).await {
                    RunEnd::Stopped => break,
                    RunEnd::Exited(result, ran_for) => (result, ran_for),
                },
            };
            if self.token.is_cancelled() {
                // A stop raced with the end of the task: the stop wins, and says so.
                ctx.record_stopped();
                break;
            }
            if !self.schedule_restart(result, ran_for).await {
                break;
            }
        }
        self.finish();
    }

    /// Reserves a boot slot of the channel, then asks the plugin (off the async workers) whether
    /// the account is enabled and configured, and starts it — unless a stop arrived meanwhile, in
    /// which case the plugin's start is never called.
    ///
    /// The call is never abandoned: whoever waits for a start gives up after the start timeout
    /// (see `Supervisor::start_account`), but the lifecycle keeps the call, because a start that
    /// returns late still hands over a task, and a second boot beside it would start a second
    /// one. A stop bounds the wait by the stop timeout (then [`Boot::Stuck`]).
    async fn boot(&self) -> Boot {
        let ctx = &self.ctx;
        let _permit = tokio::select! {
            biased;
            () = self.token.cancelled() => return Boot::Stopped,
            permit = ctx.channel.boot_permits.acquire() => permit,
        };
        if self.token.is_cancelled() {
            return Boot::Stopped;
        }
        if ctx.channel.disabled.contains(&ctx.key.account) {
            // The host's own `enabled = false`: the plugin is not asked.
            return Boot::Disabled("disabled".into());
        }
        let board = &ctx.inner.board;
        let generation = board.begin_generation(&ctx.key);
        let sink: Arc<dyn HostSink> = board.clone();
        let mut link = AccountLink::for_account(ctx.key.clone(), generation, sink);
        let plugin = ctx.channel.plugin.clone();
        let polled = plugin.reports_task_polled().then(|| {
            let (tx, rx) = watch::channel(false);
            link = link.clone().with_polled_signal(tx);
            rx
        });
        let account = ctx.key.account.clone();
        let token = self.token.clone();
        let mut call: BootCall = spawn_call(move || -> Result<Boot, String> {
            if let Check::No(reason) = plugin.is_enabled(&account).map_err(|e| e.to_string())? {
                return Ok(Boot::Disabled(reason.unwrap_or_else(|| "disabled".into())));
            }
            if let Check::No(reason) = plugin.is_configured(&account).map_err(|e| e.to_string())? {
                return Ok(Boot::NotConfigured(
                    reason.unwrap_or_else(|| "not configured".into()),
                ));
            }
            if token.is_cancelled() {
                return Ok(Boot::Stopped);
            }
            plugin
                .start_account(&account, link)
                .map(|task| Boot::Started(task, polled))
                .map_err(|e| e.to_string())
        });
        let joined = tokio::select! {
            biased;
            joined = &mut call => joined,
            () = self.token.cancelled() => {
                let limit = ctx.inner.policy().stop_timeout;
                match timeout(limit, &mut call).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        ctx.detach_stuck_start(call);
                        return Boot::Stuck;
                    }
                }
            }
        };
        match joined {
            Ok(Ok(boot)) => boot,
            Ok(Err(error)) => Boot::Failed(error),
            Err(e) => Boot::Failed(format!("start failed: {e}")),
        }
    }

    /// Runs a started task until it ends or a user stops it. With a plugin that reports the first
    /// poll of its tasks, the account counts as running only from that report: a task the
    /// plugin's runtime never polls (its workers are all blocked) is never shown running.
    async fn run_task(&self, mut task: RunningTask, polled: Polled) -> RunEnd {
        let ctx = &self.ctx;
        if let Some(mut polled) = polled {
            tokio::select! {
                biased;
                () = self.token.cancelled() => {
                    ctx.stop_task(task).await;
                    return RunEnd::Stopped;
                }
                // Also ends when the plugin dropped the link (the task ended, polled or not):
                // the end is then seen below.
                _ = async { polled.wait_for(|polled| *polled).await.is_ok() } => {}
            }
        }
        let attempts = ctx
            .inner
            .lock()
            .accounts
            .get(&ctx.key)
            .map_or(0, |e| e.attempts);
        // Stamps lastStartAt and the monotonic start the health monitor measures from.
        ctx.inner.board.mark_started(&ctx.key);
        ctx.inner.board.update(&ctx.key, |s| {
            s.enabled = true;
            s.configured = true;
            s.running = true;
            s.restart_pending = false;
            s.last_error = None;
            s.reconnect_attempts = attempts;
        });
        self.set_phase(Phase::Running);
        self.publish(StartOutcome::Started);
        let started = ctx.inner.clock.now();
        tokio::select! {
            // A stop that coincides with the end of the task still runs the stop sequence.
            biased;
            () = self.token.cancelled() => {
                ctx.stop_task(task).await;
                RunEnd::Stopped
            }
            result = &mut task.done => {
                let ran_for = ctx.inner.clock.now().duration_since(started);
                ctx.inner.board.retire_generation(&ctx.key);
                let now = ctx.inner.clock.wall_ms();
                let error = match &result {
                    Ok(()) => "channel exited without an error".to_owned(),
                    Err(e) => e.clone(),
                };
                ctx.inner.board.update(&ctx.key, |s| {
                    s.running = false;
                    s.last_stop_at = Some(now);
                    s.last_error = Some(error.clone());
                });
                RunEnd::Exited(result, ran_for)
            }
        }
    }

    /// After an unrequested end: count it, give up past the maximum, else wait the backoff.
    /// Returns whether to boot again. Every way out records why.
    async fn schedule_restart(&self, result: Result<(), String>, ran_for: Duration) -> bool {
        let ctx = &self.ctx;
        let policy = ctx.inner.policy();
        let attempt = {
            let mut state = ctx.inner.lock();
            let entry = state.accounts.entry(ctx.key.clone()).or_default();
            if ran_for >= policy.stable_run {
                entry.attempts = 0;
            }
            entry.attempts += 1;
            entry.attempts
        };
        let error = result
            .err()
            .unwrap_or_else(|| "channel exited without an error".into());
        let now = ctx.inner.clock.now();
        if attempt > policy.max_restarts {
            let message = format!("giving up after {} restart attempts", policy.max_restarts);
            tracing::debug!(account = %ctx.key, "{error}; {message}");
            ctx.inner.restart_log.record(&ctx.key.channel, true, now);
            ctx.inner.board.update(&ctx.key, |s| {
                s.restart_pending = false;
                s.reconnect_attempts = attempt;
                s.last_error = Some(format!("{error}; {message}"));
            });
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
        ctx.inner.board.update(&ctx.key, |s| {
            s.restart_pending = true;
            s.reconnect_attempts = attempt;
        });
        self.set_phase(Phase::Backoff);
        let deadline = Instant::now() + delay;
        tokio::select! {
            // Biased: a stop wins over everything, and a user's wake-up is consumed even when the
            // sleep ends at the same moment (an unconsumed one would stay stored in the `Notify`
            // and cut the next backoff short).
            biased;
            () = self.token.cancelled() => {
                ctx.record_stopped();
                false
            }
            () = self.wake.notified() => true,
            () = sleep(deadline.saturating_duration_since(Instant::now())) => true,
        }
    }

    /// Sets the phase the state shows; `Stopping` (set by a stop) is final.
    fn set_phase(&self, phase: Phase) {
        let mut state = self.ctx.inner.lock();
        if let Some(lc) = state
            .accounts
            .get_mut(&self.ctx.key)
            .and_then(|e| e.lifecycle.as_mut())
            .filter(|lc| lc.id == self.id && lc.phase != Phase::Stopping)
        {
            lc.phase = phase;
        }
    }

    fn publish(&self, outcome: StartOutcome) {
        self.events.send_modify(|event| {
            event.seq += 1;
            event.outcome = Some(outcome);
        });
    }

    /// Frees the slot (if it is still this lifecycle's) and wakes whoever waits for the end.
    fn finish(&self) {
        {
            let mut state = self.ctx.inner.lock();
            if let Some(entry) = state.accounts.get_mut(&self.ctx.key)
                && entry.lifecycle.as_ref().is_some_and(|lc| lc.id == self.id)
            {
                entry.lifecycle = None;
            }
        }
        let _ = self.ended.send(true);
    }
}

impl AccountCtx {
    fn record_stopped(&self) {
        let now = self.inner.clock.wall_ms();
        self.inner.board.update(&self.key, |s| {
            s.running = false;
            s.restart_pending = false;
            s.last_stop_at = Some(now);
        });
    }

    /// The stop sequence: fire the abort, call the plugin's stop hook (bounded), wait for the task
    /// up to the stop timeout, then cancel it on the plugin's runtime; a task that still does not
    /// end is reported stuck, and its slot frees itself when it finally ends.
    async fn stop_task(&self, mut task: RunningTask) {
        let plugin = self.channel.plugin.clone();
        let stop_timeout = self.inner.policy().stop_timeout;
        plugin.abort_task(task.id);
        let hook_plugin = plugin.clone();
        let account = self.key.account.clone();
        let key = self.key.clone();
        let permits = self.channel.blocking_permits.clone();
        // The hook runs beside the wait, and the stop waits for it only until the stop's own
        // deadline: a hook that hangs cannot delay the stop past its bound, and one that returns
        // in time has finished before the account counts as stopped (and before a retired
        // version's runtime is shut down under it).
        let deadline = tokio::time::Instant::now() + stop_timeout;
        // A 1.1 plugin's hook is a future on its own runtime (dropped, and so cancelled, at the
        // deadline); a 1.0 plugin's runs on a host thread, under the plugin's limit of blocking
        // calls in flight.
        let hook = tokio::spawn(async move {
            let result = match hook_plugin.stop_account_async(&account) {
                Some(hook) => timeout(stop_timeout, hook)
                    .await
                    .map_err(|_| super::calls::CallError::TimedOut(stop_timeout)),
                None => {
                    super::calls::bounded_with_permit(&permits, stop_timeout, move || {
                        hook_plugin.stop_account(&account)
                    })
                    .await
                }
            };
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(account = %key, "stop hook: {e}"),
                Err(e) => tracing::warn!(account = %key, "stop hook {e}"),
            }
        });
        let mut cancelled = false;
        let ended = match timeout(stop_timeout, &mut task.done).await {
            Ok(_) => true,
            Err(_) => {
                cancelled = true;
                plugin.cancel_task(task.id);
                timeout(self.inner.policy().cancel_grace, &mut task.done)
                    .await
                    .is_ok()
            }
        };
        self.inner.board.retire_generation(&self.key);
        if ended {
            let _ = tokio::time::timeout_at(deadline, hook).await;
            let now = self.inner.clock.wall_ms();
            self.inner.board.update(&self.key, |s| {
                s.running = false;
                s.restart_pending = false;
                s.last_stop_at = Some(now);
                if cancelled {
                    s.last_error = Some(format!(
                        "did not stop within {} of its abort; cancelled",
                        humantime::format_duration(stop_timeout)
                    ));
                }
            });
            if let Some(entry) = self.inner.lock().accounts.get_mut(&self.key) {
                entry.last_stop_cancelled = cancelled;
            }
            return;
        }
        let reason = format!(
            "stuck: the task did not end within {} of its abort nor when cancelled (it blocks \
             its thread); starts are refused until it ends",
            humantime::format_duration(stop_timeout)
        );
        tracing::error!(account = %self.key, "{reason}");
        self.inner.board.update(&self.key, |s| {
            s.running = true;
            s.restart_pending = false;
            s.last_error = Some(reason.clone());
        });
        if let Some(entry) = self.inner.lock().accounts.get_mut(&self.key) {
            entry.stuck = Some(reason.clone());
            entry.last_stop_cancelled = true;
        }
        let ctx = self.clone();
        // Not tracked: shutdown must not wait on a thread that may never return.
        tokio::spawn(async move {
            let _ = task.done.await;
            ctx.clear_stuck(&reason, "the stuck task has ended");
        });
    }

    /// A stop arrived while the plugin's start was running, and the start has not returned within
    /// the stop timeout. The account is reported stuck (starts are refused, so no second start
    /// runs beside this one); a detached watcher waits for the call, stops the task it may still
    /// hand over, and then frees the account.
    fn detach_stuck_start(&self, call: BootCall) {
        let reason = format!(
            "stuck: the plugin's start did not return within {} of the stop (it blocks its \
             thread); starts are refused until it returns",
            humantime::format_duration(self.inner.policy().stop_timeout)
        );
        tracing::error!(account = %self.key, "{reason}");
        let now = self.inner.clock.wall_ms();
        self.inner.board.update(&self.key, |s| {
            s.running = false;
            s.restart_pending = false;
            s.last_stop_at = Some(now);
            s.last_error = Some(reason.clone());
        });
        if let Some(entry) = self.inner.lock().accounts.get_mut(&self.key) {
            entry.stuck = Some(reason.clone());
        }
        let ctx = self.clone();
        // Not tracked, like a stuck task's watcher.
        tokio::spawn(async move {
            match call.await {
                Ok(Ok(Boot::Started(task, _))) => ctx.stop_task(task).await,
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
                Some(entry) if entry.stuck.as_deref() == Some(reason) => entry.stuck = None,
                _ => return,
            }
        }
        let now = self.inner.clock.wall_ms();
        self.inner.board.update(&self.key, |s| {
            s.running = false;
            s.last_stop_at = Some(now);
            s.last_error = Some(message.into());
        });
        tracing::info!(account = %self.key, "{message}; the account can start again");
    }
}
