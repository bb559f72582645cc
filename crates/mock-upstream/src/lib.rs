//! A mock upstream speaking OpenAI Chat Completions and the Anthropic Messages API, for
//! tests.
//!
//! genstream's upstream clients are tested against real wire data without a network:
//! this server replays streams recorded from OpenAI, DeepSeek, OpenRouter, Groq, xAI,
//! Azure and Anthropic (see `fixtures/README.md`) and scripts the failures a client must
//! survive. It speaks just enough of `POST /v1/chat/completions` (OpenAI API reference,
//! "Create chat completion", streaming) and `POST /v1/messages` (Anthropic API docs,
//! "Messages" and "Streaming Messages") for a client that sets `stream: true`.
//!
//! The request's `model` field picks the answer (the same idea as TensorZero's dummy
//! provider, whose model names select behaviours). On `/v1/chat/completions`:
//!
//! | `model` | answer |
//! |---|---|
//! | `fixture:<path>` | replays `fixtures/<path>`: a `.sse` file as is, frame by frame; a `.chunks.jsonl` file as `data: <line>\n\n` per line, then `data: [DONE]\n\n` |
//! | `status:<code>` | HTTP `<code>` with an OpenAI-style body `{"error":{"message":"mock upstream says <code>","type":…}}`; `Retry-After: 1` for 429 and 503 |
//! | `malformed` | one valid chunk, then `data: {not json` |
//! | `truncated` | a few content chunks, then the connection closes: no `finish_reason`, no `[DONE]` |
//! | `echo` | the last user message streamed back word by word, with `finish_reason: stop`, a usage chunk (`choices: []`) and `[DONE]` |
//! | `stall` | one content chunk, then nothing, never closing (for idle-timeout tests) |
//!
//! On `/v1/messages` (which, like Anthropic, answers 400 without an `anthropic-version`
//! header):
//!
//! | `model` | answer |
//! |---|---|
//! | `fixture:<path>` | replays `fixtures/<path>` (meant for `anthropic/…`): a `.sse` file as is; a `.chunks.jsonl` file as `event: <type>\ndata: <line>\n\n` per line (`<type>` being the line's `type`), with no `[DONE]` |
//! | `status:<code>` | HTTP `<code>` with an Anthropic-style body `{"type":"error","error":{"type":…,"message":"mock upstream says <code>"},"request_id":…}` (`overloaded_error` for 529); `Retry-After: 1` for 429, 503 and 529 |
//! | `malformed` | `message_start`, a text block with one delta, then `event: content_block_delta` with `data: {not json` |
//! | `truncated` | `message_start` and a few text deltas, then the connection closes: no `message_delta`, no `message_stop` |
//! | `overloaded` | `message_start` and a few text deltas, then a mid-stream `event: error` with `overloaded_error` (synthetic: no real recording of one was found) |
//! | `echo` | the last user message's text streamed back word by word as one text block, with `message_delta` (`end_turn`, usage) and `message_stop` |
//! | `stall` | `message_start` and one text delta, then nothing, never closing |
//!
//! Any streaming model may end in `?delay_ms=N`: a delay of `N` milliseconds between
//! frames (not before the first). Unknown models answer 404, `model_not_found` on Chat
//! Completions as OpenAI does, `not_found_error` on Messages as Anthropic does.
//!
//! Every request is recorded (path, headers, JSON body) before it is answered, so a
//! test can assert what its client sent: [`MockUpstream::requests`] and
//! [`MockUpstream::recorded`]. The fixtures are compiled into the crate, so the binary
//! works from any directory.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Declares the embedded fixture table from paths relative to `fixtures/`.
macro_rules! fixtures {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../fixtures/", $path)))),*]
    };
}

