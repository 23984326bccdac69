//! The outbox end to end: the real daemon and the fixture plugin's send hook (which records what
//! it takes in a file, and can fail or dawdle as its account's config says), `POST /v1/messages`
//! over real HTTP, `channeld send` and `channeld messages`, and a `kill -9` with sends in flight.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::util::{
    self, agent,
    daemon::{Daemon, PATIENCE},
};

/// A fixture daemon: `outbox` is the `[outbox]` table's body, `accounts` the fixture's account
/// tables (each gets `send_log = "<root>/<account>.sends"`).
fn fixture_daemon(outbox: &str, accounts: &[(&str, &str)]) -> Daemon {
    let mut daemon = Daemon::prepare(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "",
    );
    let mut config = format!(
        "[host]\napi_address = \"127.0.0.1:0\"\n[supervisor]\nstop_timeout = \"2s\"\n\
         [outbox]\n{outbox}\n"
    );
    for (account, table) in accounts {
        let log = daemon.root().join(format!("{account}.sends"));
        config.push_str(&format!(
            "[channels.fixture.accounts.{account}]\nsend_log = \"{}\"\n{table}\n",
            log.display()
        ));
    }
    fs::write(&daemon.config, config).unwrap();
    daemon.start_again(&[]);
    for (account, _) in accounts {
        daemon.wait_for_account("fixture", account, |s| s["running"] == true);
    }
    daemon
}

