//! # channeld-plugin-test: run a channel plugin in a test
//!
//! Runs a [`ChannelPlugin`] in process, on the test's own tokio runtime, without channeld and
//! without building a `.so`: the test names the plugin's type, gives the channel's TOML table,
//! starts an account and watches what the plugin hands the host.
//!
//! ```
//! use channeld_plugin_abi::sdk::prelude::*;
//! use channeld_plugin_test::{Harness, secs};
//!
//! #[derive(Default)]
//! struct Hello;
//!
//! impl ChannelPlugin for Hello {
//!     const CHANNEL_ID: &'static str = "hello";
//!     async fn start(&self, ctx: AccountContext) -> PluginResult {
//!         ctx.host().set_connected(true);
//!         let greeting = ctx.account().get("greeting").and_then(Value::as_str).unwrap_or("hi");
//!         ctx.deliver(Inbound::new("lobby", "bot", greeting)).await?;
//!         ctx.aborted().await;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // In a test: #[tokio::test(start_paused = true)] async fn greets() { … }
//! let harness = Harness::new(Hello, r#"
//!     [accounts.main]
//!     greeting = "hello"
//! "#).unwrap();
//! let mut account = harness.start("main").unwrap();
//! account.wait_until(secs(5), |r| r.delivered.len() == 1).await.unwrap();
//! assert_eq!(account.record().delivered[0].text, "hello");
//! assert_eq!(account.record().connectivity, [true]);
//! account.abort_within(secs(5)).await.unwrap().unwrap();
//! # }
//! ```
//!
//! ## What it does like the host, and what it does not
//! * The TOML table is the channel's `[channels.<id>]` table. The host-owned keys
//!   ([`RESERVED_KEYS`]) are removed before the plugin sees it, as channeld does; an account
//!   whose table says `enabled = false` is refused by [`Harness::start`].
//! * [`Harness::start`] runs `validate`, then `resolve_account`, `is_enabled`, `is_configured`
//!   and `start`, as the host does; a refusal is a [`HarnessError`] carrying the reason.
//! * The plugin's hooks run on the runtime the test runs on (not on a runtime of the SDK's own,
//!   as under channeld), so `#[tokio::test(start_paused = true)]` pauses the plugin's clock too.
//! * Outbound messages reach the plugin through its `send` hook, the entry the host calls
//!   ([`Harness::send`], [`RunningAccount::send`]); with the default hook, they reach the
//!   account's `ctx.outbound()` queue. Each harness has its own queues, so tests side by side
//!   with an account of the same name do not reach each other's.
//! * Everything the plugin reports is recorded in a [`Record`]: delivered messages, status
//!   patches, connectivity, traffic events, busy counts. [`Harness::logs`] has the plugin's
//!   `tracing` events, tagged with the account when they come from its task or a task it spawned
//!   with `ctx.spawn`.
//! * A panic in a hook becomes an error carrying the panic message, as under channeld.
//!
//! Logs are captured through a thread-local `tracing` subscriber plus one attached to the
//! account's task: with the default current-thread runtime of `#[tokio::test]` every event is
//! seen; on a multi-thread runtime, events of tasks the plugin spawns may be missed.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RResult, RStr, RString},
};
use async_ffi::{FfiFuture, FutureExt as _};
use channeld_plugin_abi::{
    abi::{EventKind, HostServices, HostServices_TO, InboundMessage, LogRecord},
    sdk::{
        __private::harness, Account, ChannelConfig, ChannelPlugin, Inbound, Outbound, PluginError,
        PluginResult, Verdict,
    },
};
use serde_json::{Map, Value};
use tokio::{sync::Notify, task::JoinHandle};

mod logs;

pub use logs::LogLine;

/// The keys channeld owns in a channel's and an account's table, removed before the plugin sees
/// them (the same list as channeld's; see its `docs/reserved-keys.md`).
pub const RESERVED_KEYS: &[&str] = &[
    "enabled",
    "health_monitor",
    "isolation",
    "memory_limit",
    "worker_threads",
    "runtime_shutdown_timeout",
    "starvation_threshold",
];

