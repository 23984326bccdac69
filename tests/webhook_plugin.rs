//! The `webhook` channel plugin (`plugins/webhook`), loaded through the real loader and adapter
//! and driven over real HTTP on loopback. Each test loads its own copy of the library file, so
//! each has its own plugin instance and tests stay independent.

use std::{
    io::ErrorKind,
    sync::Arc,
    time::{Duration, Instant},
};

use channeld::{
    host::{AccountKey, AccountLink, HostSink},
    plugin::{Check, Plugin, RunningTask},
    status::AccountSnapshot,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use crate::util::{self, Loaded};

/// A bound on awaits that should complete at once, so a regression fails instead of hanging.
const PROMPT: Duration = Duration::from_secs(10);

const SECRET: &str = "s3cret";

fn fresh_webhook(dir: &tempfile::TempDir, name: &str) -> Loaded {
    let file = util::copy_plugin(
        &util::plugin_file("channeld-plugin-webhook"),
        dir.path(),
        name,
    );
    util::load(&file)
}

fn key(loaded: &Loaded, account: &str) -> AccountKey {
    AccountKey::new(loaded.plugin.info().channel_id.clone(), account)
}

fn status(loaded: &Loaded, account: &str) -> AccountSnapshot {
    loaded
        .board
        .get(&key(loaded, account))
        .expect("account has a status")
}

/// Starts `account` (configured by the caller) and waits until it reports where it listens.
async fn start(loaded: &Loaded, account: &str) -> (RunningTask, String) {
    let key = key(loaded, account);
    let generation = loaded.board.begin_generation(&key);
    let sink: Arc<dyn HostSink> = loaded.board.clone();
    let link = AccountLink::for_account(key, generation, sink);
    let task = loaded.plugin.start_account(account, link).unwrap();
    // The webhook patches its address, then says it is connected: both are awaited.
    let addr = timeout(PROMPT, async {
        loop {
            let listening = loaded
                .board
                .get(&self::key(loaded, account))
                .filter(|s| s.connected == Some(true))
                .and_then(|s| s.extra.get("listen_addr").cloned());
            if let Some(Value::String(addr)) = listening {
                break addr;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the webhook reports its listen address");
    (task, addr)
}

/// What a request got back.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
    www_authenticate: Option<String>,
}

/// One HTTP request over loopback. ureq blocks, so it runs off the test's runtime thread.
async fn request(
    method: &'static str,
    url: String,
    authorization: Option<String>,
    body: String,
) -> Reply {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // 4xx/5xx are what these tests look at, not errors.
            .http_status_as_error(false)
            // A proxy from the environment must never see loopback test traffic.
            .proxy(None)
            .timeout_global(Some(PROMPT))
            .build()
            .into();
        let response = match method {
            "POST" => {
                let mut request = agent.post(&url);
                if let Some(value) = &authorization {
                    request = request.header("Authorization", value);
                }
                request.send(body.as_bytes())
            }
            "GET" => {
                let mut request = agent.get(&url);
                if let Some(value) = &authorization {
                    request = request.header("Authorization", value);
                }
                request.call()
            }
            other => panic!("no helper for {other}"),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let www_authenticate = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        Reply {
            status: response.status().as_u16(),
            body: response.body_mut().read_to_string().unwrap(),
            www_authenticate,
        }
    })
    .await
    .unwrap()
}

/// A POST with `Authorization: Bearer <token>` (none when `token` is `None`).
async fn post(url: String, token: Option<&str>, body: String) -> Reply {
    request("POST", url, token.map(|t| format!("Bearer {t}")), body).await
}

fn message(text: &str) -> String {
    json!({ "conversation": "alerts", "sender": "ci", "text": text }).to_string()
}

#[tokio::test]
async fn an_authenticated_post_is_delivered_and_the_account_reports_webhook_mode() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_webhook(&dir, "webhook-deliver.so");
    let info = loaded.plugin.info();
    assert_eq!(info.channel_id, "webhook");
    assert_eq!(info.display_name, "Webhook (HTTP POST)");

    loaded
        .plugin
        .configure(&json!({
            "accounts": { "main": { "listen": "127.0.0.1:0", "secret": SECRET } }
        }))
        .unwrap();
    assert_eq!(loaded.plugin.is_configured("main").unwrap(), Check::Yes);
    let (task, addr) = start(&loaded, "main").await;

    let before = status(&loaded, "main");
    assert_eq!(before.mode.as_deref(), Some("webhook"));
    assert_eq!(before.connected, Some(true));
    assert!(
        !before.reports_events,
        "a webhook must not report event liveness: the monitor would judge its silence"
    );

    let body = json!({
        "conversation": "alerts",
        "sender": "ci",
        "text": "build 42 failed",
        "id": "msg-1",
        "time_ms": 1_700_000_000_000_i64,
    });
    let reply = post(
        format!("http://{addr}/messages"),
        Some(SECRET),
        body.to_string(),
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    // Accepted once the host's message sink took it (the test's board numbers from 1).
    assert_eq!(
        serde_json::from_str::<Value>(&reply.body).unwrap(),
        json!({ "accepted": true, "seq": 1 })
    );
    assert_eq!(status(&loaded, "main").inbound_messages, 1);

    // The scheme is case-insensitive, and the optional fields may be left out.
    let reply = request(
        "POST",
        format!("http://{addr}/messages"),
        Some(format!("bearer {SECRET}")),
        message("second"),
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(status(&loaded, "main").inbound_messages, 2);

    assert!(loaded.plugin.abort_task(task.id));
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
}

#[tokio::test]
async fn unauthenticated_oversized_and_malformed_posts_are_refused_without_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_webhook(&dir, "webhook-refuse.so");
    loaded
        .plugin
        .configure(&json!({
            "accounts": { "main": {
                "listen": "127.0.0.1:0",
                "secret": SECRET,
                "max_body_bytes": 128,
                "path": "/hook",
            } }
        }))
        .unwrap();
    let (task, addr) = start(&loaded, "main").await;
    let url = format!("http://{addr}/hook");
    let delivered = || status(&loaded, "main").inbound_messages;

    // No token, a wrong token of the secret's length, a wrong token of another length, and the
    // right token under another scheme.
    for authorization in [
        None,
        Some("Bearer s3creT".to_owned()),
        Some("Bearer s3cret-and-more".to_owned()),
        Some(format!("Basic {SECRET}")),
    ] {
        let reply = request("POST", url.clone(), authorization.clone(), message("hi")).await;
        assert_eq!(reply.status, 401, "{authorization:?}: {reply:?}");
        assert_eq!(reply.www_authenticate.as_deref(), Some("Bearer"));
        assert_eq!(delivered(), 0, "{authorization:?}");
    }

    // A body over `max_body_bytes`.
    let reply = post(url.clone(), Some(SECRET), message(&"x".repeat(500))).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(reply.body.contains("128 bytes"), "{reply:?}");

    // Not JSON, and JSON without a required field: a one-line reason.
    let reply = post(url.clone(), Some(SECRET), "{not json".to_owned()).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.body.lines().count(), 1, "{reply:?}");
    let reply = post(
        url.clone(),
        Some(SECRET),
        json!({ "conversation": "alerts", "sender": "ci" }).to_string(),
    )
    .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.body.contains("missing field `text`"), "{reply:?}");

    // Another path, and another method on the path.
    let reply = post(
        format!("http://{addr}/messages"),
        Some(SECRET),
        message("hi"),
    )
    .await;
    assert_eq!(reply.status, 404, "{reply:?}");
    let reply = request(
        "GET",
        url.clone(),
        Some(format!("Bearer {SECRET}")),
        String::new(),
    )
    .await;
    assert_eq!(reply.status, 405, "{reply:?}");

    assert_eq!(delivered(), 0, "nothing refused was delivered");
    // The server still serves a good request after all that.
    let reply = post(url, Some(SECRET), message("hi")).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(delivered(), 1);

    assert!(loaded.plugin.abort_task(task.id));
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
}

#[tokio::test]
async fn an_account_without_listen_or_secret_is_not_configured_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_webhook(&dir, "webhook-unconfigured.so");
    loaded
        .plugin
        .configure(&json!({
            "accounts": {
                "no-secret": { "listen": "127.0.0.1:0" },
                "no-listen": { "secret": SECRET },
                "empty-secret": { "listen": "127.0.0.1:0", "secret": "" },
                "typo": { "listen": "127.0.0.1:0", "secret": SECRET, "max_body": 10 },
                // The host-owned keys are not the plugin's to refuse.
                "host-keys": {
                    "listen": "127.0.0.1:0",
                    "secret": SECRET,
                    "enabled": true,
                    "health_monitor": { "enabled": false },
                },
            }
        }))
        .unwrap();
    let reason = |account: &str| match loaded.plugin.is_configured(account).unwrap() {
        Check::No(Some(reason)) => reason,
        other => panic!("{account}: {other:?}"),
    };
    assert_eq!(reason("no-secret"), "missing `secret`");
    assert_eq!(reason("no-listen"), "missing `listen`");
    assert_eq!(reason("empty-secret"), "`secret` is empty");
    assert!(reason("typo").contains("unknown field `max_body`"));
    assert_eq!(
        loaded.plugin.is_configured("host-keys").unwrap(),
        Check::Yes
    );
}

