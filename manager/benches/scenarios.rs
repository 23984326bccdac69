//! The program behind `scripts/bench`: runs the benchmark scenarios named on the command line (all
//! of them when none is named) and prints one JSON object per scenario on its own line of stdout.
//! Everything else (cargo's noise, progress, errors) goes to stderr.
//!
//! Plugins are release builds of the workspace's plugin crates (stripped by the release profile),
//! found in `$CHANNELD_BENCH_PLUGIN_DIR` (default `<target>/release`), copied into a temporary
//! directory and loaded through the real loader ([`channeld::load::load_root_module`] and
//! [`FfiPlugin`]; the `load` scenario goes through [`Loader::load_file`], staging included).
//! Counters prove the work was done: the status board's `inboundMessages` for the account and the
//! fixture's own `starts`/`ends`; for `load`, every copy's distinct staged file mapped in the
//! process.
//!
//! `S1` and `S2` run 10,000 accounts of the fixture channel under the real [`Supervisor`] on a
//! two-worker runtime; the fixture's process-wide `processStarts`/`processEnds` (read through its
//! `describe_account`) prove how many tasks ran.
//!
//! `floor` measures the machine's own cost of what `S1`'s start and `S2`'s crash storm ask, with
//! no channeld code (see `scenarios/floor.rs`), to read `S1` and `S2` against.
//!
//! `S1` to `S4` and `floor` print the median of each figure over `CHANNELD_BENCH_RUNS` runs
//! (default 5), each in a fresh process of this program, with `"runs"` at the end of the line;
//! each run's own line goes to stderr (see `scenarios/repeat.rs`).
//!
//! Sizes can be lowered for profiling (e.g. under callgrind) with `CHANNELD_BENCH_MESSAGES`,
//! `CHANNELD_BENCH_CALLS`, `CHANNELD_BENCH_ROUNDS` and `CHANNELD_BENCH_ACCOUNTS`.
//!
//! The fixture's accounts have no stop work by default (its stop hook is not run for them, as the
//! SDK skips a hook with nothing to do); `CHANNELD_BENCH_STOP_HOOK=1` gives S1's and S3's accounts
//! a stop hook that runs (and returns at once), to measure stop-all with a hook per account.
//!
//! To add a scenario: write `fn name(bench: &Bench) -> anyhow::Result<String>` returning the JSON
//! line (a `Serialize` struct whose first field is `scenario`) and list it in [`SCENARIOS`].

/// `hot_add`: a plugin renamed into a running daemon's directory, until its account runs.
#[path = "scenarios/hot_add.rs"]
mod hot_add;

/// `isolation`: a call round trip and inbound throughput through an isolated plugin's child, and
/// `S1` in one isolated child against `S1` in-process.
#[path = "scenarios/isolation.rs"]
mod isolation;
/// `reload`: a config reload of a channel with many running accounts, one of them changed.
#[path = "scenarios/reload.rs"]
mod reload;

/// `msgs`: the journal's durable ingest, the event stream's latency, memory with a consumer behind.
#[path = "scenarios/msgs.rs"]
mod msgs;

/// `cluster`: failover and rebalancing of 1,000 accounts over real channeld nodes and etcd.
#[cfg(feature = "cluster")]
#[path = "scenarios/cluster.rs"]
mod cluster;

/// `metrics`: rendering `/metrics` for a fleet of running accounts.
#[path = "scenarios/metrics.rs"]
mod metrics;
/// The outbox's sends, for `msgs`.
#[path = "scenarios/outbox.rs"]
mod outbox;

/// The integration tests' harness for a real `channeld run` process (used by `S4`).
#[path = "../../tests/util/daemon.rs"]
#[allow(dead_code)]
mod daemon;
/// `floor`: the machine's own cost of `S1`'s start and `S2`'s storm, with no channeld code.
#[path = "scenarios/floor.rs"]
mod floor;
/// The supervisor's scenarios as medians of runs in fresh processes.
#[path = "scenarios/repeat.rs"]
mod repeat;
/// `S3`: `S1` with ten times the accounts.
#[path = "scenarios/s3.rs"]
mod s3;
/// `S4`: the status API's latency during `S2`'s crash storm in the real `channeld` binary.
#[path = "scenarios/s4.rs"]
mod s4;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    hint::black_box,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use abi_stable::library::lib_header_from_path;
use anyhow::{Context as _, ensure};
use channeld::{
    clock::{Clock, SystemClock},
    config::{ChannelSection, SupervisorConfig},
    discover::{self, PLUGIN_SUFFIX},
    ffi::FfiPlugin,
    host::{AccountKey, AccountLink, HostSink},
    isolate::{ChildSpec, IsolatedPlugin},
    load::load_root_module,
    plugin::{BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo, RunningTask},
    registry::{LoadedPlugin, Loader},
    stage::StagingDir,
    status::{AccountSnapshot, StatusBoard},
    supervise::{ChannelStartSummary, StopOutcome, Supervisor, policy::RandomJitter},
};
use channeld_plugin_abi::{
    abi::{InboundMessage, LogLevel, PluginMod_Ref},
    sdk::Inbound,
};
use goblin::elf::{Elf, program_header::PT_LOAD};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A scenario: runs and returns its JSON line.
type Scenario = fn(&Bench) -> anyhow::Result<String>;

