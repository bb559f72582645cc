//! What one request gets: the two endpoints' handler, which records the request,
//! checks its history, reads its model string, and then streams the base scenario or
//! the failure a wrapper scripts for this request.
//!
//! The failure wrappers that cut a stream short all start from the same prefix of the
//! base scenario's frames (the first half of those before the stream's end), so a test
//! knows the client has seen content before the failure.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use crate::Dialect;
use crate::body::{Tail, stream_response};
use crate::chat_completions::{chunk, data_frame, echo_frames, error_response};
use crate::fixtures::{fixture_frames, fixture_paths};
use crate::history::{validate_chat_history, validate_messages_history};
use crate::messages::{
    anthropic_echo_frames, anthropic_error, anthropic_text_start, event_frame, text_delta,
};
use crate::model::{Fault, Plan, Scenario, parse_model};
use crate::recorder::{Recorder, Rejection, record};
use crate::status::{dialect_error, status_answer};
use crate::tools::tools_frames;

pub(crate) async fn chat_completions(
    State(recorder): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(Dialect::ChatCompletions, &recorder, &uri, &headers, &body)
}

/// `POST /v1/messages`: the Anthropic Messages API.
pub(crate) async fn messages(
    State(recorder): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(Dialect::Messages, &recorder, &uri, &headers, &body)
}

/// Both endpoints: record, check the history, pick the answer.
pub(crate) fn handle(
    dialect: Dialect,
    recorder: &Recorder,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let (index, body) = record(recorder, uri, headers, body);
    let Some(body) = body else {
        return dialect_error(
            dialect,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "mock upstream: the request body is not JSON",
        );
    };
    if dialect == Dialect::Messages && !headers.contains_key("anthropic-version") {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let checked = match dialect {
        Dialect::ChatCompletions => validate_chat_history(&body),
        Dialect::Messages => validate_messages_history(&body),
    };
    if let Err(message) = checked {
        recorder.reject(Rejection {
            request: index,
            model: model.to_owned(),
            message: message.clone(),
        });
        return dialect_error(
            dialect,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &message,
        );
    }
    let plan = match parse_model(model) {
        Ok(plan) => plan,
        Err(why) => return unknown_model(dialect, model, &why),
    };
    let fault = plan.fault_for(recorder.next_index(model));
    let base = || base_answer(dialect, model, &plan, &body);
    let stream = |frames, tail| stream_response(frames, plan.delay, plan.quiet, dialect, tail);
    match fault {
        None | Some(Fault::Pass) => match base() {
            Ok((frames, tail)) => stream(frames, tail),
            Err(response) => *response,
        },
        Some(Fault::Status(code, retry_after)) => status_answer(dialect, code, Some(retry_after)),
        Some(Fault::NoByte) => stream(Vec::new(), Tail::Hang),
        Some(Fault::NoTerminator) => match base() {
            Ok((mut frames, tail)) => {
                frames.retain(|f| !is_terminator(f));
                stream(frames, tail)
            }
            Err(response) => *response,
        },
        Some(fault) => {
            let Ok((frames, _)) = base() else {
                return dialect_error(
                    dialect,
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!(
                        "mock upstream: model `{model}`: a mid-stream failure needs a streaming \
                         scenario after it"
                    ),
                );
            };
            let mut frames = prefix(frames, dialect);
            let tail = match fault {
                Fault::DropMid => Tail::Abort,
                Fault::StallMid => Tail::Hang,
                Fault::MalformedMid => {
                    frames.push(match dialect {
                        Dialect::ChatCompletions => "data: {not json\n\n".to_owned(),
                        Dialect::Messages => {
                            "event: content_block_delta\ndata: {not json\n\n".to_owned()
                        }
                    });
                    Tail::End
                }
                Fault::OverloadedMid => {
                    frames.push(overloaded_frame(dialect));
                    Tail::End
                }
                _ => Tail::End, // CloseMid
            };
            stream(frames, tail)
        }
    }
}

/// The 404 for a model the mock does not know.
fn unknown_model(dialect: Dialect, model: &str, why: &str) -> Response {
    match dialect {
        Dialect::ChatCompletions => error_response(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!(
                "The model `{model}` does not exist (mock upstream: {why}; use \
                 fixture:<path>, status:<code>, malformed, truncated, echo, stall, tools, \
                 tools-forever, optionally wrapped in flaky/dropmid/closemid/stall/nobyte/\
                 malformedmid/overloaded/noend/pass)"
            ),
        ),
        Dialect::Messages => anthropic_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!(
                "model: {model} (mock upstream: {why}; use fixture:<path>, status:<code>, \
                 malformed, truncated, overloaded, echo, stall, tools or tools-forever, \
                 optionally wrapped in flaky/dropmid/closemid/stall/nobyte/malformedmid/\
                 overloaded/noend/pass)"
            ),
        ),
    }
}

