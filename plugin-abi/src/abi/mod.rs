//! The ABI layer: only `#[repr(C)]` [`StableAbi`](abi_stable::StableAbi) types, the host-services
//! trait object, and the one prefix-type root module. Nothing here does I/O or knows about tokio.
//!
//! # Evolution rules
//! * The root module [`PluginMod`] is a prefix type: new entries are appended after `shutdown`
//!   (the field marked `#[sabi(last_prefix_field)]`) in later minor versions, each with
//!   `#[sabi(missing_field(option))]` (the struct-wide default here is `panic`).
//! * abi_stable's layout check accepts a plugin whose root module has *more* fields than the
//!   host's, not fewer: a 1.0 plugin is refused by a host built against a 1.1 root module ("too
//!   many fields", measured with abi_stable 0.11.3; `tests/abi_versions.rs`). So a 1.x host keeps
//!   a frozen copy of each older root-module layout (`v1_0`, …), tries the current one first, then
//!   the frozen ones (with the full version and layout checks), and reads entries a plugin lacks
//!   as `None`. Any type the root module contains (e.g. [`HostServices`]) must be frozen with it.
//!   `tests/fixtures/abi-lookalike/abi-1.1` proves the scheme with a look-alike 1.1 host.
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
