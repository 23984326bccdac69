//! Plain data that crosses the boundary. Only abi_stable's `R*` types are used: they carry their
//! own deallocation, so a value allocated on one side is freed safely on the other.

use abi_stable::{
    StableAbi,
    std_types::{ROption, RResult, RString},
};
use async_ffi::FfiFuture;

/// An account id as the host passes it (already normalised; see the manager's docs).
pub type AccountId = RString;

/// Identifies one running account task inside a plugin, for [`abort`](super::PluginMod::abort_task)
/// and [`cancel`](super::PluginMod::cancel_task).
pub type TaskId = u64;

/// What a plugin says about itself. Read once at load, before `init`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginMetadata {
    /// The channel id this plugin provides (`irc`, `webhook`, …): the registry key.
    pub channel_id: RString,
    /// A human name for status tables.
    pub display_name: RString,
    /// The plugin crate's own version.
    pub plugin_version: RString,
    /// The version of `channeld-plugin-abi` the plugin was built against.
    pub abi_version: RString,
    /// `rustc --version` of the compiler that built the plugin.
    pub rustc_version: RString,
    /// Further metadata as a JSON object (empty string = none).
    pub extra: RString,
}

/// Log levels, most severe first (the numeric order `tracing` uses).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// `ERROR`
    Error = 1,
    /// `WARN`
    Warn = 2,
    /// `INFO`
    Info = 3,
    /// `DEBUG`
    Debug = 4,
    /// `TRACE`
    Trace = 5,
}

/// Settings the host hands to a plugin once, before any other call but metadata.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct InitSettings {
    /// Worker threads for the plugin's own tokio runtime (0 = the SDK's default of 2).
    pub worker_threads: u32,
    /// The most verbose level the host will record; the plugin drops finer events itself so
    /// they never cost a boundary crossing.
    pub max_log_level: LogLevel,
    /// Further settings as a JSON object (empty string = none).
    pub extra: RString,
}

/// One `tracing` event from inside a plugin, forwarded to the host's subscriber.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct LogRecord {
    /// Severity.
    pub level: LogLevel,
    /// The event's target inside the plugin (its module path, usually).
    pub target: RString,
    /// The formatted `message` field.
    pub message: RString,
    /// Every other field of the event, as a JSON object.
    pub fields: RString,
    /// The channel of the account the event was emitted for (empty outside an account).
    pub channel: RString,
    /// The account the event was emitted for (empty outside an account).
    pub account: RString,
}

/// A yes/no answer with an optional human reason (used for is-enabled and is-configured).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct RVerdict {
    /// The answer.
    pub ok: bool,
    /// Why, when the answer is no (the host falls back to "disabled" / "not configured").
    pub reason: ROption<RString>,
}

/// What kind of traffic an event-liveness report stands for.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Something arrived from the remote side (also updates `lastInboundAt`).
    Inbound = 0,
    /// Something was sent to the remote side (also updates `lastOutboundAt`).
    Outbound = 1,
    /// Protocol-level liveness (a ping, a keep-alive) that is neither.
    Other = 2,
}

/// A message that arrived on a channel, handed to the host.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Default)]
pub struct InboundMessage {
    /// Channel id; the host fills it from the handle when empty.
    pub channel: RString,
    /// Account id; the host fills it from the handle when empty.
    pub account: RString,
    /// The room, chat, topic or thread the message belongs to.
    pub conversation: RString,
    /// Who sent it, in the channel's own notation.
    pub sender: RString,
    /// The message text.
    pub text: RString,
    /// The channel's id for the message (empty when it has none).
    pub id: RString,
    /// When it was sent, milliseconds since the Unix epoch (0 = unknown; the host stamps it).
    pub time_ms: i64,
    /// Further fields as a JSON object (empty string = none).
    pub extra: RString,
}

/// A message the host asks a plugin to send.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboundMessage {
    /// The account to send from.
    pub account: RString,
    /// Where to send it.
    pub conversation: RString,
    /// The text.
    pub text: RString,
    /// The id of the message this replies to (empty = none).
    pub reply_to: RString,
    /// Further fields as a JSON object (empty string = none).
    pub extra: RString,
}

/// Completes when an account's task ends: `Ok` for a clean exit, `Err` with the task's error
/// message (or the panic message, or "cancelled") otherwise. It wraps only SDK code — the join
/// handle of the plugin-side task — never the author's future, so polling it cannot panic.
/// Dropping it cancels the plugin-side task.
pub type TaskDone = FfiFuture<RResult<(), RString>>;

/// A started account task.
#[repr(C)]
#[derive(StableAbi)]
pub struct StartedTask {
    /// The id to pass to `abort_task` / `cancel_task`.
    pub id: TaskId,
    /// Completes when the task ends.
    pub done: TaskDone,
}

/// 1.1: one account of a [`start_accounts`](super::PluginMod::start_accounts) batch.
#[repr(C)]
#[derive(StableAbi)]
pub struct AccountStart {
    /// The (normalised) account id.
    pub account: RString,
    /// The host-services handle for this account's task.
    pub host: super::HostHandle,
}
