//! Process isolation end to end: the real `channeld` with `isolation = "process"` and the
//! `fixture-crash` plugin, whose misbehaviour (SIGSEGV, abort, exit(3), stack overflow, running
//! out of memory) each account's table chooses. The host stays up, another channel's account
//! keeps its task, the crashed accounts show why and restart in a new child, and no zombie
//! remains; the same plugin in-process takes the daemon down.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use channeld::{
    clock::SystemClock,
    ffi::FfiPlugin,
    host::{AccountKey, AccountLink, HostSink},
    isolate::{ChildSpec, IsolatedPlugin},
    load::load_root_module,
    plugin::{BootStep, Check, Outbound, Plugin},
    status::StatusBoard,
};
use channeld_plugin_abi::abi::LogLevel;
use serde_json::{Value, json};

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE},
};

/// Fast, jitter-free restarts that give up after 3.
const FAST: &str = "[supervisor]\ninitial_backoff = \"20ms\"\nbackoff_factor = 2.0\n\
                    max_backoff = \"80ms\"\njitter = 0.0\nmax_restarts = 3\nstop_timeout = \"2s\"\n\
                    stable_run = \"1h\"\n[health]\ninterval = \"0s\"\n";

fn crash_plugin() -> PathBuf {
    util::plugin_file("channeld-plugin-fixture-crash")
}

/// A daemon with the crash plugin isolated (`crashy`, plus `crashy_extra` lines in its table and
/// its accounts) and the fixture in-process with one steady account.
fn isolated_daemon(crashy: &str, env: &[(&str, &str)]) -> Daemon {
    Daemon::start(
        &[
            ("crashy.so", crash_plugin()),
            ("fixture.so", util::plugin_file("channeld-plugin-fixture")),
        ],
        "",
        &format!(
            "{FAST}\n[channels.crashy]\nisolation = \"process\"\n{crashy}\n\
             [channels.fixture.accounts.steady]\n"
        ),
        env,
    )
}

fn gave_up(s: &Value) -> bool {
    s["running"] == false
        && s["restartPending"] == false
        && s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("giving up"))
}

/// `(pid, state)` of every process whose parent is `parent`, from `/proc`.
fn children_of(parent: u32) -> Vec<(u32, char)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == parent {
            children.push((pid, state));
        }
    }
    children
}

/// Polls until the daemon has no zombie child (the host reaps every plugin process).
fn assert_no_zombie(daemon: &Daemon) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let zombies: Vec<_> = children_of(daemon.pid())
            .into_iter()
            .filter(|(_, state)| *state == 'Z')
            .collect();
        if zombies.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "zombie children of channeld: {zombies:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The steady account of the other channel still runs its first task.
fn assert_steady(daemon: &Daemon) {
    // Awaited, not read once: a daemon that has just loaded its plugins may not have started
    // (or heard the first status of) the account yet.
    let steady = daemon.wait_for_account("fixture", "steady", |s| {
        s["running"] == true && s["fixtureStarts"].is_u64()
    });
    assert_eq!(
        steady["fixtureStarts"], 1,
        "the other channel's task never restarted: {steady}"
    );
}

/// A crash in the account task: the account ends with `cause`, is restarted 3 times (each in a
/// new child that crashes again), then given up; the host and the other channel are untouched.
fn crash_in_start(how: &str, extra: &str, cause: &str) {
    let daemon = isolated_daemon(
        &format!(
            "{extra}\n[channels.crashy.accounts.bad]\ncrash = \"{how}\"\ncrash_in = \"start\"\n"
        ),
        &[],
    );
    let bad = daemon.wait_for_account("crashy", "bad", gave_up);
    let error = bad["lastError"].as_str().unwrap();
    assert!(error.contains(cause), "{how}: {error}");
    assert_eq!(
        bad["reconnectAttempts"], 4,
        "1 start + 3 restarts, each in a new child: {bad}"
    );
    assert_steady(&daemon);
    assert_no_zombie(&daemon);
}

#[test]
fn a_segfault_in_start_ends_its_accounts_not_the_host() {
    crash_in_start("segv", "", "plugin process killed by SIGSEGV");
}

#[test]
fn an_abort_in_start_ends_its_accounts_not_the_host() {
    crash_in_start("abort", "", "plugin process aborted (SIGABRT)");
}

#[test]
fn an_exit_in_start_ends_its_accounts_not_the_host() {
    crash_in_start("exit", "", "plugin process exited with code 3");
}

#[test]
fn a_stack_overflow_in_start_ends_its_accounts_not_the_host() {
    // A plugin's threads belong to the plugin's own copy of Rust's runtime, which installed no
    // stack-overflow handler: the overflow is a plain SIGSEGV.
    crash_in_start("recurse", "", "plugin process killed by SIGSEGV");
}

#[test]
fn running_out_of_memory_in_start_is_a_memory_limit_abort() {
    crash_in_start(
        "alloc",
        "memory_limit = \"256MiB\"",
        "plugin process aborted (memory allocation failed)",
    );
}

