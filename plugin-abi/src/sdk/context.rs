//! What an account's task receives: its account, its abort signal, and the host's services.

use std::{cell::RefCell, future::Future, sync::Arc};

use abi_stable::std_types::{RResult, RString};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{
    Account, OutboundQueue, PluginError, log::AccountScope, outbound::Registry, signal::TaskState,
};
use crate::abi::{EventKind, HostHandle, InboundMessage};

/// The signal the host fires when it wants an account's task (and everything it spawned) to
/// stop. Cheap to clone; the SDK's own type, so the SDK can change how it is built.
/// (It shares one allocation with the count of the tasks the account spawned.)
#[derive(Clone, Debug, Default)]
pub struct AbortSignal(pub(crate) Arc<TaskState>);

impl AbortSignal {
    /// Completes when the host asks the task to stop.
    ///
    /// # Cancellation safety
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn aborted(&self) {
        self.0.aborted().await;
    }

    /// Whether the host has asked the task to stop.
    pub fn is_aborted(&self) -> bool {
        self.0.is_aborted()
    }
}

/// A message to hand to the host: build it with [`Inbound::new`] and the setters.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    /// The room, chat, topic or thread.
    pub conversation: String,
    /// Who sent it.
    pub sender: String,
    /// The text.
    pub text: String,
    /// The channel's own id for the message.
    pub id: String,
    /// Send time in milliseconds since the Unix epoch (0: the host stamps arrival time).
    pub time_ms: i64,
    /// Further fields.
    pub extra: Option<Value>,
}

impl Inbound {
    /// A message with the three fields every channel has.
    pub fn new(
        conversation: impl Into<String>,
        sender: impl Into<String>,
        text: impl Into<String>,
    ) -> Self {
        Self {
            conversation: conversation.into(),
            sender: sender.into(),
            text: text.into(),
            ..Self::default()
        }
    }

    /// Sets the channel's message id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the send time.
    pub fn with_time_ms(mut self, time_ms: i64) -> Self {
        self.time_ms = time_ms;
        self
    }

    /// Sets further fields.
    pub fn with_extra(mut self, extra: Value) -> Self {
        self.extra = Some(extra);
        self
    }
}

/// The ABI form of a message; the host fills channel and account from the handle.
impl From<Inbound> for InboundMessage {
    fn from(message: Inbound) -> Self {
        // `String` → `RString` reuses the buffer: no copy of the text.
        Self {
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
        }
    }
}

/// The host's services for one account task. Cheap to clone; safe to move into spawned tasks.
#[derive(Clone)]
pub struct Host {
    handle: HostHandle,
}

impl Host {
    pub(crate) fn new(handle: HostHandle) -> Self {
        Self { handle }
    }

    /// Reports whether the connection to the remote side is up.
    pub fn set_connected(&self, connected: bool) {
        self.handle.set_connected(connected);
    }

    /// Reports traffic for event liveness (`lastEventAt`).
    pub fn record_event(&self, kind: EventKind) {
        self.handle.record_event(kind);
    }

    /// Reports how many runs are active (0 = idle).
    pub fn set_busy(&self, active_runs: u32) {
        self.handle.set_busy(active_runs);
    }

