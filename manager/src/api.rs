//! The HTTP API on loopback: every request carries the bearer token; JSON in and out. Each user
//! operation has its endpoint here and its verb in the CLI.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/status` | every channel's accounts |
//! | GET | `/v1/status/{channel}` | one channel's accounts |
//! | GET | `/v1/status/{channel}/{account}` | one account |
//! | POST | `/v1/accounts/{channel}/{op}` | `start`, `stop`, `restart` every account of a channel |
//! | POST | `/v1/accounts/{channel}/{account}/{op}` | `start`, `stop`, `restart`, `logout`, `reset` one account |
//! | GET | `/v1/plugins` | every plugin file: channel, version, file, hash, load time, load error, versions mapped; the reconcile count and last time |
//! | POST | `/v1/rescan` | rescan the plugins directory now; the changes it made |
//! | POST | `/v1/reload` | reload the config file; the accounts added, removed, restarted, unchanged ([`crate::reload`]) |
//! | GET | `/v1/events` | inbound messages and account state changes, as Server-Sent Events ([`crate::events`]) |
//! | GET | `/v1/journal` | the journal's figures: last seq, pruned range, size, refusals |
//! | GET | `/v1/cluster` | the cluster's nodes, their channels, account counts and lease age ([`crate::cluster`]) |
//! | POST, GET, DELETE | `/v1/messages`, `/v1/messages/{id}`, `/v1/outbox` | messages to send ([`crate::outbox::http`]) |
//! | GET | `/healthz`, `/readyz`, `/metrics` | liveness, readiness (no token) and Prometheus metrics ([`crate::service`]) |
//!
//! Every operation runs as a task the daemon tracks; the handler only awaits it, so a caller who
//! disconnects changes nothing about the outcome.
//!
//! Errors are `{"error": "…"}` with 401 (no or wrong token), 403 (the read-only token on a
//! control endpoint), 404 (unknown channel, account or path, named), 400 (bad operation or
//! parameter), 500 (the operation failed).
//!
//! `[api] read_token` is a second bearer token that may only read: every `GET` endpoint, no
//! `POST`.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api_types::{OpResult, Outcome},
    catalog::Catalog,
    config::Secret,
    events::EventHub,
    host::AccountKey,
    supervise::{Supervisor, SupervisorError},
};

/// What the API serves from.
#[derive(Clone)]
pub struct ApiState {
    /// The supervisor.
    pub supervisor: Supervisor,
    /// The bearer token.
    pub token: Secret,
    /// The plugin catalog (listing, rescan); `None` where the daemon has none (tests).
    pub hot: Option<Arc<Catalog>>,
    /// The daemon's tracker for operations started by API callers.
    pub tasks: TaskTracker,
    /// The read-only bearer token (`[api] read_token`).
    pub read_token: Option<Secret>,
    /// The event stream and the journal; `None` where the daemon has none (tests).
    pub events: Option<Arc<EventHub>>,
    /// The outbox (`/v1/messages`); `None` where the daemon has none (tests).
    pub outbox: Option<Arc<crate::outbox::Outbox>>,
    /// Readiness and `[metrics]` for `/healthz`, `/readyz`, `/metrics`; `None` in tests.
    pub observe: Option<Arc<crate::service::Observe>>,
    /// Config reload; `None` where the daemon has none (tests).
    pub reload: Option<Arc<crate::reload::Reloader>>,
}

/// Runs `operation` as a task `tasks` tracks and awaits it: dropping the returned future (the
/// caller disconnected) leaves the operation to complete.
///
/// # Cancellation safety
///
/// Cancel-safe in the sense that matters: the operation goes on; only its answer is lost.
pub async fn tracked<T: Send + 'static>(
    tasks: &TaskTracker,
    operation: impl Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    tasks.spawn(operation).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the operation failed: {e}"),
        )
    })
}

/// An API error with its status code.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(crate::api_types::ErrorBody { error: self.1 })).into_response()
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        let status = match e {
            SupervisorError::UnknownChannel(_) | SupervisorError::UnknownAccount(_) => {
                StatusCode::NOT_FOUND
            }
            SupervisorError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            SupervisorError::Plugin(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// Compares in constant time (`subtle`), so response time does not leak how much of a guess
/// matched (a wrong length only reveals the token's length).
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    bool::from(a.ct_eq(b))
}

/// The API's token rule as a middleware (also used by [`crate::service`]'s `/metrics`).
pub(crate) async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if same(token.as_bytes(), state.token.expose().as_bytes()) => {
            next.run(request).await
        }
        // Another node of the cluster forwarding a user operation.
        Some(token) if crate::cluster::accepts_token(token) => next.run(request).await,
        Some(token)
            if state
                .read_token
                .as_ref()
                .is_some_and(|read| same(token.as_bytes(), read.expose().as_bytes())) =>
        {
            if request.method() == Method::GET {
                next.run(request).await
            } else {
                ApiError(
                    StatusCode::FORBIDDEN,
                    format!(
                        "the read-only token cannot {} {}: use [host] api_token",
                        request.method(),
                        request.uri().path()
                    ),
                )
                .into_response()
            }
        }
        _ => {
            let mut response = ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (see the api-token file in the state directory)"
                    .into(),
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header"),
            );
            response
        }
    }
}

