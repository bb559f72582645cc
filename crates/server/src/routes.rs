//! The JSON routes of docs/protocol.md §4. Each handler: authenticate, parse, call the engine,
//! answer. The SSE route lives in `sse.rs`.

use axum::Json;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use genstream_engine::EngineError;
use genstream_engine::manager::StartRequest;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::openapi as api;

/// A JSON body whose errors are 400s that name the field (`text: invalid type: …`),
/// and 413 past the body limit. Unlike `axum::Json` it does not insist on a
/// `Content-Type`, since curl users forget it and nothing is gained by refusing.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(0);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::InvalidJson(format!("could not read body: {e}"))
            }
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(JsonBody)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if inner.is_syntax()
                    || inner.is_eof()
                    || path.is_empty()
                    || path == "."
                    || path == "?"
                {
                    ApiError::InvalidJson(format!("invalid JSON body: {inner}"))
                } else {
                    ApiError::InvalidJson(format!("invalid `{path}`: {inner}"))
                }
            })
    }
}

/// Request extension carrying the configured body limit, for the 413 message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Body of `POST /api/chat`. Unknown fields are accepted (clients such as LibreChat
/// send more than genstream reads); an `Idempotency-Key` repeat is compared on the
/// fields read (serialized back, `crate::idempotency`).
#[derive(Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatBody {
    /// The user's message.
    text: String,
    /// Continue this conversation (new when absent; a new id names a new one).
    #[serde(default)]
    conversation_id: Option<String>,
    /// Answer under this message (default: the conversation's latest).
    #[serde(default)]
    parent_message_id: Option<String>,
    /// A configured model's name (default: the first).
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    system_prompt: Option<String>,
    /// Server-side tools to offer, by name (of the model's).
    #[serde(default)]
    tools: Option<Vec<String>>,
    /// Where to POST this job's job-finished webhook (`crate::webhooks`).
    #[serde(default)]
    webhook_url: Option<String>,
}

/// `POST /api/chat`: starts a job; its answer streams at
/// `GET /api/chat/stream/{streamId}`.
#[utoipa::path(post, path = "/api/chat", tag = "chat",
    params(crate::openapi::IdempotencyKey),
    request_body = ChatBody,
    responses((status = 200, description = "The job started", body = crate::openapi::Started),
        crate::openapi::ApiErrors))]
pub async fn start_chat(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<ChatBody>,
) -> Result<Response, ApiError> {
    let client_ip =
        crate::client_ip::client_ip(peer.map(|c| c.0.0.ip()), &headers, &state.trusted_proxies);
    let idempotency = crate::idempotency::from_headers(&headers, "/api/chat", &body)?;
    let webhook_url = state.webhooks.requested("webhookUrl", body.webhook_url)?;
    let started = state
        .manager
        .start(StartRequest {
            user_id: user,
            text: body.text,
            conversation_id: body.conversation_id,
            parent_message_id: body.parent_message_id,
            model: body.model,
            system_prompt: body.system_prompt,
            tools: body.tools.unwrap_or_default(),
            client_ip: client_ip.map(|ip| ip.to_string()),
            webhook_url,
            idempotency,
            ..Default::default()
        })
        .await?;
    let mut v = serde_json::to_value(&started).unwrap_or_default();
    v["status"] = json!("started");
    Ok(Json(v).into_response())
}

/// `GET /api/chat/active`: the caller's running jobs.
#[utoipa::path(get, path = "/api/chat/active", tag = "chat",
    responses((status = 200, description = "The running jobs", body = crate::openapi::ActiveJobs), crate::openapi::ApiErrors))]
pub async fn active(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<api::ActiveJobs>, ApiError> {
    let jobs = state.manager.active(&user).await?;
    Ok(Json(api::ActiveJobs {
        active_job_ids: jobs.iter().map(|j| j.stream_id.clone()).collect(),
        jobs: jobs
            .into_iter()
            .map(|j| api::ActiveJob {
                stream_id: j.stream_id,
                conversation_id: j.conversation_id,
                status: j.status,
                created_at: j.created_at,
            })
            .collect(),
    }))
}

/// `GET /api/chat/status/{conversation_id}`: the conversation's latest job, with the
/// answer so far.
#[utoipa::path(get, path = "/api/chat/status/{conversation_id}", tag = "chat",
    params(("conversation_id" = String, Path)),
    responses((status = 200, description = "The latest job, or `{\"active\": false}` when none is kept", body = crate::openapi::JobStatusAnswer), crate::openapi::ApiErrors))]
