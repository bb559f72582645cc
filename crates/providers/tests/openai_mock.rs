//! The `openai` provider against the mock upstream, over real HTTP: recorded streams
//! of OpenAI and compatible servers, scripted failures, and the request it sends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
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

fn provider_for(
    base_url: String,
    upstream_model: &str,
    api_key_env: Option<&str>,
) -> Arc<dyn Provider> {
    let providers = BTreeMap::from([(
        "mock".to_owned(),
        ProviderConfig::OpenAi(HttpProviderConfig {
            // A trailing slash, as users write it.
            base_url: format!("{base_url}/"),
            api_key_env: api_key_env.map(str::to_owned),
            ..Default::default()
        }),
    )]);
    build("mock", &providers, &options(upstream_model)).unwrap()
}

fn options(upstream_model: &str) -> ModelOptions {
    ModelOptions::deserialize_for(ProviderKind::OpenAi, json!({"model": upstream_model})).unwrap()
}

fn request(text: &str) -> ModelRequest {
    ModelRequest {
        model: "configured-name".into(),
        system_prompt: None,
        messages: vec![ChatMessage {
            role: Role::User,
            text: text.into(),
            tool_calls: vec![],
            tool_call_id: None,
            reasoning: vec![],
        }],
        tools: vec![],
        call_index: 0,
    }
}

/// Runs one attempt against upstream model `model` and collects everything.
async fn run(mock: &MockUpstream, model: &str) -> Result<Vec<Item>, ProviderError> {
    let p = provider_for(mock.base_url(), model, None);
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
            Ok(
                other
                @ (ProviderEvent::ReasoningSignature(_) | ProviderEvent::RedactedReasoning(_)),
            ) => {
                panic!("not a Chat Completions event: {other:?}")
            }
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
async fn text_and_usage() {
    let mock = genstream_mock_upstream::spawn().await;
    let path = "openai/chat-text-usage.sse";
    let s = summarize(run(&mock, &format!("fixture:{path}")).await.unwrap());
    assert_eq!(s.text, fixture_deltas(path, "content"));
    assert!(
        s.text
            .starts_with("I'm unable to provide real-time weather updates")
    );
    assert_eq!(s.order, "tuf");
    assert_eq!(s.finish.as_deref(), Some("stop"));
    assert_eq!(
        s.usage.unwrap(),
        UsageRecord {
            call_index: 0,
            model: "configured-name".into(),
            // The `[providers]` key, not the kind (an OpenAI-compatible upstream is
            // often not OpenAI).
            provider: "mock".into(),
            input_tokens: 14,
            output_tokens: 30,
            cache_write_tokens: 0,
            cache_read_tokens: 0,
            reasoning_tokens: 0,
            input_includes_cache: true,
            estimated: false,
        }
    );
}

#[tokio::test]
async fn deepseek_reasoning_then_text() {
    let mock = genstream_mock_upstream::spawn().await;
    let path = "openai-compatible/deepseek-reasoning-content.chunks.jsonl";
    let s = summarize(run(&mock, &format!("fixture:{path}")).await.unwrap());
    assert_eq!(s.order, "rtuf");
    assert_eq!(s.reasoning, fixture_deltas(path, "reasoning_content"));
    assert_eq!(s.text, fixture_deltas(path, "content"));
    let u = s.usage.unwrap();
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.reasoning_tokens),
        (18, 219, 205)
    );
}

