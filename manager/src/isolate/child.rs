//! The isolated child: `channeld isolate-child` (hidden). It takes the socket on descriptor 3,
//! loads the staged plugin through the normal loader, answers the host's calls by driving the
//! plugin through [`FfiPlugin`], and forwards the plugin's host-service calls to the host. It
//! exits when the socket closes (the host shut it down or died).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use channeld_plugin_abi::abi::{EventKind, InboundMessage, LogLevel};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::wire::{
    self, Answer, Booted, Call, Facts, FromChild, Hello, Inbound, Query, QueryAnswer, Service,
    ToChild,
};
use crate::{
    ffi::FfiPlugin,
    host::{AccountKey, AccountLink, HostSink, TaskSignals},
    load::{isolation_sys, load_root_module_named},
    plugin::{BootStep, BoxFuture, Check, Outbound, Plugin, RunningTask},
    status,
    status_patch::StatusPatch,
};

/// What the host tells the child on its command line.
#[derive(Debug, Clone)]
pub struct ChildArgs {
    /// The staged copy to load.
    pub plugin: PathBuf,
    /// The plugin file it was staged from (for messages).
    pub source: PathBuf,
    /// The plugin runtime's worker threads.
    pub worker_threads: u32,
    /// The most verbose plugin log level (1 error … 5 trace).
    pub max_log_level: u8,
}

/// Runs the child; the process's exit code.
pub fn run(args: ChildArgs) -> i32 {
    let parent = std::env::var("CHANNELD_ISOLATE_PARENT").ok();
    if parent.is_some_and(|p| p != isolation_sys::parent_pid().to_string()) {
        // The daemon died before PR_SET_PDEATHSIG was in place.
        return 1;
    }
    let Some(socket) = isolation_sys::take_child_socket() else {
        eprintln!(
            "channeld isolate-child: no socket on descriptor 3 (this is not a command to run)"
        );
        return 2;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(channeld_plugin_abi::grow_thread_arena)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("channeld isolate-child: {e}");
            return 1;
        }
    };
    runtime.block_on(serve(socket, args))
}

fn log_level(level: u8) -> LogLevel {
    match level {
        1 => LogLevel::Error,
        2 => LogLevel::Warn,
        4 => LogLevel::Debug,
        5 => LogLevel::Trace,
        _ => LogLevel::Info,
    }
}

