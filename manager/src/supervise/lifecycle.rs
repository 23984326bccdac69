//! One account's lifecycle task: boot → run → (crash) backoff → boot …, until a user stops it, it
//! is given up on, or it is disabled / not configured. It is the only code that starts or ends
//! the account's plugin task, which is how "at most one task per account, ever" holds.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, watch},
    time::{Instant, sleep, timeout},
};
use tokio_util::sync::CancellationToken;

use super::{
    BootEvent, CANCEL_GRACE, Channel, Inner, Phase, StartOutcome, calls::bounded,
    policy::backoff_delay,
};
use crate::{
    host::{AccountKey, AccountLink, HostSink},
    plugin::{Check, RunningTask},
};

pub(super) struct Lifecycle {
    pub(super) inner: Arc<Inner>,
    pub(super) id: u64,
    pub(super) channel: Arc<Channel>,
    pub(super) key: AccountKey,
    pub(super) token: CancellationToken,
    pub(super) wake: Arc<Notify>,
    pub(super) events: watch::Sender<BootEvent>,
    pub(super) ended: watch::Sender<bool>,
}

/// What one boot produced.
enum Boot {
    Started(RunningTask),
    Disabled(String),
    NotConfigured(String),
    Failed { error: String, timed_out: bool },
    Stopped,
}

/// How a run ended.
enum RunEnd {
    /// The task ended by itself, after running this long.
    Exited(Result<(), String>, Duration),
    /// A user stopped it (the stop sequence has run).
    Stopped,
}

impl Lifecycle {
    pub(super) async fn run(self) {
        loop {
            self.set_phase(Phase::Booting);
            let (result, ran_for) = match self.boot().await {
                Boot::Stopped => {
                    self.publish(StartOutcome::Stopped);
                    self.record_stopped();
                    break;
                }
                Boot::Disabled(reason) => {
                    self.inner.board.update(&self.key, |s| {
                        s.enabled = false;
                        s.running = false;
                        s.restart_pending = false;
                        s.last_error = Some(reason.clone());
                    });
                    self.publish(StartOutcome::Disabled(reason));
                    break;
                }
                Boot::NotConfigured(reason) => {
                    self.inner.board.update(&self.key, |s| {
                        s.enabled = true;
                        s.configured = false;
                        s.running = false;
                        s.restart_pending = false;
                        s.last_error = Some(reason.clone());
                    });
                    self.publish(StartOutcome::NotConfigured(reason));
                    break;
                }
                Boot::Failed { error, timed_out } => {
                    tracing::warn!(account = %self.key, "start failed: {error}");
                    self.inner.board.update(&self.key, |s| {
                        s.running = false;
                        s.last_error = Some(error.clone());
                    });
                    self.publish(if timed_out {
                        StartOutcome::TimedOut(error.clone())
                    } else {
                        StartOutcome::Failed(error.clone())
                    });
                    (Err(error), Duration::ZERO)
                }
                Boot::Started(task) => match self.run_task(task).await {
                    RunEnd::Stopped => break,
                    RunEnd::Exited(result, ran_for) => (result, ran_for),
                },
            };
            if self.token.is_cancelled() {
                // A stop raced with the end of the task: the stop wins, and says so.
                self.record_stopped();
                break;
            }
            if !self.schedule_restart(result, ran_for).await {
                break;
            }
        }
        self.finish();
    }

    /// Reserves a boot slot of the channel, then asks the plugin (off the async workers, bounded
    /// by the start timeout) whether the account is enabled and configured, and starts it — unless
    /// a stop arrived meanwhile, in which case the plugin's start is never called.
    async fn boot(&self) -> Boot {
        let _permit = self.channel.boot_permits.acquire().await;
        if self.token.is_cancelled() {
            return Boot::Stopped;
        }
        let board = &self.inner.board;
        let generation = board.begin_generation(&self.key);
        let sink: Arc<dyn HostSink> = board.clone();
        let link = AccountLink::for_account(self.key.clone(), generation, sink);
        let plugin = self.channel.plugin.clone();
        let account = self.key.account.clone();
        let token = self.token.clone();
        let limit = self.inner.policy.start_timeout;
        let call = bounded(limit, move || -> Result<Boot, String> {
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
                .map(Boot::Started)
                .map_err(|e| e.to_string())
        });
        match call.await {
            Ok(Ok(boot)) => boot,
            Ok(Err(error)) => Boot::Failed {
                error,
                timed_out: false,
            },
            Err(e) => {
                board.retire_generation(&self.key);
                Boot::Failed {
                    error: format!("start {e}"),
                    timed_out: true,
                }
            }
        }
    }

