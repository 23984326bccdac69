//! The health monitor: every interval it judges each account and restarts the unhealthy ones,
//! within a cooldown and an hourly cap, without ever fighting the supervisor (docs/behaviour.md,
//! "The health monitor").
//!
//! It never touches an account whose automatic restart is scheduled (`restartPending`), nor
//! one a user stopped, nor one whose monitor is disabled; it never resets a live crash-loop
//! counter (failure 2); verdicts are per account, and a channel that reports no event liveness is
//! never called stale (failure 6). Reviving a gave-up account gives it one start, not a fresh
//! restart budget.
//!
//! The monitor drives the supervisor through [`MonitorTarget`], so its logic is tested against a
//! fake with a paused clock.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{config::HealthConfig, host::AccountKey};

/// What the monitor needs to know of one account.
#[derive(Debug, Clone)]
pub struct AccountView {
    /// The account.
    pub key: AccountKey,
    /// Enabled in the config.
    pub enabled: bool,
    /// Configured.
    pub configured: bool,
    /// A task is running.
    pub running: bool,
    /// An automatic restart is scheduled: hands off.
    pub restart_pending: bool,
    /// Stopped by a user: hands off.
    pub manually_stopped: bool,
    /// The monitor is enabled for this account.
    pub monitor_enabled: bool,
    /// The supervisor gave up on it (restart counter past the maximum).
    pub gave_up: bool,
    /// When the current run started.
    pub started_at: Option<Instant>,
    /// The plugin's connection report.
    pub connected: Option<bool>,
    /// The plugin's mode (`webhook` accounts are never stale).
    pub mode: Option<String>,
    /// The plugin reports event liveness.
    pub reports_events: bool,
    /// Last traffic.
    pub last_event_at: Option<Instant>,
    /// Runs are active.
    pub busy: bool,
    /// Last change of the active runs.
    pub last_run_activity_at: Option<Instant>,
}

/// A boxed future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the monitor drives.
pub trait MonitorTarget: Send + Sync + 'static {
    /// Every account, as the monitor sees it.
    fn accounts(&self) -> Vec<AccountView>;
    /// Stops the account if it runs and starts it again: a gave-up account gets one start (its
    /// counter stays at the maximum), any other gets its counter reset. `Ok` iff it started.
    fn revive(&self, key: &AccountKey) -> BoxFuture<Result<(), String>>;
    /// Records a verdict (and, when `restarted`, the monitor's restart) for status displays.
    fn record(&self, key: &AccountKey, verdict: &Verdict, restarted: bool);
    /// The time now, from the target's clock (the monitor reads no clock of its own).
    fn now(&self) -> Instant;
}

/// A judgement of one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict", content = "reason")]
pub enum Verdict {
    /// Fine (with why, e.g. "unmanaged", "connect-grace", "busy").
    Healthy(&'static str),
    /// Needs a restart, for this reason: `gave-up`, `stopped`, `stuck`, `disconnected`,
    /// `stale-socket`.
    Unhealthy(&'static str),
}

/// Judges one account at `now`, in the order docs/behaviour.md gives.
pub fn judge(view: &AccountView, policy: &HealthConfig, now: Instant) -> Verdict {
    if !view.enabled || !view.configured {
        return Verdict::Healthy("unmanaged");
    }
    if !view.running {
        return Verdict::Unhealthy(if view.gave_up { "gave-up" } else { "stopped" });
    }
    let started = view.started_at.unwrap_or(now);
    // Busy counts only with run activity in this lifecycle: a flag left by an earlier run is not
    // evidence about this one.
    let activity_now = view.last_run_activity_at.filter(|at| *at >= started);
    if view.busy
        && let Some(activity) = activity_now
    {
        return if now.duration_since(activity) < policy.busy_stuck_threshold {
            Verdict::Healthy("busy")
        } else {
            Verdict::Unhealthy("stuck")
        };
    }
    if now.duration_since(started) < policy.connect_grace {
        return Verdict::Healthy("connect-grace");
    }
    if view.connected == Some(false) {
        return Verdict::Unhealthy("disconnected");
    }
    let webhook = view.mode.as_deref() == Some("webhook");
    if view.connected == Some(true) && !webhook && view.reports_events {
        // An event from before this start counts only once the run itself is older than the
        // threshold: measure from whichever is later.
        let since = view.last_event_at.map_or(started, |e| e.max(started));
        if now.duration_since(since) >= policy.stale_event_threshold {
            return Verdict::Unhealthy("stale-socket");
        }
    }
    Verdict::Healthy("ok")
}

/// The health monitor.
pub struct HealthMonitor {
    /// The thresholds in force (a config reload swaps them: they apply from the next check).
    policy: std::sync::RwLock<HealthConfig>,
    target: Arc<dyn MonitorTarget>,
    started: Instant,
    restarts: Mutex<HashMap<AccountKey, VecDeque<Instant>>>,
    checking: AtomicBool,
}

/// What one check did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Whether the check ran (false: another was still in progress).
    pub ran: bool,
    /// Accounts judged unhealthy.
    pub unhealthy: Vec<(AccountKey, &'static str)>,
    /// Accounts restarted.
    pub restarted: Vec<AccountKey>,
    /// Unhealthy accounts left alone (cooldown, hourly cap, or the restart failed), with why.
    pub skipped: Vec<(AccountKey, &'static str)>,
}

impl HealthMonitor {
    /// A monitor over `target`, counting its startup grace from `started`.
    pub fn new(
        policy: HealthConfig,
        target: Arc<dyn MonitorTarget>,
        started: Instant,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy: std::sync::RwLock::new(policy),
            target,
            started,
            restarts: Mutex::new(HashMap::new()),
            checking: AtomicBool::new(false),
        })
    }

    /// The thresholds in force.
    pub fn policy(&self) -> HealthConfig {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `policy` in force (a config reload): from the next check on. A changed non-zero
    /// interval takes effect after the next tick; an interval of 0 at start means no monitor
    /// until channeld restarts.
    pub fn set_policy(&self, policy: HealthConfig) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// When the first check runs: the first multiple of the interval not inside the grace.
    pub fn first_check(&self) -> Option<Instant> {
        let policy = self.policy();
        let interval = policy.interval;
        if interval.is_zero() {
            return None;
        }
        let mut at = interval;
        while at < policy.startup_grace {
            at += interval;
        }
        Some(self.started + at)
    }

    /// Runs checks every interval until `stop` fires. Returns at once if the interval is 0.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(first) = self.first_check() else {
            tracing::info!("health monitor disabled (interval 0)");
            return;
        };
        let mut interval = self.policy().interval;
        let mut ticks = tokio::time::interval_at(first, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The checks it spawned are tracked: it returns only once they have ended too (a check in
        // flight at shutdown meets a supervisor that refuses starts, and ends promptly).
        let checks = tokio_util::task::TaskTracker::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticks.tick() => {
                    let now_interval = self.policy().interval;
                    if now_interval.is_zero() {
                        // Switched off by a reload: no checks until it is switched on again.
                        continue;
                    }
                    if now_interval != interval {
                        // A reload changed the interval: the next tick is one new interval away.
                        interval = now_interval;
                        ticks = tokio::time::interval_at(Instant::now() + interval, interval);
                        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    }
                    // Single-flight: a check still running (a slow restart) makes this tick a no-op.
                    let this = self.clone();
                    checks.spawn(async move { this.check().await });
                }
            }
        }
        checks.close();
        checks.wait().await;
    }

