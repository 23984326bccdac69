//! Config reload with the real daemon and the fixture plugin: `channeld reload`, `SIGHUP` and an
//! edit of the file apply the same diff (accounts added, removed, restarted, unchanged), on the
//! accounts' resolved configs (a rotated secret file restarts its account only); bad files are
//! refused with their location and change nothing; a user's stop outlives a reload.

use std::{fs, process::Output};

use serde_json::Value;

use crate::util::{self, daemon::Daemon};

/// Fast, jitter-free restarts; no health monitor.
const FAST: &str = "[supervisor]\ninitial_backoff = \"20ms\"\nbackoff_factor = 2.0\n\
                    max_backoff = \"80ms\"\njitter = 0.0\nmax_restarts = 3\nstop_timeout = \"300ms\"\n\
                    stable_run = \"1h\"\n[health]\ninterval = \"0s\"\n";

/// `FAST` with another `max_restarts` (a reload's live number).
fn fast_with_max_restarts(n: u32) -> String {
    FAST.replace("max_restarts = 3", &format!("max_restarts = {n}"))
}

/// `[host]` lines for tests that trigger reloads themselves.
const NO_WATCH: &str = "watch_config = false";

fn daemon(host_extra: &str, accounts: &str) -> Daemon {
    Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        host_extra,
        &format!("{FAST}\n{accounts}"),
        &[],
    )
}

/// Replaces the config file as an editor does: a new file renamed over the old one.
fn rewrite(daemon: &Daemon, host_extra: &str, accounts: &str) -> String {
    let text =
        format!("[host]\napi_address = \"127.0.0.1:0\"\n{host_extra}\n\n{FAST}\n{accounts}\n");
    let temp = daemon.config.with_extension("toml.new");
    fs::write(&temp, text).unwrap();
    fs::rename(&temp, &daemon.config).unwrap();
    fs::read_to_string(&daemon.config).unwrap()
}

/// The 1-based line of the first line of `text` that starts with `start`.
fn line_of(text: &str, start: &str) -> usize {
    text.lines().position(|l| l.starts_with(start)).unwrap() + 1
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn running(s: &Value) -> bool {
    s["running"] == true && s["fixtureStarts"].is_u64()
}

fn hup(daemon: &Daemon) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
}

#[derive(Clone, Copy, Debug)]
enum Trigger {
    Cli,
    Hangup,
    FileEdit,
}

/// a, b and d run; the new file changes a, keeps b, adds c and drops d.
fn one_reload(trigger: Trigger) {
    let host = match trigger {
        Trigger::FileEdit => "settle = \"100ms\"",
        _ => NO_WATCH,
    };
    let before = "[channels.fixture.accounts.a]\nx = 1\n[channels.fixture.accounts.b]\nx = 1\n\
                  [channels.fixture.accounts.d]\nx = 1\n";
    let after = "[channels.fixture.accounts.a]\nx = 2\n[channels.fixture.accounts.b]\nx = 1\n\
                 [channels.fixture.accounts.c]\nx = 1\n";
    let daemon = daemon(host, before);
    let a = daemon.wait_for_account("fixture", "a", running);
    let b = daemon.wait_for_account("fixture", "b", running);
    daemon.wait_for_account("fixture", "d", running);
    assert_eq!(a["fixtureStarts"], 1);

    rewrite(&daemon, host, after);
    match trigger {
        Trigger::Cli => {
            let out = daemon.cli(&["reload"]);
            assert!(out.status.success(), "{}", stderr(&out));
            let printed = stdout(&out);
            for line in [
                "added: fixture:c",
                "removed: fixture:d",
                "restarted: fixture:a",
                "unchanged: fixture:b",
            ] {
                assert!(
                    printed.contains(line),
                    "{trigger:?}: {line:?} in\n{printed}"
                );
            }
        }
        Trigger::Hangup => hup(&daemon),
        Trigger::FileEdit => {}
    }
    // The audit line, whoever triggered the reload.
    let audit = daemon.wait_for_log("config reloaded");
    for field in [
        "added=[\"fixture:c\"]",
        "removed=[\"fixture:d\"]",
        "restarted=[\"fixture:a\"]",
        "unchanged=[\"fixture:b\"]",
    ] {
        assert!(audit.contains(field), "{trigger:?}: {field} in {audit}");
    }
    daemon.wait_for_account("fixture", "c", running);
    let a = daemon.wait_for_account("fixture", "a", |s| running(s) && s["fixtureStarts"] == 2);
    assert_eq!(a["reconnectAttempts"], 0);
    let b_now = daemon.account("fixture", "b");
    assert_eq!(b_now["fixtureStarts"], 1, "{trigger:?}: b was not touched");
    assert_eq!(
        b_now["lastStartAt"], b["lastStartAt"],
        "{trigger:?}: b's same task"
    );
    assert_eq!(b_now["running"], true);
    let channel = &daemon.status(Some("fixture"))["channels"]["fixture"];
    assert!(
        channel.get("d").is_none(),
        "{trigger:?}: d left the snapshot: {channel}"
    );
    assert_eq!(
        daemon.log().matches("config reloaded").count(),
        1,
        "{trigger:?}: one reload"
    );
}

