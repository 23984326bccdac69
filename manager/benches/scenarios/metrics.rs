//! `metrics`: rendering `GET /metrics` for a fleet of running accounts (S1's world: the fixture's
//! accounts under the real supervisor), with per-account series on and off; the median of a few
//! renders each, and the size of the text a scraper downloads.

use std::time::{Duration, Instant};

use anyhow::ensure;
use channeld::metrics::{MetricsConfig, Sources, render};
use serde::Serialize;
use serde_json::json;

use super::{Bench, Fleet, POLL};

/// Renders per setting; the figure is their median.
const RENDERS: usize = 5;

/// `{"scenario":"metrics",…}`.
#[derive(Serialize)]
struct MetricsReport {
    scenario: &'static str,
    /// Running accounts.
    accounts: u64,
    /// Median render with per-account series.
    render_per_account_ms: f64,
    /// Bytes of that text.
    bytes_per_account: usize,
    /// Median render without per-account series.
    render_totals_ms: f64,
    /// Bytes of that text.
    bytes_totals: usize,
}

fn median_render(sources: &Sources) -> (Duration, usize) {
    let mut times = Vec::with_capacity(RENDERS);
    let mut bytes = 0;
    for _ in 0..RENDERS {
        let t = Instant::now();
        let text = render(sources);
        times.push(t.elapsed());
        bytes = text.len();
    }
    times.sort();
    (times[times.len() / 2], bytes)
}

pub(super) fn metrics(bench: &Bench) -> anyhow::Result<String> {
    let fleet = Fleet::new(bench, json!({}), Default::default())?;
    let n = bench.accounts;
    fleet.on_runtime(|s| async move { s.start_all().await })?;
    let (starts, ends) = fleet.wait_counts(POLL, |starts, ends| starts - ends >= n)?;
    ensure!(starts - ends == n, "{starts} starts and {ends} ends");
    let sources = |per_account| Sources {
        supervisor: fleet.supervisor.clone(),
        catalog: None,
        events: None,
        outbox: None,
        config: MetricsConfig {
            per_account: Some(per_account),
            public: false,
        },
    };
    let (with, with_bytes) = median_render(&sources(true));
    let (without, without_bytes) = median_render(&sources(false));
    fleet.close()?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(serde_json::to_string(&MetricsReport {
        scenario: "metrics",
        accounts: n,
        render_per_account_ms: ms(with),
        bytes_per_account: with_bytes,
        render_totals_ms: ms(without),
        bytes_totals: without_bytes,
    })?)
}
