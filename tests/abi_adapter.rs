//! The host-side adapter against real plugin cdylibs (the SDK's `echo` example and the `fixture`
//! plugin), loaded through the real loader. Each test loads its own copy of a library file, so
//! each has its own plugin instance (statics, runtime) and tests stay independent.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use channeld::{
    host::{AccountKey, AccountLink, HostSink},
    plugin::{Check, Outbound, Plugin},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::timeout,
};

use crate::util::{self, Loaded};

/// A bound on awaits that should complete at once, so a regression fails instead of hanging.
const PROMPT: Duration = Duration::from_secs(10);

fn fresh_fixture(dir: &tempfile::TempDir, name: &str) -> Loaded {
    let file = util::copy_plugin(
        &util::plugin_file("channeld-plugin-fixture"),
        dir.path(),
        name,
    );
    util::load(&file)
}

fn link(loaded: &Loaded, account: &str) -> AccountLink {
    let key = AccountKey::new(loaded.plugin.info().channel_id.clone(), account);
    let generation = loaded.board.begin_generation(&key);
    let sink: Arc<dyn HostSink> = loaded.board.clone();
    AccountLink::for_account(key, generation, sink)
}

fn status(loaded: &Loaded, account: &str) -> channeld::status::AccountSnapshot {
    let key = AccountKey::new(loaded.plugin.info().channel_id.clone(), account);
    loaded.board.get(&key).expect("account has a status")
}

/// The SDK resolves each account once per config: a reconfigure must change what the next
/// hooks and the next start see (an account resolved from the old table is never handed out).
#[tokio::test]
async fn a_reconfigure_changes_what_the_next_hooks_and_start_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_fixture(&dir, "fixture-reconfigure.so");
    let plugin = &loaded.plugin;
    let table = |connected: bool| {
        json!({ "accounts": { "a": {
            "mode": "exit", "after_ms": 1, "connected": connected, "configured": connected,
        } } })
    };

    plugin.configure(&table(true)).unwrap();
    assert_eq!(plugin.resolve_account("a").unwrap()["connected"], true);
    assert_eq!(plugin.is_configured("a").unwrap(), Check::Yes);
    let task = plugin.start_account("a", link(&loaded, "a")).unwrap();
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
    assert_eq!(status(&loaded, "a").connected, Some(true));

    plugin.configure(&table(false)).unwrap();
    assert_eq!(plugin.resolve_account("a").unwrap()["connected"], false);
    assert_eq!(
        plugin.is_configured("a").unwrap(),
        Check::No(Some("missing token".into()))
    );
    let task = plugin.start_account("a", link(&loaded, "a")).unwrap();
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
    assert_eq!(status(&loaded, "a").connected, Some(false));
}