/// The base scenario's stream (frames and how the body ends), or its non-stream
/// answer.
fn base_answer(
    dialect: Dialect,
    model: &str,
    plan: &Plan,
    body: &Value,
) -> Result<(Vec<String>, Tail), Box<Response>> {
    let frames = match (&plan.scenario, dialect) {
        (Scenario::Status(code), _) => return Err(Box::new(status_answer(dialect, *code, None))),
        (Scenario::Fixture(path), _) => match fixture_frames(path, dialect) {
            Some(frames) => frames,
            None => {
                let why = format!(
                    "no fixture `{path}`; have: {}",
                    fixture_paths().collect::<Vec<_>>().join(", ")
                );
                return Err(Box::new(match dialect {
                    Dialect::ChatCompletions => error_response(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        &format!("The model `{model}` does not exist (mock upstream: {why})"),
                    ),
                    Dialect::Messages => anthropic_error(
                        StatusCode::NOT_FOUND,
                        "not_found_error",
                        &format!("model: {model} (mock upstream: {why})"),
                    ),
                }));
            }
        },
        (Scenario::Malformed, Dialect::ChatCompletions) => vec![
            data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": "Hello"}),
                None,
            )),
            "data: {not json\n\n".to_owned(),
        ],
        (Scenario::Malformed, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            frames.push(event_frame(&text_delta(0, "Hello")));
            frames.push("event: content_block_delta\ndata: {not json\n\n".to_owned());
            frames
        }
        (Scenario::Truncated, Dialect::ChatCompletions) => {
            let mut frames = vec![data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            ))];
            for word in ["This ", "stream ", "stops ", "here"] {
                frames.push(data_frame(&chunk(model, json!({"content": word}), None)));
            }
            frames
        }
        (Scenario::Truncated, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            for word in ["This ", "stream ", "stops ", "here"] {
                frames.push(event_frame(&text_delta(0, word)));
            }
            frames
        }
        (Scenario::Overloaded, Dialect::ChatCompletions) => {
            return Err(Box::new(error_response(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!(
                    "The model `{model}` does not exist (mock upstream: `overloaded` is a \
                     /v1/messages scenario; `overloaded:<N>:<scenario>` works on both)"
                ),
            )));
        }
        (Scenario::Overloaded, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            frames.push("event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned());
            for word in ["Partial ", "answer ", "then"] {
                frames.push(event_frame(&text_delta(0, word)));
            }
            frames.push(overloaded_frame(Dialect::Messages));
            frames
        }
        (Scenario::Stall, Dialect::ChatCompletions) => {
            let frames = vec![data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": "Stalling"}),
                None,
            ))];
            return Ok((frames, Tail::Hang));
        }
        (Scenario::Stall, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            frames.push(event_frame(&text_delta(0, "Stalling")));
            return Ok((frames, Tail::Hang));
        }
        (Scenario::Echo, Dialect::ChatCompletions) => echo_frames(model, body),
        (Scenario::Echo, Dialect::Messages) => anthropic_echo_frames(model, body),
        (Scenario::Tools { forever }, _) => tools_frames(
            dialect,
            model,
            body,
            *forever,
            plan.calls,
            plan.undeclared.as_deref(),
        ),
    };
    Ok((frames, Tail::End))
}

