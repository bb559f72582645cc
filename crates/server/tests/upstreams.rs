//! The real upstream providers over real HTTP, end to end: an in-process server built by
//! `serve::build_state` from a `Config` whose `[providers.mock]` points at the mock
//! upstream (OpenAI Chat Completions or Anthropic Messages), driven through its HTTP
//! API. Each test asserts what a client sees (the event log over SSE, the abort
//! answer), what is persisted, and what the upstream received — for both providers
//! wherever the scenario applies.
//!
//! Covered: every retryable status (with `Retry-After` seconds, HTTP date and
//! `retry-after-ms`) and the non-retryable ones; connection refused; first-byte and
//! idle-gap timeouts; a connection dropped mid-stream, a body closed before its
//! terminator, malformed data, a mid-stream `overloaded_error` — each retried with the
//! failed attempt's steps discarded, so the answer is exactly the successful attempt's;
//! a `Retry-After` beyond the ceiling; abort during a retry wait; the tool loop with
//! parallel calls whose arguments are split inside JSON strings (built-in and HTTP
//! tools), a retry after tool arguments streamed, the iteration cap, abort during a slow
//! HTTP tool, and the next turn of each, which the mock's history validation (every
//! tool call followed by its result) accepts; a tool the job was not given; Anthropic
//! extended thinking through a tool loop; keep-alives that outlast the timeouts; a
//! saved call without output; the demo model's tool behaviour.
//!
//! Exact delays are asserted at the engine level with paused time (engine
//! `tests/agent.rs`); here time bounds are loose so the suite does not flake. Retry
//! waits are kept small (`base` 20 ms, `cap` 200 ms) and so are the timeouts
//! (`first_byte` 1200 ms, `idle` 800 ms: short, with room for a loaded 2-core machine).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use futures::future::join_all;
use genstream_mock_upstream::MockUpstream;
use genstream_server::{AppState, Config};
use genstream_test_support::{Served, unused_addr};
use serde_json::{Value, json};

use common::take_frames;

const SECRET: &str = "upstreams-test-secret-0123456789abcdef";
/// What the `echo` scenario answers with: the user's text.
const TEXT: &str = "alpha beta gamma delta epsilon zeta eta theta";
/// How long any wait for an event may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);
/// The providers' first-byte and idle-gap timeouts: short, yet long enough that a
/// loaded 2-core machine does not trip them by mistake.
const FIRST_BYTE_MS: u64 = 1200;
const IDLE_MS: u64 = 800;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    OpenAi,
    Anthropic,
}

const KINDS: [Kind; 2] = [Kind::OpenAi, Kind::Anthropic];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::OpenAi => "openai",
            Kind::Anthropic => "anthropic",
        }
    }

    /// The recorded text answer replayed by `fixture:`.
    fn text_fixture(self) -> &'static str {
        match self {
            Kind::OpenAi => "fixture:openai/chat-text-usage.sse",
            Kind::Anthropic => "fixture:anthropic/messages-text.sse",
        }
    }

    /// The id the mock gives call `j` of tool turn `t`.
    fn call_id(self, turn: usize, j: usize) -> String {
        match self {
            Kind::OpenAi => format!("call_mock_{turn}_{j}"),
            Kind::Anthropic => format!("toolu_mock_{turn}_{j}"),
        }
    }
}

/// A provider section: small retry waits and timeouts, and a `ceiling` of `ceiling_ms`.
fn provider(kind: Kind, base_url: &str, ceiling_ms: u64) -> Value {
    json!({
        "kind": kind.name(),
        "base_url": base_url,
        "retry": {"max_retries": 3, "base": "20ms", "cap": "200ms",
            "ceiling": format!("{ceiling_ms}ms")},
        "timeouts": {"connect": "1s", "first_byte": format!("{FIRST_BYTE_MS}ms"),
            "idle": format!("{IDLE_MS}ms")},
    })
}

/// A `[[models]]` entry named after its upstream model string, on provider `mock`.
fn model(upstream: &str, tools: &[&str]) -> Value {
    json!({"name": upstream, "provider": "mock", "tools": tools, "options": {"model": upstream}})
}

/// A config serving `models` from `providers`, with the HTTP `tools`.
fn config(providers: Value, models: Vec<Value>, tools: Vec<Value>, jobs: Value) -> Value {
    json!({
        "bind": "127.0.0.1:0",
        "store": "memory",
        "database": "sqlite::memory:",
        "auth": {"jwt_secret": SECRET},
        // Many jobs of one user run at once here.
        "limits": {"concurrent_per_user": 0, "messages_per_user_per_minute": 0,
            "messages_per_ip_per_minute": 0},
        "jobs": jobs,
        "providers": providers,
        "models": models,
        "tools": tools,
    })
}

/// The usual set-up: provider `mock` of `kind` on `mock`, ceiling 30 s.
fn mock_config(kind: Kind, mock: &MockUpstream, models: Vec<Value>) -> Value {
    config(
        json!({"mock": provider(kind, &mock.base_url(), 30_000)}),
        models,
        Vec::new(),
        json!({}),
    )
}

/// One event of a job's log.
#[derive(Clone, Debug)]
struct Ev {
    seq: u64,
    event: String,
    data: Value,
}

/// A server on a local port, built from a config exactly as `serve` builds it.
struct Server {
    url: String,
    state: AppState,
    token: String,
    http: reqwest::Client,
    _served: Served,
}

/// A model that makes the engine estimate a usage: an attempt closed mid-stream.
const WARM_UP: &str = "closemid:1:echo?delay_ms=1";

/// Serves `config`. With a `mock` provider, first runs one job on [`WARM_UP`]: the
/// first usage estimate of a process freezes the runtime for about a second (see
/// `the_first_usage_estimate_does_not_stall_the_runtime`), which would trip the idle
/// timeout of whatever job streams at that moment, so it is paid before the test.
async fn serve(mut config: Value) -> Server {
    let warm_up = config["providers"].get("mock").is_some();
    if warm_up {
        config["models"]
            .as_array_mut()
            .unwrap()
            .push(model(WARM_UP, &[]));
    }
    let server = serve_exactly(config).await;
    if warm_up {
        let (_, events) = server.run(WARM_UP, TEXT).await;
        assert_eq!(
            final_of(&events, "complete")["responseMessage"]["text"],
            TEXT
        );
    }
    server
}

/// Serves `config` as given.
async fn serve_exactly(config: Value) -> Server {
    let config: Config = serde_json::from_value(config).expect("config");
    let (state, generated) = genstream_server::serve::build_state(&config)
        .await
        .expect("build_state");
    assert!(!generated, "the secret is configured");
    let served = Served::start(genstream_server::app(
        state.clone(),
        config.http.max_body_bytes,
    ))
    .await;
    let token = state.auth.mint("alice", Duration::from_secs(600)).unwrap();
    Server {
        url: served.url.clone(),
        state,
        token,
        http: reqwest::Client::new(),
        _served: served,
    }
}

