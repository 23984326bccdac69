//! `hot_add`: a stripped release plugin renamed into a running daemon's plugins directory, timed
//! until its account runs — the watcher's event, staging, loading, registering and the account's
//! start, all through the daemon's own code (`Daemon::watch_plugins` → `Catalog::reconcile`).
//! Each run first removes the previous file (waiting until its channel is gone), then renames a
//! copy with content of its own (a distinct hash) into the directory.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, time::Instant};

use anyhow::{Context as _, ensure};
use channeld::{config::Config, daemon::Daemon, host::AccountKey};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Bench, FIXTURE};

/// Runs timed; the first is discarded as warm-up.
const RUNS: usize = 25;

/// `{"scenario":"hot_add",…}`.
#[derive(Serialize)]
struct HotAddReport {
    scenario: &'static str,
    /// Timed runs (after one warm-up run).
    runs: usize,
    /// Median, rename → account running.
    p50_ms: f64,
    /// 99th percentile (the slowest of fewer than 100 runs).
    p99_ms: f64,
    /// Fastest run.
    min_ms: f64,
}

pub(super) fn hot_add(bench: &Bench) -> anyhow::Result<String> {
    let built = bench.built(FIXTURE)?;
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let root = scratch.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
    let plugins = root.join("plugins");
    fs::create_dir(&plugins)?;
    fs::set_permissions(&plugins, fs::Permissions::from_mode(0o700))?;
    let config_path = root.join("channeld.toml");
    fs::write(
        &config_path,
        "[host]\nrescan_interval = \"0s\"\n[health]\ninterval = \"0s\"\n\
         [channels.fixture.accounts.a]\n",
    )?;
    let config = Config::load(&config_path)?;
    let bytes = fs::read(&built)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let daemon = Daemon::new(config.clone())?;
        let stop = CancellationToken::new();
        daemon.watch_plugins(stop.clone());
        daemon.catalog.load_initial().await?;
        let key = AccountKey::new("fixture", "a");
        let running = |want: bool| {
            let board = daemon.board.clone();
            let supervisor = daemon.supervisor.clone();
            let key = key.clone();
            async move {
                let deadline = Instant::now() + std::time::Duration::from_secs(30);
                loop {
                    let present = supervisor.channel("fixture").is_ok();
                    let up = present && board.get(&key).is_some_and(|s| s.running);
                    if up == want && (want || !present) {
                        return Ok(());
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "the account never became running={want}"
                    );
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
            }
        };
        let mut times = Vec::with_capacity(RUNS);
        for run in 0..=RUNS {
            let target = plugins.join("fixture.so");
            if target.exists() {
                fs::remove_file(&target)?;
                running(false).await?;
            }
            let tmp = plugins.join(".fixture.tmp");
            write_copy(&tmp, &bytes, run)?;
            let start = Instant::now();
            fs::rename(&tmp, &target)?;
            running(true).await?;
            if run > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        stop.cancel();
        daemon.shutdown().await;
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        let round = |ms: f64| (ms * 1000.0).round() / 1000.0;
        Ok(serde_json::to_string(&HotAddReport {
            scenario: "hot_add",
            runs: times.len(),
            p50_ms: round(pick(0.5)),
            p99_ms: round(pick(0.99)),
            min_ms: round(times[0]),
        })?)
    })
}

/// A copy with content of its own: the ELF plus a few distinct trailing bytes.
fn write_copy(path: &Path, bytes: &[u8], run: usize) -> anyhow::Result<()> {
    let mut content = bytes.to_vec();
    content.extend_from_slice(format!("\0channeld-hot-add {run}\0").as_bytes());
    fs::write(path, content)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}
