//! The Vercel AI SDK chat routes (what `useChat` with `DefaultChatTransport` calls):
//! `POST /api/ai/chat` starts a job and answers its UI message stream
//! (`x-vercel-ai-ui-message-stream: v1`, the `AiSdkProjector` of
//! `genstream-protocols`); `GET /api/ai/chat/{chatId}/stream` (`useChat({resume:
//! true})`) answers the running job's stream from its start, or 204 when the chat has
//! none. Stop is `POST /api/chat/abort` with `{conversationId: chatId}`.
//!
//! The chat id is the conversation id, chosen by the client: the first user to send
//! it owns the conversation. The job runs to its end whatever the connection does.
//! Errors are genstream's JSON shape (`error.rs`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use genstream_engine::EngineError;
use genstream_engine::manager::StartRequest;
use genstream_engine::store::JobStatus;
use serde_json::Value;

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::openai::{job_headers, projected_stream, shared};
use crate::routes::JsonBody;

/// A chat id: 1–128 characters of `[A-Za-z0-9_-]`.
fn valid_chat_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn bad(field: &str, message: &str) -> ApiError {
    EngineError::bad_request(field, message.to_string()).into()
}

/// The text of a UI message: its `text` parts joined.
fn text_of(message: &Value) -> String {
    message
        .get("parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

/// `POST /api/ai/chat`: the body `DefaultChatTransport` sends, `{id, messages,
/// trigger, messageId, ...body}`. `trigger` `submit-message` (the default) answers
/// the last user message of `messages` (its text parts joined) under the
/// conversation's latest message; `regenerate-message` answers again the user message
/// that the answer `messageId` (or the conversation's latest answer) replied to, as a
/// new sibling answer. `model` (from the transport's `body`) picks the model;
/// `webhookUrl` (also from the transport's `body`) is where the job-finished webhook
/// goes, as on `POST /api/chat`. An `Idempotency-Key` header makes a repeat answer the
/// first start's stream (`crate::idempotency`).
///
/// Errors: 400 naming `id`, `messages`, `trigger`, `model`, `webhookUrl` or
/// `Idempotency-Key`; 422 `idempotency_key_reused`; 401; 403 for another
/// user's chat id; the engine's start errors (429, 402, 409, …).
#[utoipa::path(post, path = "/api/ai/chat", tag = "ai-sdk",
    params(crate::openapi::IdempotencyKey),
    request_body = crate::openapi::AiChatBody,
    responses((status = 200, description = crate::openapi::AI_SDK_STREAM,
        content_type = "text/event-stream", body = crate::openapi::SseEvent,
        headers(("x-vercel-ai-ui-message-stream" = String, description = "`v1`"),
            ("x-genstream-stream-id" = String), ("x-genstream-conversation-id" = String))),
        crate::openapi::ApiErrors))]
pub async fn chat(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    };
    let id = body
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| valid_chat_id(id))
        .ok_or_else(|| bad("id", "must be 1-128 characters of [A-Za-z0-9_-]"))?;
    let model = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(bad("model", "must be a string")),
    };
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages", "is required and must be an array"))?;
    let regenerate = match body.get("trigger").and_then(|t| t.as_str().or(Some("?"))) {
        None | Some("submit-message") => false,
        Some("regenerate-message") => true,
        Some(_) => {
            return Err(bad(
                "trigger",
                "must be \"submit-message\" or \"regenerate-message\"",
            ));
        }
    };
    let webhook_url = match body.get("webhookUrl") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => return Err(bad("webhookUrl", "must be a string")),
    };
    let webhook_url = state.webhooks.requested("webhookUrl", webhook_url)?;
    let idempotency = crate::idempotency::from_headers(&headers, "/api/ai/chat", body)?;
    let client_ip =
        crate::client_ip::client_ip(peer.map(|c| c.0.0.ip()), &headers, &state.trusted_proxies);
    let mut req = StartRequest {
        user_id: user.clone(),
        conversation_id: Some(id.to_string()),
        create_conversation: true,
        model,
        client_ip: client_ip.map(|ip| ip.to_string()),
        webhook_url,
        idempotency,
        ..Default::default()
    };
    if regenerate {
        let history = state.manager.messages(&user, id).await?;
        let answer = body
            .get("messageId")
            .and_then(Value::as_str)
            .and_then(|m| history.iter().find(|h| h.message_id == m))
            .or_else(|| history.iter().rev().find(|h| !h.is_created_by_user));
        let input = answer
            .and_then(|a| a.parent_message_id.as_deref())
            .and_then(|p| history.iter().find(|h| h.message_id == p))
            .filter(|m| m.is_created_by_user)
            .ok_or_else(|| bad("messageId", "names no answer of this chat to regenerate"))?;
        req.text = input.text.clone();
        req.parent_message_id = Some(input.message_id.clone());
        req.answer_existing = true;
    } else {
        let last = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .ok_or_else(|| bad("messages", "must hold a user message"))?;
        req.text = text_of(last);
        if req.text.trim().is_empty() {
            return Err(bad("messages", "the last user message has no text part"));
        }
    }
    let started = state.manager.start(req).await?;
    // A repeat after the log expired gets the saved answer, replayed.
    let (meta, log) = state.manager.started_job(&user, &started).await?;
    Ok(stream_of(&state, &meta, log))
}

/// `GET /api/ai/chat/{chatId}/stream`: the chat's running job's UI message stream
/// from its `start`, or 204 No Content when no job of it runs.
///
/// Errors: 401; 403 for another user's chat.
#[utoipa::path(get, path = "/api/ai/chat/{chat_id}/stream", tag = "ai-sdk",
    params(("chat_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
        description = "The chat (conversation) id")),
    responses(
        (status = 200, description = crate::openapi::AI_SDK_STREAM,
            content_type = "text/event-stream", body = crate::openapi::SseEvent),
        (status = 204, description = "No job of the chat runs"),
        crate::openapi::ApiErrors))]
pub async fn resume(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(chat_id): Path<String>,
) -> Result<Response, ApiError> {
    if !valid_chat_id(&chat_id) {
        return Err(bad("id", "must be 1-128 characters of [A-Za-z0-9_-]"));
    }
    let Some((meta, _)) = state.manager.status(&user, &chat_id).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    if meta.status != JobStatus::Running {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (meta, log) = state.manager.job_for(&user, &meta.stream_id).await?;
    Ok(stream_of(&state, &meta, log))
}

/// The job's UI message stream with the AI SDK's headers and genstream's.
fn stream_of(
    state: &AppState,
    meta: &genstream_engine::store::JobMeta,
    log: std::sync::Arc<genstream_engine::log::EventLog>,
) -> Response {
    let projection = shared::ai_sdk(&meta.stream_id, &log);
    let mut headers = job_headers(meta);
    headers.extend(
        genstream_protocols::ai_sdk::HEADERS
            .iter()
            // `connection` is HTTP/1's own business (HTTP/2 forbids it).
            .filter(|(k, _)| *k != "connection")
            .map(|(k, v)| (*k, (*v).to_string())),
    );
    projected_stream(state, log, projection, None, &headers)
}
