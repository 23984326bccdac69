//! `GET /v1/events`: the journal as a Server-Sent Events stream for applications.
//!
//! * Every journaled message is an event with `id: <seq>` and the message as JSON `data`.
//! * Where to start: the `Last-Event-ID` header (a reconnecting client), else `?since=SEQ`, else
//!   the live tail. Every message after the cursor is read from the journal, in order, with no
//!   gap and no duplicate, then the stream follows new commits.
//! * Filters: `channel`, `account`, `conversation` (exact; the account id is normalised).
//! * A cursor older than retention gets one `event: pruned` (`{"from":…,"to":…}`, with
//!   `id: <to>`) naming the sequence numbers that are gone, then the stream goes on.
//! * `event: ready` (`{"after":…,"lastSeq":…}`) opens every stream: from there on nothing is
//!   missed, and a client that started at the live tail learns its cursor.
//! * `event: state` (no id, live only, never journaled): an account's state changed
//!   ([`state`]), published at the change itself, so none is missed however short it was.
//! * `event: resync` (no id): the stream fell more than [`state::CAPACITY`] state changes behind
//!   and lost the oldest; it carries how many (`missed`) and every matching account's current
//!   state (`accounts`), from which the client starts over.
//!
//! Each stream reads the journal at its own cursor, a batch at a time, only as fast as its client
//! takes events: nothing is queued in memory per consumer, so a slow consumer slows no plugin and
//! no other consumer. New commits wake streams through a watch of the latest sequence number.

pub mod state;

use std::{collections::VecDeque, convert::Infallible, sync::Arc};

use axum::{
    Json,
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    host::AccountKey,
    journal::{Filter, Journal},
};
pub use state::{CurrentState, StateChange, StatePublisher};

/// Messages read from the journal per batch.
const BATCH: usize = 256;

/// Every account's current state, for a resync.
pub type CurrentStates = Arc<dyn Fn() -> Vec<CurrentState> + Send + Sync>;

/// Every account of `supervisor` with its current state (what a resync lists).
pub fn current_states(supervisor: crate::supervise::Supervisor) -> CurrentStates {
    Arc::new(move || {
        supervisor
            .snapshot()
            .into_iter()
            .flat_map(|(channel, accounts)| {
                accounts.into_iter().map(move |(account, snapshot)| {
                    CurrentState::of(&AccountKey::new(channel.clone(), account), &snapshot)
                })
            })
            .collect()
    })
}

/// What every event stream reads from.
pub struct EventHub {
    journal: Arc<Journal>,
    states: StatePublisher,
    current: CurrentStates,
    closing: CancellationToken,
    /// Every connected stream's cursor (for the metrics' consumer lag).
    cursors: std::sync::Mutex<Vec<std::sync::Weak<std::sync::atomic::AtomicU64>>>,
}

impl EventHub {
    /// A hub over `journal`, with no state events.
    pub fn new(journal: Arc<Journal>) -> Arc<Self> {
        Self::with_states(journal, StatePublisher::default(), Arc::new(Vec::new))
    }

    /// A hub over `journal` whose streams also carry the changes `states` publishes (the status
    /// board's), and `current` for a stream that has to resync.
    pub fn with_states(
        journal: Arc<Journal>,
        states: StatePublisher,
        current: CurrentStates,
    ) -> Arc<Self> {
        Arc::new(Self {
            journal,
            states,
            current,
            closing: CancellationToken::new(),
            cursors: Default::default(),
        })
    }

    /// The journal.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Where account state changes are published.
    pub fn states(&self) -> &StatePublisher {
        &self.states
    }

