//! `S4`: is the API still responsive during a crash storm? The real release `channeld` binary
//! runs `S2`'s storm (10,000 fixture accounts whose tasks return at once; backoff 1 ms doubling to
//! 60 ms, 10 % jitter, 10 restarts), started by the test suite's own daemon harness
//! (`tests/util/daemon.rs`: a config file and a plugins directory in a temporary directory, the
//! API on a free port, the token and address read from the state directory). Meanwhile a
//! separate thread sends `GET /v1/status/fixture/{account}` every 2 ms over one keep-alive HTTP
//! connection, spreading the asked accounts over the fleet, from the first answer that knows the
//! channel until every account has been given up on (at least [`MIN_SAMPLES`] samples). Each
//! sample is one request, from its send until its body is read. The end is found by the samples
//! themselves: once [`QUIET_SAMPLES`] asked accounts in a row have been given up on, the daemon's
//! own count of accounts in each state is read from `GET /metrics` (not counted as a sample), and
//! the storm is over when it counts every account `gave-up`. The whole channel's status is read
//! once then, to check each account (reading it instead of the count, every few samples near the
//! end, loaded the API's thread with 10,000 accounts' JSON between the samples it times).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde::Serialize;
use serde_json::Value;

use super::{
    Bench, FIXTURE, FLEET_CHANNEL, FLEET_LIMIT,
    daemon::{Daemon, Start},
    ms,
};

/// The pause between the starts of two samples.
const INTERVAL: Duration = Duration::from_millis(2);
/// Fewer samples than this and the storm was too short to say anything: the scenario fails.
const MIN_SAMPLES: usize = 200;
/// Asked accounts in a row seen given up before the whole channel is checked.
const QUIET_SAMPLES: usize = 16;
/// Steps between two asked accounts (prime, so the samples visit every account of the fleet).
const STRIDE: u64 = 7919;
/// The longest a request's connect, send, answer or body may take before the scenario fails.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// Restarts before an account is given up on (as in `S2`).
const MAX_RESTARTS: u32 = 10;

/// `{"scenario":"S4",…}`. Times are milliseconds, to a thousandth.
#[derive(Serialize)]
struct S4Report {
    scenario: &'static str,
    /// Median of the status requests during the storm (goal: p99 ≤ 20 ms).
    status_p50_ms: f64,
    status_p99_ms: f64,
    /// Requests timed.
    samples: usize,
    /// The slowest request.
    status_max_ms: f64,
    accounts: u64,
    /// From the first answer that knows the channel until every account was seen given up on
    /// (the end is found by the samples, so this is the storm's length to within a few samples).
    storm_ms: f64,
}

/// The daemon's config below `[host]`: the health monitor off (it would restart nothing here,
/// but look at every account), `S2`'s backoff, and the fleet, each account in the fixture's
/// `return` mode.
fn config_body(accounts: u64) -> String {
    let mut body = format!(
        "[health]\ninterval = \"0s\"\n\n[supervisor]\ninitial_backoff = \"1ms\"\n\
         backoff_factor = 2.0\nmax_backoff = \"60ms\"\njitter = 0.1\nmax_restarts = {MAX_RESTARTS}\n\n\
         [channels.{FLEET_CHANNEL}.accounts]\n"
    );
    for i in 0..accounts {
        body.push_str(&format!("a{i} = {{ mode = \"return\" }}\n"));
    }
    body
}

/// One keep-alive connection to the daemon's API.
struct Api {
    agent: ureq::Agent,
    base: String,
    bearer: String,
}

impl Api {
    fn new(address: &str, token: &str) -> Self {
        Self {
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_idle_connections(1)
                .max_idle_connections_per_host(1)
                // Per phase, not global: with a global (or resolve) timeout, ureq resolves the
                // address on a thread of its own, spawned for every request (even one that then
                // takes the pooled connection), and a sample would time that thread's start.
                .timeout_connect(Some(REQUEST_LIMIT))
                .timeout_send_request(Some(REQUEST_LIMIT))
                .timeout_recv_response(Some(REQUEST_LIMIT))
                .timeout_recv_body(Some(REQUEST_LIMIT))
                .build()
                .into(),
            base: format!("http://{}", address.trim()),
            bearer: format!("Bearer {}", token.trim()),
        }
    }

    /// `GET path`: the status code and the body.
    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut response = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header("Authorization", &self.bearer)
            .call()
            .with_context(|| format!("GET {path}"))?;
        let body = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to GET {path}"))?;
        Ok((response.status().as_u16(), body))
    }
}

/// The state word of `account` in a `/v1/status/…` answer.
fn state_of<'a>(answer: &'a Value, account: &str) -> Option<&'a str> {
    answer["channels"][FLEET_CHANNEL][account]["state"].as_str()
}

/// What the sampling thread saw.
struct Samples {
    times: Vec<Duration>,
    storm: Duration,
}