    /// Hands an inbound message to the host, blocking this thread until the host has accepted
    /// it. Blocking a runtime worker while the host makes the message durable caps a plugin's
    /// throughput and starves its other accounts: use [`deliver_async`](Self::deliver_async).
    #[deprecated(
        since = "1.1.0",
        note = "blocks a runtime thread; use `ctx.deliver(message).await` or `Host::deliver_async`"
    )]
    pub fn deliver(&self, message: Inbound) -> Result<(), PluginError> {
        into_result(self.handle.deliver(message.into()))
    }

    /// Hands an inbound message to the host; completes once the host has made it durable, with
    /// its sequence number.
    ///
    /// # Cancellation safety
    /// Not cancel-safe: once the first poll has handed the message over, dropping the future
    /// does not take it back; the host may still store it. Await it to know.
    pub async fn deliver_async(&self, message: Inbound) -> Result<u64, PluginError> {
        self.handle
            .deliver_async(message.into())
            .await
            .into_result()
            .map_err(|e| PluginError::new(e.into_string()))
    }

    /// The account's current status snapshot.
    pub fn status(&self) -> Value {
        serde_json::from_str(self.handle.status().as_str()).unwrap_or(Value::Null)
    }

    /// Merges plugin-owned fields into the account's status: a JSON object, given as a [`Value`]
    /// (`&json!({ "room": room })`) or as any value that serialises to an object, such as a
    /// `#[derive(Serialize)]` struct of the fields. A struct builds no map: its fields are
    /// written straight into the text the host reads, which is the cheaper way for a patch made
    /// at every start or on every message.
    pub fn patch_status<P: Serialize + ?Sized>(&self, patch: &P) -> Result<(), PluginError> {
        // The text is written into this thread's buffer, kept between patches (a thread that is
        // inside a patch already, or is ending, writes into a fresh one).
        with_buffer(|text| {
            serde_json::to_writer(&mut *text, patch)
                .map_err(|e| PluginError::new(format!("cannot encode the status patch: {e}")))?;
            // `serde_json` writes only UTF-8.
            let text = std::str::from_utf8(text)
                .map_err(|e| PluginError::new(format!("cannot encode the status patch: {e}")))?;
            into_result(self.handle.patch_status(text.into()))
        })
    }

    /// False once the host has given up on this task (see [`HostServices`](crate::abi::HostServices)).
    pub fn is_current(&self) -> bool {
        self.handle.is_current()
    }
}

/// The most a patch buffer keeps between patches (a larger one is freed after its patch).
const PATCH_BUFFER_KEPT: usize = 1024;

thread_local! {
    /// The text of this thread's last status patch, cleared and reused by the next.
    static PATCH_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with an empty buffer: this thread's own if it is free, else a fresh one.
fn with_buffer<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut f = Some(f);
    let kept = PATCH_BUFFER.try_with(|cell| {
        let mut buffer = cell.try_borrow_mut().ok()?;
        buffer.clear();
        let out = f.take()?(&mut buffer);
        if buffer.capacity() > PATCH_BUFFER_KEPT {
            *buffer = Vec::new();
        }
        Some(out)
    });
    match (kept, f) {
        (Ok(Some(out)), _) => out,
        // The buffer was taken (or the thread is ending): `f` has not run.
        (_, Some(f)) => f(&mut Vec::new()),
        (_, None) => unreachable!("`f` ran, so it returned"),
    }
}

fn into_result(result: RResult<(), RString>) -> Result<(), PluginError> {
    result
        .into_result()
        .map_err(|e| PluginError::new(e.into_string()))
}

/// Everything an account's task gets from [`ChannelPlugin::start`](super::ChannelPlugin::start).
///
/// Kept small, as every running account's task holds one: the account (which also names the log
/// scope), the host's services, the abort signal (which also counts the spawned tasks), and, only
/// for the test harness, its own runtime and outbound queues.
pub struct AccountContext {
    pub(crate) account: Arc<Account>,
    pub(crate) host: Host,
    pub(crate) abort: AbortSignal,
    /// `None`: the SDK's own runtime (looked up at the spawn, so a start does not touch the
    /// runtime handle's shared count) and the library's own queues.
    pub(crate) harnessed: Option<Box<Harnessed>>,
}

/// What a context the test harness builds uses instead of the library's own.
pub(crate) struct Harnessed {
    /// The runtime [`spawn`](AccountContext::spawn) uses.
    pub(crate) runtime: tokio::runtime::Handle,
    /// The map [`outbound`](AccountContext::outbound) opens the queue in.
    pub(crate) outbound: Registry,
}

impl AccountContext {
    /// The account being started.
    pub fn account(&self) -> &Account {
        &self.account
    }

    /// The account being started, shared: for a plugin that keeps it beyond the task (a map of
    /// each account's last config, say) without copying it. The SDK hands the same account to
    /// every start until the host configures the channel anew.
    pub fn shared_account(&self) -> Arc<Account> {
        self.account.clone()
    }

    /// The host's services for this account.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Completes when the host asks the task to stop. A task should return soon after: if it
    /// does not, the host cancels it at its next await point once the stop timeout has passed.
    ///
    /// # Cancellation safety
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn aborted(&self) {
        self.abort.aborted().await;
    }