pub async fn status(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(conversation_id): Path<String>,
) -> Result<Json<api::JobStatusAnswer>, ApiError> {
    Ok(Json(
        match state.manager.status(&user, &conversation_id).await? {
            None => api::JobStatusAnswer {
                active: false,
                stream_id: None,
                status: None,
                created_at: None,
                resume_state: None,
            },
            Some((meta, resume)) => api::JobStatusAnswer {
                active: meta.status == genstream_engine::store::JobStatus::Running,
                stream_id: Some(meta.stream_id),
                status: Some(meta.status),
                created_at: Some(meta.created_at),
                resume_state: Some(resume),
            },
        },
    ))
}

/// Body of `POST /api/chat/abort`: one of the two ids.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbortBody {
    /// The job to abort; wins over `conversationId`.
    #[serde(default)]
    stream_id: Option<String>,
    /// Abort the conversation's running job.
    #[serde(default)]
    conversation_id: Option<String>,
}

/// `POST /api/chat/abort`: stops a job; its partial answer is saved before this answers.
#[utoipa::path(post, path = "/api/chat/abort", tag = "chat", request_body = AbortBody,
    responses((status = 200, description = "The job was aborted", body = crate::openapi::Aborted), crate::openapi::ApiErrors))]
pub async fn abort(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(body): JsonBody<AbortBody>,
) -> Result<Json<api::Aborted>, ApiError> {
    let outcome = match (body.stream_id, body.conversation_id) {
        (Some(id), _) => state.manager.abort(&user, &id).await?,
        (None, Some(conv)) => state.manager.abort_conversation(&user, &conv).await?,
        (None, None) => {
            return Err(EngineError::bad_request(
                "streamId",
                "give `streamId` or `conversationId`",
            )
            .into());
        }
    };
    Ok(Json(api::Aborted {
        success: true,
        aborted: outcome.stream_id,
        response_message: outcome.response_message,
        usage: outcome.usage,
    }))
}

/// `GET /api/conversations`: the caller's conversations.
#[utoipa::path(get, path = "/api/conversations", tag = "conversations",
    responses((status = 200, description = "The conversations, most recently updated first", body = crate::openapi::Conversations), crate::openapi::ApiErrors))]
pub async fn list_conversations(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list = state.manager.conversations(&user).await?;
    Ok(Json(json!({ "conversations": list })))
}

/// `GET /api/conversations/{id}`: one of the caller's conversations.
#[utoipa::path(get, path = "/api/conversations/{id}", tag = "conversations",
    params(("id" = String, Path, description = "The conversation id")),
    responses((status = 200, description = "The conversation", body = crate::openapi::Conversation), crate::openapi::ApiErrors))]
pub async fn get_conversation(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let c = state.manager.own_conversation(&user, &id).await?;
    Ok(Json(serde_json::to_value(c).unwrap_or_default()))
}

/// `GET /api/conversations/{id}/messages`: the conversation's saved messages.
#[utoipa::path(get, path = "/api/conversations/{id}/messages", tag = "conversations",
    params(("id" = String, Path, description = "The conversation id")),
    responses((status = 200, description = "The messages, oldest first", body = crate::openapi::Messages), crate::openapi::ApiErrors))]
pub async fn list_messages(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let messages = state.manager.messages(&user, &id).await?;
    Ok(Json(json!({ "messages": messages })))
}

/// `DELETE /api/conversations/{id}`: 409 `conversation_busy` while a generation runs
/// (abort first); atomic against a chat starting in it (`JobManager::delete_conversation`).
#[utoipa::path(delete, path = "/api/conversations/{id}", tag = "conversations",
    params(("id" = String, Path, description = "The conversation id")),
    responses((status = 200, description = "Whether there was something to delete", body = crate::openapi::Deleted), crate::openapi::ApiErrors))]
