//! `POST /v1/responses` and `GET`/`DELETE /v1/responses/{id}`, `POST
//! /v1/responses/{id}/cancel`, `GET /v1/responses/{id}/input_items`.
//!
//! A response is a job. Its id is `resp_<stream id without hyphens>`, so any replica
//! finds the job from the id alone; the request's echoed parameters travel in the
//! job's `created` event (`protocolOptions.responses`), so the `response` object and
//! every stream event are a function of the log wherever they are made, and a stream
//! resumed with `starting_after=N` is exactly the events after sequence number N.
//! `previous_response_id` continues that response's conversation: the new input's
//! parent is the previous response's saved answer.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use genstream_engine::EngineError;
use genstream_engine::event::{ContentPart, Message};
use genstream_engine::log::EventLog;
use genstream_engine::manager::StartRequest;
use genstream_protocols::responses::{ResponseParams, ResponsesOptions, response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    OpenAiBody, OpenAiUser, created_of, input, job_headers, job_of, json_with, projected_stream,
    shared, wait_for_end,
};
use crate::AppState;
use crate::error::OpenAiError;

/// What the `response` object echoes, as kept in `created.protocolOptions.responses`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Echo {
    #[serde(default)]
    background: bool,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl Echo {
    fn options(self, client_tools: BTreeSet<String>) -> ResponsesOptions {
        ResponsesOptions {
            client_tools,
            background: self.background,
            params: ResponseParams {
                instructions: self.instructions,
                max_output_tokens: self.max_output_tokens,
                parallel_tool_calls: true,
                previous_response_id: self.previous_response_id,
                temperature: self.temperature,
                tool_choice: self.tool_choice.unwrap_or_else(|| json!("auto")),
                tools: self.tools,
                top_p: self.top_p,
                metadata: self.metadata,
            },
        }
    }
}

/// The projection options of a job's log (its `created` event).
pub(super) fn options_of(log: &EventLog) -> ResponsesOptions {
    let created = created_of(log);
    let client_tools = created
        .as_ref()
        .map(|c| c.client_tools.iter().cloned().collect())
        .unwrap_or_default();
    let echo = created
        .and_then(|c| c.protocol_options)
        .and_then(|o| o.get("responses").cloned())
        .and_then(|r| serde_json::from_value::<Echo>(r).ok())
        .unwrap_or_default();
    echo.options(client_tools)
}

/// The `response` object of job `stream_id`'s `log` as far as it goes.
fn response_value(stream_id: &str, log: &EventLog) -> Result<Value, OpenAiError> {
    let projection = shared::responses(stream_id, log);
    let mut p = shared::lock(&projection);
    shared::advance(log, &mut p)?;
    let projector = p.projector();
    response(projector.fold(), projector.options())
        .and_then(|r| serde_json::to_value(r).ok())
        .ok_or_else(|| EngineError::Internal("the job's log has no `created`".into()).into())
}

/// A request's parameters genstream acts on.
struct Create {
    model: String,
    stream: bool,
    background: bool,
    previous_response_id: Option<String>,
    client_tools: Vec<genstream_engine::provider::ToolSpec>,
    conversation: input::Conversation,
    echo: Echo,
}

