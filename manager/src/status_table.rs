//! The human table `channeld status` prints.

use std::fmt::Write as _;

use serde_json::Value;

/// The state word for one snapshot: its `state` field, as the supervisor set it (`-` from a
/// daemon too old to send one).
pub fn state_of(snapshot: &Value) -> &str {
    snapshot["state"].as_str().unwrap_or("-")
}

fn ago(now_ms: i64, at: Option<i64>) -> String {
    let Some(at) = at else { return "-".into() };
    let secs = ((now_ms - at) / 1000).max(0);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn columns(rows: &[Vec<String>]) -> String {
    let count = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..count)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == count {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Renders `{"plugins": [listing, …]}` as a table.
pub fn render_plugins(listing: &Value) -> String {
    let mut rows = vec![
        [
            "CHANNEL",
            "STATE",
            "VERSION",
            "MAPPED",
            "ISOLATION",
            "HASH",
            "FILE",
            "LOAD ERROR",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for p in listing["plugins"].as_array().into_iter().flatten() {
        let text = |k: &str| p[k].as_str().unwrap_or("-").to_owned();
        let mut hash = text("hash");
        hash.truncate(12);
        rows.push(vec![
            text("channel"),
            text("state"),
            text("version"),
            p["versionsMapped"].as_u64().unwrap_or(0).to_string(),
            isolation(&p["isolation"]),
            hash,
            text("file"),
            text("loadError"),
        ]);
    }
    let mut out = columns(&rows);
    if rows.len() == 1 {
        out.push_str("(no plugin files)\n");
    }
    out
}

/// `process pid 123` for an isolated channel (`process (no child)` between children), `-` for
/// one in the daemon's process.
fn isolation(isolation: &Value) -> String {
    match (isolation["mode"].as_str(), isolation["pid"].as_u64()) {
        (Some(mode), Some(pid)) => format!("{mode} pid {pid}"),
        (Some(mode), None) => format!("{mode} (no child)"),
        _ => "-".into(),
    }
}

/// Renders `{"channels": {channel: {account: snapshot}}}` as a table.
pub fn render(status: &Value, now_ms: i64) -> String {
    let mut rows = vec![[
        "CHANNEL".to_owned(),
        "ACCOUNT".into(),
        "STATE".into(),
        "CONNECTED".into(),
        "RESTARTS".into(),
        "MESSAGES".into(),
        "SINCE".into(),
        "HEALTH".into(),
        "MONITOR RESTART".into(),
        "LAST ERROR".into(),
    ]];
    if let Some(channels) = status["channels"].as_object() {
        for (channel, accounts) in channels {
            for (account, s) in accounts.as_object().into_iter().flatten() {
                let since = if s["running"].as_bool() == Some(true) {
                    s["lastStartAt"].as_i64()
                } else {
                    s["lastStopAt"].as_i64()
                };
                rows.push([
                    channel.clone(),
                    account.clone(),
                    state_of(s).into(),
                    match s["connected"].as_bool() {
                        Some(true) => "yes".into(),
                        Some(false) => "no".into(),
                        None => "-".into(),
                    },
                    s["reconnectAttempts"].as_u64().unwrap_or(0).to_string(),
                    s["inboundMessages"].as_u64().unwrap_or(0).to_string(),
                    ago(now_ms, since),
                    s["healthVerdict"].as_str().unwrap_or("-").to_owned(),
                    ago(now_ms, s["healthRestartAt"].as_i64()),
                    s["lastError"].as_str().unwrap_or("-").to_owned(),
                ]);
            }
        }
    }
    let mut rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    crate::cluster::owner_column(status, &mut rows);
    let mut out = columns(&rows);
    if rows.len() == 1 {
        out.push_str("(no accounts)\n");
    }
    out
}