/// Every scenario, in the order a bare `scripts/bench` runs them.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("ffi", ffi),
    ("load", load),
    ("S1", s1),
    ("S2", s2),
    ("S3", s3::s3),
    ("S4", s4::s4),
    ("floor", floor::floor),
    ("hot_add", hot_add::hot_add),
    ("msgs", msgs::msgs),
    ("isolation", isolation::isolation),
    ("metrics", metrics::metrics),
    ("reload", reload::reload),
    #[cfg(feature = "cluster")]
    ("cluster", cluster::cluster),
];

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    // `cargo bench` appends `--bench`; flags are not scenario names.
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut chosen = Vec::new();
    for name in &named {
        match SCENARIOS.iter().find(|(n, _)| n == name) {
            Some(scenario) => chosen.push(*scenario),
            None => {
                let known: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
                eprintln!("unknown scenario {name:?}; known: {}", known.join(", "));
                return ExitCode::from(2);
            }
        }
    }
    if chosen.is_empty() {
        chosen = SCENARIOS.to_vec();
    }

    let bench = match Bench::new() {
        Ok(bench) => bench,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runs = match repeat::runs() {
        Ok(runs) => runs,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    for (name, run) in chosen {
        eprintln!("bench: running {name}");
        let line = if runs > 1 && repeat::REPEATED.contains(&name) {
            repeat::median_line(name, runs)
        } else {
            run(&bench)
        };
        match line {
            Ok(line) => {
                let mut out = std::io::stdout().lock();
                // A closed stdout (e.g. `| head -1`) is not worth a panic.
                let _ = writeln!(out, "{line}").and_then(|()| out.flush());
            }
            Err(e) => {
                eprintln!("bench: scenario {name} failed: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// What every scenario shares: where the plugin builds are, a private directory for the loaded
/// copies, and the sizes.
struct Bench {
    plugin_dir: PathBuf,
    staging: tempfile::TempDir,
    messages: u64,
    calls: u64,
    rounds: usize,
    accounts: u64,
}

fn env_number(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("${name} must be a whole number, got {value:?}")),
        Err(_) => Ok(default),
    }
}

impl Bench {
    fn new() -> anyhow::Result<Self> {
        let plugin_dir = match std::env::var_os("CHANNELD_BENCH_PLUGIN_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
                .join("release"),
        };
        Ok(Self {
            plugin_dir,
            staging: tempfile::tempdir().context("cannot create a temporary plugins directory")?,
            messages: env_number("CHANNELD_BENCH_MESSAGES", 1_000_000)?,
            calls: env_number("CHANNELD_BENCH_CALLS", 5_000_000)?,
            rounds: env_number("CHANNELD_BENCH_ROUNDS", 7)?.max(1) as usize,
            accounts: env_number("CHANNELD_BENCH_ACCOUNTS", 10_000)?.max(1),
        })
    }

    /// The release build of `package`.
    fn built(&self, package: &str) -> anyhow::Result<PathBuf> {
        let file = format!("lib{}{PLUGIN_SUFFIX}", package.replace('-', "_"));
        let built = self.plugin_dir.join(file);
        ensure!(
            built.is_file(),
            "{} is missing: build it with `cargo build --release -p {package}` (scripts/bench does)",
            built.display()
        );
        Ok(built)
    }

    /// Copies the release build of `package` into the private directory, loads it through the
    /// real loader and calls its `init` with `sink` as the plugin-wide host handle.
    fn load(&self, package: &str, sink: Arc<dyn HostSink>) -> anyhow::Result<FfiPlugin> {
        let built = self.built(package)?;
        let copy = self.staging.path().join(
            built
                .file_name()
                .context("a plugin build has a file name")?,
        );
        std::fs::copy(&built, &copy)
            .with_context(|| format!("cannot copy {} to {}", built.display(), copy.display()))?;
        let module = load_root_module(&copy)?;
        let plugin = FfiPlugin::new(module, &copy)?;
        plugin.init(2, LogLevel::Warn, sink)?;
        Ok(plugin)
    }
}

/// Nanoseconds per op, to a tenth.
fn per_op(elapsed: Duration, ops: u64) -> f64 {
    (elapsed.as_nanos() as f64 / ops.max(1) as f64 * 10.0).round() / 10.0
}

/// The fastest round: the machine's other load only ever adds time, so the minimum is the figure
/// that compares best between the two sides of a pair.
fn fastest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------------------------
// ffi: the cost of the boundary itself.
// ---------------------------------------------------------------------------------------------

/// The `ffi` scenario's line.
#[derive(Serialize)]
struct FfiReport {
    scenario: &'static str,
    /// Host→plugin: `Plugin::abort_task` of an unknown task through [`FfiPlugin`].
    call_ns: f64,
    /// The same work through an in-process [`Plugin`] ([`NativeTasks`]).
    native_call_ns: f64,
    /// Plugin→host: one inbound message, built inside the plugin and delivered through the ABI
    /// with the blocking 1.0 `deliver`.
    inbound_msg_ns: f64,
    /// The same with the 1.1 `deliver_async`, awaited by the plugin's task: the whole round trip
    /// (the host's sink, here the counting one, accepts at once; the `FfiFuture` completes).
    deliver_async_msg_ns: f64,
    /// The same message built in-process and delivered through a native `&dyn` ([`NativeHost`]).
    native_msg_ns: f64,
    /// `call_ns / native_call_ns`.
    call_ratio: f64,
    /// `inbound_msg_ns / native_msg_ns` (goal: ≤ 1.5).
    msg_ratio: f64,
    /// `deliver_async_msg_ns / native_msg_ns`.
    async_msg_ratio: f64,
    /// Messages per round.
    messages: u64,
    /// Bytes of text per message.
    text_bytes: u64,
    /// Calls per round.
    calls: u64,
    /// Rounds per figure (each figure is the fastest of its rounds, after one warm-up round).
    rounds: usize,
}

const TEXT_BYTES: u64 = 100;
const FLOOD_ACCOUNT: &str = "flood";
const FLOOD_ASYNC_ACCOUNT: &str = "flood-async";

/// Compares, each through a Rust trait object so both sides pay one dynamic dispatch:
///
/// * host→plugin call: `<dyn Plugin>::abort_task(id of no task)` on [`FfiPlugin`] — prefix-module
///   field access, an `extern "C"` call, the SDK's panic fence (`catch_unwind`), and a lookup in
///   the SDK's task registry (`Mutex<Option<HashMap<u64, _>>>`) — against [`NativeTasks`], which
///   does that same fence and lookup in-process;
/// * plugin→host message: the fixture's `flood_sync` mode (on the plugin's runtime thread: build an
///   `Inbound` with owned room, sender and a 100-byte text, `Host::deliver` converts it to an
///   `InboundMessage` and calls the host through abi_stable's `HostServices` trait object, which
///   lands in `AccountLink::deliver` → `StatusBoard::deliver`: clock, lock, counters) against
///   [`native_flood`], which builds the same `Inbound`, converts it the same way and calls
///   `AccountLink::deliver` through a native `&dyn NativeHost`. The FFI figure is timed from
///   `start_account` until the task's `done` future completes on the host, so it also contains
///   the task's start and end (a few µs over a million messages);
/// * the same message through the 1.1 `deliver_async` (the fixture's `flood` mode awaits each
///   `FfiFuture`), which also goes through the daemon's message sink (here the counting one).
fn ffi(bench: &Bench) -> anyhow::Result<String> {
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let sink: Arc<dyn HostSink> = board.clone();
    let plugin = bench.load("channeld-plugin-fixture", sink.clone())?;
    plugin.configure(&json!({
        "accounts": {
            FLOOD_ACCOUNT: {
                "mode": "flood_sync",
                "messages": bench.messages,
                "text_bytes": TEXT_BYTES,
            },
            FLOOD_ASYNC_ACCOUNT: {
                "mode": "flood",
                "messages": bench.messages,
                "text_bytes": TEXT_BYTES,
            },
        }
    }))?;
    let native = NativeTasks::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let key = AccountKey::new(plugin.info().channel_id.clone(), FLOOD_ACCOUNT);
    let async_key = AccountKey::new(plugin.info().channel_id.clone(), FLOOD_ASYNC_ACCOUNT);

    let (mut call, mut native_call, mut msg, mut native_msg) = (vec![], vec![], vec![], vec![]);
    let mut async_msg = vec![];
    for round in 0..=bench.rounds {
        let c = time_calls(&plugin, bench.calls);
        let nc = time_calls(&native, bench.calls);
        let m = time_ffi_flood(&runtime, &plugin, &board, &key, bench.messages)?;
        let nm = time_native_flood(&board, &key, bench.messages, TEXT_BYTES as usize)?;
        let am = time_ffi_flood(&runtime, &plugin, &board, &async_key, bench.messages)?;
        let figures = [c, nc, m, nm, am].map(|(elapsed, ops)| per_op(elapsed, ops));
        eprintln!(
            "bench: ffi round {round}{}: call {} / native {} ns, msg {} / async {} / native {} ns",
            if round == 0 { " (warm-up)" } else { "" },
            figures[0],
            figures[1],
            figures[2],
            figures[4],
            figures[3],
        );
        if round > 0 {
            call.push(figures[0]);
            native_call.push(figures[1]);
            msg.push(figures[2]);
            native_msg.push(figures[3]);
            async_msg.push(figures[4]);
        }
    }
    let async_msg = fastest(&async_msg);
    let (call, native_call, msg, native_msg) = (
        fastest(&call),
        fastest(&native_call),
        fastest(&msg),
        fastest(&native_msg),
    );
    plugin.shutdown()?;
    Ok(serde_json::to_string(&FfiReport {
        scenario: "ffi",
        call_ns: call,
        native_call_ns: native_call,
        inbound_msg_ns: msg,
        native_msg_ns: native_msg,
        call_ratio: ratio(call, native_call),
        msg_ratio: ratio(msg, native_msg),
        deliver_async_msg_ns: async_msg,
        async_msg_ratio: ratio(async_msg, native_msg),
        messages: bench.messages,
        text_bytes: TEXT_BYTES,
        calls: bench.calls,
        rounds: bench.rounds,
    })?)
}

// ---------------------------------------------------------------------------------------------
// load: a plugins directory of distinct files through the real loader, staging included.
// ---------------------------------------------------------------------------------------------

/// The `load` scenario's line. Times are milliseconds, to a thousandth.
#[derive(Serialize)]
struct LoadReport {
    scenario: &'static str,
    /// Distinct plugin files in the directory.
    plugins: usize,
    /// `total_ms / plugins` (goal: ≤ 1 ms).
    plugin_load_ms: f64,
    /// Listing the directory (with its permission check) and loading every file in turn, as the
    /// daemon does at start: `discover::plugin_paths` + `Loader::load_file` per file.
    total_ms: f64,
    /// The listing alone.
    discover_ms: f64,
    /// Per file `Loader::load_file`: median, slowest, and the first file (the only one that
    /// pays the process's first-load costs).
    p50_ms: f64,
    max_ms: f64,
    first_ms: f64,
    /// Where the time goes, per file (mean), from a second pass over other distinct copies in
    /// another fresh state directory, with `load_file`'s steps called one by one:
    /// `StagingDir::stage` (permission checks, read, ELF checks, blake3, private copy),
    stage_ms: f64,
    /// of which, from the same calls repeated on that pass's files after it (see
    /// [`time_stage_parts`]): permission checks and read,
    stage_read_ms: f64,
    /// the ELF checks (goblin parses the whole file's tables),
    stage_elf_check_ms: f64,
    /// blake3 of the content,
    stage_hash_ms: f64,
    /// writing the private copy,
    stage_write_ms: f64,
    /// and the rename and length check;
    stage_rename_ms: f64,
    /// `load_root_module` on the staged copy: `dlopen_ms + abi_checks_ms`,
    dlopen_and_checks_ms: f64,
    /// of which `lib_header_from_path` (dlopen with its relocations, the header symbol and
    /// abi_stable's header check)
    dlopen_ms: f64,
    /// and `init_root_module` (version and layout checks, the plugin's root-module constructor);
    abi_checks_ms: f64,
    /// `FfiPlugin::new` (metadata) and `init` (the plugin's log forwarding and panic hook),
    metadata_and_init_ms: f64,
    /// and the second pass's own per-plugin total.
    breakdown_plugin_ms: f64,
    /// Bytes per plugin file.
    plugin_bytes: u64,
    /// Threads the process gained over both passes (must be 0: `init` does not build a plugin's
    /// runtime, the first start does); null where `/proc/self/task` cannot be read.
    threads_started: Option<i64>,
}

/// Plugins in the `load` scenario's directory.
const LOAD_PLUGINS: usize = 20;
const FIXTURE: &str = "channeld-plugin-fixture";

/// Milliseconds, to a thousandth.
fn ms(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 1e6).round() / 1e3
}

/// [`ms`] to a tenth of a microsecond, for a figure of a few microseconds (a snapshot).
fn ms_fine(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 1e7).round() / 1e4
}

/// Writes `count` copies of `built` into a new private (0700) directory `dir`, each 0644 with a
/// few distinct bytes appended after the ELF's last table (which loading ignores), so every copy
/// has its own content hash: the staging directory keys copies by hash, and two files with the
/// same content would become one staged file and one `dlopen` handle. The copies are synced so
/// the passes time loading, not the write-back of the setup.
fn distinct_copies(
    built: &Path,
    dir: &Path,
    pass: &str,
    count: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let bytes = fs::read(built).with_context(|| format!("cannot read {}", built.display()))?;
    fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let mut copies = Vec::with_capacity(count);
    for i in 0..count {
        let path = dir.join(format!("bench-{pass}-{i:02}{PLUGIN_SUFFIX}"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(&bytes)?;
        write!(file, "\0channeld-bench {pass} {i}\0")?;
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
        file.sync_all()?;
        copies.push(path);
    }
    fs::File::open(dir)?.sync_all()?;
    Ok(copies)
}

/// Threads of this process, where `/proc` says.
fn thread_count() -> Option<i64> {
    Some(fs::read_dir("/proc/self/task").ok()?.count() as i64)
}

/// Checks that every staged copy is its own file and is mapped in this process: distinct hashes,
/// distinct staged paths, and each staged file name in `/proc/self/maps` (skipped where that
/// cannot be read). All copies report the same `PluginInfo` (they are one plugin), so the
/// mappings are what proves `dlopen` gave each file its own library.
fn ensure_distinct(hashes: &[String], copies: &[PathBuf]) -> anyhow::Result<()> {
    let unique_hashes: HashSet<&String> = hashes.iter().collect();
    ensure!(
        unique_hashes.len() == hashes.len(),
        "only {} distinct content hashes among {} copies",
        unique_hashes.len(),
        hashes.len()
    );
    let unique_copies: HashSet<&PathBuf> = copies.iter().collect();
    ensure!(
        unique_copies.len() == copies.len(),
        "only {} distinct staged copies among {}",
        unique_copies.len(),
        copies.len()
    );
    match fs::read_to_string("/proc/self/maps") {
        Ok(maps) => {
            for copy in copies {
                let name = copy.file_name().context("a staged copy has a file name")?;
                let name = name.to_string_lossy();
                ensure!(
                    maps.lines().any(|line| line.ends_with(&*name)),
                    "the staged copy {} is not mapped in the process",
                    copy.display()
                );
            }
        }
        Err(e) => eprintln!("bench: load: cannot read /proc/self/maps ({e}); mappings not checked"),
    }
    Ok(())
}

/// `Loader::load_file`'s steps one by one, timed: stage, dlopen (`lib_header_from_path`),
/// abi_stable's checks (`init_root_module`: version, layout, the plugin's root-module
/// constructor; these two are `load_root_module` without its error naming), metadata and init.
fn load_in_steps(
    staging: &StagingDir,
    loader: &Loader,
    sink: &Arc<dyn HostSink>,
    path: &Path,
) -> anyhow::Result<([Duration; 4], String, PathBuf)> {
    let t0 = Instant::now();
    let staged = staging.stage(path)?;
    let t1 = Instant::now();
    let header = lib_header_from_path(&staged.copy).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t2 = Instant::now();
    let module = header
        .init_root_module::<PluginMod_Ref>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t3 = Instant::now();
    let plugin = FfiPlugin::new(channeld::load::PluginModule::V1_1(module), path)?;
    plugin.init(loader.worker_threads, loader.max_log_level, sink.clone())?;
    let t4 = Instant::now();
    ensure!(
        plugin.info().channel_id == "fixture",
        "{} loaded as {:?}",
        path.display(),
        plugin.info().channel_id
    );
    Ok((
        [t1 - t0, t2 - t1, t3 - t2, t4 - t3],
        staged.hash,
        staged.copy,
    ))
}

/// `StagingDir::stage`'s parts timed by [`time_stage_parts`].
const STAGE_PARTS: usize = 5;

/// Repeats what `StagingDir::stage` does to each of `files`, part by part (the same calls:
/// `discover::check_file`, `fs::read`, the ELF checks with goblin, blake3, writing a new 0500
/// file, rename and re-reading the length), under scratch names in `dir` (the staging
/// directory, so the same file system), and returns each part's mean.
fn time_stage_parts(dir: &Path, files: &[PathBuf]) -> anyhow::Result<[Duration; STAGE_PARTS]> {
    let mut sums = [Duration::ZERO; STAGE_PARTS];
    for (i, source) in files.iter().enumerate() {
        let tmp = dir.join(format!(".bench-{i}.tmp"));
        let staged = dir.join(format!(".bench-{i}{PLUGIN_SUFFIX}"));
        let t0 = Instant::now();
        discover::check_file(source)?;
        let bytes = fs::read(source)?;
        let t1 = Instant::now();
        let header = Elf::parse_header(&bytes)?;
        ensure!(header.e_type == goblin::elf::header::ET_DYN, "not ET_DYN");
        let elf = Elf::parse(&bytes)?;
        let len = bytes.len() as u64;
        ensure!(
            elf.program_headers
                .iter()
                .filter(|p| p.p_type == PT_LOAD)
                .all(|p| p.p_offset.saturating_add(p.p_filesz) <= len),
            "a PT_LOAD segment lies past the end"
        );
        let t2 = Instant::now();
        let hash = black_box(blake3::hash(&bytes).to_hex().to_string());
        let t3 = Instant::now();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o500)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        drop(file);
        let t4 = Instant::now();
        fs::rename(&tmp, &staged)?;
        ensure!(fs::metadata(&staged)?.len() == len, "short scratch copy");
        let t5 = Instant::now();
        black_box(hash);
        let parts = [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4];
        for (sum, part) in sums.iter_mut().zip(parts) {
            *sum += part;
        }
        fs::remove_file(&staged)?;
    }
    Ok(sums.map(|sum| sum / files.len().max(1) as u32))
}

/// A daemon's start over a plugins directory of [`LOAD_PLUGINS`] distinct stripped release
/// copies of the fixture, as `Registry::load_dir` does it: list the directory, stage every file
/// (permission checks, read, blake3, private copy, ELF checks) on all cores, then load each staged
/// copy in turn (dlopen, abi_stable's checks, metadata, `init`), into a fresh state directory.
/// The per-file figures (`p50`, `max`, `first`) are the load step alone. The registry is left out: it would refuse the
/// copies' shared channel id, so every file is loaded with a `claimed` that claims nothing and
/// every result must be `Ok`. A second pass over other copies, into another fresh state
/// directory, times the same steps one by one to show where the time goes.
fn load(bench: &Bench) -> anyhow::Result<String> {
    let built = bench.built(FIXTURE)?;
    let plugin_bytes = fs::metadata(&built)?.len();
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let board = Arc::new(StatusBoard::new(clock.clone()));
    let sink: Arc<dyn HostSink> = board;
    let threads_before = thread_count();

    // The timed pass, as the daemon loads its directory.
    let plugins_dir = scratch.path().join("plugins");
    distinct_copies(&built, &plugins_dir, "load", LOAD_PLUGINS)?;
    let staging = StagingDir::open(&scratch.path().join("state/staging"))?;
    let loader = Loader::new(staging, sink.clone(), clock.clone());
    let start = Instant::now();
    let paths = discover::plugin_paths(&plugins_dir)?;
    let discover_time = start.elapsed();
    // As `Registry::load_dir` does: stage every file in parallel, then load them one by one.
    let staged = loader.stage_all(&paths);
    let staged_time = start.elapsed();
    let mut loaded: Vec<LoadedPlugin> = Vec::with_capacity(paths.len());
    let mut each = Vec::with_capacity(paths.len());
    for (path, staged) in paths.iter().zip(staged) {
        let t = Instant::now();
        let plugin = staged
            .map_err(anyhow::Error::from)
            .and_then(|s| Ok(loader.load_staged(s, |_| None)?))
            .with_context(|| format!("{} did not load", path.display()))?;
        each.push(t.elapsed());
        loaded.push(plugin);
    }
    let total = start.elapsed();
    eprintln!(
        "load: staged {} files in parallel in {:.3} ms",
        paths.len(),
        staged_time.as_secs_f64() * 1e3
    );
    ensure!(
        loaded.len() == LOAD_PLUGINS,
        "discovered {} plugin files, wrote {LOAD_PLUGINS}",
        loaded.len()
    );
    for plugin in &loaded {
        ensure!(
            plugin.info.channel_id == "fixture",
            "{} loaded as {:?}",
            plugin.staged.source.display(),
            plugin.info.channel_id
        );
    }
    let hashes: Vec<String> = loaded.iter().map(|p| p.staged.hash.clone()).collect();
    let copies: Vec<PathBuf> = loaded.iter().map(|p| p.staged.copy.clone()).collect();
    ensure_distinct(&hashes, &copies)?;
    let first = each[0];
    each.sort();

    // The breakdown pass: other copies (other hashes, so nothing is reused), another state dir.
    let steps_dir = scratch.path().join("plugins-steps");
    let step_paths = distinct_copies(&built, &steps_dir, "steps", LOAD_PLUGINS)?;
    let step_staging = StagingDir::open(&scratch.path().join("state-steps/staging"))?;
    let step_loader = Loader::new(step_staging.clone(), sink.clone(), clock);
    let (mut steps, mut step_hashes, mut step_copies) = ([Duration::ZERO; 4], vec![], vec![]);
    for path in &step_paths {
        let (times, hash, copy) = load_in_steps(&step_staging, &step_loader, &sink, path)?;
        for (sum, t) in steps.iter_mut().zip(times) {
            *sum += t;
        }
        step_hashes.push(hash);
        step_copies.push(copy);
    }
    step_hashes.extend(hashes);
    step_copies.extend(copies);
    ensure_distinct(&step_hashes, &step_copies)?;
    let parts = time_stage_parts(step_staging.path(), &step_paths)?;

    let threads_started = threads_before
        .zip(thread_count())
        .map(|(before, after)| after - before);
    ensure!(
        threads_started.is_none_or(|n| n == 0),
        "loading started {} threads: a plugin's `init` built its runtime",
        threads_started.unwrap_or_default()
    );
    let n = LOAD_PLUGINS as u32;
    let per = steps.map(|t| t / n);
    eprintln!(
        "bench: load: {LOAD_PLUGINS} plugins in {:.3} ms ({:.3} ms each); steps per plugin: \
         stage {:.3} (read {:.3}, elf {:.3}, hash {:.3}, write {:.3}, rename {:.3}), \
         dlopen {:.3}, abi checks {:.3}, metadata+init {:.3} ms",
        ms(total),
        ms(total / n),
        ms(per[0]),
        ms(parts[0]),
        ms(parts[1]),
        ms(parts[2]),
        ms(parts[3]),
        ms(parts[4]),
        ms(per[1]),
        ms(per[2]),
        ms(per[3]),
    );
    Ok(serde_json::to_string(&LoadReport {
        scenario: "load",
        plugins: LOAD_PLUGINS,
        plugin_load_ms: ms(total / n),
        total_ms: ms(total),
        discover_ms: ms(discover_time),
        p50_ms: ms(each[each.len() / 2]),
        max_ms: ms(each[each.len() - 1]),
        first_ms: ms(first),
        stage_ms: ms(per[0]),
        stage_read_ms: ms(parts[0]),
        stage_elf_check_ms: ms(parts[1]),
        stage_hash_ms: ms(parts[2]),
        stage_write_ms: ms(parts[3]),
        stage_rename_ms: ms(parts[4]),
        dlopen_and_checks_ms: ms(per[1] + per[2]),
        dlopen_ms: ms(per[1]),
        abi_checks_ms: ms(per[2]),
        metadata_and_init_ms: ms(per[3]),
        breakdown_plugin_ms: ms(steps.iter().sum::<Duration>() / n),
        plugin_bytes,
        threads_started,
    })?)
}

/// A task id no plugin hands out.
const NO_TASK: u64 = u64::MAX;

fn time_calls(plugin: &dyn Plugin, calls: u64) -> (Duration, u64) {
    let plugin = black_box(plugin);
    let start = Instant::now();
    for _ in 0..calls {
        black_box(plugin.abort_task(black_box(NO_TASK)));
    }
    (start.elapsed(), calls)
}

fn inbound_messages(board: &StatusBoard, key: &AccountKey) -> u64 {
    board.get(key).map_or(0, |s| s.inbound_messages)
}

/// The fixture's own count of ended tasks for the flood account.
fn fixture_ends(plugin: &FfiPlugin, account: &str) -> anyhow::Result<u64> {
    let described = plugin.describe_account(account)?;
    described
        .as_ref()
        .and_then(|d| d.get("ends"))
        .and_then(Value::as_u64)
        .context("the fixture's description has no `ends` counter")
}

fn time_ffi_flood(
    runtime: &tokio::runtime::Runtime,
    plugin: &FfiPlugin,
    board: &Arc<StatusBoard>,
    key: &AccountKey,
    messages: u64,
) -> anyhow::Result<(Duration, u64)> {
    let (before, ends_before) = (
        inbound_messages(board, key),
        fixture_ends(plugin, &key.account)?,
    );
    let link = AccountLink::for_account(key.clone(), board.begin_generation(key), board.clone());
    let start = Instant::now();
    let RunningTask { done, .. } = plugin.start_account(&key.account, link)?;
    runtime
        .block_on(done)
        .map_err(|e| anyhow::anyhow!("the flood task failed: {e}"))?;
    let elapsed = start.elapsed();
    let delivered = inbound_messages(board, key) - before;
    ensure!(
        delivered == messages,
        "the plugin delivered {delivered} of {messages} messages"
    );
    let ends = fixture_ends(plugin, &key.account)? - ends_before;
    ensure!(ends == 1, "the fixture counted {ends} ended tasks, not 1");
    Ok((elapsed, messages))
}

/// The native side of the message comparison: the host as an in-process trait object.
trait NativeHost {
    fn deliver(&self, message: InboundMessage) -> Result<(), String>;
}

impl NativeHost for AccountLink {
    fn deliver(&self, message: InboundMessage) -> Result<(), String> {
        AccountLink::deliver(self, message)
    }
}

/// What the fixture's `flood` mode does, in-process: the same `Inbound`, converted to an
/// `InboundMessage` by the same conversion the SDK's `Host::deliver` uses.
fn native_flood(host: &dyn NativeHost, messages: u64, text_bytes: usize) -> Result<(), String> {
    let text = "x".repeat(text_bytes);
    for _ in 0..messages {
        let message = Inbound::new("bench-room", "bench-sender", text.as_str());
        let message = InboundMessage::from(message);
        host.deliver(message)?;
    }
    Ok(())
}

fn time_native_flood(
    board: &Arc<StatusBoard>,
    key: &AccountKey,
    messages: u64,
    text_bytes: usize,
) -> anyhow::Result<(Duration, u64)> {
    let before = inbound_messages(board, key);
    let link = AccountLink::for_account(key.clone(), board.begin_generation(key), board.clone());
    let host: &dyn NativeHost = black_box(&link);
    let start = Instant::now();
    native_flood(host, messages, text_bytes).map_err(anyhow::Error::msg)?;
    let elapsed = start.elapsed();
    let delivered = inbound_messages(board, key) - before;
    ensure!(
        delivered == messages,
        "the native loop delivered {delivered} of {messages} messages"
    );
    Ok((elapsed, messages))
}

/// One task's controls, as the SDK's task registry keeps them.
struct Control {
    abort: CancellationToken,
    _cancel: tokio::task::AbortHandle,
}

/// The in-process counterpart of the SDK's task registry (`plugin-abi/src/sdk/tasks.rs`).
static NATIVE_TASKS: Mutex<Option<HashMap<u64, Control>>> = Mutex::new(None);

/// An in-process [`Plugin`] whose `abort_task` does what the SDK's entry does behind the ABI:
/// the panic fence and the task-registry lookup. Its other entries are not benchmarked.
struct NativeTasks {
    info: PluginInfo,
}

impl NativeTasks {
    fn new() -> Self {
        Self {
            info: PluginInfo {
                channel_id: "native".into(),
                display_name: "in-process double".into(),
                plugin_version: "0".into(),
                abi_version: "0".into(),
                rustc_version: "0".into(),
            },
        }
    }

    fn unsupported<T>(&self, entry: &'static str) -> Result<T, PluginCallError> {
        Err(PluginCallError {
            channel: self.info.channel_id.clone(),
            entry,
            message: "not part of the benchmark".into(),
        })
    }
}

fn with_native_tasks<R>(f: impl FnOnce(&mut HashMap<u64, Control>) -> R) -> R {
    let mut guard = NATIVE_TASKS.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

impl Plugin for NativeTasks {
    fn info(&self) -> &PluginInfo {
        &self.info
    }
    fn configure(&self, _channel_config: &Value) -> Result<(), PluginCallError> {
        self.unsupported("configure")
    }
    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError> {
        self.unsupported("list_account_ids")
    }
    fn default_account_id(&self) -> Result<Option<String>, PluginCallError> {
        self.unsupported("default_account_id")
    }
    fn resolve_account(&self, _account: &str) -> Result<Value, PluginCallError> {
        self.unsupported("resolve_account")
    }
    fn is_enabled(&self, _account: &str) -> Result<Check, PluginCallError> {
        self.unsupported("is_enabled")
    }
    fn is_configured(&self, _account: &str) -> Result<Check, PluginCallError> {
        self.unsupported("is_configured")
    }
    fn describe_account(&self, _account: &str) -> Result<Option<Value>, PluginCallError> {
        self.unsupported("describe_account")
    }
    fn start_account(
        &self,
        _account: &str,
        _link: AccountLink,
    ) -> Result<RunningTask, PluginCallError> {
        self.unsupported("start_account")
    }
    fn abort_task(&self, task: u64) -> bool {
        catch_unwind(AssertUnwindSafe(|| {
            with_native_tasks(|tasks| tasks.get(&task).map(|c| c.abort.cancel()).is_some())
        }))
        .unwrap_or(false)
    }
    fn cancel_task(&self, _task: u64) -> bool {
        false
    }
    fn stop_account(&self, _account: &str) -> Result<(), PluginCallError> {
        self.unsupported("stop_account")
    }
    fn logout(&self, _account: &str) -> Result<bool, PluginCallError> {
        self.unsupported("logout")
    }
    fn send(&self, _message: Outbound) -> BoxFuture<Result<String, PluginCallError>> {
        let result = self.unsupported("send");
        Box::pin(async move { result })
    }
    fn shutdown(&self) -> Result<(), PluginCallError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// S1 and S2: 10,000 accounts of one channel under the real supervisor.
// ---------------------------------------------------------------------------------------------

/// Workers of the host's runtime (the machine has 2 cores) and of the plugin's (the config's
/// default `plugin_worker_threads`).
const HOST_WORKERS: usize = 2;
const PLUGIN_WORKERS: u32 = 2;
/// The config's default `plugin_call_timeout`.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fleet scenario waits for the plugin's counters before it calls the run a failure.
const FLEET_LIMIT: Duration = Duration::from_secs(120);
/// The pause between two reads of the plugin's counters: short against the goals (tens of ms),
/// long enough that the polling thread does not take a core from the work it measures.
const POLL: Duration = Duration::from_micros(50);
/// The pause between two reads of the plugin's counters while they are far from their goal (see
/// [`Fleet::run_until_counts`]).
const NEAR_POLL: Duration = Duration::from_millis(1);
/// The same while a crash storm runs for seconds: each read of the counters is a few µs of the
/// bench's own CPU, which at [`POLL`] took ~6 % of the machine from the storm.
const STORM_POLL: Duration = Duration::from_millis(1);
/// `Supervisor::snapshot` calls per S1 run; the figure is their median.
const SNAPSHOT_CALLS: usize = 5;
/// The fleet's channel id (the fixture's).
const FLEET_CHANNEL: &str = "fixture";

/// One fleet scenario's world: a distinct stripped copy of the fixture staged and loaded through
/// [`Loader::load_file`], a [`Supervisor`] on a two-worker multi-thread runtime writing to a
/// [`StatusBoard`] that is also the plugin's host sink (as in the daemon), and one channel of
/// `accounts` accounts `a0`…`a{n-1}`, each with the same table, registered with `add_channel`.
struct Fleet {
    runtime: tokio::runtime::Runtime,
    supervisor: Supervisor,
    plugin: Arc<dyn Plugin>,
    ids: Vec<String>,
    _scratch: tempfile::TempDir,
}

/// What the plugin's counts are, for a wait's error.
const COUNTS: &str = "the plugin's counts (tasks started, tasks ended)";

/// Reads `read` every `poll` until `done` holds for what it read (at most [`FLEET_LIMIT`]); the
/// error names `what` and its last value.
fn poll_until<T: std::fmt::Debug>(
    poll: Duration,
    mut read: impl FnMut() -> anyhow::Result<T>,
    done: impl Fn(&T) -> bool,
    what: &str,
) -> anyhow::Result<T> {
    let limit = Instant::now() + FLEET_LIMIT;
    loop {
        let value = read()?;
        if done(&value) {
            return Ok(value);
        }
        ensure!(
            Instant::now() < limit,
            "{what} still {value:?} after {FLEET_LIMIT:?}"
        );
        std::thread::sleep(poll);
    }
}

/// Reads `read` while an operation runs until its `progress` reaches `goal`: every [`NEAR_POLL`]
/// until the last tenth, then every [`POLL`] (a read takes a little CPU from the operation).
fn poll_progress<T: std::fmt::Debug>(
    mut read: impl FnMut() -> anyhow::Result<T>,
    progress: impl Fn(&T) -> u64,
    goal: u64,
    what: &str,
) -> anyhow::Result<T> {
    let near = goal - goal / 10;
    poll_until(NEAR_POLL, &mut read, |value| progress(value) >= near, what)?;
    poll_until(POLL, read, |value| progress(value) >= goal, what)
}

/// What [`Fleet::run_until_counts`] saw.
struct Counted<T> {
    /// The plugin's counts (tasks started, tasks ended) once they held.
    counts: (u64, u64),
    /// From the operation's spawn until the counts held.
    counted: Duration,
    /// The operation's result.
    result: T,
    /// From the operation's spawn until it returned.
    returned: Duration,
}

/// Makes each fleet's library copy distinct, so its process-wide counters start at zero.
static FLEETS: AtomicUsize = AtomicUsize::new(0);

impl Fleet {
    fn new(bench: &Bench, account: Value, policy: SupervisorConfig) -> anyhow::Result<Self> {
        Self::new_in(bench, account, policy, None)
    }

    /// [`Fleet::new`] with the plugin in-process (`child: None`) or in one isolated child
    /// process run from the `channeld` binary `child` (as `isolation = "process"` does).
    fn new_in(
        bench: &Bench,
        account: Value,
        policy: SupervisorConfig,
        child: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let built = bench.built(FIXTURE)?;
        let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
        let pass = format!("fleet{}", FLEETS.fetch_add(1, Ordering::Relaxed));
        let copy = distinct_copies(&built, &scratch.path().join("plugins"), &pass, 1)?;
        let staging = StagingDir::open(&scratch.path().join("state/staging"))?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let board = Arc::new(StatusBoard::new(clock.clone()));
        // Named so the CPU meter can tell the workers (the runtime starts them first) from the
        // blocking pool's threads.
        let spawned = AtomicUsize::new(0);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(HOST_WORKERS)
            .thread_name_fn(move || {
                let i = spawned.fetch_add(1, Ordering::Relaxed);
                let kind = if i < HOST_WORKERS { "w" } else { "b" };
                format!("host-{kind}{i}")
            })
            // As the daemon's runtime does (`main.rs`).
            .on_thread_start(channeld_plugin_abi::grow_thread_arena)
            .enable_all()
            .build()?;
        let plugin: Arc<dyn Plugin> = match child {
            None => {
                let mut loader = Loader::new(staging, board.clone(), clock.clone());
                loader.worker_threads = PLUGIN_WORKERS;
                loader.max_log_level = LogLevel::Warn;
                loader.load_file(&copy[0], |_| None)?.plugin
            }
            Some(exe) => {
                let staged = staging.stage(&copy[0])?;
                let spec = ChildSpec {
                    plugin: staged.copy.clone(),
                    source: staged.source.clone(),
                    worker_threads: PLUGIN_WORKERS,
                    max_log_level: LogLevel::Warn,
                    memory_limit: None,
                    exe: Some(exe),
                };
                Arc::new(IsolatedPlugin::spawn(
                    spec,
                    runtime.handle().clone(),
                    board.clone(),
                )?)
            }
        };
        ensure!(
            plugin.info().channel_id == FLEET_CHANNEL,
            "the fixture loaded as {:?}",
            plugin.info().channel_id
        );
        let supervisor =
            Supervisor::new(policy, CALL_TIMEOUT, board, clock, Arc::new(RandomJitter));
        let ids: Vec<String> = (0..bench.accounts).map(|i| format!("a{i}")).collect();
        let accounts: serde_json::Map<String, Value> =
            ids.iter().map(|id| (id.clone(), account.clone())).collect();
        let section = ChannelSection {
            table: json!({ "accounts": accounts }),
        };
        let channel = runtime.block_on(supervisor.add_channel(plugin.clone(), section))?;
        ensure!(
            channel.accounts.len() == ids.len(),
            "the supervisor registered {} of {} accounts",
            channel.accounts.len(),
            ids.len()
        );
        Ok(Self {
            runtime,
            supervisor,
            plugin,
            ids,
            _scratch: scratch,
        })
    }

    /// Runs `op` as a task on the runtime's workers (as the daemon spawns start-all) and waits.
    fn on_runtime<T, F>(&self, op: impl FnOnce(Supervisor) -> F) -> anyhow::Result<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let task = self.runtime.spawn(op(self.supervisor.clone()));
        Ok(self.runtime.block_on(task)?)
    }

    /// Runs `op` as a task on the runtime's workers while this thread reads the plugin's counts
    /// until `progress` (of the counts: tasks started, tasks ended) reaches `goal` (at most
    /// [`FLEET_LIMIT`]), then waits for `op`: the counts, the time from `op`'s spawn until they
    /// held, `op`'s result, and the time until it returned. (The supervisor's bookkeeping of an
    /// account goes on after its task has started or ended, so `op` returns after the counts
    /// hold.) A read of the counts is a call into the plugin that builds its description, about
    /// 10 µs of this thread while the operation keeps both cores busy: they are read as
    /// [`poll_progress`] reads.
    fn run_until_counts<T, F>(
        &self,
        op: impl FnOnce(Supervisor) -> F,
        progress: impl Fn(u64, u64) -> u64,
        goal: u64,
    ) -> anyhow::Result<Counted<T>>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let began = Instant::now();
        let task = self.runtime.spawn(op(self.supervisor.clone()));
        let counts = poll_progress(
            || self.counts(),
            |&(starts, ends)| progress(starts, ends),
            goal,
            COUNTS,
        );
        let counted = began.elapsed();
        // Waited for even when the counts never held: nothing of it outlives this call.
        let result = self.runtime.block_on(task)?;
        let returned = began.elapsed();
        Ok(Counted {
            counts: counts?,
            counted,
            result,
            returned,
        })
    }

    /// The plugin's own process-wide counts: (tasks started, tasks ended).
    fn counts(&self) -> anyhow::Result<(u64, u64)> {
        let described = self
            .plugin
            .describe_account(&self.ids[0])?
            .context("the fixture describes no account")?;
        let count = |field: &str| {
            described
                .get(field)
                .and_then(Value::as_u64)
                .with_context(|| format!("the fixture's description has no {field:?}"))
        };
        Ok((count("processStarts")?, count("processEnds")?))
    }

    /// Reads the plugin's counts every `poll` until `done` holds (at most [`FLEET_LIMIT`]).
    fn wait_counts(
        &self,
        poll: Duration,
        done: impl Fn(u64, u64) -> bool,
    ) -> anyhow::Result<(u64, u64)> {
        poll_until(
            poll,
            || self.counts(),
            |&(starts, ends)| done(starts, ends),
            COUNTS,
        )
    }

    /// The fleet's accounts in `Supervisor::snapshot`, checked to be exactly `ids`.
    fn snapshot_accounts<'a>(
        &self,
        snapshot: &'a channeld::status::Snapshot,
    ) -> anyhow::Result<&'a channeld::status::ChannelSnapshot> {
        let accounts = snapshot
            .get(FLEET_CHANNEL)
            .context("the snapshot has no fixture channel")?;
        ensure!(
            accounts.len() == self.ids.len(),
            "the snapshot has {} of {} accounts",
            accounts.len(),
            self.ids.len()
        );
        Ok(accounts)
    }

    /// Stops everything: every account, the plugin's runtime, the host's runtime.
    fn close(self) -> anyhow::Result<()> {
        self.on_runtime(|s| async move { s.shutdown().await })?;
        self.plugin.shutdown()?;
        self.runtime.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    }
}

/// CPU time of every thread of the process at one moment, by thread id (with its name), read
/// through each thread's CPU-time clock (`/proc/.../schedstat` is not enabled on every kernel).
struct CpuMeter {
    threads: HashMap<i32, (String, Duration)>,
    /// The whole process's user and system time (`getrusage`), which also counts threads that
    /// have exited in between.
    user: Duration,
    system: Duration,
    /// Voluntary and involuntary context switches of the whole process.
    switches: (i64, i64),
}

impl CpuMeter {
    fn read() -> Self {
        // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let mut meter = Self {
            threads: HashMap::new(),
            user: time(usage.ru_utime),
            system: time(usage.ru_stime),
            switches: (usage.ru_nvcsw, usage.ru_nivcsw),
        };
        let Ok(tasks) = fs::read_dir("/proc/self/task") else {
            return meter;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            // The kernel's per-thread CPU clock id (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)).
            let clock = (!tid << 3) | 6;
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid, writable timespec; an id of a thread that has exited makes
            // the call fail (checked), nothing else.
            if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
                let cpu = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                meter.threads.insert(tid, (comm.trim().to_owned(), cpu));
            }
        }
        meter
    }

    /// CPU time spent since `before`, by kind of thread: the host runtime's workers, its
    /// blocking pool, the plugin's runtime, the bench's own thread, anything else.
    fn since(&self, before: &Self) -> String {
        let main = std::process::id() as i32;
        let mut groups: BTreeMap<&str, (Duration, usize)> = BTreeMap::new();
        for (tid, (comm, cpu)) in &self.threads {
            let spent = cpu.saturating_sub(before.threads.get(tid).map_or(Duration::ZERO, |t| t.1));
            let group = match comm.as_str() {
                _ if *tid == main => "bench",
                c if c.starts_with("host-w") => "host-workers",
                c if c.starts_with("host-b") => "host-blocking",
                c if c.starts_with("chd-") => "plugin",
                _ => "other",
            };
            let entry = groups.entry(group).or_default();
            entry.0 += spent;
            entry.1 += 1;
        }
        let total: Duration = groups.values().map(|g| g.0).sum();
        let parts: Vec<String> = groups
            .iter()
            .map(|(group, (cpu, n))| format!("{group} {:.1} ({n})", ms(*cpu)))
            .collect();
        format!(
            "cpu {:.1} ms (user {:.1}, system {:.1}; context switches {} voluntary, {} \
             involuntary): {}",
            ms(total),
            ms(self.user.saturating_sub(before.user)),
            ms(self.system.saturating_sub(before.system)),
            self.switches.0 - before.switches.0,
            self.switches.1 - before.switches.1,
            parts.join(", ")
        )
    }
}

