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
    /// A job the request waited for failed (`/v1` non-streaming answers): 502 when the
    /// upstream failed, 500 otherwise; `code` is genstream's (`upstream_error`, …).
    #[error("{message}")]
    JobFailed { code: String, message: String },
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
                E::IdempotencyConflict(_) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
                }
                E::IdempotencyInProgress(_) => (StatusCode::CONFLICT, "idempotency_key_in_use"),
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
            ApiError::JobFailed { code, .. } if code == "upstream_error" => {
                (StatusCode::BAD_GATEWAY, "upstream_error")
            }
            ApiError::JobFailed { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The parameter a 400 is about, when it names one (`EngineError::BadRequest`'s
    /// field).
    fn param(&self) -> Option<&str> {
        match self {
            ApiError::Engine(EngineError::BadRequest { field, .. }) => Some(field),
            ApiError::Engine(
                EngineError::IdempotencyConflict(_) | EngineError::IdempotencyInProgress(_),
            ) => Some("Idempotency-Key"),
            _ => None,
        }
    }
}

/// An [`ApiError`] in OpenAI's shape, for the `/v1` routes:
/// `{"error": {"message", "type", "param", "code"}}` with the same status as on
/// `/api`. `type` is OpenAI's class of the status (`invalid_request_error` for 400,
/// 404, 409, 413 and 422; `authentication_error` 401; `permission_error` 403;
/// `rate_limit_error` 429; `insufficient_quota` 402; `server_error` 5xx); `param`
/// names the request field of a 400 (OpenAI's own names, e.g. `messages[2].content`);
/// `code` is genstream's code (`invalid_request`, `not_found`, `rate_limited`, …).
#[derive(Debug)]
pub struct OpenAiError {
    pub error: ApiError,
    /// Overrides the parameter the error names (`None`: what the error says).
    pub param: Option<String>,
}

impl OpenAiError {
    /// A 400 about request parameter `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        OpenAiError {
            error: EngineError::bad_request(param, message).into(),
            param: None,
        }
    }
}

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        OpenAiError {
            error: e.into(),
            param: None,
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let (status, code) = self.error.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self.error, code, "request failed");
        }
        let kind = match status.as_u16() {
            401 => "authentication_error",
            402 => "insufficient_quota",
            403 => "permission_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        let param = self
            .param
            .as_deref()
            .or_else(|| self.error.param())
            .map(str::to_owned);
        let message = match &self.error {
            // The field is in `param`; the message is the engine's own.
            ApiError::Engine(EngineError::BadRequest { message, .. }) => message.clone(),
            e => e.to_string(),
        };
        let body = json!({"error": {"message": message, "type": kind, "param": param,
            "code": code}});
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Engine(EngineError::RateLimited { retry_after_ms, .. }) = &self.error {
            let secs = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
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
