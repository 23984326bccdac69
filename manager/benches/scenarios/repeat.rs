//! Repeated scenarios: the supervisor's figures (`S1` to `S4`), and the machine's own (`floor`),
//! swing by up to 1.5× from one run to the next on a shared machine, so each of them runs
//! [`runs`] times, every run in a fresh process of this program (a second fleet in one process
//! would start on the memory the first one freed, which a daemon's first start-all does not
//! have), and its line holds the median of each figure, with `"runs"` added at the end. Each
//! run's own line goes to stderr.
//!
//! `CHANNELD_BENCH_RUNS` sets how many runs (default [`DEFAULT_RUNS`]); `1` runs the scenario once,
//! in this process, and prints that run's line as it is.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail, ensure};
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::{Number, Value};

use super::env_number;

/// The scenarios whose line is a median of runs.
pub(super) const REPEATED: &[&str] = &["S1", "S2", "S3", "S4", "floor"];

/// Runs per repeated scenario when `CHANNELD_BENCH_RUNS` is not set.
const DEFAULT_RUNS: u64 = 5;

/// How many runs a repeated scenario's line is the median of.
pub(super) fn runs() -> anyhow::Result<u64> {
    let runs = env_number("CHANNELD_BENCH_RUNS", DEFAULT_RUNS)?;
    ensure!(runs >= 1, "$CHANNELD_BENCH_RUNS must be at least 1");
    Ok(runs)
}

/// `scenario`'s line as the median of `runs` runs, each one this program run again for that
/// scenario alone (with `CHANNELD_BENCH_RUNS=1`); its stderr is this process's.
pub(super) fn median_line(scenario: &str, runs: u64) -> anyhow::Result<String> {
    let mut lines = Vec::new();
    for run in 1..=runs {
        let line = run_alone(scenario, &[])
            .with_context(|| format!("run {run} of {runs} of {scenario}"))?;
        eprintln!("bench: {scenario}: run {run} of {runs}: {line}");
        lines.push(line);
    }
    median_of(&lines).with_context(|| format!("{scenario}'s runs"))
}

/// `scenario`'s line from this program run again for it alone, once (`CHANNELD_BENCH_RUNS=1`),
/// with `env` added to this process's environment; its stderr is this process's.
pub(super) fn run_alone(scenario: &str, env: &[(&str, &str)]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the bench program to run it again")?;
    let out = Command::new(&exe)
        .arg(scenario)
        .env("CHANNELD_BENCH_RUNS", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {} {scenario}", exe.display()))?;
    if !out.status.success() {
        bail!("{} {scenario} failed ({})", exe.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The line whose every number is the median of that key's numbers in `lines` (JSON objects with
/// the same keys, in the first one's order), with `"runs"` added at the end. Any other
/// value must be the same in every line. The median of an even count is the mean of the middle
/// two (whole numbers stay whole, rounded down).
fn median_of(lines: &[String]) -> anyhow::Result<String> {
    let parsed = lines
        .iter()
        .map(|line| {
            serde_json::Deserializer::from_str(line)
                .deserialize_map(Ordered)
                .with_context(|| format!("not a JSON object: {line:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Some(first) = parsed.first() else {
        bail!("no runs");
    };
    // Written out field by field, in the runs' own order (a `Map` would sort the keys).
    let mut fields = Vec::with_capacity(first.len() + 1);
    for (key, value) in first {
        let values = parsed
            .iter()
            .map(|fields| {
                fields
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v)
                    .with_context(|| format!("a run has no {key:?}"))
            })
            .collect::<anyhow::Result<Vec<&Value>>>()?;
        let merged = match value {
            Value::Number(_) => median(&values).with_context(|| format!("{key:?}"))?,
            other => {
                ensure!(
                    values.iter().all(|v| *v == other),
                    "the runs disagree on {key:?}"
                );
                other.clone()
            }
        };
        fields.push(format!("{}:{merged}", Value::from(key.as_str())));
    }
    fields.push(format!("\"runs\":{}", lines.len()));
    Ok(format!("{{{}}}", fields.join(",")))
}

/// The median of numbers (whole if they all are).
fn median(values: &[&Value]) -> anyhow::Result<Value> {
    let whole: Option<Vec<u64>> = values.iter().map(|v| v.as_u64()).collect();
    if let Some(mut whole) = whole {
        whole.sort_unstable();
        return Ok(Value::from(middle(&whole, |a, b| (a + b) / 2)));
    }
    let mut real = values
        .iter()
        .map(|v| v.as_f64().context("not a number in every run"))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    real.sort_by(f64::total_cmp);
    Number::from_f64(middle(&real, |a, b| (a + b) / 2.0))
        .map(Value::Number)
        .context("not a finite number")
}

/// The middle of `sorted` (not empty), or the `mean` of its middle two.
fn middle<T: Copy>(sorted: &[T], mean: fn(T, T) -> T) -> T {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        mean(sorted[n / 2 - 1], sorted[n / 2])
    }
}

/// Reads a JSON object's fields in their order.
struct Ordered;

impl<'de> Visitor<'de> for Ordered {
    type Value = Vec<(String, Value)>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::new();
        while let Some(field) = map.next_entry()? {
            fields.push(field);
        }
        Ok(fields)
    }
}
