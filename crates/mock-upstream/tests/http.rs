//! The mock over real sockets: the library's `spawn` and the binary's first line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// POSTs `body` to `http://{addr}/v1/chat/completions` over HTTP/1.1 with
/// `Connection: close` and returns the raw response (head and body, chunked framing
/// left in; each SSE frame is written as one chunk, so frames stay whole).
async fn post(addr: &str, body: &Value) -> String {
    post_to(
        addr,
        "/v1/chat/completions",
        "Authorization: Bearer sk-x\r\n",
        body,
    )
    .await
}

/// POSTs `body` to `http://{addr}/v1/messages` as an Anthropic client does.
async fn post_messages(addr: &str, body: &Value) -> String {
    post_to(
        addr,
        "/v1/messages",
        "x-api-key: sk-ant-x\r\nanthropic-version: 2023-06-01\r\n",
        body,
    )
    .await
}

/// POSTs `body` to `path` with the extra header lines `headers` (each ending in CRLF).
async fn post_to(addr: &str, path: &str, headers: &str, body: &Value) -> String {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn records_requests_and_scripts_answers() {
    let mock = genstream_mock_upstream::spawn().await;
    assert!(mock.base_url().starts_with("http://127.0.0.1:"));
    assert!(mock.base_url().ends_with("/v1"));
    let addr = mock.addr().to_string();

    let r = post(&addr, &json!({"model": "status:429", "messages": []})).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{r}");
    assert!(r.contains("mock upstream says 429"), "{r}");

    let r = post(&addr, &json!({"model": "status:400"})).await;
    assert!(
        r.starts_with("HTTP/1.1 400") && !r.to_ascii_lowercase().contains("retry-after"),
        "{r}"
    );

    let r = post(
        &addr,
        &json!({"model": "fixture:openai/chat-text-usage.sse"}),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("content-type: text/event-stream"), "{r}");
    assert!(
        r.contains("\"content\":\" unable\"") && r.contains("data: [DONE]\n\n"),
        "{r}"
    );

    let r = post(
        &addr,
        &json!({"model": "fixture:openai-compatible/deepseek-reasoning-content.chunks.jsonl"}),
    )
    .await;
    assert!(
        r.contains("data: {\"id\":\"cac7192e") && r.contains("data: [DONE]\n\n"),
        "{r}"
    );

    let r = post(&addr, &json!({"model": "truncated"})).await;
    assert!(
        r.contains("\"content\":\"stream \"")
            && !r.contains("[DONE]")
            && !r.contains("\"finish_reason\":\"stop\""),
        "{r}"
    );

    let r = post(&addr, &json!({"model": "malformed"})).await;
    assert!(r.contains("data: {not json\n\n"), "{r}");

    let r = post(&addr, &json!({"model": "fixture:nope.sse"})).await;
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("no fixture"),
        "{r}"
    );
    let r = post(&addr, &json!({"model": "gpt-4o"})).await;
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("does not exist"),
        "{r}"
    );

    let recorded = mock.recorded();
    assert_eq!(recorded.len(), 8);
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(
        recorded[0].headers.get("authorization").map(String::as_str),
        Some("Bearer sk-x")
    );
    assert_eq!(mock.requests()[1], json!({"model": "status:400"}));
}