/// `Duration::from_secs`, for short deadlines in tests.
pub const fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

/// Why the harness could not do what the test asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The TOML the test gave is not a table.
    #[error("channel {channel}: the test's TOML: {reason}")]
    Toml {
        /// The plugin's channel id.
        channel: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A hook returned an error (or panicked).
    #[error("{channel}:{account}: {hook} failed: {reason}")]
    Hook {
        /// The plugin's channel id.
        channel: String,
        /// The account (empty for channel-wide hooks such as `validate`).
        account: String,
        /// The hook: `validate`, `resolve_account`, ….
        hook: &'static str,
        /// The plugin's message.
        reason: String,
    },
    /// The account is switched off (`enabled = false`) or the plugin says so.
    #[error("{channel}:{account}: not enabled{}", reason_suffix(.reason))]
    Disabled {
        /// The plugin's channel id.
        channel: String,
        /// The account.
        account: String,
        /// The plugin's reason, if it gave one.
        reason: Option<String>,
    },
    /// The plugin says the account lacks what it needs to start.
    #[error("{channel}:{account}: not configured{}", reason_suffix(.reason))]
    NotConfigured {
        /// The plugin's channel id.
        channel: String,
        /// The account.
        account: String,
        /// The plugin's reason, if it gave one.
        reason: Option<String>,
    },
    /// The account's task (or a task it spawned) did not end within the deadline.
    #[error(
        "{channel}:{account}: not ended {after:?} after {what}: {}{spawned} spawned task(s) still running",
        if *.task_running { "the account's task and " } else { "" }
    )]
    NotEnded {
        /// The plugin's channel id.
        channel: String,
        /// The account.
        account: String,
        /// What the harness waited after (`the abort`, `start`).
        what: &'static str,
        /// The deadline.
        after: Duration,
        /// Whether the future `start` returned was still running.
        task_running: bool,
        /// How many tasks spawned with `ctx.spawn` were still running.
        spawned: usize,
    },
    /// A condition the test waited for did not hold by the deadline.
    #[error("{channel}:{account}: condition not met within {after:?}; record: {record}")]
    Timeout {
        /// The plugin's channel id.
        channel: String,
        /// The account.
        account: String,
        /// The deadline.
        after: Duration,
        /// The record at the deadline, for the failure message.
        record: String,
    },
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

/// A plugin under test, with its channel's config.
///
/// Create it inside the test's tokio runtime. It holds a thread-local log subscriber, so it is
/// not `Send`: keep it in the test's own task.
pub struct Harness<P: ChannelPlugin> {
    plugin: Arc<P>,
    /// This harness's accounts' outbound queues (`ctx.outbound()`), apart from other harnesses'.
    sends: harness::SendScope,
    config: ChannelConfig,
    disabled: Option<Vec<String>>,
    logs: logs::Capture,
    _log_guard: tracing::dispatcher::DefaultGuard,
}

impl<P: ChannelPlugin> Harness<P> {
    /// The plugin with `toml` as its channel's table (`[channels.<id>]` without the header:
    /// `[accounts.main]` and so on).
    pub fn new(plugin: P, toml: &str) -> Result<Self, HarnessError> {
        let table: toml::Table = toml
            .parse()
            .map_err(|e: toml::de::Error| HarnessError::Toml {
                channel: P::CHANNEL_ID.to_owned(),
                reason: e.to_string().lines().next().unwrap_or_default().to_owned(),
            })?;
        let json = serde_json::to_value(table).map_err(|e| HarnessError::Toml {
            channel: P::CHANNEL_ID.to_owned(),
            reason: e.to_string(),
        })?;
        let disabled = disabled_accounts(&json);
        let mut stripped = json;
        strip_reserved(&mut stripped);
        let config =
            ChannelConfig::from_json(P::CHANNEL_ID, &stripped.to_string()).map_err(|e| {
                HarnessError::Toml {
                    channel: P::CHANNEL_ID.to_owned(),
                    reason: e.message().to_owned(),
                }
            })?;
        let logs = logs::Capture::default();
        let guard = tracing::dispatcher::set_default(&logs.dispatch());
        Ok(Self {
            plugin: Arc::new(plugin),
            sends: harness::SendScope::default(),
            config,
            disabled,
            logs,
            _log_guard: guard,
        })
    }

