//! Many stops of accounts whose stop hook hangs, with a 1.0 and a 1.1 plugin: the host's blocking
//! pool is never exhausted (a 1.0 plugin pins at most its limit of blocking calls; a 1.1 plugin's
//! async hook is dropped at the stop's bound), so a healthy account still restarts afterwards.

use std::{path::Path, sync::Arc, time::Duration};

use channeld::{
    clock::{Clock, SystemClock},
    config::{ChannelSection, SupervisorConfig},
    ffi::FfiPlugin,
    host::{AccountKey, HostSink},
    load::load_root_module,
    plugin::Plugin,
    status::{AccountState, StatusBoard},
    supervise::{
        BLOCKING_CALLS_PER_PLUGIN, StartOutcome, StopOutcome, Supervisor, policy::FixedJitter,
    },
};
use channeld_plugin_abi::abi::LogLevel;
use futures_util::future::join_all;
use serde_json::json;

use crate::util;

/// Stops in all: above tokio's default of 512 blocking threads, so before the per-plugin limit a
/// 1.0 plugin's hanging hooks took the whole pool and the next start never ran.
const STOPS: usize = 600;
/// Accounts stopping side by side (each stops `STOPS / HANGING` times).
const HANGING: usize = 6;

async fn stop_many_then_restart_a_healthy_account(file: &Path, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let copy = util::copy_plugin(file, dir.path(), name);
    let module = load_root_module(&copy).unwrap_or_else(|e| panic!("load {name}: {e}"));
    let plugin = FfiPlugin::new(module, &copy).expect("metadata");
    let sink: Arc<dyn HostSink> = board.clone();
    plugin
        .init(2, LogLevel::Warn, sink)
        .unwrap_or_else(|e| panic!("init {name}: {e}"));
    let plugin = Arc::new(plugin);

    let mut accounts = serde_json::Map::new();
    for i in 0..HANGING {
        accounts.insert(format!("h{i}"), json!({ "hang_in_stop": true }));
    }
    accounts.insert("healthy".into(), json!({}));
    let policy = SupervisorConfig {
        // No automatic restart within the test's life.
        initial_backoff: Duration::from_secs(600),
        stop_timeout: Duration::from_millis(100),
        start_timeout: Duration::from_secs(10),
        ..SupervisorConfig::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let sup = Supervisor::new(
        policy,
        Duration::from_secs(10),
        board.clone(),
        clock,
        Arc::new(FixedJitter(0.0)),
    );
    sup.add_channel(
        plugin.clone(),
        ChannelSection {
            table: json!({ "accounts": accounts }),
        },
    )
    .await
    .expect("register");

    let rounds = STOPS / HANGING;
    join_all((0..HANGING).map(|i| {
        let sup = sup.clone();
        async move {
            let account = format!("h{i}");
            for round in 0..rounds {
                let started = sup.start("fixture", Some(&account)).await.unwrap();
                assert_eq!(
                    started[0].1,
                    StartOutcome::Started,
                    "{account} round {round}"
                );
                let stopped = sup.stop("fixture", Some(&account)).await.unwrap();
                assert_eq!(
                    stopped[0].1,
                    StopOutcome::Stopped,
                    "{account} round {round}"
                );
            }
        }
    }))
    .await;

    // The healthy account still starts and restarts.
    let started = sup.start("fixture", Some("healthy")).await.unwrap();
    assert_eq!(started[0].1, StartOutcome::Started);
    let restarted = sup.restart("fixture", Some("healthy")).await.unwrap();
    assert_eq!(restarted[0].1, StartOutcome::Started);
    let healthy = board.get(&AccountKey::new("fixture", "healthy")).unwrap();
    assert_eq!(healthy.state, AccountState::Running);
    if !plugin.reports_task_polled() {
        // A 1.0 plugin: its hooks hang on host threads; the later ones were skipped, and the
        // account's lastError says so.
        let last = board.get(&AccountKey::new("fixture", "h0")).unwrap();
        let error = last.last_error.unwrap_or_default();
        assert!(
            error.contains(&format!(
                "{BLOCKING_CALLS_PER_PLUGIN} earlier blocking calls"
            )),
            "{error}"
        );
    }
    sup.shutdown().await;
}

/// Runs `test` on a runtime like the daemon's (two workers, tokio's default blocking pool), and
/// leaves the runtime without waiting for blocking calls that hang for good (a runtime's drop
/// would wait for them forever).
fn on_runtime(test: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A failed assertion must not drop the runtime while hooks hang: that would wait for good.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(test)));
    runtime.shutdown_background();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn six_hundred_hanging_stop_hooks_of_a_1_0_plugin_leave_a_healthy_account_restartable() {
    let file = util::lookalike_file(
        "abi-1.0",
        "channeld-plugin-fixture10",
        "libchanneld_plugin_fixture10.so",
    );
    on_runtime(stop_many_then_restart_a_healthy_account(
        &file,
        "fixture10-stops.so",
    ));
}

#[test]
fn six_hundred_hanging_stop_hooks_of_a_1_1_plugin_leave_a_healthy_account_restartable() {
    let file = util::plugin_file("channeld-plugin-fixture");
    on_runtime(stop_many_then_restart_a_healthy_account(
        &file,
        "fixture11-stops.so",
    ));
}