    /// Whether the host has asked the task to stop.
    pub fn is_aborted(&self) -> bool {
        self.abort.is_aborted()
    }

    /// The abort signal, for code that outlives a borrow of the context.
    pub fn abort(&self) -> AbortSignal {
        self.abort.clone()
    }

    /// A clone of the abort signal as tokio-util's type.
    #[deprecated(
        since = "1.1.0",
        note = "use `AccountContext::abort` (the SDK's own `AbortSignal`), or `AccountContext::spawn`"
    )]
    pub fn abort_signal(&self) -> CancellationToken {
        self.abort.0.linked_token()
    }

    /// Opens the account's queue of messages to send: from now until the returned
    /// [`OutboundQueue`] is dropped, every message the host sends from this account (its outbox,
    /// `channeld send`, a gateway) arrives on it, through the default
    /// [`ChannelPlugin::send`](super::ChannelPlugin::send) hook. The task writes each one to its
    /// connection and answers with [`SendRequest::finish`](super::SendRequest::finish); the
    /// host's send completes with that answer. The plugin keeps no map from account to
    /// connection: the SDK does.
    ///
    /// Call it once per run, before reporting the account connected. A second call replaces the
    /// first queue, which then receives nothing more.
    ///
    /// ```
    /// use channeld_plugin_abi::sdk::prelude::*;
    ///
    /// #[derive(Default)]
    /// struct Chat;
    ///
    /// impl ChannelPlugin for Chat {
    ///     const CHANNEL_ID: &'static str = "chat";
    ///
    ///     async fn start(&self, ctx: AccountContext) -> PluginResult {
    ///         let mut outbound = ctx.outbound();
    ///         // PROTOCOL: connect here.
    ///         ctx.host().set_connected(true);
    ///         let mut sent = 0u64;
    ///         loop {
    ///             tokio::select! {
    ///                 () = ctx.aborted() => return Ok(()),
    ///                 Some(request) = outbound.recv() => {
    ///                     // PROTOCOL: write `request.message()` to the connection, then:
    ///                     ctx.host().record_event(EventKind::Outbound);
    ///                     sent += 1;
    ///                     request.finish(Ok(format!("chat-{sent}")));
    ///                 }
    ///             }
    ///         }
    ///     }
    ///     // No `send`: the default hands each message to the queue above.
    /// }
    /// # fn main() {}
    /// ```
    pub fn outbound(&self) -> OutboundQueue {
        match &self.harnessed {
            Some(harnessed) => harnessed.outbound.open(&self.account.id),
            None => Registry::process().open(&self.account.id),
        }
    }

    /// Hands an inbound message to the host; completes once the host has made it durable, with
    /// its sequence number. Waits without holding a thread (see [`Host::deliver_async`]).
    ///
    /// # Cancellation safety
    /// Not cancel-safe: see [`Host::deliver_async`].
    pub async fn deliver(&self, message: Inbound) -> Result<u64, PluginError> {
        self.host.deliver_async(message).await
    }

    /// Spawns `future` on the plugin's runtime, tied to this account: its log events carry the
    /// account's channel and id, it is dropped at its next await point once the abort fires, the
    /// account's task counts as ended only when it has ended too (so a stop waits for it, within
    /// the host's stop timeout), and an error it returns is logged with the account.
    pub fn spawn<F>(&self, future: F)
    where
        F: Future<Output = Result<(), PluginError>> + Send + 'static,
    {
        let abort = self.abort.clone();
        let task = async move {
            tokio::select! {
                () = abort.aborted() => {}
                result = future => {
                    if let Err(error) = result {
                        tracing::warn!(%error, "a task spawned by the account failed");
                    }
                }
            }
        };
        let task = self.abort.0.track(super::watchdog::watched(
            super::watchdog::Owner::Account(self.account.clone()),
            "spawned task",
            super::log::in_scope(AccountScope::new(self.account.clone()), task),
        ));
        // A runtime that has shut down runs nothing more: the task is dropped, as spawning on
        // it would.
        let runtime = match &self.harnessed {
            Some(harnessed) => Some(harnessed.runtime.clone()),
            None => super::runtime::running(),
        };
        if let Some(runtime) = runtime {
            runtime.spawn(task);
        }
    }
}
