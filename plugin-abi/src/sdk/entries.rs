//! The `extern "C"` entry points behind the root module. There is one plugin per library, so the
//! SDK keeps it in a process-wide static of its own copy (each cdylib has its own statics); every
//! entry runs inside the panic fence.

use std::{
    any::TypeId,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    std_types::{RBoxError, ROption, RResult, RSlice, RStr, RString, RVec},
};
use async_ffi::{FfiFuture, FutureExt};
use tokio::task::{AbortHandle, JoinError, JoinHandle};

use super::{
    Account, AccountContext, ChannelConfig, ChannelPlugin, Host, Outbound, PluginError, Verdict,
    context::AbortSignal,
    fence::{fenced, fenced_or, panic_message},
    log,
    resolved::{CURRENT, Configured},
    runtime,
    signal::TaskState,
    tasks,
    watchdog::{Owner, watched},
};
use crate::abi::{
    AccountStart, HOST_ABI_VERSION_KEY, HostHandle, InitSettings, OutboundMessage, PluginMetadata,
    PluginMod, PluginMod_Ref, RVerdict, StartedTask, TaskId,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, PluginError>> + Send + 'static>>;

/// [`ChannelPlugin`] with its type erased, so the entry points need not be generic.
trait ErasedPlugin: Send + Sync + 'static {
    fn channel_id(&self) -> &'static str;
    fn display_name(&self) -> &'static str;
    fn list_account_ids(&self, channel: &ChannelConfig) -> Result<Vec<String>, PluginError>;
    fn default_account_id(&self, channel: &ChannelConfig) -> Option<String>;
    fn resolve_account(&self, channel: &ChannelConfig, id: &str) -> Result<Account, PluginError>;
    fn is_enabled(&self, account: &Account) -> Verdict;
    fn is_configured(&self, account: &Account) -> Verdict;
    fn describe_account(&self, account: &Account) -> Option<serde_json::Value>;
    fn validate(&self, channel: &ChannelConfig) -> Result<(), PluginError>;
    fn start_task(&'static self, account: &str, host: HostHandle) -> Result<StartedTask, String>;
    /// Whether `stop` is the trait's default, which does nothing: then there is nothing to run.
    fn stop_is_default(&self) -> bool;
    fn stop_needed(&self, account: &Account) -> bool;
    fn stop_async(&'static self, account: &str) -> FfiFuture<RResult<(), RString>>;
    fn stop(&'static self, account: Account) -> BoxFuture<()>;
    fn logout(&'static self, account: Account) -> BoxFuture<bool>;
    fn send(&'static self, message: Outbound) -> BoxFuture<String>;
}

impl<P: ChannelPlugin> ErasedPlugin for P {
    fn channel_id(&self) -> &'static str {
        P::CHANNEL_ID
    }
    fn display_name(&self) -> &'static str {
        P::DISPLAY_NAME
    }
    fn list_account_ids(&self, channel: &ChannelConfig) -> Result<Vec<String>, PluginError> {
        ChannelPlugin::list_account_ids(self, channel)
    }
    fn default_account_id(&self, channel: &ChannelConfig) -> Option<String> {
        ChannelPlugin::default_account_id(self, channel)
    }
    fn resolve_account(&self, channel: &ChannelConfig, id: &str) -> Result<Account, PluginError> {
        ChannelPlugin::resolve_account(self, channel, id)
    }
    fn is_enabled(&self, account: &Account) -> Verdict {
        ChannelPlugin::is_enabled(self, account)
    }
    fn is_configured(&self, account: &Account) -> Verdict {
        ChannelPlugin::is_configured(self, account)
    }
    fn describe_account(&self, account: &Account) -> Option<serde_json::Value> {
        ChannelPlugin::describe_account(self, account)
    }
    fn validate(&self, channel: &ChannelConfig) -> Result<(), PluginError> {
        ChannelPlugin::validate(self, channel)
    }
    fn start_task(&'static self, account: &str, host: HostHandle) -> Result<StartedTask, String> {
        start_one(self, account, host)
    }
    fn stop_async(&'static self, account: &str) -> FfiFuture<RResult<(), RString>> {
        stop_one(self, account)
    }
    fn stop_needed(&self, account: &Account) -> bool {
        ChannelPlugin::stop_needed(self, account)
    }
    fn stop_is_default(&self) -> bool {
        /// The type of the future a `stop` of `P` returns, without calling it.
        fn returned<P, F: 'static>(_: fn(&'static P, Account) -> F) -> TypeId {
            TypeId::of::<F>()
        }
        // Only the trait's default returns the SDK's own `DefaultStop`, which authors cannot
        // name: an override, whatever it does, returns another type.
        returned::<P, _>(<P as ChannelPlugin>::stop) == TypeId::of::<DefaultStop>()
    }
    fn stop(&'static self, account: Account) -> BoxFuture<()> {
        Box::pin(ChannelPlugin::stop(self, account))
    }
    fn logout(&'static self, account: Account) -> BoxFuture<bool> {
        Box::pin(ChannelPlugin::logout(self, account))
    }
    fn send(&'static self, message: Outbound) -> BoxFuture<String> {
        Box::pin(ChannelPlugin::send(self, message))
    }
}

struct Loaded {
    plugin: &'static dyn ErasedPlugin,
    plugin_version: &'static str,
    root: PluginMod_Ref,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// What the trait's default [`ChannelPlugin::stop`] returns: done at once. The SDK recognises it
/// by its type and does not run it (a stop hook that does nothing costs no task).
pub(crate) struct DefaultStop;

impl Future for DefaultStop {
    type Output = Result<(), PluginError>;

    fn poll(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Builds the plugin (once) and the root module. Called by the loader `export_plugin!` emits; a
/// panic in `constructor` is caught here and returned to the host as a failed load carrying the
/// panic message and location.
pub fn root_module<P: ChannelPlugin>(
    constructor: fn() -> P,
    plugin_version: &'static str,
) -> Result<PluginMod_Ref, RBoxError> {
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded.root);
    }
    log::install_panic_hook();
    let plugin = std::panic::catch_unwind(constructor).map_err(|payload| {
        let location = log::take_panic_location();
        RBoxError::from_fmt(&format_args!(
            "the plugin's constructor panicked{}: {}",
            location.map(|l| format!(" at {l}")).unwrap_or_default(),
            panic_message(&*payload)
        ))
    })?;
    // A hook the constructor set is kept, and called after the SDK's.
    log::chain_panic_hook();
    let plugin: &'static P = Box::leak(Box::new(plugin));
    Ok(LOADED
        .get_or_init(|| Loaded {
            plugin,
            plugin_version,
            root: module().leak_into_prefix(),
        })
        .root)
}

pub use abi_stable::library::__call_root_module_loader as call_root_module_loader;

fn module() -> PluginMod {
    PluginMod {
        metadata,
        init,
        configure,
        list_account_ids,
        default_account_id,
        resolve_account,
        is_enabled,
        is_configured,
        describe_account,
        start_account,
        abort_task,
        cancel_task,
        stop_account,
        logout,
        send,
        shutdown,
        stop_account_async,
        logout_async,
        validate_channel,
        start_accounts,
        abort_tasks,
    }
}

fn loaded() -> &'static Loaded {
    // The root module, and so every entry, only exists once `LOADED` is set.
    LOADED
        .get()
        .expect("entry point called before the root module was built")
}

fn plugin() -> &'static dyn ErasedPlugin {
    loaded().plugin
}

