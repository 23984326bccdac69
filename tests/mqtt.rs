//! The `mqtt` plugin against a real mosquitto: a publish reaches the event stream through the real
//! daemon; `channeld send` publishes and its message never comes back as inbound; a restart's
//! every state (the short `starting` too) is on the stream; a `kill -9` of channeld in the middle
//! of a QoS 1 burst loses nothing; gateway hops travel as user properties; TLS with a private CA
//! (`ca_file`).

use std::time::{Duration, Instant};

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE},
    events::Events,
    servers::{Mosquitto, TestCerts},
};

/// The config of one mqtt account `main` on `broker`, subscribed to `chat/#` at QoS 1.
fn config(broker: &Mosquitto) -> String {
    format!(
        "[channels.mqtt.accounts.main]\nhost = \"127.0.0.1\"\nport = {}\n\
         client_id = \"channeld-main\"\nsession_expiry_secs = 3600\n\
         topics = [{{ filter = \"chat/#\", qos = 1 }}]\n",
        broker.port
    )
}

#[test]
fn a_publish_reaches_the_event_stream() {
    let broker = Mosquitto::start();
    let daemon = Daemon::start(
        &[("mqtt.so", util::plugin_file("channeld-plugin-mqtt"))],
        "",
        &config(&broker),
        &[],
    );
    daemon.wait_for_account("mqtt", "main", |s| s["connected"] == true);
    let events = Events::connect(&daemon, "?channel=mqtt");
    broker.publish(&["-q", "1", "-t", "chat/test", "-m", "hello broker"], None);
    let m = events.next_message();
    assert_eq!(
        (
            m["account"].as_str(),
            m["conversation"].as_str(),
            m["text"].as_str()
        ),
        (Some("main"), Some("chat/test"), Some("hello broker"))
    );
}

#[test]
fn a_send_is_published_and_never_comes_back_as_inbound() {
    let broker = Mosquitto::start();
    let subscriber = broker.subscribe("chat/test");
    let daemon = Daemon::start(
        &[("mqtt.so", util::plugin_file("channeld-plugin-mqtt"))],
        "",
        &config(&broker),
        &[],
    );
    daemon.wait_for_account("mqtt", "main", |s| s["connected"] == true);
    let events = Events::connect(&daemon, "?channel=mqtt");
    let out = daemon.cli(&["send", "mqtt:main", "chat/test", "from channeld"]);
    assert!(
        out.status.success(),
        "channeld send failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    assert_eq!(subscriber.next(), "chat/test from channeld");

    // The account is subscribed to chat/#: without no_local its own publish would come back as
    // inbound, before a publish from someone else made after it.
    broker.publish(&["-q", "1", "-t", "chat/test", "-m", "from someone"], None);
    let m = events.next_message();
    assert_eq!(
        m["text"].as_str(),
        Some("from someone"),
        "own publish echoed: {m}"
    );
}

#[test]
fn a_restart_is_on_the_stream_as_stopped_starting_running_then_connected() {
    let broker = Mosquitto::start();
    let daemon = Daemon::start(
        &[("mqtt.so", util::plugin_file("channeld-plugin-mqtt"))],
        "",
        &config(&broker),
        &[],
    );
    daemon.wait_for_account("mqtt", "main", |s| s["connected"] == true);
    let events = Events::connect(&daemon, "?channel=mqtt");
    for verb in ["stop", "start"] {
        assert!(daemon.cli(&[verb, "mqtt:main"]).status.success(), "{verb}");
    }
    let mut states: Vec<(String, Option<bool>)> = Vec::new();
    while states.last() != Some(&("running".to_owned(), Some(true))) {
        let event = events.next();
        if event.event == "state" {
            states.push((
                event.data["to"].as_str().unwrap().to_owned(),
                event.data["connected"].as_bool(),
            ));
        }
    }
    // `starting` lasts only until the plugin's runtime polls the task, yet it is on the stream.
    let mut changes: Vec<&str> = states.iter().map(|s| s.0.as_str()).collect();
    changes.dedup();
    assert!(
        changes.ends_with(&["stopped", "starting", "running"]),
        "{states:?}"
    );
    let stopped = states.iter().position(|s| s.0 == "stopped").unwrap();
    let mut connected: Vec<Option<bool>> = states[stopped..].iter().map(|s| s.1).collect();
    connected.dedup();
    assert_eq!(connected, [Some(false), Some(true)], "{states:?}");
}

#[test]
fn a_kill_9_of_channeld_in_a_qos1_burst_loses_no_message() {
    const BURST: usize = 300;
    let broker = Mosquitto::start();
    let mut daemon = Daemon::start(
        &[("mqtt.so", util::plugin_file("channeld-plugin-mqtt"))],
        "",
        &config(&broker),
        &[],
    );
    daemon.wait_for_account("mqtt", "main", |s| s["connected"] == true);
    let lines: String = (0..BURST).map(|i| format!("m{i}\n")).collect();
    let (first, second) = lines.split_at(lines.len() / 2);
    broker.publish(&["-q", "1", "-t", "chat/burst", "-l"], Some(first));
    daemon.kill();
    // Published while channeld is down: the broker keeps them in the session.
    broker.publish(&["-q", "1", "-t", "chat/burst", "-l"], Some(second));
    daemon.start_again(&[]);

    // Every message of the burst, replayed from the journal: each at least once.
    let events = Events::connect_after(&daemon, "?channel=mqtt", Some(0));
    let mut missing: std::collections::BTreeSet<String> =
        (0..BURST).map(|i| format!("m{i}")).collect();
    let deadline = Instant::now() + PATIENCE;
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "never journaled: {} of {BURST}: {missing:?}\n{}\nbroker:\n{}",
            missing.len(),
            daemon.log(),
            broker.log()
        );
        if let Some(event) = events.try_next(Duration::from_millis(200))
            && let Some(text) = event.data["text"].as_str()
        {
            missing.remove(text);
        }
    }
}