/// A started chat turn.
#[derive(Clone, Debug)]
struct Turn {
    stream_id: String,
    conversation_id: String,
    response_id: String,
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// Starts a turn; `extra` may add `conversationId`, `parentMessageId`, `tools`.
    async fn start(&self, model: &str, text: &str, extra: Value) -> Turn {
        let mut body = json!({"text": text, "model": model});
        if let Value::Object(extra) = extra {
            body.as_object_mut().unwrap().extend(extra);
        }
        let (status, started) = self.post("/api/chat", body).await;
        assert_eq!(status, 200, "{started}");
        Turn {
            stream_id: started["streamId"].as_str().unwrap().to_owned(),
            conversation_id: started["conversationId"].as_str().unwrap().to_owned(),
            response_id: started["responseMessageId"].as_str().unwrap().to_owned(),
        }
    }

    /// The next turn of `turn`'s conversation, answering its response.
    async fn follow_up(&self, turn: &Turn, model: &str, text: &str) -> Turn {
        self.start(
            model,
            text,
            json!({"conversationId": turn.conversation_id, "parentMessageId": turn.response_id}),
        )
        .await
    }

    async fn subscribe(&self, stream_id: &str) -> Sub {
        let resp = self
            .http
            .get(format!("{}/api/chat/stream/{stream_id}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        Sub {
            resp,
            buf: Vec::new(),
            queue: VecDeque::new(),
            done: false,
        }
    }

    /// The whole log of a job, once it ended.
    async fn events(&self, stream_id: &str) -> Vec<Ev> {
        self.subscribe(stream_id).await.rest().await
    }

    /// The `resumeState` of a `?resume=true` stream's `sync` frame.
    async fn snapshot(&self, stream_id: &str) -> Value {
        let resp = self
            .http
            .get(format!(
                "{}/api/chat/stream/{stream_id}?resume=true",
                self.url
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let body = tokio::time::timeout(PATIENCE, resp.bytes())
            .await
            .unwrap()
            .unwrap();
        let mut buf = body.to_vec();
        let frames = take_frames(&mut buf);
        let sync = frames
            .iter()
            .find(|f| f.event.as_deref() == Some("sync"))
            .expect("a sync frame");
        sync.data.as_ref().unwrap()["resumeState"].clone()
    }

    /// Starts a turn and reads its log to the end.
    async fn run(&self, model: &str, text: &str) -> (Turn, Vec<Ev>) {
        let turn = self.start(model, text, json!({})).await;
        let events = self.events(&turn.stream_id).await;
        (turn, events)
    }

    /// The persisted message `message_id` of `conversation_id`.
    async fn persisted(&self, conversation_id: &str, message_id: &str) -> Value {
        let all = self
            .get(&format!("/api/conversations/{conversation_id}/messages"))
            .await;
        all["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["messageId"] == message_id)
            .cloned()
            .unwrap_or_else(|| panic!("message {message_id} not persisted: {all}"))
    }

    /// Aborts a job; returns how long the answer took and the answer.
    async fn abort(&self, stream_id: &str) -> (Duration, Value) {
        let started = Instant::now();
        let (status, body) = self
            .post("/api/chat/abort", json!({"streamId": stream_id}))
            .await;
        assert_eq!(status, 200, "{body}");
        (started.elapsed(), body)
    }
}

/// An open SSE stream of one job.
struct Sub {
    resp: reqwest::Response,
    buf: Vec<u8>,
    queue: VecDeque<Ev>,
    done: bool,
}

impl Sub {
    async fn next(&mut self) -> Option<Ev> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match tokio::time::timeout(PATIENCE, self.resp.chunk()).await {
                Ok(Ok(Some(bytes))) => {
                    self.buf.extend_from_slice(&bytes);
                    for frame in take_frames(&mut self.buf) {
                        if frame.comment {
                            continue;
                        }
                        let Some(data) = frame.data else { continue };
                        self.queue.push_back(Ev {
                            seq: data["seq"].as_u64().unwrap(),
                            event: data["event"].as_str().unwrap().to_owned(),
                            data: data["data"].clone(),
                        });
                    }
                }
                Ok(Ok(None)) => self.done = true,
                Ok(Err(e)) => panic!("stream broke: {e}"),
                Err(_) => panic!("no event within {PATIENCE:?}"),
            }
        }
    }

    /// The events up to and including the first that `pred` accepts.
    async fn until(&mut self, pred: impl Fn(&Ev) -> bool) -> Vec<Ev> {
        let mut out = Vec::new();
        loop {
            let ev = self
                .next()
                .await
                .expect("the log ended before the awaited event");
            let hit = pred(&ev);
            out.push(ev);
            if hit {
                return out;
            }
        }
    }

    /// Every event to the end of the log; the last must be terminal.
    async fn rest(mut self) -> Vec<Ev> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            out.push(ev);
        }
        let last = out.last().expect("an empty log");
        assert!(
            matches!(last.event.as_str(), "final" | "error"),
            "the stream ended without a terminal event: {out:?}"
        );
        out
    }
}

/// The data of every `name` event.
fn of<'a>(events: &'a [Ev], name: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e.event == name)
        .map(|e| &e.data)
        .collect()
}

fn last(events: &[Ev]) -> &Ev {
    events.last().unwrap()
}

/// The `final` event's data, which must end the log with `status`.
fn final_of<'a>(events: &'a [Ev], status: &str) -> &'a Value {
    let end = last(events);
    assert_eq!(end.event, "final", "{:?}", end.data);
    assert_eq!(end.data["status"], status, "{:?}", end.data);
    &end.data
}

/// The `error` event's data, which must end the log.
fn error_of(events: &[Ev]) -> &Value {
    let end = last(events);
    assert_eq!(end.event, "error", "{:?}", end.data);
    &end.data
}

