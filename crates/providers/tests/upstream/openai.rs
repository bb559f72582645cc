//! The `openai` provider (Chat Completions): its wire for the shared suite, and what
//! only OpenAI-compatible servers do — OpenRouter's keep-alive comments and error
//! chunks, Groq's error events, the Chat Completions request body.

use genstream_engine::provider::{ProviderErrorKind, ToolSpec};
use genstream_mock_upstream::{RecordedRequest, fixture};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{InStreamErrorCase, Item, ReasoningCase, TextCase, ToolCase, Wire, request};
use crate::suite::provider_suite;
use futures::StreamExt;

/// The Chat Completions wire, with the recordings each shared behaviour replays.
pub fn wire() -> Wire {
    Wire {
        kind: "openai",
        name: "mock",
        signed_reasoning: false,
        fixture_deltas,
        text_field: "content",
        text: TextCase {
            path: "openai/chat-text-usage.sse",
            fixture_holds: &[],
            starts_with: "I'm unable to provide real-time weather updates",
            finish: "stop",
            input_tokens: 14,
            output_tokens: 30,
            input_includes_cache: true,
        },
        reasoning: &[ReasoningCase {
            path: "openai-compatible/deepseek-reasoning-content.chunks.jsonl",
            reasoning_field: "reasoning_content",
            check_usage: |u| {
                assert_eq!(
                    (u.input_tokens, u.output_tokens, u.reasoning_tokens),
                    (18, 219, 205)
                );
            },
        }],
        split_call: ToolCase {
            path: "openai/chat-tool-call.sse",
            fixture_ends_with: None,
            order: "cuf",
            text: "",
            finish: "tool_calls",
            calls: &[(
                0,
                "call_c91SqDXlYFuETYv8mUHzz6pp",
                "GetWeatherArgs",
                r#"{"city": "Edinburgh", "country": "UK", "units": "c"}"#,
            )],
            tokens: Some((76, 24)),
        },
        parallel_calls: ToolCase {
            path: "openai/chat-parallel-tool-calls.sse",
            fixture_ends_with: None,
            order: "cuf",
            text: "",
            finish: "tool_calls",
            calls: &[
                (
                    0,
                    "call_JMW1whyEaYG438VE1OIflxA2",
                    "GetWeatherArgs",
                    r#"{"city": "Edinburgh", "country": "GB", "units": "c"}"#,
                ),
                (
                    1,
                    "call_DNYTawLBoN8fj3KN6qU9N1Ou",
                    "get_stock_price",
                    r#"{"ticker": "AAPL", "exchange": "NASDAQ"}"#,
                ),
            ],
            tokens: Some((149, 60)),
        },
        reasoning_then_call: ToolCase {
            path: "openai-compatible/deepseek-reasoning-tool-call.chunks.jsonl",
            fixture_ends_with: None,
            order: "rcuf",
            text: "",
            finish: "tool_calls",
            calls: &[(
                0,
                "call_00_ioIn7yN9p1ZOMNpDLwd4MgAF",
                "weather",
                r#"{"location": "San Francisco"}"#,
            )],
            tokens: Some((339, 83)),
        },
        // The mock's OpenRouter-style error chunk, after the first half of an echo.
        in_stream_error: InStreamErrorCase {
            model: "overloaded:1:echo",
            text: "hello",
            status: Some(529),
            says: "Overloaded (type overloaded_error, code 529)",
        },
        retry_after_statuses: &[(429, "mock upstream says 429")],
        status_400_says: "mock upstream says 400",
        unknown_model_says: "The model `claude-nope` does not exist",
        truncated_names: "[DONE]",
        unset_key_var: "GENSTREAM_TEST_UNSET_KEY_MISSING_KEY_VARIABLE",
        key_var: ("GENSTREAM_TEST_OPENAI_KEY_SENDS_BEARER", "sk-test-from-env"),
        check_key_headers,
    }
}

provider_suite!(super::wire());

fn check_key_headers(request: &RecordedRequest) {
    assert_eq!(
        request.headers.get("authorization").map(String::as_str),
        Some("Bearer sk-test-from-env")
    );
}

/// The concatenation of a string field of `choices[0].delta` over a fixture's chunks,
/// computed straight from the file.
fn fixture_deltas(path: &str, field: &str) -> String {
    let text = fixture(path).unwrap();
    text.lines()
        .map(|l| l.strip_prefix("data: ").unwrap_or(l))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v.pointer(&format!("/choices/0/delta/{field}"))?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn openrouter_reasoning_with_comment_lines() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let path = "openai-compatible/openrouter-reasoning.sse";
    assert!(
        fixture(path)
            .unwrap()
            .starts_with(": OPENROUTER PROCESSING")
    );
    // With a delay between frames, so the comments arrive in reads of their own.
    let s = w.summarize(
        w.run(&mock, &format!("fixture:{path}?delay_ms=2"))
            .await
            .unwrap(),
    );
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!(s.order, "rtuf");
    assert_eq!(s.reasoning, fixture_deltas(path, "reasoning"));
    assert!(!s.text.is_empty());
    let u = s.usage.unwrap();
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.reasoning_tokens),
        (43, 36, 13)
    );
}

#[tokio::test]
async fn openrouter_error_chunk_is_an_upstream_error() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let s = w.summarize(
        w.run(
            &mock,
            "fixture:openai-compatible/openrouter-midstream-error.sse",
        )
        .await
        .unwrap(),
    );
    let e = s.error.unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Upstream);
    assert!(e.message.contains("Token limit reached"), "{}", e.message);
    // No finish: the error ends the stream, although finish_reason "length" came before.
    assert_eq!(s.order, "rue");
}

#[tokio::test]
async fn groq_error_event_is_an_upstream_error() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let s = w.summarize(
        w.run(
            &mock,
            "fixture:openai-compatible/groq-midstream-error-event.sse",
        )
        .await
        .unwrap(),
    );
    assert_eq!(s.order, "re");
    let e = s.error.unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Upstream);
    assert!(
        e.message.contains("Tool call validation failed"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn echo_and_request_body() {
    let w = wire();
    let mock = genstream_mock_upstream::spawn().await;
    let p = w.for_model(&mock, "echo");
    let mut req = request("say these words");
    req.system_prompt = Some("be brief".into());
    req.tools = vec![ToolSpec {
        name: "add".into(),
        description: "Adds two numbers".into(),
        parameters: json!({"type": "object", "properties": {"a": {"type": "number"}}}),
    }];
    let items: Vec<Item> = p
        .stream(req, CancellationToken::new())
        .await
        .unwrap()
        .collect()
        .await;
    let s = w.summarize(items);
    assert_eq!(s.text, "say these words");
    assert_eq!(s.order, "tuf");

    let recorded = mock.recorded();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert!(!recorded[0].headers.contains_key("authorization"));
    assert_eq!(
        recorded[0].headers.get("accept").map(String::as_str),
        Some("text/event-stream")
    );
    let body = &recorded[0].body;
    assert_eq!(body["model"], "echo");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say these words"},
        ])
    );
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["name"], "add");
}
