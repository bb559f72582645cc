//! The Messages dialect (Anthropic API docs, "Messages" and "Streaming Messages"):
//! events named after their payload's `type`, `message_start` … `message_stop`, text
//! and `tool_use` blocks, signed thinking and redacted thinking blocks, and
//! Anthropic's error body.
//!
//! A thinking block's signature is a hash of its text ([`signature_of`]), so the
//! history check can refuse a thinking block sent back changed, as Anthropic does.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::pieces::word_pieces;
use crate::request::{blocks_text, messages_of};
use crate::tools::{PlannedCall, TurnUsage};

/// An Anthropic-style JSON error: `{"type":"error","error":{"type","message"},"request_id"}`.
pub(crate) fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_mock",
    });
    (status, axum::Json(body)).into_response()
}

/// An SSE frame named after the payload's `type`, as Anthropic sends them.
pub(crate) fn event_frame(payload: &Value) -> String {
    let kind = payload
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    format!("event: {kind}\ndata: {payload}\n\n")
}

/// `message_start` and the start of text block 0.
pub(crate) fn anthropic_text_start(model: &str) -> Vec<String> {
    vec![
        event_frame(&message_start(model, 10)),
        event_frame(&json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}})),
    ]
}

/// `message_start` with `input_tokens` and no cache use.
pub(crate) fn message_start(model: &str, input_tokens: usize) -> Value {
    json!({
        "type": "message_start",
        "message": {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    })
}

/// `message_delta` with `stop_reason` and cumulative usage.
pub(crate) fn message_delta(stop_reason: &str, input_tokens: usize, output_tokens: usize) -> Value {
    json!({
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        },
    })
}

pub(crate) fn text_delta(index: u32, text: &str) -> Value {
    json!({"type": "content_block_delta", "index": index,
        "delta": {"type": "text_delta", "text": text}})
}

/// The `echo` answer of `/v1/messages`: the last user message's text, word by word, in
/// one text block, then `message_delta` (`end_turn`, cumulative usage) and
/// `message_stop`.
pub(crate) fn anthropic_echo_frames(model: &str, body: &Value) -> Vec<String> {
    let last_user = messages_of(body)
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| blocks_text(m.get("content")))
        .unwrap_or_default();
    anthropic_text_frames(model, body, &last_user)
}

/// A Messages text answer: `text` word by word in one text block, then `message_delta`
/// (`end_turn`, cumulative usage) and `message_stop`.
pub(crate) fn anthropic_text_frames(model: &str, body: &Value, text: &str) -> Vec<String> {
    let system_chars = body
        .get("system")
        .and_then(Value::as_str)
        .map_or(0, |s| s.chars().count());
    let prompt_chars: usize = system_chars
        + messages_of(body)
            .iter()
            .map(|m| blocks_text(m.get("content")).chars().count())
            .sum::<usize>();
    let input_tokens = prompt_chars.div_ceil(4);

    let mut frames = vec![
        event_frame(&message_start(model, input_tokens)),
        event_frame(&json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}})),
        "event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned(),
    ];
    let pieces = word_pieces(text);
    for piece in &pieces {
        frames.push(event_frame(&text_delta(0, piece)));
    }
    frames.push(event_frame(
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(event_frame(&message_delta(
        "end_turn",
        input_tokens,
        pieces.len(),
    )));
    frames.push(event_frame(&json!({"type": "message_stop"})));
    frames
}

/// Whether a Messages request turns on extended thinking.
pub(crate) fn thinking_enabled(body: &Value) -> bool {
    body.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled")
}

/// The thinking of tool turn `turn`.
pub(crate) fn thinking_text(turn: usize) -> String {
    format!("Turn {turn}: the user wants numbers, so I call every tool I have.")
}

/// The opaque data of tool turn `turn`'s redacted thinking block.
pub(crate) fn redacted_data(turn: usize) -> String {
    format!("mock-redacted-{turn}-EmwKAhgBEgy3va3pzix")
}

/// The signature the mock gives a thinking block: a hash of its text, so that a
/// thinking block sent back with other text, or with another block's signature, is
/// refused as Anthropic refuses it.
pub(crate) fn signature_of(thinking: &str) -> String {
    // FNV-1a, 64 bits.
    let hash = thinking.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("EqMock{hash:016x}")
}

/// A thinking block at `index`: `thinking_delta`s of a few words, then its
/// `signature_delta`, as the API streams them.
fn thinking_frames(index: usize, thinking: &str) -> Vec<String> {
    let mut frames = vec![event_frame(
        &json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    )];
    for piece in word_pieces(thinking) {
        frames.push(event_frame(
            &json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "thinking_delta", "thinking": piece}}),
        ));
    }
    frames.push(event_frame(
        &json!({"type": "content_block_delta", "index": index,
        "delta": {"type": "signature_delta", "signature": signature_of(thinking)}}),
    ));
    frames.push(event_frame(
        &json!({"type": "content_block_stop", "index": index}),
    ));
    frames
}

