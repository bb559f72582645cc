//! The Chat Completions dialect (OpenAI API reference, "Create chat completion",
//! streaming): `chat.completion.chunk` payloads as `data:` frames ending in
//! `data: [DONE]`, the usage chunk with empty `choices`, interleaved tool-call
//! fragments, and OpenAI's error body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::pieces::word_pieces;
use crate::request::{content_text, messages_of};
use crate::tools::{PlannedCall, TurnUsage};

/// An OpenAI-style JSON error: `{"error":{"message","type","param":null,"code":null}}`.
pub(crate) fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

/// One `chat.completion.chunk` with a single choice.
pub(crate) fn chunk(model: &str, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
    })
}

pub(crate) fn data_frame(payload: &Value) -> String {
    format!("data: {payload}\n\n")
}

/// The `echo` answer: the last user message, word by word, then usage and `[DONE]`.
pub(crate) fn echo_frames(model: &str, body: &Value) -> Vec<String> {
    let messages = messages_of(body);
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    chat_text_frames(model, body, &last_user)
}

/// A Chat Completions text answer: `text` word by word, `finish_reason: stop`, a usage
/// chunk and `[DONE]`.
pub(crate) fn chat_text_frames(model: &str, body: &Value, text: &str) -> Vec<String> {
    let prompt_chars: usize = messages_of(body)
        .iter()
        .map(|m| content_text(m.get("content")).chars().count())
        .sum();
    let mut frames = vec![data_frame(&chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    let pieces = word_pieces(text);
    for piece in &pieces {
        frames.push(data_frame(&chunk(model, json!({"content": piece}), None)));
    }
    frames.push(data_frame(&chunk(model, json!({}), Some("stop"))));
    frames.push(chat_usage_frame(
        model,
        prompt_chars.div_ceil(4),
        pieces.len(),
    ));
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

fn chat_usage_frame(model: &str, prompt_tokens: usize, completion_tokens: usize) -> String {
    data_frame(&json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}

/// A tool-calling turn on the wire: the role chunk, the calls' fragments interleaved
/// round by round (so accumulation must go by `index`), `finish_reason: "tool_calls"`,
/// the usage chunk and `[DONE]`.
pub(crate) fn tool_call_frames(
    model: &str,
    calls: &[PlannedCall],
    usage: TurnUsage,
) -> Vec<String> {
    let mut frames = vec![data_frame(&chunk(
        model,
        json!({"role": "assistant", "content": null}),
        None,
    ))];
    let rounds = calls.iter().map(|c| c.fragments.len()).max().unwrap_or(0);
    for r in 0..rounds {
        for (j, call) in calls.iter().enumerate() {
            let Some(piece) = call.fragments.get(r) else {
                continue;
            };
            let delta = if r == 0 {
                json!({"index": j, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": piece}})
            } else {
                json!({"index": j, "function": {"arguments": piece}})
            };
            frames.push(data_frame(&chunk(
                model,
                json!({"tool_calls": [delta]}),
                None,
            )));
        }
    }
    frames.push(data_frame(&chunk(model, json!({}), Some("tool_calls"))));
    frames.push(chat_usage_frame(
        model,
        usage.prompt_tokens,
        usage.output_tokens,
    ));
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn echo_streams_the_last_user_message() {
        let body = json!({"model": "echo", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ]});
        let frames = echo_frames("echo", &body);
        let text: String = frames
            .iter()
            .filter_map(|f| f.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .filter_map(|v| {
                v.pointer("/choices/0/delta/content")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "hello there world");
        assert_eq!(frames.last().map(String::as_str), Some("data: [DONE]\n\n"));
        assert!(frames.iter().any(|f| f.contains("\"completion_tokens\":3")));
    }
}