    /// Runs a started task until it ends or a user stops it.
    async fn run_task(&self, mut task: RunningTask) -> RunEnd {
        let attempts = self
            .inner
            .lock()
            .accounts
            .get(&self.key)
            .map_or(0, |e| e.attempts);
        let now = self.inner.clock.wall_ms();
        self.inner.board.update(&self.key, |s| {
            s.enabled = true;
            s.configured = true;
            s.running = true;
            s.restart_pending = false;
            s.last_start_at = Some(now);
            s.last_error = None;
            s.reconnect_attempts = attempts;
        });
        self.set_phase(Phase::Running);
        self.publish(StartOutcome::Started);
        let started = self.inner.clock.now();
        tokio::select! {
            result = &mut task.done => {
                let ran_for = self.inner.clock.now().duration_since(started);
                self.inner.board.retire_generation(&self.key);
                let now = self.inner.clock.wall_ms();
                let error = match &result {
                    Ok(()) => "channel exited without an error".to_owned(),
                    Err(e) => e.clone(),
                };
                self.inner.board.update(&self.key, |s| {
                    s.running = false;
                    s.last_stop_at = Some(now);
                    s.last_error = Some(error.clone());
                });
                RunEnd::Exited(result, ran_for)
            }
            () = self.token.cancelled() => {
                self.stop_task(task).await;
                RunEnd::Stopped
            }
        }
    }

    /// The stop sequence: fire the abort, call the plugin's stop hook (bounded), wait for the task
    /// up to the stop timeout, then cancel it on the plugin's runtime; a task that still does not
    /// end is reported stuck, and its slot frees itself when it finally ends.
    async fn stop_task(&self, mut task: RunningTask) {
        self.set_phase(Phase::Stopping);
        let plugin = self.channel.plugin.clone();
        let stop_timeout = self.inner.policy.stop_timeout;
        plugin.abort_task(task.id);
        let hook_plugin = plugin.clone();
        let account = self.key.account.clone();
        let key = self.key.clone();
        // The hook runs beside the wait: a hook that hangs cannot delay the stop past its bound.
        tokio::spawn(async move {
            match bounded(stop_timeout, move || hook_plugin.stop_account(&account)).await {
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
                timeout(CANCEL_GRACE, &mut task.done).await.is_ok()
            }
        };
        self.inner.board.retire_generation(&self.key);
        if ended {
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
            entry.stuck = Some(reason);
            entry.last_stop_cancelled = true;
        }
        let inner = self.inner.clone();
        let key = self.key.clone();
        // Not tracked: shutdown must not wait on a thread that may never return.
        tokio::spawn(async move {
            let _ = task.done.await;
            if let Some(entry) = inner.lock().accounts.get_mut(&key) {
                entry.stuck = None;
            }
            let now = inner.clock.wall_ms();
            inner.board.update(&key, |s| {
                s.running = false;
                s.last_stop_at = Some(now);
                s.last_error = Some("the stuck task has ended".into());
            });
            tracing::info!(account = %key, "the stuck task has ended; the account can start again");
        });
    }

    /// After an unrequested end: count it, give up past the maximum, else wait the backoff.
    /// Returns whether to boot again. Every way out records why.
    async fn schedule_restart(&self, result: Result<(), String>, ran_for: Duration) -> bool {
        let policy = &self.inner.policy;
        let attempt = {
            let mut state = self.inner.lock();
            let entry = state.accounts.entry(self.key.clone()).or_default();
            if ran_for >= policy.stable_run {
                entry.attempts = 0;
            }
            entry.attempts += 1;
            entry.attempts
        };
        let error = result
            .err()
            .unwrap_or_else(|| "channel exited without an error".into());
        let now = self.inner.clock.now();
        if attempt > policy.max_restarts {
            let message = format!("giving up after {} restart attempts", policy.max_restarts);
            tracing::debug!(account = %self.key, "{error}; {message}");
            self.inner.restart_log.record(&self.key.channel, true, now);
            self.inner.board.update(&self.key, |s| {
                s.restart_pending = false;
                s.reconnect_attempts = attempt;
                s.last_error = Some(format!("{error}; {message}"));
            });
            return false;
        }
        let delay = backoff_delay(policy, attempt, self.inner.jitter.next());
        tracing::debug!(
            account = %self.key,
            attempt,
            max = policy.max_restarts,
            delay_ms = delay.as_millis() as u64,
            "task ended ({error}); restarting after backoff"
        );
        self.inner.restart_log.record(&self.key.channel, false, now);
        self.inner.board.update(&self.key, |s| {
            s.restart_pending = true;
            s.reconnect_attempts = attempt;
        });
        self.set_phase(Phase::Backoff);
        let deadline = Instant::now() + delay;
        tokio::select! {
            () = sleep(deadline.saturating_duration_since(Instant::now())) => true,
            () = self.wake.notified() => true,
            () = self.token.cancelled() => {
                self.record_stopped();
                false
            }
        }
    }

    fn record_stopped(&self) {
        let now = self.inner.clock.wall_ms();
        self.inner.board.update(&self.key, |s| {
            s.running = false;
            s.restart_pending = false;
            s.last_stop_at = Some(now);
        });
    }

    fn set_phase(&self, phase: Phase) {
        let mut state = self.inner.lock();
        if let Some(lc) = state
            .accounts
            .get_mut(&self.key)
            .and_then(|e| e.lifecycle.as_mut())
            .filter(|lc| lc.id == self.id)
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
            let mut state = self.inner.lock();
            if let Some(entry) = state.accounts.get_mut(&self.key)
                && entry.lifecycle.as_ref().is_some_and(|lc| lc.id == self.id)
            {
                entry.lifecycle = None;
            }
        }
        let _ = self.ended.send(true);
    }
}
