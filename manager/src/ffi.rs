//! The adapter from a loaded root module to the host-side [`Plugin`] trait. Safe code only: the
//! root module's entries are safe `extern "C"` fns that fence panics inside the plugin.

use std::{path::Path, sync::Arc};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RResult, RString},
};
use channeld_plugin_abi::abi::{
    HostHandle, HostServices_TO, InitSettings, LogLevel, OutboundMessage, PluginMod_Ref, RVerdict,
};
use serde_json::Value;

use crate::{
    host::{AccountLink, HostSink},
    load::LoadError,
    plugin::{BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo, RunningTask},
};

/// A plugin library loaded through the ABI.
pub struct FfiPlugin {
    module: PluginMod_Ref,
    info: PluginInfo,
}

impl FfiPlugin {
    /// Wraps a checked root module, reading its metadata.
    pub fn new(module: PluginMod_Ref, path: &Path) -> Result<Self, LoadError> {
        let meta = (module.metadata())();
        let info = PluginInfo {
            channel_id: meta.channel_id.into_string(),
            display_name: meta.display_name.into_string(),
            plugin_version: meta.plugin_version.into_string(),
            abi_version: meta.abi_version.into_string(),
            rustc_version: meta.rustc_version.into_string(),
        };
        if info.channel_id.is_empty() {
            return Err(LoadError::Metadata {
                path: path.to_owned(),
                reason: "the plugin reports no channel id".into(),
            });
        }
        Ok(Self { module, info })
    }

    /// Calls the plugin's `init` with its plugin-wide host handle.
    pub fn init(
        &self,
        worker_threads: u32,
        max_log_level: LogLevel,
        sink: Arc<dyn HostSink>,
    ) -> Result<(), PluginCallError> {
        let link = AccountLink::for_plugin(&self.info.channel_id, sink);
        let settings = InitSettings {
            worker_threads,
            max_log_level,
            extra: RString::new(),
        };
        self.call("init", (self.module.init())(settings, to_handle(link)))
    }

    fn error(&self, entry: &'static str, message: RString) -> PluginCallError {
        PluginCallError {
            channel: self.info.channel_id.clone(),
            entry,
            message: message.into_string(),
        }
    }

    fn call<T>(
        &self,
        entry: &'static str,
        result: RResult<T, RString>,
    ) -> Result<T, PluginCallError> {
        result.into_result().map_err(|e| self.error(entry, e))
    }

    fn parse_json(&self, entry: &'static str, json: &str) -> Result<Value, PluginCallError> {
        serde_json::from_str(json).map_err(|e| self.error(entry, format!("bad JSON: {e}").into()))
    }
}

fn to_handle(link: AccountLink) -> HostHandle {
    HostServices_TO::from_ptr(RArc::new(link), TD_Opaque)
}

fn to_check(verdict: RVerdict) -> Check {
    if verdict.ok {
        Check::Yes
    } else {
        Check::No(verdict.reason.into_option().map(RString::into_string))
    }
}

impl Plugin for FfiPlugin {
    fn info(&self) -> &PluginInfo {
        &self.info
    }

    fn configure(&self, channel_config: &Value) -> Result<(), PluginCallError> {
        let json = channel_config.to_string();
        self.call("configure", (self.module.configure())(json.as_str().into()))
    }

    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError> {
        let ids = self.call("list_account_ids", (self.module.list_account_ids())())?;
        Ok(ids.into_iter().map(RString::into_string).collect())
    }

    fn default_account_id(&self) -> Result<Option<String>, PluginCallError> {
        let id = self.call("default_account_id", (self.module.default_account_id())())?;
        Ok(id.into_option().map(RString::into_string))
    }

    fn resolve_account(&self, account: &str) -> Result<Value, PluginCallError> {
        let json = self.call(
            "resolve_account",
            (self.module.resolve_account())(account.into()),
        )?;
        self.parse_json("resolve_account", &json)
    }

    fn is_enabled(&self, account: &str) -> Result<Check, PluginCallError> {
        self.call("is_enabled", (self.module.is_enabled())(account.into()))
            .map(to_check)
    }

    fn is_configured(&self, account: &str) -> Result<Check, PluginCallError> {
        self.call(
            "is_configured",
            (self.module.is_configured())(account.into()),
        )
        .map(to_check)
    }

    fn describe_account(&self, account: &str) -> Result<Option<Value>, PluginCallError> {
        let described = self.call(
            "describe_account",
            (self.module.describe_account())(account.into()),
        )?;
        described
            .into_option()
            .map(|json| self.parse_json("describe_account", &json))
            .transpose()
    }

    fn start_account(
        &self,
        account: &str,
        link: AccountLink,
    ) -> Result<RunningTask, PluginCallError> {
        let started = self.call(
            "start_account",
            (self.module.start_account())(account.into(), to_handle(link)),
        )?;
        let done = started.done;
        Ok(RunningTask {
            id: started.id,
            done: Box::pin(async move { done.await.into_result().map_err(RString::into_string) }),
        })
    }

    fn abort_task(&self, task: u64) -> bool {
        (self.module.abort_task())(task)
    }

    fn cancel_task(&self, task: u64) -> bool {
        (self.module.cancel_task())(task)
    }

    fn stop_account(&self, account: &str) -> Result<(), PluginCallError> {
        self.call("stop_account", (self.module.stop_account())(account.into()))
    }

    fn logout(&self, account: &str) -> Result<bool, PluginCallError> {
        self.call("logout", (self.module.logout())(account.into()))
    }

    fn send(&self, message: Outbound) -> BoxFuture<Result<String, PluginCallError>> {
        let future = (self.module.send())(OutboundMessage {
            account: message.account.into(),
            conversation: message.conversation.into(),
            text: message.text.into(),
            reply_to: message.reply_to.unwrap_or_default().into(),
            extra: RString::new(),
        });
        let channel = self.info.channel_id.clone();
        Box::pin(async move {
            future
                .await
                .into_result()
                .map(RString::into_string)
                .map_err(|e| PluginCallError {
                    channel,
                    entry: "send",
                    message: e.into_string(),
                })
        })
    }

    fn shutdown(&self) -> Result<(), PluginCallError> {
        self.call("shutdown", (self.module.shutdown())())
    }
}