/// A crash in the stop hook: the stopped account stops; the other account of the same child
/// shares its fate (ends with the cause) and is restarted in a new child.
#[test]
fn a_segfault_in_the_stop_hook_restarts_the_accounts_sharing_the_child() {
    let daemon = isolated_daemon(
        "[channels.crashy.accounts.bad]\ncrash = \"segv\"\ncrash_in = \"stop\"\n\
         [channels.crashy.accounts.other]\n",
        &[],
    );
    daemon.wait_for_account("crashy", "bad", |s| s["running"] == true);
    daemon.wait_for_account("crashy", "other", |s| s["running"] == true);
    let before = daemon.cli(&["plugins", "--json"]);
    let before: Value = serde_json::from_slice(&before.stdout).unwrap();
    let first_pid = isolation_of(&before, "crashy")["pid"].as_u64().unwrap();
    daemon.cli(&["stop", "crashy:bad"]);
    let other = daemon.wait_for_account("crashy", "other", |s| {
        s["running"] == true && s["reconnectAttempts"].as_u64() >= Some(1)
    });
    assert!(
        daemon.log().contains("plugin process killed by SIGSEGV"),
        "{other}\n{}",
        daemon.log()
    );
    let bad = daemon.account("crashy", "bad");
    assert_eq!(bad["running"], false, "{bad}");
    let after: Value = serde_json::from_slice(&daemon.cli(&["plugins", "--json"]).stdout).unwrap();
    let isolation = isolation_of(&after, "crashy");
    assert_ne!(isolation["pid"].as_u64().unwrap(), first_pid, "{isolation}");
    assert_eq!(isolation["childrenStarted"], 2, "{isolation}");
    assert_steady(&daemon);
    assert_no_zombie(&daemon);
}

fn isolation_of(listing: &Value, channel: &str) -> Value {
    listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["channel"] == channel && p["state"] == "loaded")
        .unwrap_or_else(|| panic!("{channel} not loaded: {listing}"))["isolation"]
        .clone()
}

/// Each misbehaviour in the send hook, through the host-side plugin trait the outbox calls: the
/// send fails with the cause, and the next send runs in a new child.
#[test]
fn a_crash_in_send_fails_the_send_and_the_next_one_runs_in_a_new_child() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    for (how, cause) in [
        ("segv", "plugin process killed by SIGSEGV"),
        ("abort", "plugin process aborted (SIGABRT)"),
        ("exit", "plugin process exited with code 3"),
        ("recurse", "plugin process killed by SIGSEGV"),
    ] {
        let spec = ChildSpec {
            plugin: crash_plugin(),
            source: crash_plugin(),
            worker_threads: 1,
            max_log_level: LogLevel::Info,
            memory_limit: None,
            exe: Some(util::daemon::channeld().into()),
        };
        let plugin = IsolatedPlugin::spawn(spec, runtime.handle().clone(), board.clone()).unwrap();
        let table =
            json!({ "accounts": { "bad": { "crash": how, "crash_in": "send" }, "good": {} } });
        plugin.configure(&table).unwrap();
        let link = AccountLink::for_account(AccountKey::new("crashy", "bad"), 1, board.clone());
        let task = plugin.start_account("bad", link).unwrap();
        let send = |account: &str| {
            runtime.block_on(plugin.send(Outbound {
                account: account.into(),
                conversation: "room".into(),
                text: "hi".into(),
                reply_to: None,
                extra: None,
            }))
        };
        let error = send("bad").unwrap_err();
        assert!(error.message.contains(cause), "{how}: {error}");
        // The task ended too (with the cause, or earlier: the bare status board of this test
        // knows no account, so the task's status patch may end it first).
        assert!(runtime.block_on(task.done).is_err(), "{how}");
        assert_eq!(send("good").unwrap(), "sent:room:hi");
        let info = plugin.isolation_info();
        assert_eq!(info.children_started, 2, "{how}: {info:?}");
        plugin.shutdown().unwrap();
    }
}

