//! `channeld run` end to end with the real webhook plugin: a posted message counted in status,
//! the webhook's 401/413, the API's 401/404, config errors with file and line, secrets that are
//! used and never shown, SIGTERM, and the CLI's exit codes.

use std::{fs, process::Command};

use serde_json::Value;

use crate::util::{
    self,
    daemon::{Daemon, channeld},
};

const SECRET_ENV: &str = "CHANNELD_TEST_WEBHOOK_SECRET";

fn webhook_daemon(secret: &str) -> Daemon {
    Daemon::start(
        &[("webhook.so", util::plugin_file("channeld-plugin-webhook"))],
        "",
        &format!(
            "[supervisor]\nstop_timeout = \"2s\"\n\n\
             [channels.webhook.accounts.main]\nlisten = \"127.0.0.1:0\"\n\
             secret = {{ env = \"{SECRET_ENV}\" }}\nmax_body_bytes = 1024\n"
        ),
        &[(SECRET_ENV, secret), ("RUST_LOG", "debug")],
    )
}

fn running(snapshot: &Value) -> bool {
    // The webhook patches its address, then says it is connected: both are awaited.
    snapshot["running"] == true
        && snapshot["listen_addr"].is_string()
        && snapshot["connected"] == true
}

/// Posts `body` to the webhook with `token` (if any); returns the HTTP status.
fn post(addr: &str, token: Option<&str>, body: &str) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.post(format!("http://{addr}/messages"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    request.send(body).unwrap().status().as_u16()
}

/// GETs an API path with `token`; returns status and JSON body.
fn api_get(daemon: &Daemon, path: &str, token: Option<&str>) -> (u16, Value) {
    let (addr, _) = daemon.api();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

#[test]
fn a_posted_message_is_counted_and_the_webhook_refuses_bad_requests() {
    let secret = "s3cret-value-1";
    let daemon = webhook_daemon(secret);
    let snapshot = daemon.wait_for_account("webhook", "main", running);
    assert_eq!(snapshot["mode"], "webhook");
    assert_eq!(snapshot["connected"], true);
    let addr = snapshot["listen_addr"].as_str().unwrap().to_owned();

    let message = r#"{"conversation":"lobby","sender":"ada","text":"hello"}"#;
    assert_eq!(post(&addr, Some(secret), message), 202);
    assert_eq!(daemon.account("webhook", "main")["inboundMessages"], 1);

    assert_eq!(post(&addr, None, message), 401);
    assert_eq!(post(&addr, Some("wrong-token!!!"), message), 401);
    let big = format!(
        r#"{{"conversation":"c","sender":"s","text":"{}"}}"#,
        "x".repeat(2000)
    );
    assert_eq!(post(&addr, Some(secret), &big), 413);
    assert_eq!(
        daemon.account("webhook", "main")["inboundMessages"],
        1,
        "refused posts are not counted"
    );

    let table = daemon.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("webhook"))
        .expect(&table);
    assert!(
        row.contains("main") && row.contains("running") && row.contains(" yes "),
        "{table}"
    );
}

#[test]
fn the_api_answers_401_without_the_token_and_404_naming_unknown_names() {
    let daemon = webhook_daemon("s3cret-value-2");
    daemon.wait_for_account("webhook", "main", running);
    let (_, token) = daemon.api();
    let before = daemon.status(None);

    let (status, body) = api_get(&daemon, "/v1/status", None);
    assert_eq!(status, 401);
    assert!(
        body["error"].as_str().unwrap().contains("bearer token"),
        "{body}"
    );
    assert_eq!(api_get(&daemon, "/v1/status", Some("not-the-token")).0, 401);

    let (status, body) = api_get(&daemon, "/v1/status/nosuch", Some(&token));
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("nosuch"), "{body}");
    let (status, body) = api_get(&daemon, "/v1/status/webhook/ghost", Some(&token));
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().contains("webhook:ghost"),
        "{body}"
    );

    // Refused operations change nothing.
    let stop = daemon.cli(&["stop", "webhook:ghost"]);
    assert_eq!(stop.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stop.stderr).contains("unknown account webhook:ghost"));
    let mut after = daemon.status(None);
    // Only the wall-clock fields of the webhook may move; there are none while it idles.
    assert_eq!(before, after.take(), "a refused request changed the status");
}

#[test]
fn config_errors_name_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    fs::write(
        &config,
        "[host]\nplugins_dir = \"p\"\nstop_timout = \"5s\"\n",
    )
    .unwrap();
    for verb in ["run", "check"] {
        let out = Command::new(channeld())
            .args([verb, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{verb}: {stderr}");
        let expected = format!("{}:3:1: unknown field `stop_timout`", config.display());
        assert!(stderr.contains(&expected), "{verb}: {stderr}");
    }
    fs::write(&config, "[supervisor]\nmax_restarts = \"ten\"\n").unwrap();
    let out = Command::new(channeld())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:2:16:"), "{stderr}");
    assert!(
        stderr.contains("expected u32"),
        "says what is expected: {stderr}"
    );
}

#[test]
fn a_secret_from_the_environment_is_used_and_never_shown() {
    let secret = "Zq7-very-distinct-secret";
    let mut daemon = webhook_daemon(secret);
    let snapshot = daemon.wait_for_account("webhook", "main", running);
    let addr = snapshot["listen_addr"].as_str().unwrap().to_owned();
    assert_eq!(
        post(
            &addr,
            Some(secret),
            r#"{"conversation":"c","sender":"s","text":"t"}"#
        ),
        202
    );
    daemon.wait_for_account("webhook", "main", |s| s["inboundMessages"] == 1);

    let status = serde_json::to_string(&daemon.status(None)).unwrap();
    let (_, token) = daemon.api();
    let (_, plugins) = api_get(&daemon, "/v1/plugins", Some(&token));
    let (code, log) = daemon.terminate();
    assert!(code.success());
    for (place, text) in [
        ("status", status),
        ("plugins view", plugins.to_string()),
        ("debug log", log),
    ] {
        assert!(!text.contains(secret), "the secret appears in the {place}");
    }
}

#[test]
fn sigterm_stops_every_account_and_the_plugin_threads_then_exits_0() {
    let mut daemon = webhook_daemon("s3cret-value-3");
    daemon.wait_for_account("webhook", "main", running);
    let plugin_threads = daemon.threads_named("chd-webhook", 2);
    assert_eq!(
        plugin_threads, 2,
        "the plugin's runtime runs before SIGTERM"
    );
    let (status, log) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("SIGTERM: stopping every account"), "{log}");
    assert!(
        log.contains("webhook account stopped"),
        "the account was stopped: {log}"
    );
    assert!(
        log.contains("plugin_threads=0"),
        "runtime threads gone before exit: {log}"
    );
}

#[test]
fn the_cli_exit_codes_say_what_happened() {
    let mut daemon = webhook_daemon("s3cret-value-4");
    daemon.wait_for_account("webhook", "main", running);
    let ok = daemon.cli(&["status", "webhook:main"]);
    assert_eq!(ok.status.code(), Some(0));
    let unknown = daemon.cli(&["status", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown channel \"nope\""));
    let usage = daemon.cli(&["stop"]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "missing argument is a usage error"
    );
    let config = daemon.config.clone();
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let gone = Command::new(channeld())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        gone.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("cannot reach channeld"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
}
