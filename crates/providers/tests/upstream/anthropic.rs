//! The `anthropic` provider (Messages): its wire for the shared suite, and what only
//! the Messages API has — recorded chunks framed by their `type`, empty tool input,
//! cache usage shapes, signed and redacted thinking sent back, the request body.

use futures::StreamExt;
use genstream_engine::event::ToolCall;
use genstream_engine::provider::{ChatMessage, ModelRequest, ReasoningBlock, Role, ToolSpec};
use genstream_mock_upstream::{RecordedRequest, fixture};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{
    InStreamErrorCase, Item, ReasoningCase, Summary, TextCase, ToolCase, Wire, request, user,
};
use crate::suite::provider_suite;

/// The Messages wire, with the recordings each shared behaviour replays.
pub fn wire() -> Wire {
    Wire {
        kind: "anthropic",
        name: "claude",
        signed_reasoning: true,
        fixture_deltas,
        text_field: "text",
        text: TextCase {
            path: "anthropic/messages-text.sse",
            // Padded JSON, a ping, non-ASCII text.
            fixture_holds: &["\"}            }"],
            starts_with: "Olá! (That's \"hi\" in Portuguese)",
            finish: "end_turn",
            input_tokens: 16,
            output_tokens: 38,
            input_includes_cache: false,
        },
        reasoning: &[
            ReasoningCase {
                path: "anthropic/messages-thinking-text.sse",
                reasoning_field: "thinking",
                check_usage: |u| assert_eq!((u.input_tokens, u.output_tokens), (43, 282)),
            },
            ReasoningCase {
                path: "anthropic/messages-thinking-text.chunks.jsonl",
                reasoning_field: "thinking",
                check_usage: |u| assert_eq!((u.input_tokens, u.output_tokens), (69, 53)),
            },
        ],
        // `{"locati` / `on": "P` / `ar` / `is"}`, and no newline after the last frame.
        // message_delta carries only output_tokens; input comes from message_start.
        split_call: ToolCase {
            path: "anthropic/messages-text-then-tool-use.sdk-fixture.sse",
            fixture_ends_with: Some("{\"type\":\"message_stop\"}"),
            order: "tcuf",
            text: "I'll check the current weather in Paris for you.",
            finish: "tool_use",
            calls: &[(
                1,
                "toolu_01NRLabsLyVHZPKxbKvkfSMn",
                "get_weather",
                r#"{"location": "Paris"}"#,
            )],
            tokens: Some((377, 65)),
        },
        parallel_calls: ToolCase {
            path: "anthropic/messages-text-parallel-tool-use.sse",
            fixture_ends_with: None,
            order: "tcuf",
            text: "I'll add and multiply the numbers 2 and 3 for you.",
            finish: "tool_use",
            calls: &[
                (
                    1,
                    "toolu_01UYxUYC2zRPY8wiutnF48eP",
                    "add",
                    r#"{"a": 2, "b": 3}"#,
                ),
                (
                    2,
                    "toolu_01VaRx1jpWCvPhi7L4kywAcd",
                    "multiply",
                    r#"{"a": 2, "b": 3}"#,
                ),
            ],
            tokens: Some((502, 137)),
        },
        reasoning_then_call: ToolCase {
            path: "anthropic/messages-thinking-tool-use.sse",
            fixture_ends_with: None,
            order: "rcuf",
            text: "",
            finish: "tool_use",
            calls: &[(
                1,
                "toolu_01Js4AMfx5qpTLhwTusnvT68",
                "weather",
                r#"{"location": "Florence, Italy"}"#,
            )],
            tokens: Some((424, 119)),
        },
        // The mock's `overloaded` scenario: a mid-stream `event: error`.
        in_stream_error: InStreamErrorCase {
            model: "overloaded",
            text: "Partial answer then",
            status: Some(529),
            says: "overloaded_error: Overloaded",
        },
        retry_after_statuses: &[
            (529, "overloaded_error: mock upstream says 529"),
            (429, "rate_limit_error: mock upstream says 429"),
        ],
        status_400_says: "invalid_request_error: mock upstream says 400 (request_id req_mock)",
        unknown_model_says: "not_found_error: model: claude-nope",
        truncated_names: "message_stop",
        unset_key_var: "GENSTREAM_TEST_UNSET_ANTHROPIC_KEY_MISSING",
        key_var: (
            "GENSTREAM_TEST_ANTHROPIC_KEY_SENDS_X_API_KEY",
            "sk-ant-test-from-env",
        ),
        check_key_headers,
    }
}

