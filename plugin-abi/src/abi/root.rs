//! The root module every plugin exports: one prefix type holding every entry point.

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec},
};
use async_ffi::FfiFuture;

use super::{
    host::HostHandle,
    types::{
        AccountStart, InitSettings, OutboundMessage, PluginMetadata, RVerdict, StartedTask, TaskId,
    },
};

/// Every entry point of a channel plugin.
///
/// Each entry catches panics inside the plugin and returns them as `RResult::RErr` carrying the
/// panic message (entries without a result report a panic as `false` / an empty value), so no
/// unwind ever crosses the boundary. Entries that take an account id use the channel config the
/// host last passed to [`configure`](Self::configure).
///
/// Fields up to `shutdown` exist in every 1.x plugin (1.0); the fields after it were added in
/// 1.1, each `#[sabi(missing_field(option))]`: their accessors return `None` for a module that
/// lacks them. A 1.1 host reaches a 1.0 plugin through the frozen [`v1_0`](super::v1_0) layout,
/// so in practice a module seen through this type has every 1.1 entry.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's metadata. Safe to call before `init`.
    pub metadata: extern "C" fn() -> PluginMetadata,
    /// Called once before any other entry but `metadata`; `host` is the plugin-wide handle used
    /// for log events outside any account.
    pub init: extern "C" fn(settings: InitSettings, host: HostHandle) -> RResult<(), RString>,
    /// Hands the plugin its channel's config table as JSON (`{"accounts": {…}, …}`, secrets
    /// resolved, host-owned keys included). Called after `init` and whenever the config changes.
    pub configure: extern "C" fn(channel_config: RStr<'_>) -> RResult<(), RString>,
    /// The account ids the config lists (the SDK's default: the keys of `accounts`).
    pub list_account_ids: extern "C" fn() -> RResult<RVec<RString>, RString>,
    /// The channel's default account, if the plugin has an opinion.
    pub default_account_id: extern "C" fn() -> RResult<ROption<RString>, RString>,
    /// The account's resolved config as JSON.
    pub resolve_account: extern "C" fn(account: RStr<'_>) -> RResult<RString, RString>,
    /// Whether the account is enabled, and why not.
    pub is_enabled: extern "C" fn(account: RStr<'_>) -> RResult<RVerdict, RString>,
    /// Whether the account has what it needs to start, and what is missing.
    pub is_configured: extern "C" fn(account: RStr<'_>) -> RResult<RVerdict, RString>,
    /// A JSON description of the account for status displays (may carry `configured`).
    pub describe_account: extern "C" fn(account: RStr<'_>) -> RResult<ROption<RString>, RString>,
    /// Starts the account's long-lived task on the plugin's own runtime.
    pub start_account:
        extern "C" fn(account: RStr<'_>, host: HostHandle) -> RResult<StartedTask, RString>,
    /// Fires the task's cooperative abort signal. Returns whether the task was still known.
    pub abort_task: extern "C" fn(task: TaskId) -> bool,
    /// Cancels the task on the plugin's runtime: it ends at its next await point.
    pub cancel_task: extern "C" fn(task: TaskId) -> bool,
    /// The plugin's optional stop hook, called after the abort signal.
    pub stop_account: extern "C" fn(account: RStr<'_>) -> RResult<(), RString>,
    /// Clears the account's stored credentials; says whether anything was cleared.
    pub logout: extern "C" fn(account: RStr<'_>) -> RResult<bool, RString>,
    /// Sends a message; the future yields the channel's message id.
    pub send: extern "C" fn(message: OutboundMessage) -> FfiFuture<RResult<RString, RString>>,
    /// Stops the plugin's runtime and its threads. Nothing else is called afterwards.
    #[sabi(last_prefix_field)]
    pub shutdown: extern "C" fn() -> RResult<(), RString>,

    // ---- added in 1.1 ----
    /// 1.1: the stop hook, without a host thread: the future completes when the plugin's stop
    /// hook (run on the plugin's runtime) has finished. Dropping it cancels the hook.
    #[sabi(missing_field(option))]
    pub stop_account_async: extern "C" fn(account: RStr<'_>) -> FfiFuture<RResult<(), RString>>,
    /// 1.1: the logout hook, without a host thread; yields whether anything was cleared.
    /// Dropping the future cancels the hook.
    #[sabi(missing_field(option))]
    pub logout_async: extern "C" fn(account: RStr<'_>) -> FfiFuture<RResult<bool, RString>>,
    /// 1.1: checks a channel table (the same JSON `configure` takes) without applying it; the
    /// error is the plugin's own one-line message. The host calls it before `configure`.
    #[sabi(missing_field(option))]
    pub validate_channel: extern "C" fn(channel_config: RStr<'_>) -> RResult<(), RString>,
    /// 1.1: starts several accounts in one call, one result per input, in order. The host never
    /// passes more accounts than its startup fan-out per channel (`startup_accounts_per_channel`).
    #[sabi(missing_field(option))]
    pub start_accounts:
        extern "C" fn(batch: RVec<AccountStart>) -> RVec<RResult<StartedTask, RString>>,
    /// 1.1: fires the abort signal of several tasks; returns how many were still known.
    #[sabi(missing_field(option))]
    pub abort_tasks: extern "C" fn(tasks: RSlice<'_, TaskId>) -> u32,
}

impl RootModule for PluginMod_Ref {
    declare_root_module_statics! {PluginMod_Ref}
    const BASE_NAME: &'static str = "channeld_plugin";
    const NAME: &'static str = "channeld_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