#[test]
fn a_crash_in_the_constructor_is_a_load_error_for_that_channel() {
    for (how, cause) in [
        ("segv", "killed by SIGSEGV"),
        ("abort", "aborted (SIGABRT)"),
        ("exit", "exited with code 3"),
    ] {
        let daemon = isolated_daemon(
            "[channels.crashy.accounts.a]\n",
            &[("CHANNELD_FIXTURE_CRASH_CTOR", how)],
        );
        let listing: Value =
            serde_json::from_slice(&daemon.cli(&["plugins", "--json"]).stdout).unwrap();
        let crashy = listing["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["file"].as_str().unwrap().ends_with("crashy.so"))
            .unwrap()
            .clone();
        assert_eq!(crashy["state"], "failed", "{how}: {crashy}");
        let error = crashy["loadError"].as_str().unwrap();
        assert!(error.contains(cause), "{how}: {error}");
        assert_steady(&daemon);
        assert_no_zombie(&daemon);
    }
}

/// Why isolation exists: the same SIGSEGV in-process takes the whole daemon down.
#[test]
fn the_same_segfault_in_process_kills_the_daemon() {
    let daemon = Daemon::prepare(
        &[("crashy.so", crash_plugin())],
        "",
        &format!(
            "{FAST}\n[channels.crashy.accounts.bad]\ncrash = \"segv\"\ncrash_in = \"start\"\n"
        ),
    );
    let (status, stderr) = daemon.run_to_exit();
    assert_eq!(
        status.signal(),
        Some(libc_sigsegv()),
        "{status:?}\n{stderr}"
    );
}

fn libc_sigsegv() -> i32 {
    11
}

/// `kill -9` of the daemon: its plugin processes die with it (PR_SET_PDEATHSIG) within 1 s.
#[test]
fn killing_the_daemon_takes_its_plugin_processes_with_it() {
    let mut daemon = isolated_daemon("[channels.crashy.accounts.a]\n", &[]);
    daemon.wait_for_account("crashy", "a", |s| s["running"] == true);
    let pid = child_pid(&daemon, "crashy");
    assert!(alive(pid), "the plugin process {pid} runs");
    let table = String::from_utf8(daemon.cli(&["plugins"]).stdout).unwrap();
    assert!(table.contains(&format!("process pid {pid}")), "{table}");
    daemon.kill();
    wait_gone(
        pid,
        Duration::from_secs(1),
        &format!("plugin process {pid} outlived the daemon by 1 s"),
    );
}

/// Whether `pid` runs (a zombie has ended: it holds no memory and no connection).
/// The pid of `channel`'s plugin process, from `channeld plugins --json`.
fn child_pid(daemon: &Daemon, channel: &str) -> u64 {
    let listing: Value =
        serde_json::from_slice(&daemon.cli(&["plugins", "--json"]).stdout).unwrap();
    isolation_of(&listing, channel)["pid"].as_u64().unwrap()
}

/// Waits until process `pid` is gone (or a zombie), failing with `what` after `within`.
fn wait_gone(pid: u64, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rfind(')').and_then(|i| stat[i + 2..].chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

/// A message delivered by an isolated plugin reaches the journal and comes back with its
/// sequence number.
#[test]
fn a_message_delivered_by_an_isolated_plugin_reaches_the_journal() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!(
            "{FAST}\n[channels.fixture]\nisolation = \"process\"\n\
             [channels.fixture.accounts.a]\nmode = \"deliver_one\"\n"
        ),
        &[],
    );
    let a = daemon.wait_for_account("fixture", "a", |s| s["deliveredSeq"].is_u64());
    assert_eq!(a["running"], true, "{a}");
    let journal: Value =
        serde_json::from_slice(&daemon.cli(&["journal", "--json"]).stdout).unwrap();
    assert_eq!(
        journal["journal"]["lastSeq"], a["deliveredSeq"],
        "the journal has the message: {journal}"
    );
}

/// Hot replace of an isolated plugin: a new child serves the new version, the old child ends.
#[test]
fn an_isolated_plugin_is_replaced_hot_in_a_new_child() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!(
            "{FAST}\n[channels.fixture]\nisolation = \"process\"\n[channels.fixture.accounts.a]\n"
        ),
        &[],
    );
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    let old = child_pid(&daemon, "fixture");
    let staged = daemon.plugins_dir().join("fixture.so.new");
    std::fs::copy(util::plugin_file("channeld-plugin-fixture-v2"), &staged).unwrap();
    std::fs::rename(&staged, daemon.plugins_dir().join("fixture.so")).unwrap();
    daemon.wait_for_log("plugin replaced");
    daemon.wait_for_account("fixture", "a", |s| {
        s["running"] == true && s["fixtureStarts"] == 1
    });
    let new = child_pid(&daemon, "fixture");
    assert_ne!(new, old);
    wait_gone(
        old,
        PATIENCE,
        &format!("the old plugin process {old} still runs"),
    );
    assert_no_zombie(&daemon);
}

