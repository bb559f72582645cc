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
pub mod openapi;
mod routes;
pub mod serve;
pub mod sse;
pub mod ui;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use genstream_engine::manager::JobManager;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// Most bytes of consecutive frames an SSE subscriber that is behind writes as one
    /// chunk (`http.sse_chunk_bytes`); 0: one frame per chunk. Default 16384.
    pub sse_chunk_bytes: usize,
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

/// Every API route, each registered with its OpenAPI description (`openapi.rs`):
/// utoipa-axum's `routes!` takes the path and the methods from the handler's
/// `#[utoipa::path]`, so no route is served without being in `GET /openapi.json`.
/// Handlers of one path go in one `routes!`.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(routes::start_chat))
        .routes(routes!(sse::stream))
        .routes(routes!(routes::active))
        .routes(routes!(routes::status))
        .routes(routes!(routes::abort))
        .routes(routes!(ai_sdk::chat))
        .routes(routes!(ai_sdk::resume))
        .routes(routes!(routes::list_conversations))
        .routes(routes!(
            routes::get_conversation,
            routes::delete_conversation
        ))
        .routes(routes!(routes::list_messages))
        .routes(routes!(routes::models))
        .routes(routes!(routes::balance))
        .routes(routes!(routes::usage))
        .routes(routes!(routes::healthz))
        .routes(routes!(routes::readyz))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs))
        .nest("/v1", openai::router())
}

/// [`app`] with `extra` routes (`GET /metrics`) behind the same layers.
pub fn app_with(state: AppState, max_body_bytes: usize, extra: Router) -> Router {
    let (api, _doc) = api_router().split_for_parts();
    let routes = api
        // The web app at `/` (and its deep links `/c/{id}`); see `ui.rs`. Not in the
        // OpenAPI document: it answers HTML and files.
        .merge(ui::router())
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::Extension(routes::BodyLimit(max_body_bytes)))
        .with_state(state);
    observe::layers(routes.merge(extra))
}
