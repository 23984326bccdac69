//! The program behind `scripts/bench`: runs the benchmark scenarios named on the command line (all
//! of them when none is named) and prints one JSON object per scenario on its own line of stdout.
//! Everything else (cargo's noise, progress, errors) goes to stderr.
//!
//! Plugins are release builds of the workspace's plugin crates (stripped by the release profile),
//! found in `$CHANNELD_BENCH_PLUGIN_DIR` (default `<target>/release`), copied into a temporary
//! directory and loaded through the real loader ([`manager::load::load_root_module`] and
//! [`FfiPlugin`]; the `load` scenario goes through [`Loader::load_file`], staging included).
//! Counters prove the work was done: the status board's `inboundMessages` for the account and the
//! fixture's own `starts`/`ends`; for `load`, every copy's distinct staged file mapped in the
//! process.
//!
//! Sizes can be lowered for profiling (e.g. under callgrind) with `CHANNELD_BENCH_MESSAGES`,
//! `CHANNELD_BENCH_CALLS` and `CHANNELD_BENCH_ROUNDS`.
//!
//! To add a scenario: write `fn name(bench: &Bench) -> anyhow::Result<String>` returning the JSON
//! line (a `Serialize` struct whose first field is `scenario`) and list it in [`SCENARIOS`].

use std::{
    collections::{HashMap, HashSet},
    fs,
    hint::black_box,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use abi_stable::{library::lib_header_from_path, std_types::RString};
use anyhow::{Context as _, ensure};
use channeld_plugin_abi::{
    abi::{InboundMessage, LogLevel, PluginMod_Ref},
    sdk::Inbound,
};
use goblin::elf::{Elf, program_header::PT_LOAD};
use manager::{
    clock::{Clock, SystemClock},
    discover::{self, PLUGIN_SUFFIX},
    ffi::FfiPlugin,
    host::{AccountKey, AccountLink, HostSink},
    load::load_root_module,
    plugin::{BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo, RunningTask},
    registry::{LoadedPlugin, Loader},
    stage::StagingDir,
    status::StatusBoard,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A scenario: runs and returns its JSON line.
type Scenario = fn(&Bench) -> anyhow::Result<String>;

/// Every scenario, in the order a bare `scripts/bench` runs them.
const SCENARIOS: &[(&str, Scenario)] = &[("ffi", ffi), ("load", load)];

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
    for (name, run) in chosen {
        eprintln!("bench: running {name}");
        match run(&bench) {
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
    /// Plugin→host: one inbound message, built inside the plugin and delivered through the ABI.
    inbound_msg_ns: f64,
    /// The same message built in-process and delivered through a native `&dyn` ([`NativeHost`]).
    native_msg_ns: f64,
    /// `call_ns / native_call_ns`.
    call_ratio: f64,
    /// `inbound_msg_ns / native_msg_ns` (goal: ≤ 1.5).
    msg_ratio: f64,
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

/// Compares, each through a Rust trait object so both sides pay one dynamic dispatch:
///
/// * host→plugin call: `<dyn Plugin>::abort_task(id of no task)` on [`FfiPlugin`] — prefix-module
///   field access, an `extern "C"` call, the SDK's panic fence (`catch_unwind`), and a lookup in
///   the SDK's task registry (`Mutex<Option<HashMap<u64, _>>>`) — against [`NativeTasks`], which
///   does that same fence and lookup in-process;
/// * plugin→host message: the fixture's `flood` mode (on the plugin's runtime thread: build an
///   `Inbound` with owned room, sender and a 100-byte text, `Host::deliver` converts it to an
///   `InboundMessage` and calls the host through abi_stable's `HostServices` trait object, which
///   lands in `AccountLink::deliver` → `StatusBoard::deliver`: clock, lock, counters) against
///   [`native_flood`], which builds the same `Inbound`, converts it the same way and calls
///   `AccountLink::deliver` through a native `&dyn NativeHost`. The FFI figure is timed from
///   `start_account` until the task's `done` future completes on the host, so it also contains
///   the task's start and end (a few µs over a million messages).
fn ffi(bench: &Bench) -> anyhow::Result<String> {
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let sink: Arc<dyn HostSink> = board.clone();
    let plugin = bench.load("channeld-plugin-fixture", sink.clone())?;
    plugin.configure(&json!({
        "accounts": { FLOOD_ACCOUNT: {
            "mode": "flood",
            "messages": bench.messages,
            "text_bytes": TEXT_BYTES,
        }}
    }))?;
    let native = NativeTasks::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let key = AccountKey::new(plugin.info().channel_id.clone(), FLOOD_ACCOUNT);

    let (mut call, mut native_call, mut msg, mut native_msg) = (vec![], vec![], vec![], vec![]);
    for round in 0..=bench.rounds {
        let c = time_calls(&plugin, bench.calls);
        let nc = time_calls(&native, bench.calls);
        let m = time_ffi_flood(&runtime, &plugin, &board, &key, bench.messages)?;
        let nm = time_native_flood(&board, &key, bench.messages, TEXT_BYTES as usize)?;
        let figures = [c, nc, m, nm].map(|(elapsed, ops)| per_op(elapsed, ops));
        eprintln!(
            "bench: ffi round {round}{}: call {} / native {} ns, msg {} / native {} ns",
            if round == 0 { " (warm-up)" } else { "" },
            figures[0],
            figures[1],
            figures[2],
            figures[3],
        );
        if round > 0 {
            call.push(figures[0]);
            native_call.push(figures[1]);
            msg.push(figures[2]);
            native_msg.push(figures[3]);
        }
    }
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
    let plugin = FfiPlugin::new(module, path)?;
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
fn fixture_ends(plugin: &FfiPlugin) -> anyhow::Result<u64> {
    let described = plugin.describe_account(FLOOD_ACCOUNT)?;
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
    let (before, ends_before) = (inbound_messages(board, key), fixture_ends(plugin)?);
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
    let ends = fixture_ends(plugin)? - ends_before;
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
/// `InboundMessage` exactly as the SDK's `Host::deliver` does it.
fn native_flood(host: &dyn NativeHost, messages: u64, text_bytes: usize) -> Result<(), String> {
    let text = "x".repeat(text_bytes);
    for _ in 0..messages {
        let message = Inbound::new("bench-room", "bench-sender", text.as_str());
        let message = InboundMessage {
            channel: RString::new(),
            account: RString::new(),
            conversation: message.conversation.into(),
            sender: message.sender.into(),
            text: message.text.into(),
            id: message.id.into(),
            time_ms: message.time_ms,
            extra: message
                .extra
                .map(|v| v.to_string())
                .unwrap_or_default()
                .into(),
        };
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