/// A child that does not answer a stop (the account's task blocks its thread, so it never sees
/// its abort, and a cancel inside the child could not end it either) is killed at the stop
/// timeout: the stop ends then, not after the cancel grace (30 s here) as a stuck task would, and
/// every account of the child ends with the reason, in `lastError` and the log.
#[test]
fn a_child_that_does_not_answer_a_stop_is_killed_at_the_stop_timeout() {
    let daemon = Daemon::start(
        &[
            ("crashy.so", crash_plugin()),
            ("fixture.so", util::plugin_file("channeld-plugin-fixture")),
        ],
        "",
        "[supervisor]\ninitial_backoff = \"20ms\"\njitter = 0.0\nmax_restarts = 0\n\
         stop_timeout = \"1s\"\ncancel_grace = \"30s\"\n[health]\ninterval = \"0s\"\n\
         [channels.crashy]\nisolation = \"process\"\n\
         [channels.crashy.accounts.bad]\ncrash = \"hang\"\ncrash_in = \"start\"\n\
         [channels.crashy.accounts.other]\n\
         [channels.fixture.accounts.steady]\n",
        &[],
    );
    daemon.wait_for_account("crashy", "bad", |s| s["crashyStarts"].is_u64());
    daemon.wait_for_account("crashy", "other", |s| s["running"] == true);
    let pid = child_pid(&daemon, "crashy");
    let asked = Instant::now();
    let stop = daemon.cli(&["stop", "crashy:bad"]);
    let took = asked.elapsed();
    let said = String::from_utf8_lossy(&stop.stdout);
    assert!(
        took < Duration::from_secs(20),
        "the stop took {took:?} (the cancel grace is 30 s): {said}"
    );
    let reason = "plugin process killed: account bad did not stop within the stop timeout";
    let bad = daemon.account("crashy", "bad");
    assert_eq!(bad["state"], "stopped", "{bad}");
    let error = bad["lastError"].as_str().unwrap();
    assert!(
        error.contains("did not stop within 1s of its abort") && error.contains(reason),
        "{error}"
    );
    // The other account shared the child: it ended with the reason (and, with no restarts
    // allowed here, stays ended with it).
    let other = daemon.wait_for_account("crashy", "other", |s| s["running"] == false);
    assert!(
        other["lastError"]
            .as_str()
            .is_some_and(|e| e.contains(reason)),
        "{other}"
    );
    assert!(daemon.log().contains(reason), "{}", daemon.log());
    wait_gone(
        pid,
        PATIENCE,
        &format!("the plugin process {pid} still runs"),
    );
    assert_steady(&daemon);
    assert_no_zombie(&daemon);
}

