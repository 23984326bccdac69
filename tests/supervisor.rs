//! The restart supervisor end to end: the real `channeld`, the fixture plugin (its misbehaviour
//! chosen per account), driven by the CLI. Short real timings come from the config; the exact
//! numbers are the paused-clock unit tests' job (manager/src/supervise/tests).

use serde_json::Value;

use crate::util::{self, daemon::Daemon};

/// Fast, jitter-free restart policy for black-box runs.
const FAST: &str = "[supervisor]\ninitial_backoff = \"20ms\"\nbackoff_factor = 2.0\n\
                    max_backoff = \"80ms\"\njitter = 0.0\nmax_restarts = 3\nstop_timeout = \"300ms\"\n\
                    stable_run = \"1h\"\n[health]\ninterval = \"0s\"\n";

fn fixture_daemon(accounts: &str) -> Daemon {
    Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!("{FAST}\n{accounts}"),
        &[],
    )
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn gave_up(s: &Value) -> bool {
    s["running"] == false
        && s["restartPending"] == false
        && s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("giving up"))
}

#[test]
fn a_crashing_account_restarts_with_backoff_then_gives_up() {
    let daemon = fixture_daemon(
        "[channels.fixture.accounts.crashy]\nmode = \"crash\"\nafter_ms = 5\n\
         [channels.fixture.accounts.exits]\nmode = \"exit\"\nafter_ms = 5\n",
    );
    let crashy = daemon.wait_for_account("fixture", "crashy", gave_up);
    assert_eq!(
        crashy["reconnectAttempts"], 4,
        "3 restarts, then the 4th end gives up"
    );
    assert_eq!(crashy["fixtureStarts"], 4, "1 start + 3 restarts");
    assert_eq!(
        crashy["lastError"],
        "fixture crash; giving up after 3 restart attempts"
    );
    let exits = daemon.wait_for_account("fixture", "exits", gave_up);
    assert_eq!(
        exits["lastError"], "channel exited without an error; giving up after 3 restart attempts",
        "a clean exit counts as a crash"
    );
    assert_eq!(exits["fixtureMaxConcurrent"], 1);

    // A user start revives a gave-up account with a fresh counter.
    let out = ok(&daemon.cli(&["start", "fixture:crashy"]));
    assert!(out.contains("fixture:crashy: started"), "{out}");
    let again = daemon.wait_for_account("fixture", "crashy", |s| {
        gave_up(s) && s["fixtureStarts"] == 8
    });
    assert_eq!(again["reconnectAttempts"], 4);
}

#[test]
fn a_manual_stop_cancels_a_pending_restart_and_wins() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[supervisor]\ninitial_backoff = \"1h\"\njitter = 0.0\n[health]\ninterval = \"0s\"\n\
         [channels.fixture.accounts.a]\nmode = \"crash\"\nafter_ms = 5\n",
        &[],
    );
    daemon.wait_for_account("fixture", "a", |s| s["restartPending"] == true);
    let out = ok(&daemon.cli(&["stop", "fixture:a"]));
    assert!(out.contains("fixture:a: stopped"), "{out}");
    let s = daemon.account("fixture", "a");
    assert_eq!(
        (s["running"].clone(), s["restartPending"].clone()),
        (false.into(), false.into())
    );
    let table = ok(&daemon.cli(&["status", "fixture:a"]));
    assert!(table.contains(" stopped "), "{table}");
}

#[test]
fn failure_1_a_task_ignoring_its_abort_is_cancelled_and_the_next_start_works() {
    let daemon = fixture_daemon("[channels.fixture.accounts.deaf]\nmode = \"ignore_abort\"\n");
    daemon.wait_for_account("fixture", "deaf", |s| s["running"] == true);
    let out = ok(&daemon.cli(&["stop", "fixture:deaf"]));
    assert!(out.contains("fixture:deaf: cancelled"), "{out}");
    let s = daemon.account("fixture", "deaf");
    assert_eq!(s["running"], false);
    assert!(
        s["lastError"].as_str().unwrap().contains("cancelled"),
        "{s}"
    );
    // Not a zombie: the next start really starts a task.
    let out = ok(&daemon.cli(&["start", "fixture:deaf"]));
    assert!(out.contains("started"), "{out}");
    let s = daemon.wait_for_account("fixture", "deaf", |s| s["fixtureStarts"] == 2);
    assert_eq!(s["running"], true);
    assert_eq!(s["fixtureMaxConcurrent"], 1);
}

