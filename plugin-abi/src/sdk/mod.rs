//! The SDK layer: the one trait a plugin author implements ([`ChannelPlugin`]) and the one macro
//! that exports it ([`export_plugin!`](crate::export_plugin)). Plugin authors never write an
//! `extern "C"` fn: the SDK's entry points fence every call against panics, run the author's async
//! code on a runtime the SDK owns, and forward `tracing` events to the host.

mod config;
mod context;
mod entries;
mod error;
mod fence;
mod harness;
mod log;
mod outbound;
mod resolved;
mod runtime;
mod signal;
mod tasks;
mod watchdog;

/// Everything a plugin usually needs, in one import: `use channeld_plugin_abi::sdk::prelude::*;`.
pub mod prelude {
    pub use super::{
        AbortSignal, Account, AccountContext, ChannelConfig, ChannelPlugin, EventKind, Host,
        Inbound, Outbound, OutboundQueue, PluginError, PluginResult, ResultExt, SendRequest,
        Verdict,
    };
    pub use crate::export_plugin;
    pub use serde_json::{Value, json};
}

use std::future::Future;

use serde_json::Value;

pub use crate::abi::EventKind;
pub use config::{Account, ChannelConfig};
pub use context::{AbortSignal, AccountContext, Host, Inbound};
pub use error::{PluginError, PluginResult, ResultExt};
pub use log::ACCOUNT_SPAN;
pub use outbound::{OutboundQueue, SendReply, SendRequest};
pub use runtime::{DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_STARVATION_THRESHOLD, DEFAULT_WORKER_THREADS};

#[doc(hidden)]
pub mod __private {
    pub use super::entries::{call_root_module_loader, root_module};
    pub use abi_stable::library::{CheckTypeLayout, LibHeader, RootModuleResult};
    pub use abi_stable::std_types::RBoxError;

    /// The test harness's seam: see the module's docs (in the source; hidden from rustdoc).
    pub mod harness {
        pub use super::super::harness::{
            Controls, LogFields, SendScope, account_context, log_scope,
        };
    }
}

/// A yes/no answer with an optional reason, for [`ChannelPlugin::is_enabled`] and
/// [`ChannelPlugin::is_configured`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Yes.
    Yes,
    /// No; the reason shows as the account's `lastError` (the host supplies "disabled" or
    /// "not configured" when it is `None`).
    No(Option<String>),
}

impl Verdict {
    /// No, with a reason.
    pub fn no(reason: impl Into<String>) -> Self {
        Self::No(Some(reason.into()))
    }
}

/// A message the host asks the plugin to send.
#[derive(Debug, Clone, Default)]
pub struct Outbound {
    /// The account to send from.
    pub account: String,
    /// Where to send it.
    pub conversation: String,
    /// The text.
    pub text: String,
    /// The message this replies to, if any.
    pub reply_to: Option<String>,
    /// Further fields.
    pub extra: Option<Value>,
}

/// A channel plugin. Implement this and pass the type to [`export_plugin!`](crate::export_plugin).
///
/// Only [`start`](Self::start) is required; every other hook has the behaviour the host expects
/// by default. Synchronous hooks run on a host thread; async ones run on the plugin's own tokio
/// runtime, so timers, sockets and HTTP clients work inside them. A panic in any hook reaches the
/// host as an error carrying the panic message, never as a crash.
pub trait ChannelPlugin: Send + Sync + Sized + 'static {
    /// The channel id (`irc`, `webhook`, …): what the config's `[channels.<id>]` names.
    const CHANNEL_ID: &'static str;
    /// A human name for status tables.
    const DISPLAY_NAME: &'static str = Self::CHANNEL_ID;

    /// The accounts the config lists. Default: the keys of the channel's `accounts` table.
    fn list_account_ids(&self, channel: &ChannelConfig) -> PluginResult<Vec<String>> {
        Ok(channel.account_keys())
    }

    /// Checks the channel's table before the host applies it; an `Err` is shown to the user as
    /// the reason the channel's config was refused. Default: every table is fine. (Added in 1.1.)
    fn validate(&self, _channel: &ChannelConfig) -> PluginResult {
        Ok(())
    }

    /// The channel's default account. Default: none (the host takes the first listed).
    fn default_account_id(&self, _channel: &ChannelConfig) -> Option<String> {
        None
    }

    /// The account's config. Default: its table under `accounts` (empty if absent).
    ///
    /// The SDK resolves each account once per config the host installs and hands the same
    /// [`Account`] to every later hook and start, until the host configures the channel anew: the
    /// answer must depend on `channel` and `account_id` alone. A resolve that fails is not kept.
    fn resolve_account(&self, channel: &ChannelConfig, account_id: &str) -> PluginResult<Account> {
        Ok(channel.account(account_id))
    }

    /// Whether the account is enabled. Default: unless its table says `enabled = false`.
    fn is_enabled(&self, account: &Account) -> Verdict {
        if account.enabled() {
            Verdict::Yes
        } else {
            Verdict::No(None)
        }
    }

    /// Whether the account has what it needs to start. Default: yes.
    fn is_configured(&self, _account: &Account) -> Verdict {
        Verdict::Yes
    }

    /// A description for status displays (a `configured` boolean in it is honoured). Default: none.
    fn describe_account(&self, _account: &Account) -> Option<Value> {
        None
    }

    /// Runs the account until it ends: return `Ok(())` for a clean exit (the host still counts an
    /// unrequested exit as a crash and restarts it), `Err` for a failure. Watch
    /// [`AccountContext::aborted`] and return soon after it fires.
    fn start(&self, ctx: AccountContext) -> impl Future<Output = PluginResult> + Send;

    /// Called after the abort signal when the host stops an account. Default: nothing (and the
    /// SDK, seeing the default, runs nothing: a stop costs no task). It runs on the plugin's
    /// runtime and holds no host thread; the host waits for it at most its stop timeout, then
    /// drops it.
    fn stop(&self, _account: Account) -> impl Future<Output = PluginResult> + Send {
        entries::DefaultStop
    }

    /// Whether [`stop`](Self::stop) has anything to do for this account: when it answers false,
    /// the SDK does not run `stop` for it (no task on the runtime, nothing for the host to wait
    /// for). Default: true. It runs on a host thread, like [`is_enabled`](Self::is_enabled):
    /// keep it quick. (Added in 1.1; a plugin that does not override `stop` needs no answer: the
    /// SDK knows the default does nothing.)
    fn stop_needed(&self, _account: &Account) -> bool {
        true
    }

    /// Clears the account's stored credentials; returns whether anything was cleared.
    /// Default: nothing to clear. Runs on the plugin's runtime, like [`stop`](Self::stop).
    fn logout(&self, _account: Account) -> impl Future<Output = PluginResult<bool>> + Send {
        async { Ok(false) }
    }

    /// Sends a message; returns the channel's id for it (or an empty string).
    ///
    /// Default: hands the message to the account's running task through its
    /// [`OutboundQueue`] ([`AccountContext::outbound`]) and completes with the answer the task
    /// gives ([`SendRequest::finish`]). Without a queue the send fails: "account … is not
    /// running" (or, if no account of the plugin ever opened one, that the channel does not
    /// support sending). Override it for a channel that sends without the account's task (an
    /// HTTP API needing no connection, say).
    ///
    /// The future completes when the channel has **taken** the message: written to the socket
    /// for IRC, acknowledged by the broker for MQTT QoS 1, a 2xx answer for a webhook. An `Err`
    /// is a failed attempt: the host's outbox retries it with backoff until its deadline, so an
    /// error must mean "not taken". Delivery is at least once: after a host crash a message whose
    /// send was in flight is sent again.
    ///
    /// # Cancellation safety
    /// The host never drops a send it started; the default's future is not cancel-safe (a
    /// message already queued is still sent, its outcome unreported).
    fn send(&self, message: Outbound) -> impl Future<Output = PluginResult<String>> + Send {
        outbound::send(Self::CHANNEL_ID, message)
    }
}