/// The table before any `configure`: empty.
fn unconfigured() -> ChannelConfig {
    ChannelConfig::from_json(plugin().channel_id(), "").unwrap_or_default()
}

/// The config the host installed last (an empty table before any).
fn configured() -> Arc<Configured> {
    CURRENT.get(unconfigured)
}

fn config() -> Arc<ChannelConfig> {
    configured().config().clone()
}

/// The author's hook that resolves account `id` of `config`.
fn resolve_hook(config: &ChannelConfig, id: &str) -> Result<Account, PluginError> {
    plugin().resolve_account(config, id)
}

/// The account, resolved once per installed config (see [`super::resolved`]).
fn resolve(account: &str) -> Result<Arc<Account>, String> {
    CURRENT
        .resolve(account, unconfigured, resolve_hook)
        .map_err(|e| e.to_string())
}

/// [`resolve`] for a boot's questions (`is_enabled`, `is_configured`, the start), which come one
/// after the other on one thread (see [`super::resolved`]).
fn resolve_for_boot(account: &str) -> Result<Arc<Account>, String> {
    CURRENT
        .resolve_for_boot(account, unconfigured, resolve_hook)
        .map_err(|e| e.to_string())
}

/// The account as the author's hooks that take it by value want it.
fn resolve_owned(account: &str) -> Result<Account, String> {
    resolve(account).map(Arc::unwrap_or_clone)
}

