//! The `anthropic` provider against the mock upstream, over real HTTP: recorded
//! Messages streams, scripted failures, and the request it sends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use genstream_engine::event::ToolCall;
use genstream_engine::provider::{
    ChatMessage, ModelRequest, Provider, ProviderError, ProviderErrorKind, ProviderEvent, Role,
    ToolSpec,
};
use genstream_engine::usage::UsageRecord;
use genstream_mock_upstream::{MockUpstream, fixture};
use genstream_providers::{HttpProviderConfig, ModelOptions, ProviderConfig, ProviderKind, build};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

type Item = Result<ProviderEvent, ProviderError>;

fn provider_with(base_url: String, options: Value, api_key_env: Option<&str>) -> Arc<dyn Provider> {
    let providers = BTreeMap::from([(
        "claude".to_owned(),
        ProviderConfig::Anthropic(HttpProviderConfig {
            // A trailing slash, as users write it.
            base_url: format!("{base_url}/"),
            api_key_env: api_key_env.map(str::to_owned),
            ..Default::default()
        }),
    )]);
    let options = ModelOptions::deserialize_for(ProviderKind::Anthropic, options).unwrap();
    build("claude", &providers, &options).unwrap()
}

fn provider_for(base_url: String, upstream_model: &str) -> Arc<dyn Provider> {
    provider_with(base_url, json!({"model": upstream_model}), None)
}

fn user(text: &str) -> ChatMessage {
    ChatMessage {
        role: Role::User,
        text: text.into(),
        tool_calls: vec![],
        tool_call_id: None,
        reasoning: vec![],
    }
}

fn request(text: &str) -> ModelRequest {
    ModelRequest {
        model: "configured-name".into(),
        system_prompt: None,
        messages: vec![user(text)],
        tools: vec![],
        call_index: 0,
    }
}

/// Runs one attempt against upstream model `model` and collects everything.
async fn run(mock: &MockUpstream, model: &str) -> Result<Vec<Item>, ProviderError> {
    let p = provider_for(mock.base_url(), model);
    let stream = p.stream(request("hello"), CancellationToken::new()).await?;
    Ok(
        tokio::time::timeout(Duration::from_secs(20), stream.collect())
            .await
            .unwrap(),
    )
}

/// What a stream added up to.
#[derive(Debug, Default)]
struct Summary {
    text: String,
    reasoning: String,
    signatures: Vec<String>,
    redacted: Vec<String>,
    /// index → (id, name, args)
    tools: BTreeMap<u32, (String, String, String)>,
    usage: Option<UsageRecord>,
    finish: Option<String>,
    error: Option<ProviderError>,
    /// One letter per run of events of a kind: r(easoning) t(ext) c(all) u(sage)
    /// f(inish) e(rror).
    order: String,
}

fn summarize(items: Vec<Item>) -> Summary {
    let mut s = Summary::default();
    let push = |order: &mut String, c: char| {
        if !order.ends_with(c) {
            order.push(c);
        }
    };
    for item in items {
        assert!(
            s.error.is_none() && s.finish.is_none(),
            "item after the end: {item:?}"
        );
        match item {
            Ok(ProviderEvent::Text(t)) => {
                s.text.push_str(&t);
                push(&mut s.order, 't');
            }
            Ok(ProviderEvent::Reasoning(t)) => {
                s.reasoning.push_str(&t);
                push(&mut s.order, 'r');
            }
            Ok(ProviderEvent::ReasoningSignature(sig)) => s.signatures.push(sig),
            Ok(ProviderEvent::RedactedReasoning(data)) => s.redacted.push(data),
            Ok(ProviderEvent::ToolCall {
                index,
                id,
                name,
                args,
            }) => {
                let call = s.tools.entry(index).or_default();
                if let Some(id) = id {
                    call.0 = id;
                }
                if let Some(name) = name {
                    call.1 = name;
                }
                call.2.push_str(&args);
                push(&mut s.order, 'c');
            }
            Ok(ProviderEvent::Usage(u)) => {
                assert!(s.usage.is_none(), "usage reported twice");
                s.usage = Some(u);
                push(&mut s.order, 'u');
            }
            Ok(ProviderEvent::Finish(f)) => {
                s.finish = Some(f);
                push(&mut s.order, 'f');
            }
            Err(e) => {
                s.error = Some(e);
                push(&mut s.order, 'e');
            }
        }
    }
    s
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

async fn fixture_run(mock: &MockUpstream, path: &str) -> Summary {
    summarize(run(mock, &format!("fixture:{path}")).await.unwrap())
}

#[tokio::test]
async fn text_and_usage() {
    let mock = genstream_mock_upstream::spawn().await;
    let path = "anthropic/messages-text.sse";
    // Padded JSON, a ping, non-ASCII text.
    assert!(fixture(path).unwrap().contains("\"}            }"));
    let s = fixture_run(&mock, path).await;
    assert_eq!(s.text, fixture_deltas(path, "text"));
    assert!(
        s.text.starts_with("Olá! (That's \"hi\" in Portuguese)"),
        "{}",
        s.text
    );
    assert_eq!(s.order, "tuf");
    assert_eq!(s.finish.as_deref(), Some("end_turn"));
    assert_eq!(
        s.usage.unwrap(),
        UsageRecord {
            call_index: 0,
            model: "configured-name".into(),
            provider: "claude".into(),
            input_tokens: 16,
            output_tokens: 38,
            cache_write_tokens: 0,
            cache_read_tokens: 0,
            reasoning_tokens: 0,
            input_includes_cache: false,
            estimated: false,
        }
    );

    // The same shape replayed from recorded chunks (`event: <type>` added by the mock).
    let path = "anthropic/messages-text.chunks.jsonl";
    let s = fixture_run(&mock, path).await;
    assert_eq!(s.order, "tuf");
    assert_eq!(s.text, fixture_deltas(path, "text"));
    let u = s.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (12, 30));
}