/// A stop hook the plugin says has nothing to do for an account is not run: the host's stop is
/// done at its first poll, even while every worker of the plugin's runtime is blocked (a hook
/// that ran would need one). One that has something to do still runs on the plugin's runtime
/// once a worker is free (its panic still reaches the host as an error).
#[tokio::test]
async fn a_stop_hook_with_nothing_to_do_for_the_account_is_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_fixture(&dir, "fixture-stop-needed.so");
    let plugin = &loaded.plugin;
    let blocker = json!({ "mode": "block_thread", "block_ms": 1000 });
    plugin
        .configure(&json!({ "accounts": {
            "b1": blocker, "b2": blocker,
            "plain": {},
            "panicky": { "panic_in": ["stop"] },
        } }))
        .unwrap();
    // Both workers (the test loader gives the plugin two) block in the blockers' tasks, which
    // patch their status just before.
    let blockers: Vec<_> = ["b1", "b2"]
        .into_iter()
        .map(|b| plugin.start_account(b, link(&loaded, b)).unwrap())
        .collect();
    let deadline = std::time::Instant::now() + PROMPT;
    while !["b1", "b2"].iter().all(|b| {
        let key = AccountKey::new("fixture", *b);
        loaded
            .board
            .get(&key)
            .is_some_and(|s| s.extra.get("fixtureStarts").is_some())
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the blockers never ran"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let plain = plugin.stop_account_async("plain").expect("a 1.1 stop hook");
    let first_poll = timeout(Duration::ZERO, plain).await;
    assert!(matches!(first_poll, Ok(Ok(()))), "{first_poll:?}");
    let panicky = plugin
        .stop_account_async("panicky")
        .expect("a 1.1 stop hook");
    let error = timeout(PROMPT, panicky).await.unwrap().unwrap_err();
    assert!(error.message.contains("fixture panic in stop"), "{error}");
    for blocker in blockers {
        assert_eq!(timeout(PROMPT, blocker.done).await.unwrap(), Ok(()));
    }
}

#[tokio::test]
async fn every_entry_point_works() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_fixture(&dir, "fixture-entries.so");
    let plugin = &loaded.plugin;

    let info = plugin.info();
    assert_eq!(info.channel_id, "fixture");
    assert_eq!(info.display_name, "Test fixture");
    assert_eq!(info.plugin_version, "0.1.0");
    assert_eq!(info.abi_version, "1.1.0");
    assert!(info.rustc_version.starts_with("rustc "), "{info:?}");

    plugin
        .configure(&json!({
            "default_account": "Main",
            "accounts": {
                "Main": { "mode": "exit", "after_ms": 1, "token": "t" },
                "off": { "enabled": false },
                "bare": { "configured": false },
            }
        }))
        .unwrap();
    let mut ids = plugin.list_account_ids().unwrap();
    ids.sort();
    assert_eq!(ids, ["Main", "bare", "off"]);
    assert_eq!(
        plugin.default_account_id().unwrap().as_deref(),
        Some("Main")
    );
    // The host passes normalised ids; the SDK finds the table written as "Main".
    assert_eq!(plugin.resolve_account("main").unwrap()["token"], "t");
    assert_eq!(plugin.is_enabled("main").unwrap(), Check::Yes);
    assert_eq!(
        plugin.is_enabled("off").unwrap(),
        Check::No(Some("switched off in the fixture config".into()))
    );
    assert_eq!(plugin.is_configured("main").unwrap(), Check::Yes);
    assert_eq!(
        plugin.is_configured("bare").unwrap(),
        Check::No(Some("missing token".into()))
    );
    assert_eq!(
        plugin.describe_account("main").unwrap().unwrap()["starts"],
        0
    );

    // start → the task exits cleanly after 1 ms; its status patch reached the board.
    let task = plugin.start_account("main", link(&loaded, "main")).unwrap();
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
    assert_eq!(status(&loaded, "main").extra["fixtureStarts"], 1);
    assert_eq!(status(&loaded, "main").connected, Some(true));
    let described = plugin.describe_account("main").unwrap().unwrap();
    assert_eq!(
        (described["starts"].clone(), described["ends"].clone()),
        (json!(1), json!(1))
    );

    // abort/cancel of a task that has ended: the plugin no longer knows it.
    assert!(!plugin.abort_task(task.id));
    assert!(!plugin.cancel_task(task.id));
    plugin.stop_account("main").unwrap();
    assert!(plugin.logout("main").unwrap());
    // The 1.1 hooks: futures that run on the plugin's runtime, no host thread held.
    let stop = plugin
        .stop_account_async("main")
        .expect("a 1.1 plugin has it");
    timeout(PROMPT, stop).await.unwrap().unwrap();
    let logout = plugin.logout_async("main").expect("a 1.1 plugin has it");
    assert!(timeout(PROMPT, logout).await.unwrap().unwrap());
    let sent = plugin
        .send(Outbound {
            account: "main".into(),
            conversation: "#room".into(),
            text: "hi".into(),
            reply_to: None,
            extra: None,
        })
        .await
        .unwrap();
    assert_eq!(sent, "sent:#room:hi");
    plugin.shutdown().unwrap();
    let after = plugin.start_account("main", link(&loaded, "main"));
    assert!(
        after.err().unwrap().message.contains("shut down"),
        "start after shutdown must fail clearly"
    );
}