fn rt() -> Result<tokio::runtime::Handle, String> {
    runtime::handle(|| {
        // Thread names show up in `top -H` and /proc/<pid>/task/*/comm (15 bytes kept).
        let mut name = format!("chd-{}", plugin().channel_id());
        name.truncate(15);
        name
    })
}

fn to_rverdict(verdict: Verdict) -> RVerdict {
    match verdict {
        Verdict::Yes => RVerdict {
            ok: true,
            reason: ROption::RNone,
        },
        Verdict::No(reason) => RVerdict {
            ok: false,
            reason: reason.map(RString::from).into(),
        },
    }
}

extern "C" fn metadata() -> PluginMetadata {
    let empty = PluginMetadata {
        channel_id: RString::new(),
        display_name: RString::new(),
        plugin_version: RString::new(),
        abi_version: RString::new(),
        rustc_version: RString::new(),
        extra: RString::new(),
    };
    fenced_or(empty, || {
        let loaded = loaded();
        PluginMetadata {
            channel_id: loaded.plugin.channel_id().into(),
            display_name: loaded.plugin.display_name().into(),
            plugin_version: loaded.plugin_version.into(),
            abi_version: env!("CARGO_PKG_VERSION").into(),
            rustc_version: env!("CHANNELD_RUSTC_VERSION").into(),
            extra: RString::new(),
        }
    })
}

/// Why `init` refuses a host that does not state its plugin-abi version (a 1.0 host): the
/// plugin needs entries such a host does not have.
fn check_host_version(extra: &str) -> Result<(), String> {
    let stated = serde_json::from_str::<serde_json::Value>(extra)
        .ok()
        .and_then(|v| v.get(HOST_ABI_VERSION_KEY)?.as_str().map(str::to_owned));
    match stated {
        Some(_) => Ok(()),
        None => Err(format!(
            "this plugin is built with channeld-plugin-abi {} and needs a channeld host of \
             plugin-abi 1.1 or later; this host states no version (plugin-abi 1.0): upgrade \
             channeld or rebuild the plugin against channeld-plugin-abi 1.0",
            env!("CARGO_PKG_VERSION")
        )),
    }
}

extern "C" fn init(settings: InitSettings, host: HostHandle) -> RResult<(), RString> {
    fenced("init", || {
        check_host_version(settings.extra.as_str())?;
        log::chain_panic_hook();
        runtime::set_worker_threads(settings.worker_threads);
        if let Ok(extra) = serde_json::from_str(settings.extra.as_str()) {
            runtime::configure(&extra);
        }
        log::install(host, settings.max_log_level);
        Ok(())
    })
}

extern "C" fn validate_channel(channel_config: RStr<'_>) -> RResult<(), RString> {
    fenced("validate_channel", || {
        let parsed = ChannelConfig::from_json(plugin().channel_id(), channel_config.as_str())
            .map_err(|e| e.to_string())?;
        plugin().validate(&parsed).map_err(|e| e.to_string())
    })
}

extern "C" fn configure(channel_config: RStr<'_>) -> RResult<(), RString> {
    fenced("configure", || {
        let parsed = ChannelConfig::from_json(plugin().channel_id(), channel_config.as_str())
            .map_err(|e| e.to_string())?;
        CURRENT.install(parsed);
        Ok(())
    })
}

extern "C" fn list_account_ids() -> RResult<RVec<RString>, RString> {
    fenced("list_account_ids", || {
        plugin()
            .list_account_ids(&config())
            .map(|ids| ids.into_iter().map(RString::from).collect())
            .map_err(|e| e.to_string())
    })
}

