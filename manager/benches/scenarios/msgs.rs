//! `msgs`: the journal's durable ingest and the event stream, through the daemon's own code: the
//! journal as the host's [`MessageSink`] (what ABI 1.1's `deliver_async` awaits, and what a 1.0
//! plugin's synchronous `deliver` blocks on), with `sync = "full"`, in a directory on the same
//! disk as the target directory.
//!
//! * pipelined: one account with 64 deliveries in flight (64 tasks on a two-worker runtime);
//! * fleet: 10,000 accounts with one delivery each in flight;
//! * sequential: one account delivering one message at a time, through the 1.0 blocking path;
//! * SSE latency: `GET /v1/events` over real HTTP on loopback, one message every 2 ms, from the
//!   start of `deliver` to the client reading the event's `id` line;
//! * memory behind: resident memory growth while 1,000,000 messages are ingested with a
//!   connected consumer that reads nothing (so it ends 1M behind).
//!
//! `deliver_p99_ms` is the worse p99 of the pipelined and fleet runs. `outbox_sends_per_s` and
//! `outbox_accepts_per_s` come from [`super::outbox`] (`CHANNELD_BENCH_OUTBOX` messages).

use std::{
    io::{BufRead, BufReader},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use channeld::{
    events::EventHub,
    host::AccountKey,
    inbound::MessageSink,
    journal::{Journal, JournalConfig, SyncMode},
};
use channeld_plugin_abi::abi::InboundMessage;
use serde::Serialize;

use super::{env_number, rss_bytes};

/// `{"scenario":"msgs",…}`.
#[derive(Serialize)]
struct MsgsReport {
    scenario: &'static str,
    ingest_pipelined_msgs_per_s: f64,
    ingest_fleet_msgs_per_s: f64,
    ingest_sequential_msgs_per_s: f64,
    deliver_p99_ms: f64,
    sse_latency_p50_ms: f64,
    rss_growth_bytes_behind: i64,
    pipelined_p99_ms: f64,
    fleet_p99_ms: f64,
    outbox_sends_per_s: f64,
    outbox_accepts_per_s: f64,
    outbox_messages: u64,
    messages_per_run: u64,
    behind_messages: u64,
}

fn message(i: u64) -> InboundMessage {
    InboundMessage {
        conversation: "bench-room".into(),
        sender: "bench-sender".into(),
        text: format!("message {i} {}", "x".repeat(80)).into(),
        ..InboundMessage::default()
    }
}

fn open(dir: &std::path::Path) -> anyhow::Result<Arc<Journal>> {
    let settings = JournalConfig {
        sync: SyncMode::Full,
        max_size: bytesize::ByteSize::gib(8),
        ..JournalConfig::default()
    };
    Ok(Journal::open(dir, settings)?)
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    (samples[index].as_secs_f64() * 1e5).round() / 100.0
}

/// `tasks` tasks, each delivering `each` messages one after another for `keys[task % len]`;
/// throughput and every delivery's latency.
fn ingest(
    runtime: &tokio::runtime::Runtime,
    journal: &Arc<Journal>,
    keys: &[AccountKey],
    tasks: usize,
    each: u64,
    record: bool,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let started = Instant::now();
    let latencies = runtime.block_on(async {
        let mut handles = Vec::with_capacity(tasks);
        for t in 0..tasks {
            let journal = journal.clone();
            let key = keys[t % keys.len()].clone();
            handles.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(if record { each as usize } else { 0 });
                for i in 0..each {
                    let start = Instant::now();
                    journal
                        .accept(&key, message(i))
                        .await
                        .map_err(anyhow::Error::msg)?;
                    if record {
                        latencies.push(start.elapsed());
                    }
                }
                anyhow::Ok(latencies)
            }));
        }
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.await??);
        }
        anyhow::Ok(all)
    })?;
    let elapsed = started.elapsed();
    Ok((
        (tasks as u64 * each) as f64 / elapsed.as_secs_f64(),
        latencies,
    ))
}

