//! `isolation`: what process isolation costs. One host→plugin call round trip through an
//! isolated child (`is_enabled`, p50 and p99 over `CHANNELD_BENCH_RTT_CALLS` calls, default
//! 20,000), beside the same call in-process; and inbound message throughput through the socket
//! (the fixture's `flood` mode, `deliver_async` per message, into the status board's counting
//! sink: no journal commit). The child is the release `channeld` binary (scripts/bench builds it).
//! The S1 ratios (10,000 accounts in one isolated child) are not measured yet: `null`.

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

use super::{Bench, env_number, inbound_messages};

#[derive(Serialize)]
struct IsolationReport {
    scenario: &'static str,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    inprocess_call_p50_us: f64,
    inbound_msgs_per_s: f64,
    start_all_ratio: Option<f64>,
    snapshot_ratio: Option<f64>,
    stop_all_ratio: Option<f64>,
    rtt_calls: u64,
    messages: u64,
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
        exe: Some(exe),
    };
    let isolated = IsolatedPlugin::spawn(spec, runtime.handle().clone(), sink.clone())
        .context("starting the isolated fixture")?;
    let table = json!({ "accounts": {
        "a": {},
        "flood": { "mode": "flood", "messages": messages, "text_bytes": 100 },
    }});
    isolated.configure(&table)?;
    let in_process = bench.load("channeld-plugin-fixture", sink.clone())?;
    in_process.configure(&table)?;

    timed_calls(&isolated, calls / 10 + 1)?; // warm-up
    let rtt = timed_calls(&isolated, calls)?;
    let native = timed_calls(&in_process, calls)?;

    let key = AccountKey::new(isolated.info().channel_id.clone(), "flood");
    let before = inbound_messages(&board, &key);
    let link = AccountLink::for_account(key.clone(), board.begin_generation(&key), board.clone());
    let start = Instant::now();
    let task = isolated.start_account("flood", link)?;
    runtime
        .block_on(task.done)
        .map_err(|e| anyhow::anyhow!("the flood task failed: {e}"))?;
    let elapsed = start.elapsed();
    let delivered = inbound_messages(&board, &key) - before;
    ensure!(
        delivered == messages,
        "the isolated plugin delivered {delivered} of {messages} messages"
    );
    isolated.shutdown()?;
    in_process.shutdown()?;
    Ok(serde_json::to_string(&IsolationReport {
        scenario: "isolation",
        rtt_p50_us: percentile(&rtt, 0.5),
        rtt_p99_us: percentile(&rtt, 0.99),
        inprocess_call_p50_us: percentile(&native, 0.5),
        inbound_msgs_per_s: messages as f64 / elapsed.as_secs_f64(),
        start_all_ratio: None,
        snapshot_ratio: None,
        stop_all_ratio: None,
        rtt_calls: calls,
        messages,
    })?)
}
