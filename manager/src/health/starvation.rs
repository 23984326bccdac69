//! Starved plugin runtimes. Each plugin's SDK watches its own runtime (a probe task it spawns
//! from a thread outside the runtime, and the polls of every future it runs for an account) and
//! reports, through the plugin-wide host link's `log` with the target
//! [`RUNTIME_REPORT_TARGET`](channeld_plugin_abi::abi::RUNTIME_REPORT_TARGET), when no worker has
//! been free past the channel's threshold, naming the accounts whose task or hook holds the
//! threads, and again when a worker is free. The ABI is frozen at 1.1, so this rides on an
//! existing host service instead of a new entry (docs/starvation.md).
//!
//! Here the host keeps the last report of each channel ([`Runtimes`], on the status board: it is
//! what a plugin reports), logs it, counts it in the metrics, serves it (`GET /v1/runtimes`,
//! `channeld status`), and [`follow`] turns it into account states: while a runtime is starved,
//! the accounts holding its threads are `stuck` (their `lastError` says what they block in) and
//! its other running accounts are `starting` (their tasks cannot run); once it recovers, the
//! accounts it changed go back to `running` if their task is still the same one.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    host::AccountKey,
    status::{AccountSnapshot, AccountState, StatusBoard},
    supervise::Supervisor,
};

/// An account whose future holds one of a starved runtime's threads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The account id.
    pub account: String,
    /// What it is blocked in: `task`, `spawned task`, `stop hook`, `logout hook`, `send`.
    #[serde(rename = "in")]
    pub blocked_in: String,
}

/// A channel's runtime as its SDK last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeReport {
    /// No worker free past the threshold.
    pub starved: bool,
    /// When the report came, ms since the epoch.
    pub since: Option<i64>,
    /// The runtime's worker threads.
    #[serde(default)]
    pub workers: u32,
    /// How long no worker had been free when the report was made.
    #[serde(default)]
    pub blocked_ms: u64,
    /// The accounts holding its threads (empty when recovered).
    #[serde(default)]
    pub holders: Vec<Holder>,
}

