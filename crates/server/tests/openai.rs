//! The OpenAI-compatible `/v1` routes over HTTP, on demo models: shapes the SDKs read,
//! errors in OpenAI's shape, streams that are the job's projection (a Responses stream
//! resumed with `starting_after` is exactly the rest of an uninterrupted read), cancel
//! keeping the partial answer, delete. The official Python client drives the same
//! routes in `crates/genstream/tests/openai.rs`; client tools against the mock
//! upstream are in `client_tools.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{default_models, take_frames, test_app, token};
use genstream_test_support::Served;
use serde_json::{Value, json};

struct V1 {
    url: String,
    token: String,
    http: reqwest::Client,
    _served: Served,
}

async fn v1() -> V1 {
    let app = test_app(default_models());
    let served = Served::start(app.router).await;
    V1 {
        url: served.url.clone(),
        token: token("alice"),
        http: reqwest::Client::new(),
        _served: served,
    }
}

impl V1 {
    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = rb.bearer_auth(&self.token).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        self.send(self.http.post(format!("{}{path}", self.url)).json(&body))
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, _, v) = self
            .send(self.http.get(format!("{}{path}", self.url)))
            .await;
        (s, v)
    }

    /// The raw SSE body of a streaming request, read to its end.
    async fn stream(&self, rb: reqwest::RequestBuilder) -> (reqwest::header::HeaderMap, Vec<u8>) {
        let r = tokio::time::timeout(Duration::from_secs(30), rb.bearer_auth(&self.token).send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let headers = r.headers().clone();
        let body = tokio::time::timeout(Duration::from_secs(30), r.bytes())
            .await
            .unwrap()
            .unwrap();
        (headers, body.to_vec())
    }

    /// The first `n` frames of a stream, then the connection is dropped.
    async fn stream_prefix(&self, path: &str, n: usize) -> Vec<u8> {
        let mut r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let mut raw = Vec::new();
        let mut got = 0;
        while got < n {
            let chunk = tokio::time::timeout(Duration::from_secs(30), r.chunk())
                .await
                .unwrap()
                .unwrap()
                .expect("the stream has that many frames");
            raw.extend_from_slice(&chunk);
            got = raw.windows(2).filter(|w| w == b"\n\n").count();
        }
        raw
    }
}

fn openai_error(v: &Value) -> (&str, Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{v}");
    (e["type"].as_str().unwrap(), e["param"].as_str())
}

/// `data:` payloads of a Chat Completions stream.
fn chat_chunks(raw: &[u8]) -> Vec<String> {
    let mut buf = raw.to_vec();
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(&std::mem::take(&mut buf)).lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            out.push(d.to_string());
        }
    }
    out
}

#[tokio::test]
async fn models_and_errors_in_openai_shape() {
    let v = v1().await;
    let (status, models) = v.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "demo");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(v.get("/v1/models/slow").await.1["id"], "slow");

    // 401 without a token or with a bad one, in OpenAI's shape.
    let r = v
        .http
        .get(format!("{}/v1/models", v.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        openai_error(&r.json().await.unwrap()).0,
        "authentication_error"
    );
    let r = v
        .http
        .get(format!("{}/v1/models", v.url))
        .bearer_auth("gsk_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // 404s: a route, a model, a response id.
    for path in [
        "/v1/nothing",
        "/v1/models/gpt-5",
        "/v1/responses/resp_0123",
        "/v1/responses/resp_0190f5e67a1b7c2d8e3f0000000000c1",
        "/v1/chat/completions/chatcmpl-0190f5e67a1b7c2d8e3f0000000000c1",
    ] {
        let (status, body) = v.get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(openai_error(&body).0, "invalid_request_error");
    }

    // 400s name the parameter; nothing is started.
    let bad = [
        (
            json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 2}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (json!({"model": "demo"}), "messages"),
        (
            json!({"model": "demo", "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
            "logprobs": true}),
            "logprobs",
        ),
        (
            json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "custom", "custom": {"name": "x"}}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
            "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
    ];
    for (body, param) in bad {
        let (status, _, err) = v.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(
            openai_error(&err),
            ("invalid_request_error", Some(param)),
            "{err}"
        );
    }
    let (status, _, err) = v
        .post(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "store": false}),
        )
        .await;
    assert_eq!((status, openai_error(&err).1), (400, Some("store")));
    let r = v
        .http
        .post(format!("{}/v1/chat/completions", v.url))
        .bearer_auth(&v.token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    openai_error(&r.json().await.unwrap());
}