/// The symbol [`export_plugin!`](crate::export_plugin) exports the library header under, as a
/// literal (`export_name` takes no constant). abi_stable's own `#[export_root_module]` emits the
/// same header under the same name, but its expansion names `::abi_stable` and so would make
/// every plugin depend on abi_stable directly; the SDK writes it itself and checks here, at
/// compile time, that the name is the one the pinned abi_stable looks up.
const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = assert!(
    same_str(
        ROOT_MODULE_SYMBOL,
        abi_stable::library::ROOT_MODULE_LOADER_NAME
    ),
    "abi_stable's root-module symbol changed: update export_plugin! (see `Bumping abi_stable`)"
);

/// Exports a [`ChannelPlugin`] as channeld's root module. Use it once, in a `cdylib` crate.
///
/// `export_plugin!(MyPlugin)` builds the plugin with `Default`; `export_plugin!(MyPlugin, MyPlugin::new)`
/// with a constructor. The constructor runs when the host loads the library; if it panics, the
/// host reports the load as failed and keeps running.
///
/// The plugin must be built with `panic = "unwind"` (the default): the SDK turns every panic into
/// an error the host shows, which needs unwinding; under `panic = "abort"` the first panic in a
/// plugin would kill channeld with every other plugin, so the macro refuses to compile there.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!($plugin, <$plugin as ::core::default::Default>::default);
    };
    ($plugin:ty, $constructor:expr) => {
        #[cfg(panic = "abort")]
        ::core::compile_error!(
            "channeld plugins must be built with panic = \"unwind\": under panic = \"abort\" \
             the first panic in the plugin would abort channeld and every other plugin, instead \
             of becoming an error the host reports. Remove `panic = \"abort\"` from the \
             [profile.*] sections of Cargo.toml."
        );

        #[doc(hidden)]
        fn __channeld_plugin_root_module()
        -> ::core::result::Result<$crate::abi::PluginMod_Ref, $crate::sdk::__private::RBoxError> {
            $crate::sdk::__private::root_module::<$plugin>($constructor, env!("CARGO_PKG_VERSION"))
        }

        /// The header abi_stable's loader looks up; the name is abi_stable's fixed symbol (the
        /// SDK checks at compile time that it is the pinned abi_stable's).
        #[doc(hidden)]
        #[unsafe(export_name = "_1as_0lib_1header_0root_bmodule_bloader")]
        pub static __CHANNELD_PLUGIN_LIB_HEADER: $crate::sdk::__private::LibHeader = {
            extern "C" fn __loader() -> $crate::sdk::__private::RootModuleResult {
                $crate::sdk::__private::call_root_module_loader(__channeld_plugin_root_module)
            }
            // SAFETY: `__loader` returns the `PluginMod_Ref` built by the SDK (or an error), which is the
            // module type named here, so the layout abi_stable records matches what it returns.
            unsafe {
                $crate::sdk::__private::LibHeader::from_constructor::<$crate::abi::PluginMod_Ref>(
                    __loader,
                    $crate::sdk::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}