    /// The plugin.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    /// The channel's table as the plugin sees it (host-owned keys removed).
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// Runs the plugin's `validate` on the channel's table, as the host does before applying it.
    pub fn validate(&self) -> Result<(), HarnessError> {
        self.sync_hook("", "validate", |p, c| p.validate(c))
    }

    /// The account's table as the plugin resolves it.
    pub fn resolve(&self, account: &str) -> Result<Account, HarnessError> {
        self.sync_hook(account, "resolve_account", |p, c| {
            p.resolve_account(c, account)
        })
    }

    /// Starts `account` as the host does: `validate`, `resolve_account`, `is_enabled`,
    /// `is_configured`, then `start` as a task on the current runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(&self, account: &str) -> Result<RunningAccount<P>, HarnessError> {
        self.validate()?;
        let resolved = self.resolve(account)?;
        let channel = P::CHANNEL_ID.to_owned();
        let off = self.disabled.as_ref().is_none_or(|accounts| {
            accounts.contains(&channeld_plugin_abi::normalize_account_id(account))
        });
        if off {
            return Err(HarnessError::Disabled {
                channel,
                account: account.to_owned(),
                reason: Some("disabled".to_owned()),
            });
        }
        if let Verdict::No(reason) =
            self.sync_hook(account, "is_enabled", |p, _| Ok(p.is_enabled(&resolved)))?
        {
            return Err(HarnessError::Disabled {
                channel,
                account: account.to_owned(),
                reason,
            });
        }
        if let Verdict::No(reason) = self.sync_hook(account, "is_configured", |p, _| {
            Ok(p.is_configured(&resolved))
        })? {
            return Err(HarnessError::NotConfigured {
                channel,
                account: account.to_owned(),
                reason,
            });
        }
        let recorder = Arc::new(Recorder::default());
        let host = HostServices_TO::from_ptr(RArc::new(Link(recorder.clone())), TD_Opaque);
        let (ctx, controls) = harness::account_context(resolved, host, &self.sends);
        let plugin = self.plugin.clone();
        let task_done = Arc::new(AtomicBool::new(false));
        let done = task_done.clone();
        let task = controls.run(async move {
            let result = plugin.start(ctx).await;
            done.store(true, Ordering::SeqCst);
            result
        });
        let join = tokio::spawn(self.logs.attach(task));
        Ok(RunningAccount {
            plugin: self.plugin.clone(),
            sends: self.sends.clone(),
            account: account.to_owned(),
            recorder,
            controls,
            task_done,
            join: Some(join),
            logs: self.logs.clone(),
        })
    }

    /// Hands the plugin an outbound message through its `send` hook, as the host does; returns
    /// the channel's id for the sent message. `message.account` names the account.
    ///
    /// # Cancellation safety
    /// Dropping the future leaves the `send` running to its end, like the host does.
    pub async fn send(&self, message: Outbound) -> Result<String, HarnessError> {
        send_via(&self.plugin, &self.sends, message).await
    }

    /// Runs the plugin's `stop` hook for `account` (the host calls it after the abort).
    pub async fn stop(&self, account: &str) -> Result<(), HarnessError> {
        let resolved = self.resolve(account)?;
        let plugin = self.plugin.clone();
        run_hook::<P, _>(account, "stop", async move { plugin.stop(resolved).await }).await
    }

    /// Runs the plugin's `logout` hook for `account`.
    pub async fn logout(&self, account: &str) -> Result<bool, HarnessError> {
        let resolved = self.resolve(account)?;
        let plugin = self.plugin.clone();
        run_hook::<P, _>(
            account,
            "logout",
            async move { plugin.logout(resolved).await },
        )
        .await
    }

    /// Every `tracing` event the plugin emitted since the harness was created.
    pub fn logs(&self) -> Vec<LogLine> {
        self.logs.lines()
    }

    fn sync_hook<T>(
        &self,
        account: &str,
        hook: &'static str,
        f: impl FnOnce(&P, &ChannelConfig) -> PluginResult<T>,
    ) -> Result<T, HarnessError> {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(&self.plugin, &self.config)
        }));
        let result = match caught {
            Ok(result) => result.map_err(|e| e.message().to_owned()),
            Err(payload) => Err(format!("plugin panicked: {}", panic_text(&*payload))),
        };
        result.map_err(|reason| hook_error::<P>(account, hook, reason))
    }
}

