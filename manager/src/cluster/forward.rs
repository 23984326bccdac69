//! Forwarding: a user operation (`start`, `stop`, `restart`, `logout`, `reset`) given to a node
//! that does not own the account goes to the owner's API with the cluster token, and the owner's
//! answer is returned as is. Plain HTTP: TLS between nodes is not part of this release (put the
//! nodes on a private network; the owner's API must listen where the others reach it, which
//! needs `[host] allow_remote` off loopback).

use std::time::Duration;

use serde_json::Value;

/// Forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No `[cluster] token`.
    #[error("cannot forward {op} of {account} to node {node}: [cluster] token is not set")]
    NoToken {
        /// The operation.
        op: String,
        /// `channel:account`.
        account: String,
        /// The owner.
        node: String,
    },
    /// The owner did not answer (or answered an error).
    #[error("forwarding {op} of {account} to node {node} at {address}: {reason}")]
    Failed {
        /// The operation.
        op: String,
        /// `channel:account`.
        account: String,
        /// The owner.
        node: String,
        /// Its API address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// Sends `op` on `channel:account` to the owner's API at `address`.
///
/// # Cancellation safety
///
/// The request runs on a blocking thread: dropping the future does not recall it.
pub async fn forward(
    node: &str,
    address: &str,
    token: &str,
    channel: &str,
    account: &str,
    op: &str,
) -> Result<Value, ForwardError> {
    let url = format!(
        "http://{address}/v1/accounts/{}/{}/{op}",
        encode(channel),
        encode(account)
    );
    let bearer = format!("Bearer {token}");
    let failed = |reason: String| ForwardError::Failed {
        op: op.to_owned(),
        account: format!("{channel}:{account}"),
        node: node.to_owned(),
        address: address.to_owned(),
        reason,
    };
    let answer = tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut response = agent
            .post(&url)
            .header("Authorization", &bearer)
            .send_empty()
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body: Value = response
            .body_mut()
            .read_json()
            .map_err(|e| format!("{status}: {e}"))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!(
                "{status}: {}",
                body.get("error").and_then(Value::as_str).unwrap_or("")
            ))
        }
    })
    .await
    .map_err(|e| failed(e.to_string()))?;
    answer.map_err(failed)
}

fn encode(part: &str) -> String {
    percent_encoding::utf8_percent_encode(part, percent_encoding::NON_ALPHANUMERIC).to_string()
}