/// `GET /v1/outbox`'s figures.
fn outbox(daemon: &Daemon) -> serde_json::Value {
    let (addr, token) = daemon.api();
    let mut stats: serde_json::Value = ureq::get(format!("http://{addr}/v1/outbox"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    stats["outbox"].take()
}

/// Polls the outbox's figures until `done` holds for them and nothing waits; returns them.
fn outbox_settles(daemon: &Daemon, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = outbox(daemon);
        if done(&stats) && stats["waiting"] == 0 {
            return stats;
        }
        assert!(Instant::now() < deadline, "{stats}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn gateway_hops_travel_through_mqtt_so_a_loop_stops_at_the_hop_limit() {
    let broker = Mosquitto::start();
    let (on_a, on_b) = (broker.subscribe("loop/a"), broker.subscribe("loop/b"));
    // Two gateways looped through the broker: what `aout` publishes on loop/b arrives at `bin`,
    // bridged by g2 to `bout`, which publishes on loop/a, where `ain` hears it for g1.
    let account = |name: &str, topic: Option<&str>| {
        let topics = topic.map_or(String::new(), |t| {
            format!("topics = [{{ filter = \"{t}\", qos = 1 }}]\n")
        });
        format!(
            "[channels.mqtt.accounts.{name}]\nhost = \"127.0.0.1\"\nport = {}\n\
             client_id = \"channeld-{name}\"\nsession_expiry_secs = 3600\n{topics}",
            broker.port
        )
    };
    let gateway = |name: &str, from: &str, from_topic: &str, to: &str, to_topic: &str| {
        format!(
            "[[gateways]]\nname = \"{name}\"\nmembers = [\n\
             {{ account = \"mqtt:{from}\", conversation = \"{from_topic}\", direction = \"in\" }},\n\
             {{ account = \"mqtt:{to}\", conversation = \"{to_topic}\", direction = \"out\", template = \"{{text}}\" }},\n]\n"
        )
    };
    let body = [
        account("ain", Some("loop/a")),
        account("aout", None),
        account("bin", Some("loop/b")),
        account("bout", None),
        gateway("g1", "ain", "loop/a", "aout", "loop/b"),
        gateway("g2", "bin", "loop/b", "bout", "loop/a"),
    ]
    .concat();
    let daemon = Daemon::start(
        &[("mqtt.so", util::plugin_file("channeld-plugin-mqtt"))],
        "",
        &body,
        &[],
    );
    for name in ["ain", "aout", "bin", "bout"] {
        daemon.wait_for_account("mqtt", name, |s| s["connected"] == true);
    }

    // A publish that arrives with hops at the limit (3) is not bridged again.
    broker.publish(
        &[
            "-q",
            "1",
            "-t",
            "loop/a",
            "-m",
            "far travelled",
            "-D",
            "publish",
            "user-property",
            "origin",
            "irc:x/#y",
            "-D",
            "publish",
            "user-property",
            "hops",
            "3",
        ],
        None,
    );
    let stats = outbox_settles(&daemon, |s| s["hopLimitStops"] == 1);
    assert_eq!(stats["bridged"], 0, "{stats}");

    // A fresh publish goes round: aout, bout, aout again; the fourth arrival carries hops 3 and
    // is stopped. Without the hops read back on inbound it would go round for ever.
    broker.publish(&["-q", "1", "-t", "loop/a", "-m", "ping"], None);
    let stats = outbox_settles(&daemon, |s| s["hopLimitStops"] == 2);
    assert_eq!(
        (&stats["bridged"], &stats["sent"]),
        (&3.into(), &3.into()),
        "{stats}"
    );
    daemon.wait_for_log("reached the hop limit (3); not bridged again");
    let pings = |subscriber: &crate::util::servers::Subscriber| {
        subscriber
            .drain(Duration::from_millis(300))
            .into_iter()
            .filter(|l| l.ends_with(" ping"))
            .count()
    };
    // loop/a: the test's publish and bout's; loop/b: aout's two.
    assert_eq!(
        (pings(&on_a), pings(&on_b)),
        (2, 2),
        "three bridged publishes"
    );
}

#[test]
fn over_tls_with_a_private_ca_a_publish_and_a_send_get_through() {
    let certs = TestCerts::new();
    let broker = Mosquitto::start_tls(&certs);
    let tls_port = broker.tls_port.unwrap();
    // The test's clients use the broker's plain listener.
    let subscriber = broker.subscribe("chat/test");
    let body = format!(
        "[channels.mqtt.accounts.main]\nhost = \"127.0.0.1\"\nport = {tls_port}\ntls = true\n\
         ca_file = \"{}\"\nclient_id = \"channeld-main\"\n\
         topics = [{{ filter = \"chat/#\", qos = 1 }}]\n\
         [channels.mqtt.accounts.untrusted]\nhost = \"127.0.0.1\"\nport = {tls_port}\ntls = true\n\
         client_id = \"channeld-untrusted\"\n",
        certs.ca.display()
    );
    let daemon = Daemon::start(
        &[("mqtt.so", util::plugin_file("channeld-plugin-mqtt"))],
        "",
        &body,
        &[],
    );
    daemon.wait_for_account("mqtt", "main", |s| s["connected"] == true);
    // Without `ca_file` the system's roots do not know the test's CA: the handshake fails.
    let untrusted = daemon.wait_for_account("mqtt", "untrusted", |s| {
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("certificate"))
    });
    assert_ne!(untrusted["connected"], true, "{untrusted}");

    let events = Events::connect(&daemon, "?channel=mqtt&account=main");
    broker.publish(
        &["-q", "1", "-t", "chat/test", "-m", "hello over plain"],
        None,
    );
    assert_eq!(events.next_message()["text"], "hello over plain");
    let out = daemon.cli(&["send", "mqtt:main", "chat/test", "hello over tls"]);
    assert!(out.status.success(), "{}", daemon.log());
    assert_eq!(subscriber.next(), "chat/test hello over plain");
    assert_eq!(subscriber.next(), "chat/test hello over tls");
}