#[test]
fn channeld_reload_adds_restarts_and_removes_only_what_changed() {
    one_reload(Trigger::Cli);
}

#[test]
fn sighup_reloads_the_same_way() {
    one_reload(Trigger::Hangup);
}

#[test]
fn an_edit_of_the_file_reloads_the_same_way() {
    one_reload(Trigger::FileEdit);
}

#[test]
fn a_rotated_secret_file_restarts_only_its_account() {
    let mut daemon = Daemon::prepare(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        NO_WATCH,
        &format!(
            "{FAST}\n[channels.fixture.accounts.a]\ntoken = {{ file = \"a.secret\" }}\n\
             [channels.fixture.accounts.b]\ntoken = {{ file = \"b.secret\" }}\n"
        ),
    );
    // The secret files sit beside the config (relative paths are relative to it).
    let dir = daemon.config.parent().unwrap().to_owned();
    fs::write(dir.join("a.secret"), "one").unwrap();
    fs::write(dir.join("b.secret"), "one").unwrap();
    daemon.start_again(&[]);
    daemon.wait_for_account("fixture", "a", running);
    let b = daemon.wait_for_account("fixture", "b", running);

    fs::write(dir.join("a.secret"), "rotated-secret").unwrap();
    hup(&daemon);
    let audit = daemon.wait_for_log("config reloaded");
    assert!(audit.contains("restarted=[\"fixture:a\"]"), "{audit}");
    assert!(audit.contains("unchanged=[\"fixture:b\"]"), "{audit}");
    assert!(
        !daemon.log().contains("rotated-secret"),
        "a secret never shows in the log"
    );
    daemon.wait_for_account("fixture", "a", |s| running(s) && s["fixtureStarts"] == 2);
    let b_now = daemon.account("fixture", "b");
    assert_eq!(b_now["fixtureStarts"], b["fixtureStarts"]);
    assert_eq!(b_now["lastStartAt"], b["lastStartAt"]);
}