#[tokio::test]
async fn openrouter_reasoning_with_comment_lines() {
    let mock = genstream_mock_upstream::spawn().await;
    let path = "openai-compatible/openrouter-reasoning.sse";
    assert!(
        fixture(path)
            .unwrap()
            .starts_with(": OPENROUTER PROCESSING")
    );
    // With a delay between frames, so the comments arrive in reads of their own.
    let s = summarize(
        run(&mock, &format!("fixture:{path}?delay_ms=2"))
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
async fn tool_call_fragments_accumulate_by_index() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(
        run(&mock, "fixture:openai/chat-parallel-tool-calls.sse")
            .await
            .unwrap(),
    );
    assert_eq!(s.finish.as_deref(), Some("tool_calls"));
    assert_eq!(s.tools.len(), 2);
    let names: Vec<&str> = s.tools.values().map(|(_, name, _)| name.as_str()).collect();
    assert_eq!(names, ["GetWeatherArgs", "get_stock_price"]);
    for (id, _, args) in s.tools.values() {
        assert!(id.starts_with("call_"), "{id}");
        let args: Value = serde_json::from_str(args).unwrap();
        assert!(args.is_object());
    }
    let weather: Value = serde_json::from_str(&s.tools[&0].2).unwrap();
    assert_eq!(weather["city"], "Edinburgh");

    let s = summarize(
        run(&mock, "fixture:openai/chat-tool-call.sse")
            .await
            .unwrap(),
    );
    assert_eq!(s.tools.len(), 1);
    serde_json::from_str::<Value>(&s.tools[&0].2).unwrap();
}

#[tokio::test]
async fn openrouter_error_chunk_is_an_upstream_error() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(
        run(
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
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(
        run(
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
async fn status_429_with_retry_after() {
    let mock = genstream_mock_upstream::spawn().await;
    let e = run(&mock, "status:429").await.unwrap_err();
    assert_eq!(e.kind, ProviderErrorKind::Http);
    assert_eq!(e.status, Some(429));
    assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
    assert!(
        e.message.contains("mock upstream says 429"),
        "{}",
        e.message
    );
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
        e.message.contains("mock upstream says 400"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn malformed_chunk() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(run(&mock, "malformed").await.unwrap());
    assert_eq!(s.order, "te");
    let e = s.error.unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Malformed);
    assert!(e.message.contains("{not json"), "{}", e.message);
}

#[tokio::test]
async fn truncated_stream() {
    let mock = genstream_mock_upstream::spawn().await;
    let s = summarize(run(&mock, "truncated").await.unwrap());
    assert_eq!(s.text, "This stream stops here");
    assert_eq!(s.order, "te");
    assert_eq!(s.error.unwrap().kind, ProviderErrorKind::Truncated);
}

#[tokio::test]
async fn connect_error() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let p = provider_for(format!("http://{addr}/v1"), "echo", None);
    let e = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Connect, "{}", e.message);
}

#[tokio::test]
async fn echo_and_request_body() {
    let mock = genstream_mock_upstream::spawn().await;
    let p = provider_for(mock.base_url(), "echo", None);
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
    let s = summarize(items);
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

#[tokio::test]
async fn cancel_ends_a_stalled_stream() {
    let mock = genstream_mock_upstream::spawn().await;
    let p = provider_for(mock.base_url(), "stall", None);
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
async fn missing_key_variable_is_a_config_error() {
    let mock = genstream_mock_upstream::spawn().await;
    let var = "GENSTREAM_TEST_UNSET_KEY_MISSING_KEY_VARIABLE";
    assert!(std::env::var_os(var).is_none());
    let p = provider_for(mock.base_url(), "echo", Some(var));
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
const KEY_VAR: &str = "GENSTREAM_TEST_OPENAI_KEY_SENDS_BEARER";

/// `std::env::set_var` is `unsafe` in edition 2024 and the workspace forbids unsafe
/// code, so the check runs in a child process of this test binary that is started with
/// the variable set.
#[test]
fn sends_bearer_key_from_env() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "bearer_key_child", "--ignored", "--nocapture"])
        .env(KEY_VAR, "sk-test-from-env")
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
#[ignore = "run by sends_bearer_key_from_env, in a child process with the key variable set"]
async fn bearer_key_child() {
    assert_eq!(std::env::var(KEY_VAR).as_deref(), Ok("sk-test-from-env"));
    let mock = genstream_mock_upstream::spawn().await;
    let p = provider_for(mock.base_url(), "echo", Some(KEY_VAR));
    let items: Vec<Item> = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(summarize(items).text, "hi");
    let recorded = mock.recorded();
    assert_eq!(
        recorded[0].headers.get("authorization").map(String::as_str),
        Some("Bearer sk-test-from-env")
    );
}

/// A provider on `mock` with short first-byte and idle timeouts (400 ms each).
fn impatient(mock: &MockUpstream, upstream_model: &str) -> Arc<dyn Provider> {
    let providers = BTreeMap::from([(
        "mock".to_owned(),
        ProviderConfig::OpenAi(HttpProviderConfig {
            base_url: mock.base_url(),
            timeouts: genstream_engine::retry::Timeouts {
                connect: Duration::from_secs(1),
                first_byte: Duration::from_millis(400),
                idle: Duration::from_millis(400),
            },
            ..Default::default()
        }),
    )]);
    build("mock", &providers, &options(upstream_model)).unwrap()
}

/// OpenRouter's `: OPENROUTER PROCESSING` comments, before the first chunk or between
/// chunks, keep a live upstream alive for three times the timeouts; the same stretch of
/// silence is a timeout.
#[tokio::test]
async fn keepalive_comments_are_not_timeouts_but_silence_is() {
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
