//! The program behind `scripts/bench`: runs the benchmark scenarios named on the command line (all
//! of them when none is named) and prints one JSON object per scenario on its own line of stdout.
//! Everything else (cargo's noise, progress, errors) goes to stderr.
//!
//! Plugins are release builds of the workspace's plugin crates (stripped by the release profile),
//! found in `$CHANNELD_BENCH_PLUGIN_DIR` (default `<target>/release`), copied into a temporary
//! directory and loaded through the real loader ([`manager::load::load_root_module`] and
//! [`FfiPlugin`]). Counters prove the work was done: the status board's `inboundMessages` for the
//! account and the fixture's own `starts`/`ends`.
//!
//! Sizes can be lowered for profiling (e.g. under callgrind) with `CHANNELD_BENCH_MESSAGES`,
//! `CHANNELD_BENCH_CALLS` and `CHANNELD_BENCH_ROUNDS`.
//!
//! To add a scenario: write `fn name(bench: &Bench) -> anyhow::Result<String>` returning the JSON
//! line (a `Serialize` struct whose first field is `scenario`) and list it in [`SCENARIOS`].

use std::{
    collections::HashMap,
    hint::black_box,
    io::Write as _,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use abi_stable::std_types::RString;
use anyhow::{Context as _, ensure};
use channeld_plugin_abi::{
    abi::{InboundMessage, LogLevel},
    sdk::Inbound,
};
use manager::{
    clock::SystemClock,
    ffi::FfiPlugin,
    host::{AccountKey, AccountLink, HostSink},
    load::load_root_module,
    plugin::{BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo, RunningTask},
    status::StatusBoard,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A scenario: runs and returns its JSON line.
type Scenario = fn(&Bench) -> anyhow::Result<String>;

/// Every scenario, in the order a bare `scripts/bench` runs them.
const SCENARIOS: &[(&str, Scenario)] = &[("ffi", ffi)];

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

    /// Copies the release build of `package` into the private directory, loads it through the
    /// real loader and calls its `init` with `sink` as the plugin-wide host handle.
    fn load(&self, package: &str, sink: Arc<dyn HostSink>) -> anyhow::Result<FfiPlugin> {
        let file = format!("lib{}.so", package.replace('-', "_"));
        let built = self.plugin_dir.join(&file);
        ensure!(
            built.is_file(),
            "{} is missing: build it with `cargo build --release -p {package}` (scripts/bench does)",
            built.display()
        );
        let copy = self.staging.path().join(&file);
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
