//! `channeld tail`: follows the event stream like `tail -f`, printing each inbound message, and
//! keeps following across a daemon restart by reconnecting with the last sequence number it
//! printed (so nothing is skipped and nothing printed twice).

use std::{
    io::{BufRead, BufReader, Write},
    time::Duration,
};

use serde_json::Value;

use crate::{
    cli::Target,
    client::{Client, ClientError},
    config::Config,
};

/// How long to wait before reconnecting.
const RETRY: Duration = Duration::from_millis(300);

/// The query for `target` after `cursor`.
fn path(target: Option<&Target>, cursor: Option<u64>) -> String {
    let mut params = Vec::new();
    if let Some(target) = target {
        params.push(format!("channel={}", encode(&target.channel)));
        if let Some(account) = &target.account {
            params.push(format!("account={}", encode(account)));
        }
    }
    if let Some(cursor) = cursor {
        params.push(format!("since={cursor}"));
    }
    if params.is_empty() {
        "/v1/events".into()
    } else {
        format!("/v1/events?{}", params.join("&"))
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One event of the stream.
#[derive(Debug, Default)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Follows the events of `target` (after `since`, else from now) and prints them to `out`:
/// forever, unless the daemon refuses the request before the first connection (bad token or
/// parameter), or `out` is closed.
pub fn follow(
    config: &Config,
    target: Option<&Target>,
    since: Option<u64>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let mut cursor = since;
    let mut connected = false;
    let mut lost: Option<String> = None;
    loop {
        let stream = Client::from_config(config).and_then(|c| c.stream(&path(target, cursor)));
        match stream {
            Ok(body) => {
                if lost.take().is_some() {
                    eprintln!("channeld: reconnected");
                }
                connected = true;
                let reader = BufReader::new(body.into_reader());
                match read_events(reader, &mut cursor, json, out) {
                    Ok(()) => lost = Some("the stream ended".into()),
                    Err(Stop::Output) => return Ok(()),
                    Err(Stop::Input(e)) => lost = Some(e),
                }
                eprintln!(
                    "channeld: {}; reconnecting after seq {}",
                    lost.as_deref().unwrap_or(""),
                    cursor.map_or("(none)".into(), |c| c.to_string())
                );
            }
            Err(e @ ClientError::Failed(_)) if !connected => return Err(e),
            Err(e) => {
                let text = e.to_string();
                if lost.as_deref() != Some(text.as_str()) {
                    eprintln!("channeld: {text}; retrying");
                }
                lost = Some(text);
            }
        }
        std::thread::sleep(RETRY);
    }
}

/// Why reading stopped.
enum Stop {
    /// The output is closed: stop for good.
    Output,
    /// The stream broke: reconnect.
    Input(String),
}

fn read_events(
    reader: impl BufRead,
    cursor: &mut Option<u64>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), Stop> {
    let mut event = SseEvent::default();
    for line in reader.lines() {
        let line = line.map_err(|e| Stop::Input(e.to_string()))?;
        if line.is_empty() {
            // An event without data (such as the blank line after a keep-alive comment) is not
            // dispatched.
            let event = std::mem::take(&mut event);
            if !event.data.is_empty() {
                dispatch(event, cursor, json, out)?;
            }
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = Some(value.to_owned()),
            "data" => {
                if !event.data.is_empty() {
                    event.data.push('\n');
                }
                event.data.push_str(value);
            }
            _ => {}
        }
    }
    Ok(())
}

fn dispatch(
    event: SseEvent,
    cursor: &mut Option<u64>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), Stop> {
    let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
    match event.event.as_deref() {
        None | Some("message") => {
            if json {
                writeln!(out, "{}", event.data).map_err(|_| Stop::Output)?;
            } else {
                let field = |k: &str| data[k].as_str().unwrap_or("").to_owned();
                writeln!(
                    out,
                    "{} {}:{} [{}] {}: {}",
                    data["seq"],
                    field("channel"),
                    field("account"),
                    field("conversation"),
                    field("sender"),
                    field("text")
                )
                .map_err(|_| Stop::Output)?;
            }
            out.flush().map_err(|_| Stop::Output)?;
        }
        Some("ready") if cursor.is_none() => *cursor = data["after"].as_u64(),
        Some("pruned") => {
            eprintln!(
                "channeld: messages {} to {} were pruned (retention) before they could be read",
                data["from"], data["to"]
            );
        }
        _ => {}
    }
    if let Some(id) = event.id.and_then(|id| id.parse().ok()) {
        *cursor = Some(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_the_target_and_the_cursor() {
        let target: Target = "web hook:Main".parse().unwrap();
        assert_eq!(
            path(Some(&target), Some(7)),
            "/v1/events?channel=web%20hook&account=Main&since=7"
        );
        assert_eq!(path(None, None), "/v1/events");
    }

    #[test]
    fn events_move_the_cursor_and_print_messages() {
        let stream = "event: ready\ndata: {\"after\":3,\"lastSeq\":3}\n\n: keep-alive\n\n\
                      id: 4\ndata: {\"seq\":4,\"channel\":\"c\",\"account\":\"a\",\"conversation\":\"r\",\"sender\":\"s\",\"text\":\"hi\"}\n\n";
        let (mut cursor, mut out) = (None, Vec::new());
        assert!(read_events(stream.as_bytes(), &mut cursor, false, &mut out).is_ok());
        assert_eq!(cursor, Some(4));
        assert_eq!(String::from_utf8(out).unwrap(), "4 c:a [r] s: hi\n");
    }
}