/// The process's resident memory (`VmRSS` of `/proc/self/status`), in bytes.
fn rss_bytes() -> anyhow::Result<u64> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("/proc/self/status has no VmRSS line")?;
    Ok(kib * 1024)
}

fn channel_summary(
    summaries: &BTreeMap<String, ChannelStartSummary>,
) -> anyhow::Result<&ChannelStartSummary> {
    summaries
        .get(FLEET_CHANNEL)
        .context("start-all's summary has no fixture channel")
}

/// The `S1` scenario's line. Times are milliseconds, to a thousandth.
#[derive(Serialize)]
struct S1Report {
    scenario: &'static str,
    accounts: u64,
    /// Tasks running by the plugin's own count (`processStarts − processEnds`) once all started.
    running: u64,
    /// `Supervisor::start_all` (spawned on the runtime, as the daemon does) until the plugin
    /// counts every task running (goal: ≤ 20 ms).
    start_all_ms: f64,
    /// `Supervisor::snapshot` with every account running: the median of [`SNAPSHOT_CALLS`]
    /// (goal: ≤ 1 ms).
    snapshot_ms: f64,
    /// `Supervisor::stop(channel, None)` until the plugin counts every task ended (goal: ≤ 20 ms).
    stop_all_ms: f64,
    /// (RSS with every account running − RSS before start-all) / accounts (goal: ≤ 2 KiB).
    bytes_per_account: u64,
}

