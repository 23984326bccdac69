//! Account state through the real daemon and CLI: the explicit `state` field, a stop hook's panic
//! in `lastError` and in `channeld stop`'s output and exit status.

use crate::util::{self, daemon::Daemon};

fn fixture_daemon(account: &str) -> Daemon {
    Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!("[health]\ninterval = \"0s\"\n[channels.fixture.accounts.main]\n{account}"),
        &[],
    )
}

/// Regression: a panic in a stop hook was invisible (`channeld stop` said "stopped", exit 0,
/// `lastError` null).
#[test]
fn a_stop_hook_panic_shows_in_last_error_and_the_stop_output_and_exit_status() {
    let daemon = fixture_daemon("panic_in = [\"stop\"]\n");
    daemon.wait_for_account("fixture", "main", |s| s["state"] == "running");

    let out = daemon.cli(&["stop", "fixture:main"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", daemon.log());
    assert!(
        stdout.contains("fixture:main: hook-failed") && stdout.contains("panic"),
        "{stdout}"
    );
    let s = daemon.account("fixture", "main");
    assert_eq!(s["state"], "stopped", "{s}");
    assert_eq!(s["running"], false, "{s}");
    let error = s["lastError"].as_str().unwrap_or_default();
    assert!(error.contains("panic"), "{s}");

    // The table shows the state from the field.
    let table = daemon.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("fixture"))
        .unwrap_or_default();
    assert!(row.contains(" stopped "), "{table}");
}

/// SIGTERM with a task that blocks its thread: the daemon still ends, names the stuck account in
/// its log, and exits with the documented status 4 (not 0: not every account stopped).
#[test]
fn sigterm_with_a_stuck_task_ends_with_exit_status_4_naming_the_account() {
    let mut daemon = fixture_daemon("mode = \"block_thread\"\nblock_ms = 60000\n");
    daemon.wait_for_account("fixture", "main", |s| s["state"] == "running");
    let (status, log) = daemon.terminate();
    assert_eq!(status.code(), Some(4), "{log}");
    assert!(
        log.contains("fixture:main") && log.contains("did not stop at shutdown"),
        "{log}"
    );
}
