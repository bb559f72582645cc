//! A mock OpenAI-compatible Chat Completions server, for tests.
//!
//! genstream's upstream clients are tested against real wire data without a network:
//! this server replays streams recorded from OpenAI, DeepSeek, OpenRouter, Groq, xAI and
//! Azure (see `fixtures/README.md`) and scripts the failures a client must survive. It
//! speaks just enough of `POST /v1/chat/completions` (OpenAI API reference, "Create chat
//! completion", streaming) for a client that sets `stream: true`.
//!
//! The request's `model` field picks the answer (the same idea as TensorZero's dummy
//! provider, whose model names select behaviours):
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
//! Any streaming model may end in `?delay_ms=N`: a delay of `N` milliseconds between
//! frames (not before the first). Unknown models answer 404 `model_not_found`, as
//! OpenAI does.
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
    /// The request path, e.g. `/v1/chat/completions`.
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

/// The mock's router: `POST /v1/chat/completions`, recording into `recorder`.
pub fn app(recorder: Recorder) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
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

    /// The OpenAI-style base URL, `http://127.0.0.1:PORT/v1` (no trailing slash).
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
    Echo,
    Stall,
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
            "echo" => Scenario::Echo,
            "stall" => Scenario::Stall,
            _ => return Err(format!("unknown model `{base}`")),
        }
    };
    Ok((scenario, delay))
}

async fn chat_completions(
    State(recorder): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let parsed = serde_json::from_str::<Value>(&text);
    recorder.push(RecordedRequest {
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
        body: parsed
            .as_ref()
            .cloned()
            .unwrap_or_else(|_| Value::String(text.clone())),
    });
    let Ok(body) = parsed else {
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
        Scenario::Fixture(path) => match fixture_frames(&path) {
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
    }
}

/// The frames of fixture `path`, each with its terminating blank line.
fn fixture_frames(path: &str) -> Option<Vec<String>> {
    let text = fixture(path)?;
    if path.ends_with(".chunks.jsonl") {
        let mut frames: Vec<String> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| format!("data: {line}\n\n"))
            .collect();
        frames.push("data: [DONE]\n\n".to_owned());
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
        assert!(parse_model("gpt-4o").is_err());
        assert!(parse_model("echo?speed=3").is_err());
        assert!(parse_model("status:abc").is_err());
    }

    #[test]
    fn every_fixture_has_frames_ending_in_blank_lines() {
        for path in fixture_paths() {
            let frames = fixture_frames(path).unwrap_or_default();
            assert!(!frames.is_empty(), "{path}");
            if path.ends_with(".jsonl") {
                assert_eq!(frames.last().map(String::as_str), Some("data: [DONE]\n\n"));
            }
            assert!(frames.concat().len() >= fixture(path).unwrap_or_default().len());
        }
    }

    #[test]
    fn raw_sse_frames_concatenate_to_the_file() {
        let path = "openai/chat-text-usage.sse";
        let frames = fixture_frames(path).unwrap_or_default();
        assert_eq!(frames.concat(), fixture(path).unwrap_or_default());
        assert!(frames.iter().all(|f| f.ends_with("\n\n")));
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