async fn serve(socket: std::os::unix::net::UnixStream, args: ChildArgs) -> i32 {
    let stream = match socket
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(socket))
    {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("channeld isolate-child: socket: {e}");
            return 1;
        }
    };
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, wire::codec());
    let mut writer = FramedWrite::new(write, wire::codec());
    let (out, mut outbox) = mpsc::unbounded_channel::<FromChild>();
    let written = tokio::spawn(async move {
        while let Some(message) = outbox.recv().await {
            // Batch what is queued into one flush.
            if writer.feed(wire::encode(&message)).await.is_err() {
                break;
            }
            while let Ok(message) = outbox.try_recv() {
                if writer.feed(wire::encode(&message)).await.is_err() {
                    return;
                }
            }
            if futures_util::SinkExt::<bytes::Bytes>::flush(&mut writer)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let sink = Arc::new(ChildSink {
        out: out.clone(),
        next: AtomicU64::new(1),
        waiting: Mutex::default(),
        runs: Mutex::default(),
    });
    let loaded = {
        let sink = sink.clone();
        let args = args.clone();
        tokio::task::spawn_blocking(move || -> Result<FfiPlugin, (String, String)> {
            let module = load_root_module_named(&args.plugin, &args.source)
                .map_err(|e| (e.class().to_owned(), e.to_string()))?;
            let plugin = FfiPlugin::new(module, &args.source)
                .map_err(|e| (e.class().to_owned(), e.to_string()))?;
            plugin
                .init(args.worker_threads, log_level(args.max_log_level), sink)
                .map_err(|e| {
                    (
                        "init-failed".to_owned(),
                        format!("{}: {e}", args.source.display()),
                    )
                })?;
            Ok(plugin)
        })
        .await
    };
    let plugin: Arc<FfiPlugin> = match loaded {
        Ok(Ok(plugin)) => Arc::new(plugin),
        Ok(Err((class, error))) => {
            let _ = out.send(FromChild::LoadFailed { class, error });
            drop(out);
            drop(sink);
            let _ = written.await;
            return 1;
        }
        Err(_) => return 1,
    };
    let info = plugin.info().clone();
    let _ = out.send(FromChild::Hello(Hello {
        channel_id: info.channel_id.clone(),
        display_name: info.display_name,
        plugin_version: info.plugin_version,
        abi_version: info.abi_version,
        rustc_version: info.rustc_version,
        reports_task_polled: plugin.reports_task_polled(),
    }));
    let channel: Arc<str> = info.channel_id.into();
    while let Some(Ok(frame)) = frames.next().await {
        let Ok(message) = wire::decode::<ToChild>(&frame) else {
            eprintln!("channeld isolate-child: unreadable frame from the host");
            break;
        };
        match message {
            ToChild::Call { id, call } => {
                let plugin = plugin.clone();
                let out = out.clone();
                let sink = sink.clone();
                let channel = channel.clone();
                tokio::spawn(async move {
                    let result = answer(plugin, sink, &channel, &out, call).await;
                    let _ = out.send(FromChild::Reply { id, result });
                });
            }
            ToChild::Abort(task) => {
                plugin.abort_task(task);
            }
            ToChild::AbortMany(tasks) => {
                plugin.abort_tasks(&tasks);
            }
            ToChild::Answered { id, answer } => {
                let waiting = sink
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(waiting) = waiting {
                    let _ = waiting.send(answer);
                }
            }
        }
    }
    // The host closed the socket (shutdown) or is gone: leave without running the plugin's
    // destructors, which may block.
    std::process::exit(0)
}

/// Whether a batch call boots (checks, then starts) or only starts.
enum Kind {
    Boot,
    Other,
}

/// The host link of one account's generation; with a plugin that reports the first poll of its
/// tasks, the report is forwarded to the host.
fn link_for(
    plugin: &FfiPlugin,
    sink: &Arc<ChildSink>,
    channel: &str,
    out: &mpsc::UnboundedSender<FromChild>,
    account: &str,
    generation: u64,
) -> AccountLink {
    let key = AccountKey::new(channel, account);
    sink.begun(account, generation);
    let link = AccountLink::for_account(key, generation, sink.clone());
    if !plugin.reports_task_polled() {
        return link;
    }
    link.with_signals(Arc::new(PolledReport {
        out: out.clone(),
        account: account.to_owned(),
        sent: AtomicBool::new(false),
    }))
}

/// Forwards the first poll of one account's task to the host, from the plugin's thread that
/// reports it: no task of the child's runtime waits for it, and the report goes out ahead of
/// anything the task sends after its first poll. A link dropped unpolled (a start that failed or
/// was not made) sends nothing.
struct PolledReport {
    out: mpsc::UnboundedSender<FromChild>,
    account: String,
    /// Set by the first report (a plugin reports each task's first poll once; a second report
    /// is not forwarded).
    sent: AtomicBool,
}

impl TaskSignals for PolledReport {
    fn task_polled(&self, generation: u64) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            let _ = self.out.send(FromChild::Service {
                account: self.account.clone(),
                generation,
                service: Service::TaskPolled,
            });
        }
    }

    /// The host decides about stops; a boot in the child never skips a start by itself.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Reports a started task's end to the host; its id. The end is noted first, so a status patch
/// from the ended task gets the stale error, and one sent before it reaches the host first.
fn report_end(
    out: &mpsc::UnboundedSender<FromChild>,
    sink: &Arc<ChildSink>,
    (account, generation): (String, u64),
    started: RunningTask,
) -> u64 {
    let task = started.id;
    let out = out.clone();
    let sink = sink.clone();
    tokio::spawn(async move {
        let result = started.done.await;
        sink.ended(&account, generation);
        let _ = out.send(FromChild::TaskDone { task, result });
    });
    task
}

/// A call that may block, run on the blocking pool.
type BlockingCall = Box<dyn FnOnce(&FfiPlugin) -> Result<Answer, String> + Send>;

/// Runs one call on the plugin.
async fn answer(
    plugin: Arc<FfiPlugin>,
    sink: Arc<ChildSink>,
    channel: &str,
    out: &mpsc::UnboundedSender<FromChild>,
    call: Call,
) -> Result<Answer, String> {
    let blocking = |f: BlockingCall| {
        let plugin = plugin.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&plugin))
                .await
                .map_err(|e| format!("the call failed in the plugin process: {e}"))?
        }
    };
    let json = |text: &str| serde_json::from_str::<Value>(text).map_err(|e| e.to_string());
    let check = |c: Check| match c {
        Check::Yes => Answer::Check(true, None),
        Check::No(reason) => Answer::Check(false, reason),
    };
    let call_kind = match &call {
        Call::Boot(_) => Kind::Boot,
        _ => Kind::Other,
    };
    match call {
        Call::Validate(table) => {
            let table = json(&table)?;
            blocking(Box::new(move |p| {
                p.validate_channel(&table)
                    .map(|()| Answer::Unit)
                    .map_err(|e| e.message)
            }))
            .await
        }
        Call::Configure(table) => {
            let table = json(&table)?;
            blocking(Box::new(move |p| {
                p.configure(&table)
                    .map(|()| Answer::Unit)
                    .map_err(|e| e.message)
            }))
            .await
        }
        Call::ListAccountIds => {
            blocking(Box::new(|p| {
                p.list_account_ids()
                    .map(Answer::Strings)
                    .map_err(|e| e.message)
            }))
            .await
        }
        Call::DefaultAccountId => {
            blocking(Box::new(|p| {
                p.default_account_id()
                    .map(Answer::OptString)
                    .map_err(|e| e.message)
            }))
            .await
        }
        Call::ResolveAccount(account) => {
            blocking(Box::new(move |p| {
                p.resolve_account(&account)
                    .map(|v| Answer::Json(v.to_string()))
                    .map_err(|e| e.message)
            }))
            .await
        }
        Call::IsEnabled(account) => {
            blocking(Box::new(move |p| {
                p.is_enabled(&account).map(check).map_err(|e| e.message)
            }))
            .await
        }
        Call::IsConfigured(account) => {
            blocking(Box::new(move |p| {
                p.is_configured(&account).map(check).map_err(|e| e.message)
            }))
            .await
        }
        Call::Describe(account) => {
            blocking(Box::new(move |p| {
                p.describe_account(&account)
                    .map(|v| Answer::OptJson(v.map(|v| v.to_string())))
                    .map_err(|e| e.message)
            }))
            .await
        }
        Call::Start {
            account,
            generation,
        } => {
            let link = link_for(&plugin, &sink, channel, out, &account, generation);
            let started = tokio::task::spawn_blocking({
                let plugin = plugin.clone();
                let account = account.clone();
                move || plugin.start_account(&account, link)
            })
            .await
            .map_err(|e| format!("the call failed in the plugin process: {e}"));
            match started {
                Ok(Ok(started)) => Ok(Answer::Task(report_end(
                    out,
                    &sink,
                    (account, generation),
                    started,
                ))),
                Ok(Err(e)) => {
                    sink.ended(&account, generation);
                    Err(e.message)
                }
                Err(e) => {
                    sink.ended(&account, generation);
                    Err(e)
                }
            }
        }
        Call::Boot(accounts) | Call::StartMany(accounts) => {
            let boot = matches!(call_kind, Kind::Boot);
            let batch: Vec<(String, AccountLink)> = accounts
                .iter()
                .map(|(account, generation)| {
                    let link = link_for(&plugin, &sink, channel, out, account, *generation);
                    (account.clone(), link)
                })
                .collect();
            // The checks and the plugin's own batch entry, in one go on the blocking pool.
            let steps = tokio::task::spawn_blocking({
                let plugin = plugin.clone();
                move || {
                    if boot {
                        plugin.boot_accounts(batch)
                    } else {
                        plugin
                            .start_accounts(batch)
                            .into_iter()
                            .map(|started| started.map(BootStep::Started))
                            .collect()
                    }
                }
            })
            .await
            .map_err(|e| {
                for (account, generation) in &accounts {
                    sink.ended(account, *generation);
                }
                format!("the call failed in the plugin process: {e}")
            })?;
            let mut steps = steps.into_iter();
            // One outcome per account, in order; a failed start leaves no task (its generation is
            // retired by the host, so it is stale here too).
            let steps: Vec<Result<Booted, String>> = accounts
                .into_iter()
                .map(|run| match steps.next() {
                    Some(Ok(BootStep::Disabled(reason))) => Ok(Booted::Disabled(reason)),
                    Some(Ok(BootStep::NotConfigured(reason))) => Ok(Booted::NotConfigured(reason)),
                    Some(Ok(BootStep::Started(task))) => {
                        Ok(Booted::Started(report_end(out, &sink, run, task)))
                    }
                    Some(Err(e)) => {
                        sink.ended(&run.0, run.1);
                        Err(e.message)
                    }
                    None => {
                        sink.ended(&run.0, run.1);
                        Err("the plugin returned no result for this account".into())
                    }
                })
                .collect();
            Ok(Answer::Booted(steps))
        }
        Call::CheckMany(accounts) => {
            blocking(Box::new(move |p| {
                let checked = accounts
                    .iter()
                    .map(|account| {
                        Ok(match p.is_enabled(account).map_err(|e| e.message)? {
                            Check::No(reason) => Booted::Disabled(reason),
                            Check::Yes => match p.is_configured(account).map_err(|e| e.message)? {
                                Check::No(reason) => Booted::NotConfigured(reason),
                                Check::Yes => Booted::Ready,
                            },
                        })
                    })
                    .collect();
                Ok(Answer::Booted(checked))
            }))
            .await
        }
        Call::Facts(accounts) => {
            blocking(Box::new(move |p| {
                let facts = p
                    .account_facts(&accounts)
                    .into_iter()
                    .map(|f| Facts {
                        enabled: f.enabled.map(|c| match c {
                            Check::Yes => (true, None),
                            Check::No(reason) => (false, reason),
                        }),
                        configured: f.configured,
                        unconfigured_reason: f.unconfigured_reason,
                    })
                    .collect();
                Ok(Answer::Facts(facts))
            }))
            .await
        }
        Call::Stop(account) => match plugin.stop_account_async(&account) {
            Some(stop) => stop.await.map(|()| Answer::Unit).map_err(|e| e.message),
            None => {
                blocking(Box::new(move |p| {
                    p.stop_account(&account)
                        .map(|()| Answer::Unit)
                        .map_err(|e| e.message)
                }))
                .await
            }
        },
        Call::Logout(account) => match plugin.logout_async(&account) {
            Some(logout) => logout.await.map(Answer::Bool).map_err(|e| e.message),
            None => {
                blocking(Box::new(move |p| {
                    p.logout(&account).map(Answer::Bool).map_err(|e| e.message)
                }))
                .await
            }
        },
        Call::Send {
            account,
            conversation,
            text,
            reply_to,
            extra,
        } => plugin
            .send(Outbound {
                account,
                conversation,
                text,
                reply_to,
                extra,
            })
            .await
            .map(Answer::Text)
            .map_err(|e| e.message),
        Call::Shutdown => {
            blocking(Box::new(|p| {
                p.shutdown().map(|()| Answer::Unit).map_err(|e| e.message)
            }))
            .await
        }
    }
}

