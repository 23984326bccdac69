//! The outbox's part of `msgs`: messages accepted into the outbox (one durable commit each,
//! `sync = "full"`), then handed by the sender to the fixture plugin's send entry through the
//! real loader, for 64 running accounts with 4 conversations each, until none is waiting.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::ensure;
use channeld::{
    config::SupervisorConfig,
    host::AccountKey,
    journal::{Journal, JournalConfig, SyncMode},
    outbox::{NewMessage, Outbox, OutboxConfig},
};
use serde_json::json;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Bench, Fleet, env_number};

const ACCOUNTS: u64 = 64;
const CONVERSATIONS: u64 = 4;

/// (accepted per second, sent per second, messages).
pub(super) fn outbox_sends() -> anyhow::Result<(f64, f64, u64)> {
    let total = env_number("CHANNELD_BENCH_OUTBOX", 5_000)?.max(ACCOUNTS);
    let mut bench = Bench::new()?;
    bench.accounts = ACCOUNTS;
    let fleet = Fleet::new(&bench, json!({}), SupervisorConfig::default())?;
    fleet.on_runtime(|s| async move { s.start_all().await })?;
    let keys: Vec<AccountKey> = fleet
        .ids
        .iter()
        .map(|id| AccountKey::new(super::FLEET_CHANNEL, id))
        .collect();
    let limit = Instant::now() + Duration::from_secs(60);
    while !keys
        .iter()
        .all(|k| fleet.supervisor.board().get(k).is_some_and(|s| s.running))
    {
        ensure!(Instant::now() < limit, "the accounts never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let scratch = tempfile::tempdir()?;
    let journal = Journal::open(
        scratch.path(),
        JournalConfig {
            sync: SyncMode::Full,
            ..JournalConfig::default()
        },
    )?;
    let outbox = Outbox::open(
        &journal,
        OutboxConfig {
            max_queued: total,
            max_queued_per_account: total,
            ..OutboxConfig::default()
        },
        fleet.supervisor.clone(),
    )?;
    let started = Instant::now();
    for i in 0..total {
        let key = &keys[(i % ACCOUNTS) as usize];
        outbox.submit(NewMessage {
            channel: key.channel.to_string(),
            account: key.account.to_string(),
            conversation: format!("room{}", (i / ACCOUNTS) % CONVERSATIONS),
            text: format!("message {i} {}", "x".repeat(80)),
            ..NewMessage::default()
        })?;
    }
    let accepted = total as f64 / started.elapsed().as_secs_f64();
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let started = Instant::now();
    let sender = fleet
        .runtime
        .spawn(Arc::clone(&outbox).run(stop.clone(), tasks.clone()));
    let limit = Instant::now() + Duration::from_secs(600);
    loop {
        let stats = outbox.stats();
        if stats["sent"].as_u64() == Some(total) {
            break;
        }
        ensure!(Instant::now() < limit, "the outbox never emptied: {stats}");
        ensure!(stats["failed"] == 0, "sends failed: {stats}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = total as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = fleet.runtime.block_on(sender);
    journal.close();
    Ok((accepted, sent, total))
}