pub async fn delete_conversation(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<api::Deleted>, ApiError> {
    let deleted = state.manager.delete_conversation(&user, &id).await?;
    Ok(Json(api::Deleted { deleted }))
}

/// `GET /api/models`: the configured models.
#[utoipa::path(get, path = "/api/models", tag = "account",
    responses((status = 200, description = "The models, the default first", body = crate::openapi::Models), crate::openapi::ApiErrors))]
pub async fn models(State(state): State<AppState>, AuthUser(_user): AuthUser) -> Json<api::Models> {
    let models = state
        .manager
        .models()
        .iter()
        .map(|m| api::Model {
            name: m.name.clone(),
            // The configured name (`[providers.NAME]`, or `demo`), as usage
            // records carry it; `kind` is the wire protocol it speaks.
            provider: m.provider.name().to_string(),
            kind: m.provider.kind().to_string(),
            tools: m.tools.clone(),
            // USD per million tokens; null means the model costs nothing.
            pricing: m.pricing,
            free: m.pricing.is_none(),
        })
        .collect();
    Json(api::Models { models })
}

/// `GET /api/balance`: `{"balance": credits}`, settled as `POST /api/chat` settles it
/// (a new user gets the start balance, a refill that is due is applied), so the two
/// never disagree; `null` when balances are off.
#[utoipa::path(get, path = "/api/balance", tag = "account",
    responses((status = 200, description = "The balance", body = crate::openapi::Balance), crate::openapi::ApiErrors))]
pub async fn balance(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<api::Balance>, ApiError> {
    let balance = state
        .manager
        .balance(&user)
        .await?
        .map(genstream_engine::billing::credits);
    Ok(Json(api::Balance { balance }))
}

/// Query of `GET /api/usage`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// `conversation` (default), `day` or `month`.
    #[serde(default)]
    #[param(pattern = "^(conversation|day|month)$")]
    by: Option<String>,
    /// At most this many rows (default 100, at most 1000).
    #[serde(default)]
    #[param(minimum = 0, maximum = 4294967295_u64)]
    limit: Option<u32>,
}

/// `GET /api/usage?by=conversation|day|month`: the caller's tokens and credits.
#[utoipa::path(get, path = "/api/usage", tag = "account", params(UsageQuery),
    responses((status = 200, description = "The usage rows", body = crate::openapi::UsageReport), crate::openapi::ApiErrors))]
pub async fn usage(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    query: Result<axum::extract::Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<api::UsageReport>, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| EngineError::bad_request("query", e.body_text()))?;
    let by = q.by.as_deref().unwrap_or("conversation");
    let period = match by {
        "conversation" => None,
        "day" | "month" => Some(by),
        other => {
            return Err(EngineError::bad_request(
                "by",
                format!("{other:?}: use conversation, day or month"),
            )
            .into());
        }
    };
    let rows = state
        .manager
        .usage_report(&user, period, q.limit.unwrap_or(100).clamp(1, 1000))
        .await?;
    let usage = rows
        .into_iter()
        .map(|r| api::UsageRow {
            key: r.key,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            reasoning_tokens: r.reasoning_tokens,
            cache_write_tokens: r.cache_write_tokens,
            cache_read_tokens: r.cache_read_tokens,
            calls: r.calls,
            credits: genstream_engine::billing::credits(r.amount_micro),
        })
        .collect();
    Ok(Json(api::UsageReport {
        by: by.to_string(),
        usage,
    }))
}

/// `GET /healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process is up", body = crate::openapi::Health)))]
pub async fn healthz() -> Json<api::Health> {
    Json(api::Health {
        status: "ok".into(),
    })
}

/// `GET /readyz`: the store and the database answer (503 when one does not).
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, description = "Both answer", body = crate::openapi::Readiness),
        (status = 503, description = "One does not: its error instead of `ok`",
            body = crate::openapi::Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (store, db) = state.manager.readiness().await;
    let body = api::Readiness {
        store: store
            .as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| e.to_string()),
        database: db
            .as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| e.to_string()),
    };
    let status = if store.is_ok() && db.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}

/// A known path with the wrong method; axum adds the `Allow` header.
pub async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
