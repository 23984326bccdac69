//! Observability and service integration with the real daemon: `/metrics` parsed by a
//! Prometheus parser crate (a crash storm's exact counts, the outbox's queued and failed
//! messages), `/healthz` and `/readyz` during a slow start, the sd_notify messages on a
//! `NOTIFY_SOCKET` the test binds (watchdog silent while the supervisor is held), shell
//! completions and the manual page.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE, Start, channeld},
};

/// Storm policy: tiny, jitter-free backoffs, the default 10 restarts.
const STORM: &str = "[supervisor]\ninitial_backoff = \"1ms\"\nbackoff_factor = 1.0\n\
                     max_backoff = \"1ms\"\njitter = 0.0\nmax_restarts = 10\n\
                     stable_run = \"1h\"\n[health]\ninterval = \"0s\"\n";

/// A GET on the daemon's API: (status, body); `token` adds the bearer token.
fn get(daemon: &Daemon, path: &str, token: bool) -> (u16, String) {
    let (address, bearer) = daemon.api();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(format!("http://{address}{path}"));
    if token {
        request = request.header("Authorization", format!("Bearer {bearer}"));
    }
    let mut response = request.call().expect("the API answers");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// `/metrics`, parsed by `prometheus-parse`.
fn scrape(daemon: &Daemon) -> prometheus_parse::Scrape {
    let (status, text) = get(daemon, "/metrics", true);
    assert_eq!(status, 200, "{text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name} is not a single value: {other:?}"),
    }
}

fn gave_up_after(starts: u64) -> impl Fn(&Value) -> bool {
    move |s: &Value| {
        s["fixtureStarts"] == starts
            && s["running"] == false
            && s["restartPending"] == false
            && s["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("giving up"))
    }
}

#[test]
fn metrics_parse_and_count_a_crash_storm_exactly() {
    const N: usize = 4;
    let accounts: String = (0..N)
        .map(|i| format!("[channels.fixture.accounts.a{i}]\nmode = \"crash\"\nafter_ms = 1\n"))
        .collect();
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!("{STORM}\n{accounts}"),
        &[],
    );
    for i in 0..N {
        daemon.wait_for_account("fixture", &format!("a{i}"), gave_up_after(11));
    }
    let before = scrape(&daemon);
    let starts = value(&before, "channeld_starts_total", &[]);
    let give_ups = value(&before, "channeld_give_ups_total", &[]);
    assert_eq!(starts, (11 * N) as f64, "1 start + 10 restarts per account");
    assert_eq!(give_ups, N as f64);
    assert_eq!(value(&before, "channeld_crashes_total", &[]), starts);
    assert_eq!(
        value(
            &before,
            "channeld_account_restart_attempts",
            &[("channel", "fixture"), ("account", "a0")]
        ),
        11.0
    );
    assert_eq!(
        value(
            &before,
            "channeld_account_state",
            &[("account", "a1"), ("state", "gave-up")]
        ),
        1.0
    );
    assert_eq!(
        value(&before, "channeld_accounts", &[("state", "gave-up")]),
        N as f64
    );
    assert_eq!(
        value(
            &before,
            "channeld_plugin_versions_mapped",
            &[("channel", "fixture")]
        ),
        1.0
    );
    assert!(value(&before, "channeld_reconciles_total", &[]) >= 1.0);

    // A second storm, started by a user: the counters grow by exactly as much again.
    let out = daemon.cli(&["start", "fixture"]);
    assert!(out.status.success(), "{out:?}");
    for i in 0..N {
        daemon.wait_for_account("fixture", &format!("a{i}"), gave_up_after(22));
    }
    let after = scrape(&daemon);
    assert_eq!(
        value(&after, "channeld_starts_total", &[]) - starts,
        (11 * N) as f64
    );
    assert_eq!(
        value(&after, "channeld_give_ups_total", &[]) - give_ups,
        N as f64
    );

    // The token rule is the API's.
    assert_eq!(get(&daemon, "/metrics", false).0, 401);
}

#[test]
fn metrics_can_be_public_and_per_account_series_switched_off() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[metrics]\npublic = true\nper_account = false\n\
         [channels.fixture.accounts.steady]\nmode = \"run\"\n",
        &[],
    );
    daemon.wait_for_account("fixture", "steady", |s| s["running"] == true);
    let (status, text) = get(&daemon, "/metrics", false);
    assert_eq!(status, 200, "public: no token needed");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(
        value(&scrape, "channeld_accounts", &[("state", "running")]),
        1.0
    );
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric.starts_with("channeld_account_")),
        "per-account series are off"
    );
    // The rest of the API keeps its token.
    assert_eq!(get(&daemon, "/v1/status", false).0, 401);
}

