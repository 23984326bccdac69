//! The host's log on stderr: text or one JSON object per line, filtered by `RUST_LOG`.
//!
//! An invalid `RUST_LOG` is an error, not a silent fallback to the default. In JSON, the fields a
//! plugin attaches to its events arrive as fields of their own (`"fields": {"starts": 2, …}`),
//! next to the `channel` and `account` the host takes from the plugin's link; a plugin field
//! whose name the host already uses is kept as `plugin.<name>`.

use std::{fmt, io::IsTerminal as _};

use serde_json::{Map, Value};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{Format, Json, Writer},
        time::SystemTime,
    },
    registry::LookupSpan,
};

/// The target of every event re-emitted from a plugin's log.
pub const PLUGIN_LOG_TARGET: &str = "channeld::plugin";

/// The name under which a plugin's own fields travel from the host's event to the formatter.
pub const PLUGIN_FIELDS: &str = "fields";

/// The log could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `RUST_LOG` does not parse.
    #[error("invalid RUST_LOG {value:?}: {reason} (e.g. RUST_LOG=info or RUST_LOG=channeld=debug)")]
    Filter {
        /// The variable's value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// The filter `RUST_LOG` asks for: `info` when unset or empty, an error when it does not parse.
pub fn filter_from(value: Option<&str>) -> Result<EnvFilter, LogError> {
    match value.map(str::trim) {
        None | Some("") => Ok(EnvFilter::new("info")),
        Some(directives) => EnvFilter::builder()
            .parse(directives)
            .map_err(|e| LogError::Filter {
                value: directives.to_owned(),
                reason: e.to_string(),
            }),
    }
}

/// Installs the process's subscriber on stderr; `json` picks the JSON format.
pub fn init(json: bool) -> Result<(), LogError> {
    let value = std::env::var("RUST_LOG").ok();
    let filter = filter_from(value.as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder
            .json()
            .event_format(PluginFieldsJson::default())
            .init();
    } else {
        builder.init();
    }
    Ok(())
}

/// tracing-subscriber's JSON format, with a plugin event's fields spread out as real fields.
pub struct PluginFieldsJson(Format<Json, SystemTime>);

impl Default for PluginFieldsJson {
    fn default() -> Self {
        Self(Format::default().json())
    }
}

impl<S, N> FormatEvent<S, N> for PluginFieldsJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if event.metadata().target() != PLUGIN_LOG_TARGET {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match spread_plugin_fields(&line) {
            Some(spread) => writeln!(writer, "{spread}"),
            None => writer.write_str(&line),
        }
    }
}

/// Replaces the `fields` string of one JSON log line by its keys; `None` if there is nothing to
/// spread (the line is then written as it was).
fn spread_plugin_fields(line: &str) -> Option<String> {
    let mut object: Map<String, Value> = serde_json::from_str(line.trim_end()).ok()?;
    let host_fields = object.get_mut("fields")?.as_object_mut()?;
    let Some(Value::String(text)) = host_fields.remove(PLUGIN_FIELDS) else {
        return None;
    };
    if let Ok(Value::Object(plugin_fields)) = serde_json::from_str::<Value>(&text) {
        for (key, value) in plugin_fields {
            let key = if host_fields.contains_key(&key) {
                format!("plugin.{key}")
            } else {
                key
            };
            host_fields.insert(key, value);
        }
    } else if !text.is_empty() {
        // Not an object: kept, under a name that says whose it is.
        host_fields.insert("plugin.fields".to_owned(), Value::String(text));
    }
    serde_json::to_string(&object).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use channeld_plugin_abi::abi::{LogLevel, LogRecord};

    use super::*;
    use crate::{
        clock::SystemClock,
        host::{AccountKey, AccountLink, HostSink},
        status::StatusBoard,
    };

    #[test]
    fn an_invalid_rust_log_is_an_error_and_unset_is_info() {
        let err = filter_from(Some("debug,channeld=loud")).unwrap_err();
        assert!(err.to_string().contains("invalid RUST_LOG"), "{err}");
        assert!(filter_from(None).is_ok());
        assert!(filter_from(Some("channeld=debug,warn")).is_ok());
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One plugin log record through an account's link, as the JSON log shows it.
    fn logged(record: LogRecord) -> Value {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .event_format(PluginFieldsJson::default())
            .finish();
        let board: Arc<dyn HostSink> = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
        let link = AccountLink::for_account(AccountKey::new("fixture", "main"), 1, board);
        tracing::subscriber::with_default(subscriber, || link.log(record));
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn record(fields: &str, channel: &str, account: &str) -> LogRecord {
        LogRecord {
            level: LogLevel::Warn,
            target: "fixture".into(),
            message: "fixture account started".into(),
            fields: fields.into(),
            channel: channel.into(),
            account: account.into(),
        }
    }

    #[test]
    fn plugin_fields_are_json_fields_and_channel_and_account_come_from_the_link() {
        let line = logged(record(
            r#"{"starts":2,"flavour":"salty","channel":"spoofed"}"#,
            "other",
            "someone-else",
        ));
        let fields = &line["fields"];
        assert_eq!(fields["starts"], 2, "{line}");
        assert_eq!(fields["flavour"], "salty", "{line}");
        assert_eq!(fields["message"], "fixture account started", "{line}");
        assert_eq!(fields["channel"], "fixture", "the link's channel: {line}");
        assert_eq!(fields["account"], "main", "the link's account: {line}");
        assert_eq!(fields["plugin.channel"], "spoofed", "kept, renamed: {line}");
        assert!(fields.get("fields").is_none(), "{line}");
    }
}
