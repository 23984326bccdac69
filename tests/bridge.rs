//! Gateways end to end with the real daemon: a webhook account (`webhook:ain`, inbound over real
//! HTTP) bridged to a fixture account (`fixture:b`, whose send hook records what it takes in a
//! file). Gateways added and removed by a config reload (`channeld reload`, `POST /v1/reload`,
//! `SIGHUP`) take effect without a restart; a copy the outbox refuses for a transient reason (its
//! target's channel not loaded yet) is held and retried, not dropped.

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::util::{
    self, agent,
    daemon::{Daemon, PATIENCE},
};

/// The gateway `pair`: `webhook:ain` (in) to `fixture:b` (out), the text alone.
const PAIR: &str = "[[gateways]]\nname = \"pair\"\nmembers = [\n\
                    { account = \"webhook:ain\", conversation = \"c\", direction = \"in\" },\n\
                    { account = \"fixture:b\", conversation = \"room\", direction = \"out\", template = \"{text}\" },\n]\n";

/// The config: `webhook:ain`, `fixture:b` (its sends logged) and `gateways`.
fn config(daemon: &Daemon, host_extra: &str, gateways: &str) -> String {
    format!(
        "[host]\napi_address = \"127.0.0.1:0\"\nwatch_config = false\n{host_extra}\n\
         [supervisor]\nstop_timeout = \"2s\"\n[health]\ninterval = \"0s\"\n\
         [channels.webhook.accounts.ain]\nlisten = \"127.0.0.1:0\"\nsecret = \"ain-secret\"\n\
         [channels.fixture.accounts.b]\nsend_log = \"{}\"\n{gateways}",
        send_log(daemon).display()
    )
}

fn send_log(daemon: &Daemon) -> PathBuf {
    daemon.root().join("b.sends")
}

/// Replaces the config file as an editor does: a new file renamed over the old one.
fn rewrite(daemon: &Daemon, text: &str) {
    let temp = daemon.config.with_extension("toml.new");
    fs::write(&temp, text).unwrap();
    fs::rename(&temp, &daemon.config).unwrap();
}

/// The texts `fixture:b`'s send hook took, in order.
fn sent_to_b(daemon: &Daemon) -> Vec<String> {
    fs::read_to_string(send_log(daemon))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('\t').nth(2).unwrap_or_default().to_owned())
        .collect()
}

