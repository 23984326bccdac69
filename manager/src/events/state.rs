//! Account state events for the event stream: live only, without an id, never journaled.
//!
//! The state is the snapshot's explicit `state` field (set by the supervisor, its one owner) with
//! the plugin's `connected` report, sampled every [`INTERVAL`] while at least one stream listens:
//! [`derive()`] is the one place that reads them.

use std::{collections::HashMap, time::Duration};

use axum::response::sse::Event;
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{host::AccountKey, journal::Filter, status::AccountSnapshot, supervise::Supervisor};

/// How often the status board is sampled while someone listens.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// One account's state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateChange {
    /// Channel id.
    pub channel: String,
    /// Account id.
    pub account: String,
    /// The state before (`None`: first seen).
    pub from: Option<&'static str>,
    /// The state now.
    pub to: &'static str,
    /// The plugin's connection report.
    pub connected: Option<bool>,
}

impl StateChange {
    /// Whether a stream with `filter` wants it (a conversation filter does not apply).
    pub fn matches(&self, filter: &Filter) -> bool {
        filter.channel.as_ref().is_none_or(|c| *c == self.channel)
            && filter.account.as_ref().is_none_or(|a| *a == self.account)
    }

    /// As an SSE event (`event: state`, no id).
    pub fn event(&self) -> Event {
        Event::default()
            .event("state")
            .data(json!(self).to_string())
    }
}

/// An account's state and connection, as the stream reports them.
pub fn derive(snapshot: &AccountSnapshot) -> (&'static str, Option<bool>) {
    (snapshot.state.as_str(), snapshot.connected)
}

/// Publishes state changes of `supervisor`'s accounts to `states` until `stop`.
///
/// # Cancellation safety
/// It only samples and publishes; stopping it at any await loses nothing.
pub async fn watch(
    supervisor: Supervisor,
    states: broadcast::Sender<StateChange>,
    stop: CancellationToken,
) {
    let mut known: HashMap<AccountKey, (&'static str, Option<bool>)> = HashMap::new();
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if states.receiver_count() == 0 {
            // Nobody listens: forget, so a new listener is not told of old changes.
            known.clear();
            continue;
        }
        let first = known.is_empty();
        for (channel, accounts) in supervisor.snapshot() {
            for (account, snapshot) in accounts {
                let now = derive(&snapshot);
                let key = AccountKey::new(channel.clone(), account);
                let before = known.insert(key.clone(), now);
                if first || before == Some(now) {
                    continue;
                }
                let _ = states.send(StateChange {
                    channel: key.channel,
                    account: key.account,
                    from: before.map(|(state, _)| state),
                    to: now.0,
                    connected: now.1,
                });
            }
        }
    }
}