fn hook_error<P: ChannelPlugin>(account: &str, hook: &'static str, reason: String) -> HarnessError {
    HarnessError::Hook {
        channel: P::CHANNEL_ID.to_owned(),
        account: account.to_owned(),
        hook,
        reason,
    }
}

/// Runs an async hook as a task of its own (so a panic is caught, as the SDK does for the host).
async fn run_hook<P: ChannelPlugin, T: Send + 'static>(
    account: &str,
    hook: &'static str,
    future: impl Future<Output = PluginResult<T>> + Send + 'static,
) -> Result<T, HarnessError> {
    let joined = tokio::spawn(future).await;
    let result = match joined {
        Ok(result) => result.map_err(|e| e.message().to_owned()),
        Err(e) if e.is_panic() => Err(format!("plugin panicked: {}", panic_text(&*e.into_panic()))),
        Err(_) => Err("cancelled".to_owned()),
    };
    result.map_err(|reason| hook_error::<P>(account, hook, reason))
}

async fn send_via<P: ChannelPlugin>(
    plugin: &Arc<P>,
    sends: &harness::SendScope,
    message: Outbound,
) -> Result<String, HarnessError> {
    let plugin = plugin.clone();
    let account = message.account.clone();
    let send = sends.run(async move { plugin.send(message).await });
    run_hook::<P, _>(&account, "send", send).await
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn strip_map(map: &mut Map<String, Value>) {
    for key in RESERVED_KEYS {
        map.remove(*key);
    }
}

fn strip_reserved(table: &mut Value) {
    if let Value::Object(channel) = table {
        strip_map(channel);
        if let Some(Value::Object(accounts)) = channel.get_mut("accounts") {
            for account in accounts.values_mut() {
                if let Value::Object(account) = account {
                    strip_map(account);
                }
            }
        }
    }
}

/// The accounts `enabled = false` switches off (`None`: the whole channel is off).
fn disabled_accounts(table: &Value) -> Option<Vec<String>> {
    let off = |t: &Value| t.get("enabled").and_then(Value::as_bool) == Some(false);
    if off(table) {
        return None;
    }
    Some(
        table
            .get("accounts")
            .and_then(Value::as_object)
            .map(|accounts| {
                accounts
                    .iter()
                    .filter(|(_, t)| off(t))
                    .map(|(k, _)| channeld_plugin_abi::normalize_account_id(k))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Everything one account's task reported to the host, in order.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Messages handed over with `deliver` (either form), in order.
    pub delivered: Vec<Inbound>,
    /// Every status patch, in order.
    pub patches: Vec<Value>,
    /// The status: every patch merged, key by key.
    pub status: Map<String, Value>,
    /// Every `set_connected` call, in order.
    pub connectivity: Vec<bool>,
    /// Every `record_event` call, in order (a delivery counts as inbound traffic for channeld
    /// without one; it is not listed here).
    pub events: Vec<EventKind>,
    /// Every `set_busy` call, in order.
    pub busy: Vec<u32>,
}

impl Record {
    /// The last reported connectivity, if any.
    pub fn connected(&self) -> Option<bool> {
        self.connectivity.last().copied()
    }
}

#[derive(Default)]
struct Recorder {
    record: Mutex<Record>,
    refusal: Mutex<Option<String>>,
    changed: Notify,
}

impl Recorder {
    fn update(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> Record {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn deliver(&self, message: InboundMessage) -> Result<u64, String> {
        if let Some(reason) = self
            .refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(reason);
        }
        let inbound = Inbound {
            conversation: message.conversation.into_string(),
            sender: message.sender.into_string(),
            text: message.text.into_string(),
            id: message.id.into_string(),
            time_ms: message.time_ms,
            extra: serde_json::from_str(message.extra.as_str()).ok(),
        };
        let mut seq = 0;
        self.update(|r| {
            r.delivered.push(inbound);
            seq = r.delivered.len() as u64;
        });
        Ok(seq)
    }
}

/// The host side of the account's link: records every call.
#[derive(Clone)]
struct Link(Arc<Recorder>);

impl HostServices for Link {
    fn log(&self, _record: LogRecord) {
        // The SDK forwards logs through this only under channeld; the harness reads `tracing`.
    }

    fn status(&self) -> RString {
        Value::Object(self.0.snapshot().status).to_string().into()
    }

    fn patch_status(&self, patch: RStr<'_>) -> RResult<(), RString> {
        match serde_json::from_str::<Value>(patch.as_str()) {
            Ok(Value::Object(map)) => {
                self.0.update(|r| {
                    r.patches.push(Value::Object(map.clone()));
                    r.status.extend(map);
                });
                RResult::ROk(())
            }
            _ => RResult::RErr("a status patch must be a JSON object".into()),
        }
    }

    fn set_connected(&self, connected: bool) {
        self.0.update(|r| r.connectivity.push(connected));
    }

    fn record_event(&self, kind: EventKind) {
        self.0.update(|r| r.events.push(kind));
    }

    fn set_busy(&self, active_runs: u32) {
        self.0.update(|r| r.busy.push(active_runs));
    }

    fn deliver(&self, message: InboundMessage) -> RResult<(), RString> {
        self.0
            .deliver(message)
            .map(|_| ())
            .map_err(RString::from)
            .into()
    }

    fn is_current(&self) -> bool {
        true
    }

    fn deliver_async(&self, message: InboundMessage) -> FfiFuture<RResult<u64, RString>> {
        let result: RResult<u64, RString> = self.0.deliver(message).map_err(RString::from).into();
        std::future::ready(result).into_ffi()
    }
}

/// An account the harness started: what it reported, and control over its end.
///
/// Dropping it cancels the account's task at its next await point.
pub struct RunningAccount<P: ChannelPlugin> {
    plugin: Arc<P>,
    sends: harness::SendScope,
    account: String,
    recorder: Arc<Recorder>,
    controls: harness::Controls,
    task_done: Arc<AtomicBool>,
    join: Option<JoinHandle<PluginResult>>,
    logs: logs::Capture,
}

impl<P: ChannelPlugin> RunningAccount<P> {
    /// The account id.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// What the account has reported so far.
    pub fn record(&self) -> Record {
        self.recorder.snapshot()
    }

    /// Makes the host refuse every later delivery with `reason` (`None`: accept again), as
    /// channeld does when it cannot store a message.
    pub fn refuse_deliveries(&self, reason: Option<&str>) {
        *self
            .recorder
            .refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reason.map(str::to_owned);
    }

    /// Waits until `condition` holds for the record, at most `deadline` (of the runtime's clock:
    /// a paused clock jumps ahead when every task is idle).
    ///
    /// # Cancellation safety
    /// Cancel-safe: it only reads.
    pub async fn wait_until(
        &self,
        deadline: Duration,
        mut condition: impl FnMut(&Record) -> bool,
    ) -> Result<(), HarnessError> {
        let waited = tokio::time::timeout(deadline, async {
            loop {
                let changed = self.recorder.changed.notified();
                if condition(&self.recorder.snapshot()) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        waited.map_err(|_| HarnessError::Timeout {
            channel: P::CHANNEL_ID.to_owned(),
            account: self.account.clone(),
            after: deadline,
            record: format!("{:?}", self.recorder.snapshot()),
        })
    }

    /// Hands the plugin an outbound message from this account through its `send` hook (the
    /// entry the host calls); returns the channel's id for it.
    ///
    /// # Cancellation safety
    /// Dropping the future leaves the `send` running to its end, like the host does.
    pub async fn send(
        &self,
        conversation: impl Into<String>,
        text: impl Into<String>,
    ) -> Result<String, HarnessError> {
        self.send_message(Outbound {
            account: self.account.clone(),
            conversation: conversation.into(),
            text: text.into(),
            ..Outbound::default()
        })
        .await
    }

    /// Like [`send`](Self::send), with every field of the message given.
    ///
    /// # Cancellation safety
    /// As for [`send`](Self::send).
    pub async fn send_message(&self, message: Outbound) -> Result<String, HarnessError> {
        send_via(&self.plugin, &self.sends, message).await
    }

    /// Whether the account's task (with everything it spawned) has ended.
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Tasks the account spawned with `ctx.spawn` that are still running.
    pub fn spawned_running(&self) -> usize {
        self.controls.spawned_running()
    }

    /// Fires the abort, as the host does to stop the account, and waits at most `deadline` for
    /// the task and every task it spawned with `ctx.spawn` to end. The outer error says what did
    /// not end; the inner result is what `start` returned.
    ///
    /// # Cancellation safety
    /// Dropping the future leaves the abort fired; the task keeps ending on its own.
    pub async fn abort_within(&mut self, deadline: Duration) -> Result<PluginResult, HarnessError> {
        self.controls.abort();
        self.join_within_after(deadline, "the abort").await
    }

    /// Waits at most `deadline` for the task to end by itself (a failing connection, say),
    /// without firing the abort.
    ///
    /// # Cancellation safety
    /// Cancel-safe: the task keeps running and can be waited for again.
    pub async fn join_within(&mut self, deadline: Duration) -> Result<PluginResult, HarnessError> {
        self.join_within_after(deadline, "start").await
    }

    async fn join_within_after(
        &mut self,
        deadline: Duration,
        what: &'static str,
    ) -> Result<PluginResult, HarnessError> {
        let Some(join) = self.join.as_mut() else {
            return Ok(Err(PluginError::new(
                "the account's task was already joined",
            )));
        };
        let joined = match tokio::time::timeout(deadline, join).await {
            Ok(joined) => joined,
            Err(_) => {
                return Err(HarnessError::NotEnded {
                    channel: P::CHANNEL_ID.to_owned(),
                    account: self.account.clone(),
                    what,
                    after: deadline,
                    task_running: !self.task_done.load(Ordering::SeqCst),
                    spawned: self.controls.spawned_running(),
                });
            }
        };
        self.join = None;
        Ok(match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(PluginError::new(format!(
                "plugin panicked in the account task: {}",
                panic_text(&*e.into_panic())
            ))),
            Err(_) => Err(PluginError::new("cancelled")),
        })
    }

    /// Every `tracing` event the harness captured (of every account), as [`Harness::logs`].
    pub fn logs(&self) -> Vec<LogLine> {
        self.logs.lines()
    }
}

impl<P: ChannelPlugin> Drop for RunningAccount<P> {
    fn drop(&mut self) {
        self.controls.abort();
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

#[cfg(test)]
mod tests;

/// channeld's guide for plugin authors (`docs/writing-a-plugin.md`), included so that its Rust
/// blocks are compiled and run as doc tests of this crate and cannot drift from the SDK.
#[doc = include_str!("../../docs/writing-a-plugin.md")]
#[cfg(doctest)]
pub struct WritingAPluginGuide;