/// The frames a mid-stream failure sends first: the first half (at least 3, if there
/// are that many) of the frames before the stream's end.
fn prefix(frames: Vec<String>, dialect: Dialect) -> Vec<String> {
    let body: Vec<String> = frames
        .into_iter()
        .take_while(|f| !is_end_frame(f, dialect))
        .collect();
    let keep = body.len().div_ceil(2).max(body.len().min(3));
    body.into_iter().take(keep).collect()
}

/// Whether a frame belongs to the end of a stream: `[DONE]`, a `finish_reason`, a
/// usage-only chunk, `message_delta` or `message_stop`.
fn is_end_frame(frame: &str, dialect: Dialect) -> bool {
    let data: String = frame
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    if data == "[DONE]" {
        return true;
    }
    let Ok(value) = serde_json::from_str::<Value>(&data) else {
        return false;
    };
    match dialect {
        Dialect::ChatCompletions => {
            let choices = value
                .get("choices")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let finished = choices.iter().any(|c| {
                c.get("finish_reason")
                    .and_then(Value::as_str)
                    .is_some_and(|r| !r.is_empty())
            });
            let usage_only = choices.is_empty() && value.get("usage").is_some_and(|u| !u.is_null());
            finished || usage_only
        }
        Dialect::Messages => matches!(
            value.get("type").and_then(Value::as_str),
            Some("message_delta" | "message_stop")
        ),
    }
}

/// Whether a frame is a stream's terminator: `data: [DONE]` or `message_stop`.
pub(crate) fn is_terminator(frame: &str) -> bool {
    frame.lines().any(|l| {
        let l = l.trim();
        l == "data: [DONE]" || l == "event: message_stop" || l.contains("\"type\":\"message_stop\"")
    })
}

/// The upstream's mid-stream overload error in `dialect`.
fn overloaded_frame(dialect: Dialect) -> String {
    match dialect {
        // OpenRouter reports failures inside a 200 stream as a chunk with `error`.
        Dialect::ChatCompletions => data_frame(&json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 0,
            "error": {"message": "Overloaded", "type": "overloaded_error", "code": 529},
            "choices": [],
        })),
        // The payload shape quoted in error logs, with Anthropic's padding.
        Dialect::Messages => "event: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\
             \"type\":\"overloaded_error\",\"message\":\"Overloaded\"},\
             \"request_id\":\"req_mock_overloaded\"}        \n\n"
            .to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_stop_before_the_end_of_the_stream() {
        let body = json!({"messages": [{"role": "user", "content": "a b c d e f g h"}]});
        let frames = prefix(echo_frames("m", &body), Dialect::ChatCompletions);
        // role + 8 words before the end: the first 5.
        assert_eq!(frames.len(), 5);
        assert!(
            frames
                .iter()
                .all(|f| !is_end_frame(f, Dialect::ChatCompletions))
        );
        let frames = prefix(anthropic_echo_frames("m", &body), Dialect::Messages);
        // message_start, block start, ping, 8 words, block stop: the first 6.
        assert_eq!(frames.len(), 6);
        assert!(frames[5].contains("\"text\":\" c\""), "{frames:?}");
        for path in fixture_paths() {
            let dialect = if path.starts_with("anthropic/") {
                Dialect::Messages
            } else {
                Dialect::ChatCompletions
            };
            let all = fixture_frames(path, dialect).unwrap();
            let cut = prefix(all.clone(), dialect);
            assert!(!cut.is_empty() && cut.len() < all.len(), "{path}");
            assert!(!cut.concat().contains("[DONE]"), "{path}");
            assert!(!cut.concat().contains("message_stop"), "{path}");
        }
    }
}