/// 10,000 accounts whose tasks run until aborted (the fixture's default mode): start-all until
/// the plugin counts them all running, the in-memory snapshot of all accounts, stop-all until the
/// plugin counts them all ended, and the resident memory each running account costs.
fn s1(bench: &Bench) -> anyhow::Result<String> {
    fleet_line(bench, "S1")
}

/// `S1`'s line for `bench`'s fleet, as `scenario` (`S3` runs the same code on a bigger fleet).
fn fleet_line(bench: &Bench, scenario: &'static str) -> anyhow::Result<String> {
    let report = S1Report {
        scenario,
        ..s1_figures(bench, scenario, None)?
    };
    Ok(serde_json::to_string(&report)?)
}

/// `S1`'s figures, with the plugin in-process (`child: None`) or in one isolated child run from
/// the `channeld` binary `child` (the `isolation` scenario compares the two); `label` names the
/// run in the progress lines on stderr.
fn s1_figures(bench: &Bench, label: &str, child: Option<PathBuf>) -> anyhow::Result<S1Report> {
    let account = if std::env::var_os("CHANNELD_BENCH_STOP_HOOK").is_some_and(|v| v == "1") {
        json!({ "block_in_stop_ms": 0 })
    } else {
        json!({})
    };
    let fleet = Fleet::new_in(bench, account, SupervisorConfig::default(), child)?;
    let n = bench.accounts;
    let rss_before = rss_bytes()?;

    // Each figure runs until the plugin counts every task started (ended), as the plugin's own
    // counters say while the operation runs; the operation returns once the supervisor has
    // written every account's state, a little later (stderr has both).
    let cpu = CpuMeter::read();
    let Counted {
        counts: (starts, ends),
        counted: start_all,
        result: summaries,
        returned,
    } = fleet.run_until_counts(
        |s| async move { s.start_all().await },
        |starts, ends| starts - ends,
        n,
    )?;
    let start_cpu = CpuMeter::read().since(&cpu);
    let rss_running = rss_bytes()?;
    let running = starts - ends;
    ensure!(
        running == n && ends == 0,
        "{starts} starts and {ends} ends for {n} accounts"
    );
    let summary = channel_summary(&summaries)?;
    ensure!(
        summary.attempted as u64 == n && summary.started as u64 == n,
        "start-all's summary: {summary:?}"
    );

    let mut snapshot_times = Vec::with_capacity(SNAPSHOT_CALLS);
    let mut snapshot = BTreeMap::new();
    for _ in 0..SNAPSHOT_CALLS {
        let t = Instant::now();
        let fresh = fleet.supervisor.snapshot();
        snapshot_times.push(t.elapsed());
        // The previous one is dropped outside the timed call.
        snapshot = fresh;
    }
    let accounts = fleet.snapshot_accounts(&snapshot)?;
    let not_running = accounts.values().filter(|a| !a.running).count();
    ensure!(
        not_running == 0,
        "{not_running} accounts are not running in the snapshot"
    );
    drop(snapshot);
    let snapshot_median = {
        let mut sorted = snapshot_times.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    };

    let cpu = CpuMeter::read();
    let Counted {
        counts: (starts_after, ends_after),
        counted: stop_all,
        result: outcomes,
        returned: stop_returned,
    } = fleet.run_until_counts(
        |s| async move { s.stop(FLEET_CHANNEL, None).await },
        |_, ends| ends,
        n,
    )?;
    let outcomes = outcomes?;
    let stop_cpu = CpuMeter::read().since(&cpu);
    ensure!(
        starts_after == n && ends_after == n,
        "after stop-all: {starts_after} starts, {ends_after} ends for {n} accounts"
    );
    let not_stopped = outcomes
        .iter()
        .filter(|(_, o)| *o != StopOutcome::Stopped)
        .count();
    ensure!(
        outcomes.len() as u64 == n && not_stopped == 0,
        "stop-all: {} outcomes, {not_stopped} not plainly stopped",
        outcomes.len()
    );
    eprintln!(
        "bench: {label}: start_all returned after {:.3} ms, all running after {:.3} ms; \
         snapshots {:?} ms; stop returned after {:.3} ms, all ended after {:.3} ms; RSS {} -> {} \
         KiB\nbench: {label}: start-all {start_cpu}\nbench: {label}: stop-all {stop_cpu}",
        ms(returned),
        ms(start_all),
        snapshot_times
            .iter()
            .map(|t| ms_fine(*t))
            .collect::<Vec<_>>(),
        ms(stop_returned),
        ms(stop_all),
        rss_before / 1024,
        rss_running / 1024,
    );
    fleet.close()?;
    Ok(S1Report {
        scenario: "S1",
        accounts: n,
        running,
        start_all_ms: ms(start_all),
        snapshot_ms: ms_fine(snapshot_median),
        stop_all_ms: ms(stop_all),
        bytes_per_account: rss_running.saturating_sub(rss_before) / n,
    })
}

