//! The host services a plugin calls (log, status, liveness, inbound messages), behind the
//! generation-tagged handle each account task receives.
//!
//! [`AccountLink`] is the host-side handle; the FFI adapter wraps it in abi_stable's trait object
//! (the 1.1 one, or the frozen 1.0 one for a 1.0 plugin) and in-process doubles use it directly.
//! Every call goes to a [`HostSink`] (the status board), which drops and counts calls from a stale
//! generation; inbound messages go on from there to the daemon's
//! [`MessageSink`](crate::inbound::MessageSink).

use std::{
    fmt,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
};

use abi_stable::std_types::{RResult, RStr, RString};
use async_ffi::{FfiFuture, FutureExt as _};
use channeld_plugin_abi::abi::{
    EventKind, HostServices, InboundMessage, LogLevel, LogRecord, v1_0,
};
use compact_str::CompactString;
use futures_util::FutureExt as _;
use serde_json::Value;

use crate::{plugin::BoxFuture, status_patch::StatusPatch};

/// `channel:account`.
///
/// Both ids are kept in place when they fit 24 bytes (as nearly all do): a key is one allocation
/// with its ids inside, and a lookup of the supervisor's state compares them without reading
/// other memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct AccountKey {
    /// The channel id.
    pub channel: CompactString,
    /// The normalised account id.
    pub account: CompactString,
}

impl AccountKey {
    /// A key from its parts.
    pub fn new(channel: impl Into<CompactString>, account: impl Into<CompactString>) -> Self {
        Self {
            channel: channel.into(),
            account: account.into(),
        }
    }
}

impl fmt::Display for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, self.account)
    }
}

/// Where host-service calls land. Implementations check `generation` against the account's
/// current one and drop (and count) calls from a stale task.
pub trait HostSink: Send + Sync + 'static {
    /// Whether `generation` is the account's current task.
    fn is_current(&self, key: &AccountKey, generation: u64) -> bool;
    /// The account's status as JSON.
    fn status_json(&self, key: &AccountKey) -> Value;
    /// Merges plugin-owned fields into the status.
    fn patch_status(
        &self,
        key: &AccountKey,
        generation: u64,
        patch: StatusPatch<'_>,
    ) -> Result<(), String>;
    /// Connected or not.
    fn set_connected(&self, key: &AccountKey, generation: u64, connected: bool);
    /// Traffic for event liveness.
    fn record_event(&self, key: &AccountKey, generation: u64, kind: EventKind);
    /// Active runs.
    fn set_busy(&self, key: &AccountKey, generation: u64, active_runs: u32);
    /// An inbound message: a call from a stale generation is refused at once (and counted);
    /// otherwise the message is counted as the account's inbound traffic and handed to the
    /// message sink. The future completes when the sink has accepted it (made it durable), with
    /// its sequence number. It needs no runtime to be polled.
    fn deliver(
        &self,
        key: &AccountKey,
        generation: u64,
        message: InboundMessage,
    ) -> BoxFuture<Result<u64, String>>;
    /// A plugin's SDK reports on its runtime (starved or recovered; `fields` is its JSON, see
    /// [`crate::health::starvation`]). By default, ignored.
    fn runtime_report(&self, channel: &str, fields: &str) {
        let _ = (channel, fields);
    }
}

/// Where a link reports the first poll of its task, and where a boot reads whether a stop has
/// landed: the supervisor gives one account's links its lifecycle's cell, shared by all of them
/// for the life of the lifecycle (one object per account instead of a flag and a token per
/// boot); an isolated child gives each link one that forwards the report to the host.
pub trait TaskSignals: Send + Sync + 'static {
    /// The plugin's runtime has polled the task of `generation` for the first time.
    fn task_polled(&self, generation: u64);
    /// Whether a stop of the account has landed since its lifecycle began.
    fn stop_requested(&self) -> bool;
}

/// The host-services handle for one account task (or, with no account, for a whole plugin).
#[derive(Clone)]
pub struct AccountLink {
    /// The channel, for the plugin-wide handle (an account's handle reads it from `key`).
    channel: Option<Arc<str>>,
    /// The account, shared with the supervisor's lifecycle of it (no copy per boot).
    key: Option<Arc<AccountKey>>,
    generation: u64,
    sink: Arc<dyn HostSink>,
    /// The supervisor's signals for the account (see [`with_signals`](Self::with_signals)).
    signals: Option<Arc<dyn TaskSignals>>,
}

impl AccountLink {
    /// The handle for `key`'s task of `generation`.
    pub fn for_account(key: AccountKey, generation: u64, sink: Arc<dyn HostSink>) -> Self {
        Self::for_shared_account(Arc::new(key), generation, sink)
    }

