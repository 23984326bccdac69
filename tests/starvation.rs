//! A plugin runtime starved by accounts that block its threads: reported as starved (status, log,
//! API) naming the accounts that hold its threads, those accounts `stuck`, the healthy account
//! never shown `running` while its task has not run, and SIGTERM still ending the daemon within
//! the stop timeout plus 2 s, with exit status 4.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE},
};

/// How soon SIGTERM must end a daemon whose plugin threads are blocked for good: its shutdown's
/// bound (the 1 s stop timeout, the 200 ms cancel grace and 1 s) with room for a loaded machine to
/// deliver the signal and reap the process, far below the blockers' 600 s.
const SIGTERM_WITHIN: Duration = Duration::from_secs(5);

fn runtimes(daemon: &Daemon) -> Value {
    let (addr, token) = daemon.api();
    ureq::get(format!("http://{addr}/v1/runtimes"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

/// Regression: two accounts whose tasks block their threads took both workers of the plugin's
/// runtime; the third, healthy account's task never ran, yet it showed `running`; nothing said
/// the runtime was starved; and SIGTERM no longer ended the daemon.
#[test]
fn two_blocking_accounts_starve_the_runtime_the_healthy_one_is_not_running_and_sigterm_ends() {
    let mut daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[supervisor]\nstop_timeout = \"1s\"\ncancel_grace = \"200ms\"\n\
         [health]\ninterval = \"0s\"\n\
         [channels.fixture]\nworker_threads = 2\nstarvation_threshold = \"500ms\"\n\
         [channels.fixture.accounts.a]\nmode = \"block_thread\"\nblock_ms = 600000\n\
         [channels.fixture.accounts.b]\nmode = \"block_thread\"\nblock_ms = 600000\n\
         # The healthy account hands over its task last, so the blockers have the workers.\n\
         [channels.fixture.accounts.ok]\nstart_delay_ms = 1000\n",
        &[],
    );

    // Until the runtime is reported starved, the healthy account is `running` only if its task
    // has run: the fixture's task patches `fixtureStarts` at once when it runs.
    let deadline = Instant::now() + PATIENCE;
    let report = loop {
        let ok = daemon.account("fixture", "ok");
        if ok["state"] == "running" && ok["fixtureStarts"].is_null() {
            // Shown running: its first poll has begun, so its patch follows at once.
            let ran = daemon.wait_for_account("fixture", "ok", |s| !s["fixtureStarts"].is_null());
            assert!(!ran["fixtureStarts"].is_null(), "{ran}");
        }
        let runtimes = runtimes(&daemon);
        if runtimes["fixture"]["starved"] == true {
            break runtimes["fixture"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the runtime was never reported starved: {runtimes}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    // The API names the two blocking accounts, and only them.
    let mut holders: Vec<String> = report["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{}:{}", h["account"].as_str().unwrap(), h["in"]))
        .collect();
    holders.sort();
    assert_eq!(holders, ["a:\"task\"", "b:\"task\""], "{report}");
    assert_eq!(report["workers"], 2, "{report}");

    // Status: the two are stuck, saying what they block; the healthy one is not running.
    for blocker in ["a", "b"] {
        let s = daemon.wait_for_account("fixture", blocker, |s| s["state"] == "stuck");
        let error = s["lastError"].as_str().unwrap_or_default();
        assert!(error.contains("runtime thread in its task"), "{s}");
    }
    let ok = daemon.wait_for_account("fixture", "ok", |s| s["state"] != "running");
    assert_eq!(ok["state"], "starting", "{ok}");
    assert_eq!(ok["running"], false, "{ok}");

    // The status table and the log say so too.
    let table = daemon.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("fixture: plugin runtime STARVED")
            && table.contains("fixture:a (task)")
            && table.contains("fixture:b (task)"),
        "{table}"
    );
    let log = daemon.wait_for_log("plugin runtime starved");
    assert!(log.contains("fixture:a (task), fixture:b (task)"), "{log}");

    // SIGTERM ends the daemon within its shutdown's bound, with status 4, naming every
    // account that did not stop and what it is blocked in.
    let sent = Instant::now();
    let (status, log) = daemon.terminate();
    let took = sent.elapsed();
    assert!(took <= SIGTERM_WITHIN, "took {took:?}\n{log}");
    assert_eq!(status.code(), Some(4), "{log}");
    for blocker in ["fixture:a", "fixture:b"] {
        assert!(
            log.lines().any(|l| l.contains(blocker)
                && l.contains("did not stop at shutdown")
                && l.contains("blocked in its task")),
            "{blocker}\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.contains("fixture:ok")
            && l.contains("did not stop at shutdown")
            && l.contains("waits for a thread")),
        "{log}"
    );
    assert!(log.contains("without running exit handlers"), "{log}");
}

/// `worker_threads` in a channel's table sets its plugin runtime's worker count (the plugin does
/// not see the key: the fixture's `strict` mode refuses keys it does not know).
#[test]
fn worker_threads_per_channel_sets_the_runtime_thread_count() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[health]\ninterval = \"0s\"\n\
         [channels.fixture]\nstrict = true\nworker_threads = 3\n\
         runtime_shutdown_timeout = \"1s\"\nstarvation_threshold = \"2s\"\n\
         [channels.fixture.accounts.main]\n",
        &[],
    );
    daemon.wait_for_account("fixture", "main", |s| s["state"] == "running");
    let workers = daemon.threads_named("chd-fixture", 3);
    let watchdogs = daemon.threads_named("chd-fixture-wd", 1);
    let names = daemon.thread_names();
    assert_eq!(workers, 3, "{names:?}");
    assert_eq!(watchdogs, 1, "{names:?}");
}

/// A bad value is one line naming the channel and the key; the plugin is refused, the daemon
/// keeps serving.
#[test]
fn a_bad_worker_threads_value_refuses_the_plugin_with_one_line_naming_the_channel() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[channels.fixture]\nworker_threads = 0\n[channels.fixture.accounts.main]\n",
        &[],
    );
    let line = daemon.wait_for_log("channel fixture: worker_threads = 0");
    assert!(line.contains("1..=64"), "{line}");
    let out = daemon.cli(&["plugins", "--json"]);
    assert!(out.status.success(), "{}", daemon.log());
}