#[tokio::test]
async fn thinking_then_text() {
    let mock = genstream_mock_upstream::spawn().await;
    for path in [
        "anthropic/messages-thinking-text.sse",
        "anthropic/messages-thinking-text.chunks.jsonl",
    ] {
        let s = fixture_run(&mock, path).await;
        assert!(s.error.is_none(), "{path}: {:?}", s.error);
        assert_eq!(s.order, "rtuf", "{path}");
        assert_eq!(s.reasoning, fixture_deltas(path, "thinking"), "{path}");
        assert_eq!(s.text, fixture_deltas(path, "text"), "{path}");
        assert!(!s.reasoning.is_empty() && !s.text.is_empty(), "{path}");
    }
    let s = fixture_run(&mock, "anthropic/messages-thinking-text.sse").await;
    assert_eq!(s.usage.unwrap().output_tokens, 282);
}

#[tokio::test]
async fn tool_use_json_split_across_fragments() {
    let mock = genstream_mock_upstream::spawn().await;
    // `{"locati` / `on": "P` / `ar` / `is"}`, and no newline after the last frame.
    let path = "anthropic/messages-text-then-tool-use.sdk-fixture.sse";
    assert!(
        fixture(path)
            .unwrap()
            .ends_with("{\"type\":\"message_stop\"}")
    );
    let s = fixture_run(&mock, path).await;
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!(s.order, "tcuf");
    assert_eq!(s.text, "I'll check the current weather in Paris for you.");
    assert_eq!(s.finish.as_deref(), Some("tool_use"));
    assert_eq!(s.tools.len(), 1);
    let (id, name, args) = &s.tools[&1];
    assert_eq!(id, "toolu_01NRLabsLyVHZPKxbKvkfSMn");
    assert_eq!(name, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"location": "Paris"})
    );
    let u = s.usage.unwrap();
    // message_delta carries only output_tokens; input comes from message_start.
    assert_eq!((u.input_tokens, u.output_tokens), (377, 65));

    let s = fixture_run(&mock, "anthropic/messages-thinking-tool-use.sse").await;
    assert_eq!(s.order, "rcuf");
    let (_, name, args) = &s.tools[&1];
    assert_eq!(name, "weather");
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"location": "Florence, Italy"})
    );
}

#[tokio::test]
async fn parallel_tool_use() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = fixture_run(&mock, "anthropic/messages-text-parallel-tool-use.sse").await;
    assert_eq!(s.order, "tcuf");
    assert_eq!(s.text, "I'll add and multiply the numbers 2 and 3 for you.");
    assert_eq!(s.finish.as_deref(), Some("tool_use"));
    let calls: Vec<(u32, &str, &str, Value)> = s
        .tools
        .iter()
        .map(|(index, (id, name, args))| {
            (
                *index,
                id.as_str(),
                name.as_str(),
                serde_json::from_str(args).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            (
                1,
                "toolu_01UYxUYC2zRPY8wiutnF48eP",
                "add",
                json!({"a": 2, "b": 3})
            ),
            (
                2,
                "toolu_01VaRx1jpWCvPhi7L4kywAcd",
                "multiply",
                json!({"a": 2, "b": 3})
            ),
        ]
    );
}

