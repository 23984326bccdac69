//! The adapter from a loaded root module to the host-side [`Plugin`] trait. Safe code only: the
//! root module's entries are safe `extern "C"` fns that fence panics inside the plugin.
//!
//! A 1.1 plugin is driven through its 1.1 entries (async stop and logout, validation, batches,
//! `task_polled`); a 1.0 plugin, seen through the frozen 1.0 layout, gets a 1.0 host-services
//! handle and is driven the 1.0 way (its entries the 1.1 layout appended read as absent).

use std::{path::Path, sync::Arc};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RResult, RString, RVec},
};
use channeld_plugin_abi::abi::{
    AccountStart, HOST_ABI_VERSION_KEY, HostHandle, HostServices_TO, InitSettings, LogLevel,
    OutboundMessage, RVerdict, StartedTask, v1_0,
};
use serde_json::Value;

use crate::{
    host::{AccountLink, HostSink},
    load::{LoadError, PluginModule, host_abi_version},
    plugin::{BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo, RunningTask},
};

/// Calls an entry both layouts have (same signature in 1.0 and 1.1).
macro_rules! entry {
    ($self:ident . $name:ident) => {
        match &$self.module {
            PluginModule::V1_1(m) => m.$name(),
            PluginModule::V1_0(m) => m.$name(),
        }
    };
}

/// A plugin library loaded through the ABI.
pub struct FfiPlugin {
    module: PluginModule,
    info: PluginInfo,
    /// The channel id, shared with the futures of its async entries (a stop hook's or a send's
    /// error names it; taking it copies nothing).
    channel: Arc<str>,
}

impl FfiPlugin {
    /// Wraps a checked root module, reading its metadata.
    pub fn new(module: PluginModule, path: &Path) -> Result<Self, LoadError> {
        let meta = match &module {
            PluginModule::V1_1(m) => (m.metadata())(),
            PluginModule::V1_0(m) => (m.metadata())(),
        };
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
        let channel = info.channel_id.as_str().into();
        Ok(Self {
            module,
            info,
            channel,
        })
    }

    /// Whether the plugin was built against plugin-abi 1.0 (and is driven the 1.0 way).
    pub fn is_abi_1_0(&self) -> bool {
        matches!(self.module, PluginModule::V1_0(_))
    }

    /// Calls the plugin's `init` with its plugin-wide host handle. The settings state the host's
    /// plugin-abi version, which a plugin of a newer minor checks for.
    pub fn init(
        &self,
        worker_threads: u32,
        max_log_level: LogLevel,
        sink: Arc<dyn HostSink>,
    ) -> Result<(), PluginCallError> {
        self.init_with(worker_threads, max_log_level, sink, serde_json::Map::new())
    }

    /// [`FfiPlugin::init`], with further keys for `InitSettings.extra` (the runtime's settings,
    /// [`crate::runtime_settings`]).
    pub fn init_with(
        &self,
        worker_threads: u32,
        max_log_level: LogLevel,
        sink: Arc<dyn HostSink>,
        mut extra: serde_json::Map<String, Value>,
    ) -> Result<(), PluginCallError> {
        let link = AccountLink::for_plugin(&self.info.channel_id, sink);
        extra.insert(HOST_ABI_VERSION_KEY.into(), host_abi_version().into());
        let settings = InitSettings {
            worker_threads,
            max_log_level,
            extra: Value::Object(extra).to_string().into(),
        };
        let result = match &self.module {
            PluginModule::V1_1(m) => (m.init())(settings, to_handle(link)),
            PluginModule::V1_0(m) => (m.init())(settings, to_handle_1_0(link)),
        };
        self.call("init", result)
    }

