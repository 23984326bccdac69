//! The messages between the host and an isolated plugin's child process. Each message is one
//! frame of tokio-util's [`LengthDelimitedCodec`] holding the message in postcard's format. JSON
//! values travel as strings (postcard is not self-describing).

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_util::codec::LengthDelimitedCodec;

/// The codec of both directions: 4-byte big-endian length, frames up to 64 MiB.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(64 << 20)
        .new_codec()
}

/// One message as a frame.
pub fn encode<T: Serialize>(message: &T) -> Bytes {
    // Serialising our own enums of strings and numbers into a Vec cannot fail.
    Bytes::from(postcard::to_stdvec(message).unwrap_or_default())
}

/// A frame as a message.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(frame)
}

/// A host→plugin call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Call {
    /// `validate_channel` (the table as JSON).
    Validate(String),
    /// `configure` (the table as JSON).
    Configure(String),
    /// `list_account_ids`.
    ListAccountIds,
    /// `default_account_id`.
    DefaultAccountId,
    /// `resolve_account`.
    ResolveAccount(String),
    /// `is_enabled`.
    IsEnabled(String),
    /// `is_configured`.
    IsConfigured(String),
    /// `describe_account`.
    Describe(String),
    /// `start_account` for one generation.
    Start {
        /// The account.
        account: String,
        /// The generation its host link is for.
        generation: u64,
    },
    /// The stop hook.
    Stop(String),
    /// The logout hook.
    Logout(String),
    /// `send`.
    Send {
        /// From which account.
        account: String,
        /// Where.
        conversation: String,
        /// What.
        text: String,
        /// In reply to.
        reply_to: Option<String>,
        /// Further fields, as JSON text.
        extra: Option<String>,
    },
    /// `shutdown`: the child exits after answering.
    Shutdown,
    /// `boot_accounts`: for each account of the batch (with the generation its host link is
    /// for), in order, whether it is enabled, whether it is configured, and its start through the
    /// plugin's own batch entry; answered by [`Answer::Booted`], one step per account.
    Boot(Vec<(String, u64)>),
    /// `start_accounts` for a batch (account, generation): [`Answer::Booted`] with a start or an
    /// error per account.
    StartMany(Vec<(String, u64)>),
    /// The enabled and configured checks of a batch of accounts, without starting any:
    /// [`Answer::Booted`] with [`Booted::Ready`] for an account that passed both.
    CheckMany(Vec<String>),
    /// What the status snapshot shows of a batch of accounts before their first boot (see
    /// [`crate::plugin::Plugin::account_facts`]), each with whether the host already knows it is
    /// disabled (then its `is_enabled` is not asked): [`Answer::Facts`].
    Facts(Vec<(String, bool)>),
}

/// One account's step of a batched boot ([`Call::Boot`], [`Call::StartMany`],
/// [`Call::CheckMany`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Booted {
    /// Switched off, with the plugin's reason.
    Disabled(Option<String>),
    /// Not configured, with the plugin's reason.
    NotConfigured(Option<String>),
    /// Enabled and configured ([`Call::CheckMany`]: not started).
    Ready,
    /// Started: the task's id.
    Started(u64),
}

/// One account's facts for the snapshot ([`Call::Facts`]); `None` where the plugin failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Facts {
    /// `is_enabled`: enabled, or not with a reason.
    pub enabled: Option<(bool, Option<String>)>,
    /// The `configured` flag of the account's description.
    pub configured: Option<bool>,
    /// `is_configured`'s reason, asked when the description says it is not configured.
    pub unconfigured_reason: Option<String>,
}

/// A call's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    /// Nothing.
    Unit,
    /// Yes or no.
    Bool(bool),
    /// Account ids.
    Strings(Vec<String>),
    /// Maybe a string.
    OptString(Option<String>),
    /// JSON.
    Json(String),
    /// Maybe JSON.
    OptJson(Option<String>),
    /// A check: ok, or not with a reason.
    Check(bool, Option<String>),
    /// A started task's id.
    Task(u64),
    /// A text (the send receipt).
    Text(String),
    /// A batch's steps, one per account in order: the step, or the plugin's error for that
    /// account.
    Booted(Vec<Result<Booted, String>>),
    /// A batch's facts, one per account in order.
    Facts(Vec<Facts>),
}

/// Host → child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToChild {
    /// A call, answered by [`FromChild::Reply`] with the same id.
    Call {
        /// The call's id.
        id: u64,
        /// The call.
        call: Call,
    },
    /// Fire a task's abort signal. (A task that does not end within the stop timeout is not
    /// cancelled inside the child: the child is killed.)
    Abort(u64),
    /// Fire the abort signal of several tasks (one message for a batch).
    AbortMany(Vec<u64>),
    /// The answer to a [`FromChild::Query`].
    Answered {
        /// The query's id.
        id: u64,
        /// The answer.
        answer: QueryAnswer,
    },
}

/// A host service the child's plugin called that needs no answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Service {
    /// `set_connected`.
    Connected(bool),
    /// `record_event` (0 inbound, 1 outbound, 2 other).
    Event(u8),
    /// `set_busy`.
    Busy(u32),
    /// The plugin's runtime polled the task for the first time.
    TaskPolled,
    /// `patch_status` (a JSON object), already answered in the child: the host applies it with
    /// its own checks and drops it (counted) if its generation is no longer current.
    Patch(String),
}

/// A host service that answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Query {
    /// `is_current`.
    IsCurrent,
    /// `status`.
    Status,
    /// `deliver`.
    Deliver(Inbound),
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QueryAnswer {
    /// `is_current`.
    Bool(bool),
    /// `status` as JSON.
    Json(String),
    /// `deliver`: the sequence number.
    Delivered(Result<u64, String>),
}

/// An inbound message on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inbound {
    /// Conversation.
    pub conversation: String,
    /// Sender.
    pub sender: String,
    /// Text.
    pub text: String,
    /// The channel's id for it.
    pub id: String,
    /// When, ms since the epoch.
    pub time_ms: i64,
    /// Extra JSON.
    pub extra: String,
}

/// What the plugin says about itself, from the child's handshake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Channel id.
    pub channel_id: String,
    /// Display name.
    pub display_name: String,
    /// Plugin version.
    pub plugin_version: String,
    /// ABI version.
    pub abi_version: String,
    /// Rustc version.
    pub rustc_version: String,
    /// Whether it reports `task_polled`.
    pub reports_task_polled: bool,
}

/// Child → host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromChild {
    /// The plugin loaded and `init` succeeded.
    Hello(Hello),
    /// Loading or `init` failed (the child exits after this).
    LoadFailed {
        /// The error class.
        class: String,
        /// The one-line error.
        error: String,
    },
    /// A call's answer.
    Reply {
        /// The call's id.
        id: u64,
        /// The answer, or the plugin's error.
        result: Result<Answer, String>,
    },
    /// A task ended.
    TaskDone {
        /// The task.
        task: u64,
        /// How.
        result: Result<(), String>,
    },
    /// A host service without answer, for one account's generation.
    Service {
        /// The account.
        account: String,
        /// The generation.
        generation: u64,
        /// The service.
        service: Service,
    },
    /// A host service with an answer ([`ToChild::Answered`]).
    Query {
        /// The query's id.
        id: u64,
        /// The account.
        account: String,
        /// The generation.
        generation: u64,
        /// The query.
        query: Query,
    },
}