/// The entries that run plugin-author code, each made to panic by the fixture's config. The SDK
/// entries that run no author code (metadata, init, configure, abort_task, cancel_task, shutdown)
/// are fenced the same way but have nothing to make panic.
#[tokio::test]
async fn a_panic_in_each_entry_point_is_an_error_and_everything_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let broken = fresh_fixture(&dir, "fixture-panics.so");
    let sibling = fresh_fixture(&dir, "fixture-sibling.so");
    let hooks = [
        "is_enabled",
        "is_configured",
        "describe_account",
        "start",
        "stop",
        "logout",
    ];
    broken
        .plugin
        .configure(&json!({ "accounts": { "a": { "panic_in": hooks, "mode": "panic" } } }))
        .unwrap();
    let p = &broken.plugin;
    let account_entries = [
        ("is_enabled", p.is_enabled("a").map(|_| ())),
        ("is_configured", p.is_configured("a").map(|_| ())),
        ("describe_account", p.describe_account("a").map(|_| ())),
        (
            "start",
            p.start_account("a", link(&broken, "a")).map(|_| ()),
        ),
        ("stop", p.stop_account("a")),
        ("logout", p.logout("a").map(|_| ())),
        // The 1.1 async hooks: the panic happens on the plugin's runtime, and the future the
        // host awaits carries it as an error.
        ("stop", p.stop_account_async("a").expect("1.1").await),
        (
            "logout",
            p.logout_async("a").expect("1.1").await.map(|_| ()),
        ),
    ];
    for (hook, result) in account_entries {
        let error = result.expect_err(hook);
        assert!(
            error.message.contains(&format!("fixture panic in {hook}")),
            "{hook}: {error}"
        );
        assert!(error.message.contains("plugin panicked"), "{hook}: {error}");
    }

    // Channel-level hooks.
    p.configure(&json!({
        "panic_in": ["list_account_ids", "default_account_id", "resolve_account"],
        "accounts": { "b": { "mode": "panic" } }
    }))
    .unwrap();
    for (hook, error) in [
        (
            "list_account_ids",
            p.list_account_ids().map(|_| ()).unwrap_err(),
        ),
        (
            "default_account_id",
            p.default_account_id().map(|_| ()).unwrap_err(),
        ),
        (
            "resolve_account",
            p.resolve_account("b").map(|_| ()).unwrap_err(),
        ),
    ] {
        assert!(
            error.message.contains(&format!("fixture panic in {hook}")),
            "{error}"
        );
    }

    // The account task itself, and send.
    p.configure(&json!({ "accounts": { "c": { "mode": "panic", "after_ms": 1 } } }))
        .unwrap();
    let task = p.start_account("c", link(&broken, "c")).unwrap();
    let ended = timeout(PROMPT, task.done).await.unwrap().unwrap_err();
    assert!(
        ended.contains("fixture panic in the account task"),
        "{ended}"
    );
    let sent = p
        .send(Outbound {
            text: "panic".into(),
            ..Outbound::default()
        })
        .await
        .unwrap_err();
    assert!(sent.message.contains("fixture panic in send"), "{sent}");

    // The panicking plugin still serves, and so does its sibling.
    p.configure(&json!({ "accounts": { "d": { "mode": "exit" } } }))
        .unwrap();
    assert_eq!(p.is_enabled("d").unwrap(), Check::Yes);
    sibling
        .plugin
        .configure(&json!({ "accounts": { "e": { "mode": "exit", "after_ms": 1 } } }))
        .unwrap();
    let task = sibling
        .plugin
        .start_account("e", link(&sibling, "e"))
        .unwrap();
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));
}

#[tokio::test]
async fn a_cancelled_task_ends_at_its_next_await_point() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_fixture(&dir, "fixture-cancel.so");
    loaded
        .plugin
        .configure(&json!({ "accounts": { "deaf": { "mode": "ignore_abort" } } }))
        .unwrap();
    let mut task = loaded
        .plugin
        .start_account("deaf", link(&loaded, "deaf"))
        .unwrap();

    // The cooperative abort is ignored by this task…
    assert!(loaded.plugin.abort_task(task.id));
    assert!(
        timeout(Duration::from_millis(50), &mut task.done)
            .await
            .is_err(),
        "an abort-ignoring task must still be running after its abort"
    );
    // …so the host cancels it on the plugin's runtime.
    assert!(loaded.plugin.cancel_task(task.id));
    let ended = timeout(PROMPT, task.done)
        .await
        .expect("cancel must end the task");
    assert_eq!(ended, Err("cancelled".to_owned()));
    let described = loaded.plugin.describe_account("deaf").unwrap().unwrap();
    assert_eq!(
        described["running"], 0,
        "the task's guard ran when it was cancelled"
    );
}

/// Captures every event the host's subscriber sees from plugins.
fn captured_plugin_events() -> &'static Mutex<Vec<Value>> {
    static EVENTS: OnceLock<Mutex<Vec<Value>>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        use tracing_subscriber::prelude::*;
        struct Capture;
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                if event.metadata().target() != "channeld::plugin" {
                    return;
                }
                struct Visitor(serde_json::Map<String, Value>);
                impl tracing::field::Visit for Visitor {
                    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                        self.0.insert(f.name().into(), v.into());
                    }
                    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                        self.0.insert(f.name().into(), format!("{v:?}").into());
                    }
                }
                let mut visitor = Visitor(Default::default());
                event.record(&mut visitor);
                visitor
                    .0
                    .insert("level".into(), event.metadata().level().as_str().into());
                captured_plugin_events()
                    .lock()
                    .unwrap()
                    .push(Value::Object(visitor.0));
            }
        }
        tracing_subscriber::registry().with(Capture).init();
        Mutex::new(Vec::new())
    })
}