extern "C" fn default_account_id() -> RResult<ROption<RString>, RString> {
    fenced("default_account_id", || {
        Ok(plugin()
            .default_account_id(&config())
            .map(RString::from)
            .into())
    })
}

extern "C" fn resolve_account(account: RStr<'_>) -> RResult<RString, RString> {
    fenced("resolve_account", || {
        Ok(resolve(account.as_str())?.config.to_string().into())
    })
}

extern "C" fn is_enabled(account: RStr<'_>) -> RResult<RVerdict, RString> {
    fenced("is_enabled", || {
        Ok(to_rverdict(
            plugin().is_enabled(&*resolve_for_boot(account.as_str())?),
        ))
    })
}

extern "C" fn is_configured(account: RStr<'_>) -> RResult<RVerdict, RString> {
    fenced("is_configured", || {
        Ok(to_rverdict(
            plugin().is_configured(&*resolve_for_boot(account.as_str())?),
        ))
    })
}

extern "C" fn describe_account(account: RStr<'_>) -> RResult<ROption<RString>, RString> {
    fenced("describe_account", || {
        let described = plugin().describe_account(&*resolve(account.as_str())?);
        Ok(described.map(|v| RString::from(v.to_string())).into())
    })
}

/// Aborts the plugin-side task when the host drops the future that waits for it.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for a plugin-side task from the host's runtime. Only SDK code runs in this future's
/// `poll` (a panic inside an `FfiFuture`'s `poll` reaches the host with its message lost, and one
/// in its `drop` aborts): the author's future runs on the plugin's runtime.
fn await_task<T, U>(
    join: JoinHandle<Result<T, PluginError>>,
    what: &'static str,
    map: fn(T) -> U,
) -> FfiFuture<RResult<U, RString>>
where
    T: Send + 'static,
    U: Send + 'static,
{
    let guard = AbortOnDrop(join.abort_handle());
    async move {
        let _guard = guard;
        match join.await {
            Ok(Ok(value)) => RResult::ROk(map(value)),
            Ok(Err(e)) => RResult::RErr(e.to_string().into()),
            Err(e) => RResult::RErr(join_error(e, what).into()),
        }
    }
    .into_ffi()
}

fn join_error(error: JoinError, what: &str) -> String {
    if error.is_panic() {
        format!(
            "plugin panicked in {what}: {}",
            panic_message(&*error.into_panic())
        )
    } else {
        "cancelled".to_owned()
    }
}

/// Starts one account's task: the author's future runs on the plugin's runtime inside the
/// account's log scope (which tags its events from the host link; no tracing span per task); the
/// host is told when the runtime first polls it (`task_polled`), and the task counts as ended
/// only once the tasks it spawned with [`AccountContext::spawn`] have ended.
///
/// Generic over the plugin, so the author's future lives in the runtime's task itself (no box of
/// its own); the account is the one resolved for this config, shared with the log scope and the
/// watchdog's record of the task. What a running account costs the plugin is that task (the
/// author's future and [`tasks::AccountTask`]'s few fields around it), one [`TaskState`] (its
/// abort signal and spawned-task count), its registry entry and the [`TaskDone`] the host awaits.
fn start_one<P: ChannelPlugin>(
    plugin: &'static P,
    account: &str,
    host: HostHandle,
) -> Result<StartedTask, String> {
    let account = resolve_for_boot(account)?;
    let handle = rt()?;
    let state = Arc::new(TaskState::default());
    let polled = host.clone();
    let ctx = AccountContext {
        account: account.clone(),
        host: Host::new(host),
        abort: AbortSignal(state.clone()),
        harnessed: None,
    };
    let task = ChannelPlugin::start(plugin, ctx);
    let (id, join) = tasks::register(state.clone(), |id| {
        let join = handle.spawn(tasks::AccountTask::new(id, task, polled, state, account));
        (join.abort_handle(), join)
    });
    Ok(StartedTask {
        id,
        done: TaskDone(join).into_ffi(),
    })
}

