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
//!   a frozen copy of each older layout ([`v1_0`]: the root module *and* [`HostServices`], which
//!   is a prefix type too), tries the current one first, then the frozen ones (with the full
//!   version and layout checks). Every entry of a minor version is designed in one go: once a
//!   plugin exists that was built against a minor, its layout can never change.
//! * abi_stable *accepts* a plugin of a newer minor than the host's; channeld's loader refuses it
//!   itself (its entries would be invisible to the host), naming both versions.
//! * `repr(C)` values cannot grow, so every message and record carries an `extra` JSON field, and
//!   the status patch is JSON.
//! * [`HostServices`] is a `sabi_trait`: methods are appended after its `last_prefix_field`,
//!   each with a default body (which makes its vtable field optional).
//! * A plugin built against a newer minor detects an older host by the host-version key
//!   ([`HOST_ABI_VERSION_KEY`]) in [`InitSettings::extra`], which a 1.0 host does not set, and
//!   fails `init` with one line saying so.
//!
//! # Every entry, with the version that added it
//!
//! | entry | where | added in |
//! |---|---|---|
//! | `metadata`, `init`, `configure` | root module | 1.0 |
//! | `list_account_ids`, `default_account_id`, `resolve_account` | root module | 1.0 |
//! | `is_enabled`, `is_configured`, `describe_account` | root module | 1.0 |
//! | `start_account`, `abort_task`, `cancel_task` | root module | 1.0 |
//! | `stop_account`, `logout` (blocking: run on a host thread) | root module | 1.0 |
//! | `send`, `shutdown` | root module | 1.0 |
//! | `stop_account_async`, `logout_async` (return an `FfiFuture`) | root module | 1.1 |
//! | `validate_channel` | root module | 1.1 |
//! | `start_accounts`, `abort_tasks` (batches) | root module | 1.1 |
//! | `log`, `status`, `patch_status`, `set_connected` | [`HostServices`] | 1.0 |
//! | `record_event`, `set_busy`, `deliver`, `is_current` | [`HostServices`] | 1.0 |
//! | `deliver_async` (completes when the message is durable) | [`HostServices`] | 1.1 |
//! | `task_polled` (first poll of an account's task) | [`HostServices`] | 1.1 |
//! | [`HOST_ABI_VERSION_KEY`] in [`InitSettings::extra`] | settings | 1.1 |
//!
//! # Conventions on existing entries (no entry of their own)
//! * [`RUNTIME_SHUTDOWN_TIMEOUT_MS_KEY`] and [`STARVATION_THRESHOLD_MS_KEY`] in
//!   [`InitSettings::extra`]: how long the SDK's `shutdown` waits for its runtime's threads, and
//!   after how long with no worker free the SDK reports its runtime starved. A host or an SDK that
//!   does not know a key ignores it.
//! * A record sent through the plugin-wide handle's `log` with the target
//!   [`RUNTIME_REPORT_TARGET`] is the SDK's report on its runtime (starved or recovered; its
//!   `fields` are JSON), not a log line of the plugin's. A host that does not know the target logs
//!   it as a plugin warning.

mod host;
mod root;
mod types;
pub mod v1_0;

pub use host::{HostHandle, HostServices, HostServices_TO};
pub use root::{PluginMod, PluginMod_Prefix, PluginMod_Ref};
pub use types::{
    AccountId, AccountStart, EventKind, InboundMessage, InitSettings, LogLevel, LogRecord,
    OutboundMessage, PluginMetadata, RVerdict, StartedTask, TaskDone, TaskId,
};

/// The key of [`InitSettings::extra`] under which a 1.1 (or later) host states its plugin-abi
/// version (e.g. `{"host_abi_version": "1.1.0"}`). A 1.0 host sends no such key.
pub const HOST_ABI_VERSION_KEY: &str = "host_abi_version";

/// The key of [`InitSettings::extra`] giving, in milliseconds, how long the SDK's `shutdown`
/// waits for its runtime's threads before giving up on the ones still blocked.
pub const RUNTIME_SHUTDOWN_TIMEOUT_MS_KEY: &str = "runtime_shutdown_timeout_ms";

/// The key of [`InitSettings::extra`] giving, in milliseconds, how long every worker of the
/// SDK's runtime may stay busy (no worker free to run a probe task) before the SDK reports its
/// runtime starved; 0 turns the watch off.
pub const STARVATION_THRESHOLD_MS_KEY: &str = "starvation_threshold_ms";

/// The `target` of the SDK's runtime reports, sent through the plugin-wide handle's `log`. The
/// record's `fields` are a JSON object: `{"starved": true, "workers": n, "blockedMs": ms,
/// "holders": [{"account": "…", "in": "task"}]}` when every worker has been busy past the
/// threshold, and `{"starved": false}` once a worker is free again.
pub const RUNTIME_REPORT_TARGET: &str = "channeld::runtime";