/// Reads a Responses body: `model`, `input` (a string or items), `instructions`,
/// `stream`, `background`, `store` (true; `false` is a 400: a genstream response is
/// always saved), `previous_response_id`, `tools` (function tools, the client's),
/// `tool_choice` (`auto` or `none`), `metadata`; `temperature`, `top_p` and
/// `max_output_tokens` are echoed but not applied (the model's configuration decides).
/// 400s name what genstream cannot honour: other tool types, `tool_choice` `required`
/// or named, `parallel_tool_calls: false`, a `text.format` other than text,
/// `conversation`, `prompt`.
fn parse(body: &Map<String, Value>) -> Result<Create, OpenAiError> {
    let string = |name: &str| -> Result<Option<String>, OpenAiError> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(OpenAiError::invalid(name, "must be a string")),
        }
    };
    let flag = |name: &str, default: bool| -> Result<bool, OpenAiError> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(OpenAiError::invalid(name, "must be a boolean")),
        }
    };
    let number = |name: &str| body.get(name).and_then(Value::as_f64);
    let model = string("model")?.ok_or_else(|| OpenAiError::invalid("model", "is required"))?;
    let instructions = string("instructions")?;
    let input = body
        .get("input")
        .ok_or_else(|| OpenAiError::invalid("input", "is required"))?;
    let conversation = input::response_input(input, instructions.as_deref())?;
    if !flag("store", true)? {
        return Err(OpenAiError::invalid(
            "store",
            "false is not supported: genstream saves every response",
        ));
    }
    if !flag("parallel_tool_calls", true)? {
        return Err(OpenAiError::invalid(
            "parallel_tool_calls",
            "false is not supported: a model may call several tools at once",
        ));
    }
    for unsupported in ["conversation", "prompt"] {
        if body.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(OpenAiError::invalid(unsupported, "is not supported"));
        }
    }
    if let Some(f) = body.get("text").and_then(|t| t.get("format"))
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(OpenAiError::invalid(
            "text.format",
            "only {\"type\": \"text\"} is supported",
        ));
    }
    let mut client_tools = input::function_tools(body.get("tools"), false)?;
    let tool_choice = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "auto" => Some(json!("auto")),
        Some(Value::String(s)) if s == "none" => {
            client_tools.clear();
            Some(json!("none"))
        }
        Some(_) => {
            return Err(OpenAiError::invalid(
                "tool_choice",
                "only \"auto\" and \"none\" are supported",
            ));
        }
    };
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(m) => serde_json::from_value(m.clone())
            .map_err(|_| OpenAiError::invalid("metadata", "must be an object of string values"))?,
    };
    let background = flag("background", false)?;
    let previous_response_id = string("previous_response_id")?;
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(Create {
        model,
        stream: flag("stream", false)?,
        background,
        previous_response_id: previous_response_id.clone(),
        client_tools,
        conversation,
        echo: Echo {
            background,
            instructions,
            max_output_tokens: body.get("max_output_tokens").and_then(Value::as_u64),
            previous_response_id,
            temperature: number("temperature"),
            top_p: number("top_p"),
            tool_choice,
            tools,
            metadata,
        },
    })
}

/// `POST /v1/responses`: starts the job; answers its event stream (`stream: true`),
/// the `response` object at once (`background: true`: `in_progress`), or the object
/// once the job ended.
#[utoipa::path(post, path = "/responses", tag = "openai",
    params(crate::openapi::IdempotencyKey),
    request_body = crate::openapi::ResponseRequest,
    responses(
        (status = 200, description = "The `response` object (once the job ended, or at \
            once with `background: true`); with `stream: true` its events as server-sent \
            events (`text/event-stream`)",
            content((crate::openapi::ResponseObject = "application/json"),
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
    let (conversation_id, parent_message_id) = match &req.previous_response_id {
        None => (None, None),
        Some(prev) => match job_of(&state, &user, prev, "resp_").await {
            Ok((meta, _)) => (Some(meta.conversation_id), Some(meta.response_message_id)),
            Err(e) if e.error.status_and_code().0 == axum::http::StatusCode::NOT_FOUND => {
                return Err(OpenAiError::invalid(
                    "previous_response_id",
                    format!("no response {prev:?} (or it has expired)"),
                ));
            }
            Err(e) => return Err(e),
        },
    };
    let idempotency = crate::idempotency::from_headers(&headers, "/v1/responses", &body)?;
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
            conversation_id,
            parent_message_id,
            model: Some(req.model),
            system_prompt: req.conversation.system_prompt,
            client_ip: client_ip.map(|ip| ip.to_string()),
            client_tools: req.client_tools,
            prior: req.conversation.prior,
            tool_results: req.conversation.tool_results,
            webhook_url,
            idempotency,
            protocol_options: Some(json!({ "responses": req.echo })),
            ..Default::default()
        })
        .await?;
    // A repeat after the log expired gets the saved answer, replayed.
    let (meta, log) = state.manager.started_job(&user, &started).await?;
    let headers = job_headers(&meta);
    if req.stream {
        let projection = shared::responses(&meta.stream_id, &log);
        return Ok(projected_stream(&state, log, projection, None, &headers));
    }
    if !req.background {
        wait_for_end(&log).await;
    }
    Ok(json_with(response_value(&meta.stream_id, &log)?, &headers))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RetrieveQuery {
    /// `true`: the event stream instead of the object.
    #[serde(default)]
    stream: Option<String>,
    /// With `stream=true`: resume after this sequence number.
    #[serde(default)]
    starting_after: Option<String>,
}

/// `GET /v1/responses/{id}`: the `response` object (poll its `status`); with
/// `?stream=true` the event stream, from the start or after `starting_after=N` (a
/// sequence number the stream has produced; beyond it is a 400).
#[utoipa::path(get, path = "/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "`resp_…`"), RetrieveQuery),
    responses(
        (status = 200, description = "The `response` object; with `stream=true` its \
            events as server-sent events (`text/event-stream`)",
            content((crate::openapi::ResponseObject = "application/json"),
                (crate::openapi::SseEvent = "text/event-stream"))),
        crate::openapi::OpenAiErrors))]
