//! Forwards the plugin's `tracing` events to the host. A plugin has its own copy of `tracing`'s
//! global dispatcher (statics are per dylib), which knows nothing of the host's subscriber; the
//! SDK installs this layer inside the plugin at `init`.
//!
//! Each account task, and every task spawned with
//! [`AccountContext::spawn`](super::AccountContext::spawn), runs in the account's log scope (its
//! account, shared with its context, which each poll and the task's drop put in a thread-local
//! and take back after, as a tokio task-local would; the account task keeps it in its own
//! fields, so no wrapper future per task), so its events reach the host tagged with that account. The SDK opens no tracing span
//! per task (a span per account cost memory and time at every start); events outside a scope are
//! tagged from an enclosing span named [`ACCOUNT_SPAN`] with `channel` and `account` fields, if
//! the author opened one.
//!
//! # The global `tracing` subscriber
//! At `init` the SDK installs, as the plugin's global default, a subscriber whose only layer
//! forwards events to the host. If the plugin author installed a global subscriber before that
//! (in the plugin's constructor), the author's stays and the SDK forwards nothing: the author
//! then decides where the plugin's events go.
//!
//! # The panic hook
//! The SDK's panic hook keeps the panic's location for the error the host shows, and logs it at
//! debug level instead of printing on the host's stderr. A hook the author installed in the
//! constructor is kept and called after the SDK's; a hook installed later replaces the SDK's.

use std::{
    cell::RefCell,
    fmt::Write as _,
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
};

use std::task::{Context as TaskContext, Poll};

use abi_stable::std_types::RString;
use pin_project_lite::pin_project;
use serde_json::{Map, Value};
use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
    level_filters::LevelFilter,
    span::{Attributes, Id},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*, registry::LookupSpan};

use super::Account;
use crate::abi::{HostHandle, LogLevel, LogRecord};

/// The span name that tags the events inside it with its `channel` and `account` fields.
pub const ACCOUNT_SPAN: &str = "channeld_account";

static HOST: OnceLock<HostHandle> = OnceLock::new();
static MAX_LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Info as u8);

/// Installs the forwarding subscriber (once; later calls only update the level).
pub(crate) fn install(host: HostHandle, max_level: LogLevel) {
    MAX_LEVEL.store(max_level as u8, Ordering::Relaxed);
    if HOST.set(host).is_ok() {
        let subscriber = tracing_subscriber::registry().with(Forward);
        // Fails only if the plugin author installed a global subscriber of their own; theirs wins.
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
}

/// Sends the SDK's report on its runtime to the host (see [`crate::abi::RUNTIME_REPORT_TARGET`]):
/// straight through the plugin-wide handle, whatever the log level, so the host always sees it.
pub(crate) fn report_runtime(fields: Value, message: &str) {
    if let Some(host) = HOST.get() {
        host.log(LogRecord {
            level: LogLevel::Warn,
            target: crate::abi::RUNTIME_REPORT_TARGET.into(),
            message: message.into(),
            fields: fields.to_string().into(),
            channel: RString::new(),
            account: RString::new(),
        });
    }
}

thread_local! {
    static LAST_PANIC_LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

type Hook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync + 'static>;

/// The address of the hook the SDK installed last, to tell it from a hook set by someone else.
static SDK_HOOK: AtomicUsize = AtomicUsize::new(0);

fn hook_address(hook: &Hook) -> usize {
    std::ptr::from_ref(&**hook).cast::<()>() as usize
}

/// Installs `hook` as the process's panic hook and remembers it as the SDK's.
fn set_sdk_hook(hook: Hook) {
    SDK_HOOK.store(hook_address(&hook), Ordering::Relaxed);
    std::panic::set_hook(hook);
}

/// What the SDK's hook does before any author hook: keep the location, log at debug level.
fn record_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let message = super::fence::panic_message(info.payload());
    tracing::debug!(%location, "plugin code panicked: {message}");
    LAST_PANIC_LOCATION.with(|l| *l.borrow_mut() = Some(location));
}

/// Installs the plugin's panic hook (once). The plugin has its own copy of std and so its own
/// panic hook. Panics in plugin code are caught by the SDK and returned as errors carrying their
/// message; the hook keeps the location for that error and sends it to the host's log at debug
/// level (once `init` has connected the log), instead of printing on the host's stderr.
pub(crate) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Whatever was installed before the plugin's library was loaded is std's default hook
        // (which prints to stderr): the SDK replaces it.
        drop(std::panic::take_hook());
        // The hook captures a byte so that it is not zero-sized: a zero-sized hook's box has
        // no address of its own to recognise it by (`black_box` makes sure it is captured).
        let marker = 0u8;
        set_sdk_hook(Box::new(move |info| {
            std::hint::black_box(&marker);
            record_panic(info);
        }));
    });
}