/// The router (exposed for tests).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status_all))
        .route("/v1/status/{channel}", get(status_channel))
        .route("/v1/status/{channel}/{account}", get(status_account))
        .route("/v1/accounts/{channel}/{op}", post(channel_op))
        .route("/v1/accounts/{channel}/{account}/{op}", post(account_op))
        .route("/v1/plugins", get(plugins))
        .route("/v1/runtimes", get(crate::health::starvation::api_runtimes))
        .route("/v1/rescan", post(rescan))
        .route("/v1/reload", post(crate::reload::api_reload))
        .route("/v1/events", get(events))
        .route("/v1/journal", get(journal))
        .route("/v1/cluster", get(crate::cluster::api_view))
        .route(
            "/v1/messages",
            post(crate::outbox::http::post).get(crate::outbox::http::list),
        )
        .route(
            "/v1/messages/{id}",
            get(crate::outbox::http::get).delete(crate::outbox::http::cancel),
        )
        .route("/v1/outbox", get(crate::outbox::http::stats))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        // Outside the token check: refused attempts are on the audit trail too.
        .layer(middleware::from_fn(crate::audit::record))
        // `/healthz`, `/readyz` (no token) and `/metrics` (its own token rule).
        .merge(crate::service::routes(&state))
        .with_state(state)
}

/// Serves the API until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let main = tokio::runtime::Handle::current();
    let app = router(state).layer(middleware::from_fn(move |request, next| {
        crate::api_thread::on_main(main.clone(), request, next)
    }));
    crate::api_thread::serve(listener, app, stop).await
}

/// Binds the API's address with a clear error.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(address).await.map_err(|e| {
        format!("cannot listen on {address} for the API: {e} (set [host] api_address)")
    })
}

async fn status_all(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({ "channels": state.supervisor.snapshot() }))
}

async fn status_channel(
    State(state): State<ApiState>,
    Path(channel): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut all = state.supervisor.snapshot();
    let accounts = all
        .remove(&channel)
        .ok_or(SupervisorError::UnknownChannel(channel.clone()))?;
    Ok(Json(json!({ "channels": { channel: accounts } })))
}

async fn status_account(
    State(state): State<ApiState>,
    Path((channel, account)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    // One account, read on its own: the whole snapshot costs milliseconds at 10,000 accounts.
    let snapshot = state.supervisor.account_snapshot(&channel, &account)?;
    let id = channeld_plugin_abi::normalize_account_id(&account);
    Ok(Json(json!({ "channels": { channel: { id: snapshot } } })))
}

async fn channel_op(
    State(state): State<ApiState>,
    Path((channel, op)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let supervisor = state.supervisor.clone();
    tracked(&state.tasks, async move {
        if let Some(answer) = crate::cluster::intercept(&channel, None, &op).await {
            return answer;
        }
        run_op(&supervisor, &channel, None, &op).await
    })
    .await?
}

async fn account_op(
    State(state): State<ApiState>,
    Path((channel, account, op)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let supervisor = state.supervisor.clone();
    tracked(&state.tasks, async move {
        if let Some(answer) = crate::cluster::intercept(&channel, Some(&account), &op).await {
            return answer;
        }
        run_op(&supervisor, &channel, Some(&account), &op).await
    })
    .await?
}

fn hot(state: &ApiState) -> Result<&Arc<Catalog>, ApiError> {
    state.hot.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "no plugins directory is managed".into(),
        )
    })
}

async fn plugins(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(hot(&state)?.listing())))
}

async fn rescan(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let catalog = hot(&state)?.clone();
    let changes = tracked(&state.tasks, async move { catalog.rescan().await }).await?;
    let changes: Vec<Value> = changes
        .into_iter()
        .map(|(file, change)| json!({ "file": file, "change": change }))
        .collect();
    Ok(Json(json!({ "changes": changes })))
}

async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    crate::events::respond(state.events, &headers, &params)
}

async fn journal(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let hub = state
        .events
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "this daemon has no journal".into()))?;
    Ok(Json(json!({ "journal": hub.journal().stats() })))
}

fn keyed<K: std::fmt::Display, T: serde::Serialize>(results: Vec<(K, T)>) -> Value {
    let map: BTreeMap<String, T> = results
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    json!({ "results": map })
}

/// Runs a user operation and answers once it has taken effect.
pub async fn run_op(
    supervisor: &Supervisor,
    channel: &str,
    account: Option<&str>,
    op: &str,
) -> Result<Json<Value>, ApiError> {
    let value = match (op, account) {
        ("start", _) => keyed(supervisor.start(channel, account).await?),
        ("stop", _) => keyed(supervisor.stop(channel, account).await?),
        ("restart", _) => keyed(supervisor.restart(channel, account).await?),
        ("logout", Some(account)) => {
            let cleared = supervisor.logout(channel, account).await?;
            let key = AccountKey::new(channel, channeld_plugin_abi::normalize_account_id(account));
            let result = OpResult {
                outcome: Outcome::LoggedOut,
                reason: None,
                cleared: Some(cleared),
            };
            keyed(vec![(key, result)])
        }
        ("reset", Some(account)) => {
            let (ch, key) = (
                supervisor.channel(channel)?,
                channeld_plugin_abi::normalize_account_id(account),
            );
            if !ch.accounts.contains(&key) {
                return Err(
                    SupervisorError::UnknownAccount(AccountKey::new(channel, account)).into(),
                );
            }
            let key = AccountKey::new(channel, key);
            supervisor.reset_restart_attempts(&key);
            let result = OpResult {
                outcome: Outcome::Reset,
                reason: None,
                cleared: None,
            };
            keyed(vec![(key, result)])
        }
        ("logout" | "reset", None) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{op} needs an account: /v1/accounts/{channel}/ACCOUNT/{op}"),
            ));
        }
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown operation {op:?}: expected start, stop, restart, logout or reset"),
            ));
        }
    };
    Ok(Json(value))
}