pub(super) async fn retrieve(
    State(state): State<AppState>,
    OpenAiUser(user): OpenAiUser,
    Path(id): Path<String>,
    query: Result<Query<RetrieveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OpenAiError> {
    let Query(query) = query.map_err(|e| OpenAiError::invalid("query", e.body_text()))?;
    let (meta, log) = live_response(&state, &user, &id).await?;
    let headers = job_headers(&meta);
    let stream = matches!(query.stream.as_deref(), Some("true" | "1"));
    if !stream {
        return Ok(json_with(response_value(&meta.stream_id, &log)?, &headers));
    }
    let after = match query.starting_after.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.trim().parse::<u64>().map_err(|_| {
            OpenAiError::invalid("starting_after", "must be a non-negative integer")
        })?),
    };
    let projection = shared::responses(&meta.stream_id, &log);
    if let Some(n) = after {
        let produced = || -> Result<u64, OpenAiError> {
            let mut p = shared::lock(&projection);
            shared::advance(&log, &mut p)?;
            Ok(p.frames().len() as u64)
        };
        let mut len = produced()?;
        if n >= len {
            // This replica's mirror may lag the one the client read from.
            state
                .manager
                .store()
                .sync_log(&meta.stream_id)
                .await
                .map_err(EngineError::from)?;
            len = produced()?;
        }
        if n >= len {
            return Err(OpenAiError::invalid(
                "starting_after",
                format!("sequence number {n} is beyond the stream's last event ({len} so far)"),
            ));
        }
    }
    Ok(projected_stream(&state, log, projection, after, &headers))
}

/// The job of a response that was not deleted.
async fn live_response(
    state: &AppState,
    user: &str,
    id: &str,
) -> Result<(genstream_engine::store::JobMeta, std::sync::Arc<EventLog>), OpenAiError> {
    let (meta, log) = job_of(state, user, id, "resp_").await?;
    if state
        .manager
        .db()
        .get_conversation(&meta.conversation_id)
        .await?
        .is_none()
    {
        return Err(EngineError::NotFound(id.to_string()).into());
    }
    Ok((meta, log))
}