/// Keeps a hook the author installed since the SDK's own (in the constructor, say): the SDK's
/// hook is put back in front of it, and the author's runs after it.
pub(crate) fn chain_panic_hook() {
    let current: Hook = std::panic::take_hook();
    if hook_address(&current) == SDK_HOOK.load(Ordering::Relaxed) {
        std::panic::set_hook(current);
        return;
    }
    let author = Arc::new(current);
    set_sdk_hook(Box::new(move |info| {
        record_panic(info);
        author(info);
    }));
}

/// The channel and account a task belongs to, for tagging its log events: the account its
/// context holds, shared (a scope allocates nothing).
#[derive(Clone, Debug)]
pub(crate) struct AccountScope(Arc<Account>);

impl AccountScope {
    pub(crate) fn new(account: Arc<Account>) -> Self {
        Self(account)
    }

    /// The account.
    pub(crate) fn account(&self) -> &Arc<Account> {
        &self.0
    }

    fn tag(&self) -> (String, String) {
        (self.0.channel.clone(), self.0.id.clone())
    }
}

thread_local! {
    /// The scope of the task being polled on this thread (a task-local, kept by hand so that
    /// the account task can hold its scope in its own fields).
    static SCOPE: RefCell<Option<AccountScope>> = const { RefCell::new(None) };
}

/// Runs `f` with `slot`'s scope as the thread's current one (`slot` holds the one it replaced
/// meanwhile), and puts both back when `f` returns or unwinds. With `None` in `slot`, `f` runs
/// outside any scope.
pub(crate) fn enter_scope<R>(slot: &mut Option<AccountScope>, f: impl FnOnce() -> R) -> R {
    struct Back<'a>(&'a mut Option<AccountScope>);

    impl Drop for Back<'_> {
        fn drop(&mut self) {
            let _ = SCOPE.try_with(|current| std::mem::swap(&mut *current.borrow_mut(), self.0));
        }
    }

    if SCOPE
        .try_with(|current| std::mem::swap(&mut *current.borrow_mut(), slot))
        .is_err()
    {
        return f();
    }
    let _back = Back(slot);
    f()
}

pin_project! {
    /// A future run in an account's log scope: each poll, and its drop, happen in the scope.
    pub(crate) struct Scoped<F> {
        scope: Option<AccountScope>,
        #[pin]
        inner: Option<F>,
    }

    impl<F> PinnedDrop for Scoped<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut inner = this.inner;
            if inner.as_ref().get_ref().is_some() {
                enter_scope(this.scope, || inner.set(None));
            }
        }
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let inner = this.inner;
        enter_scope(this.scope, || {
            inner
                .as_pin_mut()
                .expect("a scoped future polled after it was dropped")
                .poll(cx)
        })
    }
}

/// Runs `future` in `scope`: its events are tagged with the scope's account.
pub(crate) fn in_scope<F: Future>(scope: AccountScope, future: F) -> Scoped<F> {
    Scoped {
        scope: Some(scope),
        inner: Some(future),
    }
}

/// The channel and account of the scope the current task runs in, if any.
pub(crate) fn current_scope() -> Option<(String, String)> {
    SCOPE
        .try_with(|current| current.borrow().as_ref().map(AccountScope::tag))
        .ok()
        .flatten()
}

/// The location of the last panic on this thread, if the hook saw one.
pub(crate) fn take_panic_location() -> Option<String> {
    LAST_PANIC_LOCATION.with(|l| l.borrow_mut().take())
}

fn to_level(level: &Level) -> LogLevel {
    match *level {
        Level::ERROR => LogLevel::Error,
        Level::WARN => LogLevel::Warn,
        Level::INFO => LogLevel::Info,
        Level::DEBUG => LogLevel::Debug,
        _ => LogLevel::Trace,
    }
}

