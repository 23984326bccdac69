//! The `irc` plugin against a real ngircd: inbound to the event stream through the real daemon,
//! `channeld send`, a 2,000-byte message split into lines, a gateway bridging IRC and MQTT exactly
//! once, a `kill -9` of the server with a restart on the same port (sends of the outage arriving
//! after it), the health monitor restarting an account whose server is stopped (`SIGSTOP`), and
//! TLS with a private CA (`ca_file`).

use std::time::{Duration, Instant};

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE},
    events::Events,
    events::outbox_idle,
    servers::{IrcClient, Mosquitto, Ngircd, TestCerts, signal, signal_pid},
};

fn irc_plugin() -> std::path::PathBuf {
    util::plugin_file("channeld-plugin-irc")
}

/// A daemon with one irc account per `(account, port, extra settings)`, and `extra` config.
fn daemon(accounts: &[(&str, u16, &str)], extra: &str) -> Daemon {
    let mut body = format!("{extra}\n");
    for (account, port, settings) in accounts {
        body.push_str(&format!(
            "[channels.irc.accounts.{account}]\nserver = \"127.0.0.1\"\nport = {port}\n\
             nick = \"channeld-{account}\"\nchannels = [\"#test\"]\n{settings}\n"
        ));
    }
    Daemon::start(&[("irc.so", irc_plugin())], "", &body, &[])
}

fn connected(daemon: &Daemon, account: &str) {
    daemon.wait_for_account("irc", account, |s| s["connected"] == true);
}

#[test]
fn a_privmsg_in_a_joined_channel_and_to_the_nick_reach_the_event_stream() {
    let server = Ngircd::start();
    let daemon = daemon(&[("main", server.port, "")], "");
    connected(&daemon, "main");
    let events = Events::connect(&daemon, "?channel=irc");
    let mut ada = IrcClient::connect(server.port, "ada");
    ada.join("#test");
    ada.say("PRIVMSG #test :hello from ada");
    let m = events.next_message();
    assert_eq!(
        (
            m["account"].as_str(),
            m["conversation"].as_str(),
            m["sender"].as_str(),
            m["text"].as_str()
        ),
        (
            Some("main"),
            Some("#test"),
            Some("ada"),
            Some("hello from ada")
        )
    );
    ada.say("PRIVMSG channeld-main :just to you");
    let m = events.next_message();
    assert_eq!(
        (m["conversation"].as_str(), m["text"].as_str()),
        (Some("ada"), Some("just to you")),
        "a private message's conversation is the sender's nick"
    );
}

#[test]
fn a_send_arrives_and_a_2000_byte_message_arrives_complete_in_order_in_lines() {
    let server = Ngircd::start();
    let mut bob = IrcClient::connect(server.port, "bob");
    bob.join("#test");
    let daemon = daemon(
        &[(
            "main",
            server.port,
            "flood_burst = 2\nflood_interval_ms = 50",
        )],
        "",
    );
    connected(&daemon, "main");

    send(&daemon, "#test", "hello");
    let line = bob.wait_for(|l| l.contains(" PRIVMSG #test "));
    assert!(line.starts_with(":channeld-main!"), "{line}");
    assert!(line.ends_with(" PRIVMSG #test :hello"), "{line}");

    // 2,000 bytes with multi-byte characters, so a cut inside one would show.
    let text = "é€abc".repeat(250);
    assert_eq!(text.len(), 2000);
    send(&daemon, "#test", &text);
    let mut got = String::new();
    let mut lines = 0;
    while got.len() < text.len() {
        let line = bob.wait_for(|l| l.contains(" PRIVMSG #test "));
        assert!(
            line.len() + 2 <= 512,
            "a line over the limit: {}",
            line.len()
        );
        got.push_str(line.split_once(" PRIVMSG #test :").unwrap().1);
        lines += 1;
    }
    assert_eq!(got, text, "complete and in order");
    assert!(lines >= 5, "split into lines: {lines}");
}