/// The child's [`HostSink`]: every call goes to the host over the socket; those that answer wait
/// for [`ToChild::Answered`].
struct ChildSink {
    out: mpsc::UnboundedSender<FromChild>,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<QueryAnswer>>>,
    /// Per account, the generation the child last started and whether its task has ended: what
    /// `patch_status` judges staleness by, without asking the host.
    runs: Mutex<HashMap<String, Run>>,
}

/// The last generation the child started for an account.
#[derive(Clone, Copy)]
struct Run {
    generation: u64,
    ended: bool,
}

impl ChildSink {
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A link for `account`'s `generation` was made (the host's generations only grow).
    fn begun(&self, account: &str, generation: u64) {
        let run = Run {
            generation,
            ended: false,
        };
        let mut runs = self.runs();
        match runs.get_mut(account) {
            Some(last) if last.generation >= generation => {}
            Some(last) => *last = run,
            None => {
                runs.insert(account.to_owned(), run);
            }
        }
    }

    /// `account`'s task of `generation` has ended, or its start failed.
    fn ended(&self, account: &str, generation: u64) {
        if let Some(run) = self.runs().get_mut(account)
            && run.generation == generation
        {
            run.ended = true;
        }
    }

    /// Whether `generation` is `account`'s latest and its task has not ended.
    fn is_live(&self, account: &str, generation: u64) -> bool {
        self.runs()
            .get(account)
            .is_some_and(|run| run.generation == generation && !run.ended)
    }

    fn service(&self, key: &AccountKey, generation: u64, service: Service) {
        let _ = self.out.send(FromChild::Service {
            account: key.account.to_string(),
            generation,
            service,
        });
    }

    fn query(
        &self,
        key: &AccountKey,
        generation: u64,
        query: Query,
    ) -> oneshot::Receiver<QueryAnswer> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let _ = self.out.send(FromChild::Query {
            id,
            account: key.account.to_string(),
            generation,
            query,
        });
        rx
    }

    /// Waits for a query's answer on the plugin's thread (its runtime, never the child's).
    fn query_blocking(
        &self,
        key: &AccountKey,
        generation: u64,
        query: Query,
    ) -> Option<QueryAnswer> {
        futures_executor::block_on(self.query(key, generation, query)).ok()
    }
}