/// The `S2` scenario's line.
#[derive(Serialize)]
struct S2Report {
    scenario: &'static str,
    accounts: u64,
    /// Tasks started, by the plugin's own count (every account: 1 + `max_restarts`).
    starts: u64,
    /// Start-all until every account has been given up on (goal: ≤ 0.5 s; the backoff alone,
    /// 1+2+4+8+16+32+60+60+60+60 ms plus up to 10 % jitter, is ≈ 0.3 s).
    gave_up_all_ms: f64,
}

/// `S2`'s restart policy: a backoff of 1 ms doubling to 60 ms, 10 % jitter, 10 restarts.
fn storm_policy() -> SupervisorConfig {
    SupervisorConfig {
        initial_backoff: Duration::from_millis(1),
        backoff_factor: 2.0,
        max_backoff: Duration::from_millis(60),
        jitter: 0.1,
        max_restarts: 10,
        ..SupervisorConfig::default()
    }
}

/// The starts of a crash storm of `accounts` under `policy`: each account's first and every
/// restart.
fn storm_starts(accounts: u64, policy: &SupervisorConfig) -> u64 {
    accounts * u64::from(policy.max_restarts + 1)
}

/// The crash storm: 10,000 accounts whose tasks end the moment they start (the fixture's
/// `return` mode), with a 1 ms initial backoff doubling up to 60 ms, 10 % jitter and 10 restarts,
/// timed from start-all until every account has been given up on. The end is found without
/// taking locks the storm needs while it runs: first the plugin's counters (every start and end
/// counted), then each account's status on the board, resuming at the first account not yet
/// given up; a full `Supervisor::snapshot` then confirms every account, outside the timing.
fn s2(bench: &Bench) -> anyhow::Result<String> {
    let policy = storm_policy();
    let expected_starts = storm_starts(bench.accounts, &policy);
    let fleet = Fleet::new(bench, json!({ "mode": "return" }), policy)?;
    let keys: Vec<AccountKey> = fleet
        .ids
        .iter()
        .map(|id| AccountKey::new(FLEET_CHANNEL, id.clone()))
        .collect();
    let gave_up = |s: &AccountSnapshot| {
        !s.restart_pending
            && !s.running
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("giving up"))
    };

    let cpu = CpuMeter::read();
    let start = Instant::now();
    let summaries = fleet.on_runtime(|s| async move { s.start_all().await })?;
    let returned = start.elapsed();
    let (starts, ends) = fleet.wait_counts(STORM_POLL, |starts, ends| {
        starts >= expected_starts && ends >= starts
    })?;
    let counted = start.elapsed();
    let board = fleet.supervisor.board().clone();
    let mut next = 0;
    let limit = Instant::now() + FLEET_LIMIT;
    while next < keys.len() {
        while next < keys.len() && board.get(&keys[next]).as_ref().is_some_and(gave_up) {
            next += 1;
        }
        if next < keys.len() {
            ensure!(
                Instant::now() < limit,
                "{} has not been given up on after {FLEET_LIMIT:?}: {:?}",
                keys[next],
                board.get(&keys[next])
            );
            std::thread::sleep(POLL);
        }
    }
    let gave_up_all = start.elapsed();
    let storm_cpu = CpuMeter::read().since(&cpu);

    ensure!(
        starts == expected_starts && ends == expected_starts,
        "the plugin counts {starts} starts and {ends} ends, not {expected_starts}"
    );
    let snapshot = fleet.supervisor.snapshot();
    let accounts = fleet.snapshot_accounts(&snapshot)?;
    let not_given_up: Vec<_> = accounts.iter().filter(|(_, s)| !gave_up(s)).collect();
    ensure!(
        not_given_up.is_empty(),
        "{} accounts not given up on, e.g. {:?}",
        not_given_up.len(),
        not_given_up.first()
    );
    // Nothing may restart after giving up.
    let (starts_later, _) = fleet.counts()?;
    ensure!(
        starts_later == expected_starts,
        "{starts_later} starts after every account was given up on"
    );
    let summary = channel_summary(&summaries)?;
    let first_starts = summary.started;
    eprintln!(
        "bench: S2: start_all returned after {:.3} ms ({first_starts} started), the plugin \
         counted {starts} starts and ends after {:.3} ms, all given up after {:.3} ms; \
         {storm_cpu}",
        ms(returned),
        ms(counted),
        ms(gave_up_all),
    );
    fleet.close()?;
    Ok(serde_json::to_string(&S2Report {
        scenario: "S2",
        accounts: bench.accounts,
        starts,
        gave_up_all_ms: ms(gave_up_all),
    })?)
}
