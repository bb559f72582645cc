//! The OpenAI-compatible routes under `/v1`: models, Chat Completions and Responses.
//!
//! Each request is a genstream job (see `JobManager::start`); what a client reads is a
//! projection of the job's native event log by `genstream-protocols` (its README has
//! the mapping tables). The projections are kept once per (job, protocol) on this
//! replica and shared by all their readers (`shared.rs`); a streaming response is a
//! subscriber that follows the native log exactly as `sse.rs` does (watch, pings) and
//! writes the shared projection's frames from its position on. The projection is a
//! pure function of the log, so a reconnect anywhere (a Responses `starting_after=N`)
//! gets exactly the frames after N.
//!
//! Errors are OpenAI's shape ([`OpenAiError`]), 401/403/404 included; unknown request
//! fields are ignored, parameters genstream cannot honour are 400s naming them.

mod chat;
mod input;
mod responses;
pub(crate) mod shared;

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use genstream_engine::EngineError;
use genstream_engine::event::{Event, EventBody};
use genstream_engine::log::EventLog;
use genstream_engine::store::JobMeta;
use genstream_protocols::Projector;
use serde_json::{Value, json};
use tokio::time::Instant;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, OpenAiError};

/// The `/v1` router (nested under `/v1` by [`crate::app`]).
/// Each route is registered with its OpenAPI description (see `crate::api_router`).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(models))
        .routes(routes!(model))
        .routes(routes!(chat::create))
        .routes(routes!(chat::retrieve))
        .routes(routes!(responses::create))
        .routes(routes!(responses::retrieve, responses::delete))
        .routes(routes!(responses::cancel))
        .routes(routes!(responses::input_items))
        .fallback(not_found)
}

/// The response header naming the job's stream id (genstream's native stream is
/// `GET /api/chat/stream/{id}`).
pub const STREAM_ID_HEADER: &str = "x-genstream-stream-id";
/// The response header naming the job's conversation.
pub const CONVERSATION_ID_HEADER: &str = "x-genstream-conversation-id";

async fn not_found(uri: Uri) -> OpenAiError {
    ApiError::NoRoute(uri.path().to_string()).into()
}

/// The authenticated user of a `/v1` request: `Authorization: Bearer` with an API key
/// (`gsk_…`) or a JWT; failures in OpenAI's shape.
pub struct OpenAiUser(pub String);

impl<S> FromRequestParts<S> for OpenAiUser
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AppState::from_ref(state);
        match crate::auth::bearer(parts) {
            Some(token) => Ok(OpenAiUser(crate::auth::authenticate(&state, token?).await?)),
            None => Err(ApiError::Unauthorized(
                "missing bearer token: send `Authorization: Bearer <API key>`".into(),
            )
            .into()),
        }
    }
}

/// A JSON object body; a body that is not one is a 400 in OpenAI's shape. Fields are
/// read by the routes themselves (so that unknown ones are ignored and each error
/// names its parameter).
pub struct OpenAiBody(pub serde_json::Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for OpenAiBody {
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let crate::routes::JsonBody(v) = crate::routes::JsonBody::<Value>::from_request(req, state)
            .await
            .map_err(OpenAiError::from)?;
        match v {
            Value::Object(map) => Ok(OpenAiBody(map)),
            _ => Err(ApiError::InvalidJson("the body must be a JSON object".into()).into()),
        }
    }
}

/// The body's `webhook_url`, genstream's extension of the create routes (an OpenAI
/// SDK sends it with `extra_body={"webhook_url": …}`): where the job-finished webhook
/// goes, as `webhookUrl` on `POST /api/chat`.
///
/// Errors: 400 naming `webhook_url` when it is not a string.
pub(crate) fn webhook_url_of(
    body: &serde_json::Map<String, Value>,
) -> Result<Option<String>, OpenAiError> {
    match body.get("webhook_url") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(u)) => Ok(Some(u.clone())),
        Some(_) => Err(OpenAiError::invalid("webhook_url", "must be a string")),
    }
}

/// `GET /v1/models`: `{"object": "list", "data": [{id, object: "model", created,
/// owned_by}]}`, the configured models (the default first); `owned_by` is the provider's
/// configured name.
#[utoipa::path(get, path = "/models", tag = "openai",
    responses((status = 200, description = "The models, the default first", body = crate::openapi::ModelList), crate::openapi::OpenAiErrors))]
