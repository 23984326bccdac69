//! # The `webhook` channel: messages arrive as authenticated HTTP POSTs
//!
//! Each account runs a small HTTP/1 server. Anything that can make an HTTP request (a CI job, a
//! monitoring system, a shell script) posts a JSON message to it with the account's bearer token,
//! and the plugin hands the message to channeld as an inbound message of that account.
//!
//! ## Config
//! ```toml
//! [channels.webhook.accounts.main]
//! listen = "127.0.0.1:8787"      # required; "127.0.0.1:0" picks a free port
//! secret = "s3cret"              # required: bearer token callers must send (the host resolves { env = "NAME" } / { file = "path" } before the plugin sees it)
//! max_body_bytes = 65536         # optional, default 64 KiB
//! path = "/messages"             # optional, default "/messages"
//! outgoing_url = "http://127.0.0.1:9000/in"   # optional: where messages channeld sends go
//! outgoing_secret = "t0ken"      # optional: bearer token for outgoing_url (never `secret`)
//! ```
//! An account without `listen` or `secret` is reported as not configured, with the missing key as
//! the reason, and is never started. Unknown keys are refused too, so a typo (`secrets = …`)
//! shows up as a reason instead of as an account nobody can post to. Once it listens, the account's
//! status carries `mode = "webhook"` and `listen_addr` (the bound address, so a `:0` port can be
//! found).
//!
//! ## Posting a message
//! ```sh
//! curl -i http://127.0.0.1:8787/messages \
//!   -H 'Authorization: Bearer s3cret' \
//!   -d '{"conversation": "alerts", "sender": "ci", "text": "build 42 failed"}'
//! ```
//! The body is a JSON object: `conversation`, `sender` and `text` (strings) are required; `id`
//! (string: the sender's id for the message) and `time_ms` (integer: send time in milliseconds
//! since the Unix epoch; without it the host stamps the arrival time) are optional, and other keys
//! are ignored. The body is read as JSON whatever its `Content-Type` says, so plain `curl -d`
//! works. Answers:
//!
//! | status | when |
//! | --- | --- |
//! | 202 `{"accepted":true}` | the host took the message |
//! | 400 | the body is not JSON, or lacks a required field (a one-line reason says which) |
//! | 401 (`WWW-Authenticate: Bearer`) | the `Authorization: Bearer` token is missing or wrong |
//! | 404 | any other path |
//! | 405 | any method but POST on the path |
//! | 413 | the body is larger than `max_body_bytes` |
//! | 503 | the host refused the message (the reason is in the body); try again later |
//!
//! ## Sending
//! With `outgoing_url` (plain `http://`), each message channeld sends from the account (its
//! outbox, `channeld send`) is POSTed there as JSON in the shape of the inbound body:
//! `{"conversation", "sender" (the account id), "text", "reply_to"?, "extra"?}`, with
//! `Authorization: Bearer <outgoing_secret>` when that is set. The inbound `secret` is never
//! sent anywhere. The send completes when the endpoint answers 2xx (the message's id is then
//! the answer's `id` or `seq` if it has one); any other answer is a failed send whose error
//! carries the status and the start of the body, and the host retries it. An inbound body's
//! `extra` object is handed to the host with the message (a gateway's origin and hop count
//! travel in it).
//!
//! ## Liveness
//! The plugin never calls `record_event`: a webhook has no socket whose silence means anything
//! (no one posting for a day is not a fault), so the health monitor must never judge it
//! "stale-socket". The `webhook` mode it reports tells the monitor the same.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use channeld_plugin_abi::{
    export_plugin,
    sdk::{
        Account, AccountContext, ChannelPlugin, Host, Inbound, Outbound, OutboundQueue,
        PluginError, Verdict,
    },
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The default `max_body_bytes`: 64 KiB is far more than a chat message needs, and small enough
/// that a caller cannot make the plugin buffer much.
const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// How long requests already in flight may take to finish once the host asks the account to stop.
/// Shorter than the host's default stop timeout (5 s), so the task ends by itself rather than
/// being cancelled. The listener is closed by then; a request still in flight after it is left to
/// its connection's own tokio task (axum spawns one per connection), which ends when its caller
/// finishes or gives up, or when the plugin's runtime shuts down.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The account's settings: everything in its table but the host-owned keys. No `Debug`, so the
/// secret cannot end up in a log line by accident.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    listen: String,
    secret: String,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: usize,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    outgoing_url: Option<String>,
    #[serde(default)]
    outgoing_secret: Option<String>,
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn default_path() -> String {
    "/messages".to_owned()
}

