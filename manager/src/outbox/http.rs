//! The outbox's endpoints (routed in [`crate::api`]):
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/v1/messages` | accept a message to send: 202 `{"id", "duplicate"}` once it is durable; 429 beyond a cap |
//! | GET | `/v1/messages?state=queued\|failed\|…&limit=N` | messages, newest first |
//! | GET | `/v1/messages/{id}` | one message: queued, sending, sent (with the channel's id), failed (with why), cancelled |
//! | DELETE | `/v1/messages/{id}` | cancel a queued message (409 once it is being sent or done) |
//! | GET | `/v1/outbox` | the outbox's figures |

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::json;

use super::{NewMessage, Outbox, OutboxError};
use crate::{api::ApiState, api_types::ErrorBody};

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorBody { error: message })).into_response()
}

/// An answer that is an error: its status and its one line.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

impl From<OutboxError> for Failure {
    fn from(e: OutboxError) -> Self {
        let status = match &e {
            OutboxError::Invalid(_) => StatusCode::BAD_REQUEST,
            OutboxError::Unknown(_) | OutboxError::NotFound(_) => StatusCode::NOT_FOUND,
            OutboxError::Full { .. } => StatusCode::TOO_MANY_REQUESTS,
            OutboxError::NotCancellable { .. } => StatusCode::CONFLICT,
            OutboxError::Database { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

fn outbox(state: &ApiState) -> Result<Arc<Outbox>, Failure> {
    state
        .outbox
        .clone()
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, "this daemon has no outbox".into()))
}

/// Runs a blocking outbox call as a tracked task (a caller who disconnects changes nothing).
async fn blocking<T: Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, Failure> {
    let outbox = outbox(state)?;
    let task = state
        .tasks
        .spawn_blocking(move || f(&outbox))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(task?)
}

/// `POST /v1/messages`.
pub async fn post(
    State(state): State<ApiState>,
    body: Result<Json<NewMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(message) = match body {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match blocking(&state, move |o| o.submit(message)).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(json!(accepted))).into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// The query of `GET /v1/messages`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/messages`.
pub async fn list(State(state): State<ApiState>, Query(query): Query<ListQuery>) -> Response {
    if let Some(s) = &query.state
        && ![
            super::state::QUEUED,
            super::state::SENDING,
            super::state::SENT,
            super::state::FAILED,
            super::state::CANCELLED,
        ]
        .contains(&s.as_str())
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown state {s:?}: expected queued, sending, sent, failed or cancelled"),
        );
    }
    let limit = query.limit.unwrap_or(1000).min(100_000);
    match blocking(&state, move |o| o.list(query.state.as_deref(), limit)).await {
        Ok(messages) => Json(json!({ "messages": messages })).into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// `GET /v1/messages/{id}`.
pub async fn get(State(state): State<ApiState>, Path(id): Path<u64>) -> Response {
    match blocking(&state, move |o| o.get(id)).await {
        Ok(message) => Json(json!({ "message": message })).into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// `DELETE /v1/messages/{id}`.
pub async fn cancel(State(state): State<ApiState>, Path(id): Path<u64>) -> Response {
    match blocking(&state, move |o| o.cancel(id)).await {
        Ok(message) => Json(json!({ "message": message })).into_response(),
        Err(failure) => failure.into_response(),
    }
}

/// `GET /v1/outbox`.
pub async fn stats(State(state): State<ApiState>) -> Response {
    match blocking(&state, |o| Ok(o.stats())).await {
        Ok(stats) => Json(json!({ "outbox": stats })).into_response(),
        Err(failure) => failure.into_response(),
    }
}