impl HostSink for ChildSink {
    fn is_current(&self, key: &AccountKey, generation: u64) -> bool {
        matches!(
            self.query_blocking(key, generation, Query::IsCurrent),
            Some(QueryAnswer::Bool(true))
        )
    }

    fn status_json(&self, key: &AccountKey) -> Value {
        match self.query_blocking(key, 0, Query::Status) {
            Some(QueryAnswer::Json(json)) => serde_json::from_str(&json).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    fn patch_status(
        &self,
        key: &AccountKey,
        generation: u64,
        patch: StatusPatch<'_>,
    ) -> Result<(), String> {
        // Answered here with the host's own checks, in the host's order (host-owned keys, then
        // the generation, then the typed fields), and sent one way: the host applies it with its
        // own generation check, in order with the account's other services. A type error is
        // sent too, since the host applies the fields before the bad one, as in-process.
        status::refuse_host_owned(key, &patch)?;
        if !self.is_live(&key.account, generation) {
            return Err(status::stale_error(key));
        }
        let checked = status::check_patch_types(key, &patch);
        self.service(
            key,
            generation,
            Service::Patch(serde_json::to_string(&patch).unwrap_or_default()),
        );
        checked
    }

    fn set_connected(&self, key: &AccountKey, generation: u64, connected: bool) {
        self.service(key, generation, Service::Connected(connected));
    }

    fn record_event(&self, key: &AccountKey, generation: u64, kind: EventKind) {
        let kind = match kind {
            EventKind::Inbound => 0,
            EventKind::Outbound => 1,
            EventKind::Other => 2,
        };
        self.service(key, generation, Service::Event(kind));
    }

    fn set_busy(&self, key: &AccountKey, generation: u64, active_runs: u32) {
        self.service(key, generation, Service::Busy(active_runs));
    }

    fn deliver(
        &self,
        key: &AccountKey,
        generation: u64,
        message: InboundMessage,
    ) -> BoxFuture<Result<u64, String>> {
        let message = Inbound {
            conversation: message.conversation.into_string(),
            sender: message.sender.into_string(),
            text: message.text.into_string(),
            id: message.id.into_string(),
            time_ms: message.time_ms,
            extra: message.extra.into_string(),
        };
        let answer = self.query(key, generation, Query::Deliver(message));
        Box::pin(async move {
            match answer.await {
                Ok(QueryAnswer::Delivered(result)) => result,
                _ => Err("the host is gone".into()),
            }
        })
    }
}