struct AccountTag {
    channel: String,
    account: String,
}

struct Forward;

impl<S> Layer<S> for Forward
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        metadata.is_span() || to_level(metadata.level()) as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != ACCOUNT_SPAN {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let tag = AccountTag {
            channel: string_field(&fields.map, "channel"),
            account: string_field(&fields.map, "account"),
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(tag);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(host) = HOST.get() else { return };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let scoped = current_scope();
        let (channel, account) = scoped
            .or_else(|| {
                ctx.event_scope(event).and_then(|scope| {
                    scope.into_iter().find_map(|span| {
                        span.extensions()
                            .get::<AccountTag>()
                            .map(|t| (t.channel.clone(), t.account.clone()))
                    })
                })
            })
            .unwrap_or_default();
        let record = LogRecord {
            level: to_level(event.metadata().level()),
            target: event.metadata().target().into(),
            message: fields.message.into(),
            fields: if fields.map.is_empty() {
                RString::new()
            } else {
                Value::Object(fields.map).to_string().into()
            },
            channel: channel.into(),
            account: account.into(),
        };
        host.log(record);
    }
}

fn string_field(map: &Map<String, Value>, key: &str) -> String {
    match map.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// One event's fields as the host receives them: the `message` field's text, and every other
/// field as JSON. The harness (`channeld-plugin-test`) records events with it too, so a test sees
/// the fields exactly as channeld would.
#[derive(Default)]
pub struct Fields {
    /// The `message` field.
    pub message: String,
    /// Every other field.
    pub map: Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.map.insert(field.name().to_owned(), value.into());
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.map.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.map.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.map.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.map.insert(field.name().to_owned(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.map
                .insert(field.name().to_owned(), format!("{value:?}").into());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, atomic::AtomicBool};

    use super::*;

    /// The scopes a test saw, in order.
    type Seen = Arc<Mutex<Vec<Option<(String, String)>>>>;

    /// Records the log scope it is dropped in.
    struct DroppedIn(Seen);

    impl Drop for DroppedIn {
        fn drop(&mut self) {
            self.0.lock().unwrap().push(current_scope());
        }
    }

    /// A scoped future's polls and its drop (the author's `Drop` code may log) happen in its
    /// scope, and the thread is back outside it between polls.
    #[test]
    fn a_scoped_future_is_polled_and_dropped_in_its_scope() {
        let seen: Seen = Arc::default();
        let account = Arc::new(Account {
            channel: "chat".into(),
            id: "a".into(),
            config: Value::Null,
        });
        let dropped = DroppedIn(seen.clone());
        let polled = seen.clone();
        let mut future = Box::pin(in_scope(AccountScope::new(account), async move {
            let _dropped = dropped;
            polled.lock().unwrap().push(current_scope());
            std::future::pending::<()>().await;
        }));
        let mut cx = TaskContext::from_waker(std::task::Waker::noop());
        assert!(future.as_mut().poll(&mut cx).is_pending());
        assert_eq!(current_scope(), None, "the scope outlived the poll");
        drop(future);
        assert_eq!(current_scope(), None, "the scope outlived the drop");
        let tag = Some(("chat".to_owned(), "a".to_owned()));
        assert_eq!(*seen.lock().unwrap(), vec![tag.clone(), tag]);
    }

    /// An author's hook set after the SDK's (in the constructor, say) is kept and runs after the
    /// SDK's, which still records the panic's location.
    #[test]
    fn an_author_panic_hook_is_chained_not_replaced() {
        static AUTHOR_RAN: AtomicBool = AtomicBool::new(false);
        install_panic_hook();
        std::panic::set_hook(Box::new(|_| AUTHOR_RAN.store(true, Ordering::Relaxed)));
        chain_panic_hook();
        // Chaining twice does not wrap the SDK's hook in itself.
        chain_panic_hook();
        let caught = std::panic::catch_unwind(|| panic!("author test panic"));
        let location = take_panic_location();
        // std's hook back, so a failed assertion below prints its message.
        drop(std::panic::take_hook());
        assert!(caught.is_err());
        assert!(
            AUTHOR_RAN.load(Ordering::Relaxed),
            "the author's hook was dropped"
        );
        let location = location.expect("the SDK's hook recorded the location");
        assert!(location.contains("log.rs"), "{location}");
    }
}
