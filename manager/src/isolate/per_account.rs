//! `isolation = "process-per-account"`: every account of the channel runs in a child process of
//! its own, so one account's crash (or a hang the stop timeout ends with a kill) never ends
//! another account of the channel.
//!
//! [`PerAccountPlugin`] is the [`Plugin`] the supervisor drives. A *control* child (the one the
//! plugin file was loaded in) answers the channel's calls: validate, configure, the account
//! listing and checks, descriptions. Each account gets its child at its first start (or send, or
//! logout), configured with the channel's last table; its calls (start, stop hook, abort, cancel,
//! send, logout) go there. A dead account child is replaced at the account's next call, like the
//! child of `isolation = "process"`; the others keep running. Task ids are the host's own, mapped
//! to the account's child and its id for the task. Every child ends when the version is retired
//! or the daemon stops. A batched boot checks the whole batch in one round trip to the control
//! child, then starts each account that passed in its own child.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::Value;

use super::{ChildSpec, IsolatedPlugin, IsolationInfo};
use crate::{
    host::{AccountLink, HostSink},
    plugin::{
        AccountFacts, BootStep, BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo,
        RunningTask, STOPPED_BEFORE_START,
    },
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A channel whose accounts each run in a child process of their own (see the module docs).
#[derive(Clone)]
pub struct PerAccountPlugin {
    inner: Arc<Inner>,
}

struct Inner {
    /// The child that answers the channel's calls and runs no account.
    control: IsolatedPlugin,
    /// What each account's child is started with.
    spec: ChildSpec,
    handshake: Duration,
    runtime: tokio::runtime::Handle,
    sink: Arc<dyn HostSink>,
    /// Each account's child.
    accounts: Mutex<HashMap<String, IsolatedPlugin>>,
    /// Held while an account's child is started, so one account never gets two.
    spawning: Mutex<()>,
    /// The table last configured, handed to every new account child.
    config: Mutex<Option<Value>>,
    /// The host's task ids: each maps to its account and the id its child gave the task.
    next_task: AtomicU64,
    tasks: Mutex<HashMap<u64, (String, u64)>>,
    shut_down: AtomicBool,
}

impl PerAccountPlugin {
    /// A channel served by `control` (a child that loaded the plugin file), whose accounts get
    /// children started from `spec`, each with `handshake` to load the plugin and answer.
    pub fn new(
        control: IsolatedPlugin,
        spec: ChildSpec,
        handshake: Duration,
        runtime: tokio::runtime::Handle,
        sink: Arc<dyn HostSink>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                control,
                spec,
                handshake,
                runtime,
                sink,
                accounts: Mutex::default(),
                spawning: Mutex::new(()),
                config: Mutex::new(None),
                next_task: AtomicU64::new(1),
                tasks: Mutex::default(),
                shut_down: AtomicBool::new(false),
            }),
        }
    }

    fn error(&self, entry: &'static str, message: String) -> PluginCallError {
        PluginCallError {
            channel: self.inner.control.info().channel_id.clone(),
            entry,
            message,
        }
    }

    /// The account's child, if it has one.
    fn existing(&self, account: &str) -> Option<IsolatedPlugin> {
        lock(&self.inner.accounts).get(account).cloned()
    }

    /// The account's child, started (and configured) if it has none yet. Blocks: call it off the
    /// async runtime.
    fn child(&self, account: &str, entry: &'static str) -> Result<IsolatedPlugin, PluginCallError> {
        if let Some(child) = self.existing(account) {
            return Ok(child);
        }
        let _spawning = lock(&self.inner.spawning);
        if let Some(child) = self.existing(account) {
            return Ok(child);
        }
        if self.inner.shut_down.load(Ordering::SeqCst) {
            return Err(self.error(entry, "the plugin processes were shut down".into()));
        }
        let child = IsolatedPlugin::spawn_within(
            self.inner.spec.clone(),
            self.inner.handshake,
            self.inner.runtime.clone(),
            self.inner.sink.clone(),
        )
        .map_err(|e| {
            self.error(
                entry,
                format!("starting account {account}'s plugin process: {}", e.error),
            )
        })?;
        let table = lock(&self.inner.config).clone();
        if let Some(table) = table
            && let Err(e) = child.configure(&table)
        {
            child.kill();
            return Err(self.error(
                entry,
                format!(
                    "configuring account {account}'s plugin process: {}",
                    e.message
                ),
            ));
        }
        tracing::info!(
            channel = %self.inner.control.info().channel_id,
            account = %account,
            pid = ?child.isolation_info().pid,
            "account plugin process started"
        );
        lock(&self.inner.accounts).insert(account.to_owned(), child.clone());
        Ok(child)
    }

    /// The account and its child's id of a host task id.
    fn task(&self, task: u64) -> Option<(IsolatedPlugin, u64)> {
        let (account, id) = lock(&self.inner.tasks).get(&task).cloned()?;
        Some((self.existing(&account)?, id))
    }
}

impl Plugin for PerAccountPlugin {
    fn info(&self) -> &PluginInfo {
        self.inner.control.info()
    }