    /// [`for_account`](Self::for_account) with the key shared with its owner.
    pub fn for_shared_account(
        key: Arc<AccountKey>,
        generation: u64,
        sink: Arc<dyn HostSink>,
    ) -> Self {
        Self {
            channel: None,
            key: Some(key),
            generation,
            sink,
            signals: None,
        }
    }

    /// This handle, reporting its task's first poll to `signals` (the 1.1 `task_polled` service:
    /// the supervisor waits for it before showing `running`) and answering
    /// [`stop_requested`](Self::stop_requested) from them: a batch boot asks it right before the
    /// plugin's start, so a stop that lands while the batch checks its accounts still means no
    /// start.
    pub fn with_signals(mut self, signals: Arc<dyn TaskSignals>) -> Self {
        self.signals = Some(signals);
        self
    }

    /// Whether the account was stopped since its lifecycle began (always `false` for a handle
    /// without the supervisor's signals).
    pub fn stop_requested(&self) -> bool {
        self.signals.as_ref().is_some_and(|s| s.stop_requested())
    }

    /// The plugin-wide handle given at `init` (log only; account calls are refused).
    pub fn for_plugin(channel: &str, sink: Arc<dyn HostSink>) -> Self {
        Self {
            channel: Some(channel.into()),
            key: None,
            generation: 0,
            sink,
            signals: None,
        }
    }

    /// The account this handle is for.
    pub fn key(&self) -> Option<&AccountKey> {
        self.key.as_deref()
    }

    /// The channel this handle is for.
    fn channel(&self) -> &str {
        match (&self.key, &self.channel) {
            (Some(key), _) => &key.channel,
            (None, Some(channel)) => channel,
            (None, None) => "",
        }
    }

    /// The generation this handle is for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Runs `f` for this handle's account; `none()` (built only when needed, as `deliver` is the
    /// hot path) when the handle has no account or the host code panicked.
    fn with_key<T>(&self, none: impl Fn() -> T, f: impl FnOnce(&AccountKey) -> T) -> T {
        match &self.key {
            Some(key) => never_panic(&none, || f(key)),
            None => none(),
        }
    }

    /// Records a plugin's log event in the host's subscriber.
    pub fn log(&self, record: LogRecord) {
        // The SDK's runtime report travels through the plugin-wide link's log (the ABI has no
        // entry of its own for it); an account's link cannot make one.
        if self.key.is_none()
            && record.target.as_str() == channeld_plugin_abi::abi::RUNTIME_REPORT_TARGET
        {
            return never_panic(
                || (),
                || {
                    self.sink
                        .runtime_report(self.channel(), record.fields.as_str())
                },
            );
        }
        never_panic(
            || (),
            || emit_plugin_log(self.channel(), self.key.as_deref(), &record),
        );
    }

    /// See [`HostSink::status_json`].
    pub fn status(&self) -> Value {
        self.with_key(|| Value::Null, |key| self.sink.status_json(key))
    }

    /// See [`HostSink::patch_status`]; the patch must be a JSON object.
    pub fn patch_status(&self, patch: &str) -> Result<(), String> {
        self.with_key(
            || Err("this handle belongs to no account".into()),
            |key| {
                let patch = StatusPatch::parse(patch)?;
                self.sink.patch_status(key, self.generation, patch)
            },
        )
    }

    /// See [`HostSink::set_connected`].
    pub fn set_connected(&self, connected: bool) {
        self.with_key(
            || (),
            |key| self.sink.set_connected(key, self.generation, connected),
        );
    }

    /// See [`HostSink::record_event`].
    pub fn record_event(&self, kind: EventKind) {
        self.with_key(
            || (),
            |key| self.sink.record_event(key, self.generation, kind),
        );
    }

    /// See [`HostSink::set_busy`].
    pub fn set_busy(&self, active_runs: u32) {
        self.with_key(
            || (),
            |key| self.sink.set_busy(key, self.generation, active_runs),
        );
    }

    /// See [`HostSink::deliver`]: the future completes once the message sink has accepted the
    /// message, with its sequence number.
    ///
    /// # Cancellation safety
    /// Not cancel-safe: dropping the future after the message was handed over does not take it
    /// back from the sink.
    pub fn deliver_async(&self, message: InboundMessage) -> BoxFuture<Result<u64, String>> {
        let accepted = self.with_key(
            || {
                Box::pin(std::future::ready(Err(
                    "this handle belongs to no account".into()
                ))) as BoxFuture<Result<u64, String>>
            },
            |key| self.sink.deliver(key, self.generation, message),
        );
        // A panic in the sink's future must not unwind into the plugin that polls it.
        Box::pin(AssertUnwindSafe(accepted).catch_unwind().map(|result| {
            result.unwrap_or_else(|_| {
                tracing::error!("the message sink panicked while accepting a message");
                Err("the host failed to accept the message".into())
            })
        }))
    }