#[tokio::test]
async fn messages_endpoint_speaks_anthropic() {
    let mock = genstream_mock_upstream::spawn().await;
    let addr = mock.addr().to_string();

    // Like Anthropic, no anthropic-version header is a 400.
    let r = post_to(&addr, "/v1/messages", "", &json!({"model": "echo"})).await;
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("anthropic-version: header is required"),
        "{r}"
    );

    let r = post_messages(&addr, &json!({"model": "status:529"})).await;
    assert!(r.starts_with("HTTP/1.1 529"), "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{r}");
    let body: Value =
        serde_json::from_str(&r[r.find('{').unwrap()..=r.rfind('}').unwrap()]).unwrap();
    assert_eq!(
        body,
        json!({"type": "error", "error": {"type": "overloaded_error",
            "message": "mock upstream says 529"}, "request_id": "req_mock"})
    );

    let r = post_messages(
        &addr,
        &json!({"model": "fixture:anthropic/messages-text.chunks.jsonl"}),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains("event: message_start\ndata: {\"type\":\"message_start\"")
            && r.contains("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
            && !r.contains("[DONE]"),
        "{r}"
    );

    let r = post_messages(
        &addr,
        &json!({"model": "fixture:anthropic/messages-tool-use-empty-input.sse"}),
    )
    .await;
    assert!(
        r.contains("data: {\"type\":\"message_stop\"            }\n\n"),
        "{r}"
    );

    let r = post_messages(&addr, &json!({"model": "overloaded"})).await;
    assert!(
        r.contains("event: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\"type\":\"overloaded_error\"")
            && !r.contains("message_stop"),
        "{r}"
    );

    let r = post_messages(&addr, &json!({"model": "truncated"})).await;
    assert!(
        r.contains("\"text\":\"stream \"")
            && !r.contains("message_delta")
            && !r.contains("message_stop"),
        "{r}"
    );

    let r = post_messages(
        &addr,
        &json!({"model": "echo", "messages": [{"role": "user", "content": "hi there"}]}),
    )
    .await;
    assert!(
        r.contains("\"text\":\" there\"") && r.contains("\"stop_reason\":\"end_turn\""),
        "{r}"
    );

    let r = post_messages(&addr, &json!({"model": "gpt-4o"})).await;
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("not_found_error"),
        "{r}"
    );
    // `overloaded` is not a Chat Completions scenario.
    let r = post(&addr, &json!({"model": "overloaded"})).await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");

    let recorded = mock.recorded();
    assert_eq!(recorded.len(), 9);
    assert!(recorded[..8].iter().all(|r| r.path == "/v1/messages"));
    assert_eq!(
        recorded[1].headers.get("x-api-key").map(String::as_str),
        Some("sk-ant-x")
    );
}

#[tokio::test]
async fn delay_between_frames() {
    let mock = genstream_mock_upstream::spawn().await;
    let start = std::time::Instant::now();
    let r = post(
        &mock.addr().to_string(),
        &json!({"model": "echo?delay_ms=30", "messages": [
        {"role": "user", "content": "one two three"}]}),
    )
    .await;
    // 7 frames: role, 3 words, finish, usage, [DONE] → 6 gaps.
    assert!(
        start.elapsed() >= Duration::from_millis(180),
        "{:?}",
        start.elapsed()
    );
    assert!(r.contains("\"content\":\" three\""), "{r}");
}

#[tokio::test]
async fn binary_prints_its_address_first() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_genstream-mock-upstream"))
        .args(["--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .unwrap()
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on http://")
        .expect(&line);
    let addr = url.strip_suffix("/v1").expect(url);
    let r = post(
        addr,
        &json!({"model": "echo", "messages": [{"role": "user", "content": "hi there"}]}),
    )
    .await;
    assert!(
        r.contains("\"content\":\"hi\"") && r.contains("data: [DONE]"),
        "{r}"
    );
    child.kill().await.unwrap();
}

/// POSTs `body` to `path` and returns what arrived within `wait` (for answers that
/// never end).
async fn post_for(addr: &str, path: &str, headers: &str, body: Value, wait: Duration) -> String {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

const ANTHROPIC: &str = "anthropic-version: 2023-06-01\r\n";
/// The last chunk of a chunked body that ended cleanly.
const CLEAN_END: &str = "\r\n0\r\n\r\n";

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "one two three four five six"}]})
}

#[tokio::test]
async fn flaky_statuses_count_requests_per_model_and_set_wait_headers() {
    let mock = genstream_mock_upstream::spawn().await;
    let addr = mock.addr().to_string();
    let model = "flaky:2:429+ra3:echo";
    for _ in 0..2 {
        let r = post(&addr, &chat_body(model)).await;
        assert!(r.starts_with("HTTP/1.1 429"), "{r}");
        assert!(r.to_ascii_lowercase().contains("retry-after: 3\r\n"), "{r}");
        assert!(r.contains("mock upstream says 429"), "{r}");
    }
    let r = post(&addr, &chat_body(model)).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("data: [DONE]"),
        "{r}"
    );
    assert_eq!(mock.count(model), 3);
    // Another model string has its own count.
    let r = post(&addr, &chat_body("flaky:1:500:echo")).await;
    assert!(r.starts_with("HTTP/1.1 500"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("retry-after"), "{r}");
    let r = post(&addr, &chat_body("flaky:1:429+ram150:echo")).await;
    assert!(
        r.to_ascii_lowercase().contains("retry-after-ms: 150\r\n"),
        "{r}"
    );
    let r = post(&addr, &chat_body("flaky:1:503+radate2:echo")).await;
    let date = r
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_owned)
        })
        .expect(&r);
    assert!(date.ends_with(" gmt"), "{date}");
    // Anthropic's error shape on /v1/messages.
    let r = post_messages(&addr, &chat_body("flaky:1:529+ra1:echo")).await;
    assert!(
        r.starts_with("HTTP/1.1 529") && r.contains("overloaded_error"),
        "{r}"
    );
    let r = post_messages(&addr, &chat_body("flaky:1:529+ra1:echo")).await;
    assert!(r.contains("event: message_stop"), "{r}");
    assert_eq!(mock.requests_for("flaky:1:529+ra1:echo").len(), 2);
}