/// What the host awaits for an account task: its end, as the ABI's result. As small as its
/// handle (the host keeps one per running account); dropping it aborts the task, as
/// [`await_task`]'s future does.
struct TaskDone(JoinHandle<Result<(), PluginError>>);

impl Drop for TaskDone {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Future for TaskDone {
    type Output = RResult<(), RString>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let ended = std::task::ready!(Pin::new(&mut self.0).poll(cx));
        std::task::Poll::Ready(match ended {
            Ok(Ok(())) => RResult::ROk(()),
            Ok(Err(e)) => RResult::RErr(e.to_string().into()),
            Err(e) => RResult::RErr(join_error(e, "the account task").into()),
        })
    }
}

extern "C" fn start_account(account: RStr<'_>, host: HostHandle) -> RResult<StartedTask, RString> {
    fenced("start_account", || {
        plugin().start_task(account.as_str(), host)
    })
}

extern "C" fn start_accounts(batch: RVec<AccountStart>) -> RVec<RResult<StartedTask, RString>> {
    batch
        .into_iter()
        .map(|item| {
            fenced("start_accounts", || {
                plugin().start_task(item.account.as_str(), item.host)
            })
        })
        .collect()
}

extern "C" fn abort_tasks(ids: RSlice<'_, TaskId>) -> u32 {
    fenced_or(0, || {
        ids.iter().filter(|id| tasks::abort(**id)).count() as u32
    })
}

extern "C" fn abort_task(task: TaskId) -> bool {
    fenced_or(false, || tasks::abort(task))
}

extern "C" fn cancel_task(task: TaskId) -> bool {
    fenced_or(false, || tasks::cancel(task))
}

/// What the watchdog calls a hook's future in its report.
fn hook_label(entry: &'static str) -> &'static str {
    match entry {
        "stop_account" => "stop hook",
        "logout" => "logout hook",
        other => other,
    }
}

/// Runs a hook's future to completion on the plugin's runtime, from the host's calling thread.
fn block_on_hook<T: Send + 'static>(
    account: &str,
    future: BoxFuture<T>,
    what: &'static str,
) -> Result<T, String> {
    let handle = rt()?;
    let join = handle.spawn(watched(account.into(), hook_label(what), future));
    match handle.block_on(join) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(join_error(e, what)),
    }
}

extern "C" fn stop_account(account: RStr<'_>) -> RResult<(), RString> {
    fenced("stop_account", || {
        if plugin().stop_is_default() {
            return Ok(());
        }
        let resolved = resolve(account.as_str())?;
        if !plugin().stop_needed(&resolved) {
            return Ok(());
        }
        block_on_hook(
            account.as_str(),
            plugin().stop(Arc::unwrap_or_clone(resolved)),
            "stop_account",
        )
    })
}

extern "C" fn logout(account: RStr<'_>) -> RResult<bool, RString> {
    fenced("logout", || {
        block_on_hook(
            account.as_str(),
            plugin().logout(resolve_owned(account.as_str())?),
            "logout",
        )
    })
}

/// Spawns a hook on the plugin's runtime and hands the host a future that waits for it. `hook`
/// builds the hook's future (on the calling thread, inside the fence) for the account it resolved
/// (which the watchdog names it by).
fn spawn_hook<T, U, F>(
    what: &'static str,
    hook: impl FnOnce() -> Result<(Arc<Account>, F), String>,
    map: fn(T) -> U,
) -> FfiFuture<RResult<U, RString>>
where
    T: Send + 'static,
    U: Send + 'static,
    F: Future<Output = Result<T, PluginError>> + Send + 'static,
{
    let started = fenced(what, || {
        let (account, future) = hook()?;
        Ok(rt()?.spawn(watched(Owner::Account(account), hook_label(what), future)))
    });
    match started {
        RResult::ROk(join) => await_task(join, what, map),
        RResult::RErr(e) => std::future::ready(RResult::RErr(e)).into_ffi(),
    }
}