    /// The 1.0 synchronous deliver: blocks the calling thread (a plugin's thread, never one of
    /// the host's runtime) until the message sink has accepted the message. The sink's future
    /// needs no runtime (see [`MessageSink`](crate::inbound::MessageSink)), so parking the thread
    /// between polls is enough.
    pub fn deliver(&self, message: InboundMessage) -> Result<(), String> {
        futures_executor::block_on(self.deliver_async(message)).map(|_seq| ())
    }

    /// The plugin's runtime has polled this handle's task for the first time.
    pub fn task_polled(&self) {
        if let Some(signals) = &self.signals {
            signals.task_polled(self.generation);
        }
    }

    /// Whether this handle's task is still the account's current one.
    pub fn is_current(&self) -> bool {
        self.with_key(|| false, |key| self.sink.is_current(key, self.generation))
    }
}

/// Runs host code that a plugin called. A panic here would unwind into the plugin and across the
/// boundary (which aborts), so it is caught, logged, and replaced by `fallback`.
fn never_panic<T>(fallback: impl FnOnce() -> T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!("host service panicked while serving a plugin; call ignored");
        fallback()
    })
}

/// Re-emits a plugin's event in the host's subscriber, tagged with the channel and account of the
/// link it came through: a plugin cannot tag its lines as another channel's. Only a plugin-wide
/// link (no account) takes the account the record names, within the link's channel.
fn emit_plugin_log(channel: &str, key: Option<&AccountKey>, record: &LogRecord) {
    let account = match key {
        Some(key) => key.account.as_str(),
        None => record.account.as_str(),
    };
    let target = record.target.as_str();
    let fields = record.fields.as_str();
    let message = record.message.as_str();
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: crate::logging::PLUGIN_LOG_TARGET,
                $level,
                channel,
                account,
                plugin_target = target,
                fields,
                "{message}"
            )
        };
    }
    match record.level {
        LogLevel::Error => emit!(tracing::Level::ERROR),
        LogLevel::Warn => emit!(tracing::Level::WARN),
        LogLevel::Info => emit!(tracing::Level::INFO),
        LogLevel::Debug => emit!(tracing::Level::DEBUG),
        LogLevel::Trace => emit!(tracing::Level::TRACE),
    }
}

/// The FFI face of [`AccountLink`] for 1.1 plugins: abi_stable's trait object calls these.
impl HostServices for AccountLink {
    fn log(&self, record: LogRecord) {
        AccountLink::log(self, record);
    }
    fn status(&self) -> RString {
        AccountLink::status(self).to_string().into()
    }
    fn patch_status(&self, patch: RStr<'_>) -> RResult<(), RString> {
        AccountLink::patch_status(self, patch.as_str())
            .map_err(Into::into)
            .into()
    }
    fn set_connected(&self, connected: bool) {
        AccountLink::set_connected(self, connected);
    }
    fn record_event(&self, kind: EventKind) {
        AccountLink::record_event(self, kind);
    }
    fn set_busy(&self, active_runs: u32) {
        AccountLink::set_busy(self, active_runs);
    }
    fn deliver(&self, message: InboundMessage) -> RResult<(), RString> {
        AccountLink::deliver(self, message)
            .map_err(Into::into)
            .into()
    }
    fn is_current(&self) -> bool {
        AccountLink::is_current(self)
    }
    fn deliver_async(&self, message: InboundMessage) -> FfiFuture<RResult<u64, RString>> {
        let accepted = never_panic(
            || {
                Box::pin(std::future::ready(Err(
                    "the host failed to accept the message".into(),
                ))) as BoxFuture<Result<u64, String>>
            },
            || AccountLink::deliver_async(self, message),
        );
        async move { accepted.await.map_err(RString::from).into() }.into_ffi()
    }
    fn task_polled(&self) {
        never_panic(|| (), || AccountLink::task_polled(self));
    }
}

/// The FFI face of [`AccountLink`] for 1.0 plugins (the frozen 1.0 vtable).
impl v1_0::HostServices for AccountLink {
    fn log(&self, record: LogRecord) {
        AccountLink::log(self, record);
    }
    fn status(&self) -> RString {
        AccountLink::status(self).to_string().into()
    }
    fn patch_status(&self, patch: RStr<'_>) -> RResult<(), RString> {
        AccountLink::patch_status(self, patch.as_str())
            .map_err(Into::into)
            .into()
    }
    fn set_connected(&self, connected: bool) {
        AccountLink::set_connected(self, connected);
    }
    fn record_event(&self, kind: EventKind) {
        AccountLink::record_event(self, kind);
    }
    fn set_busy(&self, active_runs: u32) {
        AccountLink::set_busy(self, active_runs);
    }
    fn deliver(&self, message: InboundMessage) -> RResult<(), RString> {
        AccountLink::deliver(self, message)
            .map_err(Into::into)
            .into()
    }
    fn is_current(&self) -> bool {
        AccountLink::is_current(self)
    }
}
