//! The host-side view of a channel plugin. The supervisor drives plugins only through
//! [`Plugin`]: the loaded-library adapter ([`crate::ffi::FfiPlugin`]) implements it, and so can
//! in-process test doubles, so no FFI type reaches the supervisor.

use std::{future::Future, pin::Pin};

use serde_json::Value;

use crate::host::AccountLink;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginInfo {
    /// The channel id: the registry key.
    pub channel_id: String,
    /// A human name.
    pub display_name: String,
    /// The plugin's own version.
    pub plugin_version: String,
    /// The plugin-abi version it was built against.
    pub abi_version: String,
    /// The rustc that built it.
    pub rustc_version: String,
}

/// A call into a plugin failed (it returned an error, or panicked and the fence caught it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel {channel}: {entry} failed: {message}")]
pub struct PluginCallError {
    /// The channel id.
    pub channel: String,
    /// The entry point.
    pub entry: &'static str,
    /// The plugin's message (for a panic: "plugin panicked in …: " and the panic message).
    pub message: String,
}

/// Yes, or no with the plugin's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Yes.
    Yes,
    /// No, with the plugin's reason if it gave one.
    No(Option<String>),
}

/// An account task that has started.
pub struct RunningTask {
    /// The plugin's id for the task.
    pub id: u64,
    /// Completes when the task ends: `Ok` for a clean exit, `Err` with its message otherwise.
    /// Dropping it cancels the task inside the plugin.
    pub done: TaskEnd,
}

/// The future a [`RunningTask`] completes with: a loaded plugin's own FFI future, held as it is
/// (no box of the host's around it: one allocation less per running account), or any boxed
/// future (test doubles, isolated plugins).
pub struct TaskEnd(EndFuture);

enum EndFuture {
    Ffi(channeld_plugin_abi::abi::TaskDone),
    Boxed(BoxFuture<Result<(), String>>),
}

impl TaskEnd {
    /// Wraps any future.
    pub fn boxed(done: impl Future<Output = Result<(), String>> + Send + 'static) -> Self {
        Self(EndFuture::Boxed(Box::pin(done)))
    }

    /// A loaded plugin's future for its task.
    pub(crate) fn ffi(done: channeld_plugin_abi::abi::TaskDone) -> Self {
        Self(EndFuture::Ffi(done))
    }
}

impl Future for TaskEnd {
    type Output = Result<(), String>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            EndFuture::Ffi(done) => Pin::new(done)
                .poll(cx)
                .map(|end| end.into_result().map_err(|e| e.into_string())),
            EndFuture::Boxed(done) => done.as_mut().poll(cx),
        }
    }
}

/// What booting one account did (see [`Plugin::boot_accounts`]).
pub enum BootStep {
    /// Switched off, with the plugin's reason if it gave one; not started.
    Disabled(Option<String>),
    /// Not configured, with the plugin's reason if it gave one; not started.
    NotConfigured(Option<String>),
    /// Enabled, configured and started.
    Started(RunningTask),
}

/// What the status snapshot shows of an account before its first boot (see
/// [`Plugin::account_facts`]); `None` where the plugin failed to say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountFacts {
    /// Whether it is enabled.
    pub enabled: Option<Check>,
    /// The `configured` flag of its description.
    pub configured: Option<bool>,
    /// Why it is not configured, asked only when its description says it is not.
    pub unconfigured_reason: Option<String>,
}

/// The error [`Plugin::boot_accounts`] gives an account whose stop arrived before its start was
/// called (its link's [`AccountLink::stop_requested`]): not started.
pub const STOPPED_BEFORE_START: &str = "stopped before its start was called";

/// A message for a plugin to send.
#[derive(Debug, Clone, Default)]
pub struct Outbound {
    /// The account to send from.
    pub account: String,
    /// Where.
    pub conversation: String,
    /// What.
    pub text: String,
    /// The message it replies to.
    pub reply_to: Option<String>,
    /// Further fields, a JSON object (e.g. a gateway's origin and hop count).
    pub extra: Option<String>,
}