/// `[host] isolation_handshake_timeout` bounds a child's load: a constructor that never returns
/// is a load error after it, named by the file, and its child is killed.
#[test]
fn the_handshake_timeout_is_a_setting() {
    let daemon = Daemon::start(
        &[
            (
                "blocks.so",
                util::plugin_file("channeld-broken-ctor-blocks"),
            ),
            ("crashy.so", crash_plugin()),
            ("fixture.so", util::plugin_file("channeld-plugin-fixture")),
        ],
        "isolation_handshake_timeout = \"3s\"",
        &format!(
            "{FAST}\n[channels.crashy]\nisolation = \"process\"\n[channels.crashy.accounts.a]\n\
             [channels.fixture.accounts.steady]\n"
        ),
        &[],
    );
    daemon.wait_for_account("crashy", "a", |s| s["running"] == true);
    let listing: Value =
        serde_json::from_slice(&daemon.cli(&["plugins", "--json"]).stdout).unwrap();
    let blocks = listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["file"].as_str().unwrap().ends_with("blocks.so"))
        .unwrap()
        .clone();
    assert_eq!(blocks["state"], "failed", "{blocks}");
    let error = blocks["loadError"].as_str().unwrap();
    assert!(
        error.contains("blocks.so") && error.contains("did not load its plugin within 3s"),
        "{error}"
    );
    assert_steady(&daemon);
    // The blocked child was killed: only crashy's child is left.
    let deadline = Instant::now() + PATIENCE;
    while children_of(daemon.pid())
        .iter()
        .filter(|(_, state)| *state != 'Z')
        .count()
        > 1
    {
        assert!(Instant::now() < deadline, "{:?}", children_of(daemon.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_zombie(&daemon);
}

/// `isolation = "process-per-account"`: each account runs in a child of its own. One account's
/// SIGSEGV restarts only that account (its neighbour keeps its first task, in its own process),
/// and a hung account's kill at the stop timeout ends only its own child.
#[test]
fn process_per_account_keeps_a_crash_and_a_hang_to_their_own_account() {
    let daemon = Daemon::start(
        &[
            ("crashy.so", crash_plugin()),
            ("fixture.so", util::plugin_file("channeld-plugin-fixture")),
        ],
        "",
        "[supervisor]\ninitial_backoff = \"20ms\"\nbackoff_factor = 2.0\nmax_backoff = \"80ms\"\n\
         jitter = 0.0\nmax_restarts = 3\nstable_run = \"1h\"\nstop_timeout = \"1s\"\n\
         cancel_grace = \"30s\"\n[health]\ninterval = \"0s\"\n\
         [channels.crashy]\nisolation = \"process-per-account\"\n\
         [channels.crashy.accounts.bad]\ncrash = \"segv\"\ncrash_in = \"start\"\n\
         [channels.crashy.accounts.hung]\ncrash = \"hang\"\ncrash_in = \"start\"\n\
         [channels.crashy.accounts.other]\n\
         [channels.fixture.accounts.steady]\n",
        &[],
    );
    let bad = daemon.wait_for_account("crashy", "bad", gave_up);
    assert!(
        bad["lastError"]
            .as_str()
            .unwrap()
            .contains("plugin process killed by SIGSEGV"),
        "{bad}"
    );
    assert_eq!(bad["reconnectAttempts"], 4, "{bad}");
    daemon.wait_for_account("crashy", "hung", |s| s["crashyStarts"] == 1);
    let other = daemon.wait_for_account("crashy", "other", |s| s["running"] == true);
    let unmoved = |other: &Value| {
        assert_eq!(other["running"], true, "{other}");
        assert_eq!(other["reconnectAttempts"], 0, "{other}");
        assert_eq!(
            other["crashyStarts"], 1,
            "its own process, its first task: {other}"
        );
    };
    unmoved(&other);

    let listing: Value =
        serde_json::from_slice(&daemon.cli(&["plugins", "--json"]).stdout).unwrap();
    let isolation = isolation_of(&listing, "crashy");
    assert_eq!(isolation["mode"], "process-per-account", "{isolation}");
    let pid_of = |account: &str| isolation["accounts"][account].as_u64().unwrap();
    let (control, hung, other_pid) = (
        isolation["pid"].as_u64().unwrap(),
        pid_of("hung"),
        pid_of("other"),
    );
    assert!(
        control != hung && hung != other_pid && control != other_pid,
        "{isolation}"
    );

    // The hung account's stop kills its own child at the stop timeout, and only that one.
    let asked = Instant::now();
    daemon.cli(&["stop", "crashy:hung"]);
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );
    let hung_now = daemon.account("crashy", "hung");
    assert_eq!(hung_now["state"], "stopped", "{hung_now}");
    assert!(
        hung_now["lastError"]
            .as_str()
            .unwrap()
            .contains("plugin process killed: account hung did not stop"),
        "{hung_now}"
    );
    wait_gone(
        hung,
        PATIENCE,
        &format!("the hung account's process {hung} still runs"),
    );
    assert!(alive(other_pid) && alive(control));
    unmoved(&daemon.account("crashy", "other"));
    assert_steady(&daemon);
    assert_no_zombie(&daemon);
}

/// A message from the outbox reaches the account's own child with `process-per-account` (the
/// fixture's send hook only knows accounts started in its process), and comes back sent.
#[test]
fn a_send_from_the_outbox_reaches_the_accounts_own_child() {
    let logs = tempfile::tempdir().unwrap();
    let log = |account: &str| logs.path().join(format!("{account}.log"));
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!(
            "{FAST}\n[channels.fixture]\nisolation = \"process-per-account\"\n\
             [channels.fixture.accounts.a]\nsend_log = \"{}\"\n\
             [channels.fixture.accounts.b]\nsend_log = \"{}\"\n",
            log("a").display(),
            log("b").display()
        ),
        &[],
    );
    for account in ["a", "b"] {
        daemon.wait_for_account("fixture", account, |s| s["running"] == true);
    }
    let out = daemon.cli(&["send", "fixture:b", "room", "hello", "--wait"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        daemon.log()
    );
    let sent = std::fs::read_to_string(log("b")).unwrap();
    assert!(sent.starts_with("b\troom\thello"), "{sent}");
    assert!(!log("a").exists(), "account a's child took no send");
}

/// A child that hangs whole (stopped by SIGSTOP: it reads neither the abort nor the stop hook's
/// call) is killed at the stop timeout too, and the stop ends there.
#[test]
fn a_child_that_hangs_whole_is_killed_at_the_stop_timeout() {
    let daemon = Daemon::start(
        &[("crashy.so", crash_plugin())],
        "",
        "[supervisor]\nmax_restarts = 0\nstop_timeout = \"1s\"\ncancel_grace = \"30s\"\n\
         [health]\ninterval = \"0s\"\n\
         [channels.crashy]\nisolation = \"process\"\n[channels.crashy.accounts.a]\n",
        &[],
    );
    daemon.wait_for_account("crashy", "a", |s| s["running"] == true);
    let pid = child_pid(&daemon, "crashy");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let asked = Instant::now();
    daemon.cli(&["stop", "crashy:a"]);
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );
    let a = daemon.account("crashy", "a");
    assert_eq!(a["state"], "stopped", "{a}");
    assert!(
        a["lastError"]
            .as_str()
            .unwrap()
            .contains("plugin process killed: account a did not stop within the stop timeout"),
        "{a}"
    );
    wait_gone(
        pid,
        PATIENCE,
        &format!("the plugin process {pid} still runs"),
    );
    assert_no_zombie(&daemon);
}

/// An isolated fixture (the in-process test double's real plugin) in a child of the real
/// `channeld` binary, configured with `table`.
fn isolated_fixture(
    runtime: &tokio::runtime::Runtime,
    board: &Arc<StatusBoard>,
    table: &Value,
) -> IsolatedPlugin {
    let fixture = util::plugin_file("channeld-plugin-fixture");
    let spec = ChildSpec {
        plugin: fixture.clone(),
        source: fixture,
        worker_threads: 1,
        max_log_level: LogLevel::Info,
        memory_limit: None,
        exe: Some(util::daemon::channeld().into()),
    };
    let plugin = IsolatedPlugin::spawn(spec, runtime.handle().clone(), board.clone()).unwrap();
    plugin.configure(table).unwrap();
    plugin
}