provider_suite!(super::wire());

fn check_key_headers(request: &RecordedRequest) {
    let header = |name: &str| request.headers.get(name).map(String::as_str);
    assert_eq!(header("x-api-key"), Some("sk-ant-test-from-env"));
    assert_eq!(header("anthropic-version"), Some("2023-06-01"));
    // Anthropic takes the key in x-api-key, never as a bearer token.
    assert_eq!(header("authorization"), None);
}

/// The concatenation of `delta.<field>` over a fixture's `content_block_delta` events,
/// computed straight from the file.
fn fixture_deltas(path: &str, field: &str) -> String {
    fixture(path)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("data: ").unwrap_or(l))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "content_block_delta")
        .filter_map(|v| v["delta"][field].as_str().map(str::to_owned))
        .collect()
}

/// The text recording replayed from its chunks (`event: <type>` added by the mock).
#[tokio::test]
async fn text_and_usage_from_recorded_chunks() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let path = "anthropic/messages-text.chunks.jsonl";
    let s = w.fixture_run(&mock, path).await;
    assert_eq!(s.order, "tuf");
    assert_eq!(s.text, fixture_deltas(path, "text"));
    let u = s.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (12, 30));
}

#[tokio::test]
async fn empty_tool_input_becomes_an_object() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let s = w
        .fixture_run(&mock, "anthropic/messages-tool-use-empty-input.sse")
        .await;
    assert_eq!(s.order, "cuf");
    assert_eq!(
        s.tools[&0],
        (
            "toolu_01UmKD1vMphVCN9vw8PEMk1q".into(),
            "fixed_version".into(),
            "{}".into()
        )
    );
}

#[tokio::test]
async fn cache_usage_is_not_double_counted() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let counts = |s: Summary| {
        let u = s.usage.unwrap();
        assert!(!u.input_includes_cache);
        (
            u.input_tokens,
            u.output_tokens,
            u.cache_write_tokens,
            u.cache_read_tokens,
        )
    };
    // message_start: creation 3068; message_delta (cumulative): creation 3337, read
    // 6289. Server-side tool blocks are not tool calls for the engine.
    let s = w
        .fixture_run(
            &mock,
            "anthropic/messages-cache-creation-and-read-server-tool.chunks.jsonl",
        )
        .await;
    assert!(s.tools.is_empty());
    assert_eq!(counts(s), (6, 198, 3337, 6289));
    // message_start: read 55096; message_delta: read 0 at the top level, with the
    // compaction step in `iterations`. Neither 0 nor 2 × 55096.
    let s = w
        .fixture_run(&mock, "anthropic/messages-cache-read-compaction.sse")
        .await;
    assert_eq!(s.text, "Hello! 👋");
    assert_eq!(counts(s), (100 + 181, 83 + 8, 0, 55096));
}

