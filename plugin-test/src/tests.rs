//! The harness on small plugins written for the purpose.

use std::time::Duration;

use channeld_plugin_abi::sdk::prelude::*;

use super::*;

/// Reports, delivers after a paused-clock timer, spawns a ticker, answers `send`.
#[derive(Default)]
struct Ticker;

impl ChannelPlugin for Ticker {
    const CHANNEL_ID: &'static str = "ticker";

    fn is_configured(&self, account: &Account) -> Verdict {
        match account.get("every_secs") {
            Some(_) => Verdict::Yes,
            None => Verdict::no("missing `every_secs`"),
        }
    }

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        let every = ctx
            .account()
            .get("every_secs")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        ctx.host().set_connected(true);
        ctx.host().patch_status(&json!({ "mode": "ticker" }))?;
        let host = ctx.host().clone();
        ctx.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(every)).await;
                host.record_event(EventKind::Other);
            }
        });
        tracing::info!(every, "ticker started");
        // An hour on a paused clock passes at once.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        ctx.deliver(Inbound::new("clock", "ticker", "an hour"))
            .await?;
        ctx.aborted().await;
        Ok(())
    }

    async fn send(&self, message: Outbound) -> PluginResult<String> {
        if message.text.is_empty() {
            return Err(PluginError::new("empty message"));
        }
        Ok(format!("{}:{}", message.conversation, message.text.len()))
    }
}

const TICKER: &str = "[accounts.main]\nevery_secs = 60\nenabled = true\n";

#[tokio::test(start_paused = true)]
async fn a_plugin_runs_on_the_paused_clock_and_its_reports_are_recorded() {
    let harness = Harness::new(Ticker, TICKER).unwrap();
    // The host-owned key is gone before the plugin sees the table.
    assert_eq!(harness.resolve("main").unwrap().get("enabled"), None);
    let mut account = harness.start("main").unwrap();
    account
        .wait_until(secs(4000), |r| r.delivered.len() == 1)
        .await
        .unwrap();
    let record = account.record();
    assert_eq!(record.delivered[0].text, "an hour");
    assert_eq!(record.connected(), Some(true));
    assert_eq!(record.status["mode"], "ticker");
    // 60 ticks of the spawned task in the hour, on the paused clock.
    let ticks = record
        .events
        .iter()
        .filter(|k| **k == EventKind::Other)
        .count();
    assert!((59..=61).contains(&ticks), "{ticks} ticks");
    assert_eq!(account.send("room", "hello").await.unwrap(), "room:5");
    let refused = account.send("room", "").await.unwrap_err().to_string();
    assert!(
        refused.contains("ticker:main: send failed: empty message"),
        "{refused}"
    );
    assert_eq!(account.spawned_running(), 1);
    account.abort_within(secs(1)).await.unwrap().unwrap();
    assert_eq!(account.spawned_running(), 0);
    let logs = harness.logs();
    let started = logs.iter().find(|l| l.message == "ticker started").unwrap();
    assert_eq!(started.account.as_deref(), Some("main"));
    assert_eq!(started.fields["every"], 60);
}

#[tokio::test(start_paused = true)]
async fn refusals_name_the_account_and_the_reason() {
    let harness = Harness::new(Ticker, "[accounts.a]\n[accounts.b]\nenabled = false\n").unwrap();
    let not = harness.start("a").err().unwrap().to_string();
    assert_eq!(not, "ticker:a: not configured: missing `every_secs`");
    let off = harness.start("b").err().unwrap().to_string();
    assert_eq!(off, "ticker:b: not enabled: disabled");
    let bad = Harness::new(Ticker, "accounts = 3 = 4")
        .err()
        .unwrap()
        .to_string();
    assert!(bad.starts_with("channel ticker: the test's TOML:"), "{bad}");
}

/// Patches its status with a struct, a `json!` object, a long one, a short one after it, and a
/// value that is not an object.
#[derive(Default)]
struct Patcher;

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Counters {
    starts: u32,
    last_room: &'static str,
}

