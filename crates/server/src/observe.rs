//! What an operator sees: request ids, the request log, and Prometheus metrics.
//!
//! - **Request ids.** Every response carries `x-request-id`: the request's own when it
//!   sent one, else a new UUID (tower-http's `SetRequestIdLayer` and
//!   `PropagateRequestIdLayer`).
//! - **The request log.** Each request runs in a `request` span with `request_id`,
//!   `method`, `route` (the matched route, `/api/chat/stream/{stream_id}`) and `path` —
//!   the URI's path only, never its query, because the stream route takes
//!   `?access_token=`; no header is ever logged, so neither is a JWT or an API key. A
//!   job started by a request runs in a `job` span that is the request span's child
//!   (the engine's `JobManager::start`), so the job's lines carry the request id too.
//!   One `finished processing request` line per request at `info`, with status and
//!   latency. [`LogFormat::Json`] (`log.format = "json"`) writes one JSON object per
//!   line, spans included.
//! - **Metrics.** The `metrics` facade, recorded by the engine
//!   (`genstream_engine::metrics`, where every name is listed) and here (HTTP requests
//!   by route and status, subscribers, frames), rendered by
//!   `metrics-exporter-prometheus` at `GET /metrics` ([`metrics_router`]), on the main
//!   port or on `metrics_bind`.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use genstream_engine::manager::JobManager;
use genstream_engine::metrics as m;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnRequest, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// `[log]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `"text"` (default, for people) or `"json"` (one object per line, for a log
    /// pipeline). The level comes from `RUST_LOG` (default `info`).
    pub format: LogFormat,
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `router` behind the request-id, request-log and HTTP-metrics layers.
pub fn layers(router: Router) -> Router {
    router
        .layer(axum::middleware::from_fn(count_request))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(DefaultOnRequest::new().level(Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The span of one request. Only the path: a query may hold `access_token`.
fn request_span(req: &Request<Body>) -> tracing::Span {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        request_id,
        method = %req.method(),
        route = route(req),
        path = req.uri().path(),
    )
}

/// The matched route, or `unmatched` (a 404 answered by the fallback): never the raw
/// path, which would make one metric series per id.
fn route(req: &Request<Body>) -> &str {
    req.extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
}

async fn count_request(req: Request, next: Next) -> Response {
    let route = route(&req).to_owned();
    let method = req.method().to_string();
    let resp = next.run(req).await;
    counter!(m::HTTP_REQUESTS, "method" => method, "route" => route, "status" => resp.status().as_str().to_owned())
        .increment(1);
    resp
}

/// The process's Prometheus recorder, installed as the global one on first use
/// (`metrics` has one recorder per process). `None` when another recorder was
/// installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .ok()?
                .install_recorder()
                .ok()?;
            // Histogram samples are folded into their buckets by upkeep.
            let upkeep = handle.clone();
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        })
        .clone()
}

/// `GET /metrics`: the Prometheus text format. The running-jobs gauge is read from
/// the manager when scraped.
pub fn metrics_router(handle: PrometheusHandle, manager: JobManager) -> Router {
    let (router, _doc) = metrics_routes().split_for_parts();
    router.with_state((handle, manager))
}

/// The metrics route with its OpenAPI description (merged into `GET /openapi.json`).
fn metrics_routes() -> OpenApiRouter<(PrometheusHandle, JobManager)> {
    OpenApiRouter::new().routes(routes!(render))
}

/// The OpenAPI description of `GET /metrics`.
pub fn metrics_openapi() -> utoipa::openapi::OpenApi {
    metrics_routes().into_openapi()
}

/// `GET /metrics`: Prometheus's text format (on `metrics_bind` when that is set).
#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text exposition format 0.0.4",
        content_type = "text/plain", body = String)))]
async fn render(State((handle, manager)): State<(PrometheusHandle, JobManager)>) -> Response {
    gauge!(m::JOBS_RUNNING).set(manager.live_jobs() as f64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// One open SSE connection, for the subscribers gauge and the frames counter. Frames
/// are counted locally and added to the shared counter (a handle taken once, at
/// connect) when the stream has caught up and [`FLUSH_EVERY`] frames or
/// [`FLUSH_AFTER`] have passed since the last flush, and when it ends: a subscriber
/// that keeps up catches up after every frame, and a shared add per frame and
/// subscriber would cost about a tenth of the fan-out's CPU (BENCHMARKS.md, "Metrics").
pub(crate) struct Connected {
    frames: u64,
    counter: metrics::Counter,
    flushed: std::time::Instant,
}

/// Frames a connection may hold back from the shared counter.
const FLUSH_EVERY: u64 = 256;
/// How long a connection may hold frames back from the shared counter.
const FLUSH_AFTER: Duration = Duration::from_secs(1);

impl Connected {
    pub(crate) fn new() -> Self {
        gauge!(m::SUBSCRIBERS).increment(1.0);
        Connected {
            frames: 0,
            counter: counter!(m::FRAMES_DELIVERED),
            flushed: std::time::Instant::now(),
        }
    }

    /// One frame handed to the socket.
    pub(crate) fn frame(&mut self) {
        self.frames += 1;
    }

    /// `n` frames handed to the socket (one run).
    pub(crate) fn frames(&mut self, n: usize) {
        self.frames += n as u64;
    }

    /// Caught up: adds the frames counted so far to the shared counter, if enough
    /// frames or time have passed.
    pub(crate) fn idle(&mut self) {
        if self.frames >= FLUSH_EVERY || (self.frames > 0 && self.flushed.elapsed() >= FLUSH_AFTER)
        {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.counter.increment(std::mem::take(&mut self.frames));
        self.flushed = std::time::Instant::now();
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        if self.frames > 0 {
            self.flush();
        }
        gauge!(m::SUBSCRIBERS).decrement(1.0);
    }
}
