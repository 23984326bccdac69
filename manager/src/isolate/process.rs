//! The host side of an isolated plugin: spawning and reaping its child, and [`IsolatedPlugin`],
//! the [`Plugin`] the supervisor drives.

use std::{
    collections::HashMap,
    io::{BufRead as _, Write as _},
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use abi_stable::std_types::RString;
use channeld_plugin_abi::abi::{EventKind, InboundMessage, LogLevel};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::{
    IsolationInfo,
    wire::{self, Answer, Booted, Call, FromChild, Hello, Query, QueryAnswer, Service, ToChild},
};
use crate::{
    host::{AccountKey, AccountLink, HostSink},
    load::isolation_sys,
    plugin::{
        AccountFacts, BootStep, BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo,
        RunningTask, STOPPED_BEFORE_START,
    },
    status_patch::StatusPatch,
};

/// How long a new child may take to load its plugin and answer, unless told otherwise
/// (`[host] isolation_handshake_timeout`, [`IsolatedPlugin::spawn_within`]).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child that was asked to shut down may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Why a child could not be started or did not load its plugin.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {error}", source_file.display())]
pub struct SpawnError {
    /// The plugin file.
    pub source_file: PathBuf,
    /// A short class: `spawn-failed`, `handshake-timed-out`, `crashed-while-loading`, or the
    /// loader's class of error.
    pub class: String,
    /// The one-line error.
    pub error: String,
}

/// What a child is started with.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// The staged copy.
    pub plugin: PathBuf,
    /// The plugin file.
    pub source: PathBuf,
    /// The plugin runtime's worker threads.
    pub worker_threads: u32,
    /// The most verbose plugin log level.
    pub max_log_level: LogLevel,
    /// The address-space limit.
    pub memory_limit: Option<u64>,
    /// The `channeld` binary to run (`None`: this process's own executable).
    pub exe: Option<PathBuf>,
}

/// A call's answer, with the end of each task it started (in the order of the answer).
type Reply = (
    Result<Answer, String>,
    Vec<oneshot::Receiver<Result<(), String>>>,
);

/// One live (or dead) child.
struct Conn {
    pid: u32,
    tx: mpsc::UnboundedSender<ToChild>,
    next: AtomicU64,
    calls: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    tasks: Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    links: Mutex<HashMap<(String, u64), AccountLink>>,
    /// Why it died, once it has (and has been reaped).
    dead: Mutex<Option<String>>,
    /// Why the host killed it, if it did: its cause of death instead of "killed by SIGKILL".
    killed_for: Mutex<Option<String>>,
    reaped: Arc<AtomicBool>,
    /// Closes the host's end of the socket, which makes the child exit.
    closing: tokio_util::sync::CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    fn is_dead(&self) -> bool {
        lock(&self.dead).is_some()
    }

    /// Sends `call`; the receiver has the answer (or the child's cause of death).
    fn request(&self, call: Call) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let dead = lock(&self.dead);
            if let Some(cause) = dead.as_ref() {
                let _ = tx.send((Err(cause.clone()), Vec::new()));
                return rx;
            }
            lock(&self.calls).insert(id, tx);
        }
        let _ = self.tx.send(ToChild::Call { id, call });
        rx
    }

    /// The child is gone: every pending call and task ends with `cause`.
    fn die(&self, cause: String) {
        *lock(&self.dead) = Some(cause.clone());
        for (_, call) in lock(&self.calls).drain() {
            let _ = call.send((Err(cause.clone()), Vec::new()));
        }
        for (_, task) in lock(&self.tasks).drain() {
            let _ = task.send(Err(cause.clone()));
        }
        lock(&self.links).clear();
    }

    fn kill(&self) {
        if !self.reaped.load(Ordering::SeqCst) {
            isolation_sys::kill(self.pid);
        }
    }

    /// Kills the child; every pending call and task in it ends with `why`.
    fn kill_for(&self, why: String) {
        if !self.reaped.load(Ordering::SeqCst) {
            lock(&self.killed_for).get_or_insert(why);
            isolation_sys::kill(self.pid);
        }
    }
}

/// The answer of a call whose child went away without one.
fn gone() -> Reply {
    (Err("the plugin process is gone".into()), Vec::new())
}

/// Work for the spawner thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// The daemon-lived thread every child is spawned from: `PR_SET_PDEATHSIG` fires when the thread
/// that forked the child ends, so it must not be a pool thread that idles out.
fn spawner() -> &'static Mutex<std::sync::mpsc::Sender<SpawnJob>> {
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let _ = std::thread::Builder::new()
            .name("channeld-isolate-spawner".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        Mutex::new(tx)
    })
}