/// The recorded streams, as `(path relative to fixtures/, contents)`.
const FIXTURES: &[(&str, &str)] = fixtures![
    "openai/azure-chat-content-filter.chunks.jsonl",
    "openai/chat-finish-length.sse",
    "openai/chat-parallel-tool-calls-obfuscation.sse",
    "openai/chat-parallel-tool-calls.sse",
    "openai/chat-refusal.sse",
    "openai/chat-text-usage-obfuscation.chunks.jsonl",
    "openai/chat-text-usage.sse",
    "openai/chat-tool-call.sse",
    "openai-compatible/deepseek-reasoning-content.chunks.jsonl",
    "openai-compatible/deepseek-reasoning-tool-call.chunks.jsonl",
    "openai-compatible/groq-midstream-error-event.sse",
    "openai-compatible/openrouter-midstream-error.sse",
    "openai-compatible/openrouter-reasoning.sse",
    "openai-compatible/xai-grok3mini-reasoning-tool-call.chunks.jsonl",
    "anthropic/messages-cache-creation-and-read-server-tool.chunks.jsonl",
    "anthropic/messages-cache-read-compaction.sse",
    "anthropic/messages-redacted-thinking.sse",
    "anthropic/messages-text-parallel-tool-use.sse",
    "anthropic/messages-text-then-tool-use.sdk-fixture.sse",
    "anthropic/messages-text.chunks.jsonl",
    "anthropic/messages-text.sse",
    "anthropic/messages-thinking-text.chunks.jsonl",
    "anthropic/messages-thinking-text.sse",
    "anthropic/messages-thinking-tool-use.sse",
    "anthropic/messages-tool-use-empty-input.sse",
];

/// The contents of the embedded fixture at `path` (relative to `fixtures/`, e.g.
/// `openai/chat-text-usage.sse`), or `None` if there is no such fixture.
pub fn fixture(path: &str) -> Option<&'static str> {
    FIXTURES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
}

/// The paths of all embedded fixtures, relative to `fixtures/`.
pub fn fixture_paths() -> impl Iterator<Item = &'static str> {
    FIXTURES.iter().map(|(p, _)| *p)
}

/// One request the mock received.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// The request path, e.g. `/v1/chat/completions` or `/v1/messages`.
    pub path: String,
    /// Headers, names lower-cased; a repeated header keeps its last value. Values that
    /// are not visible ASCII are dropped.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON, or a JSON string holding the raw text when it was not
    /// JSON.
    pub body: Value,
}

/// The shared log of received requests. Cheap to clone; clones share the log.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
}

impl Recorder {
    /// A new, empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// All requests received so far, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.requests.lock().clone()
    }

    /// The JSON bodies of all requests received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.requests
            .lock()
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    fn push(&self, request: RecordedRequest) {
        self.requests.lock().push(request);
    }
}

/// The mock's router: `POST /v1/chat/completions` and `POST /v1/messages`, recording
/// into `recorder`.
pub fn app(recorder: Recorder) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages))
        .with_state(recorder)
}

/// Serves [`app`] on `listener` until `shutdown` completes.
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve(
    listener: TcpListener,
    recorder: Recorder,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(recorder))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A running mock upstream on a local port. Dropping it stops the server (open
/// streams are cut).
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    recorder: Recorder,
    task: JoinHandle<()>,
}