/// A batch of accounts with their host links (each account known to the board, so the
/// fixture's status patches land).
fn batch_of(board: &Arc<StatusBoard>, accounts: &[&str]) -> Vec<(String, AccountLink)> {
    accounts
        .iter()
        .map(|account| {
            let key = AccountKey::new("fixture", *account);
            let generation = board.begin_generation(&key);
            let link = AccountLink::for_account(key, generation, board.clone());
            (account.to_string(), link)
        })
        .collect()
}

/// One batched boot in one child: every account gets its own outcome, in order (switched off,
/// not configured, a failed check, started), and one account's failure fails no other. The
/// started tasks run, and one batched abort ends them.
#[test]
fn a_batched_boot_in_a_child_gives_each_account_its_own_outcome() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let table = json!({ "accounts": {
        "off": { "enabled": false },
        "up": {},
        "bare": { "configured": false },
        "broken": { "panic_in": ["is_enabled"] },
        "up2": {},
    } });
    let plugin = isolated_fixture(&runtime, &board, &table);
    let order = ["off", "up", "bare", "broken", "up2"];
    let steps = plugin.boot_accounts(batch_of(&board, &order));
    assert_eq!(steps.len(), order.len());
    let mut tasks = Vec::new();
    for (account, step) in order.iter().zip(steps) {
        let outcome = match step {
            Ok(BootStep::Disabled(reason)) => format!("disabled: {reason:?}"),
            Ok(BootStep::NotConfigured(reason)) => format!("not configured: {reason:?}"),
            Ok(BootStep::Started(task)) => {
                tasks.push(task);
                "started".to_owned()
            }
            Err(e) => format!("error: {e}"),
        };
        let expected = match *account {
            "off" => "disabled: Some(\"switched off in the fixture config\")",
            "bare" => "not configured: Some(\"missing token\")",
            "broken" => "error: ",
            _ => "started",
        };
        assert!(outcome.starts_with(expected), "{account}: {outcome}");
        if *account == "broken" {
            assert!(
                outcome.contains("fixture panic in is_enabled"),
                "{account}: {outcome}"
            );
        }
    }
    assert_eq!(tasks.len(), 2);
    // Both started accounts run their task (each reports its start to the host).
    for account in ["up", "up2"] {
        let key = AccountKey::new("fixture", account);
        let deadline = Instant::now() + PATIENCE;
        while board
            .get(&key)
            .and_then(|s| s.extra.get("fixtureStarts").cloned())
            != Some(json!(1))
        {
            assert!(Instant::now() < deadline, "{account} never ran its task");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The snapshot's facts of the same accounts, in one call.
    let facts = plugin.account_facts(
        &order
            .iter()
            .map(|a| (a.to_string(), false))
            .collect::<Vec<_>>(),
    );
    let enabled: Vec<_> = facts.iter().map(|f| f.enabled.clone()).collect();
    assert_eq!(
        enabled,
        [
            Some(Check::No(Some("switched off in the fixture config".into()))),
            Some(Check::Yes),
            Some(Check::Yes),
            None,
            Some(Check::Yes),
        ]
    );
    let ids: Vec<u64> = tasks.iter().map(|t| t.id).collect();
    assert_eq!(plugin.abort_tasks(&ids), 2);
    for task in tasks {
        runtime
            .block_on(async { tokio::time::timeout(PATIENCE, task.done).await })
            .expect("an aborted task ends")
            .expect("cleanly");
    }
    assert_eq!(plugin.isolation_info().children_started, 1);
    plugin.shutdown().unwrap();
}

/// Waits until `path` holds a line `line`.
fn wait_for_line(path: &std::path::Path, line: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| l == line)
    {
        assert!(
            Instant::now() < deadline,
            "{} never said {line}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child killed while it boots a batch fails every account of the batch with the cause of
/// death, not only the account whose start was under way; the next batch boots in a new child.
#[test]
fn a_child_killed_during_a_batched_boot_fails_every_account_of_the_batch() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("starts");
    let slow = json!({ "start_delay_ms": 3000, "start_mark": mark });
    let table = json!({ "accounts": { "a": slow, "b": slow, "c": slow } });
    let plugin = isolated_fixture(&runtime, &board, &table);
    let pid = plugin.isolation_info().pid.unwrap();
    let booting = {
        let (plugin, batch) = (plugin.clone(), batch_of(&board, &["a", "b", "c"]));
        std::thread::spawn(move || plugin.boot_accounts(batch))
    };
    // The child is inside the batch: the first account's start has begun.
    wait_for_line(&mark, "a");
    util::servers::signal_pid(pid, libc::SIGKILL);
    let steps = booting.join().unwrap();
    assert_eq!(steps.len(), 3);
    for (account, step) in ["a", "b", "c"].iter().zip(steps) {
        match step {
            Err(e) => assert!(
                e.message.contains("plugin process killed by SIGKILL"),
                "{account}: {e}"
            ),
            Ok(_) => panic!("{account} was booted although its child died"),
        }
    }
    // The next boot of the same accounts runs in a new child.
    plugin
        .configure(&json!({ "accounts": { "a": {}, "b": {}, "c": {} } }))
        .unwrap();
    let steps = plugin.boot_accounts(batch_of(&board, &["a", "b", "c"]));
    assert!(
        steps.iter().all(|s| matches!(s, Ok(BootStep::Started(_)))),
        "the batch in the new child"
    );
    assert_eq!(plugin.isolation_info().children_started, 2);
    plugin.shutdown().unwrap();
}

/// The daemon's boot pool boots an isolated channel's accounts in batches (8 accounts queued, a
/// fan-out of 4: two batches of 2 in flight): a child killed while both batches are under way in
/// it fails all 4 accounts of the batches with the cause of death (in the log), not only the two
/// whose starts had begun; each is charged one restart and runs again, under the backoff, in a
/// new child. The host and the other channel are untouched.
#[test]
fn a_child_killed_during_boots_fails_them_with_the_cause_and_restarts_them_in_a_new_child() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("starts");
    let accounts: String = (0..8)
        .map(|i| {
            format!(
                "[channels.fixture.accounts.a{i}]\nstart_delay_ms = 1000\nstart_mark = {:?}\n",
                mark.display().to_string()
            )
        })
        .collect();
    let daemon = Daemon::start(
        &[
            ("fixture.so", util::plugin_file("channeld-plugin-fixture")),
            ("crashy.so", crash_plugin()),
        ],
        "",
        &format!(
            "{FAST}\n[channels.fixture]\nisolation = \"process\"\n{accounts}\n\
             [channels.crashy.accounts.steady]\n"
        ),
        &[],
    );
    // Both batches are under way in the child (the first start of each has begun; the second
    // of each waits for the first's delay): kill it. Its pid is read first, so nothing slow
    // (a CLI call) stands between the second mark and the kill.
    let pid = child_pid(&daemon, "fixture");
    let deadline = Instant::now() + PATIENCE;
    while std::fs::read_to_string(&mark)
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "two starts did not begin");
        std::thread::sleep(Duration::from_millis(2));
    }
    util::servers::signal_pid(pid as u32, libc::SIGKILL);
    // Every account runs again, in the new child.
    let mut failed = Vec::new();
    for i in 0..8 {
        let account = format!("a{i}");
        let s = daemon.wait_for_account("fixture", &account, |s| s["running"] == true);
        match s["reconnectAttempts"].as_u64() {
            Some(0) => {}
            Some(1) => failed.push(account),
            _ => panic!("{account}: {s}"),
        }
    }
    // Every account of both batches failed, each with the cause.
    assert_eq!(failed.len(), 4, "failed: {failed:?}");
    let log = daemon.log();
    for account in &failed {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("fixture:{account}"))
                    && l.contains("start failed")
                    && l.contains("plugin process killed by SIGKILL")),
            "{account}: no start failure with the cause in the log:\n{log}"
        );
    }
    let listing: Value =
        serde_json::from_slice(&daemon.cli(&["plugins", "--json"]).stdout).unwrap();
    let isolation = isolation_of(&listing, "fixture");
    assert_eq!(isolation["childrenStarted"], 2, "{isolation}");
    assert_ne!(isolation["pid"], pid, "{isolation}");
    let steady = daemon.account("crashy", "steady");
    assert_eq!(steady["running"], true, "{steady}");
    assert_eq!(steady["crashyStarts"], 1, "{steady}");
    assert_no_zombie(&daemon);
}

