//! The channel in process, through channeld's plugin test harness: no channeld, no `.so`, and a
//! paused clock, so the 30-second heartbeat takes no time.

use channeld_plugin_abi::sdk::EventKind;
use channeld_plugin_test::{Harness, HarnessError, secs};

use super::Channel;

const CONFIG: &str = r#"
[accounts.main]
room = "lobby"
token = "t0ken"
"#;

#[tokio::test(start_paused = true)]
async fn greets_echoes_what_it_sends_beats_and_stops_on_abort() {
    let harness = Harness::new(Channel::default(), CONFIG).unwrap();
    let mut account = harness.start("main").unwrap();
    account
        .wait_until(secs(5), |r| r.delivered.len() == 1)
        .await
        .unwrap();
    let record = account.record();
    assert_eq!(record.delivered[0].text, "hello");
    assert_eq!(record.delivered[0].conversation, "lobby");
    assert_eq!(record.status["room"], "lobby");
    assert_eq!(record.connected(), Some(true));

    let id = account.send("lobby", "ping").await.unwrap();
    assert_eq!(id, "{{channel_id}}-1");
    account
        .wait_until(secs(5), |r| r.delivered.len() == 2)
        .await
        .unwrap();
    assert_eq!(account.record().delivered[1].text, "ping");

    // Three heartbeats in 95 seconds of the paused clock.
    tokio::time::sleep(secs(95)).await;
    let beats = account
        .record()
        .events
        .iter()
        .filter(|k| **k == EventKind::Other)
        .count();
    assert_eq!(beats, 3);

    // The abort ends the task and the heartbeat task it spawned.
    account.abort_within(secs(5)).await.unwrap().unwrap();
    assert_eq!(account.spawned_running(), 0);
    assert_eq!(account.record().connected(), Some(false));
    let stopped = account.send("lobby", "late").await.unwrap_err().to_string();
    assert!(stopped.contains("account main is not running"), "{stopped}");
}

#[tokio::test]
async fn an_account_without_a_token_is_not_configured_and_says_why() {
    let harness = Harness::new(Channel::default(), "[accounts.main]\nroom = \"lobby\"\n").unwrap();
    match harness.start("main") {
        Err(HarnessError::NotConfigured {
            reason: Some(reason),
            ..
        }) => {
            assert!(reason.contains("missing field `token`"), "{reason}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("started without a token"),
    }
}