impl RuntimeReport {
    /// `holders` as `channel:account (in)` for a log line or a table.
    pub fn describe_holders(&self, channel: &str) -> String {
        if self.holders.is_empty() {
            return "no account named (the blocking code is outside every account's future)"
                .to_owned();
        }
        self.holders
            .iter()
            .map(|h| format!("{channel}:{} ({})", h.account, h.blocked_in))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The last runtime report of every channel that made one, and a signal on each change.
pub struct Runtimes {
    reports: Mutex<BTreeMap<String, RuntimeReport>>,
    changed: watch::Sender<u64>,
}

impl Default for Runtimes {
    fn default() -> Self {
        Self {
            reports: Mutex::new(BTreeMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Runtimes {
    /// Records `channel`'s report (the record's JSON `fields`), made at `wall_ms`: logs it, counts
    /// a starved one, and signals [`follow`]. A report that does not parse is logged and dropped.
    pub fn report(&self, channel: &str, fields: &str, wall_ms: i64) {
        let mut report: RuntimeReport = match serde_json::from_str(fields) {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(channel, "unreadable runtime report from the plugin: {e}");
                return;
            }
        };
        report.since = Some(wall_ms);
        if report.starved {
            crate::metrics::record_starved_runtime();
            tracing::error!(
                channel,
                workers = report.workers,
                blocked_ms = report.blocked_ms,
                "plugin runtime starved: all {} workers blocked for {} ms, held by {}",
                report.workers,
                report.blocked_ms,
                report.describe_holders(channel)
            );
        } else {
            report.holders.clear();
            tracing::info!(channel, "plugin runtime recovered: a worker is free again");
        }
        self.lock().insert(channel.to_owned(), report);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Every channel's last report.
    pub fn all(&self) -> BTreeMap<String, RuntimeReport> {
        self.lock().clone()
    }

    /// The channels whose runtime is starved now.
    pub fn starved(&self) -> BTreeMap<String, RuntimeReport> {
        self.lock()
            .iter()
            .filter(|(_, r)| r.starved)
            .map(|(c, r)| (c.clone(), r.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RuntimeReport>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What [`follow`] changed about one account, to undo on recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Changed {
    /// Made `stuck` with this `lastError`.
    Holder(String),
    /// Made `starting` from `running`.
    Demoted,
}

/// The accounts [`apply`] changed, with the task generation they had then.
#[derive(Debug, Default)]
pub struct Applied {
    accounts: HashMap<AccountKey, (u64, Changed)>,
}

/// `lastError` of an account holding a starved runtime's thread.
fn holder_reason(blocked_in: &str, report: &RuntimeReport) -> String {
    format!(
        "stuck: blocks its plugin's runtime thread in its {blocked_in}; the runtime is starved \
         (all {} workers blocked for {} ms)",
        report.workers, report.blocked_ms
    )
}

/// Applies `channel`'s report to its accounts' states (see the module docs). `accounts` are the
/// channel's account ids. Every write goes through [`AccountSnapshot::set_state`], and only
/// changes a state that is still the one it expects (a stop or a new task wins).
pub fn apply(
    board: &StatusBoard,
    channel: &str,
    accounts: &[String],
    report: Option<&RuntimeReport>,
    applied: &mut Applied,
) {
    let starved = report.filter(|r| r.starved);
    let mine: Vec<AccountKey> = applied
        .accounts
        .keys()
        .filter(|k| k.channel == channel)
        .cloned()
        .collect();
    let Some(report) = starved else {
        // Recovered (or never starved): undo what this module did, where it still holds.
        for key in mine {
            let Some((generation, changed)) = applied.accounts.remove(&key) else {
                continue;
            };
            board.update_if_generation(&key, generation, |s| match &changed {
                Changed::Holder(reason)
                    if s.state == AccountState::Stuck
                        && s.last_error.as_deref() == Some(reason) =>
                {
                    s.set_state(AccountState::Running);
                    s.last_error = None;
                }
                Changed::Demoted if s.state == AccountState::Starting => {
                    s.set_state(AccountState::Running);
                }
                _ => {}
            });
        }
        return;
    };
    for id in accounts {
        let key = AccountKey::new(channel, id.clone());
        let holder = report.holders.iter().find(|h| &h.account == id);
        let Some(generation) = board.generation(&key) else {
            continue;
        };
        let mut changed = None;
        board.update_if_generation(&key, generation, |s: &mut AccountSnapshot| match holder {
            Some(h) if matches!(s.state, AccountState::Running | AccountState::Starting) => {
                let reason = holder_reason(&h.blocked_in, report);
                s.set_state(AccountState::Stuck);
                s.last_error = Some(reason.clone());
                changed = Some(Changed::Holder(reason));
            }
            None if s.state == AccountState::Running => {
                s.set_state(AccountState::Starting);
                changed = Some(Changed::Demoted);
            }
            _ => {}
        });
        if let Some(changed) = changed {
            applied.accounts.insert(key, (generation, changed));
        }
    }
}

/// Follows the board's runtime reports and applies each change to the accounts' states until
/// `stop` fires.
///
/// # Cancellation safety
///
/// Cancel-safe: each change is applied whole under the board's lock; dropping the future leaves
/// the states as the last applied report made them.
pub async fn follow(supervisor: Supervisor, stop: CancellationToken) {
    let board = supervisor.board().clone();
    let mut changes = board.runtimes().changed.subscribe();
    let mut applied = Applied::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        for (channel, report) in board.runtimes().all() {
            let accounts = supervisor
                .channel(&channel)
                .map(|ch| ch.accounts.clone())
                .unwrap_or_default();
            apply(&board, &channel, &accounts, Some(&report), &mut applied);
        }
    }
}

/// `GET /v1/runtimes`: every channel's last runtime report (`{}` when none was starved yet).
pub async fn api_runtimes(
    axum::extract::State(state): axum::extract::State<crate::api::ApiState>,
) -> axum::Json<Value> {
    axum::Json(serde_json::json!(state.supervisor.board().runtimes().all()))
}

/// Lines for `channeld status` under the table: one per starved runtime in `runtimes` (the
/// answer of `GET /v1/runtimes`); empty when none is starved.
pub fn render(runtimes: &Value) -> String {
    let Ok(runtimes) = serde_json::from_value::<BTreeMap<String, RuntimeReport>>(runtimes.clone())
    else {
        return String::new();
    };
    runtimes
        .iter()
        .filter(|(_, r)| r.starved)
        .map(|(channel, r)| {
            format!(
                "{channel}: plugin runtime STARVED (all {} workers blocked for {} ms), held by {}\n",
                r.workers,
                r.blocked_ms,
                r.describe_holders(channel)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::SystemClock;

    fn board_with(states: &[(&str, AccountState)]) -> (StatusBoard, Vec<String>) {
        let board = StatusBoard::new(Arc::new(SystemClock));
        for (id, state) in states {
            let key = AccountKey::new("fx", *id);
            board.begin_generation(&key);
            board.update(&key, |s| s.set_state(*state));
        }
        (
            board,
            states.iter().map(|(id, _)| (*id).to_owned()).collect(),
        )
    }

    fn state(board: &StatusBoard, id: &str) -> AccountState {
        board.get(&AccountKey::new("fx", id)).unwrap().state
    }

    fn starved(holders: &[&str]) -> RuntimeReport {
        RuntimeReport {
            starved: true,
            since: None,
            workers: 2,
            blocked_ms: 1500,
            holders: holders
                .iter()
                .map(|a| Holder {
                    account: (*a).to_owned(),
                    blocked_in: "task".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn holders_become_stuck_the_running_others_starting_and_recovery_undoes_both() {
        use AccountState::*;
        let (board, accounts) = board_with(&[
            ("a", Running),
            ("b", Running),
            ("ok", Running),
            ("new", Starting),
            ("off", Stopped),
        ]);
        let mut applied = Applied::default();
        apply(
            &board,
            "fx",
            &accounts,
            Some(&starved(&["a", "b"])),
            &mut applied,
        );
        assert_eq!(state(&board, "a"), Stuck);
        assert_eq!(state(&board, "b"), Stuck);
        let a = board.get(&AccountKey::new("fx", "a")).unwrap();
        assert!(a.running, "stuck keeps the compatible running flag");
        assert!(
            a.last_error
                .unwrap()
                .contains("blocks its plugin's runtime thread in its task"),
        );
        assert_eq!(state(&board, "ok"), Starting);
        assert_eq!(state(&board, "new"), Starting);
        assert_eq!(state(&board, "off"), Stopped);

        // A new task for `ok` meanwhile (a new generation): recovery must not call it running.
        board.begin_generation(&AccountKey::new("fx", "ok"));
        let recovered = RuntimeReport::default();
        apply(&board, "fx", &accounts, Some(&recovered), &mut applied);
        assert_eq!(state(&board, "a"), Running);
        assert_eq!(state(&board, "b"), Running);
        assert_eq!(state(&board, "ok"), Starting);
        assert_eq!(state(&board, "new"), Starting);
        assert_eq!(state(&board, "off"), Stopped);
        assert!(
            board
                .get(&AccountKey::new("fx", "a"))
                .unwrap()
                .last_error
                .is_none()
        );
    }

    #[test]
    fn a_stop_during_starvation_wins_over_recovery() {
        use AccountState::*;
        let (board, accounts) = board_with(&[("a", Running)]);
        let mut applied = Applied::default();
        apply(
            &board,
            "fx",
            &accounts,
            Some(&starved(&["a"])),
            &mut applied,
        );
        board.update(&AccountKey::new("fx", "a"), |s| s.set_state(Stopped));
        apply(&board, "fx", &accounts, None, &mut applied);
        assert_eq!(state(&board, "a"), Stopped);
    }

    #[test]
    fn reports_parse_log_and_render() {
        let runtimes = Runtimes::default();
        runtimes.report(
            "fx",
            r#"{"starved":true,"workers":2,"blockedMs":1200,"holders":[{"account":"a","in":"task"}]}"#,
            7,
        );
        runtimes.report("other", "not json", 8);
        let all = runtimes.all();
        assert_eq!(all.len(), 1);
        assert_eq!(all["fx"].since, Some(7));
        let text = render(&serde_json::json!(all));
        assert!(text.contains("fx: plugin runtime STARVED"), "{text}");
        assert!(text.contains("fx:a (task)"), "{text}");
        runtimes.report("fx", r#"{"starved":false}"#, 9);
        assert!(runtimes.starved().is_empty());
        assert_eq!(render(&serde_json::json!(runtimes.all())), "");
    }
}