#[test]
fn a_task_blocking_its_thread_is_reported_stuck_and_frees_its_slot_when_it_ends() {
    let daemon = fixture_daemon(
        "[channels.fixture.accounts.blocker]\nmode = \"block_thread\"\nblock_ms = 8000\n",
    );
    daemon.wait_for_account("fixture", "blocker", |s| s["running"] == true);
    let stop = daemon.cli(&["stop", "fixture:blocker"]);
    assert_eq!(stop.status.code(), Some(1), "a stuck stop is a failure");
    assert!(String::from_utf8_lossy(&stop.stdout).contains("fixture:blocker: stuck"));
    let s = daemon.account("fixture", "blocker");
    assert_eq!(s["running"], true, "stuck: still running");
    assert!(s["lastError"].as_str().unwrap().starts_with("stuck"), "{s}");
    let table = ok(&daemon.cli(&["status", "fixture:blocker"]));
    assert!(table.contains(" stuck "), "{table}");

    let refused = daemon.cli(&["start", "fixture:blocker"]);
    assert_eq!(refused.status.code(), Some(1));
    let refused = String::from_utf8_lossy(&refused.stdout);
    assert!(
        refused.contains("refused: stuck"),
        "the start says why: {refused}"
    );
    assert_eq!(
        daemon.account("fixture", "blocker")["fixtureStarts"],
        1,
        "no second task"
    );

    // When the blocked task finally ends, the slot frees itself.
    daemon.wait_for_account("fixture", "blocker", |s| s["running"] == false);
    let out = ok(&daemon.cli(&["start", "fixture:blocker"]));
    assert!(out.contains("started"), "{out}");
    assert_eq!(
        daemon.account("fixture", "blocker")["fixtureMaxConcurrent"],
        1
    );
}

#[test]
fn a_stop_hook_that_hangs_does_not_hold_the_stop() {
    let daemon = fixture_daemon("[channels.fixture.accounts.h]\nhang_in_stop = true\n");
    daemon.wait_for_account("fixture", "h", |s| s["running"] == true);
    let out = ok(&daemon.cli(&["stop", "fixture:h"]));
    assert!(out.contains("fixture:h: stopped"), "{out}");
    assert_eq!(daemon.account("fixture", "h")["running"], false);
}

#[test]
fn failure_7_per_channel_and_per_account_operations_and_refusals_change_nothing() {
    let daemon = fixture_daemon(
        "[channels.fixture.accounts.a]\n[channels.fixture.accounts.b]\n[channels.fixture.accounts.c]\n",
    );
    for a in ["a", "b", "c"] {
        daemon.wait_for_account("fixture", a, |s| s["running"] == true);
    }
    let out = ok(&daemon.cli(&["stop", "fixture"]));
    assert_eq!(
        out.lines().filter(|l| l.ends_with(": stopped")).count(),
        3,
        "{out}"
    );
    ok(&daemon.cli(&["start", "fixture:b"]));
    let status = daemon.status(Some("fixture"));
    let running: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|a| status["channels"]["fixture"][*a]["running"] == true)
        .collect();
    assert_eq!(running, ["b"]);
    ok(&daemon.cli(&["restart", "fixture:b"]));
    // The counter is the new task's first status patch, a moment after the restart's answer.
    let b = daemon.wait_for_account("fixture", "b", |s| {
        s["fixtureStarts"].as_u64() >= Some(3) && s["connected"] == true
    });
    assert_eq!(b["fixtureStarts"], 3);

    // Refused requests: the snapshot, and the plugin's own counters in it, do not move.
    let before = daemon.status(None);
    for args in [
        vec!["start", "fixture:nope"],
        vec!["stop", "nochannel"],
        vec!["logout", "fixture"],
        vec!["reset", "fixture:ghost"],
    ] {
        let out = daemon.cli(&args);
        assert_ne!(out.status.code(), Some(0), "{args:?} must be refused");
    }
    assert_eq!(daemon.status(None), before);
}

#[test]
fn failure_5_at_most_one_task_per_account_under_restart_storms_and_races() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[supervisor]\ninitial_backoff = \"1ms\"\nmax_backoff = \"2ms\"\njitter = 0.5\n\
         max_restarts = 1000\nstop_timeout = \"200ms\"\n[health]\ninterval = \"0s\"\n\
         [channels.fixture.accounts.storm]\nmode = \"crash\"\nafter_ms = 1\n\
         [channels.fixture.accounts.steady]\n",
        &[],
    );
    daemon.wait_for_account("fixture", "storm", |s| {
        s["fixtureStarts"].as_u64() > Some(20)
    });
    // Users racing the storm and each other.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let config = daemon.config.clone();
            std::thread::spawn(move || {
                let verb = ["restart", "stop", "start"][i % 3];
                for target in ["fixture:storm", "fixture:steady", "fixture"] {
                    let _ = std::process::Command::new(crate::util::daemon::channeld())
                        .args([verb, target, "--config"])
                        .arg(&config)
                        .output();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    ok(&daemon.cli(&["start", "fixture"]));
    let storm = daemon.wait_for_account("fixture", "storm", |s| {
        s["fixtureStarts"].as_u64() > Some(40)
    });
    let steady = daemon.account("fixture", "steady");
    assert_eq!(storm["fixtureMaxConcurrent"], 1, "{storm}");
    assert_eq!(steady["fixtureMaxConcurrent"], 1, "{steady}");
}