/// `channeld send irc:main CONVERSATION TEXT`; panics unless the outbox accepted it.
fn send(daemon: &Daemon, conversation: &str, text: &str) {
    let out = daemon.cli(&["send", "irc:main", conversation, text]);
    assert!(
        out.status.success(),
        "channeld send failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
}

/// The lines `client` receives before the answer to a `NAMES` it asks now: the server answers in
/// order, so whatever it had for the client before the question is in them.
fn lines_before_names(client: &mut IrcClient, channel: &str) -> Vec<String> {
    client.say(&format!("NAMES {channel}"));
    let mut lines = Vec::new();
    loop {
        let line = client.next_line();
        match line.split(' ').nth(1) {
            Some("353") => {}
            Some("366") => return lines,
            _ => lines.push(line),
        }
    }
}

#[test]
fn a_gateway_bridges_irc_and_mqtt_exactly_once_without_echo() {
    let server = Ngircd::start();
    let broker = Mosquitto::start();
    let subscriber = broker.subscribe("chat/test");
    let mut ada = IrcClient::connect(server.port, "ada");
    ada.join("#test");
    let body = format!(
        "[channels.irc.accounts.main]\nserver = \"127.0.0.1\"\nport = {}\n\
         nick = \"channeld-main\"\nchannels = [\"#test\"]\n\
         [channels.mqtt.accounts.main]\nhost = \"127.0.0.1\"\nport = {}\n\
         client_id = \"channeld-main\"\ntopics = [{{ filter = \"chat/#\", qos = 1 }}]\n\
         [[gateways]]\nname = \"bridge\"\nmembers = [\n\
         {{ account = \"irc:main\", conversation = \"#test\" }},\n\
         {{ account = \"mqtt:main\", conversation = \"chat/test\" }},\n]\n",
        server.port, broker.port
    );
    let daemon = Daemon::start(
        &[
            ("irc.so", irc_plugin()),
            ("mqtt.so", util::plugin_file("channeld-plugin-mqtt")),
        ],
        "",
        &body,
        &[],
    );
    connected(&daemon, "main");
    daemon.wait_for_account("mqtt", "main", |s| s["connected"] == true);

    // IRC → MQTT.
    ada.say("PRIVMSG #test :from irc");
    let first = subscriber.next();
    assert!(
        first.starts_with("chat/test ") && first.contains("from irc"),
        "{first}"
    );
    outbox_idle(&daemon);
    let more: Vec<_> = subscriber
        .drain(Duration::from_millis(300))
        .into_iter()
        .filter(|l| l.contains("from irc"))
        .collect();
    assert!(
        more.is_empty(),
        "bridged more than once: {first} then {more:?}"
    );
    let back = lines_before_names(&mut ada, "#test");
    assert!(
        !back.iter().any(|l| l.contains("from irc")),
        "echoed to the origin: {back:?}"
    );

    // MQTT → IRC.
    broker.publish(&["-q", "1", "-t", "chat/test", "-m", "from mqtt"], None);
    let line = ada.wait_for(|l| l.contains(" PRIVMSG #test "));
    assert!(
        line.starts_with(":channeld-main!") && line.contains("from mqtt"),
        "{line}"
    );
    outbox_idle(&daemon);
    let more = lines_before_names(&mut ada, "#test");
    assert!(
        !more.iter().any(|l| l.contains(" PRIVMSG ")),
        "bridged more than once: {line} then {more:?}"
    );
    // The subscriber sees the test's own publish once; an echo from channeld would be a second.
    let seen: Vec<_> = subscriber
        .drain(Duration::from_millis(300))
        .into_iter()
        .filter(|l| l.contains("from mqtt"))
        .collect();
    assert_eq!(seen, ["chat/test from mqtt"], "echoed to the origin");
}

#[test]
fn after_a_kill_9_of_the_server_the_account_comes_back_as_exactly_one_client() {
    let mut server = Ngircd::start();
    let daemon = daemon(
        &[("main", server.port, "")],
        "[supervisor]\ninitial_backoff = \"500ms\"\nmax_backoff = \"1s\"\n",
    );
    connected(&daemon, "main");
    // Once connected, the stream hears every state change the board makes from then on.
    let events = Events::connect(&daemon, "?channel=irc");
    server.kill();
    // Sent during the outage: the outbox holds them until the account is connected again.
    let outage = ["during 1", "during 2", "during 3"];
    for text in outage {
        send(&daemon, "#test", text);
    }
    // running → restart-pending → starting → running with connected false, then true.
    let mut states: Vec<(String, Option<bool>)> = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let next_state = |states: &mut Vec<(String, Option<bool>)>| {
        assert!(Instant::now() < deadline, "states so far: {states:?}");
        let event = events.next();
        if event.event == "state" {
            states.push((
                event.data["to"].as_str().unwrap().to_owned(),
                event.data["connected"].as_bool(),
            ));
        }
    };
    // The stream has seen the outage before channeld is held, so the listener below joins while
    // the account waits for its restart.
    while !states.iter().any(|s| s.0 == "restart-pending") {
        next_state(&mut states);
    }
    // A listener must be in the channel before channeld is back, or it would miss the sends:
    // channeld is held (SIGSTOP) while the server restarts and the listener joins.
    signal_pid(daemon.pid(), libc::SIGSTOP);
    server.restart();
    let mut eve = IrcClient::connect(server.port, "eve");
    eve.join("#test");
    signal_pid(daemon.pid(), libc::SIGCONT);

    while states.last() != Some(&("running".to_owned(), Some(true))) || states.len() < 2 {
        next_state(&mut states);
    }
    // Every change is on the stream, in order: restart-pending as the task ends (never a
    // `stopped` in between: nobody stopped it), then starting and running (a restart made while
    // the server is still down fails and repeats them); the connection is false from the outage
    // on, then true.
    let mut changes: Vec<&str> = states.iter().map(|s| s.0.as_str()).collect();
    changes.dedup();
    assert!(
        changes
            .iter()
            .all(|s| ["restart-pending", "starting", "running"].contains(s)),
        "{states:?}"
    );
    assert!(
        changes.iter().position(|s| *s == "restart-pending")
            < changes.iter().position(|s| *s == "starting"),
        "restart-pending before starting: {states:?}"
    );
    assert!(
        changes.ends_with(&["restart-pending", "starting", "running"]),
        "running → restart-pending → starting → running: {states:?}"
    );
    let mut connected: Vec<Option<bool>> = states.iter().map(|s| s.1).collect();
    connected.dedup();
    assert_eq!(
        connected,
        [Some(false), Some(true)],
        "connected false, then true: {states:?}"
    );

    let got: Vec<String> = outage
        .iter()
        .map(|_| {
            let line = eve.wait_for(|l| l.contains(" PRIVMSG #test "));
            line.split_once(" PRIVMSG #test :").unwrap().1.to_owned()
        })
        .collect();
    assert_eq!(
        got, outage,
        "the outage's sends, after the reconnect, in order"
    );

    let names = eve.names("#test");
    let ours: Vec<_> = names.iter().filter(|n| n.starts_with("channeld")).collect();
    assert_eq!(
        ours,
        ["channeld-main"],
        "exactly one channeld client: {names:?}"
    );
}

#[test]
fn the_monitor_restarts_the_account_of_a_stopped_server_and_leaves_the_other_alone() {
    let stopped = Ngircd::start();
    let healthy = Ngircd::start();
    let daemon = daemon(
        &[
            ("frozen", stopped.port, "ping_timeout_secs = 600"),
            ("fine", healthy.port, "ping_timeout_secs = 2"),
        ],
        "[health]\ninterval = \"300ms\"\nstartup_grace = \"0s\"\nconnect_grace = \"5s\"\n\
         stale_event_threshold = \"3s\"\n",
    );
    connected(&daemon, "frozen");
    connected(&daemon, "fine");
    signal(stopped.child.as_ref().unwrap(), libc::SIGSTOP);
    daemon.wait_for_account("irc", "frozen", |s| s["healthRestartAt"].is_i64());
    signal(stopped.child.as_ref().unwrap(), libc::SIGCONT);
    // The reason from the restart's own log line: the status's verdict is the latest check's,
    // which a check during the restarted account's connect grace may have replaced already.
    let restart = daemon.wait_for_log("health monitor restarted the account");
    assert!(
        restart.contains("irc:frozen") && restart.contains("stale-socket"),
        "{restart}"
    );
    // The frozen account comes back once the server answers again.
    connected(&daemon, "frozen");
    let fine = daemon.account("irc", "fine");
    assert!(
        fine.get("healthRestartAt").is_none(),
        "the healthy account was restarted: {fine}"
    );
}

#[test]
fn over_tls_with_a_private_ca_a_privmsg_and_a_send_get_through() {
    let certs = TestCerts::new();
    let server = Ngircd::start_tls(&certs);
    let tls_port = server.tls_port.unwrap();
    let trusted = format!("tls = true\nca_file = \"{}\"", certs.ca.display());
    let daemon = daemon(
        &[
            ("main", tls_port, &trusted),
            ("untrusted", tls_port, "tls = true"),
        ],
        "",
    );
    connected(&daemon, "main");
    // Without `ca_file` the system's roots do not know the test's CA: the handshake fails.
    let untrusted = daemon.wait_for_account("irc", "untrusted", |s| {
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("certificate"))
    });
    assert_ne!(untrusted["connected"], true, "{untrusted}");

    // The test's client speaks plain IRC to the same server.
    let events = Events::connect(&daemon, "?channel=irc&account=main");
    let mut ada = IrcClient::connect(server.port, "ada");
    ada.join("#test");
    ada.say("PRIVMSG #test :hello over plain");
    let m = events.next_message();
    assert_eq!(m["text"], "hello over plain", "{m}");
    send(&daemon, "#test", "hello over tls");
    let line = ada.wait_for(|l| l.contains(" PRIVMSG #test "));
    assert!(
        line.starts_with(":channeld-main!") && line.ends_with(":hello over tls"),
        "{line}"
    );
}