pub(super) fn msgs(_bench: &super::Bench) -> anyhow::Result<String> {
    let total = env_number("CHANNELD_BENCH_MSGS", 200_000)?.max(64);
    let behind = env_number("CHANNELD_BENCH_BEHIND", 1_000_000)?;
    let scratch_root = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // Pipelined: one account, 64 in flight.
    let dir = tempfile::tempdir_in(&scratch_root).context("scratch directory")?;
    let journal = open(dir.path())?;
    let one = [AccountKey::new("bench", "one")];
    let (pipelined, mut pipelined_lat) = ingest(&runtime, &journal, &one, 64, total / 64, true)?;
    ensure!(
        journal.last_seq() == total / 64 * 64,
        "every message counted"
    );
    journal.close();

    // Fleet: 10,000 accounts, one each in flight.
    let dir = tempfile::tempdir_in(&scratch_root).context("scratch directory")?;
    let journal = open(dir.path())?;
    let accounts = 10_000usize;
    let keys: Vec<AccountKey> = (0..accounts)
        .map(|i| AccountKey::new("bench", format!("a{i}")))
        .collect();
    let each = (total / accounts as u64).max(1);
    let (fleet, mut fleet_lat) = ingest(&runtime, &journal, &keys, accounts, each, true)?;
    ensure!(
        journal.last_seq() == each * accounts as u64,
        "every message counted"
    );
    journal.close();

    // Sequential, the 1.0 blocking path, for up to 3 s.
    let dir = tempfile::tempdir_in(&scratch_root).context("scratch directory")?;
    let journal = open(dir.path())?;
    let started = Instant::now();
    let mut sequential_count = 0u64;
    while started.elapsed() < Duration::from_secs(3) && sequential_count < total {
        futures_executor::block_on(journal.accept(&one[0], message(sequential_count)))
            .map_err(anyhow::Error::msg)?;
        sequential_count += 1;
    }
    let sequential = sequential_count as f64 / started.elapsed().as_secs_f64();
    journal.close();

    // SSE latency and memory behind, over real HTTP.
    let dir = tempfile::tempdir_in(&scratch_root).context("scratch directory")?;
    let journal = open(dir.path())?;
    let hub = EventHub::new(journal.clone());
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = listener.local_addr()?;
    let app = {
        let hub = hub.clone();
        axum::Router::new().route(
            "/v1/events",
            axum::routing::get(
                move |headers: axum::http::HeaderMap,
                      axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>| {
                    let hub = hub.clone();
                    async move { channeld::events::respond(Some(hub), &headers, &params) }
                },
            ),
        )
    };
    runtime.spawn(async move { axum::serve(listener, app).await });

    let samples = 500u64;
    let received: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; samples as usize + 1]));
    let reader = {
        let received = received.clone();
        let response = ureq::get(format!("http://{address}/v1/events?since=0")).call()?;
        std::thread::spawn(move || {
            let lines = BufReader::new(response.into_body().into_reader()).lines();
            for line in lines {
                let Ok(line) = line else { return };
                if let Some(id) = line
                    .strip_prefix("id: ")
                    .and_then(|i| i.parse::<u64>().ok())
                {
                    let now = Instant::now();
                    let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(slot) = received.get_mut(id as usize) {
                        *slot = Some(now);
                    }
                    if id >= samples {
                        return;
                    }
                }
            }
        })
    };
    let key = AccountKey::new("bench", "sse");
    let mut sent = vec![None; samples as usize + 1];
    for i in 1..=samples {
        let start = Instant::now();
        let seq = futures_executor::block_on(journal.accept(&key, message(i)))
            .map_err(anyhow::Error::msg)?;
        if let Some(slot) = sent.get_mut(seq as usize) {
            *slot = Some(start);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = reader.join();
    let mut sse_latencies: Vec<Duration> = {
        let received = received.lock().unwrap_or_else(|p| p.into_inner());
        sent.iter()
            .zip(received.iter())
            .filter_map(|(s, r)| Some(r.as_ref()?.duration_since(*s.as_ref()?)))
            .collect()
    };
    ensure!(
        sse_latencies.len() as u64 == samples,
        "the consumer saw {} of {samples} messages",
        sse_latencies.len()
    );

    // A consumer that connects and reads nothing while `behind` messages arrive.
    let stalled = ureq::get(format!("http://{address}/v1/events")).call()?;
    let before = rss_bytes()?;
    let keys: Vec<AccountKey> = (0..1000)
        .map(|i| AccountKey::new("bench", format!("b{i}")))
        .collect();
    ingest(
        &runtime,
        &journal,
        &keys,
        1000,
        (behind / 1000).max(1),
        false,
    )?;
    let after = rss_bytes()?;
    drop(stalled);
    journal.close();

    let (outbox_accepts, outbox_sends, outbox_messages) = super::outbox::outbox_sends()?;
    let pipelined_p99 = percentile(&mut pipelined_lat, 0.99);
    let fleet_p99 = percentile(&mut fleet_lat, 0.99);
    let report = MsgsReport {
        scenario: "msgs",
        ingest_pipelined_msgs_per_s: pipelined.round(),
        ingest_fleet_msgs_per_s: fleet.round(),
        ingest_sequential_msgs_per_s: sequential.round(),
        deliver_p99_ms: pipelined_p99.max(fleet_p99),
        sse_latency_p50_ms: percentile(&mut sse_latencies, 0.5),
        rss_growth_bytes_behind: after as i64 - before as i64,
        pipelined_p99_ms: pipelined_p99,
        fleet_p99_ms: fleet_p99,
        outbox_sends_per_s: outbox_sends.round(),
        outbox_accepts_per_s: outbox_accepts.round(),
        outbox_messages,
        messages_per_run: total,
        behind_messages: (behind / 1000).max(1) * 1000,
    };
    Ok(serde_json::to_string(&report)?)
}
