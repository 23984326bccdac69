//! ABI 1.1 with real plugin files under the real supervisor (in-process, so each step is
//! deterministic): a plugin built against the frozen 1.0 crate running 100 accounts and being
//! replaced by a 1.1 build of its channel; `deliver_async` waiting for the host's message sink;
//! `task_polled` deciding `running`; reserved keys stripped before a strict plugin sees them;
//! `validate_channel`; the batch entries; the 1.0-era source built against 1.1.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use channeld::{
    clock::{Clock, SystemClock},
    config::{ChannelSection, SupervisorConfig},
    ffi::FfiPlugin,
    host::{AccountKey, AccountLink, HostSink},
    inbound::MessageSink,
    load::load_root_module,
    plugin::{BoxFuture, Outbound, Plugin},
    status::{AccountSnapshot, StatusBoard},
    supervise::{StartOutcome, StopOutcome, Supervisor, policy::FixedJitter},
};
use channeld_plugin_abi::abi::{InboundMessage, LogLevel};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::util;

/// How long a test waits for something that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(30);

/// The `fixture` plugin built against the frozen plugin-abi 1.0 crate.
fn fixture_1_0() -> PathBuf {
    util::lookalike_file(
        "abi-1.0",
        "channeld-plugin-fixture10",
        "libchanneld_plugin_fixture10.so",
    )
}

/// The `fixture` plugin built against the current (1.1) crate.
fn fixture_1_1() -> PathBuf {
    util::plugin_file("channeld-plugin-fixture")
}

/// Loads a private copy of `file` and calls `init` with `workers` runtime threads; its host
/// services write to `board`.
fn load(
    file: &Path,
    dir: &tempfile::TempDir,
    name: &str,
    workers: u32,
    board: &Arc<StatusBoard>,
) -> Arc<FfiPlugin> {
    let copy = util::copy_plugin(file, dir.path(), name);
    let module = load_root_module(&copy).unwrap_or_else(|e| panic!("load {name}: {e}"));
    let plugin = FfiPlugin::new(module, &copy).expect("metadata");
    let sink: Arc<dyn HostSink> = board.clone();
    plugin
        .init(workers, LogLevel::Warn, sink)
        .unwrap_or_else(|e| panic!("init {name}: {e}"));
    Arc::new(plugin)
}

fn board() -> Arc<StatusBoard> {
    Arc::new(StatusBoard::new(Arc::new(SystemClock)))
}

fn supervisor(board: &Arc<StatusBoard>, policy: SupervisorConfig) -> Supervisor {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    Supervisor::new(
        policy,
        Duration::from_secs(10),
        board.clone(),
        clock,
        Arc::new(FixedJitter(0.0)),
    )
}

fn quick_policy() -> SupervisorConfig {
    SupervisorConfig {
        // No automatic restart within a test's life.
        initial_backoff: Duration::from_secs(600),
        stop_timeout: Duration::from_millis(500),
        start_timeout: Duration::from_secs(10),
        ..SupervisorConfig::default()
    }
}

fn section(table: Value) -> ChannelSection {
    ChannelSection { table }
}

fn status(board: &StatusBoard, account: &str) -> AccountSnapshot {
    board
        .get(&AccountKey::new("fixture", account))
        .unwrap_or_default()
}