#[test]
fn metrics_count_the_outboxs_queued_and_failed_messages() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[outbox]\nretry_initial = \"10ms\"\nretry_max = \"40ms\"\ndeadline = \"2s\"\n\
         [channels.fixture.accounts.doomed]\nsend_fail = 1000000\n\
         [channels.fixture.accounts.parked]\nmode = \"run\"\n",
        &[],
    );
    for account in ["doomed", "parked"] {
        daemon.wait_for_account("fixture", account, |s| s["running"] == true);
    }
    // Every send of this one fails until its deadline.
    let out = daemon.cli(&["send", "fixture:doomed", "room", "lost", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", daemon.log());
    // A stopped account's message waits, queued (sent after the failure: the deadline counts
    // from acceptance for every message, and this one must not reach it before the scrape).
    let out = daemon.cli(&["stop", "fixture:parked"]);
    assert!(out.status.success(), "{out:?}");
    let out = daemon.cli(&["send", "fixture:parked", "room", "later"]);
    assert!(out.status.success(), "{out:?}\n{}", daemon.log());
    let scrape = scrape(&daemon);
    let messages = |state| value(&scrape, "channeld_outbox_messages", &[("state", state)]);
    assert_eq!(messages("queued"), 1.0);
    assert_eq!(messages("failed"), 1.0);
    assert_eq!(messages("sending"), 0.0);
    assert_eq!(messages("sent"), 0.0);
}

#[test]
fn readyz_answers_not_ready_during_a_slow_start_then_ready_and_healthz_throughout() {
    let daemon = Daemon::start_with(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[channels.fixture.accounts.slow]\nstart_delay_ms = 1000\n",
        &[],
        Start {
            wait_loaded: false,
            ..Start::default()
        },
    );
    // The port answers from the moment it is bound, before the plugins load, without a token.
    let (status, body) = get(&daemon, "/readyz", false);
    assert_eq!(status, 503, "not ready during the 1 s start: {body}");
    let (status, body) = get(&daemon, "/healthz", false);
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(&daemon, "/readyz", false);
        if status == 200 {
            assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ready"], true);
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("waiting"),
            "a not-ready answer names what it waits for: {body}"
        );
        assert_eq!(get(&daemon, "/healthz", false).0, 200);
        assert!(Instant::now() < deadline, "never ready:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ready means start-all is done: the slow account has started.
    let slow = daemon.account("fixture", "slow");
    assert_eq!(slow["running"], true, "{slow}");
}

/// Collects every datagram on a socket the test binds, with when it arrived.
fn notify_socket(path: &std::path::Path) -> Arc<Mutex<Vec<String>>> {
    let socket = UnixDatagram::bind(path).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let into = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            into.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    got
}

fn wait_for_message(got: &Mutex<Vec<String>>, what: impl Fn(&str) -> bool, after: usize) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(i) = got
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .skip(after)
            .find(|(_, m)| what(m))
            .map(|(i, _)| i)
        {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "no such message after #{after}: {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

#[test]
fn sd_notify_messages_arrive_in_order_and_the_watchdog_is_silent_while_the_supervisor_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let got = notify_socket(&path);
    let mut daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[channels.fixture.accounts.steady]\nmode = \"run\"\n",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            // A ping every 50 ms.
            ("WATCHDOG_USEC", "100000"),
            (channeld::notify::STALL_ENV, "1s"),
        ],
    );
    let ready = wait_for_message(&got, |m| has_line(m, "READY=1"), 0);
    let over = wait_for_message(&got, |m| has_line(m, "STATUS=supervisor stall over"), ready);
    let silent = got.lock().unwrap()[ready..over].to_vec();
    assert!(
        !silent.iter().any(|m| has_line(m, "WATCHDOG=1")),
        "no WATCHDOG=1 while the supervisor is held: {silent:?}"
    );
    // Once it answers again, the pings resume.
    let pinged = wait_for_message(&got, |m| has_line(m, "WATCHDOG=1"), over);

    // SIGHUP: RELOADING=1, then READY=1.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let reloading = wait_for_message(&got, |m| has_line(m, "RELOADING=1"), pinged);
    let message = got.lock().unwrap()[reloading].clone();
    assert!(message.contains("MONOTONIC_USEC="), "{message:?}");
    wait_for_message(&got, |m| has_line(m, "READY=1"), reloading);

    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    let stopping = wait_for_message(&got, |m| has_line(m, "STOPPING=1"), reloading);
    let all = got.lock().unwrap().clone();
    assert_eq!(
        all.iter().filter(|m| has_line(m, "STOPPING=1")).count(),
        1,
        "{all:?}"
    );
    assert!(stopping > ready);
}

#[test]
fn completions_and_the_manual_come_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(channeld())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let script = dir.path().join("channeld.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tail") && text.contains("completions"),
        "{text}"
    );
    let checked = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(checked.status.success(), "bash -n: {checked:?}");
    for shell in ["zsh", "fish"] {
        let out = Command::new(channeld())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{out:?}");
    }
    let man = Command::new(channeld()).arg("man").output().unwrap();
    assert!(man.status.success(), "{man:?}");
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
    assert!(man.contains("channeld"), "{man}");
}

#[test]
fn the_unit_file_is_type_notify_and_reloads_with_sighup() {
    let unit =
        std::fs::read_to_string(util::workspace_root().join("scripts/channeld.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=channeld",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
    }
}