/// What the fixture's send hook took for `account`: (conversation, text) in order.
fn sends(daemon: &Daemon, account: &str) -> Vec<(String, String)> {
    let text =
        fs::read_to_string(daemon.root().join(format!("{account}.sends"))).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut f = l.split('\t');
            let _account = f.next();
            (
                f.next().unwrap_or_default().to_owned(),
                f.next().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// An API call; its status and JSON body.
fn api(daemon: &Daemon, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (addr, token) = daemon.api();
    let url = format!("http://{addr}{path}");
    let auth = format!("Bearer {token}");
    let agent = agent();
    let result = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
        ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
        (_, Some(body)) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(body),
        (_, None) => agent.post(&url).header("Authorization", &auth).send_empty(),
    };
    let mut response = result.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

/// `POST /v1/messages` from fixture:`account`; the status and body.
fn post(daemon: &Daemon, account: &str, conversation: &str, text: &str) -> (u16, Value) {
    let body = json!({ "channel": "fixture", "account": account,
                       "conversation": conversation, "text": text });
    api(daemon, "POST", "/v1/messages", Some(body))
}

/// Posts and expects 202; the id.
fn accepted(daemon: &Daemon, account: &str, conversation: &str, text: &str) -> u64 {
    let (status, body) = post(daemon, account, conversation, text);
    assert_eq!(status, 202, "{body}");
    body["id"].as_u64().unwrap()
}

fn message(daemon: &Daemon, id: u64) -> Value {
    let (status, body) = api(daemon, "GET", &format!("/v1/messages/{id}"), None);
    assert_eq!(status, 200, "{body}");
    body["message"].clone()
}

/// Polls message `id` until it is in a final state; that state's message.
fn wait_final(daemon: &Daemon, id: u64) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = message(daemon, id);
        if ["sent", "failed", "cancelled"].contains(&m["state"].as_str().unwrap_or("")) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "message {id} never finished: {m}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cli_ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_send_reaches_the_fixtures_send_hook() {
    let daemon = fixture_daemon("", &[("a", "")]);
    let out = cli_ok(&daemon, &["send", "fixture:a", "room", "hello", "--wait"]);
    assert!(
        out.contains("sent") && out.contains("sent:room:hello"),
        "{out}"
    );
    assert_eq!(sends(&daemon, "a"), [("room".into(), "hello".into())]);
    let listed = cli_ok(&daemon, &["messages", "--state", "sent", "--json"]);
    let m: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(
        (&m["state"], &m["messageId"], &m["attempts"]),
        (&json!("sent"), &json!("sent:room:hello"), &json!(1))
    );
    // An unknown account or channel is refused, named.
    let (status, body) = post(&daemon, "nobody", "room", "x");
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("fixture:nobody"),
        "{body}"
    );
    let out = daemon.cli(&["send", "nochannel:a", "room", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown channel"));
}

#[test]
fn an_idempotent_send_happens_once() {
    let daemon = fixture_daemon("", &[("a", "")]);
    let first = cli_ok(
        &daemon,
        &["send", "fixture:a", "room", "once", "--key", "k1", "--json"],
    );
    let first: Value = serde_json::from_str(first.trim()).unwrap();
    assert_eq!(first["duplicate"], false);
    let again = cli_ok(
        &daemon,
        &["send", "fixture:a", "room", "once", "--key", "k1", "--json"],
    );
    let again: Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(
        (&again["id"], &again["duplicate"]),
        (&first["id"], &json!(true))
    );
    // A later message of the same conversation goes after it: once it is sent, so is the first.
    let marker = accepted(&daemon, "a", "room", "marker");
    assert_eq!(wait_final(&daemon, marker)["state"], "sent");
    assert_eq!(
        sends(&daemon, "a"),
        [
            ("room".into(), "once".into()),
            ("room".into(), "marker".into())
        ]
    );
    let (_, list) = api(&daemon, "GET", "/v1/messages", None);
    assert_eq!(list["messages"].as_array().unwrap().len(), 2, "{list}");
}

#[test]
fn a_send_queued_while_the_account_is_stopped_goes_out_after_start() {
    let daemon = fixture_daemon("poll_interval = \"20ms\"", &[("a", "")]);
    cli_ok(&daemon, &["stop", "fixture:a"]);
    let id = accepted(&daemon, "a", "room", "later");
    // Several sender passes happen meanwhile (20 ms each); the account is not running.
    std::thread::sleep(Duration::from_millis(200));
    let m = message(&daemon, id);
    assert_eq!(
        (&m["state"], &m["attempts"]),
        (&json!("queued"), &json!(0)),
        "{m}"
    );
    let queued = cli_ok(&daemon, &["messages", "--state", "queued"]);
    assert!(queued.starts_with(&format!("{id}\t")), "{queued}");
    assert!(sends(&daemon, "a").is_empty());
    cli_ok(&daemon, &["start", "fixture:a"]);
    assert_eq!(wait_final(&daemon, id)["state"], "sent");
    assert_eq!(sends(&daemon, "a"), [("room".into(), "later".into())]);
}

#[test]
fn a_failing_send_is_retried_then_marked_failed_with_its_reason() {
    let daemon = fixture_daemon(
        "retry_initial = \"10ms\"\nretry_max = \"40ms\"\ndeadline = \"2s\"",
        &[("a", "send_fail = 1000000")],
    );
    let out = daemon.cli(&["send", "fixture:a", "room", "doomed", "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", daemon.log());
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["state"], "failed");
    let attempts = m["attempts"].as_u64().unwrap();
    assert!(attempts >= 3, "retried: {m}");
    // The plugin's last error, as it is or (when the deadline passed while the retry waited for
    // a sender pass, as on a loaded machine) after "not sent within the deadline; last error: ".
    let error = m["error"].as_str().unwrap();
    let last = error
        .strip_prefix("not sent within the deadline; last error: ")
        .unwrap_or(error);
    assert!(
        last.starts_with("fixture send failure ") && last.contains(" of 1000000"),
        "the plugin's last error: {m}"
    );
    let failed = cli_ok(&daemon, &["messages", "--state", "failed"]);
    assert!(failed.contains("fixture send failure"), "{failed}");
    assert!(sends(&daemon, "a").is_empty());
}

#[test]
fn per_conversation_order_holds_under_retries() {
    let daemon = fixture_daemon(
        "retry_initial = \"5ms\"\nretry_max = \"20ms\"",
        &[("a", "send_fail = 3\nsend_fail_matching = \"!\"")],
    );
    // Every third message fails three times before it goes; the ones after it wait for it.
    let text =
        |room: &str, i: usize| format!("{room}-{i}{}", if i.is_multiple_of(3) { "!" } else { "" });
    let mut last = BTreeMap::new();
    for i in 0..8 {
        for room in ["r1", "r2"] {
            last.insert(room, accepted(&daemon, "a", room, &text(room, i)));
        }
    }
    for id in last.values() {
        assert_eq!(wait_final(&daemon, *id)["state"], "sent");
    }
    let sent = sends(&daemon, "a");
    for room in ["r1", "r2"] {
        let texts: Vec<&str> = sent
            .iter()
            .filter(|(c, _)| c == room)
            .map(|(_, t)| t.as_str())
            .collect();
        let expected: Vec<String> = (0..8).map(|i| text(room, i)).collect();
        assert_eq!(texts, expected, "{room}");
    }
}

#[test]
fn a_queued_message_can_be_cancelled() {
    let daemon = fixture_daemon("", &[("a", "")]);
    cli_ok(&daemon, &["stop", "fixture:a"]);
    let first = accepted(&daemon, "a", "room", "never");
    let second = accepted(&daemon, "a", "room", "yes");
    let out = cli_ok(&daemon, &["messages", &first.to_string(), "--cancel"]);
    assert!(out.contains("cancelled"), "{out}");
    // Only a queued message can be cancelled.
    let (status, body) = api(&daemon, "DELETE", &format!("/v1/messages/{first}"), None);
    assert_eq!(status, 409, "{body}");
    let (status, _) = api(&daemon, "DELETE", "/v1/messages/999999", None);
    assert_eq!(status, 404);
    cli_ok(&daemon, &["start", "fixture:a"]);
    assert_eq!(wait_final(&daemon, second)["state"], "sent");
    assert_eq!(message(&daemon, first)["state"], "cancelled");
    assert_eq!(sends(&daemon, "a"), [("room".into(), "yes".into())]);
}

#[test]
fn the_caps_refuse_with_429_and_a_clear_error() {
    let daemon = fixture_daemon(
        "max_queued_per_account = 2\nmax_queued = 3",
        &[("a", ""), ("b", "")],
    );
    cli_ok(&daemon, &["stop", "fixture"]);
    accepted(&daemon, "a", "room", "1");
    accepted(&daemon, "a", "room", "2");
    let (status, body) = post(&daemon, "a", "room", "3");
    assert_eq!(status, 429, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("fixture:a") && error.contains("max_queued_per_account is 2"),
        "{error}"
    );
    accepted(&daemon, "b", "room", "1");
    let (status, body) = post(&daemon, "b", "room", "2");
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max_queued is 3"),
        "{body}"
    );
    let out = daemon.cli(&["send", "fixture:b", "room", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 429"));
    // Once they are sent there is room again.
    cli_ok(&daemon, &["start", "fixture"]);
    let deadline = Instant::now() + PATIENCE;
    while api(&daemon, "GET", "/v1/outbox", None).1["outbox"]["waiting"] != 0 {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    accepted(&daemon, "b", "room", "2");
}

/// Lines of `path` (the fixture's send log).
fn lines(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn every_accepted_message_is_sent_after_a_kill_9_at_least_once() {
    // Slow sends (200 ms, 4 conversations side by side: 20 a second): however slowly a loaded
    // machine posts the 60, most are still queued when the kill comes.
    let mut daemon = fixture_daemon("", &[("a", "send_delay_ms = 200")]);
    let log = daemon.root().join("a.sends");
    let mut texts = Vec::new();
    for i in 0..60 {
        let text = format!("m{i}");
        accepted(&daemon, "a", &format!("room{}", i % 4), &text);
        texts.push(text);
    }
    // Some are sent, some in flight, the rest queued.
    let deadline = Instant::now() + PATIENCE;
    while lines(&log) < 8 {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon.kill();
    let before = lines(&log);
    assert!(before < texts.len(), "the kill came before every send");
    daemon.start_again(&[]);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, body) = api(&daemon, "GET", "/v1/messages?state=sent", None);
        if body["messages"].as_array().map_or(0, Vec::len) == texts.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{body}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = sends(&daemon, "a");
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, text) in &sent {
        *counts.entry(text.as_str()).or_default() += 1;
    }
    for text in &texts {
        assert!(counts.contains_key(text.as_str()), "{text} was never sent");
    }
    // At least once: a message the channel took just before the kill, whose outcome was not yet
    // recorded, is sent again, and counted.
    let duplicates = sent.len() - texts.len();
    let stats = api(&daemon, "GET", "/v1/outbox", None).1["outbox"].clone();
    let resent = stats["resentAfterRestart"].as_u64().unwrap() as usize;
    assert!(duplicates <= resent, "{duplicates} duplicates, {stats}");
}

/// A tiny HTTP endpoint for outgoing webhooks: records every request (head and body, raw) and
/// answers with the status `status` holds.
struct Sink {
    addr: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    /// When set (address, bearer token): each body is posted on to that webhook account, the
    /// way an outside system would relay it.
    forward: std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>,
}

impl Sink {
    fn start() -> Self {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(202));
        let forward = std::sync::Arc::new(std::sync::Mutex::new(None::<(String, String)>));
        let (seen, answer, relay) = (requests.clone(), status.clone(), forward.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let relay_to = relay.lock().unwrap().clone();
                if let Some((addr, token)) = relay_to {
                    let (status, text) = {
                        let mut r = agent()
                            .post(format!("http://{addr}/messages"))
                            .header("Authorization", format!("Bearer {token}"))
                            .send(&body[..])
                            .unwrap();
                        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
                    };
                    assert_eq!(status, 202, "{text}");
                }
                seen.lock()
                    .unwrap()
                    .push(format!("{head}\r\n{}", String::from_utf8_lossy(&body)));
                let code = answer.load(std::sync::atomic::Ordering::Relaxed);
                let reply = if code == 202 {
                    "{\"accepted\":true,\"seq\":7}".to_owned()
                } else {
                    format!("boom {}", "x".repeat(1000))
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        Self {
            addr,
            requests,
            status,
            forward,
        }
    }
}

#[test]
fn a_webhook_account_posts_outbound_messages_with_its_outgoing_secret_only() {
    let sink = Sink::start();
    let mut daemon = Daemon::prepare(
        &[("webhook.so", util::plugin_file("channeld-plugin-webhook"))],
        "",
        "",
    );
    fs::write(
        &daemon.config,
        format!(
            "[host]\napi_address = \"127.0.0.1:0\"\n\
             [outbox]\nretry_initial = \"10ms\"\nretry_max = \"20ms\"\ndeadline = \"2s\"\n\
             [channels.webhook.accounts.out]\nlisten = \"127.0.0.1:0\"\nsecret = \"in-secret\"\n\
             outgoing_url = \"http://{}/hook\"\noutgoing_secret = \"out-secret\"\n",
            sink.addr
        ),
    )
    .unwrap();
    daemon.start_again(&[]);
    daemon.wait_for_account("webhook", "out", |s| s["running"] == true);
    let body = json!({ "channel": "webhook", "account": "out", "conversation": "alerts",
                       "text": "hello", "extra": { "origin": "test" } });
    let (status, answer) = api(&daemon, "POST", "/v1/messages", Some(body.clone()));
    assert_eq!(status, 202, "{answer}");
    let m = wait_final(&daemon, answer["id"].as_u64().unwrap());
    assert_eq!(
        (&m["state"], &m["messageId"]),
        (&json!("sent"), &json!("7")),
        "{m}"
    );
    let requests = sink.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = &requests[0];
    assert!(request.starts_with("POST /hook "), "{request}");
    assert!(
        request.contains("authorization: Bearer out-secret\r\n")
            || request.contains("Authorization: Bearer out-secret\r\n"),
        "{request}"
    );
    assert!(
        !request.contains("in-secret"),
        "the inbound secret leaked: {request}"
    );
    let sent: Value = serde_json::from_str(request.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        sent,
        json!({ "conversation": "alerts", "sender": "out", "text": "hello",
                "extra": { "origin": "test" } })
    );
    // A non-2xx answer is a failed send, with the status and the start of the body.
    sink.status.store(500, std::sync::atomic::Ordering::Relaxed);
    let (_, answer) = api(&daemon, "POST", "/v1/messages", Some(body));
    let m = wait_final(&daemon, answer["id"].as_u64().unwrap());
    assert_eq!(m["state"], "failed", "{m}");
    let error = m["error"].as_str().unwrap();
    assert!(error.contains("answered 500: boom xxx"), "{error}");
    assert!(error.len() < 400, "only the start of the body: {error}");
}

#[test]
fn a_gateway_of_three_members_turns_one_message_into_two_sends() {
    let daemon = fixture_daemon(
        "",
        &[
            ("a", "mode = \"deliver_one\""),
            ("b", ""),
            ("c", ""),
            (
                "d",
                "[[gateways]]\nname = \"trio\"\nmembers = [\n\
                 { account = \"fixture:a\", conversation = \"room\" },\n\
                 { account = \"fixture:b\", conversation = \"room\", direction = \"inout\" },\n\
                 { account = \"fixture:c\", conversation = \"room\", template = \"{sender}@{channel}: {text}\" },\n]\n\
                 [[gateways]]\nname = \"elsewhere\"\nmembers = [{ account = \"irc:libera\", conversation = \"#x\" }]",
            ),
        ],
    );
    daemon.wait_for_log(
        "gateway \"elsewhere\": member irc:libera names channel \"irc\", which is not loaded",
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = api(&daemon, "GET", "/v1/outbox", None).1["outbox"].clone();
        if stats["bridged"] == 2 && stats["waiting"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{stats}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        sends(&daemon, "b"),
        [("room".into(), "[fixture] <fixture> one".into())]
    );
    assert_eq!(
        sends(&daemon, "c"),
        [("room".into(), "fixture@fixture: one".into())]
    );
    assert!(
        sends(&daemon, "a").is_empty(),
        "never back to where it came from"
    );
    let line = fs::read_to_string(daemon.root().join("b.sends")).unwrap();
    let extra: Value = serde_json::from_str(line.trim_end().rsplit('\t').next().unwrap()).unwrap();
    assert_eq!(
        extra,
        json!({ "gateway": { "name": "trio", "origin": "fixture:a/room", "hops": 1 } })
    );
}

#[test]
fn two_gateways_looped_through_webhooks_stop_at_the_hop_limit() {
    let (to_b, to_a) = (Sink::start(), Sink::start());
    let mut daemon = Daemon::prepare(
        &[("webhook.so", util::plugin_file("channeld-plugin-webhook"))],
        "",
        "",
    );
    let account = |name: &str, extra: &str| {
        format!(
            "[channels.webhook.accounts.{name}]\nlisten = \"127.0.0.1:0\"\nsecret = \"{name}-secret\"\n{extra}\n"
        )
    };
    let gateway = |name: &str, from: &str, to: &str| {
        format!(
            "[[gateways]]\nname = \"{name}\"\nmembers = [\n\
             {{ account = \"webhook:{from}\", conversation = \"c\", direction = \"in\" }},\n\
             {{ account = \"webhook:{to}\", conversation = \"c\", direction = \"out\", template = \"{{text}}\" }},\n]\n"
        )
    };
    fs::write(
        &daemon.config,
        format!(
            "[host]\napi_address = \"127.0.0.1:0\"\n{}{}{}{}{}{}",
            account("ain", ""),
            account(
                "aout",
                &format!("outgoing_url = \"http://{}/hook\"", to_b.addr)
            ),
            account("bin", ""),
            account(
                "bout",
                &format!("outgoing_url = \"http://{}/hook\"", to_a.addr)
            ),
            gateway("g1", "ain", "aout"),
            gateway("g2", "bin", "bout"),
        ),
    )
    .unwrap();
    daemon.start_again(&[]);
    let listen = |name: &str| {
        let s = daemon.wait_for_account("webhook", name, |s| s["listen_addr"].is_string());
        s["listen_addr"].as_str().unwrap().to_owned()
    };
    // The outside world: what aout posts reaches bin, what bout posts reaches ain.
    *to_b.forward.lock().unwrap() = Some((listen("bin"), "bin-secret".into()));
    *to_a.forward.lock().unwrap() = Some((listen("ain"), "ain-secret".into()));
    let ain = listen("ain");
    let (status, body) = {
        let mut r = agent()
            .post(format!("http://{ain}/messages"))
            .header("Authorization", "Bearer ain-secret")
            .send(json!({ "conversation": "c", "sender": "ada", "text": "ping" }).to_string())
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = api(&daemon, "GET", "/v1/outbox", None).1["outbox"].clone();
        if stats["hopLimitStops"] == 1 && stats["waiting"] == 0 {
            assert_eq!(stats["sent"], 3, "{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "{stats}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Hop limit 3: aout, bout, aout again; the fourth arrival is stopped (and counted).
    let (b, a) = (
        to_b.requests.lock().unwrap().len(),
        to_a.requests.lock().unwrap().len(),
    );
    assert_eq!((b, a), (2, 1));
    daemon.wait_for_log("reached the hop limit (3); not bridged again");
}

#[test]
fn a_removed_accounts_queued_messages_fail_with_account_removed() {
    let daemon = fixture_daemon("", &[("keep", ""), ("gone", "")]);
    // Stopped by a user, so its message stays queued.
    cli_ok(&daemon, &["stop", "fixture:gone"]);
    let queued = accepted(&daemon, "gone", "room", "never sent");
    assert_eq!(message(&daemon, queued)["state"], "queued");
    // The config without `gone`, applied by a reload.
    let text = fs::read_to_string(&daemon.config).unwrap();
    let start = text.find("[channels.fixture.accounts.gone]").unwrap();
    let end = text[start + 1..]
        .find("[channels.")
        .map_or(text.len(), |i| start + 1 + i);
    fs::write(
        &daemon.config,
        format!("{}{}", &text[..start], &text[end..]),
    )
    .unwrap();
    cli_ok(&daemon, &["reload"]);
    let m = wait_final(&daemon, queued);
    assert_eq!(m["state"], "failed", "{m}");
    assert_eq!(m["error"], "account removed", "{m}");
    assert!(sends(&daemon, "gone").is_empty());
    // The other account still sends.
    let id = accepted(&daemon, "keep", "room", "still here");
    assert_eq!(wait_final(&daemon, id)["state"], "sent");
}

#[test]
fn concurrent_accepts_each_get_their_own_message_and_every_one_is_sent_once_in_order() {
    // Accepts made at the same moment share a commit: each caller must still get its own id,
    // the same idempotency key must still mean one message, and nothing may be lost.
    let daemon = fixture_daemon("", &[("a", ""), ("b", "")]);
    let threads = 8;
    let each = 20;
    let posted: Vec<(u64, String, String, String)> = std::thread::scope(|scope| {
        let daemon = &daemon;
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..each {
                        let account = if (t + i) % 2 == 0 { "a" } else { "b" };
                        let conversation = format!("room{}", i % 4);
                        let text = format!("t{t} m{i}");
                        let id = accepted(daemon, account, &conversation, &text);
                        mine.push((id, account.to_owned(), conversation, text));
                    }
                    // Every thread also posts the same key: one message between them.
                    let body = json!({ "channel": "fixture", "account": "a",
                                       "conversation": "keyed", "text": "once",
                                       "idempotencyKey": "the-one" });
                    let (status, answer) = api(daemon, "POST", "/v1/messages", Some(body));
                    assert_eq!(status, 202, "{answer}");
                    mine.push((
                        answer["id"].as_u64().unwrap(),
                        "a".to_owned(),
                        "keyed".to_owned(),
                        "once".to_owned(),
                    ));
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let mut unique = BTreeMap::new();
    for (id, account, conversation, text) in &posted {
        if let Some(seen) = unique.insert(*id, (account, conversation, text)) {
            assert_eq!(seen, (account, conversation, text), "id {id} given twice");
        }
    }
    assert_eq!(unique.len(), threads * each + 1, "one message per key");
    for (id, (account, conversation, text)) in &unique {
        let m = wait_final(&daemon, *id);
        assert_eq!(
            (&m["state"], &m["account"], &m["conversation"], &m["text"]),
            (
                &json!("sent"),
                &json!(account),
                &json!(conversation),
                &json!(text)
            ),
            "message {id}"
        );
    }
    // Each sent once, and per conversation in the order of the ids.
    for account in ["a", "b"] {
        let expected: Vec<(String, String)> = unique
            .values()
            .filter(|(a, _, _)| a.as_str() == account)
            .map(|(_, c, t)| ((*c).clone(), (*t).clone()))
            .collect();
        let took = sends(&daemon, account);
        assert_eq!(took.len(), expected.len(), "{account}: {took:?}");
        for conversation in ["room0", "room1", "room2", "room3", "keyed"] {
            let of = |list: &[(String, String)]| -> Vec<String> {
                list.iter()
                    .filter(|(c, _)| c == conversation)
                    .map(|(_, t)| t.clone())
                    .collect()
            };
            assert_eq!(of(&took), of(&expected), "{account} {conversation}");
        }
    }
}

/// The crash between the journal's commit of a gateway member's message and the outbox's
/// insert of its bridged copies, forced with the daemon's test-only exit hook: the next start
/// routes the journal again after the bridging mark, and the copy is sent exactly once (also
/// after a further restart).
#[test]
fn a_crash_between_the_journal_and_the_bridging_is_repaired_at_the_next_start() {
    let mut daemon = Daemon::prepare(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "",
    );
    let root = daemon.root().to_owned();
    let config = |a_mode: &str| {
        format!(
            "[host]\napi_address = \"127.0.0.1:0\"\n[supervisor]\nstop_timeout = \"2s\"\n\
             [channels.fixture.accounts.a]\nsend_log = \"{a}\"\n{a_mode}\n\
             [channels.fixture.accounts.b]\nsend_log = \"{b}\"\n\
             [[gateways]]\nname = \"pair\"\nmembers = [\n\
             {{ account = \"fixture:a\", conversation = \"room\" }},\n\
             {{ account = \"fixture:b\", conversation = \"room\" }},\n]\n",
            a = root.join("a.sends").display(),
            b = root.join("b.sends").display(),
        )
    };
    // `a` delivers one message at its start; the daemon ends once the journal has it.
    fs::write(&daemon.config, config("mode = \"deliver_one\"")).unwrap();
    daemon.start_again(&[("CHANNELD_TEST_EXIT_BEFORE_BRIDGING", "1")]);
    let status = daemon.wait_for_exit();
    assert_eq!(status.code(), Some(86), "{}", daemon.log());
    assert!(
        daemon.log().contains("exiting before bridging"),
        "{}",
        daemon.log()
    );
    assert!(sends(&daemon, "b").is_empty(), "nothing was bridged");
    // The next start (where `a` delivers nothing) bridges the journaled message once.
    fs::write(&daemon.config, config("")).unwrap();
    daemon.start_again(&[]);
    daemon.wait_for_log("routed again at startup");
    let settled = |daemon: &Daemon, sent: usize| {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let stats = api(daemon, "GET", "/v1/outbox", None).1["outbox"].clone();
            if stats["waiting"] == 0 && sends(daemon, "b").len() >= sent {
                return stats;
            }
            assert!(Instant::now() < deadline, "{stats}\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let stats = settled(&daemon, 1);
    assert_eq!(stats["bridged"], 1, "{stats}");
    let once = [("room".to_owned(), "[fixture] <fixture> one".to_owned())];
    assert_eq!(sends(&daemon, "b"), once);
    assert!(
        sends(&daemon, "a").is_empty(),
        "never back to where it came from"
    );
    // A message bridged live, then a clean stop: the mark is written at the shutdown, so the
    // next start routes nothing again.
    let live = |daemon: &mut Daemon, sent: usize| {
        daemon.terminate();
        fs::write(&daemon.config, config("mode = \"deliver_one\"")).unwrap();
        daemon.start_again(&[]);
        // Waiting for none waiting: the send's outcome is committed (not sent again).
        let stats = settled(daemon, sent);
        assert_eq!(stats["bridged"], 1, "{stats}");
    };
    let quiet_start = |daemon: &mut Daemon| {
        fs::write(&daemon.config, config("")).unwrap();
        daemon.start_again(&[]);
        // Accounts start only after the routing again: once `b` runs, any copy is queued.
        daemon.wait_for_account("fixture", "b", |s| s["running"] == true);
    };
    live(&mut daemon, 2);
    daemon.terminate();
    quiet_start(&mut daemon);
    assert!(
        !daemon.log().contains("routed again at startup"),
        "{}",
        daemon.log()
    );
    // The same, then `kill -9`: the mark written lags behind the message (it goes with the
    // outbox's next commit), so it is routed again at the start, and the copy's idempotency key
    // keeps it from being queued twice.
    live(&mut daemon, 3);
    daemon.kill();
    quiet_start(&mut daemon);
    let log = daemon.wait_for_log("routed again at startup");
    assert!(log.contains("queued=0 duplicates=1"), "{log}");
    let stats = settled(&daemon, 3);
    assert_eq!(stats["bridged"], 0, "{stats}");
    assert_eq!(sends(&daemon, "b"), vec![once[0].clone(); 3]);
}
