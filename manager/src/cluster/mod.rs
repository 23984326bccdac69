//! The cluster: several channeld nodes share the accounts through etcd, and no account ever runs
//! on two nodes at once (docs/cluster.md).
//!
//! One file per job: [`config`] (`[cluster]`), `membership` (who is alive, with which channels
//! and config), `assignment` (rendezvous hashing), `ownership` (an owner key per account, on the
//! owner's lease, created only if absent), `fence` (keep-alive; nothing runs once the lease might
//! have expired), `intent` (manual stops and logouts stored in etcd), `forward` (user operations
//! on a non-owner go to the owner), and `node` (the loop that ties them together).
//!
//! Everything but [`config`] needs the `cluster` cargo feature (the etcd client needs `protoc`
//! to build). Without a `[cluster]` section channeld runs alone, exactly as without this module.

pub mod config;

#[cfg(feature = "cluster")]
pub mod assignment;
#[cfg(feature = "cluster")]
pub mod fence;
#[cfg(feature = "cluster")]
pub mod forward;
#[cfg(feature = "cluster")]
pub mod intent;
#[cfg(feature = "cluster")]
pub mod membership;
#[cfg(feature = "cluster")]
pub mod node;
#[cfg(feature = "cluster")]
pub mod ownership;

use axum::{Json, http::StatusCode};
use serde_json::Value;

use crate::api::ApiError;

/// `GET /v1/cluster`: the nodes, their channels, their account counts and their lease age; 404
/// on a node that runs alone.
pub async fn api_view() -> Result<Json<Value>, ApiError> {
    #[cfg(feature = "cluster")]
    if let Some(node) = node::current() {
        return Ok(Json(node.view()));
    }
    Err(ApiError(
        StatusCode::NOT_FOUND,
        "this channeld is not in a cluster (no [cluster] section)".into(),
    ))
}

/// A user operation on a cluster node: applied by the account's owner (forwarded to it when this
/// node is not the owner), with stops and logouts recorded in etcd. `None` on a node that runs
/// alone (the caller runs the operation itself).
pub async fn intercept(
    channel: &str,
    account: Option<&str>,
    op: &str,
) -> Option<Result<Json<Value>, ApiError>> {
    #[cfg(feature = "cluster")]
    if let Some(node) = node::current() {
        return Some(node.user_op(channel, account, op).await);
    }
    let _ = (channel, account, op);
    None
}

/// Whether `token` is this cluster's token (a forwarded operation from another node).
pub fn accepts_token(token: &str) -> bool {
    #[cfg(feature = "cluster")]
    if let Some(node) = node::current() {
        return node.accepts_token(token);
    }
    let _ = token;
    false
}

/// On a cluster node's status (accounts carry `clusterOwner`): adds an OWNER column after
/// ACCOUNT, and shows why the cluster stopped an account (`clusterNote`) where the table has no
/// other error. `rows` are [`crate::status_table::render`]'s, header first, in the status' order.
pub fn owner_column(status: &Value, rows: &mut [Vec<String>]) {
    let snapshots: Vec<&Value> = status["channels"]
        .as_object()
        .into_iter()
        .flat_map(|channels| channels.values())
        .flat_map(|accounts| accounts.as_object().into_iter().flat_map(|a| a.values()))
        .collect();
    if !snapshots.iter().any(|s| s.get("clusterOwner").is_some()) {
        return;
    }
    let Some((header, body)) = rows.split_first_mut() else {
        return;
    };
    header.insert(2, "OWNER".into());
    for (row, snapshot) in body.iter_mut().zip(snapshots) {
        row.insert(
            2,
            snapshot["clusterOwner"].as_str().unwrap_or("-").to_owned(),
        );
        if let (Some(last), Some(note)) = (row.last_mut(), snapshot["clusterNote"].as_str())
            && last == "-"
        {
            *last = format!("cluster: {note}");
        }
    }
}

/// Renders `GET /v1/cluster` for `channeld cluster`.
pub fn render(view: &Value) -> String {
    let mut out = format!(
        "cluster {} — this node: {} ({}{})\n",
        view["cluster"].as_str().unwrap_or("-"),
        view["node"].as_str().unwrap_or("-"),
        view["state"].as_str().unwrap_or("-"),
        view["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
    );
    let mut rows = vec![
        ["NODE", "API", "CHANNELS", "ACCOUNTS", "LEASE AGE", "CONFIG"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for n in view["nodes"].as_array().into_iter().flatten() {
        let channels: Vec<&str> = n["channels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        rows.push(vec![
            n["node"].as_str().unwrap_or("-").to_owned(),
            n["api"].as_str().unwrap_or("-").to_owned(),
            channels.join(","),
            n["accounts"].as_u64().unwrap_or(0).to_string(),
            format!("{}s", n["leaseAgeMs"].as_u64().unwrap_or(0) / 1000),
            if n["agrees"].as_bool() == Some(true) {
                "agrees".to_owned()
            } else {
                format!("differs ({})", n["configHash"].as_str().unwrap_or("-"))
            },
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