/// The async stop hook for `account`: nothing for the trait's default (no account to resolve,
/// no task to run), else the author's `stop` spawned on the plugin's runtime. Generic over the
/// plugin, so the hook's future lives in the runtime's task itself (no box of its own).
fn stop_one<P: ChannelPlugin>(
    plugin: &'static P,
    account: &str,
) -> FfiFuture<RResult<(), RString>> {
    if plugin.stop_is_default() {
        return std::future::ready(RResult::ROk(())).into_ffi();
    }
    let started = fenced("stop_account", || {
        let account = resolve(account)?;
        if !ChannelPlugin::stop_needed(plugin, &account) {
            return Ok(None);
        }
        let hook = ChannelPlugin::stop(plugin, Account::clone(&account));
        let label = hook_label("stop_account");
        Ok(Some(rt()?.spawn(watched(
            Owner::Account(account),
            label,
            hook,
        ))))
    });
    match started {
        RResult::ROk(Some(join)) => await_task(join, "stop_account", |()| ()),
        RResult::ROk(None) => std::future::ready(RResult::ROk(())).into_ffi(),
        RResult::RErr(e) => std::future::ready(RResult::RErr(e)).into_ffi(),
    }
}

extern "C" fn stop_account_async(account: RStr<'_>) -> FfiFuture<RResult<(), RString>> {
    match fenced("stop_account", || Ok(plugin())) {
        RResult::ROk(plugin) => plugin.stop_async(account.as_str()),
        RResult::RErr(e) => std::future::ready(RResult::RErr(e)).into_ffi(),
    }
}

extern "C" fn logout_async(account: RStr<'_>) -> FfiFuture<RResult<bool, RString>> {
    spawn_hook(
        "logout",
        || {
            let resolved = resolve(account.as_str())?;
            let hook = plugin().logout(Account::clone(&resolved));
            Ok((resolved, hook))
        },
        |b| b,
    )
}

extern "C" fn send(message: OutboundMessage) -> FfiFuture<RResult<RString, RString>> {
    let started = fenced("send", || {
        let extra = if message.extra.is_empty() {
            None
        } else {
            Some(serde_json::from_str(message.extra.as_str()).map_err(|e| e.to_string())?)
        };
        let outbound = Outbound {
            account: message.account.into_string(),
            conversation: message.conversation.into_string(),
            text: message.text.into_string(),
            reply_to: Some(message.reply_to.into_string()).filter(|s| !s.is_empty()),
            extra,
        };
        let handle = rt()?;
        let owner = Owner::from(outbound.account.as_str());
        Ok(handle.spawn(watched(owner, "send", plugin().send(outbound))))
    });
    match started {
        RResult::ROk(join) => await_task(join, "send", RString::from),
        RResult::RErr(e) => std::future::ready(RResult::RErr(e)).into_ffi(),
    }
}

extern "C" fn shutdown() -> RResult<(), RString> {
    fenced("shutdown", || {
        runtime::shutdown();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;

    impl ChannelPlugin for Quiet {
        const CHANNEL_ID: &'static str = "quiet";

        async fn start(&self, _ctx: AccountContext) -> Result<(), PluginError> {
            Ok(())
        }
    }

    struct Stopping;

    impl ChannelPlugin for Stopping {
        const CHANNEL_ID: &'static str = "stopping";

        async fn start(&self, _ctx: AccountContext) -> Result<(), PluginError> {
            Ok(())
        }

        async fn stop(&self, _account: Account) -> Result<(), PluginError> {
            Ok(())
        }
    }

    struct ReadyStop;

    impl ChannelPlugin for ReadyStop {
        const CHANNEL_ID: &'static str = "ready";

        async fn start(&self, _ctx: AccountContext) -> Result<(), PluginError> {
            Ok(())
        }

        fn stop(&self, account: Account) -> impl Future<Output = Result<(), PluginError>> + Send {
            std::future::ready(Err(PluginError::new(account.id)))
        }
    }

    /// Only the trait's own default is skipped: any override, even one that is done at once, runs.
    #[test]
    fn only_the_default_stop_is_known_to_do_nothing() {
        assert!(ErasedPlugin::stop_is_default(&Quiet));
        assert!(!ErasedPlugin::stop_is_default(&Stopping));
        assert!(!ErasedPlugin::stop_is_default(&ReadyStop));
    }
}
