//! The journal and the event stream end to end: the real daemon, the webhook and fixture plugins,
//! `GET /v1/events` over real HTTP, `channeld tail`, and the journal file itself after a
//! `kill -9`.

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use channeld::journal::{Filter, Journal, JournalConfig};
use serde_json::Value;

use crate::util::{
    self, agent,
    daemon::{Daemon, PATIENCE, channeld},
};

const SECRET: &str = "s3cret";

/// A webhook daemon with `extra` config sections (e.g. `[journal]`).
fn webhook_daemon(extra: &str) -> Daemon {
    Daemon::start(
        &[("webhook.so", util::plugin_file("channeld-plugin-webhook"))],
        "",
        &webhook_config(extra),
        &[],
    )
}

fn webhook_config(extra: &str) -> String {
    format!(
        "{extra}\n\n[supervisor]\nstop_timeout = \"2s\"\n\n\
         [channels.webhook.accounts.main]\nlisten = \"127.0.0.1:0\"\nsecret = \"{SECRET}\"\n"
    )
}

/// The webhook account's address, once it listens.
fn webhook_addr(daemon: &Daemon) -> String {
    let snapshot = daemon.wait_for_account("webhook", "main", |s| {
        s["running"] == true && s["listen_addr"].is_string()
    });
    snapshot["listen_addr"].as_str().unwrap().to_owned()
}

