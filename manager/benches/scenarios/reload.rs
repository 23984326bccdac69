//! `reload`: a config reload of one channel with many running accounts, under the real
//! [`Supervisor::reconfigure_channel`]: once with one account's table changed (that account
//! restarts, every other keeps its task), once with a channel-level host key changed (every
//! account's resolved config compared, none restarted). The plugin's counters prove it.

use std::time::Instant;

use anyhow::ensure;
use channeld::{
    config::{ChannelSection, SupervisorConfig},
    supervise::Supervisor,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Bench, FLEET_CHANNEL, Fleet, POLL};

/// `{"scenario":"reload",…}`.
#[derive(Serialize)]
struct ReloadReport {
    scenario: &'static str,
    /// Running accounts of the channel.
    accounts: u64,
    /// One account changed: the call, until the changed account runs again.
    reload_one_changed_ms: f64,
    /// A channel-level host key changed, no account's resolved config: the call.
    reload_none_changed_ms: f64,
}

fn section(ids: &[String], changed: Option<&str>, channel_extra: Value) -> ChannelSection {
    let accounts: serde_json::Map<String, Value> = ids
        .iter()
        .map(|id| {
            let table = if Some(id.as_str()) == changed {
                json!({ "x": 1 })
            } else {
                json!({})
            };
            (id.clone(), table)
        })
        .collect();
    let mut table = json!({ "accounts": accounts });
    if let (Some(table), Value::Object(extra)) = (table.as_object_mut(), channel_extra) {
        table.extend(extra);
    }
    ChannelSection { table }
}

pub(super) fn reload(bench: &Bench) -> anyhow::Result<String> {
    let fleet = Fleet::new(bench, json!({}), SupervisorConfig::default())?;
    let n = bench.accounts;
    fleet.on_runtime(|s| async move { s.start_all().await })?;
    fleet.wait_counts(POLL, |starts, ends| starts - ends >= n)?;

    let changed = fleet.ids[0].clone();
    let one = section(&fleet.ids, Some(&changed), json!({}));
    let start = Instant::now();
    let report = fleet.on_runtime(|s: Supervisor| async move {
        s.reconfigure_channel(FLEET_CHANNEL, one).await
    })??;
    let (starts, ends) =
        fleet.wait_counts(POLL, |starts, ends| starts > n && starts - ends >= n)?;
    let one_changed = start.elapsed();
    ensure!(
        report.restarted == vec![changed.clone()] && report.unchanged.len() as u64 == n - 1,
        "one account changed: restarted {:?}, {} unchanged",
        report.restarted,
        report.unchanged.len()
    );
    ensure!(starts == n + 1 && ends == 1, "{starts} starts, {ends} ends");

    // `health_monitor` is the host's: the plugin's table, and every resolved config, stay.
    let none = section(
        &fleet.ids,
        Some(&changed),
        json!({ "health_monitor": { "enabled": true } }),
    );
    let start = Instant::now();
    let report = fleet.on_runtime(|s: Supervisor| async move {
        s.reconfigure_channel(FLEET_CHANNEL, none).await
    })??;
    let none_changed = start.elapsed();
    ensure!(
        report.restarted.is_empty() && report.unchanged.len() as u64 == n,
        "nothing changed: restarted {:?}",
        report.restarted
    );
    let (starts, _) = fleet.counts()?;
    ensure!(
        starts == n + 1,
        "{starts} starts after a reload that changed nothing"
    );
    fleet.on_runtime(|s| async move { s.shutdown().await })?;

    Ok(serde_json::to_string(&ReloadReport {
        scenario: "reload",
        accounts: n,
        reload_one_changed_ms: one_changed.as_secs_f64() * 1000.0,
        reload_none_changed_ms: none_changed.as_secs_f64() * 1000.0,
    })?)
}