#[tokio::test]
async fn mid_stream_failures_on_both_dialects() {
    let wait = Duration::from_millis(600);
    for (path, headers) in [("/v1/chat/completions", ""), ("/v1/messages", ANTHROPIC)] {
        // Requests are counted per model string, whatever the endpoint: a mock each.
        let mock = genstream_mock_upstream::spawn().await;
        let addr = mock.addr().to_string();
        let go = |model: &'static str| post_for(&addr, path, headers, chat_body(model), wait);
        // Dropped: some words, then the connection ends without the last chunk.
        let r = go("dropmid:1:echo").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("two"), "{r}");
        assert!(!r.contains("six") && !r.ends_with(CLEAN_END), "{path}: {r}");
        let r = go("dropmid:1:echo").await;
        assert!(r.contains("six") && r.ends_with(CLEAN_END), "{path}: {r}");
        // Closed cleanly before the terminator.
        let r = go("closemid:1:echo").await;
        assert!(
            r.contains("two") && !r.contains("six") && r.ends_with(CLEAN_END),
            "{r}"
        );
        assert!(!r.contains("[DONE]") && !r.contains("message_stop"), "{r}");
        // Malformed data after a few chunks.
        let r = go("malformedmid:1:echo").await;
        assert!(
            r.contains("two") && r.contains("data: {not json\n\n"),
            "{r}"
        );
        // The upstream's overload error.
        let r = go("overloaded:1:echo").await;
        assert!(r.contains("two") && r.contains("overloaded_error"), "{r}");
        assert!(!r.contains("six"), "{r}");
        // Stalled: a few chunks, then nothing, the connection still open.
        let r = go("stall:1:echo").await;
        assert!(
            r.contains("two") && !r.contains("six") && !r.ends_with(CLEAN_END),
            "{r}"
        );
        // No byte: the head, then nothing.
        let r = go("nobyte:1:echo").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        assert!(
            r.contains("text/event-stream") && !r.contains("data:"),
            "{r}"
        );
        let r = go("nobyte:1:echo").await;
        assert!(r.contains("six"), "{r}");
    }
}

#[tokio::test]
async fn tool_turns_over_http_and_history_validation() {
    let mock = genstream_mock_upstream::spawn().await;
    let addr = mock.addr().to_string();
    let tools = json!([{"type": "function", "function": {"name": "calculator",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]);
    let r = post(
        &addr,
        &json!({"model": "tools", "tools": tools, "messages": [{"role": "user", "content": "go"}]}),
    )
    .await;
    assert!(
        r.contains("call_mock_0_1") && r.contains("\"finish_reason\":\"tool_calls\""),
        "{r}"
    );

    // A call without its result: 400, in OpenAI's words, and listed.
    let bad = json!({"model": "tools", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": "{}"}}]},
        {"role": "user", "content": "again"},
    ]});
    let r = post(&addr, &bad).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(
        r.contains("invalid_request_error") && r.contains("call_1"),
        "{r}"
    );
    let bad = json!({"model": "tools", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        {"role": "user", "content": "again"},
    ]});
    let r = post_messages(&addr, &bad).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(
        r.contains("\"type\":\"error\"") && r.contains("toolu_1"),
        "{r}"
    );
    let rejected = mock.rejected();
    assert_eq!(rejected.len(), 2);
    assert_eq!((rejected[0].request, rejected[1].request), (1, 2));
    assert_eq!(
        mock.recorded().len(),
        3,
        "rejected requests are recorded too"
    );
    assert_eq!(mock.count("tools"), 1, "rejected requests are not counted");
}
