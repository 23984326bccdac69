//! The `mqtt` plugin against a real mosquitto: a publish reaches the event stream through the real
//! daemon; a send publishes (in-process through the host's adapter until `channeld send` exists)
//! and never comes back as inbound; a `kill -9` of channeld in the middle of a QoS 1 burst loses
//! nothing.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE},
    events::Events,
    in_process::InProcess,
    servers::Mosquitto,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_published_and_never_comes_back_as_inbound() {
    let broker = Mosquitto::start();
    let subscriber = broker.subscribe("chat/test");
    let mqtt = InProcess::start(
        "mqtt",
        "channeld-plugin-mqtt",
        json!({ "main": {
            "host": "127.0.0.1", "port": broker.port, "client_id": "channeld-send",
            "topics": [{ "filter": "chat/#", "qos": 1 }],
        }}),
    );
    let _task = mqtt.start_account("main");
    mqtt.wait_connected("main");
    mqtt.send("main", "chat/test", "from channeld").await;
    let line = tokio::task::block_in_place(|| subscriber.next());
    assert_eq!(line, "chat/test from channeld");

    // The account is subscribed to chat/#: without no_local its own publish would be inbound.
    // A publish from someone else afterwards shows the subscription works, so a count of one
    // means the own one did not come back.
    broker.publish(&["-q", "1", "-t", "chat/test", "-m", "from someone"], None);
    let deadline = Instant::now() + PATIENCE;
    while mqtt.snapshot("main").inbound_messages < 1 {
        assert!(Instant::now() < deadline, "the other publish never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mqtt.snapshot("main").inbound_messages,
        1,
        "own publish echoed"
    );
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