impl Settings {
    /// The account's settings, or the one-line reason it cannot start. `is_configured` and
    /// `start` share this, so an account the host was told is configured always starts.
    fn of(account: &Account) -> Result<Self, String> {
        for key in ["listen", "secret"] {
            if matches!(account.get(key), None | Some(Value::Null)) {
                return Err(format!("missing `{key}`"));
            }
        }
        let settings: Self = account.parse().map_err(|e| e.message().to_owned())?;
        // An empty token would let in every caller that sends `Authorization: Bearer `.
        if settings.secret.is_empty() {
            return Err("`secret` is empty".to_owned());
        }
        if settings.max_body_bytes == 0 {
            return Err("`max_body_bytes` must be at least 1".to_owned());
        }
        // The router panics on a path without a leading `/`, and treats `{…}` as a capture that
        // would match paths the user never meant to open.
        if !settings.path.starts_with('/') || settings.path.contains(['{', '}']) {
            return Err(format!(
                "`path` must start with `/` and contain no `{{` or `}}`, got {:?}",
                settings.path
            ));
        }
        Ok(settings)
    }
}

/// What the request handler needs: the host to deliver to and the token to check.
struct Shared {
    host: Host,
    secret: String,
    max_body_bytes: usize,
}

/// The JSON body of a POST. Unknown keys are ignored so senders can add fields without breaking.
#[derive(Deserialize)]
struct Message {
    conversation: String,
    sender: String,
    text: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    time_ms: Option<i64>,
    #[serde(default)]
    extra: Option<serde_json::Map<String, Value>>,
}

/// Where an account's outbound messages go.
#[derive(Clone)]
struct Outgoing {
    url: String,
    secret: Option<String>,
}

#[derive(Default)]
struct Webhook;

/// The most of an error answer's body a send error quotes.
const ERROR_BODY_CHARS: usize = 200;

/// POSTs `body` to `outgoing`; the message id on a 2xx answer.
fn post_outgoing(outgoing: &Outgoing, body: &Value) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent
        .post(&outgoing.url)
        .header("Content-Type", "application/json");
    if let Some(secret) = &outgoing.secret {
        request = request.header("Authorization", format!("Bearer {secret}"));
    }
    let mut response = request
        .send(body.to_string())
        .map_err(|e| format!("POST {}: {e}", outgoing.url))?;
    let status = response.status();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    if !status.is_success() {
        let start: String = text.trim().chars().take(ERROR_BODY_CHARS).collect();
        return Err(format!(
            "POST {} answered {}: {start}",
            outgoing.url,
            status.as_u16()
        ));
    }
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(match (&answer["id"], &answer["seq"]) {
        (Value::String(id), _) => id.clone(),
        (_, Value::Number(seq)) => seq.to_string(),
        _ => String::new(),
    })
}

impl ChannelPlugin for Webhook {
    const CHANNEL_ID: &'static str = "webhook";
    const DISPLAY_NAME: &'static str = "Webhook (HTTP POST)";

    fn is_configured(&self, account: &Account) -> Verdict {
        match Settings::of(account) {
            Ok(_) => Verdict::Yes,
            Err(reason) => Verdict::no(reason),
        }
    }

    async fn start(&self, ctx: AccountContext) -> Result<(), PluginError> {
        let settings = Settings::of(ctx.account()).map_err(PluginError::new)?;
        // The SDK's default `send` hands each message from this account to this queue.
        let outbound = ctx.outbound();
        let outgoing = settings.outgoing_url.clone().map(|url| Outgoing {
            url,
            secret: settings.outgoing_secret.clone(),
        });
        ctx.spawn(send_all(ctx.account().id.clone(), outbound, outgoing));
        let listener = TcpListener::bind(&settings.listen)
            .await
            .map_err(|e| PluginError::new(format!("cannot listen on {}: {e}", settings.listen)))?;
        let addr = listener.local_addr()?;
        ctx.host().patch_status(&json!({
            "mode": "webhook",
            "listen_addr": addr.to_string(),
        }))?;
        // "Connected" for a webhook means "listening": there is no remote side to lose.
        ctx.host().set_connected(true);
        tracing::info!(%addr, path = %settings.path, "webhook account listening");

        let shared = Arc::new(Shared {
            host: ctx.host().clone(),
            secret: settings.secret,
            max_body_bytes: settings.max_body_bytes,
        });
        // Any other path is the router's 404, any other method on this one its 405.
        let app = Router::new()
            .route(&settings.path, post(accept))
            .layer(DefaultBodyLimit::max(settings.max_body_bytes))
            .with_state(shared);

        // On abort the server stops accepting, closes idle keep-alive connections and lets
        // requests in flight finish, but only for DRAIN_TIMEOUT: a caller that never finishes
        // its upload must not keep the account from stopping.
        let abort = ctx.abort();
        let server =
            axum::serve(listener, app).with_graceful_shutdown(async move { abort.aborted().await });
        tokio::select! {
            served = server.into_future() => served.map_err(|e| {
                PluginError::new(format!("webhook server on {addr} failed: {e}"))
            })?,
            () = async {
                ctx.aborted().await;
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } => tracing::warn!(
                drain_timeout = ?DRAIN_TIMEOUT,
                "requests still in flight after the drain timeout; no longer waiting for them"
            ),
        }
        tracing::info!(%addr, "webhook account stopped");
        Ok(())
    }
}

