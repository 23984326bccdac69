//! The health monitor with the real `channeld`: an account that reports itself disconnected is
//! restarted, with the reason in its status, and its healthy sibling is left alone.

use crate::util::{self, daemon::Daemon};

#[test]
fn the_monitor_restarts_only_the_disconnected_account_and_says_why() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[health]\ninterval = \"300ms\"\nstartup_grace = \"0s\"\nconnect_grace = \"100ms\"\n\
         [channels.fixture.accounts.down]\nconnected = false\n\
         [channels.fixture.accounts.up]\nevents = true\n",
        &[],
    );
    // The verdict is the latest check's: one that falls in a slow restart's connect grace says
    // so until the next, so the wait is for a restart's reason, not read at the first restart.
    let down = daemon.wait_for_account("fixture", "down", |s| {
        s["healthRestartAt"].is_i64()
            && s["fixtureStarts"].as_u64() >= Some(2)
            && s["healthVerdict"] == "disconnected"
    });
    assert_eq!(down["running"], true, "restarted, not stopped");
    let up = daemon.wait_for_account("fixture", "up", |s| s["healthVerdict"].is_string());
    assert_eq!(up["healthVerdict"], "healthy");
    assert!(
        up.get("healthRestartAt").is_none(),
        "the healthy sibling was not restarted: {up}"
    );
    assert_eq!(up["fixtureStarts"], 1);
    daemon.wait_for_log("health monitor restarted the account");

    let table = daemon.cli(&["status", "fixture"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table.lines().find(|l| l.contains(" down ")).expect(&table);
    assert!(
        row.contains("disconnected"),
        "the reason shows in the table: {table}"
    );
}