/// `GET` or `POST` (empty body) on the daemon's API; the status and JSON body.
fn api(daemon: &Daemon, method: &str, path: &str) -> (u16, Value) {
    let (addr, token) = daemon.api();
    let url = format!("http://{addr}{path}");
    let auth = format!("Bearer {token}");
    let agent = agent();
    let mut response = match method {
        "GET" => agent.get(&url).header("Authorization", &auth).call(),
        _ => agent.post(&url).header("Authorization", &auth).send_empty(),
    }
    .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

/// The outbox's figures (`GET /v1/outbox`).
fn outbox(daemon: &Daemon) -> Value {
    let (status, body) = api(daemon, "GET", "/v1/outbox");
    assert_eq!(status, 200, "{body}");
    body["outbox"].clone()
}

/// Polls the outbox's figures until `done` holds; those figures.
fn outbox_until(daemon: &Daemon, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = outbox(daemon);
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "{stats}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls until `fixture:b`'s send hook took `n` messages; their texts.
fn wait_sent_to_b(daemon: &Daemon, n: usize) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let sent = sent_to_b(daemon);
        if sent.len() >= n {
            return sent;
        }
        assert!(
            Instant::now() < deadline,
            "fixture:b took {sent:?}, not {n} messages\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `webhook:ain`'s listening address, once it runs.
fn ain(daemon: &Daemon) -> String {
    let s = daemon.wait_for_account("webhook", "ain", |s| s["listen_addr"].is_string());
    s["listen_addr"].as_str().unwrap().to_owned()
}

/// A message into `webhook:ain`, conversation `c`; its `202` means the journal has it and the
/// gateways routed it (the webhook answers once its delivery completed).
fn inbound(listen: &str, text: &str) {
    let mut r = agent()
        .post(format!("http://{listen}/messages"))
        .header("Authorization", "Bearer ain-secret")
        .send(json!({ "conversation": "c", "sender": "ada", "text": text }).to_string())
        .unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    assert_eq!(status, 202, "{body}");
}

fn plugins() -> [(&'static str, PathBuf); 2] {
    [
        ("webhook.so", util::plugin_file("channeld-plugin-webhook")),
        ("fixture.so", util::plugin_file("channeld-plugin-fixture")),
    ]
}

/// `channeld reload`, which must succeed.
fn reload_by_cli(daemon: &Daemon) {
    let out = daemon.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_gateway_added_by_a_reload_bridges_and_one_removed_by_a_reload_stops() {
    let mut daemon = Daemon::prepare(&plugins(), "", "");
    fs::write(&daemon.config, config(&daemon, "", "")).unwrap();
    daemon.start_again(&[]);
    daemon.wait_for_account("fixture", "b", |s| s["running"] == true);
    let listen = ain(&daemon);
    // No gateway yet: journaled, not bridged.
    inbound(&listen, "zero");
    assert_eq!(outbox(&daemon)["accepted"], 0);

    // A gateway added by `channeld reload` bridges the next message, without a restart.
    rewrite(&daemon, &config(&daemon, "", PAIR));
    reload_by_cli(&daemon);
    inbound(&listen, "one");
    assert_eq!(wait_sent_to_b(&daemon, 1), ["one"]);
    let stats = outbox_until(&daemon, |s| s["waiting"] == 0);
    assert_eq!((&stats["bridged"], &stats["sent"]), (&json!(1), &json!(1)));

    // Removed by a reload (the API's this time): the next message is not bridged. Its `202`
    // comes after its routing, so nothing can still be on its way.
    rewrite(&daemon, &config(&daemon, "", ""));
    let (status, body) = api(&daemon, "POST", "/v1/reload");
    assert_eq!(status, 200, "{body}");
    inbound(&listen, "two");
    let stats = outbox(&daemon);
    assert_eq!(
        (&stats["bridged"], &stats["accepted"]),
        (&json!(1), &json!(1)),
        "{stats}"
    );
    assert_eq!(sent_to_b(&daemon), ["one"]);

    // Added again by SIGHUP: bridged again.
    rewrite(&daemon, &config(&daemon, "", PAIR));
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    daemon.wait_for_log_count("config reloaded", 3);
    inbound(&listen, "three");
    assert_eq!(wait_sent_to_b(&daemon, 2), ["one", "three"]);
}

#[test]
fn a_message_journaled_before_a_reload_added_a_gateway_is_not_bridged_after_a_kill() {
    let mut daemon = Daemon::prepare(&plugins(), "", "");
    fs::write(&daemon.config, config(&daemon, "", "")).unwrap();
    daemon.start_again(&[]);
    inbound(&ain(&daemon), "zero");
    rewrite(&daemon, &config(&daemon, "", PAIR));
    reload_by_cli(&daemon);
    // "zero" was routed by the gateways in force when it came (none): the mark passes it.
    daemon.wait_for_log("bridging mark written at journal entry 1 (config reload)");
    daemon.kill();
    daemon.start_again(&[]);
    daemon.wait_for_account("fixture", "b", |s| s["running"] == true);
    inbound(&ain(&daemon), "one");
    assert_eq!(wait_sent_to_b(&daemon, 1), ["one"]);
    let stats = outbox_until(&daemon, |s| s["waiting"] == 0);
    assert_eq!(stats["bridged"], 1, "{stats}");
    assert!(!daemon.log().contains("routed again at startup"));
}

#[test]
fn a_copy_refused_while_its_targets_plugin_is_missing_is_held_across_a_kill_and_bridged_once_it_loads()
 {
    // Only the webhook plugin at first; only `channeld rescan` finds a new file.
    let mut daemon = Daemon::prepare(&plugins()[..1], "", "");
    let host = "watch = false\nrescan_interval = \"0s\"\n\
                [outbox]\nretry_initial = \"20ms\"\nretry_max = \"100ms\"";
    fs::write(&daemon.config, config(&daemon, host, PAIR)).unwrap();
    daemon.start_again(&[]);
    inbound(&ain(&daemon), "one");
    // Refused (`fixture` is configured, its plugin not loaded): held, visible, retried.
    let stats = outbox_until(&daemon, |s| s["bridgeRetries"].as_u64() >= Some(2));
    assert_eq!(
        (
            &stats["bridgeHeld"],
            &stats["bridgeRefused"],
            &stats["bridgeDropped"]
        ),
        (&json!(1), &json!(1), &json!(0)),
        "{stats}"
    );
    // The CLI shows them too.
    let out = daemon.cli(&["messages", "--figures"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    for line in ["bridgeHeld\t1", "bridgeRefused\t1", "bridgeDropped\t0"] {
        assert!(printed.lines().any(|l| l == line), "{line:?} in\n{printed}");
    }
    let line = daemon.wait_for_log("was refused");
    for part in ["\"pair\"", "fixture:b/room", "held and retried"] {
        assert!(line.contains(part), "{part} in {line}");
    }
    // A kill -9 while it is held: the next start routes it again and holds it again.
    daemon.kill();
    daemon.start_again(&[]);
    daemon.wait_for_log("routed again at startup");
    outbox_until(&daemon, |s| s["bridgeHeld"] == 1);
    // Its plugin arrives: the next retry bridges it, once.
    let tmp = daemon.plugins_dir().join(".fixture.so.tmp");
    fs::copy(&plugins()[1].1, &tmp).unwrap();
    fs::rename(&tmp, daemon.plugins_dir().join("fixture.so")).unwrap();
    let out = daemon.cli(&["rescan"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_sent_to_b(&daemon, 1), ["one"]);
    let stats = outbox_until(&daemon, |s| s["bridgeHeld"] == 0 && s["waiting"] == 0);
    assert_eq!((&stats["bridged"], &stats["sent"]), (&json!(1), &json!(1)));
    daemon.wait_for_log("is bridged after");
    assert_eq!(sent_to_b(&daemon), ["one"]);
}

#[test]
fn a_held_copy_whose_gateway_a_reload_removed_is_let_go_and_logged() {
    let mut daemon = Daemon::prepare(&plugins()[..1], "", "");
    let host = "[outbox]\nretry_initial = \"20ms\"\nretry_max = \"100ms\"";
    fs::write(&daemon.config, config(&daemon, host, PAIR)).unwrap();
    daemon.start_again(&[]);
    inbound(&ain(&daemon), "one");
    outbox_until(&daemon, |s| s["bridgeHeld"] == 1);
    rewrite(&daemon, &config(&daemon, host, ""));
    let (status, body) = api(&daemon, "POST", "/v1/reload");
    assert_eq!(status, 200, "{body}");
    let stats = outbox_until(&daemon, |s| s["bridgeHeld"] == 0);
    assert_eq!(
        (&stats["bridgeDropped"], &stats["bridged"]),
        (&json!(1), &json!(0)),
        "{stats}"
    );
    let line = daemon.wait_for_log("a config reload removed its gateway or target member");
    for part in ["\"pair\"", "journal entry 1 ", "fixture:b/room"] {
        assert!(line.contains(part), "{part} in {line}");
    }
}