/// A channel plugin as the host uses it. Synchronous entries may block (a plugin can hang): the
/// supervisor calls them off its state owner, with timeouts.
pub trait Plugin: Send + Sync + 'static {
    /// The plugin's metadata.
    fn info(&self) -> &PluginInfo;
    /// Hands the plugin its channel's config table (secrets resolved).
    fn configure(&self, channel_config: &Value) -> Result<(), PluginCallError>;
    /// The account ids the config lists, as the plugin gives them (not yet normalised).
    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError>;
    /// The plugin's default account, if it names one.
    fn default_account_id(&self) -> Result<Option<String>, PluginCallError>;
    /// The account's resolved config.
    fn resolve_account(&self, account: &str) -> Result<Value, PluginCallError>;
    /// Whether the account is enabled.
    fn is_enabled(&self, account: &str) -> Result<Check, PluginCallError>;
    /// Whether the account is configured.
    fn is_configured(&self, account: &str) -> Result<Check, PluginCallError>;
    /// The plugin's description of the account.
    fn describe_account(&self, account: &str) -> Result<Option<Value>, PluginCallError>;
    /// Starts the account's task; `link` is the host-services handle for this generation.
    fn start_account(
        &self,
        account: &str,
        link: AccountLink,
    ) -> Result<RunningTask, PluginCallError>;
    /// Fires the task's cooperative abort signal.
    fn abort_task(&self, task: u64) -> bool;
    /// Cancels the task at its next await point.
    fn cancel_task(&self, task: u64) -> bool;
    /// The plugin's stop hook.
    fn stop_account(&self, account: &str) -> Result<(), PluginCallError>;
    /// Clears the account's credentials; whether anything was cleared.
    fn logout(&self, account: &str) -> Result<bool, PluginCallError>;
    /// Sends a message.
    fn send(&self, message: Outbound) -> BoxFuture<Result<String, PluginCallError>>;
    /// Stops the plugin's runtime.
    fn shutdown(&self) -> Result<(), PluginCallError>;

    /// The stop hook as a future that holds no host thread (ABI 1.1); `None` when the plugin has
    /// only the blocking [`stop_account`](Self::stop_account). Dropping it cancels the hook.
    fn stop_account_async(&self, _account: &str) -> Option<BoxFuture<Result<(), PluginCallError>>> {
        None
    }
    /// The logout hook as a future (ABI 1.1); `None` when the plugin has only the blocking one.
    fn logout_async(&self, _account: &str) -> Option<BoxFuture<Result<bool, PluginCallError>>> {
        None
    }
    /// Checks a channel table before [`configure`](Self::configure) (ABI 1.1); a plugin without
    /// the entry accepts every table.
    fn validate_channel(&self, _channel_config: &Value) -> Result<(), PluginCallError> {
        Ok(())
    }
    /// Starts several accounts in one call, one result per account in order (ABI 1.1 batch;
    /// account by account for a plugin without it). Callers pass at most the channel's startup
    /// fan-out at once.
    fn start_accounts(
        &self,
        batch: Vec<(String, AccountLink)>,
    ) -> Vec<Result<RunningTask, PluginCallError>> {
        batch
            .into_iter()
            .map(|(account, link)| self.start_account(&account, link))
            .collect()
    }
    /// Boots several accounts in one call: for each, in order, whether it is enabled, whether it
    /// is configured and, when both say yes, its start; one result per account, in order. The
    /// default asks account by account and starts the accounts that passed with one
    /// [`start_accounts`](Self::start_accounts) call (a batch of one: one
    /// [`start_account`](Self::start_account) call); an isolated plugin answers the whole batch in
    /// one round trip. Callers pass at most the channel's startup fan-out at once (a batch of k
    /// counts as k booting accounts).
    fn boot_accounts(
        &self,
        batch: Vec<(String, AccountLink)>,
    ) -> Vec<Result<BootStep, PluginCallError>> {
        boot_each(self, batch)
    }
    /// What the status snapshot shows of several accounts before their first boot, one result
    /// per account in order: `is_enabled` (not asked for an account whose flag says the host
    /// already knows it is disabled: then it reads no), the `configured` flag of
    /// `describe_account`, and `is_configured`'s reason when that flag is false. A plugin that
    /// fails to answer a question leaves that field `None`. The default asks account by account;
    /// an isolated plugin answers the whole list in one round trip.
    fn account_facts(&self, accounts: &[(String, bool)]) -> Vec<AccountFacts> {
        accounts
            .iter()
            .map(|(account, disabled)| {
                let enabled = if *disabled {
                    Some(Check::No(None))
                } else {
                    self.is_enabled(account).ok()
                };
                let configured = self
                    .describe_account(account)
                    .ok()
                    .flatten()
                    .and_then(|d| d.get("configured").and_then(Value::as_bool));
                let unconfigured_reason = match configured {
                    Some(false) => match self.is_configured(account) {
                        Ok(Check::No(reason)) => reason,
                        _ => None,
                    },
                    _ => None,
                };
                AccountFacts {
                    enabled,
                    configured,
                    unconfigured_reason,
                }
            })
            .collect()
    }
    /// The account's start has not returned within the stop timeout of its stop (it blocks its
    /// thread): an isolated plugin kills the process the start runs in, which ends the start (and
    /// every other account of that process, restarted under the backoff); returns whether it did.
    /// The default does nothing: in-process, the start is left to return by itself.
    fn abandon_start(&self, _account: &str) -> bool {
        false
    }
    /// Fires the abort signal of several tasks; how many were still known.
    fn abort_tasks(&self, tasks: &[u64]) -> usize {
        tasks.iter().filter(|task| self.abort_task(**task)).count()
    }
    /// Whether the plugin reports the first poll of each account task through its host link
    /// (ABI 1.1): then an account counts as running only from that report, not from the moment
    /// its start returned.
    fn reports_task_polled(&self) -> bool {
        false
    }
    /// How the plugin is isolated from the daemon: `None` when it runs in the daemon's process.
    fn isolation(&self) -> Option<crate::isolate::IsolationInfo> {
        None
    }
}