#[test]
fn bad_files_are_refused_with_their_location_and_everything_keeps_running() {
    let accounts = "[channels.fixture.accounts.a]\nx = 1\n";
    let daemon = daemon(NO_WATCH, accounts);
    let a = daemon.wait_for_account("fixture", "a", running);

    // A syntax error: file, line and column.
    let text = rewrite(&daemon, NO_WATCH, &format!("{accounts}y = = 2\n"));
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let error = stderr(&out);
    let config = daemon.config.display().to_string();
    let line = line_of(&text, "y = = 2");
    assert!(error.contains(&format!("{config}:{line}:")), "{error}");
    assert!(error.contains("the running config stays"), "{error}");
    // The daemon itself refuses it too (SIGHUP reads the file without the CLI).
    hup(&daemon);
    let refused = daemon.wait_for_log("config reload refused");
    assert!(refused.contains(&format!("{config}:{line}:")), "{refused}");

    // The plugin's validate refuses the channel's table: the file, the channel's line, why.
    let text = rewrite(
        &daemon,
        NO_WATCH,
        "[channels.fixture]\ninvalid = \"no bots on sundays\"\n[channels.fixture.accounts.a]\nx = 2\n\
         [channels.fixture.accounts.new]\n",
    );
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let error = stderr(&out);
    assert!(
        error.contains(&format!(
            "{config}:{}: [channels.fixture] refused by its plugin",
            line_of(&text, "[channels.fixture]")
        )),
        "{error}"
    );
    assert!(error.contains("no bots on sundays"), "{error}");

    // Nothing changed: same task, no new account; the daemon still answers.
    let a_now = daemon.account("fixture", "a");
    assert_eq!(a_now["running"], true);
    assert_eq!(a_now["fixtureStarts"], 1);
    assert_eq!(a_now["lastStartAt"], a["lastStartAt"]);
    let channel = &daemon.status(Some("fixture"))["channels"]["fixture"];
    assert!(channel.get("new").is_none(), "{channel}");
    assert_eq!(daemon.log().matches("config reload refused").count(), 2);
    assert_eq!(daemon.log().matches("config reloaded").count(), 0);

    // A good file afterwards applies.
    rewrite(&daemon, NO_WATCH, "[channels.fixture.accounts.a]\nx = 3\n");
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restarted: fixture:a"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_manually_stopped_account_stays_stopped_across_a_reload() {
    let daemon = daemon(
        NO_WATCH,
        "[channels.fixture.accounts.a]\nx = 1\n[channels.fixture.accounts.b]\nx = 1\n",
    );
    daemon.wait_for_account("fixture", "a", running);
    daemon.wait_for_account("fixture", "b", running);
    let out = daemon.cli(&["stop", "fixture:a"]);
    assert!(out.status.success(), "{}", stderr(&out));

    rewrite(
        &daemon,
        NO_WATCH,
        "[channels.fixture.accounts.a]\nx = 2\n[channels.fixture.accounts.b]\nx = 2\n",
    );
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("stopped: fixture:a"), "{printed}");
    assert!(printed.contains("restarted: fixture:b"), "{printed}");
    daemon.wait_for_account("fixture", "b", |s| running(s) && s["fixtureStarts"] == 2);
    let a = daemon.account("fixture", "a");
    assert_eq!(a["running"], false, "{a}");
    assert_eq!(a["fixtureStarts"], 1, "{a}");

    // Unchanged by the next reload too, and a user's start still works.
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(daemon.account("fixture", "a")["running"], false);
    let out = daemon.cli(&["start", "fixture:a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    daemon.wait_for_account("fixture", "a", |s| running(s) && s["fixtureStarts"] == 2);
}

fn gave_up(s: &Value) -> bool {
    s["running"] == false
        && s["restartPending"] == false
        && s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("giving up"))
}

#[test]
fn a_gave_up_account_whose_config_changed_gets_a_fresh_start() {
    let daemon = daemon(
        NO_WATCH,
        "[channels.fixture.accounts.crashy]\nmode = \"crash\"\nafter_ms = 5\n",
    );
    let crashy = daemon.wait_for_account("fixture", "crashy", gave_up);
    assert_eq!(crashy["fixtureStarts"], 4, "1 start + 3 restarts");
    rewrite(
        &daemon,
        NO_WATCH,
        "[channels.fixture.accounts.crashy]\nmode = \"crash\"\nafter_ms = 6\n",
    );
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restarted: fixture:crashy"),
        "{}",
        stdout(&out)
    );
    // A fresh counter: 1 start + 3 restarts again (a kept counter would give up at once).
    let again = daemon.wait_for_account("fixture", "crashy", |s| {
        gave_up(s) && s["fixtureStarts"] == 8
    });
    assert_eq!(again["reconnectAttempts"], 4);
}