/// A redacted thinking block at `index`: its data comes whole in the block start.
fn redacted_thinking_frames(index: usize, data: &str) -> Vec<String> {
    vec![
        event_frame(&json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "redacted_thinking", "data": data}})),
        event_frame(&json!({"type": "content_block_stop", "index": index})),
    ]
}

/// A tool-calling turn on the wire: `message_start`; with `thinking` (its text and
/// the redacted block's data) a signed thinking block and a redacted one first; then
/// one `tool_use` block per call with its `input_json_delta`s; `message_delta`
/// (`tool_use`, usage) and `message_stop`.
pub(crate) fn tool_use_frames(
    model: &str,
    calls: &[PlannedCall],
    thinking: Option<(String, String)>,
    usage: TurnUsage,
) -> Vec<String> {
    let input_tokens = usage.prompt_tokens;
    let mut frames = vec![event_frame(&message_start(model, input_tokens))];
    let first_call = match thinking {
        Some((text, redacted)) => {
            frames.extend(thinking_frames(0, &text));
            frames.extend(redacted_thinking_frames(1, &redacted));
            2
        }
        None => 0,
    };
    for (j, call) in calls.iter().enumerate() {
        let j = j + first_call;
        frames.push(event_frame(
            &json!({"type": "content_block_start", "index": j,
            "content_block": {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}}),
        ));
        frames.push(event_frame(
            &json!({"type": "content_block_delta", "index": j,
            "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ));
        for piece in &call.fragments {
            frames.push(event_frame(
                &json!({"type": "content_block_delta", "index": j,
                "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        frames.push(event_frame(
            &json!({"type": "content_block_stop", "index": j}),
        ));
    }
    frames.push(event_frame(&message_delta(
        "tool_use",
        input_tokens,
        usage.output_tokens,
    )));
    frames.push(event_frame(&json!({"type": "message_stop"})));
    frames
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_echo_streams_the_last_user_message() {
        let body = json!({"model": "echo", "system": "be brief", "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]},
        ]});
        let frames = anthropic_echo_frames("echo", &body);
        let payloads: Vec<Value> = frames
            .iter()
            .filter_map(|f| f.split_once("data: "))
            .filter_map(|(_, d)| serde_json::from_str(d.trim()).ok())
            .collect();
        let text: String = payloads
            .iter()
            .filter_map(|v| v.pointer("/delta/text")?.as_str())
            .collect();
        assert_eq!(text, "hello there world");
        let kinds: Vec<&str> = payloads.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(kinds.first(), Some(&"message_start"));
        assert_eq!(kinds.last(), Some(&"message_stop"));
        let delta = payloads
            .iter()
            .find(|v| v["type"] == "message_delta")
            .unwrap();
        assert_eq!(delta["usage"]["output_tokens"], 3);
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        for f in &frames {
            let (event, data) = f.split_once('\n').unwrap();
            let v: Value =
                serde_json::from_str(data.trim().strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(event, format!("event: {}", v["type"].as_str().unwrap()));
        }
    }
}