#[tokio::test]
async fn echo_and_request_body() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let p = w.provider(
        &mock.base_url(),
        json!({"model": "echo", "max_tokens": 8192, "thinking_budget_tokens": 2048}),
        None,
    );
    let assistant = ChatMessage {
        role: Role::Assistant,
        text: "Checking.".into(),
        tool_calls: vec![
            ToolCall {
                id: "toolu_1".into(),
                name: "get_weather".into(),
                args: r#"{"location":"Paris"}"#.into(),
                output: Some("sunny".into()),
            },
            ToolCall {
                id: "toolu_2".into(),
                name: "now".into(),
                args: String::new(),
                output: Some("noon".into()),
            },
        ],
        tool_call_id: None,
        reasoning: vec![],
    };
    let req = ModelRequest {
        model: "configured-name".into(),
        system_prompt: Some("be brief".into()),
        messages: vec![
            user("weather in Paris?"),
            assistant,
            ChatMessage {
                role: Role::Assistant,
                text: "Sunny at noon.".into(),
                tool_calls: vec![],
                tool_call_id: None,
                reasoning: vec![],
            },
            user("say these words"),
        ],
        tools: vec![ToolSpec {
            name: "get_weather".into(),
            description: "The weather at a place".into(),
            parameters: json!({"type": "object", "properties": {"location": {"type": "string"}}}),
        }],
        call_index: 1,
    };
    let items: Vec<Item> = p
        .stream(req, CancellationToken::new())
        .await
        .unwrap()
        .collect()
        .await;
    let s = w.summarize(items);
    assert_eq!(s.text, "say these words");
    assert_eq!(s.order, "tuf");
    let u = s.usage.unwrap();
    assert_eq!((u.call_index, u.output_tokens), (1, 3));

    let recorded = mock.recorded();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].path, "/v1/messages");
    let header = |name: &str| recorded[0].headers.get(name).map(String::as_str);
    assert_eq!(header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(header("x-api-key"), None);
    assert_eq!(header("authorization"), None);
    assert_eq!(
        recorded[0].body,
        json!({
            "model": "echo",
            "max_tokens": 8192,
            "stream": true,
            "system": "be brief",
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"location": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "noon"},
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": "Sunny at noon."}]},
                {"role": "user", "content": "say these words"},
            ],
            "tools": [{
                "name": "get_weather",
                "description": "The weather at a place",
                "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
            }],
        })
    );
}

/// With thinking on, a tool turn sent back with its signed thinking block is accepted
/// with thinking on; one without (a model without thinking made it) is sent with
/// thinking off — as Anthropic's own 400 advises — and accepted too, instead of being
/// refused on every later turn.
#[tokio::test]
async fn thinking_tool_turns_are_accepted_signed_or_not() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let p = w.provider(
        &mock.base_url(),
        json!({"model": "tools", "max_tokens": 4096, "thinking_budget_tokens": 1024}),
        None,
    );
    let calculator = ToolSpec {
        name: "calculator".into(),
        description: "calculates".into(),
        parameters: json!({"type": "object", "properties": {"expression": {"type": "string"}}}),
    };
    // The first call: the mock's tool turn, thinking first.
    let first = ModelRequest {
        messages: vec![user("compute")],
        tools: vec![calculator.clone()],
        ..request("")
    };
    let s = w.summarize(
        p.stream(first, CancellationToken::new())
            .await
            .unwrap()
            .collect()
            .await,
    );
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!((s.signatures.len(), s.redacted.len()), (1, 1));
    let (id, name, args) = s.tools.values().next().unwrap().clone();
    let turn = |reasoning| ChatMessage {
        role: Role::Assistant,
        text: String::new(),
        tool_calls: vec![ToolCall {
            id: id.clone(),
            name: name.clone(),
            args: args.clone(),
            output: Some("42".into()),
        }],
        tool_call_id: None,
        reasoning,
    };
    let signed = vec![
        ReasoningBlock::Thinking {
            thinking: s.reasoning.clone(),
            signature: s.signatures[0].clone(),
        },
        ReasoningBlock::Redacted {
            data: s.redacted[0].clone(),
        },
    ];
    for (reasoning, thinking_on) in [(signed, true), (Vec::new(), false)] {
        let next = ModelRequest {
            messages: vec![user("compute"), turn(reasoning)],
            tools: vec![calculator.clone()],
            ..request("")
        };
        let s = w.summarize(
            p.stream(next, CancellationToken::new())
                .await
                .unwrap()
                .collect()
                .await,
        );
        assert!(s.error.is_none(), "thinking {thinking_on}: {:?}", s.error);
        assert_eq!(s.text, "The tools said: 42.");
        let body = mock.requests().last().unwrap().clone();
        assert_eq!(body.get("thinking").is_some(), thinking_on, "{body}");
    }
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
}