#[tokio::test]
async fn a_plugin_tracing_event_reaches_the_host_subscriber_with_its_fields() {
    captured_plugin_events();
    let dir = tempfile::tempdir().unwrap();
    let loaded = fresh_fixture(&dir, "fixture-log.so");
    loaded
        .plugin
        .configure(&json!({ "accounts": { "chatty": { "log": true, "mode": "exit" } } }))
        .unwrap();
    let task = loaded
        .plugin
        .start_account("chatty", link(&loaded, "chatty"))
        .unwrap();
    assert_eq!(timeout(PROMPT, task.done).await.unwrap(), Ok(()));

    let events = captured_plugin_events().lock().unwrap().clone();
    let ours: Vec<_> = events
        .iter()
        .filter(|e| e["account"] == "chatty" && e["message"] == "fixture account started")
        .collect();
    assert_eq!(ours.len(), 1, "events seen: {events:?}");
    let event = ours[0];
    assert_eq!(event["channel"], "fixture");
    assert_eq!(event["level"], "WARN");
    assert_eq!(event["plugin_target"], "channeld_plugin_fixture");
    let fields: Value = serde_json::from_str(event["fields"].as_str().unwrap()).unwrap();
    assert_eq!(fields, json!({ "starts": 1, "flavour": "salty" }));
}

/// The only test in this binary that loads the `echo` example, so the `chd-echo` runtime threads
/// it counts are its own.
#[tokio::test]
async fn echo_example_serves_tcp_drops_stale_calls_and_shuts_down_its_threads() {
    let dir = tempfile::tempdir().unwrap();
    let file = util::copy_plugin(&util::echo_example_file(), dir.path(), "echo.so");
    let loaded = util::load(&file);
    assert_eq!(loaded.plugin.info().channel_id, "echo");
    // This process's threads named like the echo runtime's, once there are `want` (or the
    // deadline has passed): a worker is named once it runs, and a joined one stays listed until
    // the kernel has reaped it.
    let threads = |want| util::daemon::threads_named(std::process::id(), "chd-echo", want);
    assert_eq!(threads(0), 0, "no runtime before the first start");

    loaded
        .plugin
        .configure(
            &json!({ "accounts": { "main": { "listen": "127.0.0.1:0", "reply_delay_ms": 30 } } }),
        )
        .unwrap();
    let account = link(&loaded, "main");
    let key = account.key().unwrap().clone();
    let task = loaded.plugin.start_account("main", account).unwrap();
    assert_eq!(
        threads(2),
        2,
        "the runtime has the 2 workers init asked for"
    );

    // The plugin reports its address through a status patch once it listens.
    let addr = timeout(PROMPT, async {
        loop {
            if let Some(addr) = loaded
                .board
                .get(&key)
                .and_then(|s| s.extra.get("listen_addr").cloned())
            {
                break addr.as_str().unwrap().to_owned();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("echo reports its listen address");

    // A line goes in; after the plugin-side sleep the reply comes back over TCP.
    let stream = TcpStream::connect(&addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"hello plugin\n").await.unwrap();
    let reply = timeout(PROMPT, lines.next_line()).await.unwrap().unwrap();
    assert_eq!(reply.as_deref(), Some("hello plugin"));
    assert_eq!(loaded.board.get(&key).unwrap().inbound_messages, 1);
    assert_eq!(loaded.board.stale_calls(), 0);

    // The host gives up on this task: its later calls are dropped and counted.
    loaded.board.retire_generation(&key);
    write.write_all(b"from a stale task\n").await.unwrap();
    let reply = timeout(PROMPT, lines.next_line()).await.unwrap().unwrap();
    assert_eq!(reply.as_deref(), Some("from a stale task"));
    assert_eq!(
        loaded.board.get(&key).unwrap().inbound_messages,
        1,
        "stale delivery dropped"
    );
    assert_eq!(loaded.board.stale_calls(), 1);

    // shutdown drops the plugin's runtime: the task ends and its threads are gone.
    loaded.plugin.shutdown().unwrap();
    assert_eq!(
        timeout(PROMPT, task.done).await.unwrap(),
        Err("cancelled".to_owned())
    );
    assert_eq!(
        threads(0),
        0,
        "runtime threads left: {:?}",
        util::thread_names()
    );
}
