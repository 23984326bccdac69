//! A consumer of `GET /v1/events` for the channel tests: a thread reads the stream and hands over
//! each event's name and data.

use std::{
    io::{BufRead, BufReader},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::daemon::{Daemon, PATIENCE};

/// One server-sent event: its name (`""` for a message) and data.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: String,
    pub data: Value,
}

/// A live `GET /v1/events` stream.
pub struct Events {
    events: mpsc::Receiver<Event>,
}

impl Events {
    /// Connects to the daemon's stream with `query` (e.g. `?channel=irc`).
    pub fn connect(daemon: &Daemon, query: &str) -> Self {
        Self::connect_after(daemon, query, None)
    }

    /// [`Events::connect`] replaying the journal after message `last_id` (`Last-Event-ID`).
    pub fn connect_after(daemon: &Daemon, query: &str, last_id: Option<u64>) -> Self {
        let (addr, token) = daemon.api();
        let mut request = ureq::get(format!("http://{addr}/v1/events{query}"))
            .header("Authorization", format!("Bearer {token}"));
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.call().unwrap();
        let reader = BufReader::new(response.into_body().into_reader());
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut event, mut data) = (String::new(), String::new());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !data.is_empty() {
                        let parsed = Event {
                            event: std::mem::take(&mut event),
                            data: serde_json::from_str(&data).unwrap(),
                        };
                        if tx.send(parsed).is_err() {
                            return;
                        }
                    }
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
        });
        Self { events }
    }

    /// The next event, waiting up to [`PATIENCE`].
    pub fn next(&self) -> Event {
        self.events
            .recv_timeout(PATIENCE)
            .expect("no event from the stream in time")
    }

    /// The next event within `wait`, if any.
    pub fn try_next(&self, wait: Duration) -> Option<Event> {
        self.events.recv_timeout(wait).ok()
    }

    /// The next message event (skipping others).
    pub fn next_message(&self) -> Value {
        loop {
            let event = self.next();
            if event.event.is_empty() {
                return event.data;
            }
        }
    }

    /// Message events arriving within `wait`.
    pub fn messages_within(&self, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while let Ok(event) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if event.event.is_empty() {
                got.push(event.data);
            }
        }
        got
    }
}

/// Polls `GET /v1/outbox` until no message is queued or sending (bounded by [`PATIENCE`]).
pub fn outbox_idle(daemon: &Daemon) {
    let (addr, token) = daemon.api();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats: Value = ureq::get(format!("http://{addr}/v1/outbox"))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        if stats["outbox"]["waiting"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox never emptied: {stats}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
