//! genstream's HTTP layer (docs/protocol.md §3, §4).
//!
//! Handlers are thin: authenticate, parse and validate, call one function of the
//! engine's [`JobManager`], turn the result into a response. Every error goes through
//! [`error::ApiError`], the one place that maps errors to a status and a JSON body.
//! [`app`] builds the router so that tests can drive it in-process with `oneshot` and
//! the binary serves the very same router behind a socket.

pub mod ai_sdk;
pub mod auth;
pub mod client_ip;
pub mod config;
pub mod error;
pub mod idempotency;
pub mod observe;
pub mod openai;
mod routes;
pub mod serve;
pub mod sse;
pub mod ui;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use genstream_engine::manager::JobManager;

pub use config::Config;
pub use error::ApiError;

/// Everything a handler needs, shared by all requests.
#[derive(Clone)]
pub struct AppState {
    pub manager: JobManager,
    pub auth: Arc<auth::JwtKeys>,
    /// Interval of `: ping` keep-alive comments on SSE streams. Default 15 s.
    pub keepalive: Duration,
    /// The `retry:` field every SSE response opens with: how long a browser's
    /// EventSource waits before it reconnects. Default 1000 ms.
    pub sse_retry: Duration,
    /// Proxies whose `X-Forwarded-For` is believed, for the per-IP rate limit.
    pub trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    /// The job-finished webhook client, for checking a request's `webhookUrl` (the
    /// manager holds it too, as its end hook). Default: off.
    pub webhooks: Arc<webhooks::Webhooks>,
}

/// The router with every route of docs/protocol.md §4, and the web app (`ui`). `max_body_bytes` bounds request bodies
/// (over it: 413). Every response carries `x-request-id`, every request is logged and
/// counted (`observe.rs`).
pub fn app(state: AppState, max_body_bytes: usize) -> Router {
    app_with(state, max_body_bytes, Router::new())
}

/// [`app`] with `extra` routes (`GET /metrics`) behind the same layers.
pub fn app_with(state: AppState, max_body_bytes: usize, extra: Router) -> Router {
    let routes = Router::new()
        .route("/api/chat", post(routes::start_chat))
        .route("/api/chat/stream/{stream_id}", get(sse::stream))
        .route("/api/chat/active", get(routes::active))
        .route("/api/chat/status/{conversation_id}", get(routes::status))
        .route("/api/chat/abort", post(routes::abort))
        .route("/api/ai/chat", post(ai_sdk::chat))
        .route("/api/ai/chat/{chat_id}/stream", get(ai_sdk::resume))
        .route("/api/conversations", get(routes::list_conversations))
        .route(
            "/api/conversations/{id}",
            get(routes::get_conversation).delete(routes::delete_conversation),
        )
        .route(
            "/api/conversations/{id}/messages",
            get(routes::list_messages),
        )
        .route("/api/models", get(routes::models))
        .route("/api/balance", get(routes::balance))
        .route("/api/usage", get(routes::usage))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .nest("/v1", openai::router())
        // The web app at `/` (and its deep links `/c/{id}`); see `ui.rs`.
        .merge(ui::router())
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::Extension(routes::BodyLimit(max_body_bytes)))
        .with_state(state);
    observe::layers(routes.merge(extra))
}
