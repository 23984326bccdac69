//! `isolation`: what process isolation costs. One host→plugin call round trip through an
//! isolated child (`is_enabled`, p50 and p99 over `CHANNELD_BENCH_RTT_CALLS` calls, default
//! 20,000), beside the same call in-process; and inbound message throughput through the socket
//! (the fixture's `flood` mode, `deliver_async` per message, into the status board's counting
//! sink: no journal commit), batched (16 accounts flooding at once, so each write and read of the
//! socket carries many frames) and sequential (one account, a round trip per message). The child is the release `channeld` binary (scripts/bench builds it).
//! Then `S1` twice, with its accounts (10,000) in-process and in one isolated child: each of
//! start-all, snapshot and stop-all as a ratio isolated / in-process (goal: ≤ 3×).

use std::{sync::Arc, time::Instant};

use anyhow::{Context as _, ensure};
use channeld::{
    clock::SystemClock,
    host::{AccountKey, AccountLink, HostSink},
    isolate::{ChildSpec, IsolatedPlugin},
    plugin::Plugin,
    status::StatusBoard,
};
use channeld_plugin_abi::abi::LogLevel;
use serde::Serialize;
use serde_json::json;

use super::{Bench, S1Report, env_number, inbound_messages, ratio, s1_figures};

#[derive(Serialize)]
struct IsolationReport {
    scenario: &'static str,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    inprocess_call_p50_us: f64,
    /// [`FLOOD_ACCOUNTS`] accounts flooding at once.
    inbound_msgs_per_s: f64,
    /// One account flooding alone (a round trip per message).
    inbound_sequential_msgs_per_s: f64,
    start_all_ratio: f64,
    snapshot_ratio: f64,
    stop_all_ratio: f64,
    rtt_calls: u64,
    messages: u64,
    accounts: u64,
    /// `S1`'s start-all, snapshot and stop-all in ms: in-process, then isolated.
    s1_inprocess_ms: [f64; 3],
    s1_isolated_ms: [f64; 3],
}

/// How many accounts flood at once for the batched inbound figure.
const FLOOD_ACCOUNTS: u64 = 16;

/// Starts the accounts `keys` (fixture `flood` mode) together and waits until all have ended:
/// the time taken, checked to have delivered `expected` messages in all.
fn flood(
    runtime: &tokio::runtime::Runtime,
    plugin: &IsolatedPlugin,
    board: &Arc<StatusBoard>,
    keys: &[AccountKey],
    expected: u64,
) -> anyhow::Result<std::time::Duration> {
    let before: u64 = keys.iter().map(|k| inbound_messages(board, k)).sum();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(keys.len());
    for key in keys {
        let link =
            AccountLink::for_account(key.clone(), board.begin_generation(key), board.clone());
        tasks.push(plugin.start_account(&key.account, link)?.done);
    }
    for task in tasks {
        runtime
            .block_on(task)
            .map_err(|e| anyhow::anyhow!("a flood task failed: {e}"))?;
    }
    let elapsed = start.elapsed();
    let delivered = keys.iter().map(|k| inbound_messages(board, k)).sum::<u64>() - before;
    ensure!(
        delivered == expected,
        "the isolated plugin delivered {delivered} of {expected} messages"
    );
    Ok(elapsed)
}

/// `S1`'s three times, in ms.
fn s1_times(report: &S1Report) -> [f64; 3] {
    [report.start_all_ms, report.snapshot_ms, report.stop_all_ms]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Times `calls` `is_enabled` calls one by one: sorted microseconds.
fn timed_calls(plugin: &dyn Plugin, calls: u64) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        let start = Instant::now();
        plugin.is_enabled("a")?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

pub fn isolation(bench: &Bench) -> anyhow::Result<String> {
    let calls = env_number("CHANNELD_BENCH_RTT_CALLS", 20_000)?.max(1);
    let messages = bench.messages.min(200_000);
    let exe = bench.plugin_dir.join("channeld");
    ensure!(
        exe.is_file(),
        "{} is missing: build it with `cargo build --release -p channeld` (scripts/bench does)",
        exe.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let sink: Arc<dyn HostSink> = board.clone();
    let built = bench.built("channeld-plugin-fixture")?;
    let spec = ChildSpec {
        plugin: built.clone(),
        source: built,
        worker_threads: 2,
        max_log_level: LogLevel::Warn,
        memory_limit: None,
        exe: Some(exe.clone()),
    };
    let isolated = IsolatedPlugin::spawn(spec, runtime.handle().clone(), sink.clone())
        .context("starting the isolated fixture")?;
    let per_account = (messages / FLOOD_ACCOUNTS).max(1);
    let mut accounts = serde_json::Map::new();
    accounts.insert("a".into(), json!({}));
    accounts.insert(
        "flood".into(),
        json!({ "mode": "flood", "messages": messages, "text_bytes": 100 }),
    );
    for i in 0..FLOOD_ACCOUNTS {
        accounts.insert(
            format!("flood{i}"),
            json!({ "mode": "flood", "messages": per_account, "text_bytes": 100 }),
        );
    }
    let table = json!({ "accounts": accounts });
    isolated.configure(&table)?;
    let in_process = bench.load("channeld-plugin-fixture", sink.clone())?;
    in_process.configure(&table)?;

    timed_calls(&isolated, calls / 10 + 1)?; // warm-up
    let rtt = timed_calls(&isolated, calls)?;
    let native = timed_calls(&in_process, calls)?;

    // Batched: FLOOD_ACCOUNTS accounts flood at once, so frames queue up and each write and
    // read of the socket carries many of them. Then one account alone, whose every message
    // waits for the previous one's answer: a round trip per message.
    let channel = isolated.info().channel_id.clone();
    let batched_keys: Vec<AccountKey> = (0..FLOOD_ACCOUNTS)
        .map(|i| AccountKey::new(channel.clone(), format!("flood{i}")))
        .collect();
    let (batched_messages, sequential_messages) = (per_account * FLOOD_ACCOUNTS, messages);
    let batched = flood(&runtime, &isolated, &board, &batched_keys, batched_messages)?;
    let sequential = flood(
        &runtime,
        &isolated,
        &board,
        &[AccountKey::new(channel.clone(), "flood")],
        sequential_messages,
    )?;
    isolated.shutdown()?;
    in_process.shutdown()?;
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));

    let s1_inprocess = s1_times(&s1_figures(bench, "S1", None)?);
    let s1_isolated = s1_times(&s1_figures(bench, "S1 isolated", Some(exe))?);
    Ok(serde_json::to_string(&IsolationReport {
        scenario: "isolation",
        rtt_p50_us: percentile(&rtt, 0.5),
        rtt_p99_us: percentile(&rtt, 0.99),
        inprocess_call_p50_us: percentile(&native, 0.5),
        inbound_msgs_per_s: (batched_messages as f64 / batched.as_secs_f64()).round(),
        inbound_sequential_msgs_per_s: (sequential_messages as f64 / sequential.as_secs_f64())
            .round(),
        start_all_ratio: ratio(s1_isolated[0], s1_inprocess[0]),
        snapshot_ratio: ratio(s1_isolated[1], s1_inprocess[1]),
        stop_all_ratio: ratio(s1_isolated[2], s1_inprocess[2]),
        rtt_calls: calls,
        messages: batched_messages,
        accounts: bench.accounts,
        s1_inprocess_ms: s1_inprocess,
        s1_isolated_ms: s1_isolated,
    })?)
}