/// Reads the whole channel's status once the storm is over: every account was given up on after
/// its restarts, and the fixture's own count of its starts (a status patch) says they all ran
/// (11 × 10,000 starts).
fn check_gave_up(api: &Api, accounts: u64) -> anyhow::Result<()> {
    let (code, body) = api.get(&format!("/v1/status/{FLEET_CHANNEL}"))?;
    ensure!(code == 200, "GET the channel's status: HTTP {code} {body}");
    let all: Value = serde_json::from_str(&body).context("an unreadable status answer")?;
    let fleet = all["channels"][FLEET_CHANNEL]
        .as_object()
        .context("the channel's status has no fixture channel")?;
    ensure!(
        fleet.len() as u64 == accounts,
        "the channel's status lists {} of {accounts} accounts",
        fleet.len()
    );
    let expected = format!("giving up after {MAX_RESTARTS} restart attempts");
    let other = fleet.iter().find(|(_, s)| {
        s["state"].as_str() != Some("gave-up")
            || !s["lastError"]
                .as_str()
                .is_some_and(|e| e.ends_with(&expected))
            || s["fixtureStarts"].as_u64() != Some(u64::from(MAX_RESTARTS) + 1)
    });
    ensure!(
        other.is_none(),
        "an account did not give up after {MAX_RESTARTS} restarts: {other:?}"
    );
    Ok(())
}

/// How many accounts the daemon counts given up on (`channeld_accounts{state="gave-up"}` in
/// `GET /metrics`, parsed by `prometheus-parse`; none when the sample is missing).
fn gave_up(api: &Api) -> anyhow::Result<u64> {
    let (code, body) = api.get("/metrics")?;
    ensure!(code == 200, "GET /metrics: HTTP {code} {body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .context("an unreadable /metrics")?;
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == "channeld_accounts" && s.labels.get("state") == Some("gave-up"));
    match sample.map(|s| &s.value) {
        None => Ok(0),
        Some(prometheus_parse::Value::Gauge(count) | prometheus_parse::Value::Untyped(count)) => {
            Ok(*count as u64)
        }
        Some(other) => anyhow::bail!("channeld_accounts is not a gauge: {other:?}"),
    }
}

/// The sampling thread's work: waits until the channel is known, then samples until every
/// account has been given up on.
fn sample(api: &Api, accounts: u64) -> anyhow::Result<Samples> {
    let limit = Instant::now() + FLEET_LIMIT;
    let first = format!("/v1/status/{FLEET_CHANNEL}/a0");
    loop {
        let (code, body) = api.get(&first)?;
        if code == 200 {
            break;
        }
        ensure!(
            code == 404 && Instant::now() < limit,
            "the fixture channel is not there after {FLEET_LIMIT:?}: HTTP {code} {body}"
        );
        thread::sleep(INTERVAL);
    }
    let start = Instant::now();
    let mut times = Vec::with_capacity(4096);
    let mut quiet = 0;
    let mut next = start;
    loop {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        next = (next + INTERVAL).max(Instant::now());
        let account = format!("a{}", times.len() as u64 * STRIDE % accounts);
        let path = format!("/v1/status/{FLEET_CHANNEL}/{account}");
        let sent = Instant::now();
        let (code, body) = api.get(&path)?;
        times.push(sent.elapsed());
        ensure!(code == 200, "GET {path}: HTTP {code} {body}");
        let answer: Value = serde_json::from_str(&body).context("an unreadable status answer")?;
        if state_of(&answer, &account) == Some("gave-up") {
            quiet += 1;
        } else {
            quiet = 0;
        }
        if quiet >= QUIET_SAMPLES {
            quiet = 0;
            if gave_up(api)? >= accounts {
                let storm = start.elapsed();
                check_gave_up(api, accounts)?;
                return Ok(Samples { times, storm });
            }
        }
        ensure!(
            Instant::now() < limit,
            "the storm has not ended after {FLEET_LIMIT:?}"
        );
    }
}

pub(super) fn s4(bench: &Bench) -> anyhow::Result<String> {
    let accounts = bench.accounts;
    let plugin = bench.built(FIXTURE)?;
    let mut daemon = Daemon::start_with(
        &[("fixture.so", plugin)],
        "rescan_interval = \"0s\"",
        &config_body(accounts),
        &[],
        Start {
            relative_config: false,
            wait_loaded: false,
        },
    );
    let (address, token) = daemon.api();
    let api = Api::new(&address, &token);
    let sampler = thread::Builder::new()
        .name("s4-status".into())
        .spawn(move || sample(&api, accounts))
        .context("cannot start the sampling thread")?;
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the sampling thread panicked"))?
        .with_context(|| format!("channeld's log:\n{}", daemon.log()))?;
    let (status, _) = daemon.terminate();
    ensure!(status.success(), "channeld exited with {status}");

    let mut times = samples.times;
    times.sort();
    ensure!(
        times.len() >= MIN_SAMPLES,
        "the storm lasted {:.3} ms: only {} status samples, fewer than {MIN_SAMPLES}",
        ms(samples.storm),
        times.len()
    );
    let pick = |q: f64| ms(times[((times.len() - 1) as f64 * q).round() as usize]);
    eprintln!(
        "bench: S4: {} samples over a storm of {:.3} ms; p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        times.len(),
        ms(samples.storm),
        pick(0.5),
        pick(0.9),
        pick(0.99),
        pick(1.0),
    );
    Ok(serde_json::to_string(&S4Report {
        scenario: "S4",
        status_p50_ms: pick(0.5),
        status_p99_ms: pick(0.99),
        samples: times.len(),
        status_max_ms: pick(1.0),
        accounts,
        storm_ms: ms(samples.storm),
    })?)
}