#[tokio::test]
async fn empty_tool_input_becomes_an_object() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = fixture_run(&mock, "anthropic/messages-tool-use-empty-input.sse").await;
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
    let s = fixture_run(
        &mock,
        "anthropic/messages-cache-creation-and-read-server-tool.chunks.jsonl",
    )
    .await;
    assert!(s.tools.is_empty());
    assert_eq!(counts(s), (6, 198, 3337, 6289));
    // message_start: read 55096; message_delta: read 0 at the top level, with the
    // compaction step in `iterations`. Neither 0 nor 2 × 55096.
    let s = fixture_run(&mock, "anthropic/messages-cache-read-compaction.sse").await;
    assert_eq!(s.text, "Hello! 👋");
    assert_eq!(counts(s), (100 + 181, 83 + 8, 0, 55096));
}

#[tokio::test]
async fn overloaded_mid_stream_is_an_upstream_error() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(run(&mock, "overloaded").await.unwrap());
    assert_eq!(s.text, "Partial answer then");
    assert_eq!(s.order, "te");
    let e = s.error.unwrap();
    assert_eq!((e.kind, e.status), (ProviderErrorKind::Upstream, Some(529)));
    assert!(
        e.message.contains("overloaded_error: Overloaded"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn status_529_and_429_with_retry_after() {
    let mock = genstream_mock_upstream::spawn().await;
    for (code, kind) in [(529, "overloaded_error"), (429, "rate_limit_error")] {
        let e = run(&mock, &format!("status:{code}")).await.unwrap_err();
        assert_eq!(e.kind, ProviderErrorKind::Http);
        assert_eq!(e.status, Some(code));
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        assert!(
            e.message
                .contains(&format!("{kind}: mock upstream says {code}")),
            "{}",
            e.message
        );
    }
}

#[tokio::test]
async fn status_400_quotes_the_message() {
    let mock = genstream_mock_upstream::spawn().await;
    let e = run(&mock, "status:400").await.unwrap_err();
    assert_eq!(
        (e.kind, e.status, e.retry_after),
        (ProviderErrorKind::Http, Some(400), None)
    );
    assert!(
        e.message
            .contains("invalid_request_error: mock upstream says 400 (request_id req_mock)"),
        "{}",
        e.message
    );
    let e = run(&mock, "claude-nope").await.unwrap_err();
    assert_eq!(e.status, Some(404));
    assert!(
        e.message.contains("not_found_error: model: claude-nope"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn truncated_stream() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(run(&mock, "truncated").await.unwrap());
    assert_eq!(s.text, "This stream stops here");
    assert_eq!(s.order, "te");
    let e = s.error.unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Truncated);
    assert!(e.message.contains("message_stop"), "{}", e.message);
}

#[tokio::test]
async fn malformed_event() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(run(&mock, "malformed").await.unwrap());
    assert_eq!(s.order, "te");
    assert_eq!(s.text, "Hello");
    let e = s.error.unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Malformed);
    assert!(e.message.contains("{not json"), "{}", e.message);
}

#[tokio::test]
async fn echo_and_request_body() {
    let mock = genstream_mock_upstream::spawn().await;
    let p = provider_with(
        mock.base_url(),
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
    let s = summarize(items);
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

#[tokio::test]
async fn cancel_ends_a_stalled_stream() {
    let mock = genstream_mock_upstream::spawn().await;
    let p = provider_for(mock.base_url(), "stall");
    let cancel = CancellationToken::new();
    let mut stream = p.stream(request("hi"), cancel.clone()).await.unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ProviderEvent::Text("Stalling".into())
    );
    cancel.cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
    assert!(matches!(next, Ok(None)), "{next:?}");
}

#[tokio::test]
async fn connect_error() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let p = provider_for(format!("http://{addr}/v1"), "echo");
    let e = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Connect, "{}", e.message);
}

#[tokio::test]
async fn missing_key_variable_is_a_config_error() {
    let mock = genstream_mock_upstream::spawn().await;
    let var = "GENSTREAM_TEST_UNSET_ANTHROPIC_KEY_MISSING";
    assert!(std::env::var_os(var).is_none());
    let p = provider_with(mock.base_url(), json!({"model": "echo"}), Some(var));
    let e = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Config);
    assert!(e.message.contains(var), "{}", e.message);
    assert!(mock.requests().is_empty());
}

/// The variable the child test reads; unique to this test.
const KEY_VAR: &str = "GENSTREAM_TEST_ANTHROPIC_KEY_SENDS_X_API_KEY";

/// `std::env::set_var` is `unsafe` in edition 2024 and the workspace forbids unsafe
/// code, so the check runs in a child process of this test binary that is started with
/// the variable set.
#[test]
fn sends_x_api_key_from_env() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "x_api_key_child", "--ignored", "--nocapture"])
        .env(KEY_VAR, "sk-ant-test-from-env")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "child ran no test:\n{stdout}\n{stderr}"
    );
}