    /// Configures the control child, then every account child (the first error is returned;
    /// each child keeps the table it accepted for its replacements).
    fn configure(&self, channel_config: &Value) -> Result<(), PluginCallError> {
        self.inner.control.configure(channel_config)?;
        *lock(&self.inner.config) = Some(channel_config.clone());
        let children: Vec<IsolatedPlugin> = lock(&self.inner.accounts).values().cloned().collect();
        let mut first = None;
        for child in children {
            if let Err(e) = child.configure(channel_config) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError> {
        self.inner.control.list_account_ids()
    }

    fn default_account_id(&self) -> Result<Option<String>, PluginCallError> {
        self.inner.control.default_account_id()
    }

    fn resolve_account(&self, account: &str) -> Result<Value, PluginCallError> {
        self.inner.control.resolve_account(account)
    }

    fn is_enabled(&self, account: &str) -> Result<Check, PluginCallError> {
        self.inner.control.is_enabled(account)
    }

    fn is_configured(&self, account: &str) -> Result<Check, PluginCallError> {
        self.inner.control.is_configured(account)
    }

    fn describe_account(&self, account: &str) -> Result<Option<Value>, PluginCallError> {
        self.inner.control.describe_account(account)
    }

    fn start_account(
        &self,
        account: &str,
        link: AccountLink,
    ) -> Result<RunningTask, PluginCallError> {
        let child = self.child(account, "start_account")?;
        let started = child.start_account(account, link)?;
        let id = self.inner.next_task.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.tasks).insert(id, (account.to_owned(), started.id));
        let inner = self.inner.clone();
        Ok(RunningTask {
            id,
            done: crate::plugin::TaskEnd::boxed(async move {
                let result = started.done.await;
                lock(&inner.tasks).remove(&id);
                result
            }),
        })
    }

    /// The checks of the whole batch in one round trip to the control child; then each account
    /// that passed starts in its own child (one round trip there, its child started first if it
    /// has none). An account's error, or its child's death, is that account's alone.
    fn boot_accounts(
        &self,
        batch: Vec<(String, AccountLink)>,
    ) -> Vec<Result<BootStep, PluginCallError>> {
        let accounts = batch.iter().map(|(account, _)| account.clone()).collect();
        let checked = self.inner.control.check_accounts(accounts);
        batch
            .into_iter()
            .zip(checked)
            .map(|((account, link), checked)| match checked? {
                Some(step) => Ok(step),
                // Stopped while the batch was checked: not started.
                None if link.stop_requested() => {
                    Err(self.error("boot_accounts", STOPPED_BEFORE_START.into()))
                }
                None => self.start_account(&account, link).map(BootStep::Started),
            })
            .collect()
    }

    fn account_facts(&self, accounts: &[(String, bool)]) -> Vec<AccountFacts> {
        self.inner.control.account_facts(accounts)
    }

    fn abort_task(&self, task: u64) -> bool {
        self.task(task)
            .is_some_and(|(child, id)| child.abort_task(id))
    }

    /// Kills the account's own child (see [`IsolatedPlugin`]'s cancel): the other accounts of the
    /// channel keep running.
    fn cancel_task(&self, task: u64) -> bool {
        self.task(task)
            .is_some_and(|(child, id)| child.cancel_task(id))
    }

    /// Kills the account's own child (see [`IsolatedPlugin`]'s): the other accounts of the
    /// channel keep running.
    fn abandon_start(&self, account: &str) -> bool {
        self.existing(account)
            .is_some_and(|child| child.abandon_start(account))
    }

    fn stop_account(&self, account: &str) -> Result<(), PluginCallError> {
        match self.existing(account) {
            Some(child) => child.stop_account(account),
            // It never ran: nothing of it is left to stop.
            None => Ok(()),
        }
    }

    fn logout(&self, account: &str) -> Result<bool, PluginCallError> {
        self.child(account, "logout")?.logout(account)
    }

    fn send(&self, message: Outbound) -> BoxFuture<Result<String, PluginCallError>> {
        if let Some(child) = self.existing(&message.account) {
            return child.send(message);
        }
        let me = self.clone();
        Box::pin(async move {
            let account = message.account.clone();
            let me2 = me.clone();
            let child = tokio::task::spawn_blocking(move || me2.child(&account, "send"))
                .await
                .map_err(|e| me.error("send", e.to_string()))??;
            child.send(message).await
        })
    }

    /// Shuts every child down (the accounts' first, then the control child); the first error is
    /// returned.
    fn shutdown(&self) -> Result<(), PluginCallError> {
        self.inner.shut_down.store(true, Ordering::SeqCst);
        let children: Vec<IsolatedPlugin> = {
            let _spawning = lock(&self.inner.spawning);
            lock(&self.inner.accounts).values().cloned().collect()
        };
        let mut first = None;
        for child in children {
            if let Err(e) = child.shutdown() {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = self.inner.control.shutdown() {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    fn stop_account_async(&self, account: &str) -> Option<BoxFuture<Result<(), PluginCallError>>> {
        match self.existing(account) {
            Some(child) => child.stop_account_async(account),
            None => Some(Box::pin(std::future::ready(Ok(())))),
        }
    }

    fn logout_async(&self, account: &str) -> Option<BoxFuture<Result<bool, PluginCallError>>> {
        // Without a child yet, the blocking logout starts one (on a host thread).
        self.existing(account)?.logout_async(account)
    }

    fn validate_channel(&self, channel_config: &Value) -> Result<(), PluginCallError> {
        self.inner.control.validate_channel(channel_config)
    }

    fn reports_task_polled(&self) -> bool {
        self.inner.control.reports_task_polled()
    }

    fn isolation(&self) -> Option<IsolationInfo> {
        let control = self.inner.control.isolation_info();
        let accounts = lock(&self.inner.accounts).clone();
        let mut children_started = control.children_started;
        let mut pids = BTreeMap::new();
        for (account, child) in accounts {
            let info = child.isolation_info();
            children_started += info.children_started;
            if let Some(pid) = info.pid {
                pids.insert(account, pid);
            }
        }
        Some(IsolationInfo {
            mode: "process-per-account",
            pid: control.pid,
            children_started,
            accounts: pids,
        })
    }
}
