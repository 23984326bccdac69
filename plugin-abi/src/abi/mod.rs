//! The ABI layer: only `#[repr(C)]` [`StableAbi`](abi_stable::StableAbi) types, the host-services
//! trait object, and the one prefix-type root module. Nothing here does I/O or knows about tokio.
//!
//! # Evolution rules
//! * The root module [`PluginMod`] is a prefix type: new entries are appended after the field
//!   marked `#[sabi(last_prefix_field)]` in later minor versions, and the host reads them through
//!   `Option`-returning accessors, so a plugin built against 1.0 keeps loading in a 1.x host.
//! * `repr(C)` values cannot grow, so every message and record carries an `extra` JSON field, and
//!   the status patch is JSON.
//! * [`HostServices`] is a `sabi_trait`: methods are appended after its `last_prefix_field`.

mod host;
mod root;
mod types;

pub use host::{HostHandle, HostServices, HostServices_TO};
pub use root::{PluginMod, PluginMod_Prefix, PluginMod_Ref};
pub use types::{
    AccountId, EventKind, InboundMessage, InitSettings, LogLevel, LogRecord, OutboundMessage,
    PluginMetadata, RVerdict, StartedTask, TaskDone, TaskId,
};