#[tokio::test]
#[ignore = "run by sends_x_api_key_from_env, in a child process with the key variable set"]
async fn x_api_key_child() {
    assert_eq!(
        std::env::var(KEY_VAR).as_deref(),
        Ok("sk-ant-test-from-env")
    );
    let mock = genstream_mock_upstream::spawn().await;
    let p = provider_with(mock.base_url(), json!({"model": "echo"}), Some(KEY_VAR));
    let items: Vec<Item> = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(summarize(items).text, "hi");
    let recorded = mock.recorded();
    let header = |name: &str| recorded[0].headers.get(name).map(String::as_str);
    assert_eq!(header("x-api-key"), Some("sk-ant-test-from-env"));
    assert_eq!(header("anthropic-version"), Some("2023-06-01"));
    // Anthropic takes the key in x-api-key, never as a bearer token.
    assert_eq!(header("authorization"), None);
}

/// A provider on `mock` with short first-byte and idle timeouts (400 ms each).
fn impatient(mock: &MockUpstream, upstream_model: &str) -> Arc<dyn Provider> {
    let providers = BTreeMap::from([(
        "claude".to_owned(),
        ProviderConfig::Anthropic(HttpProviderConfig {
            base_url: mock.base_url(),
            timeouts: genstream_engine::retry::Timeouts {
                connect: Duration::from_secs(1),
                first_byte: Duration::from_millis(400),
                idle: Duration::from_millis(400),
            },
            ..Default::default()
        }),
    )]);
    let options =
        ModelOptions::deserialize_for(ProviderKind::Anthropic, json!({"model": upstream_model}))
            .unwrap();
    build("claude", &providers, &options).unwrap()
}

/// Anthropic's `ping` events, before `message_start` or between events, keep a live
/// upstream alive for three times the timeouts; the same stretch of silence is a
/// timeout.
#[tokio::test]
async fn pings_are_not_timeouts_but_silence_is() {
    let mock = genstream_mock_upstream::spawn().await;
    let cases = [
        ("echo?lead_ms=1200&keepalive_ms=50", None),
        ("echo?gap_ms=1200&keepalive_ms=50", None),
        (
            "echo?lead_ms=1200&keepalive_ms=0",
            Some("first byte timeout of 0.4 s"),
        ),
        (
            "echo?gap_ms=1200&keepalive_ms=0",
            Some("idle gap timeout of 0.4 s"),
        ),
    ];
    let runs = futures::future::join_all(cases.iter().map(|(model, _)| {
        let p = impatient(&mock, model);
        async move {
            let t0 = std::time::Instant::now();
            let stream = p.stream(request("alive and well"), CancellationToken::new());
            let items: Vec<Item> = stream.await.unwrap().collect().await;
            (summarize(items), t0.elapsed())
        }
    }))
    .await;
    for ((model, timeout), (s, took)) in cases.iter().zip(runs) {
        match timeout {
            None => {
                assert!(s.error.is_none(), "{model}: {:?}", s.error);
                assert_eq!(s.text, "alive and well", "{model}");
                assert!(took >= Duration::from_millis(1200), "{model}: {took:?}");
            }
            Some(says) => {
                let e = s.error.unwrap_or_else(|| panic!("{model}: no timeout"));
                assert_eq!(e.kind, ProviderErrorKind::Timeout, "{model}: {}", e.message);
                assert!(e.message.contains(says), "{model}: {}", e.message);
                assert!(took < Duration::from_millis(1200), "{model}: {took:?}");
            }
        }
    }
}

/// With thinking on, a tool turn sent back with its signed thinking block is accepted
/// with thinking on; one without (a model without thinking made it) is sent with
/// thinking off — as Anthropic's own 400 advises — and accepted too, instead of being
/// refused on every later turn.
#[tokio::test]
async fn thinking_tool_turns_are_accepted_signed_or_not() {
    let mock = genstream_mock_upstream::spawn().await;
    let p = provider_with(
        mock.base_url(),
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
    let s = summarize(
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
        genstream_engine::provider::ReasoningBlock::Thinking {
            thinking: s.reasoning.clone(),
            signature: s.signatures[0].clone(),
        },
        genstream_engine::provider::ReasoningBlock::Redacted {
            data: s.redacted[0].clone(),
        },
    ];
    for (reasoning, thinking_on) in [(signed, true), (Vec::new(), false)] {
        let next = ModelRequest {
            messages: vec![user("compute"), turn(reasoning)],
            tools: vec![calculator.clone()],
            ..request("")
        };
        let s = summarize(
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
