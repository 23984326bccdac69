//! The audit trail: one info line (target `channeld::audit`) for every user operation that reaches
//! the API, whoever sent it and however it ended: the peer's address, the operation, its target
//! and the result (the HTTP status). Reads (`GET`) are not operations and leave no line.
//!
//! ```text
//! INFO channeld::audit: user operation peer=127.0.0.1:50412 operation=stop target=webhook:main result=200
//! ```

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, Request},
    http::Method,
    middleware::Next,
    response::Response,
};
use percent_encoding::percent_decode_str;

/// The log target of audit lines.
pub const AUDIT_TARGET: &str = "channeld::audit";

/// Operation and target of a request path: `/v1/accounts/{channel}[/{account}]/{op}` →
/// (`op`, `channel[:account]`); `/v1/rescan` → (`rescan`, `plugins`); anything else → (`path`, "").
pub fn describe(path: &str) -> (String, String) {
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    match segments.as_slice() {
        [v1, accounts, channel, op] if v1 == "v1" && accounts == "accounts" => {
            (op.clone(), channel.clone())
        }
        [v1, accounts, channel, account, op] if v1 == "v1" && accounts == "accounts" => {
            (op.clone(), format!("{channel}:{account}"))
        }
        [v1, rescan] if v1 == "v1" && rescan == "rescan" => ("rescan".into(), "plugins".into()),
        [v1, reload] if v1 == "v1" && reload == "reload" => ("reload".into(), "config".into()),
        _ => (path.to_owned(), String::new()),
    }
}

/// Middleware: runs the request, then logs it if it was an operation.
///
/// # Cancellation safety
///
/// If the connection goes away mid-operation, the line is not written; the operation itself
/// logs what it did.
pub async fn record(request: Request, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.to_string())
        .unwrap_or_else(|| "unknown".to_owned());
    let (operation, target) = describe(request.uri().path());
    let response = next.run(request).await;
    tracing::info!(
        target: AUDIT_TARGET,
        peer = %peer,
        operation = %operation,
        target = %target,
        result = response.status().as_u16(),
        "user operation"
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_operation_and_target() {
        assert_eq!(
            describe("/v1/accounts/webhook/main%20x/stop"),
            ("stop".into(), "webhook:main x".into())
        );
        assert_eq!(
            describe("/v1/accounts/webhook/start"),
            ("start".into(), "webhook".into())
        );
        assert_eq!(describe("/v1/rescan"), ("rescan".into(), "plugins".into()));
        assert_eq!(describe("/v1/nope"), ("/v1/nope".into(), String::new()));
    }
}
