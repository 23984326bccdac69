//! Forwards the plugin's `tracing` events to the host. A plugin has its own copy of `tracing`'s
//! global dispatcher (statics are per dylib), which knows nothing of the host's subscriber; the
//! SDK installs this layer inside the plugin at `init`.
//!
//! Each account task runs inside a span named [`ACCOUNT_SPAN`] carrying `channel` and `account`;
//! events inside it (and inside tasks the author spawns with `.in_current_span()`) reach the host
//! tagged with that account.

use std::{
    fmt::Write as _,
    sync::{
        OnceLock,
        atomic::{AtomicU8, Ordering},
    },
};

use abi_stable::std_types::RString;
use serde_json::{Map, Value};
use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
    level_filters::LevelFilter,
    span::{Attributes, Id},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*, registry::LookupSpan};

use crate::abi::{HostHandle, LogLevel, LogRecord};

/// The span name the SDK wraps every account task in.
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

thread_local! {
    static LAST_PANIC_LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs the plugin's panic hook (once). The plugin has its own copy of std and so its own
/// panic hook. Panics in plugin code are caught by the SDK and returned as errors carrying their
/// message; the hook keeps the location for that error and sends it to the host's log at debug
/// level (once `init` has connected the log), instead of printing on the host's stderr.
pub(crate) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            let message = super::fence::panic_message(info.payload());
            tracing::debug!(%location, "plugin code panicked: {message}");
            LAST_PANIC_LOCATION.with(|l| *l.borrow_mut() = Some(location));
        }));
    });
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
        let (channel, account) = ctx
            .event_scope(event)
            .and_then(|scope| {
                scope.into_iter().find_map(|span| {
                    span.extensions()
                        .get::<AccountTag>()
                        .map(|t| (t.channel.clone(), t.account.clone()))
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

#[derive(Default)]
struct Fields {
    message: String,
    map: Map<String, Value>,
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