/// Sends the account's outbound messages, each POST in a blocking task of its own so that sends
/// of different conversations overlap (the host's outbox keeps one conversation's in order).
async fn send_all(
    account: String,
    mut outbound: OutboundQueue,
    outgoing: Option<Outgoing>,
) -> Result<(), PluginError> {
    while let Some(request) = outbound.recv().await {
        let Some(outgoing) = outgoing.clone() else {
            request.finish(Err(PluginError::new(format!(
                "webhook account {account} has no outgoing_url"
            ))));
            continue;
        };
        let body = outgoing_body(request.message());
        // The answer goes from the blocking task: a POST in flight when the account stops still
        // reports its outcome.
        tokio::task::spawn_blocking(move || {
            request.finish(post_outgoing(&outgoing, &body).map_err(PluginError::new));
        });
    }
    Ok(())
}

/// The JSON an outbound message is POSTed as: the inbound body's shape.
fn outgoing_body(message: &Outbound) -> Value {
    let mut body = json!({
        "conversation": message.conversation,
        "sender": message.account,
        "text": message.text,
    });
    if let Some(reply_to) = &message.reply_to {
        body["reply_to"] = json!(reply_to);
    }
    if let Some(extra) = &message.extra {
        body["extra"] = extra.clone();
    }
    body
}

/// Handles a POST on the account's path.
async fn accept(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    // The token is checked before the body is read, so an unauthenticated caller cannot even
    // make the plugin buffer it.
    if !authorized(request.headers(), &shared.secret) {
        tracing::debug!("webhook request without a valid bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response();
    }
    // `Bytes` honours the DefaultBodyLimit layer: a longer body is a 413 rejection.
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {} bytes", shared.max_body_bytes),
            );
        }
        Err(rejection) => return text(rejection.status(), rejection.body_text()),
    };
    let message: Message = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad message: {e}")),
    };
    tracing::debug!(
        conversation = %message.conversation,
        sender = %message.sender,
        bytes = message.text.len(),
        "webhook message"
    );
    let mut inbound = Inbound::new(message.conversation, message.sender, message.text);
    if let Some(id) = message.id {
        inbound = inbound.with_id(id);
    }
    if let Some(time_ms) = message.time_ms {
        inbound = inbound.with_time_ms(time_ms);
    }
    if let Some(extra) = message.extra {
        inbound = inbound.with_extra(Value::Object(extra));
    }
    // Answered once the host has made the message durable, with its sequence number.
    match shared.host.deliver_async(inbound).await {
        Ok(seq) => (
            StatusCode::ACCEPTED,
            Json(json!({ "accepted": true, "seq": seq })),
        )
            .into_response(),
        // The host refuses when it has replaced this task, say: the caller should retry, and
        // will reach the replacement.
        Err(e) => {
            tracing::warn!(error = %e, "webhook message not delivered");
            text(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Whether `headers` carry `Authorization: Bearer <secret>`. The scheme is case-insensitive
/// (RFC 7235); the token is compared in constant time.
fn authorized(headers: &HeaderMap, secret: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let scheme = b"bearer ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return false;
    }
    same_secret(value[scheme.len()..].trim_ascii(), secret.as_bytes())
}

/// Compares a token in constant time (`subtle`), so response times do not tell a caller how much
/// of its guess was right. (A wrong length still returns at once: that only reveals the secret's
/// length.)
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    bool::from(given.ct_eq(secret))
}

/// A one-line plain-text answer.
fn text(status: StatusCode, reason: impl Into<String>) -> Response {
    let mut reason = reason.into().replace('\n', " ");
    reason.push('\n');
    (status, reason).into_response()
}

export_plugin!(Webhook);

#[cfg(test)]
mod tests;
