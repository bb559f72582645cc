//! The one mapping from errors to HTTP responses: `{"error":{"code","message"}}` with
//! a status chosen here and nowhere else.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use genstream_engine::EngineError;
use serde_json::json;

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Missing, expired or badly signed token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A body that is not JSON or not the expected shape (400); the message names the
    /// field when there is one.
    #[error("{0}")]
    InvalidJson(String),
    /// A body over the configured size (413).
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// No such route (404).
    #[error("no route {0}")]
    NoRoute(String),
    /// The route exists but not with this method (405).
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
}

impl ApiError {
    /// The HTTP status and the stable machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use EngineError as E;
        match self {
            ApiError::Engine(e) => match e {
                E::BadRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
                E::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                E::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
                E::ConversationBusy(_) => (StatusCode::CONFLICT, "conversation_busy"),
                E::TooManyConcurrent(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_concurrent"),
                E::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
                E::InsufficientBalance { .. } => {
                    (StatusCode::PAYMENT_REQUIRED, "insufficient_balance")
                }
                E::JobFinished(_) => (StatusCode::CONFLICT, "job_finished"),
                E::ServerBusy(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_busy"),
                E::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
                E::CursorOutOfRange { .. } => (StatusCode::BAD_REQUEST, "cursor_out_of_range"),
                E::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
                E::Persistence(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
                E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::NoRoute(_) => (StatusCode::NOT_FOUND, "not_found"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, code, "request failed");
        }
        let mut body = json!({"error": {"code": code, "message": self.to_string()}});
        match &self {
            ApiError::Engine(EngineError::TooManyConcurrent(limit)) => {
                body["error"]["limit"] = json!(limit);
            }
            ApiError::Engine(EngineError::InsufficientBalance { balance }) => {
                body["error"]["balance"] = json!(balance);
            }
            _ => {}
        }
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Engine(EngineError::RateLimited { retry_after_ms, .. }) = &self {
            // Whole seconds, rounded up (RFC 9110 §10.2.3), so a client that waits
            // exactly this long is not refused again.
            let secs = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