#[tokio::test]
async fn chat_completions_stream_and_not() {
    let v = v1().await;
    // Unknown fields are ignored, as OpenAI does.
    let (status, headers, done) = v
        .post(
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"}],
                "temperature": 0.2, "frobnicate": {"x": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert!(headers.contains_key("x-genstream-stream-id"));
    assert_eq!(done["object"], "chat.completion");
    assert_eq!(done["choices"][0]["finish_reason"], "stop");
    let content = done["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // The stored completion is the same object.
    let id = done["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    let (status, stored) = v.get(&format!("/v1/chat/completions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(stored, done);

    // Streaming with usage and reasoning.
    let (headers, raw) = v
        .stream(v.http.post(format!("{}/v1/chat/completions", v.url)).json(
            &json!({"model": "reasoning", "stream": true,
                    "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": "think"}]}),
        ))
        .await;
    assert_eq!(headers["content-type"], "text/event-stream");
    // The reconnection time rides in the first event's block, never alone: the
    // OpenAI SDKs parse every block with a field as an event with JSON data.
    assert!(
        raw.starts_with(b"retry: 1000\ndata: {"),
        "{}",
        String::from_utf8_lossy(&raw[..raw.len().min(80)])
    );
    let chunks = chat_chunks(&raw);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert!(
        parsed
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let usage = parsed.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let text: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let reasoning: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert!(!reasoning.is_empty());
    let id = parsed[0]["id"].as_str().unwrap();
    let (_, stored) = v.get(&format!("/v1/chat/completions/{id}")).await;
    assert_eq!(stored["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(
        stored["choices"][0]["message"]["reasoning_content"],
        reasoning.as_str()
    );
}

#[tokio::test]
async fn responses_background_resume_cancel_delete() {
    let v = v1().await;
    let (status, headers, created) = v
        .post(
            "/v1/responses",
            json!({"model": "slow", "input": "a long answer", "background": true,
                "instructions": "Be long.", "metadata": {"k": "v"}}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert!(headers.contains_key("x-genstream-stream-id"));
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(["queued", "in_progress"].contains(&created["status"].as_str().unwrap()));
    assert_eq!(created["background"], true);
    assert_eq!(created["instructions"], "Be long.");
    assert_eq!(created["metadata"]["k"], "v");
    let (_, polled) = v.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(polled["status"], "in_progress");

    // Read a prefix, drop, resume after the last sequence number seen: the result is
    // exactly what one read from the start gives.
    let path = format!("/v1/responses/{id}?stream=true");
    let prefix = v.stream_prefix(&path, 8).await;
    let mut buf = prefix.clone();
    let frames = take_frames(&mut buf);
    let last = frames.last().unwrap().data.as_ref().unwrap()["sequence_number"]
        .as_u64()
        .unwrap();
    assert_eq!(last as usize, frames.len() - 1);
    let consumed = prefix.len() - buf.len();
    // Beyond what the stream produced: 400.
    let (status, err) = v.get(&format!("{path}&starting_after=100000")).await;
    assert_eq!(
        (status, openai_error(&err).1),
        (400, Some("starting_after"))
    );

    // Cancel: status cancelled, partial output kept (and saved before the answer).
    let (status, _, cancelled) = v
        .post(&format!("/v1/responses/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let partial = cancelled["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!partial.is_empty());
    let (_, _, again) = v
        .post(&format!("/v1/responses/{id}/cancel"), json!({}))
        .await;
    assert_eq!(again, cancelled, "cancel is idempotent");

    let (_, full) = v.stream(v.http.get(format!("{}{path}", v.url))).await;
    let (_, rest) = v
        .stream(v.http.get(format!("{}{path}&starting_after={last}", v.url)))
        .await;
    // Every connection opens with the `retry:` line, glued to its first event.
    let retry = b"retry: 1000\n";
    assert!(rest.starts_with(retry) && full.starts_with(retry));
    let mut joined = prefix[..consumed].to_vec();
    joined.extend_from_slice(&rest[retry.len()..]);
    assert_eq!(
        String::from_utf8_lossy(&joined),
        String::from_utf8_lossy(&full)
    );
    let mut buf = full.clone();
    let frames = take_frames(&mut buf);
    let end = frames.last().unwrap();
    assert_eq!(end.event.as_deref(), Some("response.incomplete"));
    assert_eq!(
        end.data.as_ref().unwrap()["response"]["status"],
        "cancelled"
    );

    // The next response continues the conversation; its input items are its own.
    let (status, _, next) = v
        .post(
            "/v1/responses",
            json!({"model": "demo", "input": [{"role": "user", "content": "go on"}],
                "previous_response_id": id}),
        )
        .await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(next["status"], "completed");
    assert_eq!(next["previous_response_id"], id.as_str());
    let next_id = next["id"].as_str().unwrap();
    let (_, items) = v.get(&format!("/v1/responses/{next_id}/input_items")).await;
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"].as_array().unwrap().len(), 1, "{items}");
    assert_eq!(items["data"][0]["content"][0]["text"], "go on");

    // Delete: then 404.
    let r = v
        .http
        .delete(format!("{}/v1/responses/{next_id}", v.url))
        .bearer_auth(&v.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["deleted"], true);
    assert_eq!(v.get(&format!("/v1/responses/{next_id}")).await.0, 404);
    assert_eq!(v.get(&format!("/v1/responses/{id}")).await.0, 404);
}

#[tokio::test]
async fn another_users_response_is_forbidden() {
    let v = v1().await;
    let (_, _, created) = v
        .post("/v1/responses", json!({"model": "demo", "input": "hi"}))
        .await;
    assert_eq!(created["status"], "completed", "{created}");
    assert!(
        !created["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    let r = v
        .http
        .get(format!(
            "{}/v1/responses/{}",
            v.url,
            created["id"].as_str().unwrap()
        ))
        .bearer_auth(token("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(openai_error(&r.json().await.unwrap()).0, "permission_error");
}

/// Several readers of one response at once (sharing one projection) and a read after
/// the job ended (a projection made again) get the same bytes.
#[tokio::test]
async fn concurrent_readers_of_one_response_read_the_same() {
    let v = v1().await;
    let (_, _, created) = v
        .post(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "background": true}),
        )
        .await;
    let path = format!(
        "{}/v1/responses/{}?stream=true",
        v.url,
        created["id"].as_str().unwrap()
    );
    let reads = futures::future::join_all((0..4).map(|_| v.stream(v.http.get(&path)))).await;
    let first = &reads[0].1;
    assert!(first.ends_with(b"\n\n") && !first.is_empty());
    for (_, body) in &reads[1..] {
        assert_eq!(body, first);
    }
    let (_, again) = v.stream(v.http.get(&path)).await;
    assert_eq!(&again, first);
}

/// A job that fails: the non-streaming answer is an error in OpenAI's shape (502 for an
/// upstream failure); the stream ends with OpenAI's error frame and `[DONE]`; a
/// response's status is `failed` with genstream's code.
#[tokio::test]
async fn a_failed_job_is_an_error_in_openai_terms() {
    let mut fails = common::demo(
        "fails",
        json!({"tokens": 10, "token_delay": "1ms", "behavior": "fail_before_stream"}),
    );
    fails.retry.max_retries = 0;
    let app = test_app(vec![fails]);
    let served = Served::start(app.router).await;
    let v = V1 {
        url: served.url.clone(),
        token: token("alice"),
        http: reqwest::Client::new(),
        _served: served,
    };
    let body = json!({"model": "fails", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, err) = v.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 502, "{err}");
    assert_eq!(openai_error(&err).0, "server_error");
    assert_eq!(err["error"]["code"], "upstream_error");

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, raw) = v
        .stream(
            v.http
                .post(format!("{}/v1/chat/completions", v.url))
                .json(&streamed),
        )
        .await;
    let chunks = chat_chunks(&raw);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&chunks[chunks.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_error", "{error}");

    let (status, _, failed) = v
        .post("/v1/responses", json!({"model": "fails", "input": "hi"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "upstream_error");
}

/// One job, started natively, watched at once over the native stream and the Responses
/// stream, then read as a chat completion: the same text and usage everywhere (every
/// protocol is a view of any job: its ids are the stream id).
#[tokio::test]
async fn one_job_watched_natively_and_over_openai_protocols() {
    let v = v1().await;
    let (status, _, started) = v
        .post("/api/chat", json!({"text": "hello", "model": "reasoning"}))
        .await;
    assert_eq!(status, 200, "{started}");
    let sid = started["streamId"].as_str().unwrap().to_owned();
    let hex: String = sid.chars().filter(char::is_ascii_alphanumeric).collect();
    let native = v.stream(v.http.get(format!("{}/api/chat/stream/{sid}", v.url)));
    let responses = v.stream(
        v.http
            .get(format!("{}/v1/responses/resp_{hex}?stream=true", v.url)),
    );
    let ((_, native), (_, responses)) = tokio::join!(native, responses);

    let mut buf = native;
    let frames = take_frames(&mut buf);
    let end = frames.last().unwrap();
    assert_eq!(end.event.as_deref(), Some("final"));
    let end = end.data.as_ref().unwrap();
    let text = end["data"]["responseMessage"]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let output_tokens = end["data"]["usage"]["outputTokens"].as_u64().unwrap();

    let mut buf = responses;
    let events = take_frames(&mut buf);
    let deltas: String = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("response.output_text.delta"))
        .map(|e| {
            e.data.as_ref().unwrap()["delta"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(deltas, text);
    let completed = events.last().unwrap().data.as_ref().unwrap();
    assert_eq!(completed["type"], "response.completed");
    assert_eq!(
        completed["response"]["usage"]["output_tokens"],
        output_tokens
    );

    let (status, completion) = v.get(&format!("/v1/chat/completions/chatcmpl-{hex}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        text.as_str()
    );
    assert_eq!(completion["usage"]["completion_tokens"], output_tokens);
}