async fn models(State(state): State<AppState>, _user: OpenAiUser) -> Json<Value> {
    let data: Vec<Value> = state
        .manager
        .models()
        .iter()
        .map(|m| model_object(&m.name, m.provider.name()))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one model; 404 for an unknown one.
#[utoipa::path(get, path = "/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "The model's name")),
    responses((status = 200, description = "The model", body = crate::openapi::ModelObject), crate::openapi::OpenAiErrors))]
async fn model(
    State(state): State<AppState>,
    _user: OpenAiUser,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    state
        .manager
        .models()
        .iter()
        .find(|m| m.name == id)
        .map(|m| Json(model_object(&m.name, m.provider.name())))
        .ok_or_else(|| EngineError::NotFound(format!("model {id}")).into())
}

fn model_object(name: &str, provider: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": provider})
}

/// The stream id a protocol id stands for: `chatcmpl-<32 hex>` / `resp_<32 hex>` are
/// the stream id (a UUID) without its hyphens. `None` for anything else.
pub(crate) fn stream_id_of(id: &str, prefix: &str) -> Option<String> {
    let hex = id.strip_prefix(prefix)?;
    if hex.len() != 32 {
        return None;
    }
    uuid::Uuid::try_parse(hex).ok().map(|u| u.to_string())
}

/// The job behind a protocol id, if the caller may read it (404 for an unknown or
/// malformed id, 403 for another user's).
pub(crate) async fn job_of(
    state: &AppState,
    user: &str,
    id: &str,
    prefix: &str,
) -> Result<(JobMeta, Arc<EventLog>), OpenAiError> {
    let stream_id =
        stream_id_of(id, prefix).ok_or_else(|| EngineError::NotFound(format!("{id:?}")))?;
    state
        .manager
        .job_for(user, &stream_id)
        .await
        .map_err(|e| match e {
            EngineError::NotFound(_) => EngineError::NotFound(id.to_string()).into(),
            e => e.into(),
        })
}

/// The event at `seq` of `log`, decoded from its frame.
fn event_at(log: &EventLog, seq: u64) -> Option<Event> {
    let frame = log.frame_after(seq.checked_sub(1))?;
    serde_json::from_slice::<Event>(frame.data_json()).ok()
}

/// Waits until `log` has its terminal event (the job runs on whatever the client
/// does; this only waits).
pub(crate) async fn wait_for_end(log: &EventLog) {
    let mut rx = log.watch();
    loop {
        rx.borrow_and_update();
        if log.terminal().is_some() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The `created` event of a log.
pub(crate) fn created_of(log: &EventLog) -> Option<genstream_engine::event::Created> {
    match event_at(log, 0)?.body {
        EventBody::Created(c) => Some(c),
        _ => None,
    }
}

/// A streaming response of the shared projection's frames at positions after
/// `after` (all for `None`), live until the projected stream's terminal frame.
pub(crate) fn projected_stream<P: Projector + Send + 'static>(
    state: &AppState,
    log: Arc<EventLog>,
    shared: shared::Shared<P>,
    after: Option<u64>,
    headers: &[(&'static str, String)],
) -> Response {
    let sub = shared::Subscriber {
        rx: log.watch(),
        log,
        shared,
        position: after,
        done: false,
        ping: tokio::time::interval_at(Instant::now() + state.keepalive, state.keepalive),
        retry: Some(bytes::Bytes::from(format!(
            "retry: {}\n",
            state.sse_retry.as_millis()
        ))),
    };
    let body = Body::from_stream(futures::stream::unfold(sub, shared::Subscriber::next));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_headers(resp, headers)
}

/// `resp` with the given headers added (values that are not valid header text are
/// left out).
pub(crate) fn with_headers(mut resp: Response, headers: &[(&'static str, String)]) -> Response {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(*name, v);
        }
    }
    resp
}

/// The genstream headers of a job's responses.
pub(crate) fn job_headers(meta: &JobMeta) -> Vec<(&'static str, String)> {
    vec![
        (STREAM_ID_HEADER, meta.stream_id.clone()),
        (CONVERSATION_ID_HEADER, meta.conversation_id.clone()),
    ]
}

/// A JSON answer with the job's headers.
pub(crate) fn json_with(value: Value, headers: &[(&'static str, String)]) -> Response {
    with_headers(Json(value).into_response(), headers)
}