#[test]
fn enabled_false_stops_an_account_and_true_starts_it() {
    let daemon = daemon(
        NO_WATCH,
        "[channels.fixture.accounts.a]\n[channels.fixture.accounts.b]\n",
    );
    daemon.wait_for_account("fixture", "a", running);
    let b = daemon.wait_for_account("fixture", "b", running);
    rewrite(
        &daemon,
        NO_WATCH,
        "[channels.fixture.accounts.a]\nenabled = false\n[channels.fixture.accounts.b]\n",
    );
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("stopped: fixture:a"),
        "{}",
        stdout(&out)
    );
    let a = daemon.wait_for_account("fixture", "a", |s| s["running"] == false);
    assert_eq!(a["enabled"], false, "{a}");

    rewrite(
        &daemon,
        NO_WATCH,
        "[channels.fixture.accounts.a]\nenabled = true\n[channels.fixture.accounts.b]\n",
    );
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restarted: fixture:a"),
        "{}",
        stdout(&out)
    );
    daemon.wait_for_account("fixture", "a", |s| running(s) && s["fixtureStarts"] == 2);
    assert_eq!(
        daemon.account("fixture", "b")["lastStartAt"],
        b["lastStartAt"]
    );
}

#[test]
fn supervisor_numbers_apply_from_the_next_decision_and_restart_only_keys_are_named() {
    let crashy = "[channels.fixture.accounts.crashy]\nmode = \"crash\"\nafter_ms = 5\n";
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        NO_WATCH,
        &format!("{}\n{crashy}", fast_with_max_restarts(1)),
        &[],
    );
    daemon.wait_for_account("fixture", "crashy", |s| {
        gave_up(s) && s["fixtureStarts"] == 2
    });

    // Only [supervisor] and a restart-only key change: no account is touched.
    let text = format!(
        "[host]\napi_address = \"127.0.0.1:0\"\n{NO_WATCH}\nplugin_worker_threads = 3\n\n{}\n{crashy}",
        fast_with_max_restarts(3)
    );
    fs::write(&daemon.config, text).unwrap();
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("unchanged: fixture:crashy"), "{printed}");
    assert!(
        printed.contains("needs a restart of channeld: [host] plugin_worker_threads"),
        "{printed}"
    );
    daemon.wait_for_log("only apply when channeld restarts");
    assert_eq!(daemon.account("fixture", "crashy")["fixtureStarts"], 2);

    // The next give-up decision uses the new maximum: 1 start + 3 restarts.
    let out = daemon.cli(&["start", "fixture:crashy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = daemon.wait_for_account("fixture", "crashy", |s| {
        gave_up(s) && s["fixtureStarts"].as_u64() >= Some(6)
    });
    assert_eq!(again["fixtureStarts"], 6, "{again}");
    assert_eq!(again["reconnectAttempts"], 4, "{again}");
}

#[test]
fn the_reload_docs_say_of_every_host_setting_whether_it_is_live() {
    let root = util::workspace_root();
    let docs = fs::read_to_string(root.join("docs/config-reload.md")).unwrap();
    let mut missing = Vec::new();
    let mut keys: Vec<(String, String)> = channeld::config::host_owned_defaults()
        .into_iter()
        .flat_map(|(section, defaults)| {
            let keys: Vec<String> = defaults.as_table().unwrap().keys().cloned().collect();
            keys.into_iter().map(move |k| (section.clone(), k))
        })
        .collect();
    keys.push(("host".into(), "api_token".into()));
    keys.push(("api".into(), "read_token".into()));
    for (section, key) in keys {
        let row = format!("| `[{section}] {key}` | ");
        let said = docs
            .lines()
            .find(|l| l.starts_with(&row))
            .is_some_and(|l| l.contains("live") || l.contains("restart only"));
        if !said {
            missing.push(format!("[{section}] {key}"));
        }
    }
    assert!(missing.is_empty(), "docs/config-reload.md: {missing:?}");
    let index = fs::read_to_string(root.join("docs/README.md")).unwrap();
    assert!(index.contains("(config-reload.md)"));
}
