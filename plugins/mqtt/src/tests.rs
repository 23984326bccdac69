//! The settings' reasons and the loop-stopping properties as plain functions; then the plugin in
//! process, through the author kit's harness (no channeld, no `.so`, no broker): bad tables, the
//! host's reserved keys, an unreachable broker. The real clock: the connections are real socket
//! I/O.

use channeld_plugin_test::{Harness, HarnessError, RunningAccount, secs};

use super::*;

fn account(config: Value) -> Account {
    Account {
        channel: "mqtt".to_owned(),
        id: "main".to_owned(),
        config,
    }
}

#[test]
fn settings_reasons() {
    let ok = json!({"host": "h", "client_id": "c", "topics": [{"filter": "a/#", "qos": 1}]});
    assert!(Settings::of(&account(ok)).is_ok());
    let reason = |v| Settings::of(&account(v)).err().unwrap_or_default();
    assert_eq!(reason(json!({"client_id": "c"})), "missing `host`");
    assert!(reason(json!({"host": "h", "client_id": "c", "publish_qos": 3})).contains("0, 1 or 2"));
    assert!(reason(json!({"host": "h", "client_id": "c", "tpoics": []})).contains("tpoics"));
    let ca = |tls: bool, file: &str| {
        reason(json!({"host": "h", "client_id": "c", "tls": tls, "ca_file": file}))
    };
    assert_eq!(ca(false, "/dev/null"), "`ca_file` is set but `tls` is not");
    assert!(ca(true, "/nonexistent/ca.pem").starts_with("`ca_file` /nonexistent/ca.pem: "));
    assert_eq!(
        ca(true, "/dev/null"),
        "`ca_file` /dev/null: no PEM certificate in it"
    );
}

#[test]
fn origin_and_hops_default_to_the_account() {
    assert_eq!(
        origin_and_hops(None, "mqtt:main"),
        ("mqtt:main".to_owned(), 0)
    );
    // A gateway's send: `extra.gateway`, as the host's gateways write it.
    let extra = json!({"gateway": {"name": "g", "origin": "irc:main/#test", "hops": 2}});
    assert_eq!(
        origin_and_hops(Some(&extra), "mqtt:main"),
        ("irc:main/#test".to_owned(), 2)
    );
    assert_eq!(
        origin_and_hops(Some(&json!({"other": 1})), "mqtt:main"),
        ("mqtt:main".to_owned(), 0)
    );
}

#[test]
fn only_a_bridged_publish_carries_a_gateway_tag_inbound() {
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        gateway_tag(s("irc:main/#test"), s("3")),
        Some(json!({"origin": "irc:main/#test", "hops": 3}))
    );
    // A plain send (hops 0), missing or bad properties: a new message.
    assert_eq!(gateway_tag(s("mqtt:main"), s("0")), None);
    assert_eq!(gateway_tag(None, s("2")), None);
    assert_eq!(gateway_tag(s("irc:main/#test"), None), None);
    assert_eq!(gateway_tag(s("irc:main/#test"), s("many")), None);
    assert_eq!(gateway_tag(s(""), s("1")), None);
}

/// A port nothing listens on: bound, then freed.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The reason `start` refuses the account with, or a panic naming what happened instead.
fn not_configured(harness: &Harness<Mqtt>, account: &str) -> String {
    match harness.start(account) {
        Err(HarnessError::NotConfigured {
            reason: Some(reason),
            ..
        }) => reason,
        Err(other) => panic!("{account}: {other}"),
        Ok(_) => panic!("{account}: started"),
    }
}

/// Waits for the task to end by itself; returns its error message.
async fn ended_with_error(account: &mut RunningAccount<Mqtt>) -> String {
    let result = account.join_within(secs(10)).await.unwrap();
    result.unwrap_err().message().to_owned()
}

#[tokio::test]
async fn a_bad_account_table_is_refused_with_a_reason_naming_the_key() {
    let cases = [
        ("client_id = \"c\"", "missing `host`"),
        ("host = \"127.0.0.1\"", "missing `client_id`"),
        (
            "host = \"127.0.0.1\"\nclient_id = \"c\"\ntopcis = []",
            "unknown field `topcis`",
        ),
        (
            "host = \"127.0.0.1\"\nclient_id = \"\"",
            "`client_id` is empty",
        ),
        (
            "host = \"127.0.0.1\"\nclient_id = \"c\"\npublish_qos = 3",
            "`publish_qos` must be 0, 1 or 2, got 3",
        ),
        (
            "host = \"127.0.0.1\"\nclient_id = \"c\"\ntopics = [{ filter = \"a/#\", qos = 5 }]",
            "`topics.qos` must be 0, 1 or 2, got 5",
        ),
        (
            "host = \"127.0.0.1\"\nclient_id = \"c\"\nkeep_alive_secs = 0",
            "`keep_alive_secs` must be at least 1",
        ),
    ];
    for (table, reason) in cases {
        let harness = Harness::new(Mqtt, &format!("[accounts.main]\n{table}\n")).unwrap();
        let refused = not_configured(&harness, "main");
        assert!(refused.contains(reason), "{table}: {refused}");
        assert!(!refused.contains('\n'), "{table}: not one line: {refused}");
    }
}

#[tokio::test]
async fn the_hosts_reserved_keys_do_not_upset_the_plugin() {
    let port = dead_port();
    let table = |extra: &str| {
        format!(
            "enabled = true\n[accounts.reserved]\nhost = \"127.0.0.1\"\nport = {port}\n\
             client_id = \"channeld-test\"\n{extra}\n"
        )
    };
    let reserved = "enabled = true\nhealth_monitor = { enabled = false }\nisolation = \"none\"\n\
                    memory_limit = \"256MiB\"";
    let harness = Harness::new(Mqtt, &table(reserved)).unwrap();
    harness.validate().unwrap();
    let mut account = harness.start("reserved").unwrap();
    // It got as far as connecting: the keys were not the plugin's business.
    let error = ended_with_error(&mut account).await;
    assert!(
        error.starts_with(&format!("connection to 127.0.0.1:{port} lost: ")),
        "{error}"
    );
    // The same keys, misspelt, are the plugin's own, and it denies unknown keys.
    let harness = Harness::new(Mqtt, &table("health_monitr = { enabled = false }")).unwrap();
    let refused = not_configured(&harness, "reserved");
    assert!(
        refused.contains("unknown field `health_monitr`"),
        "{refused}"
    );
}

#[tokio::test]
async fn an_unreachable_broker_ends_the_task_with_an_error_and_not_connected() {
    let port = dead_port();
    let harness = Harness::new(
        Mqtt,
        &format!(
            "[accounts.unreachable]\nhost = \"127.0.0.1\"\nport = {port}\n\
             client_id = \"channeld-test\"\ntopics = [{{ filter = \"chat/#\", qos = 1 }}]\n"
        ),
    )
    .unwrap();
    let mut account = harness.start("unreachable").unwrap();
    let error = ended_with_error(&mut account).await;
    assert!(
        error.starts_with(&format!("connection to 127.0.0.1:{port} lost: ")),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
    let record = account.record();
    assert!(!record.connectivity.contains(&true), "{record:?}");
    assert_eq!(record.connected(), Some(false));
    assert!(record.delivered.is_empty());
}