/// Stop hooks that block their threads starve the runtime too: the report names them as such, and
/// SIGTERM still ends the daemon within the bound, without exit handlers under the blocked
/// threads.
#[test]
fn stop_hooks_blocking_their_threads_are_named_and_sigterm_still_ends() {
    let mut daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[supervisor]\nstop_timeout = \"1s\"\ncancel_grace = \"200ms\"\n\
         [health]\ninterval = \"0s\"\n\
         [channels.fixture]\nworker_threads = 2\nstarvation_threshold = \"500ms\"\n\
         [channels.fixture.accounts.a]\nblock_in_stop_ms = 600000\n\
         [channels.fixture.accounts.b]\nblock_in_stop_ms = 600000\n",
        &[],
    );
    for account in ["a", "b"] {
        daemon.wait_for_account("fixture", account, |s| s["state"] == "running");
    }
    for account in ["fixture:a", "fixture:b"] {
        // Bounded by the stop timeout: a hook still running then is not waited for.
        let out = daemon.cli(&["stop", account]);
        assert!(out.status.code().is_some(), "{}", daemon.log());
    }
    let deadline = Instant::now() + PATIENCE;
    let report = loop {
        let runtimes = runtimes(&daemon);
        if runtimes["fixture"]["starved"] == true {
            break runtimes["fixture"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the runtime was never reported starved: {runtimes}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let holders: Vec<(String, String)> = report["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["account"].as_str().unwrap().to_owned(),
                h["in"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        holders,
        [
            ("a".to_owned(), "stop hook".to_owned()),
            ("b".to_owned(), "stop hook".to_owned())
        ],
        "{report}"
    );

    let sent = Instant::now();
    let (status, log) = daemon.terminate();
    let took = sent.elapsed();
    assert!(took <= SIGTERM_WITHIN, "took {took:?}\n{log}");
    assert!(matches!(status.code(), Some(0 | 4)), "{status:?}\n{log}");
    assert!(log.contains("without running exit handlers"), "{log}");
}
