//! The end of `channeld run`: a shutdown bounded by the stop timeout plus a margin, the report of
//! every account that did not stop (with what it is blocked in), and, while plugin threads are
//! still blocked, an exit that runs no `atexit` handler and no library destructor under them
//! (`_exit`, after the logs are flushed). docs/shutdown.md says the same for users.

use std::{io::Write as _, time::Duration};

use crate::{
    health::starvation::RuntimeReport, host::AccountKey, status::AccountState,
    supervise::Supervisor,
};

/// What the shutdown may take beyond the stop sequence (stop timeout plus cancel grace): the
/// plugins' runtimes, the API's operations, the sends in flight and the journal share it.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(1);

/// How long the whole shutdown may take under `supervisor`'s current policy: the stop timeout,
/// plus the cancel grace of a task cancelled at that timeout, plus [`SHUTDOWN_MARGIN`].
pub fn shutdown_bound(supervisor: &Supervisor) -> Duration {
    let policy = supervisor.policy();
    policy.stop_timeout + policy.cancel_grace + SHUTDOWN_MARGIN
}

/// Every account that has not stopped, by its state on the board, with the reasons `known` gives
/// (the supervisor's stuck list) or else its state and `lastError`: for a shutdown cut off at its
/// bound, whose own list may be incomplete.
pub fn not_stopped(
    supervisor: &Supervisor,
    known: Vec<(AccountKey, String)>,
) -> Vec<(AccountKey, String)> {
    let mut out = known;
    for (channel, accounts) in supervisor.snapshot() {
        for (id, s) in accounts {
            let key = AccountKey::new(channel.clone(), id);
            let live = matches!(
                s.state,
                AccountState::Running
                    | AccountState::Starting
                    | AccountState::Stopping
                    | AccountState::Stuck
            );
            if live && !out.iter().any(|(k, _)| k == &key) {
                let state = s.state.as_str();
                let reason = match s.last_error {
                    Some(error) if error.starts_with(state) => error,
                    Some(error) => format!("{state}: {error}"),
                    None => format!("still {state}"),
                };
                out.push((key, reason));
            }
        }
    }
    out.sort_by_key(|(key, _)| key.to_string());
    out
}

/// `reason`, with what the account is blocked in when its plugin's runtime is starved: the task or
/// hook that holds a thread, or, for the others, that its task waits for a thread.
pub fn blocked_in(
    key: &AccountKey,
    reason: &str,
    starved: &std::collections::BTreeMap<String, RuntimeReport>,
) -> String {
    let Some(report) = starved.get(key.channel.as_str()) else {
        return reason.to_owned();
    };
    match report.holders.iter().find(|h| h.account == key.account) {
        Some(h) => format!(
            "{reason}; blocked in its {} (it holds a thread of the plugin's starved runtime)",
            h.blocked_in
        ),
        None => format!(
            "{reason}; its task waits for a thread of the plugin's starved runtime, held by {}",
            report.describe_holders(&key.channel)
        ),
    }
}

/// Flushes the log and standard output, then ends the process with `code` at once, without
/// `atexit` handlers or library destructors: plugin threads are still blocked, and running a
/// plugin library's destructors (or tokio's, in its copy) under them can hang or crash.
pub fn exit_now(code: u8) -> ! {
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    crate::load::exit_sys::exit_immediately(i32::from(code))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::health::starvation::Holder;

    #[test]
    fn the_shutdown_report_says_what_each_account_is_blocked_in() {
        let starved = BTreeMap::from([(
            "fx".to_owned(),
            RuntimeReport {
                starved: true,
                workers: 2,
                holders: vec![Holder {
                    account: "a".into(),
                    blocked_in: "stop hook".into(),
                }],
                ..RuntimeReport::default()
            },
        )]);
        let a = blocked_in(&AccountKey::new("fx", "a"), "stuck", &starved);
        assert!(
            a.ends_with(
                "blocked in its stop hook (it holds a thread of the plugin's starved runtime)"
            ),
            "{a}"
        );
        let ok = blocked_in(&AccountKey::new("fx", "ok"), "stuck", &starved);
        assert!(
            ok.ends_with(
                "waits for a thread of the plugin's starved runtime, held by fx:a (stop hook)"
            ),
            "{ok}"
        );
        assert_eq!(
            blocked_in(&AccountKey::new("other", "x"), "stuck", &starved),
            "stuck"
        );
    }
}
