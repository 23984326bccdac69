//! Restart logging that stays readable under a crash storm: every event is one line at debug,
//! and at info one aggregated line per channel per interval.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

#[derive(Default, Clone, Copy)]
struct Counts {
    crashes: u64,
    gave_up: u64,
}

/// Per-channel crash counts since the last aggregated line.
pub(super) struct RestartLog {
    interval: Duration,
    window: Mutex<(Option<Instant>, BTreeMap<String, Counts>)>,
}

impl RestartLog {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            window: Mutex::new((None, BTreeMap::new())),
        }
    }

    /// Records a crash (and whether the account was given up on); emits the aggregated lines
    /// when the interval has passed.
    pub(super) fn record(&self, channel: &str, gave_up: bool, now: Instant) {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up first: only a channel's first crash of a window allocates its key.
        if !window.1.contains_key(channel) {
            window.1.insert(channel.to_owned(), Counts::default());
        }
        let counts = window
            .1
            .get_mut(channel)
            .expect("the channel was just inserted");
        counts.crashes += 1;
        counts.gave_up += u64::from(gave_up);
        let started = *window.0.get_or_insert(now);
        if now.duration_since(started) >= self.interval {
            emit(&std::mem::take(&mut window.1), now.duration_since(started));
            window.0 = Some(now);
        }
    }

    /// Emits whatever was counted (at shutdown).
    pub(super) fn flush(&self) {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let span = window.0.map(|s| s.elapsed()).unwrap_or_default();
        emit(&std::mem::take(&mut window.1), span);
        window.0 = None;
    }
}

fn emit(counts: &BTreeMap<String, Counts>, span: Duration) {
    for (channel, c) in counts {
        tracing::info!(
            channel = %channel,
            crashes = c.crashes,
            gave_up = c.gave_up,
            "{} account task(s) ended unrequested in the last {}s; {} account(s) given up on",
            c.crashes,
            span.as_secs(),
            c.gave_up
        );
    }
}