/// Writes a POST of `body` with the right token over a raw connection, its head promising
/// `content_length` bytes (more than `body` leaves the upload unfinished).
async fn raw_post(stream: &mut TcpStream, body: &str, content_length: usize) {
    stream
        .write_all(post_head(content_length, "").as_bytes())
        .await
        .unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
}

/// The head of an authorised `POST /messages` promising `content_length` bytes, with `extra`
/// header lines (each ending in `\r\n`).
fn post_head(content_length: usize, extra: &str) -> String {
    format!(
        "POST /messages HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {SECRET}\r\n\
         Content-Length: {content_length}\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn an_aborted_account_closes_idle_connections_and_ends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_webhook(&dir, "webhook-abort.so");
    loaded
        .plugin
        .configure(&json!({
            "accounts": { "main": { "listen": "127.0.0.1:0", "secret": SECRET } }
        }))
        .unwrap();
    let (task, addr) = start(&loaded, "main").await;

    // A keep-alive connection left open after its request was answered, and one that never
    // sent anything: neither may hold up the stop.
    let mut kept_alive = TcpStream::connect(&addr).await.unwrap();
    let body = message("hi");
    raw_post(&mut kept_alive, &body, body.len()).await;
    let mut answer = Vec::new();
    timeout(PROMPT, async {
        while !String::from_utf8_lossy(&answer).contains(r#"{"accepted":true,"seq":1}"#) {
            let mut chunk = [0; 1024];
            let n = kept_alive.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "closed early: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the raw POST is answered");
    assert!(answer.starts_with(b"HTTP/1.1 202"));
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(status(&loaded, "main").inbound_messages, 1);

    let asked = Instant::now();
    assert!(loaded.plugin.abort_task(task.id));
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
    // With nothing in flight the server stops at once, not after its drain timeout (3 s).
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    // Both are closed: with a FIN, or a reset when the listener went away before accepting one.
    for stream in [&mut kept_alive, &mut silent] {
        let mut rest = Vec::new();
        let read = timeout(PROMPT, stream.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection");
        let closed = match &read {
            Ok(_) => rest.is_empty(),
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
        };
        assert!(
            closed,
            "{read:?} after {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "the listener is closed once the task has ended"
    );
}

#[tokio::test]
async fn a_stalled_upload_delays_the_stop_only_for_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_webhook(&dir, "webhook-drain.so");
    loaded
        .plugin
        .configure(&json!({
            "accounts": { "main": { "listen": "127.0.0.1:0", "secret": SECRET } }
        }))
        .unwrap();
    let (task, addr) = start(&loaded, "main").await;

    // Promises 100 bytes of body, sends 10, and stalls: a request in flight. It asks for a
    // `100 Continue` first, which the server sends once the plugin reads the body: the request
    // is then in flight for certain (a sleep could abort before the server had accepted it).
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    let head = post_head(100, "Expect: 100-continue\r\n");
    stalled.write_all(head.as_bytes()).await.unwrap();
    let expected = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut interim = [0u8; 25];
    timeout(PROMPT, stalled.read_exact(&mut interim))
        .await
        .expect("the server asks for the body")
        .unwrap();
    assert_eq!(&interim, expected, "{}", String::from_utf8_lossy(&interim));
    stalled.write_all(b"0123456789").await.unwrap();

    let asked = Instant::now();
    assert!(loaded.plugin.abort_task(task.id));
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
    let took = asked.elapsed();
    // The request in flight got its grace period (3 s), and no more: the task ended by itself,
    // before the host's 5 s stop timeout would have cancelled it.
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    assert_eq!(status(&loaded, "main").inbound_messages, 0);
}

#[tokio::test]
async fn a_listen_address_in_use_fails_the_start_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_webhook(&dir, "webhook-bind.so");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    loaded
        .plugin
        .configure(&json!({
            "accounts": { "main": { "listen": addr, "secret": SECRET } }
        }))
        .unwrap();
    let key = key(&loaded, "main");
    let generation = loaded.board.begin_generation(&key);
    let sink: Arc<dyn HostSink> = loaded.board.clone();
    let task = loaded
        .plugin
        .start_account("main", AccountLink::for_account(key, generation, sink))
        .unwrap();
    let error = timeout(PROMPT, task.done).await.unwrap().unwrap_err();
    assert!(
        error.contains(&format!("cannot listen on {addr}")),
        "{error}"
    );
}