/// Every step id a `retry` event discards.
fn discarded(events: &[Ev]) -> HashSet<String> {
    of(events, "retry")
        .iter()
        .flat_map(|r| r["discardStepIds"].as_array().unwrap().iter())
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The text deltas of steps no retry discarded, concatenated.
fn visible_text(events: &[Ev]) -> String {
    let dropped = discarded(events);
    of(events, "on_message_delta")
        .iter()
        .filter(|d| !dropped.contains(d["id"].as_str().unwrap()))
        .flat_map(|d| d["delta"]["content"].as_array().unwrap().iter())
        .filter_map(|p| p["text"].as_str())
        .collect()
}

/// Every text delta, discarded or not, concatenated.
fn streamed_text(events: &[Ev]) -> String {
    of(events, "on_message_delta")
        .iter()
        .flat_map(|d| d["delta"]["content"].as_array().unwrap().iter())
        .filter_map(|p| p["text"].as_str())
        .collect()
}

/// Ids of the steps created after `from` (exclusive) and before `to` (exclusive).
fn steps_between(events: &[Ev], from: u64, to: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "on_run_step" && e.seq > from && e.seq < to)
        .map(|e| e.data["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Checks every `retry` event's `discardStepIds`: exactly the steps its failed attempt
/// created (those after the previous retry). Returns the retry events.
fn check_discards(events: &[Ev]) -> Vec<&Ev> {
    let retries: Vec<&Ev> = events.iter().filter(|e| e.event == "retry").collect();
    let mut from = 0;
    for r in &retries {
        let mut named: Vec<String> = r.data["discardStepIds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let mut created = steps_between(events, from, r.seq);
        named.sort();
        created.sort();
        assert_eq!(named, created, "retry at seq {}: {:?}", r.seq, r.data);
        from = r.seq;
    }
    retries
}

/// The tool calls of a message's content, by id: (name, args, output).
fn tool_calls_of(message: &Value) -> BTreeMap<String, (String, String, Option<String>)> {
    message["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "tool_call")
        .map(|p| {
            let c = &p["tool_call"];
            (
                c["id"].as_str().unwrap().to_owned(),
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["args"].as_str().unwrap().to_owned(),
                    c["output"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

/// Asserts the persisted response of `turn` has `text`, `unfinished` and the same
/// content as `message` (the one in the terminal event or the abort answer).
async fn check_persisted(server: &Server, turn: &Turn, message: &Value, unfinished: bool) {
    let saved = server
        .persisted(&turn.conversation_id, &turn.response_id)
        .await;
    assert_eq!(saved["text"], message["text"], "{saved}");
    assert_eq!(saved["content"], message["content"], "{saved}");
    assert_eq!(saved["unfinished"], unfinished, "{saved}");
}

// ---------------------------------------------------------------------------------
// Statuses
// ---------------------------------------------------------------------------------

/// How a retry's wait must look.
#[derive(Clone, Copy, Debug)]
enum Wait {
    /// Exactly this many milliseconds (the upstream said so).
    Exactly(u64),
    /// Computed: from `base` to `cap`.
    Backoff,
}

async fn retryable_statuses(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let cases: Vec<(String, u32, u16, Wait)> = vec![
        ("flaky:1:429+ra1:echo".into(), 1, 429, Wait::Exactly(1000)),
        ("flaky:2:429+ram150:echo".into(), 2, 429, Wait::Exactly(150)),
        ("flaky:2:429:echo".into(), 2, 429, Wait::Backoff),
        // The date is exactly 1 s after the response's own Date header.
        (
            "flaky:1:503+radate1:echo".into(),
            1,
            503,
            Wait::Exactly(1000),
        ),
        ("flaky:2:500:echo".into(), 2, 500, Wait::Backoff),
        ("flaky:2:503:echo".into(), 2, 503, Wait::Backoff),
        ("flaky:2:529:echo".into(), 2, 529, Wait::Backoff),
        ("flaky:2:408:echo".into(), 2, 408, Wait::Backoff),
        ("flaky:2:409:echo".into(), 2, 409, Wait::Backoff),
        (
            format!("flaky:3:502:{}", kind.text_fixture()),
            3,
            502,
            Wait::Backoff,
        ),
    ];
    let mut models: Vec<Value> = cases.iter().map(|c| model(&c.0, &[])).collect();
    models.push(model(kind.text_fixture(), &[]));
    let server = serve(mock_config(kind, &mock, models)).await;

    let (_, baseline) = server.run(kind.text_fixture(), TEXT).await;
    let recorded_text = final_of(&baseline, "complete")["responseMessage"]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(recorded_text.len() > 20, "{recorded_text}");

    let runs = join_all(cases.iter().map(|(name, n, code, wait)| {
        let server = &server;
        let mock = &mock;
        let expected = if name.contains("fixture:") {
            recorded_text.clone()
        } else {
            TEXT.to_owned()
        };
        async move {
            let t0 = Instant::now();
            let (turn, events) = server.run(name, TEXT).await;
            let took = t0.elapsed();
            let ctx = format!("{kind:?} {name}");
            let retries = check_discards(&events);
            assert_eq!(retries.len(), *n as usize, "{ctx}: {events:?}");
            let mut waited = 0;
            for (i, r) in retries.iter().enumerate() {
                let r = &r.data;
                assert_eq!(r["attempt"], i as u64 + 1, "{ctx}");
                assert_eq!(r["maxAttempts"], 4, "{ctx}");
                let error = r["error"].as_str().unwrap();
                assert!(
                    error.contains(&code.to_string())
                        && error.contains(&format!("mock upstream says {code}")),
                    "{ctx}: {error}"
                );
                let d = r["delayMs"].as_u64().unwrap();
                match wait {
                    Wait::Exactly(ms) => assert_eq!(d, *ms, "{ctx}"),
                    // Equal jitter: from half of base up to cap.
                    Wait::Backoff => assert!((10..=200).contains(&d), "{ctx}: {d}"),
                }
                waited += d;
            }
            assert!(
                took >= Duration::from_millis(waited),
                "{ctx}: {took:?} < {waited} ms"
            );
            let fin = final_of(&events, "complete");
            assert_eq!(fin["responseMessage"]["text"], expected.as_str(), "{ctx}");
            assert_eq!(visible_text(&events), expected, "{ctx}");
            assert_eq!(
                fin["responseMessage"]["content"],
                json!([{"type": "text", "text": expected}]),
                "{ctx}"
            );
            assert_eq!(mock.count(name), n + 1, "{ctx}");
            check_persisted(server, &turn, &fin["responseMessage"], false).await;
        }
    }))
    .await;
    assert_eq!(runs.len(), cases.len());
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_statuses_are_retried_until_the_answer_completes() {
    join_all(KINDS.map(retryable_statuses)).await;
}

async fn non_retryable_statuses(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    // Were any of them retried, the second attempt would succeed.
    let cases = [400u16, 401, 403, 404, 422];
    let names: Vec<String> = cases.iter().map(|c| format!("flaky:1:{c}:echo")).collect();
    let server = serve(mock_config(
        kind,
        &mock,
        names.iter().map(|n| model(n, &[])).collect(),
    ))
    .await;
    join_all(cases.iter().zip(&names).map(|(code, name)| {
        let server = &server;
        let mock = &mock;
        async move {
            let ctx = format!("{kind:?} {name}");
            let (turn, events) = server.run(name, TEXT).await;
            assert!(of(&events, "retry").is_empty(), "{ctx}: {events:?}");
            let error = error_of(&events);
            assert_eq!(error["code"], "upstream_error", "{ctx}");
            let message = error["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("HTTP {code}"))
                    && message.contains(&format!("mock upstream says {code}")),
                "{ctx}: {message}"
            );
            assert_eq!(mock.count(name), 1, "{ctx}: exactly one upstream request");
            let saved = server
                .persisted(&turn.conversation_id, &turn.response_id)
                .await;
            assert_eq!(saved["error"], true, "{ctx}: {saved}");
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_statuses_fail_at_once_quoting_the_upstream() {
    join_all(KINDS.map(non_retryable_statuses)).await;
}

async fn retry_after_beyond_the_ceiling(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let names = ["flaky:1:429+ra5:echo", "flaky:1:503+ram5000:echo"];
    let server = serve(config(
        json!({"mock": provider(kind, &mock.base_url(), 1000)}),
        names.iter().map(|n| model(n, &[])).collect(),
        Vec::new(),
        json!({}),
    ))
    .await;
    for name in names {
        let ctx = format!("{kind:?} {name}");
        let t0 = Instant::now();
        let (_, events) = server.run(name, TEXT).await;
        assert!(t0.elapsed() < Duration::from_secs(3), "{ctx}: it waited");
        assert!(of(&events, "retry").is_empty(), "{ctx}");
        let error = error_of(&events);
        assert_eq!(error["code"], "upstream_error");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("asked to wait 5 s") && message.contains("1 s allowed"),
            "{ctx}: {message}"
        );
        assert_eq!(mock.count(name), 1, "{ctx}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_ceiling_fails_saying_how_long() {
    join_all(KINDS.map(retry_after_beyond_the_ceiling)).await;
}

// ---------------------------------------------------------------------------------
// Transport failures
// ---------------------------------------------------------------------------------

async fn transport_failures(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    // (model, what the retry's error says, whether the failed attempt streamed text,
    // how long the attempt must have lasted)
    let cases: [(&str, &[&str], bool, u64); 7] = [
        ("dropmid:1:echo", &["broke off"], true, 0),
        // Everything but the terminator: for OpenAI a finish_reason without [DONE].
        (
            "noend:1:echo",
            match kind {
                Kind::OpenAi => &["ended without [DONE] (after a finish_reason)"],
                Kind::Anthropic => &["message_stop"],
            },
            true,
            0,
        ),
        (
            "closemid:1:echo",
            match kind {
                Kind::OpenAi => &["ended without [DONE]"],
                Kind::Anthropic => &["message_stop"],
            },
            true,
            0,
        ),
        ("malformedmid:1:echo", &["{not json"], true, 0),
        (
            "overloaded:1:echo",
            &["Overloaded", "overloaded_error"],
            true,
            0,
        ),
        ("stall:1:echo", &["idle gap"], true, IDLE_MS),
        ("nobyte:1:echo", &["first byte"], false, FIRST_BYTE_MS),
    ];
    let server = serve(mock_config(
        kind,
        &mock,
        cases.iter().map(|c| model(c.0, &[])).collect(),
    ))
    .await;
    join_all(cases.iter().map(|(name, says, streamed, min_ms)| {
        let server = &server;
        let mock = &mock;
        async move {
            let ctx = format!("{kind:?} {name}");
            let t0 = Instant::now();
            let (turn, events) = server.run(name, TEXT).await;
            assert!(
                t0.elapsed() >= Duration::from_millis(*min_ms),
                "{ctx}: {:?}",
                t0.elapsed()
            );
            let retries = check_discards(&events);
            assert_eq!(retries.len(), 1, "{ctx}: {events:?}");
            let retry = &retries[0].data;
            let error = retry["error"].as_str().unwrap();
            assert!(says.iter().all(|s| error.contains(s)), "{ctx}: {error}");
            let dropped = retry["discardStepIds"].as_array().unwrap();
            assert_eq!(!dropped.is_empty(), *streamed, "{ctx}: {retry}");
            // The failed attempt's words reached the log, and were discarded.
            let streamed_text = streamed_text(&events);
            if *streamed {
                assert!(
                    streamed_text.len() > TEXT.len() && streamed_text.ends_with(TEXT),
                    "{ctx}: {streamed_text:?}"
                );
            } else {
                assert_eq!(streamed_text, TEXT, "{ctx}");
            }
            let fin = final_of(&events, "complete");
            assert_eq!(fin["responseMessage"]["text"], TEXT, "{ctx}");
            assert_eq!(
                fin["responseMessage"]["content"],
                json!([{"type": "text", "text": TEXT}]),
                "{ctx}: no duplicated prefix"
            );
            assert_eq!(visible_text(&events), TEXT, "{ctx}");
            // The aggregator folds the discarded steps out too.
            let state = server.snapshot(&turn.stream_id).await;
            assert_eq!(
                state["aggregatedContent"],
                json!([{"type": "text", "text": TEXT}]),
                "{ctx}: {state}"
            );
            assert_eq!(mock.count(name), 2, "{ctx}");
            check_persisted(server, &turn, &fin["responseMessage"], false).await;
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_failures_and_timeouts_are_retried_without_duplicated_text() {
    join_all(KINDS.map(transport_failures)).await;
}

/// A failed attempt that streamed text gets an estimated usage record; the first
/// estimate of a process must not stop every other job, stream and request meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_usage_estimate_does_not_stall_the_runtime() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mock = genstream_mock_upstream::spawn().await;
    // A few jobs failing at once, as on a busy server when an upstream hiccups.
    let names: Vec<String> = (0..4)
        .map(|i| format!("dropmid:1:echo?delay_ms={i}"))
        .collect();
    let server = serve_exactly(mock_config(
        Kind::OpenAi,
        &mock,
        names.iter().map(|n| model(n, &[])).collect(),
    ))
    .await;
    // The longest gap between two ticks of a 5 ms heartbeat.
    let origin = Instant::now();
    let worst = Arc::new(AtomicU64::new(0));
    let heartbeat = {
        let worst = worst.clone();
        tokio::spawn(async move {
            let mut last = origin.elapsed();
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = origin.elapsed();
                worst.fetch_max((now - last).as_millis() as u64, Ordering::SeqCst);
                last = now;
            }
        })
    };
    let runs = join_all(names.iter().map(|n| server.run(n, TEXT))).await;
    heartbeat.abort();
    for (_, events) in &runs {
        final_of(events, "complete");
        assert!(
            of(events, "usage")[0]["estimated"] == true,
            "the failed attempt's usage is an estimate"
        );
    }
    let worst = worst.load(Ordering::SeqCst);
    assert!(worst < 250, "the runtime stood still for {worst} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_then_fails() {
    // A port nobody listens on.
    let down = format!("http://{}/v1", unused_addr());
    let server = serve(config(
        json!({
            "down-openai": provider(Kind::OpenAi, &down, 30_000),
            "down-anthropic": provider(Kind::Anthropic, &down, 30_000),
        }),
        vec![
            json!({"name": "oa", "provider": "down-openai", "options": {"model": "echo"}}),
            json!({"name": "an", "provider": "down-anthropic", "options": {"model": "echo"}}),
        ],
        Vec::new(),
        json!({}),
    ))
    .await;
    for (name, provider) in [("oa", "down-openai"), ("an", "down-anthropic")] {
        let (turn, events) = server.run(name, TEXT).await;
        let retries = check_discards(&events);
        assert_eq!(retries.len(), 3, "{name}: {events:?}");
        for r in &retries {
            let error = r.data["error"].as_str().unwrap();
            assert!(error.starts_with(&format!("{provider}: ")), "{error}");
            assert!(
                error.to_lowercase().contains("connect") || error.contains("refused"),
                "{error}"
            );
            assert!(r.data["discardStepIds"].as_array().unwrap().is_empty());
        }
        let error = error_of(&events);
        assert_eq!(error["code"], "upstream_error");
        assert!(error["message"].as_str().unwrap().starts_with(provider));
        let saved = server
            .persisted(&turn.conversation_id, &turn.response_id)
            .await;
        assert_eq!(saved["text"], "");
    }
}

// ---------------------------------------------------------------------------------
// Abort during a retry wait
// ---------------------------------------------------------------------------------

async fn abort_during_retry_wait(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    // A dropped stream (text streamed, then discarded), then a 429 asking for 20 s:
    // far beyond this test's patience, below the 30 s ceiling.
    let text_model = "dropmid:1:flaky:1:429+ra20:echo";
    // A tool round, then the 429: the partial answer holds the tool calls.
    let tool_model = "pass:1:flaky:1:429+ra20:tools";
    let server = serve(mock_config(
        kind,
        &mock,
        vec![model(text_model, &[]), model(tool_model, &["calculator"])],
    ))
    .await;

    // Text: the answer saved is empty, without the discarded words.
    let turn = server.start(text_model, TEXT, json!({})).await;
    let mut sub = server.subscribe(&turn.stream_id).await;
    let seen = sub
        .until(|e| e.event == "retry" && e.data["delayMs"] == 20_000)
        .await;
    assert!(!streamed_text(&seen).is_empty(), "{kind:?}: {seen:?}");
    let (took, aborted) = server.abort(&turn.stream_id).await;
    assert!(
        took < Duration::from_secs(1),
        "{kind:?}: abort took {took:?}"
    );
    let message = &aborted["responseMessage"];
    assert_eq!(message["unfinished"], true, "{aborted}");
    assert_eq!(
        message["text"], "",
        "{kind:?}: discarded text came back: {aborted}"
    );
    assert_eq!(message["content"], json!([]), "{aborted}");
    let events = sub.rest().await;
    let fin = final_of(&events, "aborted");
    assert_eq!(&fin["responseMessage"], message);
    check_persisted(&server, &turn, message, true).await;
    assert_eq!(mock.count(text_model), 2, "no attempt after the abort");

    // Tools: the partial answer holds both calls with their results.
    let turn = server.start(tool_model, "compute", json!({})).await;
    let mut sub = server.subscribe(&turn.stream_id).await;
    sub.until(|e| e.event == "retry").await;
    let (took, aborted) = server.abort(&turn.stream_id).await;
    assert!(
        took < Duration::from_secs(1),
        "{kind:?}: abort took {took:?}"
    );
    let message = &aborted["responseMessage"];
    let calls = tool_calls_of(message);
    let outputs: Vec<Option<&str>> = calls.values().map(|c| c.2.as_deref()).collect();
    assert_eq!(outputs, [Some("42"), Some("49")], "{kind:?}: {message}");
    final_of(&sub.rest().await, "aborted");
    check_persisted(&server, &turn, message, true).await;

    // The next turn builds on it, and the upstream accepts its history.
    let next = server.follow_up(&turn, tool_model, "and again").await;
    let events = server.events(&next.stream_id).await;
    let fin = final_of(&events, "complete");
    assert_eq!(
        fin["responseMessage"]["text"], "The tools said: 48; 56.",
        "{kind:?}"
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let first = &mock.requests_for(tool_model)[2];
    for j in 0..2 {
        assert!(first.to_string().contains(&kind.call_id(0, j)), "{first}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_a_retry_wait_answers_at_once_with_the_partial_answer() {
    join_all(KINDS.map(abort_during_retry_wait)).await;
}

// ---------------------------------------------------------------------------------
// The tool loop
// ---------------------------------------------------------------------------------

/// A tiny HTTP tool: `POST /lookup {"city"}` answers `weather in <city>: sunny`;
/// `POST /slow` reports the call on `hits` and then never answers. Served until the
/// third element is dropped.
async fn tool_endpoint() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>, Served) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route(
            "/lookup",
            post(|Json(args): Json<Value>| async move {
                format!("weather in {}: sunny", args["city"].as_str().unwrap_or("?"))
            }),
        )
        .route(
            "/slow",
            post(move |Json(args): Json<Value>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(args);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "too late".to_owned()
                }
            }),
        );
    let served = Served::start(app).await;
    (served.url.clone(), rx, served)
}

fn http_tool(name: &str, url: &str) -> Value {
    json!({
        "name": name,
        "description": format!("The {name} tool"),
        "url": url,
        "timeout": "30s",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]},
    })
}

/// The arguments the mock gives call `j` of tool turn `t`.
fn expected_args(name: &str, turn: usize, j: usize) -> String {
    if name == "calculator" {
        json!({"expression": format!("{} * {}", 6 + j, 7 + turn)}).to_string()
    } else {
        json!({"city": format!("city-{turn}-{j}")}).to_string()
    }
}

/// Checks one tool round of a log: `names[j]` called with the mock's arguments for turn
/// `turn`, streamed as many fragments, each completed with `outputs[j]`.
fn check_tool_round(kind: Kind, events: &[Ev], turn: usize, names: &[&str], outputs: &[&str]) {
    let ctx = format!("{kind:?} turn {turn}");
    let dropped = discarded(events);
    let steps: Vec<&Value> = of(events, "on_run_step")
        .into_iter()
        .filter(|s| s["type"] == "tool_calls" && !dropped.contains(s["id"].as_str().unwrap()))
        .collect();
    assert_eq!(steps.len(), names.len(), "{ctx}: {steps:?}");
    for (j, step) in steps.iter().enumerate() {
        let step_id = step["id"].as_str().unwrap();
        let call = &step["stepDetails"]["tool_calls"][0];
        assert_eq!(call["id"], kind.call_id(turn, j), "{ctx}");
        assert_eq!(call["name"], names[j], "{ctx}");
        let fragments: Vec<String> = of(events, "on_run_step_delta")
            .iter()
            .filter(|d| d["id"] == step_id)
            .flat_map(|d| d["delta"]["tool_calls"].as_array().unwrap().iter())
            .map(|c| c["args"].as_str().unwrap().to_owned())
            .collect();
        let args = expected_args(names[j], turn, j);
        assert_eq!(fragments.concat(), args, "{ctx}: call {j}");
        // Split in pieces of 4 characters, so inside keys and string values.
        assert!(
            fragments.iter().filter(|f| !f.is_empty()).count() >= args.len() / 4,
            "{ctx}: {fragments:?}"
        );
        let done: Vec<&Value> = of(events, "on_run_step_completed")
            .into_iter()
            .filter(|c| c["result"]["id"] == step_id)
            .collect();
        assert_eq!(done.len(), 1, "{ctx}: call {j}");
        let tc = &done[0]["result"]["tool_call"];
        assert_eq!(tc["output"], outputs[j], "{ctx}: call {j}");
        assert_eq!(tc["args"], args.as_str(), "{ctx}: call {j}");
        assert_eq!(tc["id"], kind.call_id(turn, j), "{ctx}");
    }
}

/// Asserts that `request` (a body the mock received) carries every call of tool turn
/// `turn` with its arguments, each followed by its result.
fn check_history(kind: Kind, request: &Value, turn: usize, names: &[&str], outputs: &[&str]) {
    let messages = request["messages"].as_array().unwrap();
    for (j, name) in names.iter().enumerate() {
        let id = kind.call_id(turn, j);
        let args: Value = serde_json::from_str(&expected_args(name, turn, j)).unwrap();
        let (call_at, result_at) = match kind {
            Kind::OpenAi => {
                let call_at = messages
                    .iter()
                    .position(|m| {
                        m["tool_calls"].as_array().is_some_and(|calls| {
                            calls.iter().any(|c| {
                                c["id"] == id.as_str()
                                    && c["function"]["name"] == *name
                                    && serde_json::from_str::<Value>(
                                        c["function"]["arguments"].as_str().unwrap(),
                                    )
                                    .unwrap()
                                        == args
                            })
                        })
                    })
                    .unwrap_or_else(|| panic!("{id} not sent: {request}"));
                let result_at = messages
                    .iter()
                    .position(|m| {
                        m["role"] == "tool"
                            && m["tool_call_id"] == id.as_str()
                            && m["content"] == outputs[j]
                    })
                    .unwrap_or_else(|| panic!("result of {id} not sent: {request}"));
                (call_at, result_at)
            }
            Kind::Anthropic => {
                let has = |m: &Value, pred: &dyn Fn(&Value) -> bool| {
                    m["content"]
                        .as_array()
                        .is_some_and(|blocks| blocks.iter().any(pred))
                };
                let call_at = messages
                    .iter()
                    .position(|m| {
                        has(m, &|b| {
                            b["type"] == "tool_use"
                                && b["id"] == id.as_str()
                                && b["name"] == *name
                                && b["input"] == args
                        })
                    })
                    .unwrap_or_else(|| panic!("{id} not sent: {request}"));
                let result_at = messages
                    .iter()
                    .position(|m| {
                        has(m, &|b| {
                            b["type"] == "tool_result"
                                && b["tool_use_id"] == id.as_str()
                                && b["content"] == outputs[j]
                        })
                    })
                    .unwrap_or_else(|| panic!("result of {id} not sent: {request}"));
                assert_eq!(result_at, call_at + 1, "{request}");
                (call_at, result_at)
            }
        };
        assert!(call_at < result_at, "{request}");
    }
}

async fn tool_loop(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let (tool_url, _hits, _endpoint) = tool_endpoint().await;
    let retried = "dropmid:1:tools";
    let server = serve(config(
        json!({"mock": provider(kind, &mock.base_url(), 30_000)}),
        vec![
            model("tools", &["calculator", "lookup"]),
            model(retried, &["calculator"]),
        ],
        vec![http_tool("lookup", &format!("{tool_url}/lookup"))],
        json!({}),
    ))
    .await;
    let names = ["calculator", "calculator", "lookup", "lookup"];
    let outputs = [
        "42",
        "49",
        "weather in city-0-2: sunny",
        "weather in city-0-3: sunny",
    ];

    let (turn, events) = server.run("tools", "compute things").await;
    assert!(of(&events, "retry").is_empty(), "{events:?}");
    check_tool_round(kind, &events, 0, &names, &outputs);
    // The calls ran before the answer was asked for; the answer came after them.
    let last_done = events
        .iter()
        .filter(|e| e.event == "on_run_step_completed")
        .map(|e| e.seq)
        .max()
        .unwrap();
    let first_text = events
        .iter()
        .find(|e| e.event == "on_message_delta")
        .unwrap()
        .seq;
    assert!(last_done < first_text);
    assert_eq!(
        of(&events, "usage").len(),
        2,
        "one usage record per model call"
    );
    let fin = final_of(&events, "complete");
    assert!(fin.get("reason").is_none(), "{fin}");
    let answer = format!("The tools said: {}.", outputs.join("; "));
    assert_eq!(fin["responseMessage"]["text"], answer.as_str(), "{kind:?}");
    let calls = tool_calls_of(&fin["responseMessage"]);
    assert_eq!(calls.len(), 4);
    for (j, name) in names.iter().enumerate() {
        let (n, args, output) = &calls[&kind.call_id(0, j)];
        assert_eq!(
            (n.as_str(), args.clone(), output.as_deref()),
            (*name, expected_args(name, 0, j), Some(outputs[j]))
        );
    }
    check_persisted(&server, &turn, &fin["responseMessage"], false).await;
    // What the upstream got back: every call, then its result.
    let sent = mock.requests_for("tools");
    assert_eq!(sent.len(), 2);
    check_history(kind, &sent[1], 0, &names, &outputs);

    // The next turn, answering the response: its history is valid upstream.
    let next = server.follow_up(&turn, "tools", "and again").await;
    let events = server.events(&next.stream_id).await;
    let outputs_1 = [
        "48",
        "56",
        "weather in city-1-2: sunny",
        "weather in city-1-3: sunny",
    ];
    check_tool_round(kind, &events, 1, &names, &outputs_1);
    let fin = final_of(&events, "complete");
    assert_eq!(
        fin["responseMessage"]["text"],
        format!("The tools said: {}.", outputs_1.join("; ")).as_str()
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let sent = mock.requests_for("tools");
    assert_eq!(sent.len(), 4);
    check_history(kind, &sent[2], 0, &names, &outputs);
    check_history(kind, &sent[3], 1, &names, &outputs_1);

    // A stream dropped after tool arguments began: the retry's calls stand alone,
    // their arguments are not glued to the failed attempt's.
    let (turn, events) = server.run(retried, "compute").await;
    let retries = check_discards(&events);
    assert_eq!(retries.len(), 1, "{events:?}");
    assert!(
        !retries[0].data["discardStepIds"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    check_tool_round(kind, &events, 0, &names[..2], &outputs[..2]);
    let fin = final_of(&events, "complete");
    assert_eq!(fin["responseMessage"]["text"], "The tools said: 42; 49.");
    assert_eq!(tool_calls_of(&fin["responseMessage"]).len(), 2);
    check_persisted(&server, &turn, &fin["responseMessage"], false).await;
    assert_eq!(mock.count(retried), 3);
    check_history(
        kind,
        &mock.requests_for(retried)[2],
        0,
        &names[..2],
        &outputs[..2],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tool_loop_runs_through_the_real_providers() {
    join_all(KINDS.map(tool_loop)).await;
}

async fn iteration_cap(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let server = serve(config(
        json!({"mock": provider(kind, &mock.base_url(), 30_000)}),
        vec![model("tools-forever", &["calculator"])],
        Vec::new(),
        json!({"max_tool_iterations": 2}),
    ))
    .await;
    let (turn, events) = server.run("tools-forever", "loop").await;
    let fin = final_of(&events, "complete");
    assert_eq!(fin["reason"], "max_tool_iterations", "{fin}");
    assert_eq!(mock.count("tools-forever"), 2);
    let calls = tool_calls_of(&fin["responseMessage"]);
    assert_eq!(calls.len(), 4, "two calls in each of two rounds");
    // The last round's tools did not run: the model would never see their results.
    let not_run = r#"{"error":"not run: max_tool_iterations reached"}"#;
    let outputs: Vec<Option<&str>> = calls.values().map(|c| c.2.as_deref()).collect();
    assert_eq!(
        outputs,
        [Some("42"), Some("49"), Some(not_run), Some(not_run)],
        "{calls:?}"
    );
    assert_eq!(of(&events, "on_run_step_completed").len(), 4);
    check_persisted(&server, &turn, &fin["responseMessage"], false).await;

    let next = server.follow_up(&turn, "tools-forever", "go on").await;
    let events = server.events(&next.stream_id).await;
    assert_eq!(
        final_of(&events, "complete")["reason"],
        "max_tool_iterations"
    );
    assert_eq!(mock.count("tools-forever"), 4);
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let first = &mock.requests_for("tools-forever")[2];
    check_history(kind, first, 0, &["calculator", "calculator"], &["42", "49"]);
    check_history(
        kind,
        first,
        1,
        &["calculator", "calculator"],
        &[not_run, not_run],
    );
    if kind == Kind::Anthropic {
        // Sent as failed results.
        let flagged = first["messages"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["content"].as_array().into_iter().flatten())
            .filter(|b| b["type"] == "tool_result" && b["is_error"] == true)
            .count();
        assert_eq!(flagged, 2, "{first}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_iteration_cap_ends_the_job_and_the_next_turn_is_accepted() {
    join_all(KINDS.map(iteration_cap)).await;
}

async fn abort_during_slow_tool(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let (tool_url, mut hits, _endpoint) = tool_endpoint().await;
    let server = serve(config(
        json!({"mock": provider(kind, &mock.base_url(), 30_000)}),
        vec![model("tools", &["slow"]), model("echo", &[])],
        vec![http_tool("slow", &format!("{tool_url}/slow"))],
        json!({}),
    ))
    .await;
    let turn = server.start("tools", "slowly", json!({})).await;
    let sub = server.subscribe(&turn.stream_id).await;
    // Both calls reached the tool's endpoint.
    for _ in 0..2 {
        tokio::time::timeout(PATIENCE, hits.recv())
            .await
            .expect("the tool was not called")
            .unwrap();
    }
    let (took, aborted) = server.abort(&turn.stream_id).await;
    assert!(
        took < Duration::from_secs(1),
        "{kind:?}: abort took {took:?}"
    );
    let message = &aborted["responseMessage"];
    assert_eq!(message["unfinished"], true);
    let cancelled = r#"{"error":"cancelled"}"#;
    let calls = tool_calls_of(message);
    assert_eq!(calls.len(), 2, "{message}");
    assert!(
        calls.values().all(|c| c.2.as_deref() == Some(cancelled)),
        "{kind:?}: {message}"
    );
    let events = sub.rest().await;
    final_of(&events, "aborted");
    let done = of(&events, "on_run_step_completed");
    assert_eq!(done.len(), 2);
    assert!(
        done.iter()
            .all(|d| d["result"]["tool_call"]["output"] == cancelled)
    );
    check_persisted(&server, &turn, message, true).await;

    // The next turn carries the cancelled results, and the upstream accepts it.
    let next = server.follow_up(&turn, "echo", TEXT).await;
    let events = server.events(&next.stream_id).await;
    assert_eq!(
        final_of(&events, "complete")["responseMessage"]["text"],
        TEXT
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let sent = mock.requests_for("echo");
    assert_eq!(sent.len(), 1);
    let names = ["slow", "slow"];
    check_history(kind, &sent[0], 0, &names, &[cancelled, cancelled]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_a_slow_tool_records_cancelled_and_the_next_turn_is_valid() {
    join_all(KINDS.map(abort_during_slow_tool)).await;
}

async fn next_turn_replays_tool_rounds_in_order(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let server = serve(mock_config(
        kind,
        &mock,
        vec![model("tools", &["calculator"])],
    ))
    .await;
    let (turn, events) = server.run("tools", "compute").await;
    let answer = "The tools said: 42; 49.";
    assert_eq!(
        final_of(&events, "complete")["responseMessage"]["text"],
        answer
    );
    let next = server.follow_up(&turn, "tools", "and again").await;
    final_of(&server.events(&next.stream_id).await, "complete");
    let request = &mock.requests_for("tools")[2];
    let messages = request["messages"].as_array().unwrap();
    let text_of = |m: &Value| match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => String::new(),
    };
    // The first turn as it happened: the calls, their results, then the answer.
    let answer_at = messages
        .iter()
        .position(|m| m["role"] == "assistant" && text_of(m) == answer)
        .unwrap_or_else(|| {
            panic!("{kind:?}: no assistant message with just the answer: {request}")
        });
    let last_result = messages
        .iter()
        .rposition(|m| {
            m["role"] == "tool"
                || m["content"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["type"] == "tool_result"))
        })
        .unwrap();
    assert!(
        answer_at > last_result,
        "{kind:?}: the answer is replayed before the tool results it quotes: {request}"
    );
}

/// The history of a later turn keeps the first turn's order: each model call is its
/// own assistant message (calls, then results, then the final text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_turn_replays_tool_rounds_in_order() {
    join_all(KINDS.map(next_turn_replays_tool_rounds_in_order)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tools_model_answers_with_the_product() {
    let server = serve(config(
        json!({}),
        vec![
            json!({"name": "demo-tools", "provider": "demo", "tools": ["calculator"],
            "options": {"behavior": "tools", "token_delay": "1ms"}}),
        ],
        Vec::new(),
        json!({}),
    ))
    .await;
    let (_, events) = server.run("demo-tools", "multiply something").await;
    let args: String = of(&events, "on_run_step_delta")
        .iter()
        .flat_map(|d| d["delta"]["tool_calls"].as_array().unwrap().iter())
        .map(|c| c["args"].as_str().unwrap())
        .collect();
    let args: Value = serde_json::from_str(&args).unwrap();
    let expression = args["expression"].as_str().unwrap();
    let (a, b) = expression.split_once(" * ").expect(expression);
    let product = a.trim().parse::<u64>().unwrap() * b.trim().parse::<u64>().unwrap();
    let done = of(&events, "on_run_step_completed");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["result"]["tool_call"]["name"], "calculator");
    assert_eq!(
        done[0]["result"]["tool_call"]["output"],
        product.to_string()
    );
    let fin = final_of(&events, "complete");
    assert_eq!(
        fin["responseMessage"]["text"],
        format!("The answer is {product}.")
    );
}

// ---------------------------------------------------------------------------------
// Keep-alives, tools the job was not given, extended thinking, calls without output
// ---------------------------------------------------------------------------------

/// A live upstream that sends only keep-alives for longer than both timeouts —
/// Anthropic's `ping` events, OpenRouter's `: OPENROUTER PROCESSING` comments — before
/// its first event or between two events is waited for, not timed out and retried;
/// the same stretch of silence is a timeout, retried.
async fn keepalives(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    // Three times the idle timeout, twice the first-byte one.
    let quiet = 2 * FIRST_BYTE_MS;
    let cases = [
        (format!("echo?lead_ms={quiet}&keepalive_ms=100"), None),
        (format!("echo?gap_ms={quiet}&keepalive_ms=100"), None),
        (
            format!("echo?lead_ms={quiet}&keepalive_ms=0"),
            Some("first byte"),
        ),
        (
            format!("echo?gap_ms={quiet}&keepalive_ms=0"),
            Some("idle gap"),
        ),
    ];
    let server = serve(mock_config(
        kind,
        &mock,
        cases.iter().map(|c| model(&c.0, &[])).collect(),
    ))
    .await;
    join_all(cases.iter().map(|(name, timeout)| {
        let server = &server;
        async move {
            let ctx = format!("{kind:?} {name}");
            let (_, events) = server.run(name, TEXT).await;
            let retries = check_discards(&events);
            match timeout {
                None => assert!(retries.is_empty(), "{ctx}: {events:?}"),
                Some(says) => {
                    // Every attempt is as quiet: retried until the retries run out.
                    assert_eq!(retries.len(), 3, "{ctx}: {events:?}");
                    let error = retries[0].data["error"].as_str().unwrap();
                    assert!(error.contains(says), "{ctx}: {error}");
                }
            }
            if timeout.is_none() {
                let fin = final_of(&events, "complete");
                assert_eq!(fin["responseMessage"]["text"], TEXT, "{ctx}");
            } else {
                assert_eq!(error_of(&events)["code"], "upstream_error", "{ctx}");
            }
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_are_not_timeouts_but_silence_is() {
    join_all(KINDS.map(keepalives)).await;
}

/// The model calls an HTTP tool the server knows but this job was not given: the call
/// is answered "not available" and the tool's endpoint is never reached.
async fn a_tool_not_given(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let (tool_url, mut hits, _endpoint) = tool_endpoint().await;
    let name = "tools?call=lookup";
    let server = serve(config(
        json!({"mock": provider(kind, &mock.base_url(), 30_000)}),
        vec![
            model(name, &["calculator"]),
            // Another model may use it: the registry holds it.
            model("echo", &["lookup"]),
        ],
        vec![http_tool("lookup", &format!("{tool_url}/slow"))],
        json!({}),
    ))
    .await;
    let (_, events) = server.run(name, "compute").await;
    let not_available = r#"{"error":"tool lookup is not available"}"#;
    let fin = final_of(&events, "complete");
    let calls = tool_calls_of(&fin["responseMessage"]);
    let expected = [
        ("calculator", expected_args("calculator", 0, 0), "42"),
        ("calculator", expected_args("calculator", 0, 1), "49"),
        ("lookup", "{}".to_owned(), not_available),
    ];
    for (j, (name, args, output)) in expected.iter().enumerate() {
        let (n, a, o) = &calls[&kind.call_id(0, j)];
        assert_eq!(
            (n.as_str(), a, o.as_deref()),
            (*name, args, Some(*output)),
            "{kind:?}: call {j}"
        );
    }
    assert_eq!(
        fin["responseMessage"]["text"],
        format!("The tools said: 42; 49; {not_available}."),
        "{kind:?}"
    );
    assert!(
        hits.try_recv().is_err(),
        "{kind:?}: the tool that was not given was called"
    );
    // Only the tools it was given were offered.
    let offered = mock.requests_for(name)[0]["tools"].to_string();
    assert!(!offered.contains("lookup"), "{offered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_the_job_was_not_given_is_never_called() {
    join_all(KINDS.map(a_tool_not_given)).await;
}

/// Anthropic with extended thinking through a whole tool loop, then the next turn:
/// the tool turn's signed thinking block and redacted block go back verbatim at the
/// start of its assistant message, which the mock (like Anthropic) requires before it
/// accepts the tool results — in the loop and from the saved message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_thinking_survives_the_tool_loop_and_the_next_turn() {
    let mock = genstream_mock_upstream::spawn().await;
    let server = serve(mock_config(
        Kind::Anthropic,
        &mock,
        vec![
            json!({"name": "thinker", "provider": "mock", "tools": ["calculator"],
            "options": {"model": "tools", "max_tokens": 4096, "thinking_budget_tokens": 1024}}),
        ],
    ))
    .await;
    let (turn, events) = server.run("thinker", "compute").await;
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let fin = final_of(&events, "complete");
    assert_eq!(fin["responseMessage"]["text"], "The tools said: 42; 49.");
    let content = fin["responseMessage"]["content"].as_array().unwrap();
    assert_eq!(content[0]["type"], "think", "{content:?}");
    let thinking = content[0]["think"].as_str().unwrap().to_owned();
    let signature = content[0]["signature"].as_str().unwrap().to_owned();
    assert!(thinking.starts_with("Turn 0:") && signature.starts_with("EqMock"));
    assert_eq!(content[1]["type"], "redacted_thinking");
    let data = content[1]["data"].as_str().unwrap().to_owned();
    // The signature streamed as the think part's last delta.
    let signed = of(&events, "on_reasoning_delta")
        .iter()
        .filter(|d| d["delta"]["content"][0]["signature"] == signature.as_str())
        .count();
    assert_eq!(signed, 1);
    check_persisted(&server, &turn, &fin["responseMessage"], false).await;
    let sent = mock.requests_for("tools");
    assert_eq!(sent.len(), 2);
    let expected = json!([
        {"type": "thinking", "thinking": thinking, "signature": signature},
        {"type": "redacted_thinking", "data": data},
    ]);
    let first_blocks =
        |request: &Value| request["messages"][1]["content"].as_array().unwrap()[..2].to_vec();
    assert_eq!(sent[1]["thinking"]["type"], "enabled", "{}", sent[1]);
    assert_eq!(
        first_blocks(&sent[1]),
        expected.as_array().unwrap()[..],
        "{}",
        sent[1]
    );

    // The next turn: its history comes from the saved message, blocks included.
    let next = server.follow_up(&turn, "thinker", "and again").await;
    let events = server.events(&next.stream_id).await;
    assert_eq!(
        final_of(&events, "complete")["responseMessage"]["text"],
        "The tools said: 48; 56."
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let sent = mock.requests_for("tools");
    assert_eq!(sent.len(), 4);
    for request in &sent[2..] {
        assert_eq!(request["thinking"]["type"], "enabled");
        assert_eq!(
            first_blocks(request),
            expected.as_array().unwrap()[..],
            "{request}"
        );
    }
}

/// A saved answer whose tool call has no output (as an ended job could leave before
/// the fix) still gives a next turn the upstream accepts: the request builders answer
/// every call.
async fn a_call_saved_without_output(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let server = serve(mock_config(kind, &mock, vec![model("echo", &[])])).await;
    let (turn, _) = server.run("echo", "first").await;
    let db = server.state.manager.db();
    let mut answer = db.get_message(&turn.response_id).await.unwrap().unwrap();
    answer.content = vec![genstream_engine::event::ContentPart::ToolCall {
        tool_call: genstream_engine::event::ToolCall {
            id: kind.call_id(0, 0),
            name: "calculator".into(),
            args: r#"{"expression": "6 *"#.into(),
            output: None,
        },
    }];
    answer.unfinished = true;
    db.save_message(&answer).await.unwrap();
    let next = server.follow_up(&turn, "echo", TEXT).await;
    let events = server.events(&next.stream_id).await;
    assert_eq!(
        final_of(&events, "complete")["responseMessage"]["text"],
        TEXT,
        "{kind:?}"
    );
    assert!(
        mock.rejected().is_empty(),
        "{kind:?}: {:?}",
        mock.rejected()
    );
    let request = mock.requests_for("echo").last().unwrap().to_string();
    assert!(
        request.contains("the tool call did not complete"),
        "{request}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_saved_without_output_gives_a_valid_next_turn() {
    join_all(KINDS.map(a_call_saved_without_output)).await;
}

/// `GET /api/models` gives each model's configured provider name as `provider`, so two
/// upstreams of one kind are told apart, and the protocol apart as `kind`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_show_the_configured_provider_name_and_its_kind() {
    // Nothing is requested from the upstreams: the port can be closed.
    let base_url = "http://127.0.0.1:9/v1";
    let server = serve_exactly(config(
        json!({
            "vllm": provider(Kind::OpenAi, base_url, 30_000),
            "openrouter": provider(Kind::OpenAi, base_url, 30_000),
            "claude-proxy": provider(Kind::Anthropic, base_url, 30_000),
        }),
        vec![
            json!({"name": "local", "provider": "vllm", "options": {"model": "qwen"}}),
            json!({"name": "routed", "provider": "openrouter", "options": {"model": "x/y"}}),
            json!({"name": "claude", "provider": "claude-proxy", "options": {"model": "c"}}),
            json!({"name": "demo", "provider": "demo"}),
        ],
        Vec::new(),
        json!({}),
    ))
    .await;
    let listed = server.get("/api/models").await;
    let shown: Vec<(String, String, String)> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let s = |k: &str| m[k].as_str().unwrap().to_owned();
            (s("name"), s("provider"), s("kind"))
        })
        .collect();
    let want = [
        ("local", "vllm", "openai"),
        ("routed", "openrouter", "openai"),
        ("claude", "claude-proxy", "anthropic"),
        ("demo", "demo", "demo"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(shown, want);
}