/// Describes how a child ended.
fn cause_of(status: ExitStatus, out_of_memory: bool, stack_overflow: bool) -> String {
    if let Some(signal) = status.signal() {
        let name = match signal {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGKILL => "SIGKILL",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            libc::SIGTERM => "SIGTERM",
            libc::SIGTRAP => "SIGTRAP",
            _ => "",
        };
        if signal == libc::SIGABRT {
            // Rust's runtime aborts after a failed allocation and after a stack overflow, and says
            // which on stderr first.
            let why = if out_of_memory {
                "memory allocation failed"
            } else if stack_overflow {
                "stack overflow"
            } else {
                "SIGABRT"
            };
            return format!("plugin process aborted ({why})");
        }
        let name = if name.is_empty() {
            format!("signal {signal}")
        } else {
            name.to_owned()
        };
        if stack_overflow {
            return format!("plugin process killed by {name} (stack overflow)");
        }
        return format!("plugin process killed by {name}");
    }
    match status.code() {
        Some(code) => format!("plugin process exited with code {code}"),
        None => format!("plugin process ended ({status})"),
    }
}

/// Starts a child and waits for its handshake. Blocks: call it off the async runtime.
fn spawn_child(
    spec: &ChildSpec,
    handshake: Duration,
    runtime: &tokio::runtime::Handle,
    sink: Arc<dyn HostSink>,
) -> Result<(Arc<Conn>, Hello), SpawnError> {
    let fail = |class: &str, error: String| SpawnError {
        source_file: spec.source.clone(),
        class: class.into(),
        error,
    };
    let exe = spec
        .exe
        .clone()
        .map_or_else(std::env::current_exe, Ok)
        .map_err(|e| {
            fail(
                "spawn-failed",
                format!("cannot find the channeld binary: {e}"),
            )
        })?;
    let (host_end, child_end) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| fail("spawn-failed", format!("socketpair: {e}")))?;
    let mut command = Command::new(exe);
    command
        .arg("isolate-child")
        .arg("--plugin")
        .arg(&spec.plugin)
        .arg("--source")
        .arg(&spec.source)
        .arg("--worker-threads")
        .arg(spec.worker_threads.to_string())
        .arg("--max-log-level")
        .arg((spec.max_log_level as u8).to_string())
        .env("CHANNELD_ISOLATE_PARENT", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if spec.memory_limit.is_some() {
        command.env("MALLOC_ARENA_MAX", "2");
    }
    isolation_sys::prepare_child(&mut command, child_end.as_raw_fd(), spec.memory_limit);
    let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
    let job = Box::new(move || {
        let _ = spawned_tx.send(command.spawn());
    });
    lock(spawner())
        .send(job)
        .map_err(|_| fail("spawn-failed", "the spawner thread is gone".into()))?;
    let mut child = spawned_rx
        .recv()
        .map_err(|_| fail("spawn-failed", "the spawner thread is gone".into()))?
        .map_err(|e| {
            fail(
                "spawn-failed",
                format!("cannot start the plugin process: {e}"),
            )
        })?;
    drop(child_end);
    let pid = child.id();

    // Its stderr: copied to ours, watched for the runtime's last words.
    let out_of_memory = Arc::new(AtomicBool::new(false));
    let stack_overflow = Arc::new(AtomicBool::new(false));
    let stderr = child.stderr.take();
    let copier = {
        let (oom, overflow) = (out_of_memory.clone(), stack_overflow.clone());
        std::thread::Builder::new()
            .name("channeld-isolate-stderr".into())
            .spawn(move || {
                let Some(stderr) = stderr else { return };
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("memory allocation of") {
                        oom.store(true, Ordering::SeqCst);
                    }
                    if line.contains("has overflowed its stack") {
                        overflow.store(true, Ordering::SeqCst);
                    }
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
            })
            .ok()
    };
    // The reaper: waits for the exit (so no zombie remains) and says why.
    let (exited_tx, exited) = watch::channel::<Option<String>>(None);
    let reaped = Arc::new(AtomicBool::new(false));
    {
        let reaped = reaped.clone();
        let spawned = std::thread::Builder::new()
            .name("channeld-isolate-reaper".into())
            .spawn(move || {
                let status = child.wait();
                reaped.store(true, Ordering::SeqCst);
                if let Some(copier) = copier {
                    let _ = copier.join();
                }
                let cause = match status {
                    Ok(status) => cause_of(
                        status,
                        out_of_memory.load(Ordering::SeqCst),
                        stack_overflow.load(Ordering::SeqCst),
                    ),
                    Err(e) => format!("plugin process lost: {e}"),
                };
                exited_tx.send_replace(Some(cause));
            });
        if spawned.is_err() {
            isolation_sys::kill(pid);
            return Err(fail("spawn-failed", "cannot start a reaper thread".into()));
        }
    }

    let (tx, mut to_child) = mpsc::unbounded_channel::<ToChild>();
    let conn = Arc::new(Conn {
        pid,
        tx,
        next: AtomicU64::new(1),
        calls: Mutex::default(),
        tasks: Mutex::default(),
        links: Mutex::default(),
        dead: Mutex::new(None),
        killed_for: Mutex::new(None),
        reaped,
        closing: tokio_util::sync::CancellationToken::new(),
    });
    let (hello_tx, hello_rx) = std::sync::mpsc::channel::<Result<Hello, (String, String)>>();
    let stream = {
        let _guard = runtime.enter();
        host_end
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(host_end))
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(e) => {
            conn.kill();
            return Err(fail("spawn-failed", format!("socket: {e}")));
        }
    };
    let (read, write) = stream.into_split();
    // Writer: host → child, batched per flush. Ends (closing the socket) at shutdown.
    let closing = conn.closing.clone();
    runtime.spawn(async move {
        let mut writer = FramedWrite::new(write, wire::codec());
        loop {
            let message = tokio::select! {
                message = to_child.recv() => message,
                () = closing.cancelled() => None,
            };
            let Some(message) = message else { return };
            if writer.feed(wire::encode(&message)).await.is_err() {
                return;
            }
            while let Ok(message) = to_child.try_recv() {
                if writer.feed(wire::encode(&message)).await.is_err() {
                    return;
                }
            }
            if futures_util::SinkExt::<bytes::Bytes>::flush(&mut writer)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // Reader: child → host, until the child is gone; then everything in it fails with the cause.
    {
        let conn = conn.clone();
        let channel = Arc::new(Mutex::new(String::new()));
        runtime.spawn(async move {
            let mut frames = FramedRead::new(read, wire::codec());
            let mut hello = Some(hello_tx);
            let mut exited = exited;
            loop {
                tokio::select! {
                    frame = frames.next() => {
                        let Some(Ok(frame)) = frame else { break };
                        let Ok(message) = wire::decode::<FromChild>(&frame) else { break };
                        on_message(&conn, &sink, &channel, &mut hello, message);
                    }
                    _ = exited.changed() => break,
                }
            }
            // The socket closed: the child exits (or is made to).
            let waited = tokio::time::timeout(EXIT_GRACE, exited.wait_for(Option::is_some))
                .await
                .map(|r| r.is_ok());
            if !matches!(waited, Ok(true)) {
                conn.kill();
                let _ = exited.wait_for(Option::is_some).await.is_ok();
            }
            let cause = lock(&conn.killed_for)
                .clone()
                .unwrap_or_else(|| exited.borrow().clone().unwrap_or_default());
            if let Some(hello) = hello.take() {
                let _ = hello.send(Err(("crashed-while-loading".into(), cause.clone())));
            }
            tracing::debug!(pid = conn.pid, "isolated plugin process ended: {cause}");
            conn.die(cause);
        });
    }
    match hello_rx.recv_timeout(handshake) {
        Ok(Ok(hello)) => Ok((conn, hello)),
        Ok(Err((class, error))) => {
            conn.kill();
            Err(fail(&class, error))
        }
        Err(_) => {
            conn.kill();
            Err(fail(
                "handshake-timed-out",
                format!(
                    "the plugin process did not load its plugin within {}",
                    humantime::format_duration(handshake)
                ),
            ))
        }
    }
}

/// Handles one message from a child.
fn on_message(
    conn: &Arc<Conn>,
    sink: &Arc<dyn HostSink>,
    channel: &Mutex<String>,
    hello: &mut Option<std::sync::mpsc::Sender<Result<Hello, (String, String)>>>,
    message: FromChild,
) {
    match message {
        FromChild::Hello(h) => {
            *lock(channel) = h.channel_id.clone();
            if let Some(hello) = hello.take() {
                let _ = hello.send(Ok(h));
            }
        }
        FromChild::LoadFailed { class, error } => {
            if let Some(hello) = hello.take() {
                let _ = hello.send(Err((class, error)));
            }
        }
        FromChild::Reply { id, result } => {
            // A started task is registered before its caller hears of it, so its end is never
            // missed.
            let register = |task: u64| {
                let (tx, rx) = oneshot::channel();
                lock(&conn.tasks).insert(task, tx);
                rx
            };
            let done = match &result {
                Ok(Answer::Task(task)) => vec![register(*task)],
                Ok(Answer::Booted(steps)) => steps
                    .iter()
                    .filter_map(|step| match step {
                        Ok(Booted::Started(task)) => Some(register(*task)),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if let Some(call) = lock(&conn.calls).remove(&id) {
                let _ = call.send((result, done));
            }
        }
        FromChild::TaskDone { task, result } => {
            if let Some(task) = lock(&conn.tasks).remove(&task) {
                let _ = task.send(result);
            }
        }
        FromChild::Service {
            account,
            generation,
            service,
        } => {
            let key = AccountKey::new(lock(channel).as_str(), account.as_str());
            match service {
                Service::Connected(connected) => sink.set_connected(&key, generation, connected),
                Service::Event(kind) => {
                    let kind = match kind {
                        0 => EventKind::Inbound,
                        1 => EventKind::Outbound,
                        _ => EventKind::Other,
                    };
                    sink.record_event(&key, generation, kind);
                }
                Service::Busy(runs) => sink.set_busy(&key, generation, runs),
                Service::TaskPolled => {
                    if let Some(link) = lock(&conn.links).get(&(account, generation)) {
                        link.task_polled();
                    }
                }
                Service::Patch(patch) => {
                    // The child answered its plugin; a stale generation is dropped and counted
                    // here, as for every other one-way service.
                    if let Ok(patch) = StatusPatch::parse(&patch) {
                        let _ = sink.patch_status(&key, generation, patch);
                    }
                }
            }
        }
        FromChild::Query {
            id,
            account,
            generation,
            query,
        } => {
            let channel = lock(channel).clone();
            let key = AccountKey::new(channel.as_str(), account.as_str());
            let answer = |answer| {
                let _ = conn.tx.send(ToChild::Answered { id, answer });
            };
            match query {
                Query::IsCurrent => answer(QueryAnswer::Bool(sink.is_current(&key, generation))),
                Query::Status => answer(QueryAnswer::Json(sink.status_json(&key).to_string())),
                Query::Deliver(message) => {
                    let accepted = sink.deliver(
                        &key,
                        generation,
                        InboundMessage {
                            channel: RString::from(channel),
                            account: RString::from(account),
                            conversation: message.conversation.into(),
                            sender: message.sender.into(),
                            text: message.text.into(),
                            id: message.id.into(),
                            time_ms: message.time_ms,
                            extra: message.extra.into(),
                        },
                    );
                    // A sink that accepts at once (no journal commit to wait for) is answered
                    // here, without a task and its wake-up per message.
                    let mut accepted = accepted;
                    if let Some(result) = (&mut accepted).now_or_never() {
                        answer(QueryAnswer::Delivered(result));
                        return;
                    }
                    let tx = conn.tx.clone();
                    tokio::spawn(async move {
                        let result = accepted.await;
                        let _ = tx.send(ToChild::Answered {
                            id,
                            answer: QueryAnswer::Delivered(result),
                        });
                    });
                }
            }
        }
    }
}

/// An isolated plugin as the supervisor sees it (see the module docs of [`crate::isolate`]).
#[derive(Clone)]
pub struct IsolatedPlugin {
    inner: Arc<Inner>,
}

struct Inner {
    info: PluginInfo,
    reports_task_polled: bool,
    spec: ChildSpec,
    /// How long each child may take to load its plugin and answer.
    handshake: Duration,
    runtime: tokio::runtime::Handle,
    sink: Arc<dyn HostSink>,
    /// The account of each task the supervisor holds (a task's id is the child's).
    owners: Mutex<HashMap<u64, String>>,
    /// The child serving now (a dead one is replaced at the next call).
    conn: Mutex<Arc<Conn>>,
    /// The table last configured, replayed into every new child.
    config: Mutex<Option<String>>,
    children_started: AtomicU64,
    shut_down: AtomicBool,
}

impl IsolatedPlugin {
    /// Starts a child for `spec` and waits for its handshake (loading the plugin and its `init`).
    /// Blocks: call it off the async runtime. A plugin that crashes while loading is a
    /// [`SpawnError`] naming the cause.
    pub fn spawn(
        spec: ChildSpec,
        runtime: tokio::runtime::Handle,
        sink: Arc<dyn HostSink>,
    ) -> Result<Self, SpawnError> {
        Self::spawn_within(spec, HANDSHAKE_TIMEOUT, runtime, sink)
    }

    /// [`IsolatedPlugin::spawn`], where this child and every later one (after a crash) has
    /// `handshake` to load its plugin and answer, instead of [`HANDSHAKE_TIMEOUT`].
    pub fn spawn_within(
        spec: ChildSpec,
        handshake: Duration,
        runtime: tokio::runtime::Handle,
        sink: Arc<dyn HostSink>,
    ) -> Result<Self, SpawnError> {
        let (conn, hello) = spawn_child(&spec, handshake, &runtime, sink.clone())?;
        Ok(Self {
            inner: Arc::new(Inner {
                info: PluginInfo {
                    channel_id: hello.channel_id,
                    display_name: hello.display_name,
                    plugin_version: hello.plugin_version,
                    abi_version: hello.abi_version,
                    rustc_version: hello.rustc_version,
                },
                reports_task_polled: hello.reports_task_polled,
                spec,
                handshake,
                runtime,
                sink,
                owners: Mutex::default(),
                conn: Mutex::new(conn),
                config: Mutex::new(None),
                children_started: AtomicU64::new(1),
                shut_down: AtomicBool::new(false),
            }),
        })
    }

    /// The live child's pid and how many children were started.
    pub fn isolation_info(&self) -> IsolationInfo {
        let conn = lock(&self.inner.conn);
        IsolationInfo {
            mode: "process",
            pid: (!conn.is_dead()).then_some(conn.pid),
            children_started: self.inner.children_started.load(Ordering::Relaxed),
            accounts: Default::default(),
        }
    }

    /// Kills the child at once (a probe that is not kept, or a child that stopped answering).
    pub fn kill(&self) {
        lock(&self.inner.conn).kill();
    }

    fn error(&self, entry: &'static str, message: String) -> PluginCallError {
        PluginCallError {
            channel: self.inner.info.channel_id.clone(),
            entry,
            message,
        }
    }

    /// The live child, starting a new one (with the last configured table) if it died. Blocks.
    fn conn(&self, entry: &'static str) -> Result<Arc<Conn>, PluginCallError> {
        let mut conn = lock(&self.inner.conn);
        if !conn.is_dead() {
            return Ok(conn.clone());
        }
        if self.inner.shut_down.load(Ordering::SeqCst) {
            return Err(self.error(entry, "the plugin process was shut down".into()));
        }
        let (fresh, _hello) = spawn_child(
            &self.inner.spec,
            self.inner.handshake,
            &self.inner.runtime,
            self.inner.sink.clone(),
        )
        .map_err(|e| self.error(entry, format!("restarting the plugin process: {}", e.error)))?;
        self.inner.children_started.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            channel = %self.inner.info.channel_id,
            pid = fresh.pid,
            "isolated plugin process started"
        );
        if let Some(table) = lock(&self.inner.config).clone() {
            let (result, _) = futures_executor::block_on(fresh.request(Call::Configure(table)))
                .unwrap_or_else(|_| gone());
            result.map_err(|e| {
                self.error(entry, format!("configuring the new plugin process: {e}"))
            })?;
        }
        *conn = fresh.clone();
        Ok(fresh)
    }

    /// A call that blocks the calling thread until the child answers or dies.
    fn call(&self, entry: &'static str, call: Call) -> Result<Answer, PluginCallError> {
        let conn = self.conn(entry)?;
        let (result, _) = futures_executor::block_on(conn.request(call)).unwrap_or_else(|_| gone());
        result.map_err(|e| self.error(entry, e))
    }

    /// A call as a future; the child is (re)started on the blocking pool if needed.
    fn call_async(
        &self,
        entry: &'static str,
        call: Call,
    ) -> BoxFuture<Result<Answer, PluginCallError>> {
        let me = self.clone();
        Box::pin(async move {
            let conn = {
                let me2 = me.clone();
                tokio::task::spawn_blocking(move || me2.conn(entry))
                    .await
                    .map_err(|e| me.error(entry, e.to_string()))??
            };
            let (result, _) = conn.request(call).await.unwrap_or_else(|_| gone());
            result.map_err(|e| me.error(entry, e))
        })
    }

    /// A started task as the supervisor holds it: its end, and the bookkeeping of its account
    /// (its host link, its owner) dropped when it ends.
    fn running(
        &self,
        conn: &Arc<Conn>,
        account: String,
        generation: u64,
        task: u64,
        done: Option<oneshot::Receiver<Result<(), String>>>,
    ) -> RunningTask {
        lock(&self.inner.owners).insert(task, account.clone());
        let (key, links) = ((account, generation), conn.clone());
        let inner = self.inner.clone();
        RunningTask {
            id: task,
            done: crate::plugin::TaskEnd::boxed(async move {
                let result = match done {
                    Some(done) => done
                        .await
                        .unwrap_or_else(|_| Err("the plugin process is gone".into())),
                    None => Err("the plugin process is gone".into()),
                };
                lock(&links.links).remove(&key);
                lock(&inner.owners).remove(&task);
                result
            }),
        }
    }

    /// A batch of boots or starts in one round trip: one request frame (`call` of every
    /// account with its generation), one reply frame with a step per account, in order. An
    /// account's error is that account's alone; a child that dies before it answers fails every
    /// account of the batch with its cause of death (and the next call starts a new child).
    /// Blocks.
    fn batch(
        &self,
        entry: &'static str,
        batch: Vec<(String, AccountLink)>,
        call: fn(Vec<(String, u64)>) -> Call,
    ) -> Vec<Result<BootStep, PluginCallError>> {
        // An account whose stop landed before the call is not sent (a stop that lands while the
        // child boots the batch finds its task handed over, and stops it).
        let stopped: Vec<bool> = batch
            .iter()
            .map(|(_, link)| link.stop_requested())
            .collect();
        if stopped.contains(&true) {
            let batch = batch
                .into_iter()
                .zip(&stopped)
                .filter(|(_, stopped)| !**stopped)
                .map(|(item, _)| item)
                .collect();
            let mut sent = self.batch(entry, batch, call).into_iter();
            return stopped
                .into_iter()
                .map(|stopped| match stopped {
                    true => Err(self.error(entry, STOPPED_BEFORE_START.into())),
                    false => sent.next().unwrap_or_else(|| Err(self.unexpected(entry))),
                })
                .collect();
        }
        if batch.is_empty() {
            return Vec::new();
        }
        let conn = match self.conn(entry) {
            Ok(conn) => conn,
            Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
        };
        let keys: Vec<(String, u64)> = batch
            .iter()
            .map(|(account, link)| (account.clone(), link.generation()))
            .collect();
        {
            // Before the request: a task's first host-service calls may reach us before the
            // reply does.
            let mut links = lock(&conn.links);
            for (account, link) in batch {
                let generation = link.generation();
                links.insert((account, generation), link);
            }
        }
        let (result, done) =
            futures_executor::block_on(conn.request(call(keys.clone()))).unwrap_or_else(|_| gone());
        let steps = match result {
            Ok(Answer::Booted(steps)) if steps.len() == keys.len() => steps,
            other => {
                let error = match other {
                    Err(cause) => self.error(entry, cause),
                    _ => self.unexpected(entry),
                };
                let mut links = lock(&conn.links);
                for key in &keys {
                    links.remove(key);
                }
                return keys.iter().map(|_| Err(error.clone())).collect();
            }
        };
        let mut done = done.into_iter();
        keys.into_iter()
            .zip(steps)
            .map(|((account, generation), step)| {
                let step = match step {
                    Ok(Booted::Started(task)) => {
                        return Ok(BootStep::Started(self.running(
                            &conn,
                            account,
                            generation,
                            task,
                            done.next(),
                        )));
                    }
                    Ok(Booted::Disabled(reason)) => Ok(BootStep::Disabled(reason)),
                    Ok(Booted::NotConfigured(reason)) => Ok(BootStep::NotConfigured(reason)),
                    Ok(Booted::Ready) => Err(self.unexpected(entry)),
                    Err(message) => Err(self.error(entry, message)),
                };
                // Not started: its link goes.
                lock(&conn.links).remove(&(account, generation));
                step
            })
            .collect()
    }

    /// The enabled and configured checks of a batch of accounts in one round trip, without
    /// starting any: per account, in order, `None` when both say yes, else the step that stops
    /// its boot.
    pub(super) fn check_accounts(
        &self,
        accounts: Vec<String>,
    ) -> Vec<Result<Option<BootStep>, PluginCallError>> {
        let count = accounts.len();
        if count == 0 {
            return Vec::new();
        }
        match self.call("boot_accounts", Call::CheckMany(accounts)) {
            Ok(Answer::Booted(steps)) if steps.len() == count => steps
                .into_iter()
                .map(|step| match step {
                    Ok(Booted::Ready) => Ok(None),
                    Ok(Booted::Disabled(reason)) => Ok(Some(BootStep::Disabled(reason))),
                    Ok(Booted::NotConfigured(reason)) => Ok(Some(BootStep::NotConfigured(reason))),
                    Ok(Booted::Started(_)) => Err(self.unexpected("boot_accounts")),
                    Err(message) => Err(self.error("boot_accounts", message)),
                })
                .collect(),
            Ok(_) => (0..count)
                .map(|_| Err(self.unexpected("boot_accounts")))
                .collect(),
            Err(e) => (0..count).map(|_| Err(e.clone())).collect(),
        }
    }

    fn unexpected(&self, entry: &'static str) -> PluginCallError {
        self.error(entry, "unexpected answer from the plugin process".into())
    }

    fn check(&self, entry: &'static str, answer: Answer) -> Result<Check, PluginCallError> {
        match answer {
            Answer::Check(true, _) => Ok(Check::Yes),
            Answer::Check(false, reason) => Ok(Check::No(reason)),
            _ => Err(self.unexpected(entry)),
        }
    }
}

impl Plugin for IsolatedPlugin {
    fn info(&self) -> &PluginInfo {
        &self.inner.info
    }

    fn configure(&self, channel_config: &Value) -> Result<(), PluginCallError> {
        let table = channel_config.to_string();
        self.call("configure", Call::Configure(table.clone()))?;
        *lock(&self.inner.config) = Some(table);
        Ok(())
    }

    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError> {
        match self.call("list_account_ids", Call::ListAccountIds)? {
            Answer::Strings(ids) => Ok(ids),
            _ => Err(self.unexpected("list_account_ids")),
        }
    }

    fn default_account_id(&self) -> Result<Option<String>, PluginCallError> {
        match self.call("default_account_id", Call::DefaultAccountId)? {
            Answer::OptString(id) => Ok(id),
            _ => Err(self.unexpected("default_account_id")),
        }
    }

    fn resolve_account(&self, account: &str) -> Result<Value, PluginCallError> {
        match self.call("resolve_account", Call::ResolveAccount(account.into()))? {
            Answer::Json(json) => serde_json::from_str(&json)
                .map_err(|e| self.error("resolve_account", format!("bad JSON: {e}"))),
            _ => Err(self.unexpected("resolve_account")),
        }
    }

    fn is_enabled(&self, account: &str) -> Result<Check, PluginCallError> {
        let answer = self.call("is_enabled", Call::IsEnabled(account.into()))?;
        self.check("is_enabled", answer)
    }

    fn is_configured(&self, account: &str) -> Result<Check, PluginCallError> {
        let answer = self.call("is_configured", Call::IsConfigured(account.into()))?;
        self.check("is_configured", answer)
    }

    fn describe_account(&self, account: &str) -> Result<Option<Value>, PluginCallError> {
        match self.call("describe_account", Call::Describe(account.into()))? {
            Answer::OptJson(json) => json
                .map(|json| serde_json::from_str(&json))
                .transpose()
                .map_err(|e| self.error("describe_account", format!("bad JSON: {e}"))),
            _ => Err(self.unexpected("describe_account")),
        }
    }

    fn start_account(
        &self,
        account: &str,
        link: AccountLink,
    ) -> Result<RunningTask, PluginCallError> {
        let conn = self.conn("start_account")?;
        let generation = link.generation();
        lock(&conn.links).insert((account.to_owned(), generation), link);
        let (result, done) = futures_executor::block_on(conn.request(Call::Start {
            account: account.to_owned(),
            generation,
        }))
        .unwrap_or_else(|_| gone());
        let task = match result {
            Ok(Answer::Task(task)) => task,
            Ok(_) => return Err(self.unexpected("start_account")),
            Err(e) => {
                lock(&conn.links).remove(&(account.to_owned(), generation));
                return Err(self.error("start_account", e));
            }
        };
        Ok(self.running(
            &conn,
            account.to_owned(),
            generation,
            task,
            done.into_iter().next(),
        ))
    }

    /// Starts a batch in one round trip: one message carries the batch, one brings back each
    /// account's task or error; a child that dies first fails every account with the cause.
    fn start_accounts(
        &self,
        batch: Vec<(String, AccountLink)>,
    ) -> Vec<Result<RunningTask, PluginCallError>> {
        self.batch("start_accounts", batch, Call::StartMany)
            .into_iter()
            .map(|step| match step? {
                BootStep::Started(task) => Ok(task),
                _ => Err(self.unexpected("start_accounts")),
            })
            .collect()
    }

    /// Boots a batch in one round trip: the child asks the plugin whether each account is
    /// enabled and configured and starts those that are through the plugin's own batch entry.
    /// Each account gets its own outcome; a child that dies first fails every account of the
    /// batch with the cause (and the next call starts a new child).
    fn boot_accounts(
        &self,
        batch: Vec<(String, AccountLink)>,
    ) -> Vec<Result<BootStep, PluginCallError>> {
        self.batch("boot_accounts", batch, Call::Boot)
    }

    /// The facts of a batch of accounts in one round trip.
    fn account_facts(&self, accounts: &[(String, bool)]) -> Vec<AccountFacts> {
        match self.call("account_facts", Call::Facts(accounts.to_vec())) {
            Ok(Answer::Facts(facts)) if facts.len() == accounts.len() => facts
                .into_iter()
                .map(|f| AccountFacts {
                    enabled: f.enabled.map(
                        |(yes, reason)| {
                            if yes { Check::Yes } else { Check::No(reason) }
                        },
                    ),
                    configured: f.configured,
                    unconfigured_reason: f.unconfigured_reason,
                })
                .collect(),
            // Nothing learnt: every field unknown (as when each call fails).
            _ => vec![AccountFacts::default(); accounts.len()],
        }
    }

    /// One message for the whole batch; only the tasks still known are aborted.
    fn abort_tasks(&self, tasks: &[u64]) -> usize {
        let conn = lock(&self.inner.conn).clone();
        let known: Vec<u64> = {
            let running = lock(&conn.tasks);
            tasks
                .iter()
                .copied()
                .filter(|task| running.contains_key(task))
                .collect()
        };
        let count = known.len();
        if count > 0 {
            let _ = conn.tx.send(ToChild::AbortMany(known));
        }
        count
    }

    fn abort_task(&self, task: u64) -> bool {
        let conn = lock(&self.inner.conn).clone();
        let known = lock(&conn.tasks).contains_key(&task);
        if known {
            let _ = conn.tx.send(ToChild::Abort(task));
        }
        known
    }

    /// The supervisor cancels a task that did not end within the stop timeout of its abort: the
    /// child did not answer the stop (its task blocks a thread, or the whole child hangs), so it
    /// is killed now, which ends the task at once. Every account in the child ends with the
    /// reason and restarts under the supervisor's backoff, in a new child.
    fn cancel_task(&self, task: u64) -> bool {
        let conn = lock(&self.inner.conn).clone();
        let known = lock(&conn.tasks).contains_key(&task);
        if known {
            let account = lock(&self.inner.owners)
                .get(&task)
                .cloned()
                .unwrap_or_default();
            let why = format!(
                "plugin process killed: account {account} did not stop within the stop timeout"
            );
            tracing::warn!(
                channel = %self.inner.info.channel_id,
                pid = conn.pid,
                "{why}"
            );
            conn.kill_for(why);
        }
        known
    }

    /// A start that did not return within the stop timeout of its account's stop blocks a
    /// thread of the child: the child is killed, like one that does not answer a stop. Every
    /// account in it ends with the reason and restarts under the backoff, in a new child.
    fn abandon_start(&self, account: &str) -> bool {
        let conn = lock(&self.inner.conn).clone();
        // Its start is still under way there: its link is known, its task is not.
        let starting = lock(&conn.links).keys().any(|(a, _)| a == account)
            && !lock(&self.inner.owners).values().any(|a| a == account);
        if starting && !conn.is_dead() {
            let why = format!(
                "plugin process killed: account {account}'s start did not return within the stop \
                 timeout"
            );
            tracing::warn!(channel = %self.inner.info.channel_id, pid = conn.pid, "{why}");
            conn.kill_for(why);
        }
        starting
    }

    fn stop_account(&self, account: &str) -> Result<(), PluginCallError> {
        let conn = lock(&self.inner.conn).clone();
        if conn.is_dead() {
            // Nothing of the account is left to stop.
            return Ok(());
        }
        let (result, _) = futures_executor::block_on(conn.request(Call::Stop(account.into())))
            .unwrap_or_else(|_| gone());
        result
            .map(|_| ())
            .map_err(|e| self.error("stop_account", e))
    }

    fn logout(&self, account: &str) -> Result<bool, PluginCallError> {
        match self.call("logout", Call::Logout(account.into()))? {
            Answer::Bool(cleared) => Ok(cleared),
            _ => Err(self.unexpected("logout")),
        }
    }

    fn send(&self, message: Outbound) -> BoxFuture<Result<String, PluginCallError>> {
        let call = self.call_async(
            "send",
            Call::Send {
                account: message.account,
                conversation: message.conversation,
                text: message.text,
                reply_to: message.reply_to,
                extra: message.extra,
            },
        );
        let me = self.clone();
        Box::pin(async move {
            match call.await? {
                Answer::Text(receipt) => Ok(receipt),
                _ => Err(me.unexpected("send")),
            }
        })
    }

    fn shutdown(&self) -> Result<(), PluginCallError> {
        self.inner.shut_down.store(true, Ordering::SeqCst);
        let conn = lock(&self.inner.conn).clone();
        if conn.is_dead() {
            return Ok(());
        }
        let answer = conn.request(Call::Shutdown);
        let _runtime = self.inner.runtime.enter();
        let result =
            futures_executor::block_on(async { tokio::time::timeout(EXIT_GRACE, answer).await });
        // Whatever it answered, the child goes: killed if it is still there after the grace.
        let conn2 = conn.clone();
        self.inner.runtime.spawn(async move {
            tokio::time::sleep(EXIT_GRACE).await;
            if !conn2.is_dead() {
                conn2.kill();
            }
        });
        // Closing our end of the socket makes the child exit.
        conn.closing.cancel();
        match result {
            Ok(Ok((Ok(_), _))) => Ok(()),
            Ok(Ok((Err(e), _))) => Err(self.error("shutdown", e)),
            _ => {
                conn.kill();
                Err(self.error(
                    "shutdown",
                    "the plugin process did not answer; killed".into(),
                ))
            }
        }
    }

    fn stop_account_async(&self, account: &str) -> Option<BoxFuture<Result<(), PluginCallError>>> {
        let conn = lock(&self.inner.conn).clone();
        if conn.is_dead() {
            return Some(Box::pin(std::future::ready(Ok(()))));
        }
        let answer = conn.request(Call::Stop(account.into()));
        let me = self.clone();
        Some(Box::pin(async move {
            let (result, _) = answer.await.unwrap_or_else(|_| gone());
            result.map(|_| ()).map_err(|e| me.error("stop_account", e))
        }))
    }

    fn logout_async(&self, account: &str) -> Option<BoxFuture<Result<bool, PluginCallError>>> {
        let call = self.call_async("logout", Call::Logout(account.into()));
        let me = self.clone();
        Some(Box::pin(async move {
            match call.await? {
                Answer::Bool(cleared) => Ok(cleared),
                _ => Err(me.unexpected("logout")),
            }
        }))
    }

    fn validate_channel(&self, channel_config: &Value) -> Result<(), PluginCallError> {
        self.call(
            "validate_channel",
            Call::Validate(channel_config.to_string()),
        )
        .map(|_| ())
    }

    fn reports_task_polled(&self) -> bool {
        self.inner.reports_task_polled
    }

    fn isolation(&self) -> Option<IsolationInfo> {
        Some(self.isolation_info())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    #[test]
    fn a_childs_end_is_named_by_its_signal_code_or_last_words() {
        let signalled = |signal| ExitStatus::from_raw(signal);
        assert_eq!(
            cause_of(signalled(libc::SIGSEGV), false, false),
            "plugin process killed by SIGSEGV"
        );
        assert_eq!(
            cause_of(signalled(libc::SIGABRT), true, false),
            "plugin process aborted (memory allocation failed)"
        );
        assert_eq!(
            cause_of(signalled(libc::SIGABRT), false, true),
            "plugin process aborted (stack overflow)"
        );
        assert_eq!(
            cause_of(signalled(libc::SIGABRT), false, false),
            "plugin process aborted (SIGABRT)"
        );
        assert_eq!(
            cause_of(ExitStatus::from_raw(3 << 8), false, false),
            "plugin process exited with code 3"
        );
        assert_eq!(
            cause_of(signalled(libc::SIGUSR1), false, false),
            format!("plugin process killed by signal {}", libc::SIGUSR1)
        );
    }
}