impl ChannelPlugin for Patcher {
    const CHANNEL_ID: &'static str = "patcher";

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        let host = ctx.host();
        host.patch_status(&Counters {
            starts: 1,
            last_room: "lobby",
        })?;
        host.patch_status(&json!({ "mode": "patching" }))?;
        // Longer than the buffer a thread keeps; the next patch must not see any of it.
        host.patch_status(&json!({ "long": "x".repeat(4000) }))?;
        host.patch_status(&Counters {
            starts: 2,
            last_room: "hall",
        })?;
        let refused = host.patch_status(&42).unwrap_err().to_string();
        host.patch_status(&json!({ "refused": refused }))?;
        ctx.aborted().await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_status_patch_may_be_a_struct_or_a_json_object_and_must_be_an_object() {
    let harness = Harness::new(Patcher, "").unwrap();
    let mut account = harness.start("main").unwrap();
    account
        .wait_until(secs(5), |r| r.patches.len() == 5)
        .await
        .unwrap();
    let record = account.record();
    assert_eq!(
        record.patches[0],
        json!({ "starts": 1, "lastRoom": "lobby" })
    );
    assert_eq!(record.patches[1], json!({ "mode": "patching" }));
    assert_eq!(record.patches[2]["long"].as_str().map(str::len), Some(4000));
    assert_eq!(
        record.patches[3],
        json!({ "starts": 2, "lastRoom": "hall" })
    );
    assert_eq!(
        record.patches[4],
        json!({ "refused": "a status patch must be a JSON object" })
    );
    assert_eq!(record.status["starts"], 2);
    account.abort_within(secs(5)).await.unwrap().unwrap();
}

/// Ignores the abort: the harness must say so instead of hanging.
#[derive(Default)]
struct Stubborn;

impl ChannelPlugin for Stubborn {
    const CHANNEL_ID: &'static str = "stubborn";

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        ctx.spawn(async { std::future::pending().await });
        if ctx.account().get("panic").is_some() {
            panic!("boom in start");
        }
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_that_ignores_the_abort_fails_the_deadline() {
    let harness = Harness::new(Stubborn, "").unwrap();
    let mut account = harness.start("main").unwrap();
    tokio::task::yield_now().await;
    let error = account.abort_within(secs(5)).await.unwrap_err().to_string();
    assert_eq!(
        error,
        "stubborn:main: not ended 5s after the abort: the account's task and 0 spawned task(s) \
         still running"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_start_is_an_error_with_its_message() {
    let harness = Harness::new(Stubborn, "[accounts.main]\npanic = true\n").unwrap();
    let mut account = harness.start("main").unwrap();
    let ended = account.join_within(secs(5)).await.unwrap().unwrap_err();
    assert!(
        ended.message().contains("boom in start"),
        "{}",
        ended.message()
    );
}

/// Ends by itself while a task it spawned is still busy on another worker thread.
#[derive(Default)]
struct Quick;

/// Set when the spawned task's future is dropped.
static SPAWNED_DROPPED: AtomicBool = AtomicBool::new(false);

struct SetOnDrop;

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        SPAWNED_DROPPED.store(true, Ordering::SeqCst);
    }
}

impl ChannelPlugin for Quick {
    const CHANNEL_ID: &'static str = "quick";

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        ctx.spawn(async move {
            let _flag = SetOnDrop;
            // Busy on its worker: it sees the abort only at its next await point.
            std::thread::sleep(Duration::from_millis(300));
            std::future::pending().await
        });
        // Ends (on the other worker) while the spawned task is still busy.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_ends_only_once_its_spawned_tasks_have_ended() {
    let harness = Harness::new(Quick, "").unwrap();
    let mut account = harness.start("main").unwrap();
    account.join_within(secs(10)).await.unwrap().unwrap();
    assert!(
        SPAWNED_DROPPED.load(Ordering::SeqCst),
        "the account's task counted as ended while a task it spawned was still running"
    );
    assert_eq!(account.spawned_running(), 0);
}

/// Sends through the SDK's queue (`ctx.outbound()` and the default `send` hook): answers with the
/// account id and a count, fails "fail", drops "drop" unanswered, and holds every message while
/// its table says `hold = true`.
#[derive(Default)]
struct Queued;

impl ChannelPlugin for Queued {
    const CHANNEL_ID: &'static str = "queued";

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        let mut outbound = ctx.outbound();
        ctx.host().set_connected(true);
        if ctx.account().get("hold").is_some() {
            ctx.aborted().await;
            return Ok(());
        }
        let mut sent = 0;
        loop {
            tokio::select! {
                () = ctx.aborted() => return Ok(()),
                Some(request) = outbound.recv() => {
                    match request.message().text.as_str() {
                        "fail" => request.finish(Err(PluginError::new("refused by the channel"))),
                        "drop" => drop(request),
                        _ => {
                            sent += 1;
                            let id = format!("{}-{sent}", ctx.account().id);
                            request.finish(Ok(id));
                        }
                    }
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_send_hands_messages_to_the_accounts_own_queue() {
    // Two harnesses with an account of the same name, side by side: each reaches its own task.
    let harness = Harness::new(Queued, "[accounts.main]\n").unwrap();
    let other = Harness::new(Queued, "[accounts.main]\n[accounts.b]\n").unwrap();
    // Not running yet, and no account opened a queue: the channel does not (yet) send.
    let early = harness
        .send(Outbound {
            account: "main".to_owned(),
            text: "hi".to_owned(),
            ..Outbound::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        early.contains("channel queued does not support sending"),
        "{early}"
    );

    let mut account = harness.start("main").unwrap();
    let mut beside = other.start("main").unwrap();
    account
        .wait_until(secs(5), |r| r.connected() == Some(true))
        .await
        .unwrap();
    beside
        .wait_until(secs(5), |r| r.connected() == Some(true))
        .await
        .unwrap();
    assert_eq!(account.send("room", "one").await.unwrap(), "main-1");
    assert_eq!(account.send("room", "two").await.unwrap(), "main-2");
    assert_eq!(beside.send("room", "one").await.unwrap(), "main-1");
    let failed = account.send("room", "fail").await.unwrap_err().to_string();
    assert_eq!(failed, "queued:main: send failed: refused by the channel");
    let dropped = account.send("room", "drop").await.unwrap_err().to_string();
    assert_eq!(
        dropped,
        "queued:main: send failed: the account's task ended or dropped the message before \
         sending it"
    );
    // Another account of the same plugin that is not running: said so.
    let b = other
        .send(Outbound {
            account: "b".to_owned(),
            text: "hi".to_owned(),
            ..Outbound::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(b, "queued:b: send failed: account b is not running");

    account.abort_within(secs(5)).await.unwrap().unwrap();
    let stopped = account.send("room", "late").await.unwrap_err().to_string();
    assert_eq!(
        stopped,
        "queued:main: send failed: account main is not running"
    );
    // The other harness's account is untouched by this one's stop.
    assert_eq!(beside.send("room", "two").await.unwrap(), "main-2");
    beside.abort_within(secs(5)).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_message_still_queued_when_the_task_ends_fails_and_says_why() {
    let harness = Harness::new(Queued, "[accounts.main]\nhold = true\n").unwrap();
    let mut account = harness.start("main").unwrap();
    account
        .wait_until(secs(5), |r| r.connected() == Some(true))
        .await
        .unwrap();
    let waiting = harness.send(Outbound {
        account: "main".to_owned(),
        text: "one".to_owned(),
        ..Outbound::default()
    });
    let abort = async {
        tokio::time::sleep(secs(1)).await;
        account.abort_within(secs(5)).await.unwrap().unwrap();
    };
    let (sent, ()) = tokio::join!(waiting, abort);
    assert_eq!(
        sent.unwrap_err().to_string(),
        "queued:main: send failed: the account's task ended or dropped the message before \
         sending it"
    );
}
