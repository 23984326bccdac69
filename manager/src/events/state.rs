//! Account state events for the event stream: live only, without an id, never journaled.
//!
//! The state is the snapshot's explicit `state` field (set by the supervisor, its one owner) with
//! the plugin's `connected` report; [`derive()`] is the one place that reads them. The status
//! board calls [`StatePublisher::publish`] under its lock at every write that can change them
//! (every `set_state`, every connection report), so each change is published, in order, however
//! short it lasts (`starting` may last microseconds).
//!
//! Publishing never waits: the changes go into a bounded broadcast ring of [`CAPACITY`]. With no
//! stream listening it costs one atomic load (the publisher counts its receivers itself: the
//! broadcast channel's own count takes its lock, at every write of every account). A stream that
//! falls more than [`CAPACITY`] changes behind loses the oldest ones and is told so with one
//! `event: resync` carrying every matching account's current state ([`resync_event`]).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::response::sse::Event;
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast;

use crate::{host::AccountKey, journal::Filter, status::AccountSnapshot};

/// How many changes a stream may fall behind before it gets a resync instead.
pub const CAPACITY: usize = 4096;

/// One account's state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateChange {
    /// Channel id.
    pub channel: String,
    /// Account id.
    pub account: String,
    /// The state before (`None`: the account is new to the status board).
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

/// Where the status board publishes state changes. Cheap to clone (one shared ring).
#[derive(Debug, Clone)]
pub struct StatePublisher {
    sender: broadcast::Sender<StateChange>,
    /// Receivers alive (each [`StateReceiver`] counts itself in and out).
    listeners: Arc<AtomicUsize>,
}

impl Default for StatePublisher {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            listeners: Arc::default(),
        }
    }
}

/// A receiver of state changes: a broadcast receiver that the publisher counts while it lives.
#[derive(Debug)]
pub struct StateReceiver {
    receiver: broadcast::Receiver<StateChange>,
    listeners: Arc<AtomicUsize>,
}

impl std::ops::Deref for StateReceiver {
    type Target = broadcast::Receiver<StateChange>;

    fn deref(&self) -> &Self::Target {
        &self.receiver
    }
}

impl std::ops::DerefMut for StateReceiver {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.receiver
    }
}

impl Drop for StateReceiver {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StatePublisher {
    /// A receiver of every change published from now on.
    pub fn subscribe(&self) -> StateReceiver {
        // Counted before it subscribes: a publish in between sends to nobody, which is harmless;
        // the other order could skip a change a receiver was already there for.
        self.listeners.fetch_add(1, Ordering::Relaxed);
        StateReceiver {
            receiver: self.sender.subscribe(),
            listeners: self.listeners.clone(),
        }
    }

    /// Publishes `key`'s change if `snapshot` differs from `before` (what [`derive()`] said before
    /// the write; `None` for an account new to the board) and a stream listens. Never blocks; the
    /// board calls it under its lock, so the changes of one account are published in order.
    pub fn publish(
        &self,
        key: &AccountKey,
        before: Option<(&'static str, Option<bool>)>,
        snapshot: &AccountSnapshot,
    ) {
        if self.listeners.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = derive(snapshot);
        if before == Some(now) {
            return;
        }
        // Err only when the last receiver went away meanwhile: nobody to tell.
        let _ = self.sender.send(StateChange {
            channel: key.channel.to_string(),
            account: key.account.to_string(),
            from: before.map(|(state, _)| state),
            to: now.0,
            connected: now.1,
        });
    }
}

/// One account's current state, as a resync lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrentState {
    /// Channel id.
    pub channel: String,
    /// Account id.
    pub account: String,
    /// The state now.
    pub state: &'static str,
    /// The plugin's connection report.
    pub connected: Option<bool>,
}

impl CurrentState {
    /// `key`'s current state from its snapshot.
    pub fn of(key: &AccountKey, snapshot: &AccountSnapshot) -> Self {
        let (state, connected) = derive(snapshot);
        Self {
            channel: key.channel.to_string(),
            account: key.account.to_string(),
            state,
            connected,
        }
    }
}

/// The `event: resync` a stream gets after losing `missed` changes: `{"missed": N, "accounts":
/// [{"channel", "account", "state", "connected"}…]}`, every account `filter` matches, so the
/// client can start over from there.
pub fn resync_event(missed: u64, current: &[CurrentState], filter: &Filter) -> Event {
    Event::default()
        .event("resync")
        .data(resync_data(missed, current, filter))
}

/// The data of [`resync_event`].
fn resync_data(missed: u64, current: &[CurrentState], filter: &Filter) -> String {
    let accounts: Vec<&CurrentState> = current
        .iter()
        .filter(|s| {
            filter.channel.as_ref().is_none_or(|c| *c == s.channel)
                && filter.account.as_ref().is_none_or(|a| *a == s.account)
        })
        .collect();
    json!({ "missed": missed, "accounts": accounts }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::AccountState;

    fn key() -> AccountKey {
        AccountKey::new("irc", "main")
    }

    #[test]
    fn every_change_is_published_in_order_and_nothing_else() {
        let publisher = StatePublisher::default();
        let mut snapshot = AccountSnapshot::default();
        // Nobody listens: nothing is kept for a later listener.
        snapshot.set_state(AccountState::Running);
        publisher.publish(&key(), None, &snapshot);
        let mut rx = publisher.subscribe();
        for state in [
            AccountState::RestartPending,
            AccountState::Starting,
            AccountState::Running,
            AccountState::Running,
        ] {
            let before = derive(&snapshot);
            snapshot.set_state(state);
            publisher.publish(&key(), Some(before), &snapshot);
        }
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|c| (c.from, c.to))
            .collect();
        assert_eq!(
            got,
            [
                (Some("running"), "restart-pending"),
                (Some("restart-pending"), "starting"),
                (Some("starting"), "running"),
            ]
        );
    }

    /// The publisher's own count of receivers (what lets a publish with no stream skip all
    /// work) follows them in and out.
    #[test]
    fn the_publisher_counts_its_receivers_in_and_out() {
        let publisher = StatePublisher::default();
        let count = || publisher.listeners.load(Ordering::Relaxed);
        assert_eq!(count(), 0);
        let (first, second) = (publisher.subscribe(), publisher.clone().subscribe());
        assert_eq!(count(), 2);
        drop(first);
        assert_eq!(count(), 1);
        drop(second);
        assert_eq!(count(), 0);
    }

    #[test]
    fn a_lagging_receiver_learns_how_much_it_missed() {
        let publisher = StatePublisher::default();
        let mut rx = publisher.subscribe();
        let mut snapshot = AccountSnapshot::default();
        for i in 0..CAPACITY + 10 {
            let before = derive(&snapshot);
            snapshot.connected = Some(i % 2 == 0);
            publisher.publish(&key(), Some(before), &snapshot);
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        let filter = Filter {
            channel: Some("irc".to_owned()),
            ..Filter::default()
        };
        let current = [
            CurrentState::of(&key(), &snapshot),
            CurrentState::of(&AccountKey::new("mqtt", "x"), &snapshot),
        ];
        // Only the matching account is listed.
        let data: serde_json::Value =
            serde_json::from_str(&resync_data(10, &current, &filter)).unwrap();
        assert_eq!(
            data,
            json!({"missed": 10, "accounts": [
                {"channel": "irc", "account": "main", "state": "stopped", "connected": false}
            ]})
        );
    }
}