/// Posts a message to the webhook; its status and body.
fn post(agent: &ureq::Agent, addr: &str, text: &str) -> (u16, String) {
    let body = serde_json::json!({ "conversation": "lobby", "sender": "ada", "text": text });
    let mut response = agent
        .post(format!("http://{addr}/messages"))
        .header("Authorization", format!("Bearer {SECRET}"))
        .send(body.to_string())
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn post_ok(agent: &ureq::Agent, addr: &str, text: &str) {
    let (status, body) = post(agent, addr, text);
    assert_eq!(status, 202, "{body}");
}

/// An API call with `token` (the daemon's own when `None`).
fn api(daemon: &Daemon, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let (addr, own) = daemon.api();
    let token = token.unwrap_or(&own);
    let url = format!("http://{addr}{path}");
    let agent = agent();
    let result = match method {
        "GET" => agent
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .call(),
        _ => agent
            .post(&url)
            .header("Authorization", format!("Bearer {token}"))
            .send_empty(),
    };
    let mut response = result.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

fn journal_stats(daemon: &Daemon) -> Value {
    let (status, body) = api(daemon, "GET", "/v1/journal", None);
    assert_eq!(status, 200, "{body}");
    body["journal"].clone()
}

/// One server-sent event.
#[derive(Debug, Clone)]
struct Event {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// A consumer of `GET /v1/events`: a thread reads the stream and hands over parsed events.
struct Consumer {
    events: mpsc::Receiver<Event>,
}

impl Consumer {
    /// Connects with `query` and optionally `Last-Event-ID`, as `token` (default: the daemon's).
    fn connect(daemon: &Daemon, query: &str, last_id: Option<u64>, token: Option<&str>) -> Self {
        let (addr, own) = daemon.api();
        let mut request = agent()
            .get(format!("http://{addr}/v1/events{query}"))
            .header("Authorization", format!("Bearer {}", token.unwrap_or(&own)));
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.call().unwrap();
        assert_eq!(response.status().as_u16(), 200, "GET /v1/events{query}");
        let (tx, events) = mpsc::channel();
        let reader = BufReader::new(response.into_body().into_reader());
        std::thread::spawn(move || {
            let (mut id, mut event, mut data) = (None, String::new(), String::new());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !data.is_empty() {
                        let parsed = Event {
                            id: id.take(),
                            event: std::mem::take(&mut event),
                            data: serde_json::from_str(&data).unwrap(),
                        };
                        if tx.send(parsed).is_err() {
                            return;
                        }
                    }
                    data.clear();
                    continue;
                }
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse().unwrap());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
        });
        let consumer = Self { events };
        let ready = consumer.next();
        assert_eq!(ready.event, "ready", "{ready:?}");
        consumer
    }

    /// The next event (waiting up to [`PATIENCE`]).
    fn next(&self) -> Event {
        self.events
            .recv_timeout(PATIENCE)
            .expect("no event from the stream in time")
    }

    /// The next message event, skipping state events.
    fn next_message(&self) -> Event {
        loop {
            let event = self.next();
            if event.event != "state" {
                assert_eq!(event.event, "", "expected a message: {event:?}");
                return event;
            }
        }
    }
}

#[test]
fn a_delivered_message_reaches_a_live_consumer_with_its_seq() {
    let daemon = webhook_daemon("");
    let addr = webhook_addr(&daemon);
    let consumer = Consumer::connect(&daemon, "", None, None);
    let agent = agent();
    post_ok(&agent, &addr, "hello");
    let event = consumer.next_message();
    assert_eq!(event.id, Some(1));
    let m = &event.data;
    assert_eq!(
        (
            m["seq"].as_u64(),
            m["channel"].as_str(),
            m["account"].as_str()
        ),
        (Some(1), Some("webhook"), Some("main"))
    );
    assert_eq!(
        (
            m["conversation"].as_str(),
            m["sender"].as_str(),
            m["text"].as_str()
        ),
        (Some("lobby"), Some("ada"), Some("hello"))
    );
    assert!(m["receivedAt"].as_i64().unwrap() > 0);
}

#[test]
fn a_consumer_resumes_with_last_event_id_and_gets_exactly_the_1000_it_missed() {
    let daemon = webhook_daemon("[journal]\nsync = \"normal\"\n");
    let addr = webhook_addr(&daemon);
    let agent = agent();
    let first = Consumer::connect(&daemon, "", None, None);
    post_ok(&agent, &addr, "before");
    let seen = first.next_message().id.unwrap();
    drop(first);
    for i in 1..=1000 {
        post_ok(&agent, &addr, &format!("m{i}"));
    }
    let again = Consumer::connect(&daemon, "", Some(seen), None);
    for i in 1..=1000u64 {
        let event = again.next_message();
        assert_eq!(event.id, Some(seen + i), "{event:?}");
        assert_eq!(event.data["text"], format!("m{i}"));
    }
    // Nothing else in between: the next message is the one posted now.
    post_ok(&agent, &addr, "after");
    let event = again.next_message();
    assert_eq!(
        (event.id, event.data["text"].as_str()),
        (Some(seen + 1001), Some("after"))
    );
    // `?since=` resumes the same way, and filters apply.
    let since = Consumer::connect(
        &daemon,
        &format!(
            "?since={}&channel=webhook&account=MAIN&conversation=lobby",
            seen + 999
        ),
        None,
        None,
    );
    assert_eq!(since.next_message().data["text"], "m1000");
    assert_eq!(since.next_message().data["text"], "after");
    let elsewhere = Consumer::connect(&daemon, "?since=0&conversation=other", None, None);
    post_ok(&agent, &addr, "still lobby");
    if let Ok(event) = elsewhere.events.recv_timeout(Duration::from_millis(300)) {
        assert_eq!(
            event.event, "state",
            "a conversation filter lets no other through: {event:?}"
        );
    }
}

#[test]
fn a_slow_consumer_does_not_hold_up_a_fast_one_and_still_gets_everything() {
    let daemon = webhook_daemon("[journal]\nsync = \"normal\"\n");
    let addr = webhook_addr(&daemon);
    let agent = agent();
    let fast = Consumer::connect(&daemon, "?since=0", None, None);
    // The slow one reads nothing at all until the fast one has every message.
    let slow = Consumer::connect(&daemon, "?since=0", None, None);
    for i in 1..=300 {
        post_ok(&agent, &addr, &format!("m{i}"));
    }
    for i in 1..=300u64 {
        assert_eq!(fast.next_message().id, Some(i));
    }
    for i in 1..=300u64 {
        let event = slow.next_message();
        assert_eq!(
            (event.id, event.data["text"].clone()),
            (Some(i), Value::from(format!("m{i}")))
        );
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn pruned_messages_are_announced_once_and_their_seqs_are_never_reused() {
    let mut daemon = webhook_daemon("[journal]\nretain = \"1s\"\n");
    let addr = webhook_addr(&daemon);
    let agent = agent();
    for i in 1..=3 {
        post_ok(&agent, &addr, &format!("m{i}"));
    }
    let deadline = Instant::now() + PATIENCE;
    while journal_stats(&daemon)["messages"] != 0 {
        assert!(Instant::now() < deadline, "{}", journal_stats(&daemon));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(journal_stats(&daemon)["prunedThrough"], 3);
    // Pruned to empty: the next message still gets 4.
    post_ok(&agent, &addr, "m4");
    assert_eq!(journal_stats(&daemon)["lastSeq"], 4);
    let consumer = Consumer::connect(&daemon, "?since=1", None, None);
    let pruned = consumer.next();
    assert_eq!(pruned.event, "pruned", "{pruned:?}");
    assert_eq!(
        (pruned.data["from"].as_u64(), pruned.data["to"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(pruned.id, Some(3));
    let event = consumer.next_message();
    assert!(
        event.id == Some(4) || event.event == "pruned",
        "m4 or, if it aged out meanwhile, its own pruned event: {event:?}"
    );
    drop(consumer);

    // A restart continues after the high-water mark.
    daemon.terminate();
    daemon.start_again(&[]);
    let addr = webhook_addr(&daemon);
    post_ok(&agent, &addr, "m5");
    assert_eq!(journal_stats(&daemon)["lastSeq"], 5);

    // So does a journal recreated from nothing.
    daemon.terminate();
    let state = daemon.root().join("state");
    for file in ["journal.db", "journal.db-wal", "journal.db-shm"] {
        let _ = fs::remove_file(state.join(file));
    }
    daemon.start_again(&[]);
    let addr = webhook_addr(&daemon);
    post_ok(&agent, &addr, "m6");
    let last = journal_stats(&daemon)["lastSeq"].as_u64().unwrap();
    assert!(last > 5, "seq {last} was handed out before");
}

#[test]
fn an_oversize_message_is_refused_to_the_plugin_counted_and_nothing_else_changes() {
    let daemon = webhook_daemon("[journal]\nmax_message_bytes = 64\n");
    let addr = webhook_addr(&daemon);
    let agent = agent();
    let (status, body) = post(&agent, &addr, &"x".repeat(100));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max_message_bytes (64)"), "{body}");
    assert!(body.contains("webhook:main"), "{body}");
    post_ok(&agent, &addr, "small");
    let stats = journal_stats(&daemon);
    assert_eq!(stats["refusedTooLarge"], 1, "{stats}");
    assert_eq!(stats["lastSeq"], 1, "{stats}");
}

#[test]
fn a_full_store_fails_deliver_clearly_and_the_daemon_keeps_running() {
    let daemon = webhook_daemon("[journal]\nmax_size = \"4KiB\"\n");
    let addr = webhook_addr(&daemon);
    let agent = agent();
    let (status, body) = post(&agent, &addr, "no room");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("journal full"), "{body}");
    assert!(body.contains("nothing left to prune"), "{body}");
    assert_eq!(journal_stats(&daemon)["refusedFull"], 1);
    // Still serving, the account still running.
    assert_eq!(daemon.account("webhook", "main")["running"], true);
    let (status, _) = post(&agent, &addr, "again");
    assert_eq!(status, 503);
}

fn assert_one_line_failure(stderr: &str, status: std::process::ExitStatus, needle: &str) {
    assert!(!status.success(), "exit {status}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains(needle), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_corrupt_journal_stops_the_start_with_one_line() {
    let daemon = Daemon::prepare(&[], "", "");
    let state = daemon.root().join("state");
    fs::create_dir(&state).unwrap();
    fs::write(state.join("journal.db"), vec![0x5a; 8192]).unwrap();
    let (status, stderr) = daemon.run_to_exit();
    assert_one_line_failure(&stderr, status, "not a usable journal database");
    assert!(stderr.contains("journal.db"), "{stderr}");
}

#[test]
fn a_journal_from_a_newer_schema_is_refused_with_one_line() {
    let daemon = Daemon::prepare(&[], "", "");
    let state = daemon.root().join("state");
    fs::create_dir(&state).unwrap();
    let conn = rusqlite::Connection::open(state.join("journal.db")).unwrap();
    conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
        .unwrap();
    drop(conn);
    let (status, stderr) = daemon.run_to_exit();
    assert_one_line_failure(&stderr, status, "schema version 99");
    assert!(stderr.contains("newer channeld"), "{stderr}");
}

#[test]
fn a_journal_in_use_by_a_running_daemon_stops_a_second_one_with_one_line() {
    let daemon = webhook_daemon("");
    let (_, token) = daemon.api();
    let (status, stderr) = daemon.run_to_exit();
    // The state directory's lock, taken before the journal is opened, names the holder; the
    // journal's own lock (its unit tests) covers any other process that opens the database.
    assert_one_line_failure(&stderr, status, "is in use by another channeld");
    // The first daemon's clients are unaffected: same token file, still answering.
    assert_eq!(daemon.api().1, token);
    assert_eq!(journal_stats(&daemon)["lastSeq"], 0);
}

#[test]
fn the_read_only_token_reads_events_and_status_but_cannot_stop_an_account() {
    let daemon = webhook_daemon("[api]\nread_token = \"reader\"\n");
    let addr = webhook_addr(&daemon);
    let consumer = Consumer::connect(&daemon, "", None, Some("reader"));
    post_ok(&agent(), &addr, "readable");
    assert_eq!(consumer.next_message().data["text"], "readable");
    let (status, _) = api(&daemon, "GET", "/v1/status", Some("reader"));
    assert_eq!(status, 200);
    let (status, body) = api(
        &daemon,
        "POST",
        "/v1/accounts/webhook/main/stop",
        Some("reader"),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("read-only"),
        "{body}"
    );
    assert_eq!(daemon.account("webhook", "main")["running"], true);
    let (status, _) = api(&daemon, "GET", "/v1/events", Some("wrong"));
    assert_eq!(status, 401);
}

#[test]
fn malformed_stream_parameters_get_a_400_naming_them() {
    let daemon = webhook_daemon("");
    for (query, name) in [
        ("?since=ten", "parameter since"),
        ("?since=-1", "parameter since"),
        ("?chanel=webhook", "parameter chanel"),
        ("?channel=", "parameter channel"),
    ] {
        let (status, body) = api(&daemon, "GET", &format!("/v1/events{query}"), None);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().starts_with(name),
            "{query}: {body}"
        );
    }
    let (addr, token) = daemon.api();
    let response = agent()
        .get(format!("http://{addr}/v1/events"))
        .header("Authorization", format!("Bearer {token}"))
        .header("Last-Event-ID", "x1")
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[test]
fn account_state_changes_are_live_events_without_an_id() {
    let daemon = webhook_daemon("");
    webhook_addr(&daemon);
    let consumer = Consumer::connect(&daemon, "?channel=webhook", None, None);
    let cli = |verb: &str| assert!(daemon.cli(&[verb, "webhook:main"]).status.success());
    // Every change is published when it is made: a stop shows running → (stopping →) stopped, and
    // a start the short `starting` before `running`.
    let until = |last: &str| {
        let mut events = Vec::new();
        loop {
            let event = consumer.next();
            let done = event.data["to"] == last;
            events.push(event);
            if done {
                return events;
            }
        }
    };
    cli("stop");
    let stop = until("stopped");
    cli("start");
    let start = until("running");
    for event in stop.iter().chain(&start) {
        assert_eq!(event.event, "state", "{event:?}");
        assert_eq!(event.id, None);
        assert_eq!(event.data["account"].as_str(), Some("main"), "{event:?}");
    }
    assert_eq!(stop[0].data["from"].as_str(), Some("running"), "{stop:?}");
    let mut started: Vec<&str> = start.iter().filter_map(|e| e.data["to"].as_str()).collect();
    started.dedup();
    assert_eq!(started, ["starting", "running"], "{start:?}");
    assert_eq!(start[0].data["from"].as_str(), Some("stopped"), "{start:?}");
}

/// `channeld tail` as a child process, its stdout lines handed over as they come.
struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Tail {
    fn start(daemon: &Daemon, args: &[&str]) -> Self {
        let mut child = Command::new(channeld())
            .arg("tail")
            .args(args)
            .arg("--config")
            .arg(&daemon.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(PATIENCE)
            .expect("tail printed nothing");
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tail_follows_across_a_daemon_restart_without_gaps_or_repeats() {
    let mut daemon = webhook_daemon("");
    let addr = webhook_addr(&daemon);
    let agent = agent();
    post_ok(&agent, &addr, "one");
    let tail = Tail::start(&daemon, &["webhook:main", "--since", "0", "--json"]);
    assert_eq!(tail.next()["text"], "one");
    daemon.terminate();
    daemon.start_again(&[]);
    let addr = webhook_addr(&daemon);
    post_ok(&agent, &addr, "two");
    post_ok(&agent, &addr, "three");
    let two = tail.next();
    assert_eq!(
        (two["seq"].as_u64(), two["text"].as_str()),
        (Some(2), Some("two"))
    );
    assert_eq!(tail.next()["text"], "three");
}

#[test]
fn every_acknowledged_delivery_survives_a_kill_9() {
    let mut daemon = Daemon::prepare(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "",
    );
    let acks = daemon.root().join("acks");
    fs::write(
        &daemon.config,
        format!(
            "[host]\napi_address = \"127.0.0.1:0\"\n[journal]\nsync = \"full\"\n\
             [channels.fixture.accounts.flood]\nmode = \"flood\"\nmessages = 100000000\n\
             text_prefix = \"m\"\nack_file = \"{}\"\n",
            acks.display()
        ),
    )
    .unwrap();
    daemon.start_again(&[]);
    let deadline = Instant::now() + PATIENCE;
    while fs::read_to_string(&acks).map_or(0, |a| a.lines().count()) < 500 {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.kill();
    let text = fs::read_to_string(&acks).unwrap();
    // Only whole lines: a line being written at the kill was not yet acknowledged to anyone.
    let acknowledged: Vec<&str> = text
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .collect();
    assert!(acknowledged.len() >= 500);

    // Reopen the journal as a restarted daemon would.
    let journal = Journal::open(&daemon.root().join("state"), JournalConfig::default()).unwrap();
    let last = journal.last_seq();
    let mut stored = Vec::new();
    let mut cursor = 0;
    while cursor < last {
        let batch = journal
            .read_after(cursor, last, &Filter::default(), 10_000)
            .unwrap();
        assert_eq!(batch.pruned, None);
        stored.extend(batch.messages);
        cursor = batch.cursor;
    }
    assert!(
        stored.len() >= acknowledged.len(),
        "{} < {}",
        stored.len(),
        acknowledged.len()
    );
    for (i, (ack, message)) in acknowledged.iter().zip(&stored).enumerate() {
        assert_eq!(message.text, *ack, "message {i}");
        assert_eq!(message.seq, i as u64 + 1);
        assert_eq!(
            (
                message.channel.as_str(),
                message.account.as_str(),
                message.conversation.as_str()
            ),
            ("fixture", "flood", "bench-room")
        );
    }
    drop(journal);
    // And the daemon itself starts on it and continues the numbering.
    fs::write(&daemon.config, "[host]\napi_address = \"127.0.0.1:0\"\n").unwrap();
    daemon.start_again(&[]);
    assert_eq!(journal_stats(&daemon)["lastSeq"], last);
}