/// Polls `check` until it holds, failing with `what` and the last value after [`PATIENCE`].
async fn eventually<T: std::fmt::Debug>(what: &str, mut check: impl FnMut() -> (bool, T)) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (done, value) = check();
        if done {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened; last: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_1_0_plugin_runs_100_accounts_and_is_replaced_by_a_1_1_build() {
    let dir = tempfile::tempdir().unwrap();
    let board = board();
    let old = load(&fixture_1_0(), &dir, "fixture-1.0.so", 2, &board);
    assert!(
        old.is_abi_1_0(),
        "a 1.0 plugin is driven through the 1.0 layout"
    );
    assert_eq!(old.info().abi_version, "1.0.0");
    assert!(!old.reports_task_polled());

    let mut accounts = serde_json::Map::new();
    for i in 0..99 {
        accounts.insert(format!("a{i:03}"), json!({}));
    }
    // The 1.0 `deliver` (blocking, from the plugin's thread) of five messages, then a clean exit.
    accounts.insert("a099".into(), json!({ "mode": "flood", "messages": 5 }));
    let table = json!({ "accounts": accounts });
    let sup = supervisor(&board, quick_policy());
    sup.add_channel(old.clone(), section(table.clone()))
        .await
        .expect("register the 1.0 plugin");

    // start: all 100, and "running" means "start returned" for a 1.0 plugin.
    let summary = sup.start_all().await;
    assert_eq!(summary["fixture"].started, 100, "{summary:?}");
    for i in 0..99 {
        assert!(status(&board, &format!("a{i:03}")).running, "a{i:03}");
    }
    // deliver: the five messages arrived through the 1.0 host-services vtable.
    eventually("five messages from a099", || {
        let n = status(&board, "a099").inbound_messages;
        (n == 5, n)
    })
    .await;

    // stop: one account, through the blocking 1.0 stop hook.
    let stopped = sup.stop("fixture", Some("a000")).await.unwrap();
    assert_eq!(stopped[0].1, StopOutcome::Stopped);
    assert!(!status(&board, "a000").running);
    // logout: the 1.0 blocking logout hook; the fixture clears and says so.
    assert!(sup.logout("fixture", "a001").await.unwrap());
    let a001 = status(&board, "a001");
    assert!(!a001.running);
    assert_eq!(a001.last_error.as_deref(), Some("logged out"));
    // send: through the 1.0 entry.
    let sent = old
        .send(Outbound {
            account: "a002".into(),
            conversation: "#room".into(),
            text: "hi".into(),
            reply_to: None,
            extra: None,
        })
        .await
        .unwrap();
    assert_eq!(sent, "sent:#room:hi");

    // hot-replace by a 1.1 build of the same channel: every account a user did not stop moves.
    let new = load(&fixture_1_1(), &dir, "fixture-1.1.so", 2, &board);
    assert!(!new.is_abi_1_0());
    let outcomes = sup
        .replace_channel(new.clone(), section(table))
        .await
        .expect("replace");
    let moved: BTreeMap<_, _> = outcomes
        .into_iter()
        .map(|(key, outcome)| (key.account, outcome))
        .collect();
    assert_eq!(moved.len(), 98, "a000 and a001 were stopped by a user");
    assert!(!moved.contains_key("a000") && !moved.contains_key("a001"));
    for (account, outcome) in &moved {
        assert_eq!(outcome, &StartOutcome::Started, "{account}");
    }
    // The old version's tasks all ended; the new version runs them.
    let described = old.describe_account("a050").unwrap().unwrap();
    assert_eq!(
        (&described["starts"], &described["ends"]),
        (&json!(1), &json!(1))
    );
    // Counted in the task's first poll, a moment after the start's answer: awaited.
    eventually("a050 running on the new build", || {
        let described = new.describe_account("a050").unwrap().unwrap();
        (described["running"] == 1, described)
    })
    .await;
    assert!(status(&board, "a050").running);
    sup.shutdown().await;
    for plugin in [&old, &new] {
        plugin.shutdown().unwrap();
    }
}

/// A message sink that holds every acceptance until the test releases it with a sequence number.
#[derive(Default)]
struct GateSink {
    waiting: Mutex<Vec<oneshot::Sender<u64>>>,
}

impl MessageSink for GateSink {
    fn accept(
        &self,
        _key: &AccountKey,
        _message: InboundMessage,
    ) -> BoxFuture<Result<u64, String>> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().push(tx);
        Box::pin(async move { rx.await.map_err(|_| "the gate was dropped".to_owned()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_async_completes_only_after_the_host_sink_accepted_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(GateSink::default());
    let messages: Arc<dyn MessageSink> = gate.clone();
    let board = Arc::new(StatusBoard::with_message_sink(
        Arc::new(SystemClock),
        messages,
    ));
    let plugin = load(&fixture_1_1(), &dir, "fixture-gate.so", 2, &board);
    plugin
        .configure(&json!({ "accounts": { "d": { "mode": "deliver_one" } } }))
        .unwrap();
    let key = AccountKey::new("fixture", "d");
    let sink: Arc<dyn HostSink> = board.clone();
    let link = AccountLink::for_account(key.clone(), board.begin_generation(&key), sink);
    let task = plugin.start_account("d", link).unwrap();

    // The plugin's `ctx.deliver(..).await` reached the sink, which has not accepted it yet.
    eventually("the message reaching the sink", || {
        let n = gate.waiting.lock().unwrap().len();
        (n == 1, n)
    })
    .await;
    assert_eq!(status(&board, "d").inbound_messages, 1);
    assert_eq!(
        status(&board, "d").extra.get("deliveredSeq"),
        None,
        "deliver_async completed before the sink accepted the message"
    );
    // Accepted as number 42: the plugin's await completes with exactly that number.
    let release = gate.waiting.lock().unwrap().pop().unwrap();
    release.send(42).unwrap();
    eventually("the plugin seeing its sequence number", || {
        let seq = status(&board, "d").extra.get("deliveredSeq").cloned();
        (seq == Some(json!(42)), seq)
    })
    .await;
    plugin.abort_task(task.id);
    tokio::time::timeout(PATIENCE, task.done)
        .await
        .unwrap()
        .unwrap();
    plugin.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_whose_task_the_starved_runtime_never_polls_is_never_running() {
    let dir = tempfile::tempdir().unwrap();
    let board = board();
    // One runtime worker, which the blocker's task holds for 3 s.
    let plugin = load(&fixture_1_1(), &dir, "fixture-starved.so", 1, &board);
    assert!(plugin.reports_task_polled());
    let policy = SupervisorConfig {
        start_timeout: Duration::from_millis(300),
        ..quick_policy()
    };
    let sup = supervisor(&board, policy);
    let table = json!({ "accounts": {
        "blocker": { "mode": "block_thread", "block_ms": 3000 },
        "starved": {},
    } });
    sup.add_channel(plugin.clone(), section(table))
        .await
        .unwrap();
    let started = sup.start("fixture", Some("blocker")).await.unwrap();
    assert_eq!(started[0].1, StartOutcome::Started);

    // The plugin's start returns a task, but the runtime cannot poll it: not running.
    let started = sup.start("fixture", Some("starved")).await.unwrap();
    assert!(
        matches!(started[0].1, StartOutcome::TimedOut(_)),
        "{:?}",
        started[0].1
    );
    assert!(
        !status(&board, "starved").running,
        "{:?}",
        status(&board, "starved")
    );
    // Once the worker is free the runtime polls it, and only then is it running.
    eventually("the starved account running once polled", || {
        let s = status(&board, "starved");
        (s.running, s)
    })
    .await;
    sup.shutdown().await;
    plugin.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_keys_are_stripped_before_a_strict_plugin_sees_them_and_validate_can_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let board = board();
    let plugin = load(&fixture_1_1(), &dir, "fixture-strict.so", 2, &board);
    let sup = supervisor(&board, quick_policy());
    // `strict = true`: the fixture refuses any key it does not know (deny_unknown_fields).
    let table = json!({
        "strict": true,
        "health_monitor": { "enabled": false },
        "isolation": "none",
        "accounts": {
            "a": { "mode": "run", "enabled": true, "health_monitor": { "enabled": false },
                   "memory_limit": "64MiB" },
            "off": { "enabled": false },
        }
    });
    sup.add_channel(plugin.clone(), section(table))
        .await
        .unwrap_or_else(|e| panic!("the host's keys reached the plugin: {e}"));
    let started = sup.start("fixture", None).await.unwrap();
    let outcomes: BTreeMap<_, _> = started.into_iter().map(|(k, o)| (k.account, o)).collect();
    assert_eq!(outcomes["a"], StartOutcome::Started);
    // `enabled` is the host's: it decides without the plugin seeing the key.
    assert_eq!(outcomes["off"], StartOutcome::Disabled("disabled".into()));
    sup.shutdown().await;

    // validate_channel: the plugin refuses a table with its own one-line reason, and the host
    // does not apply it.
    let sup = supervisor(&board, quick_policy());
    let error = sup
        .add_channel(
            plugin.clone(),
            section(json!({ "invalid": "no server named" })),
        )
        .await
        .err()
        .expect("an invalid table is refused");
    let line = error.to_string();
    assert!(
        line.contains("validate_channel") && line.contains("no server named"),
        "{line}"
    );
    assert!(!line.contains('\n'), "{line}");
    plugin.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_start_and_abort_work_with_1_1_and_fall_back_for_1_0() {
    let dir = tempfile::tempdir().unwrap();
    let board = board();
    for (file, name) in [
        (fixture_1_1(), "batch-1.1.so"),
        (fixture_1_0(), "batch-1.0.so"),
    ] {
        let plugin = load(&file, &dir, name, 2, &board);
        let ids = ["b1", "b2", "b3", "b4"];
        let accounts: serde_json::Map<_, _> =
            ids.iter().map(|a| (a.to_string(), json!({}))).collect();
        plugin.configure(&json!({ "accounts": accounts })).unwrap();
        let sink: Arc<dyn HostSink> = board.clone();
        let batch = ids
            .iter()
            .map(|id| {
                let key = AccountKey::new("fixture", *id);
                let generation = board.begin_generation(&key);
                (
                    id.to_string(),
                    AccountLink::for_account(key, generation, sink.clone()),
                )
            })
            .collect();
        let tasks: Vec<_> = plugin
            .start_accounts(batch)
            .into_iter()
            .map(|t| t.unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();
        assert_eq!(tasks.len(), 4, "{name}");
        let task_ids: Vec<u64> = tasks.iter().map(|t| t.id).collect();
        assert_eq!(plugin.abort_tasks(&task_ids), 4, "{name}");
        for task in tasks {
            let ended = tokio::time::timeout(PATIENCE, task.done).await;
            assert_eq!(ended.expect("ends after its abort"), Ok(()), "{name}");
        }
        let described = plugin.describe_account("b3").unwrap().unwrap();
        assert_eq!(
            (&described["starts"], &described["ends"]),
            (&json!(1), &json!(1))
        );
        plugin.shutdown().unwrap();
    }
}

#[tokio::test]
async fn the_1_0_era_fixture_source_builds_unchanged_against_1_1_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let board = board();
    let file = util::plugin_file("channeld-plugin-fixture-1-0-source");
    let plugin = load(&file, &dir, "fixture-1.0-source.so", 2, &board);
    assert_eq!(plugin.info().abi_version, "1.1.0");
    assert!(!plugin.is_abi_1_0());
    plugin
        .configure(&json!({ "accounts": { "e": { "mode": "exit", "after_ms": 1 } } }))
        .unwrap();
    let key = AccountKey::new("fixture", "e");
    let sink: Arc<dyn HostSink> = board.clone();
    let link = AccountLink::for_account(key.clone(), board.begin_generation(&key), sink);
    let task = plugin.start_account("e", link).unwrap();
    assert_eq!(
        tokio::time::timeout(PATIENCE, task.done).await.unwrap(),
        Ok(())
    );
    assert_eq!(status(&board, "e").connected, Some(true));
    plugin.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_spawned_with_ctx_spawn_ends_with_the_abort_before_the_account_counts_as_ended() {
    let dir = tempfile::tempdir().unwrap();
    let board = board();
    let plugin = load(&fixture_1_1(), &dir, "fixture-spawn.so", 2, &board);
    plugin
        .configure(&json!({ "accounts": { "s": { "mode": "spawn" } } }))
        .unwrap();
    let children =
        |plugin: &FfiPlugin| plugin.describe_account("s").unwrap().unwrap()["children"].clone();
    let key = AccountKey::new("fixture", "s");
    let sink: Arc<dyn HostSink> = board.clone();
    let link = AccountLink::for_account(key.clone(), board.begin_generation(&key), sink);
    let task = plugin.start_account("s", link).unwrap();
    eventually("the child running", || {
        let n = children(&plugin);
        (n == json!(1), n)
    })
    .await;
    assert!(plugin.abort_task(task.id));
    assert_eq!(
        tokio::time::timeout(PATIENCE, task.done).await.unwrap(),
        Ok(())
    );
    // The account's task ended only once its child had: none is left behind.
    assert_eq!(children(&plugin), json!(0));
    plugin.shutdown().unwrap();
}