impl MockUpstream {
    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT/v1` (no trailing slash), as OpenAI's and
    /// Anthropic's are written.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The JSON bodies of all requests received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.recorder.requests()
    }

    /// All requests received so far (path, headers, body), oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.recorder.recorded()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a mock upstream on `127.0.0.1:0` (a free port) in a background task of the
/// current tokio runtime.
///
/// # Errors
/// When the port cannot be bound.
pub async fn try_spawn() -> std::io::Result<MockUpstream> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let recorder = Recorder::new();
    let app = app(recorder.clone());
    let task = tokio::spawn(async move {
        // Only fails when the listener does; a test then sees connection errors.
        let _ = axum::serve(listener, app).await;
    });
    Ok(MockUpstream {
        addr,
        recorder,
        task,
    })
}

/// Like [`try_spawn`], for tests.
///
/// # Panics
/// When no local port can be bound.
#[allow(clippy::expect_used, reason = "a test helper: no port means no test")]
pub async fn spawn() -> MockUpstream {
    try_spawn()
        .await
        .expect("mock upstream: cannot bind 127.0.0.1:0")
}

/// What a `model` string asks for.
#[derive(Clone, Debug, PartialEq)]
enum Scenario {
    Fixture(String),
    Status(u16),
    Malformed,
    Truncated,
    /// `/v1/messages` only.
    Overloaded,
    Echo,
    Stall,
}

/// Which API a fixture is replayed as: it decides how `.chunks.jsonl` lines are framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    /// `data: <line>`, then `data: [DONE]`.
    ChatCompletions,
    /// `event: <type>` + `data: <line>`, no terminator of its own (`message_stop` is a
    /// line of the file).
    Messages,
}

/// Splits `model` into its scenario and the `?delay_ms=N` option.
fn parse_model(model: &str) -> Result<(Scenario, Duration), String> {
    let (base, query) = match model.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (model, None),
    };
    let mut delay = Duration::ZERO;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("delay_ms", ms)) => {
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("delay_ms must be an integer, got `{ms}`"))?;
                delay = Duration::from_millis(ms);
            }
            _ => return Err(format!("unknown model option `{pair}` (known: delay_ms)")),
        }
    }
    let scenario = if let Some(path) = base.strip_prefix("fixture:") {
        Scenario::Fixture(path.to_owned())
    } else if let Some(code) = base.strip_prefix("status:") {
        let code: u16 = code
            .parse()
            .map_err(|_| format!("status must be an HTTP status code, got `{code}`"))?;
        Scenario::Status(code)
    } else {
        match base {
            "malformed" => Scenario::Malformed,
            "truncated" => Scenario::Truncated,
            "overloaded" => Scenario::Overloaded,
            "echo" => Scenario::Echo,
            "stall" => Scenario::Stall,
            _ => return Err(format!("unknown model `{base}`")),
        }
    };
    Ok((scenario, delay))
}

/// Records one request; returns its body parsed as JSON, if it is.
fn record(recorder: &Recorder, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Option<Value> {
    let text = String::from_utf8_lossy(body).into_owned();
    let parsed = serde_json::from_str::<Value>(&text).ok();
    recorder.push(RecordedRequest {
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
        body: parsed.clone().unwrap_or(Value::String(text)),
    });
    parsed
}

async fn chat_completions(
    State(recorder): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(body) = record(&recorder, &uri, &headers, &body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "mock upstream: the request body is not JSON",
        );
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (scenario, delay) = match parse_model(model) {
        Ok(parsed) => parsed,
        Err(why) => {
            return error_response(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!(
                    "The model `{model}` does not exist (mock upstream: {why}; use \
                     fixture:<path>, status:<code>, malformed, truncated, echo or stall)"
                ),
            );
        }
    };
    match scenario {
        Scenario::Status(code) => status_response(code),
        Scenario::Fixture(path) => match fixture_frames(&path, Dialect::ChatCompletions) {
            Some(frames) => sse_response(frames, delay, false),
            None => error_response(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!(
                    "The model `{model}` does not exist (mock upstream: no fixture `{path}`; \
                     have: {})",
                    fixture_paths().collect::<Vec<_>>().join(", ")
                ),
            ),
        },
        Scenario::Malformed => sse_response(
            vec![
                data_frame(&chunk(
                    model,
                    json!({"role": "assistant", "content": "Hello"}),
                    None,
                )),
                "data: {not json\n\n".to_owned(),
            ],
            delay,
            false,
        ),
        Scenario::Truncated => {
            let mut frames = vec![data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            ))];
            for word in ["This ", "stream ", "stops ", "here"] {
                frames.push(data_frame(&chunk(model, json!({"content": word}), None)));
            }
            sse_response(frames, delay, false)
        }
        Scenario::Stall => sse_response(
            vec![data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": "Stalling"}),
                None,
            ))],
            delay,
            true,
        ),
        Scenario::Echo => sse_response(echo_frames(model, &body), delay, false),
        Scenario::Overloaded => error_response(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!(
                "The model `{model}` does not exist (mock upstream: `overloaded` is a \
                 /v1/messages scenario)"
            ),
        ),
    }
}

/// The frames of fixture `path` as served in `dialect`, each with its terminating
/// blank line (except a raw file's last frame if the file lacks it).
fn fixture_frames(path: &str, dialect: Dialect) -> Option<Vec<String>> {
    let text = fixture(path)?;
    if path.ends_with(".chunks.jsonl") {
        let lines = text.lines().filter(|line| !line.trim().is_empty());
        let frames = match dialect {
            Dialect::ChatCompletions => lines
                .map(|line| format!("data: {line}\n\n"))
                .chain(["data: [DONE]\n\n".to_owned()])
                .collect(),
            Dialect::Messages => lines
                .map(|line| {
                    let kind = serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("type")?.as_str().map(str::to_owned))
                        .unwrap_or_else(|| "message".to_owned());
                    format!("event: {kind}\ndata: {line}\n\n")
                })
                .collect(),
        };
        Some(frames)
    } else {
        // Raw SSE: cut after each blank line so that a delay falls between frames.
        Some(text.split_inclusive("\n\n").map(str::to_owned).collect())
    }
}

/// A streaming `text/event-stream` response sending `frames` with `delay` between them;
/// when `stall`, the body then stays open forever.
fn sse_response(frames: Vec<String>, delay: Duration, stall: bool) -> Response {
    let frames =
        futures::stream::iter(frames.into_iter().enumerate()).then(move |(i, frame)| async move {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, Infallible>(Bytes::from(frame))
        });
    let body = if stall {
        Body::from_stream(frames.chain(futures::stream::pending()))
    } else {
        Body::from_stream(frames)
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The `status:<code>` answer.
fn status_response(code: u16) -> Response {
    let Ok(status) = StatusCode::from_u16(code) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("mock upstream: `{code}` is not an HTTP status code"),
        );
    };
    let kind = match code {
        400 | 404 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        408 => "timeout",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ if status.is_server_error() => "server_error",
        _ => "mock_error",
    };
    let mut response = error_response(status, kind, &format!("mock upstream says {code}"));
    if matches!(code, 429 | 503) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// An OpenAI-style JSON error: `{"error":{"message","type","param":null,"code":null}}`.
fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

/// One `chat.completion.chunk` with a single choice.
fn chunk(model: &str, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
    })
}

fn data_frame(payload: &Value) -> String {
    format!("data: {payload}\n\n")
}

/// The text of a message's `content`: a string, or the `text` of its parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The `echo` answer: the last user message, word by word, then usage and `[DONE]`.
fn echo_frames(model: &str, body: &Value) -> Vec<String> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    let prompt_chars: usize = messages
        .iter()
        .map(|m| content_text(m.get("content")).chars().count())
        .sum();

    let mut frames = vec![data_frame(&chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    let words: Vec<&str> = last_user.split_whitespace().collect();
    for (i, word) in words.iter().enumerate() {
        let piece = if i == 0 {
            (*word).to_owned()
        } else {
            format!(" {word}")
        };
        frames.push(data_frame(&chunk(model, json!({"content": piece}), None)));
    }
    frames.push(data_frame(&chunk(model, json!({}), Some("stop"))));
    let prompt_tokens = prompt_chars.div_ceil(4);
    frames.push(data_frame(&json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": words.len(),
            "total_tokens": prompt_tokens + words.len(),
        },
    })));
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

/// `POST /v1/messages`: the Anthropic Messages API.
async fn messages(
    State(recorder): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(body) = record(&recorder, &uri, &headers, &body) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "mock upstream: the request body is not JSON",
        );
    };
    if !headers.contains_key("anthropic-version") {
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
    let (scenario, delay) = match parse_model(model) {
        Ok(parsed) => parsed,
        Err(why) => {
            return anthropic_error(
                StatusCode::NOT_FOUND,
                "not_found_error",
                &format!(
                    "model: {model} (mock upstream: {why}; use fixture:<path>, status:<code>, \
                     malformed, truncated, overloaded, echo or stall)"
                ),
            );
        }
    };
    let text_start = || {
        vec![
            event_frame(&message_start(model, 10)),
            event_frame(&json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}})),
        ]
    };
    match scenario {
        Scenario::Status(code) => anthropic_status_response(code),
        Scenario::Fixture(path) => match fixture_frames(&path, Dialect::Messages) {
            Some(frames) => sse_response(frames, delay, false),
            None => anthropic_error(
                StatusCode::NOT_FOUND,
                "not_found_error",
                &format!(
                    "model: {model} (mock upstream: no fixture `{path}`; have: {})",
                    fixture_paths().collect::<Vec<_>>().join(", ")
                ),
            ),
        },
        Scenario::Malformed => {
            let mut frames = text_start();
            frames.push(event_frame(&text_delta(0, "Hello")));
            frames.push("event: content_block_delta\ndata: {not json\n\n".to_owned());
            sse_response(frames, delay, false)
        }
        Scenario::Truncated => {
            let mut frames = text_start();
            for word in ["This ", "stream ", "stops ", "here"] {
                frames.push(event_frame(&text_delta(0, word)));
            }
            sse_response(frames, delay, false)
        }
        Scenario::Overloaded => {
            let mut frames = text_start();
            frames.push("event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned());
            for word in ["Partial ", "answer ", "then"] {
                frames.push(event_frame(&text_delta(0, word)));
            }
            // The payload shape quoted in error logs, with Anthropic's padding.
            frames.push(
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\
                 \"type\":\"overloaded_error\",\"message\":\"Overloaded\"},\
                 \"request_id\":\"req_mock_overloaded\"}        \n\n"
                    .to_owned(),
            );
            sse_response(frames, delay, false)
        }
        Scenario::Stall => {
            let mut frames = text_start();
            frames.push(event_frame(&text_delta(0, "Stalling")));
            sse_response(frames, delay, true)
        }
        Scenario::Echo => sse_response(anthropic_echo_frames(model, &body), delay, false),
    }
}

/// The `status:<code>` answer of `/v1/messages`.
fn anthropic_status_response(code: u16) -> Response {
    let Ok(status) = StatusCode::from_u16(code) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("mock upstream: `{code}` is not an HTTP status code"),
        );
    };
    // Anthropic API docs, "Errors": the error type of each status.
    let kind = match code {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    let mut response = anthropic_error(status, kind, &format!("mock upstream says {code}"));
    if matches!(code, 429 | 503 | 529) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// An Anthropic-style JSON error: `{"type":"error","error":{"type","message"},"request_id"}`.
fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_mock",
    });
    (status, axum::Json(body)).into_response()
}

/// An SSE frame named after the payload's `type`, as Anthropic sends them.
fn event_frame(payload: &Value) -> String {
    let kind = payload
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    format!("event: {kind}\ndata: {payload}\n\n")
}

/// `message_start` with `input_tokens` and no cache use.
fn message_start(model: &str, input_tokens: usize) -> Value {
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

fn text_delta(index: u32, text: &str) -> Value {
    json!({"type": "content_block_delta", "index": index,
        "delta": {"type": "text_delta", "text": text}})
}

/// The text of a Messages `content`: a string, or its `text` blocks joined.
fn blocks_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The `echo` answer of `/v1/messages`: the last user message's text, word by word, in
/// one text block, then `message_delta` (`end_turn`, cumulative usage) and
/// `message_stop`.
fn anthropic_echo_frames(model: &str, body: &Value) -> Vec<String> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| blocks_text(m.get("content")))
        .unwrap_or_default();
    let system_chars = body
        .get("system")
        .and_then(Value::as_str)
        .map_or(0, |s| s.chars().count());
    let prompt_chars: usize = system_chars
        + messages
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
    let words: Vec<&str> = last_user.split_whitespace().collect();
    for (i, word) in words.iter().enumerate() {
        let piece = if i == 0 {
            (*word).to_owned()
        } else {
            format!(" {word}")
        };
        frames.push(event_frame(&text_delta(0, &piece)));
    }
    frames.push(event_frame(
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(event_frame(&json!({
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": words.len(),
        },
    })));
    frames.push(event_frame(&json!({"type": "message_stop"})));
    frames
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parses_models() {
        assert_eq!(
            parse_model("fixture:openai/chat-text-usage.sse?delay_ms=5"),
            Ok((
                Scenario::Fixture("openai/chat-text-usage.sse".into()),
                Duration::from_millis(5)
            ))
        );
        assert_eq!(
            parse_model("status:429"),
            Ok((Scenario::Status(429), Duration::ZERO))
        );
        assert_eq!(parse_model("echo"), Ok((Scenario::Echo, Duration::ZERO)));
        assert_eq!(
            parse_model("overloaded?delay_ms=1"),
            Ok((Scenario::Overloaded, Duration::from_millis(1)))
        );
        assert!(parse_model("gpt-4o").is_err());
        assert!(parse_model("echo?speed=3").is_err());
        assert!(parse_model("status:abc").is_err());
    }

    #[test]
    fn every_fixture_has_frames_ending_in_blank_lines() {
        for path in fixture_paths() {
            let dialect = if path.starts_with("anthropic/") {
                Dialect::Messages
            } else {
                Dialect::ChatCompletions
            };
            let frames = fixture_frames(path, dialect).unwrap_or_default();
            assert!(!frames.is_empty(), "{path}");
            if path.ends_with(".jsonl") {
                let last = frames.last().map(String::as_str);
                match dialect {
                    Dialect::ChatCompletions => assert_eq!(last, Some("data: [DONE]\n\n")),
                    Dialect::Messages => assert_eq!(
                        last,
                        Some("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
                        "{path}"
                    ),
                }
            } else {
                // Raw files are sent byte for byte.
                assert_eq!(frames.concat(), fixture(path).unwrap_or_default(), "{path}");
            }
            assert!(frames.concat().len() >= fixture(path).unwrap_or_default().len());
        }
    }

    #[test]
    fn raw_sse_frames_concatenate_to_the_file() {
        let path = "openai/chat-text-usage.sse";
        let frames = fixture_frames(path, Dialect::ChatCompletions).unwrap_or_default();
        assert_eq!(frames.concat(), fixture(path).unwrap_or_default());
        assert!(frames.iter().all(|f| f.ends_with("\n\n")));
        // The SDK fixture has no blank line after its last frame: sent as it is.
        let path = "anthropic/messages-text-then-tool-use.sdk-fixture.sse";
        let frames = fixture_frames(path, Dialect::Messages).unwrap_or_default();
        assert_eq!(
            frames.last().map(String::as_str),
            Some("event: message_stop\ndata: {\"type\":\"message_stop\"}")
        );
    }

    #[test]
    fn messages_chunks_are_named_by_their_type() {
        let frames =
            fixture_frames("anthropic/messages-text.chunks.jsonl", Dialect::Messages).unwrap();
        assert!(frames[0].starts_with("event: message_start\ndata: {\"type\":\"message_start\""));
        assert!(
            frames
                .iter()
                .any(|f| f == "event: ping\ndata: {\"type\":\"ping\"}\n\n")
        );
        assert!(frames.iter().all(|f| !f.contains("[DONE]")));
    }

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
