//! `S3`: `S1` at ten times its size, to show whether the supervisor scales linearly: 100,000
//! accounts (ten times `CHANNELD_BENCH_ACCOUNTS` when that is set). It is `S1`'s own code on a
//! bigger fleet, so it prints `S1`'s keys, with `"scenario":"S3"`; each figure is meant to stay
//! within 11× its `S1` value, and memory per account within 2 KiB.

use anyhow::Context as _;

use super::{Bench, fleet_line};

/// How many times `S1`'s accounts.
const SCALE: u64 = 10;

pub(super) fn s3(bench: &Bench) -> anyhow::Result<String> {
    let bigger = Bench {
        plugin_dir: bench.plugin_dir.clone(),
        staging: tempfile::tempdir().context("cannot create a temporary plugins directory")?,
        messages: bench.messages,
        calls: bench.calls,
        rounds: bench.rounds,
        accounts: bench.accounts * SCALE,
    };
    fleet_line(&bigger, "S3")
}
