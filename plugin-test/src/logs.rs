//! The plugin's `tracing` events, captured for the test.

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use channeld_plugin_abi::sdk::__private::harness;
use serde_json::{Map, Value};
use tracing::{Dispatch, Event, Level, Subscriber, instrument::WithSubscriber as _};
use tracing_subscriber::{Layer, layer::Context, prelude::*};

/// One `tracing` event of the plugin.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Its level.
    pub level: Level,
    /// Its target (the module path, unless the event names one).
    pub target: String,
    /// The message.
    pub message: String,
    /// The other fields, by name.
    pub fields: Map<String, Value>,
    /// The account whose task (or `ctx.spawn`ed task) emitted it, if any.
    pub account: Option<String>,
}

/// The shared list of lines and the subscriber that fills it.
#[derive(Clone, Default)]
pub(crate) struct Capture {
    lines: Arc<Mutex<Vec<LogLine>>>,
}

impl Capture {
    pub(crate) fn dispatch(&self) -> Dispatch {
        Dispatch::new(tracing_subscriber::registry().with(Collect(self.lines.clone())))
    }

    /// `future` with the capturing subscriber attached, whichever thread polls it.
    pub(crate) fn attach<F: Future>(&self, future: F) -> impl Future<Output = F::Output> + use<F> {
        future.with_subscriber(self.dispatch())
    }

    pub(crate) fn lines(&self) -> Vec<LogLine> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Collect(Arc<Mutex<Vec<LogLine>>>);

impl<S: Subscriber> Layer<S> for Collect {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = harness::LogFields::default();
        event.record(&mut fields);
        let line = LogLine {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            message: fields.message,
            fields: fields.map,
            account: harness::log_scope().map(|(_, account)| account),
        };
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
}