    fn running_task(started: StartedTask) -> RunningTask {
        RunningTask {
            id: started.id,
            done: crate::plugin::TaskEnd::ffi(started.done),
        }
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

fn to_handle_1_0(link: AccountLink) -> v1_0::HostHandle {
    v1_0::HostServices_TO::from_ptr(RArc::new(link), TD_Opaque)
}

fn call_error(channel: &str, entry: &'static str, message: RString) -> PluginCallError {
    PluginCallError {
        channel: channel.to_owned(),
        entry,
        message: message.into_string(),
    }
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
        self.call("configure", (entry!(self.configure))(json.as_str().into()))
    }

    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError> {
        let ids = self.call("list_account_ids", (entry!(self.list_account_ids))())?;
        Ok(ids.into_iter().map(RString::into_string).collect())
    }

    fn default_account_id(&self) -> Result<Option<String>, PluginCallError> {
        let id = self.call("default_account_id", (entry!(self.default_account_id))())?;
        Ok(id.into_option().map(RString::into_string))
    }

    fn resolve_account(&self, account: &str) -> Result<Value, PluginCallError> {
        let json = self.call(
            "resolve_account",
            (entry!(self.resolve_account))(account.into()),
        )?;
        self.parse_json("resolve_account", &json)
    }

    fn is_enabled(&self, account: &str) -> Result<Check, PluginCallError> {
        self.call("is_enabled", (entry!(self.is_enabled))(account.into()))
            .map(to_check)
    }

    fn is_configured(&self, account: &str) -> Result<Check, PluginCallError> {
        self.call(
            "is_configured",
            (entry!(self.is_configured))(account.into()),
        )
        .map(to_check)
    }

    fn describe_account(&self, account: &str) -> Result<Option<Value>, PluginCallError> {
        let described = self.call(
            "describe_account",
            (entry!(self.describe_account))(account.into()),
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
        let started = match &self.module {
            PluginModule::V1_1(m) => (m.start_account())(account.into(), to_handle(link)),
            PluginModule::V1_0(m) => (m.start_account())(account.into(), to_handle_1_0(link)),
        };
        self.call("start_account", started).map(Self::running_task)
    }

    fn abort_task(&self, task: u64) -> bool {
        (entry!(self.abort_task))(task)
    }

    fn cancel_task(&self, task: u64) -> bool {
        (entry!(self.cancel_task))(task)
    }

    fn stop_account(&self, account: &str) -> Result<(), PluginCallError> {
        self.call("stop_account", (entry!(self.stop_account))(account.into()))
    }

    fn logout(&self, account: &str) -> Result<bool, PluginCallError> {
        self.call("logout", (entry!(self.logout))(account.into()))
    }

    fn send(&self, message: Outbound) -> BoxFuture<Result<String, PluginCallError>> {
        let future = (entry!(self.send))(OutboundMessage {
            account: message.account.into(),
            conversation: message.conversation.into(),
            text: message.text.into(),
            reply_to: message.reply_to.unwrap_or_default().into(),
            extra: message.extra.unwrap_or_default().into(),
        });
        let channel = self.channel.clone();
        Box::pin(async move {
            future
                .await
                .into_result()
                .map(RString::into_string)
                .map_err(|e| call_error(&channel, "send", e))
        })
    }

    fn shutdown(&self) -> Result<(), PluginCallError> {
        self.call("shutdown", (entry!(self.shutdown))())
    }

    fn stop_account_async(&self, account: &str) -> Option<BoxFuture<Result<(), PluginCallError>>> {
        let PluginModule::V1_1(m) = &self.module else {
            return None;
        };
        let future = (m.stop_account_async()?)(account.into());
        let channel = self.channel.clone();
        Some(Box::pin(async move {
            future
                .await
                .into_result()
                .map_err(|e| call_error(&channel, "stop_account", e))
        }))
    }

    fn logout_async(&self, account: &str) -> Option<BoxFuture<Result<bool, PluginCallError>>> {
        let PluginModule::V1_1(m) = &self.module else {
            return None;
        };
        let future = (m.logout_async()?)(account.into());
        let channel = self.channel.clone();
        Some(Box::pin(async move {
            future
                .await
                .into_result()
                .map_err(|e| call_error(&channel, "logout", e))
        }))
    }

    fn validate_channel(&self, channel_config: &Value) -> Result<(), PluginCallError> {
        let PluginModule::V1_1(m) = &self.module else {
            return Ok(());
        };
        let Some(validate) = m.validate_channel() else {
            return Ok(());
        };
        let json = channel_config.to_string();
        self.call("validate_channel", validate(json.as_str().into()))
    }

    fn start_accounts(
        &self,
        batch: Vec<(String, AccountLink)>,
    ) -> Vec<Result<RunningTask, PluginCallError>> {
        let batch_entry = match &self.module {
            PluginModule::V1_1(m) => m.start_accounts(),
            PluginModule::V1_0(_) => None,
        };
        let Some(start_accounts) = batch_entry else {
            return batch
                .into_iter()
                .map(|(account, link)| self.start_account(&account, link))
                .collect();
        };
        let count = batch.len();
        let items: RVec<AccountStart> = batch
            .into_iter()
            .map(|(account, link)| AccountStart {
                account: account.into(),
                host: to_handle(link),
            })
            .collect();
        let mut results: Vec<_> = start_accounts(items)
            .into_iter()
            .map(|r| self.call("start_accounts", r).map(Self::running_task))
            .collect();
        // A plugin that answers for fewer accounts than it was given: the rest failed.
        while results.len() < count {
            results.push(Err(self.error(
                "start_accounts",
                "the plugin returned no result for this account".into(),
            )));
        }
        results.truncate(count);
        results
    }

    fn abort_tasks(&self, tasks: &[u64]) -> usize {
        match &self.module {
            PluginModule::V1_1(m) => match m.abort_tasks() {
                Some(abort_tasks) => abort_tasks(tasks.into()) as usize,
                None => tasks.iter().filter(|t| (m.abort_task())(**t)).count(),
            },
            PluginModule::V1_0(m) => tasks.iter().filter(|t| (m.abort_task())(**t)).count(),
        }
    }

    fn reports_task_polled(&self) -> bool {
        !self.is_abi_1_0()
    }
}