/// `POST /v1/responses/{id}/cancel`: stops the job (genstream's abort: the partial
/// output is saved before this answers) and answers the `response` object, status
/// `cancelled`. Idempotent; a response that already ended is answered as it is.
#[utoipa::path(post, path = "/responses/{id}/cancel", tag = "openai",
    params(("id" = String, Path, description = "`resp_…`")),
    responses((status = 200, description = "The response, `cancelled` unless it had ended", body = crate::openapi::ResponseObject), crate::openapi::OpenAiErrors))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    OpenAiUser(user): OpenAiUser,
    Path(id): Path<String>,
) -> Result<Response, OpenAiError> {
    let (meta, log) = live_response(&state, &user, &id).await?;
    match state.manager.abort(&user, &meta.stream_id).await {
        Ok(_) | Err(EngineError::JobFinished(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(json_with(
        response_value(&meta.stream_id, &log)?,
        &job_headers(&meta),
    ))
}

/// `DELETE /v1/responses/{id}`: `{id, object: "response", deleted: true}`. A running
/// response is cancelled first. What is deleted is the response's conversation (the
/// saved messages of every response chained with it by `previous_response_id`);
/// afterwards the id is 404.
#[utoipa::path(delete, path = "/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "`resp_…`")),
    responses((status = 200, description = "The response is deleted", body = crate::openapi::DeletedResponse),
        crate::openapi::OpenAiErrors))]
pub(super) async fn delete(
    State(state): State<AppState>,
    OpenAiUser(user): OpenAiUser,
    Path(id): Path<String>,
) -> Result<Response, OpenAiError> {
    let (meta, log) = live_response(&state, &user, &id).await?;
    if log.terminal().is_none() {
        match state.manager.abort(&user, &meta.stream_id).await {
            Ok(_) | Err(EngineError::JobFinished(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    state
        .manager
        .db()
        .delete_conversation(&meta.conversation_id)
        .await?;
    Ok(json_with(
        json!({"id": id, "object": "response", "deleted": true}),
        &job_headers(&meta),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ItemsQuery {
    /// `asc` for oldest first; newest first otherwise.
    #[serde(default)]
    order: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: `{object: "list", data, first_id, last_id,
/// has_more: false}`, the items the request gave as input (instructions are not
/// items), newest first (`?order=asc` for oldest first): the messages the job saved
/// for its request — its new input and the turns the request carried, which all have
/// the job's creation time.
#[utoipa::path(get, path = "/responses/{id}/input_items", tag = "openai",
    params(("id" = String, Path, description = "`resp_…`"), ItemsQuery),
    responses((status = 200, description = "The input items", body = crate::openapi::InputItemList),
        crate::openapi::OpenAiErrors))]
pub(super) async fn input_items(
    State(state): State<AppState>,
    OpenAiUser(user): OpenAiUser,
    Path(id): Path<String>,
    Query(query): Query<ItemsQuery>,
) -> Result<Response, OpenAiError> {
    let (meta, _log) = live_response(&state, &user, &id).await?;
    let all = state
        .manager
        .db()
        .list_messages(&meta.conversation_id)
        .await?;
    let by_id: BTreeMap<&str, &Message> = all.iter().map(|m| (m.message_id.as_str(), m)).collect();
    let mut chain = Vec::new();
    let mut cur = by_id.get(meta.user_message_id.as_str()).copied();
    let created_at = cur.map(|m| m.created_at.clone()).unwrap_or_default();
    while let Some(m) = cur {
        if m.created_at != created_at || chain.len() > all.len() {
            break;
        }
        chain.push(m);
        cur = m
            .parent_message_id
            .as_deref()
            .and_then(|p| by_id.get(p).copied());
    }
    chain.reverse();
    let mut items: Vec<Value> = chain.iter().flat_map(|m| items_of(m)).collect();
    if query.order.as_deref() != Some("asc") {
        items.reverse();
    }
    let first = items
        .first()
        .and_then(|i| i["id"].as_str())
        .map(str::to_owned);
    let last = items
        .last()
        .and_then(|i| i["id"].as_str())
        .map(str::to_owned);
    Ok(json_with(
        json!({"object": "list", "data": items, "first_id": first, "last_id": last,
            "has_more": false}),
        &job_headers(&meta),
    ))
}

/// A saved message as Responses input items.
fn items_of(m: &Message) -> Vec<Value> {
    let compact: String = m
        .message_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let mut out = Vec::new();
    if m.is_created_by_user {
        if !m.text.is_empty() || m.content.is_empty() {
            out.push(
                json!({"id": format!("msg_{compact}"), "type": "message", "role": "user",
                "status": "completed", "content": [{"type": "input_text", "text": m.text}]}),
            );
        }
        for (j, part) in m.content.iter().enumerate() {
            if let ContentPart::ToolCall { tool_call } = part {
                out.push(json!({"id": format!("fco_{compact}_{j}"),
                    "type": "function_call_output", "call_id": tool_call.id,
                    "output": tool_call.output.clone().unwrap_or_default(),
                    "status": "completed"}));
            }
        }
        return out;
    }
    if !m.text.is_empty() {
        out.push(
            json!({"id": format!("msg_{compact}"), "type": "message", "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": m.text, "annotations": []}]}),
        );
    }
    for (j, part) in m.content.iter().enumerate() {
        if let ContentPart::ToolCall { tool_call } = part {
            out.push(
                json!({"id": format!("fc_{compact}_{j}"), "type": "function_call",
                "call_id": tool_call.id, "name": tool_call.name,
                "arguments": tool_call.args, "status": "completed"}),
            );
        }
    }
    out
}
