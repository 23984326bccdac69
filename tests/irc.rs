//! The `irc` plugin against a real ngircd: inbound to the event stream through the real daemon,
//! sends (in-process through the host's adapter until `channeld send` exists), a 2,000-byte
//! message split into lines, a `kill -9` of the server with a restart on the same port, and the
//! health monitor restarting an account whose server is stopped (`SIGSTOP`).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE},
    events::Events,
    in_process::InProcess,
    servers::{IrcClient, Ngircd, signal},
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_arrives_and_a_2000_byte_message_arrives_complete_in_order_in_lines() {
    let server = Ngircd::start();
    let mut bob = IrcClient::connect(server.port, "bob");
    bob.join("#test");
    let irc = InProcess::start(
        "irc",
        "channeld-plugin-irc",
        json!({ "main": {
            "server": "127.0.0.1", "port": server.port, "nick": "channeld",
            "channels": ["#test"], "flood_burst": 2, "flood_interval_ms": 50,
        }}),
    );
    let _task = irc.start_account("main");
    irc.wait_connected("main");

    irc.send("main", "#test", "hello").await;
    let line = tokio::task::block_in_place(|| bob.wait_for(|l| l.contains(" PRIVMSG #test ")));
    assert!(line.starts_with(":channeld!"), "{line}");
    assert!(line.ends_with(" PRIVMSG #test :hello"), "{line}");

    // 2,000 bytes with multi-byte characters, so a cut inside one would show.
    let text = "é€abc".repeat(250);
    assert_eq!(text.len(), 2000);
    irc.send("main", "#test", &text).await;
    let mut got = String::new();
    let mut lines = 0;
    while got.len() < text.len() {
        let line = tokio::task::block_in_place(|| bob.wait_for(|l| l.contains(" PRIVMSG #test ")));
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

#[test]
fn after_a_kill_9_of_the_server_the_account_comes_back_as_exactly_one_client() {
    let mut server = Ngircd::start();
    let daemon = daemon(
        &[("main", server.port, "")],
        "[supervisor]\ninitial_backoff = \"500ms\"\nmax_backoff = \"1s\"\n",
    );
    connected(&daemon, "main");
    let events = Events::connect(&daemon, "?channel=irc");
    // The stream samples states every 200 ms from its connection on, and a change made before its
    // first look is no change to it; there is no event to wait for, so give it five looks.
    std::thread::sleep(Duration::from_secs(1));
    server.kill();
    server.restart();

    // running → restart-pending → … → running with connected false, then true.
    let mut states: Vec<(String, Option<bool>)> = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while states.last() != Some(&("running".to_owned(), Some(true))) || states.len() < 2 {
        assert!(Instant::now() < deadline, "states so far: {states:?}");
        let event = events.next();
        if event.event == "state" {
            states.push((
                event.data["to"].as_str().unwrap().to_owned(),
                event.data["connected"].as_bool(),
            ));
        }
    }
    assert_eq!(
        states.first().map(|s| s.0.as_str()),
        Some("restart-pending"),
        "{states:?}"
    );
    let pending = states
        .iter()
        .position(|s| s.0 == "restart-pending")
        .unwrap();
    assert!(
        states[pending..]
            .iter()
            .any(|s| s.0 == "running" && s.1 != Some(true)),
        "running but not yet connected before connected: {states:?}"
    );

    let mut eve = IrcClient::connect(server.port, "eve");
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
    let frozen = daemon.wait_for_account("irc", "frozen", |s| s["healthRestartAt"].is_i64());
    signal(stopped.child.as_ref().unwrap(), libc::SIGCONT);
    assert_eq!(frozen["healthVerdict"], "stale-socket", "{frozen}");
    // The frozen account comes back once the server answers again.
    connected(&daemon, "frozen");
    let fine = daemon.account("irc", "fine");
    assert!(
        fine.get("healthRestartAt").is_none(),
        "the healthy account was restarted: {fine}"
    );
}