    /// The cursor of every connected stream.
    pub fn consumer_cursors(&self) -> Vec<u64> {
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        cursors.retain(|c| c.strong_count() > 0);
        cursors
            .iter()
            .filter_map(|c| c.upgrade())
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    fn track_cursor(&self, cursor: u64) -> Arc<std::sync::atomic::AtomicU64> {
        let position = Arc::new(std::sync::atomic::AtomicU64::new(cursor));
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        cursors.retain(|c| c.strong_count() > 0);
        cursors.push(Arc::downgrade(&position));
        position
    }

    /// Ends every stream (the daemon is stopping; clients reconnect with `Last-Event-ID`).
    pub fn close(&self) {
        self.closing.cancel();
    }
}

/// A request the stream cannot serve: `{"error": …}` with 400 or 404.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// A malformed parameter or header.
    #[error("{name}: {reason}")]
    BadParameter {
        /// The parameter or header.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The daemon has no journal.
    #[error("no journal: this daemon has no event stream")]
    NoJournal,
}

impl IntoResponse for EventsError {
    fn into_response(self) -> Response {
        let status = match self {
            Self::BadParameter { .. } => StatusCode::BAD_REQUEST,
            Self::NoJournal => StatusCode::NOT_FOUND,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Read after this sequence number (`None`: from the live tail).
    pub after: Option<u64>,
    /// Which messages.
    pub filter: Filter,
}

fn bad(name: &str, reason: impl Into<String>) -> EventsError {
    let kind = if name == "Last-Event-ID" {
        "header"
    } else {
        "parameter"
    };
    EventsError::BadParameter {
        name: format!("{kind} {name}"),
        reason: reason.into(),
    }
}

fn parse_seq(name: &str, value: &str) -> Result<u64, EventsError> {
    value.trim().parse().map_err(|_| {
        bad(
            name,
            format!("expected a sequence number (a non-negative integer), got {value:?}"),
        )
    })
}

/// Parses the query parameters and the `Last-Event-ID` header (which wins over `since`).
pub fn parse_request(
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Result<Request, EventsError> {
    let mut request = Request::default();
    for (name, value) in params {
        let slot = match name.as_str() {
            "since" => {
                request.after = Some(parse_seq("since", value)?);
                continue;
            }
            "channel" => &mut request.filter.channel,
            "account" => &mut request.filter.account,
            "conversation" => &mut request.filter.conversation,
            other => {
                return Err(bad(
                    other,
                    "unknown parameter: expected since, channel, account or conversation",
                ));
            }
        };
        if value.is_empty() {
            return Err(bad(name, "must not be empty"));
        }
        if slot.is_some() {
            return Err(bad(name, "given more than once"));
        }
        *slot = Some(if name == "account" {
            channeld_plugin_abi::normalize_account_id(value)
        } else {
            value.clone()
        });
    }
    if let Some(id) = headers.get("last-event-id") {
        let id = id
            .to_str()
            .map_err(|_| bad("Last-Event-ID", "not ASCII text"))?;
        request.after = Some(parse_seq("Last-Event-ID", id)?);
    }
    Ok(request)
}

/// Answers `GET /v1/events`.
pub fn respond(
    hub: Option<Arc<EventHub>>,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Response {
    let Some(hub) = hub else {
        return EventsError::NoJournal.into_response();
    };
    match parse_request(headers, params) {
        Ok(request) => Sse::new(stream(hub, request))
            .keep_alive(KeepAlive::default())
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// One consumer's position.
struct Consumer {
    hub: Arc<EventHub>,
    filter: Arc<Filter>,
    cursor: u64,
    /// The cursor as the metrics see it.
    position: Arc<std::sync::atomic::AtomicU64>,
    latest: watch::Receiver<u64>,
    states: Option<state::StateReceiver>,
    pending: VecDeque<Event>,
}

/// The event stream for `request`.
pub fn stream(
    hub: Arc<EventHub>,
    request: Request,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let mut latest = hub.journal.subscribe();
    let last = *latest.borrow_and_update();
    let cursor = request.after.unwrap_or(last);
    let ready = Event::default()
        .event("ready")
        .data(json!({ "after": cursor, "lastSeq": last }).to_string());
    let consumer = Consumer {
        states: Some(hub.states.subscribe()),
        filter: Arc::new(request.filter),
        cursor,
        position: hub.track_cursor(cursor),
        latest,
        pending: VecDeque::from([ready]),
        hub,
    };
    stream::unfold(consumer, |mut c| async move {
        let event = c.next().await?;
        Some((Ok(event), c))
    })
}

impl Consumer {
    /// The next event; `None` ends the stream.
    ///
    /// # Cancellation safety
    /// Dropping it mid-read loses nothing the client received: the cursor moves only once a
    /// batch has been read, and the client resumes by the last id it got.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.hub.closing.is_cancelled() {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let latest = *self.latest.borrow_and_update();
            if self.cursor < latest {
                self.read(latest).await?;
                continue;
            }
            tokio::select! {
                _ = self.hub.closing.cancelled() => return None,
                changed = self.latest.changed() => changed.ok()?,
                change = recv_state(&mut self.states) => match change {
                    Some(Ok(change)) if change.matches(&self.filter) => {
                        self.pending.push_back(change.event());
                    }
                    Some(Ok(_)) | None => {}
                    Some(Err(missed)) => {
                        let current = (self.hub.current)();
                        tracing::debug!(missed, "an event stream fell behind the state changes; resync");
                        self.pending.push_back(state::resync_event(missed, &current, &self.filter));
                    }
                },
            }
        }
    }

    /// Reads the next batch after the cursor into `pending`.
    async fn read(&mut self, upto: u64) -> Option<()> {
        let (journal, filter, after) = (self.hub.journal.clone(), self.filter.clone(), self.cursor);
        let read =
            tokio::task::spawn_blocking(move || journal.read_after(after, upto, &filter, BATCH))
                .await;
        let batch = match read {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                tracing::warn!("event stream ended: {e}");
                return None;
            }
            Err(e) => {
                tracing::warn!("event stream ended: journal read failed: {e}");
                return None;
            }
        };
        if let Some((from, to)) = batch.pruned {
            self.pending.push_back(
                Event::default()
                    .event("pruned")
                    .id(to.to_string())
                    .data(json!({ "from": from, "to": to }).to_string()),
            );
        }
        for message in batch.messages {
            let data = serde_json::to_string(&message).unwrap_or_default();
            self.pending
                .push_back(Event::default().id(message.seq.to_string()).data(data));
        }
        self.cursor = batch.cursor;
        self.position
            .store(batch.cursor, std::sync::atomic::Ordering::Relaxed);
        Some(())
    }
}

/// The next state change, or how many were lost (`Err`); pending forever once the sender is gone.
///
/// # Cancellation safety
/// `broadcast::Receiver::recv` is cancellation safe: a change not returned stays queued.
async fn recv_state(states: &mut Option<state::StateReceiver>) -> Option<Result<StateChange, u64>> {
    let Some(receiver) = states else {
        return std::future::pending().await;
    };
    match receiver.recv().await {
        Ok(change) => Some(Ok(change)),
        Err(broadcast::error::RecvError::Lagged(missed)) => Some(Err(missed)),
        Err(broadcast::error::RecvError::Closed) => {
            *states = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn last_event_id_wins_over_since_and_the_account_is_normalised() {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", "42".parse().unwrap());
        let request = parse_request(
            &headers,
            &params(&[
                ("since", "7"),
                ("channel", "irc"),
                ("account", "Libera Chat"),
            ]),
        )
        .unwrap();
        assert_eq!(request.after, Some(42));
        assert_eq!(request.filter.channel.as_deref(), Some("irc"));
        assert_eq!(
            request.filter.account,
            Some(channeld_plugin_abi::normalize_account_id("Libera Chat"))
        );
        assert_eq!(
            parse_request(&HeaderMap::new(), &[]).unwrap(),
            Request::default()
        );
    }

    #[test]
    fn bad_input_is_named() {
        let err = |pairs: &[(&str, &str)]| {
            parse_request(&HeaderMap::new(), &params(pairs))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[("since", "x")]).starts_with("parameter since: "));
        assert!(err(&[("channel", "a"), ("channel", "b")]).contains("more than once"));
        assert!(err(&[("acount", "a")]).starts_with("parameter acount: unknown parameter"));
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", "soon".parse().unwrap());
        let err = parse_request(&headers, &[]).unwrap_err().to_string();
        assert!(err.starts_with("header Last-Event-ID: "), "{err}");
    }
}
