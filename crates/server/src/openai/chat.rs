//! `POST /v1/chat/completions` and `GET /v1/chat/completions/{id}`.
//!
//! Each request is a durable job in a new conversation that holds the request's
//! messages (a chain, as `input.rs` maps them); the job answers the last user message
//! or the trailing tool results. `stream: true` answers with the job's Chat
//! Completions projection (`chat.completion.chunk`s, `data: [DONE]`); otherwise the
//! route waits for the job and answers the `chat.completion` object. Either way the
//! job runs to its end if the client goes away, and the headers `x-genstream-stream-id`
//! and `x-genstream-conversation-id` name it.

use std::collections::BTreeSet;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use genstream_engine::manager::{PriorTurn, StartRequest};
use genstream_protocols::chat::{ChatProjector, completion};
use genstream_protocols::fold::Outcome;
use serde_json::{Map, Value};

use super::{
    OpenAiBody, OpenAiUser, input, job_headers, job_of, json_with, projected_stream, shared,
    wait_for_end,
};
use crate::AppState;
use crate::error::{ApiError, OpenAiError};

/// The request's options genstream acts on.
struct ChatRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    client_tools: Vec<genstream_engine::provider::ToolSpec>,
    conversation: input::Conversation,
}

/// Reads a Chat Completions body: `model`, `messages`, `stream`,
/// `stream_options.include_usage`, `tools` (function tools, the client's),
/// `tool_choice` (`auto`, or `none`: the client's tools are not offered). Parameters
/// genstream cannot honour are 400s naming them: `n` other than 1, `logprobs`,
/// `top_logprobs`, `audio`, `modalities` other than text, `response_format` other than
/// text, `tool_choice` `required` or a named function, `parallel_tool_calls: false`.
/// Sampling parameters (`temperature`, `top_p`, `max_tokens`, `stop`, `seed`, …) and
/// unknown fields are ignored: the model's configuration decides.
fn parse(body: &Map<String, Value>) -> Result<ChatRequest, OpenAiError> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| OpenAiError::invalid("model", "is required and must be a string"))?
        .to_string();
    let messages = body
        .get("messages")
        .ok_or_else(|| OpenAiError::invalid("messages", "is required"))?;
    let conversation = input::chat_messages(messages)?;
    let flag = |name: &str| -> Result<bool, OpenAiError> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(OpenAiError::invalid(name, "must be a boolean")),
        }
    };
    let stream = flag("stream")?;
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(n) = body.get("n").filter(|v| !v.is_null())
        && n.as_u64() != Some(1)
    {
        return Err(OpenAiError::invalid("n", "only n = 1 is supported"));
    }
    if flag("logprobs")? {
        return Err(OpenAiError::invalid(
            "logprobs",
            "logprobs are not supported",
        ));
    }
    for unsupported in ["top_logprobs", "audio", "prediction"] {
        if body.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(OpenAiError::invalid(unsupported, "is not supported"));
        }
    }
    if let Some(m) = body.get("modalities").filter(|v| !v.is_null())
        && m.as_array()
            .is_none_or(|a| a.iter().any(|x| x.as_str() != Some("text")))
    {
        return Err(OpenAiError::invalid(
            "modalities",
            "only [\"text\"] is supported",
        ));
    }
    if let Some(f) = body.get("response_format").filter(|v| !v.is_null())
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(OpenAiError::invalid(
            "response_format",
            "only {\"type\": \"text\"} is supported",
        ));
    }
    if body.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        return Err(OpenAiError::invalid(
            "parallel_tool_calls",
            "false is not supported: a model may call several tools at once",
        ));
    }
    // A Chat Completions request carries its whole conversation: its tool results must
    // answer calls it holds (else the upstream would refuse the history).
    let calls: BTreeSet<&str> = conversation
        .prior
        .iter()
        .flat_map(|t| match t {
            PriorTurn::Assistant { tool_calls, .. } => {
                tool_calls.iter().map(|c| c.id.as_str()).collect()
            }
            _ => Vec::new(),
        })
        .collect();
    if let Some(r) = conversation
        .tool_results
        .iter()
        .find(|r| !calls.contains(r.call_id.as_str()))
    {
        return Err(OpenAiError::invalid(
            "messages",
            format!(
                "the tool message for {:?} answers no tool call of an earlier assistant message",
                r.call_id
            ),
        ));
    }
    let mut client_tools = input::function_tools(body.get("tools"), true)?;
    match body.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "auto" => {}
        Some(Value::String(s)) if s == "none" => client_tools.clear(),
        Some(_) => {
            return Err(OpenAiError::invalid(
                "tool_choice",
                "only \"auto\" and \"none\" are supported",
            ));
        }
    }
    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        client_tools,
        conversation,
    })
}

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/chat/completions", tag = "openai",
    params(crate::openapi::IdempotencyKey),
    request_body = crate::openapi::ChatCompletionRequest,
    responses(
        (status = 200, description = "The `chat.completion` object once the job ended; \
            with `stream: true` its chunks as server-sent events (`text/event-stream`): \
            `data: {chat.completion.chunk}` blocks, then `data: [DONE]`",
            content((crate::openapi::ChatCompletion = "application/json"),
                (crate::openapi::SseEvent = "text/event-stream")),
            headers(("x-genstream-stream-id" = String), ("x-genstream-conversation-id" = String))),
        crate::openapi::OpenAiErrors))]