/// The channel's `worker_threads` sizes the plugin runtime in its child, as it does in-process.
#[test]
fn worker_threads_per_channel_sizes_the_runtime_in_the_child() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "plugin_worker_threads = 1",
        "[health]\ninterval = \"0s\"\n\
         [channels.fixture]\nisolation = \"process\"\nstrict = true\nworker_threads = 3\n\
         [channels.fixture.accounts.main]\n",
        &[],
    );
    daemon.wait_for_account("fixture", "main", |s| s["running"] == true);
    let pid = u32::try_from(child_pid(&daemon, "fixture")).unwrap();
    let workers = util::daemon::threads_named(pid, "chd-fixture", 3);
    assert_eq!(workers, 3, "{:?}", util::daemon::thread_names_of(pid));
}

/// A start that blocks its thread in the child after its account was stopped: at the stop
/// timeout the child is killed (like one that does not answer a stop), so the start returns and
/// the account is free again at once instead of `stuck` until the start ends by itself (60 s
/// here); the other account of the child restarts in a new child.
#[test]
fn a_start_that_hangs_after_its_stop_has_its_child_killed_at_the_stop_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("starts");
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!(
            "{FAST}\n[channels.fixture]\nisolation = \"process\"\n\
             [channels.fixture.accounts.other]\n\
             [channels.fixture.accounts.slow]\nstart_delay_ms = 60000\nstart_mark = {:?}\n",
            mark.display().to_string()
        ),
        &[],
    );
    daemon.wait_for_account("fixture", "other", |s| s["running"] == true);
    wait_for_line(&mark, "slow");
    let asked = Instant::now();
    daemon.cli(&["stop", "fixture:slow"]);
    let slow = daemon.wait_for_account("fixture", "slow", |s| {
        s["state"] == "stopped"
            && s["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("the stuck start has returned"))
    });
    assert!(asked.elapsed() < Duration::from_secs(20), "{slow}");
    daemon.wait_for_log("account slow's start did not return within the stop timeout");
    let other = daemon.wait_for_account("fixture", "other", |s| {
        s["running"] == true && s["reconnectAttempts"] == 1
    });
    assert_eq!(
        other["fixtureStarts"], 1,
        "a new child's first start: {other}"
    );
    let listing: Value =
        serde_json::from_slice(&daemon.cli(&["plugins", "--json"]).stdout).unwrap();
    assert_eq!(isolation_of(&listing, "fixture")["childrenStarted"], 2);
    assert_no_zombie(&daemon);
}