/// [`Plugin::boot_accounts`]' default, for an implementation that wraps it: for each account in
/// order, enabled? configured?; then one [`Plugin::start_accounts`] call for the accounts that
/// passed (for a batch of one, [`Plugin::start_account`]), leaving out any whose stop arrived
/// meanwhile (its link's [`AccountLink::stop_requested`]; its result is
/// [`STOPPED_BEFORE_START`]).
pub fn boot_each<P: Plugin + ?Sized>(
    plugin: &P,
    batch: Vec<(String, AccountLink)>,
) -> Vec<Result<BootStep, PluginCallError>> {
    if batch.len() == 1 {
        // One account (a restart's boot, most of the time): its start goes through the plugin's
        // single entry, without the batch's vectors.
        return batch
            .into_iter()
            .map(|(account, link)| match boot_check(plugin, &account)? {
                Some(step) => Ok(step),
                None if link.stop_requested() => Err(stopped_before_start(plugin)),
                None => plugin.start_account(&account, link).map(BootStep::Started),
            })
            .collect();
    }
    let mut steps: Vec<Option<Result<BootStep, PluginCallError>>> = Vec::with_capacity(batch.len());
    let mut starts = Vec::with_capacity(batch.len());
    for (account, link) in batch {
        match boot_check(plugin, &account) {
            Ok(None) => {
                starts.push((steps.len(), (account, link)));
                steps.push(None);
            }
            Ok(Some(step)) => steps.push(Some(Ok(step))),
            Err(error) => steps.push(Some(Err(error))),
        }
    }
    // A stop that landed while the batch was checked: that account is not started.
    starts.retain(|(slot, (_, link))| {
        let stopped = link.stop_requested();
        if stopped {
            steps[*slot] = Some(Err(stopped_before_start(plugin)));
        }
        !stopped
    });
    let (slots, batch): (Vec<usize>, Vec<_>) = starts.into_iter().unzip();
    for (slot, started) in slots.into_iter().zip(plugin.start_accounts(batch)) {
        steps[slot] = Some(started.map(BootStep::Started));
    }
    steps
        .into_iter()
        .map(|step| {
            step.unwrap_or_else(|| {
                Err(PluginCallError {
                    channel: plugin.info().channel_id.clone(),
                    entry: "start_accounts",
                    message: "the plugin returned fewer results than accounts".into(),
                })
            })
        })
        .collect()
}

/// Whether the account may start: `Some` with what it is instead (disabled, not configured),
/// `None` when both checks say yes.
fn boot_check<P: Plugin + ?Sized>(
    plugin: &P,
    account: &str,
) -> Result<Option<BootStep>, PluginCallError> {
    match plugin.is_enabled(account)? {
        Check::No(reason) => Ok(Some(BootStep::Disabled(reason))),
        Check::Yes => Ok(match plugin.is_configured(account)? {
            Check::No(reason) => Some(BootStep::NotConfigured(reason)),
            Check::Yes => None,
        }),
    }
}

/// The result of an account whose stop landed while its boot was checked: not started.
fn stopped_before_start<P: Plugin + ?Sized>(plugin: &P) -> PluginCallError {
    PluginCallError {
        channel: plugin.info().channel_id.clone(),
        entry: "start_accounts",
        message: STOPPED_BEFORE_START.into(),
    }
}
