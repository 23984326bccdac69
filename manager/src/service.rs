//! The endpoints a service manager, a load balancer and a scraper use: `GET /healthz`,
//! `GET /readyz` (both without a token) and `GET /metrics` ([`crate::metrics`]; the API's token
//! rule unless `[metrics] public = true`). The API serves them from the moment its port is bound,
//! while the plugins still load.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 `{"status":"ok"}` while the process serves requests |
//! | `/readyz` | 200 `{"ready":true}` once the initial plugin load is done and every enabled account has been started at least once or has a reason it is not running; else 503 `{"ready":false,"waiting":[…]}` naming what is awaited |
//! | `/metrics` | OpenMetrics text |

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use crate::{api::ApiState, metrics::MetricsConfig};

/// How far the daemon's start has come.
#[derive(Debug, Default)]
pub struct Readiness {
    plugins_loaded: AtomicBool,
    started: AtomicBool,
    /// Once every account was accounted for, readiness stays (a later crash is the metrics'
    /// and the health monitor's business), and `/readyz` stops reading the snapshot.
    ready: AtomicBool,
}

impl Readiness {
    /// The initial load of the plugins directory is done.
    pub fn plugins_loaded(&self) {
        self.plugins_loaded.store(true, Ordering::Release);
    }

    /// The initial start-all is done.
    pub fn started(&self) {
        self.started.store(true, Ordering::Release);
    }
}

/// What the service endpoints serve from, beside the API's state.
#[derive(Debug, Default)]
pub struct Observe {
    /// The start's progress.
    pub readiness: Readiness,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
}

impl Observe {
    /// With `[metrics]` settings.
    pub fn new(metrics: MetricsConfig) -> Arc<Self> {
        Arc::new(Self {
            readiness: Readiness::default(),
            metrics,
        })
    }
}

/// The routes: `/healthz`, `/readyz`, `/metrics` (merge them outside the API's token layer).
pub fn routes(state: &ApiState) -> Router<ApiState> {
    let public = state.observe.as_ref().is_some_and(|o| o.metrics.public);
    let mut metrics = Router::new().route("/metrics", get(metrics));
    if !public {
        metrics = metrics.layer(middleware::from_fn_with_state(
            state.clone(),
            crate::api::require_token,
        ));
    }
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(metrics)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// What readiness still waits for (empty: ready).
pub fn waiting(state: &ApiState) -> Vec<String> {
    let Some(observe) = &state.observe else {
        return vec![];
    };
    let r = &observe.readiness;
    if r.ready.load(Ordering::Acquire) {
        return vec![];
    }
    if !r.plugins_loaded.load(Ordering::Acquire) {
        return vec!["the initial load of the plugins directory".into()];
    }
    if !r.started.load(Ordering::Acquire) {
        return vec!["the initial start of every account".into()];
    }
    let mut waiting = Vec::new();
    for (channel, accounts) in state.supervisor.snapshot() {
        for (account, s) in accounts {
            let accounted_for = !s.enabled
                || !s.configured
                || s.running
                || s.restart_pending
                || s.last_start_at.is_some()
                || s.last_error.is_some();
            if !accounted_for {
                waiting.push(format!("{channel}:{account} has not started"));
            }
        }
    }
    if waiting.is_empty() {
        r.ready.store(true, Ordering::Release);
    }
    waiting
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let waiting = waiting(&state);
    if waiting.is_empty() {
        Json(json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "waiting": waiting })),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let sources = crate::metrics::Sources {
        supervisor: state.supervisor.clone(),
        catalog: state.hot.clone(),
        events: state.events.clone(),
        outbox: state.outbox.clone(),
        config: state
            .observe
            .as_ref()
            .map(|o| o.metrics.clone())
            .unwrap_or_default(),
    };
    // The snapshot and the catalog's listing take locks, the outbox reads its table: off the
    // async workers.
    match tokio::task::spawn_blocking(move || crate::metrics::render(&sources)).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