/// What the fixture's account `a` hears for each of `patches`, sent through its running task's
/// host handle, and then for one more patch through the same handle after its task has ended
/// and the host has retired its generation (as the supervisor does when a task ends).
fn patches_heard(
    plugin: &dyn Plugin,
    board: &Arc<StatusBoard>,
    runtime: &tokio::runtime::Runtime,
    patches: &[Value],
) -> Vec<String> {
    let key = AccountKey::new("fixture", "a");
    let generation = board.begin_generation(&key);
    let link = AccountLink::for_account(key.clone(), generation, board.clone());
    let task = plugin.start_account("a", link).expect("a starts");
    wait_for_status(board, &key, "fixtureStarts", &json!(1));
    let send = |patch: &Value| {
        runtime
            .block_on(plugin.send(Outbound {
                account: "a".into(),
                conversation: "c".into(),
                text: format!("patch:{patch}"),
                reply_to: None,
                extra: None,
            }))
            .expect("the send hook answers")
    };
    let mut heard: Vec<String> = patches.iter().map(send).collect();
    assert!(plugin.abort_task(task.id));
    runtime
        .block_on(async { tokio::time::timeout(PATIENCE, task.done).await })
        .expect("an aborted task ends")
        .expect("cleanly");
    board.retire_generation(&key);
    heard.push(send(&json!({ "fixtureNote": "late" })));
    heard
}

/// Waits until `key`'s status has `field` = `value`.
fn wait_for_status(board: &StatusBoard, key: &AccountKey, field: &str, value: &Value) {
    let deadline = Instant::now() + PATIENCE;
    while board
        .get(key)
        .and_then(|s| s.extra.get(field).cloned())
        .as_ref()
        != Some(value)
    {
        assert!(
            Instant::now() < deadline,
            "{key}: {field} never became {value}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The same fixture in-process (its own copy of the library), on its own board.
fn in_process_fixture(dir: &std::path::Path, board: &Arc<StatusBoard>, table: &Value) -> FfiPlugin {
    let copy = util::copy_plugin(
        &util::plugin_file("channeld-plugin-fixture"),
        dir,
        "fixture-in-process.so",
    );
    let module = load_root_module(&copy).expect("load the fixture");
    let plugin = FfiPlugin::new(module, &copy).expect("metadata");
    let sink: Arc<dyn HostSink> = board.clone();
    plugin.init(1, LogLevel::Info, sink).expect("init");
    plugin.configure(table).expect("configure");
    plugin
}

/// An isolated plugin's status patches are answered in its child (no round trip to the host per
/// patch) and reach the host one way, and the plugin hears exactly what it hears in-process: ok
/// for a valid patch, which then shows in the status; the host's error for a host-owned key and
/// for a value of the wrong type; the stale error for a patch from a task that has ended.
#[test]
fn an_isolated_plugins_status_patches_are_heard_as_in_process() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let table = json!({ "accounts": { "a": {} } });
    let patches = [
        json!({ "fixtureNote": "hi" }),
        json!({ "fixtureOther": 1, "state": "running" }),
        json!({ "busy": "very" }),
    ];
    let key = AccountKey::new("fixture", "a");

    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let isolated = isolated_fixture(&runtime, &board, &table);
    let heard = patches_heard(&isolated, &board, &runtime, &patches);
    isolated.shutdown().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let reference = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let in_process = in_process_fixture(dir.path(), &reference, &table);
    let expected = patches_heard(&in_process, &reference, &runtime, &patches);

    assert_eq!(
        expected,
        [
            "patched".to_owned(),
            "refused:fixture:a: status key \"state\" is owned by the host".to_owned(),
            "refused:fixture:a: bad status patch for \"busy\": invalid type: string \"very\", \
             expected a boolean"
                .to_owned(),
            "refused:fixture:a: this task has been replaced; the call was dropped".to_owned(),
        ],
        "in-process"
    );
    assert_eq!(heard, expected, "isolated");
    // The valid patch shows in the status; the refused ones and the late one left no trace.
    for board in [&board, &reference] {
        let status = board.get(&key).expect("a has a status");
        assert_eq!(status.extra.get("fixtureNote"), Some(&json!("hi")));
        assert_eq!(status.extra.get("fixtureOther"), None);
        assert!(!status.busy);
    }
}
