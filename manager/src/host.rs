//! The host services a plugin calls (log, status, liveness, inbound messages), behind the
//! generation-tagged handle each account task receives.
//!
//! [`AccountLink`] is the host-side handle; the FFI adapter wraps it in abi_stable's trait object
//! and in-process doubles use it directly. Every call goes to a [`HostSink`] (the status board),
//! which drops and counts calls from a stale generation.

use std::{
    fmt,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
};

use channeld_plugin_abi::abi::{EventKind, HostServices, InboundMessage, LogLevel, LogRecord};
use serde_json::{Map, Value};

/// `channel:account`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct AccountKey {
    /// The channel id.
    pub channel: String,
    /// The normalised account id.
    pub account: String,
}

impl AccountKey {
    /// A key from its parts.
    pub fn new(channel: impl Into<String>, account: impl Into<String>) -> Self {
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
        patch: Map<String, Value>,
    ) -> Result<(), String>;
    /// Connected or not.
    fn set_connected(&self, key: &AccountKey, generation: u64, connected: bool);
    /// Traffic for event liveness.
    fn record_event(&self, key: &AccountKey, generation: u64, kind: EventKind);
    /// Active runs.
    fn set_busy(&self, key: &AccountKey, generation: u64, active_runs: u32);
    /// An inbound message.
    fn deliver(
        &self,
        key: &AccountKey,
        generation: u64,
        message: InboundMessage,
    ) -> Result<(), String>;
}

/// The host-services handle for one account task (or, with no account, for a whole plugin).
#[derive(Clone)]
pub struct AccountLink {
    channel: Arc<str>,
    key: Option<AccountKey>,
    generation: u64,
    sink: Arc<dyn HostSink>,
}

impl AccountLink {
    /// The handle for `key`'s task of `generation`.
    pub fn for_account(key: AccountKey, generation: u64, sink: Arc<dyn HostSink>) -> Self {
        Self {
            channel: key.channel.as_str().into(),
            key: Some(key),
            generation,
            sink,
        }
    }

    /// The plugin-wide handle given at `init` (log only; account calls are refused).
    pub fn for_plugin(channel: &str, sink: Arc<dyn HostSink>) -> Self {
        Self {
            channel: channel.into(),
            key: None,
            generation: 0,
            sink,
        }
    }

    /// The account this handle is for.
    pub fn key(&self) -> Option<&AccountKey> {
        self.key.as_ref()
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
        never_panic(
            || (),
            || emit_plugin_log(&self.channel, self.key.as_ref(), &record),
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
            |key| match serde_json::from_str::<Value>(patch) {
                Ok(Value::Object(map)) => self.sink.patch_status(key, self.generation, map),
                Ok(_) => Err("a status patch must be a JSON object".into()),
                Err(e) => Err(format!("a status patch must be JSON: {e}")),
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

    /// See [`HostSink::deliver`].
    pub fn deliver(&self, message: InboundMessage) -> Result<(), String> {
        self.with_key(
            || Err("this handle belongs to no account".into()),
            |key| self.sink.deliver(key, self.generation, message),
        )
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

/// The FFI face of [`AccountLink`]: abi_stable's trait object calls these.
impl HostServices for AccountLink {
    fn log(&self, record: LogRecord) {
        AccountLink::log(self, record);
    }
    fn status(&self) -> abi_stable::std_types::RString {
        AccountLink::status(self).to_string().into()
    }
    fn patch_status(
        &self,
        patch: abi_stable::std_types::RStr<'_>,
    ) -> abi_stable::std_types::RResult<(), abi_stable::std_types::RString> {
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
    fn deliver(
        &self,
        message: InboundMessage,
    ) -> abi_stable::std_types::RResult<(), abi_stable::std_types::RString> {
        AccountLink::deliver(self, message)
            .map_err(Into::into)
            .into()
    }
    fn is_current(&self) -> bool {
        AccountLink::is_current(self)
    }
}
