//! The health monitor's view of the supervisor ([`MonitorTarget`]): what it needs to judge each
//! account, and its revival, which never erases a live crash-loop counter (failure 2) and gives a
//! gave-up account one start, not a fresh budget.

use super::{StartMode, StartOutcome, Supervisor};
use crate::{
    health::{AccountView, BoxFuture, MonitorTarget, Verdict},
    host::AccountKey,
};

impl MonitorTarget for Supervisor {
    fn now(&self) -> tokio::time::Instant {
        self.inner.clock.now()
    }

    fn accounts(&self) -> Vec<AccountView> {
        let channels = self.channels();
        let policy_max = self.inner.policy().max_restarts;
        let entries: Vec<(AccountKey, bool, u32)> = {
            let state = self.lock();
            channels
                .iter()
                .flat_map(|ch| {
                    ch.accounts
                        .iter()
                        .map(move |a| AccountKey::new(ch.id.clone(), a.clone()))
                })
                .map(|key| {
                    let (manual, attempts) = state
                        .accounts
                        .get(&key)
                        .map_or((false, 0), |e| (e.manual_stop, e.attempts()));
                    (key, manual, attempts)
                })
                .collect()
        };
        entries
            .into_iter()
            .map(|(key, manually_stopped, attempts)| {
                let (snapshot, liveness) =
                    self.inner.board.get_with_liveness(&key).unwrap_or_default();
                AccountView {
                    monitor_enabled: self.is_health_monitor_enabled(&key.channel, &key.account),
                    enabled: snapshot.enabled || !snapshot_known(&snapshot),
                    configured: snapshot.configured || !snapshot_known(&snapshot),
                    // A boot in flight (an ABI 1.1 task not yet polled) is not a stopped account:
                    // judged as running, it falls under the connect grace instead of being
                    // "restarted" while it starts (seen under heavy load).
                    running: snapshot.running
                        || snapshot.state == crate::status::AccountState::Starting,
                    restart_pending: snapshot.restart_pending,
                    manually_stopped,
                    gave_up: attempts > policy_max,
                    started_at: liveness.started_at,
                    connected: snapshot.connected,
                    mode: snapshot.mode,
                    reports_events: snapshot.reports_events,
                    last_event_at: liveness.last_event_at,
                    busy: snapshot.busy,
                    last_run_activity_at: liveness.last_run_activity_at,
                    key,
                }
            })
            .collect()
    }

    fn revive(&self, key: &AccountKey) -> BoxFuture<Result<(), String>> {
        let this = self.clone();
        let key = key.clone();
        Box::pin(async move {
            let ch = this.channel(&key.channel).map_err(|e| e.to_string())?;
            let gave_up = this.restart_attempts(&key) > this.inner.policy().max_restarts;
            let running = this
                .lock()
                .accounts
                .get(&key)
                .is_some_and(|e| e.lifecycle.is_some());
            if running {
                this.stop_account(&key).await;
            }
            // A gave-up account keeps its counter: one start, and if that run ends before the
            // stable period it is back to gave-up at once.
            let outcome = this
                .start_account(
                    &ch,
                    &key,
                    StartMode::Revive {
                        reset_counter: !gave_up,
                    },
                )
                .await;
            match outcome {
                StartOutcome::Started | StartOutcome::AlreadyRunning => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
    }

    fn record(&self, key: &AccountKey, verdict: &Verdict, restarted: bool) {
        let text = match verdict {
            Verdict::Healthy(why) if *why == "ok" => "healthy".to_owned(),
            Verdict::Healthy(why) => format!("healthy ({why})"),
            Verdict::Unhealthy(why) => (*why).to_owned(),
        };
        let now = self.inner.clock.wall_ms();
        self.inner.board.update(key, |s| {
            s.health_verdict = Some(text);
            if restarted {
                s.health_restart_at = Some(now);
            }
        });
    }
}

/// A snapshot the board has never written to is all defaults; treat its flags as unknown.
fn snapshot_known(snapshot: &crate::status::AccountSnapshot) -> bool {
    !snapshot.account_id.is_empty()
}