pub(super) async fn create(
    State(state): State<AppState>,
    OpenAiUser(user): OpenAiUser,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    OpenAiBody(body): OpenAiBody,
) -> Result<Response, OpenAiError> {
    let req = parse(&body)?;
    let idempotency = crate::idempotency::from_headers(&headers, "/v1/chat/completions", &body)?;
    let webhook_url = state
        .webhooks
        .requested("webhook_url", super::webhook_url_of(&body)?)?;
    let client_ip =
        crate::client_ip::client_ip(peer.map(|c| c.0.0.ip()), &headers, &state.trusted_proxies);
    let started = state
        .manager
        .start(StartRequest {
            user_id: user.clone(),
            text: req.conversation.text,
            model: Some(req.model),
            system_prompt: req.conversation.system_prompt,
            client_ip: client_ip.map(|ip| ip.to_string()),
            client_tools: req.client_tools,
            prior: req.conversation.prior,
            tool_results: req.conversation.tool_results,
            webhook_url,
            idempotency,
            ..Default::default()
        })
        .await?;
    // A repeat after the log expired gets the saved answer, replayed.
    let (meta, log) = state.manager.started_job(&user, &started).await?;
    let headers = job_headers(&meta);
    let projection = shared::chat(&meta.stream_id, &log, req.include_usage);
    if req.stream {
        return Ok(projected_stream(&state, log, projection, None, &headers));
    }
    wait_for_end(&log).await;
    completion_response(&log, &projection, &headers)
}

/// The `chat.completion` object of a log projected so far; a failed job is an error
/// (502 for an upstream failure) in OpenAI's shape.
fn completion_response(
    log: &genstream_engine::log::EventLog,
    projection: &shared::Shared<ChatProjector>,
    headers: &[(&'static str, String)],
) -> Result<Response, OpenAiError> {
    let mut p = shared::lock(projection);
    shared::advance(log, &mut p)?;
    let fold = p.projector().fold();
    if let Some(end) = fold.end()
        && let Outcome::Failed { code, message } = &end.outcome
        && code != "log_full"
    {
        return Err(ApiError::JobFailed {
            code: code.clone(),
            message: message.clone(),
        }
        .into());
    }
    let value = completion(fold)
        .and_then(|c| serde_json::to_value(c).ok())
        .ok_or_else(|| {
            genstream_engine::EngineError::Internal("the job's log has no `created`".into())
        })?;
    Ok(json_with(value, headers))
}

/// `GET /v1/chat/completions/{id}`: the completion (OpenAI's stored-completion shape,
/// the `chat.completion` object) as the job's log holds it — while the job runs,
/// what there is so far with `finish_reason: null`. 404 once the log expired
/// (`jobs.retention`, 1 h by default); the answer itself stays in the conversation.
#[utoipa::path(get, path = "/chat/completions/{id}", tag = "openai",
    params(("id" = String, Path, description = "`chatcmpl-…`")),
    responses((status = 200, description = "The completion as the log holds it (`finish_reason: null` while the job runs)", body = crate::openapi::ChatCompletion), crate::openapi::OpenAiErrors))]
pub(super) async fn retrieve(
    State(state): State<AppState>,
    OpenAiUser(user): OpenAiUser,
    Path(id): Path<String>,
) -> Result<Response, OpenAiError> {
    let (meta, log) = job_of(&state, &user, &id, "chatcmpl-").await?;
    let projection = shared::chat(&meta.stream_id, &log, false);
    completion_response(&log, &projection, &job_headers(&meta))
}
