//! The plugin in process, through the author kit's harness (no channeld, no `.so`): real HTTP
//! requests on a free port, the host side recorded. The real clock: the requests are real socket
//! I/O, which a paused clock would race with its auto-advance.

use channeld_plugin_test::{Harness, HarnessError, RunningAccount, secs};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::Webhook;

const CONFIG: &str = r#"
[accounts.main]
listen = "127.0.0.1:0"
secret = "s3cret"
max_body_bytes = 256
health_monitor = { enabled = false }
"#;

/// Starts `main` and waits for its bound address.
async fn listening(harness: &Harness<Webhook>) -> (RunningAccount<Webhook>, String) {
    let account = harness.start("main").unwrap();
    account
        .wait_until(secs(10), |r| r.status.contains_key("listen_addr"))
        .await
        .unwrap();
    let addr = account.record().status["listen_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    (account, addr)
}

/// One HTTP/1.1 POST; returns the status code and the body.
async fn post(addr: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let code = answer[9..12].parse().unwrap();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (code, body)
}

#[tokio::test]
async fn a_posted_message_is_delivered_and_the_account_reports_listening() {
    let harness = Harness::new(Webhook, CONFIG).unwrap();
    let (mut account, addr) = listening(&harness).await;
    let (code, body) = post(
        &addr,
        "/messages",
        "s3cret",
        r#"{"conversation":"alerts","sender":"ci","text":"build 42 failed","id":"m1","time_ms":5}"#,
    )
    .await;
    assert_eq!((code, body.as_str()), (202, r#"{"accepted":true,"seq":1}"#));
    let record = account.record();
    assert_eq!(record.delivered.len(), 1);
    let message = &record.delivered[0];
    assert_eq!(
        (
            &*message.conversation,
            &*message.sender,
            &*message.text,
            &*message.id
        ),
        ("alerts", "ci", "build 42 failed", "m1")
    );
    assert_eq!(message.time_ms, 5);
    assert_eq!(record.status["mode"], "webhook");
    assert_eq!(record.connected(), Some(true));
    // A webhook's silence means nothing: it never reports traffic for the health monitor.
    assert!(record.events.is_empty(), "{:?}", record.events);
    let listening = harness.logs();
    assert!(
        listening
            .iter()
            .any(|l| l.message == "webhook account listening"
                && l.account.as_deref() == Some("main")),
        "{listening:?}"
    );
    // The abort ends the account well before the drain timeout: no request is in flight.
    account.abort_within(secs(2)).await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_requests_are_refused_and_nothing_is_delivered() {
    let harness = Harness::new(Webhook, CONFIG).unwrap();
    let (mut account, addr) = listening(&harness).await;
    let message = r#"{"conversation":"c","sender":"s","text":"t"}"#;
    assert_eq!(post(&addr, "/messages", "wrong", message).await.0, 401);
    assert_eq!(post(&addr, "/other", "s3cret", message).await.0, 404);
    let (code, body) = post(&addr, "/messages", "s3cret", r#"{"text":"t"}"#).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("missing field"), "{body}");
    assert_eq!(
        post(&addr, "/messages", "s3cret", &"x".repeat(300)).await.0,
        413
    );
    assert!(account.record().delivered.is_empty());
    account.abort_within(secs(2)).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_refused_delivery_is_a_503_carrying_the_hosts_reason() {
    let harness = Harness::new(Webhook, CONFIG).unwrap();
    let (mut account, addr) = listening(&harness).await;
    account.refuse_deliveries(Some("the journal is full"));
    let message = r#"{"conversation":"c","sender":"s","text":"t"}"#;
    let (code, body) = post(&addr, "/messages", "s3cret", message).await;
    assert_eq!((code, body.as_str()), (503, "the journal is full\n"));
    account.refuse_deliveries(None);
    assert_eq!(post(&addr, "/messages", "s3cret", message).await.0, 202);
    account.abort_within(secs(2)).await.unwrap().unwrap();
}

#[tokio::test]
async fn an_account_without_what_it_needs_is_not_configured_with_the_reason() {
    let cases = [
        ("listen = \"127.0.0.1:0\"", "missing `secret`"),
        (
            "listen = \"127.0.0.1:0\"\nsecret = \"\"",
            "`secret` is empty",
        ),
        (
            "listen = \"127.0.0.1:0\"\nsecret = \"s\"\nsecrets = \"typo\"",
            "unknown field `secrets`",
        ),
    ];
    for (table, reason) in cases {
        let harness = Harness::new(Webhook, &format!("[accounts.main]\n{table}\n")).unwrap();
        match harness.start("main") {
            Err(HarnessError::NotConfigured {
                reason: Some(r), ..
            }) => {
                assert!(r.contains(reason), "{table}: {r}");
            }
            Err(other) => panic!("{table}: {other}"),
            Ok(_) => panic!("{table}: started"),
        }
    }
}

#[tokio::test]
async fn sending_without_an_outgoing_url_fails_and_says_why() {
    let harness = Harness::new(Webhook, CONFIG).unwrap();
    let (mut account, _) = listening(&harness).await;
    let error = account.send("alerts", "hi").await.unwrap_err().to_string();
    assert_eq!(
        error,
        "webhook:main: send failed: webhook account main has no outgoing_url"
    );
    account.abort_within(secs(2)).await.unwrap().unwrap();
}