    /// One check of every account; a no-op while another check is in progress.
    pub async fn check(&self) -> CheckReport {
        if self.checking.swap(true, Ordering::AcqRel) {
            tracing::debug!("health check skipped: the previous one is still running");
            return CheckReport::default();
        }
        let report = self.check_inner().await;
        self.checking.store(false, Ordering::Release);
        report
    }

    async fn check_inner(&self) -> CheckReport {
        let mut report = CheckReport {
            ran: true,
            ..CheckReport::default()
        };
        let now = self.target.now();
        let policy = self.policy();
        let mut revivals = Vec::new();
        for view in self.target.accounts() {
            // Hands off: the supervisor has a restart scheduled, a user stopped it, or the monitor
            // is off for it. Its counter is the supervisor's business (failure 2).
            if view.restart_pending || view.manually_stopped || !view.monitor_enabled {
                continue;
            }
            let verdict = judge(&view, &policy, now);
            let Verdict::Unhealthy(reason) = verdict else {
                self.target.record(&view.key, &verdict, false);
                continue;
            };
            report.unhealthy.push((view.key.clone(), reason));
            match self.may_restart(&view.key, now) {
                Err(why) => {
                    self.target.record(&view.key, &verdict, false);
                    report.skipped.push((view.key.clone(), why));
                }
                Ok(()) => revivals.push((view.key.clone(), verdict)),
            }
        }
        let results = futures_util::future::join_all(revivals.into_iter().map(|(key, verdict)| {
            let revive = self.target.revive(&key);
            async move { (key, verdict, revive.await) }
        }))
        .await;
        for (key, verdict, result) in results {
            match result {
                Ok(()) => {
                    tracing::info!(account = %key, "health monitor restarted the account: {verdict:?}");
                    self.note_restart(&key, now);
                    crate::metrics::record_monitor_restart();
                    self.target.record(&key, &verdict, true);
                    report.restarted.push(key);
                }
                Err(e) => {
                    tracing::warn!(account = %key, "health monitor restart failed: {e}");
                    self.target.record(&key, &verdict, false);
                    report.skipped.push((key, "restart-failed"));
                }
            }
        }
        report
    }

    /// Cooldown (a restart within the last `cooldown_cycles` intervals, inclusive) and the
    /// rolling hourly cap.
    fn may_restart(&self, key: &AccountKey, now: Instant) -> Result<(), &'static str> {
        let policy = self.policy();
        let mut restarts = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        let history = restarts.entry(key.clone()).or_default();
        let hour = Duration::from_secs(3600);
        while history
            .front()
            .is_some_and(|t| now.duration_since(*t) >= hour)
        {
            history.pop_front();
        }
        let cooldown = policy.interval * policy.cooldown_cycles;
        if history
            .back()
            .is_some_and(|t| now.duration_since(*t) <= cooldown)
        {
            return Err("cooldown");
        }
        if history.len() >= policy.max_restarts_per_hour as usize {
            return Err("hourly-cap");
        }
        Ok(())
    }

    fn note_restart(&self, key: &AccountKey, at: Instant) {
        let mut restarts = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        restarts.entry(key.clone()).or_default().push_back(at);
    }
}

pub mod starvation;
#[cfg(test)]
mod tests;
