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
//! | `tools` | a tool-calling turn, or its answer once the request carries tool results (below) |
//! | `tools-forever` | a tool-calling turn, always (for the tool loop's iteration cap) |
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
//! | `tools`, `tools-forever` | as on Chat Completions, in the Messages dialect; with extended thinking on (`thinking.type: "enabled"`), a tool turn starts with a signed thinking block (`thinking_delta`s, then a `signature_delta`) and a `redacted_thinking` block |
//!
//! ## Tool calling: `tools` and `tools-forever`
//!
//! The turn calls every tool the request declares (`tools[].function` on Chat
//! Completions, `tools[]` on Messages), each `calls` times (default 2, option
//! `?calls=N`), so one turn always holds parallel calls. Call `j` (0-based, over the
//! whole turn) of turn `t` (the number of assistant messages with tool calls already in
//! the history) gets deterministic arguments: `{"expression": "<6+j> * <7+t>"}` for a
//! tool whose schema has an `expression` property (the `calculator`), else one value per
//! schema property (`"<property>-<t>-<j>"` for strings, `j` for numbers, `true` for
//! booleans). Ids are `call_mock_<t>_<j>` (Chat Completions) and `toolu_mock_<t>_<j>`
//! (Messages). The arguments' compact JSON is streamed in fragments of 4 characters, so
//! fragments split keys and string values; on Chat Completions the calls' fragments are
//! interleaved (accumulation must go by `index`), on Messages each call is one
//! `tool_use` block with `input_json_delta`s. The turn ends with `finish_reason:
//! "tool_calls"` / `stop_reason: "tool_use"` and usage.
//!
//! `tools` answers a request whose last message holds tool results (a trailing run of
//! `tool` messages; a last user message with `tool_result` blocks and no text — one
//! with text is a new question) with the text
//! `The tools said: <r1>; <r2>; ….`, the results' texts in the order given, streamed
//! word by word; with no tool declared it answers `No tools to call.`.
//!
//! ## Scripted failures: wrappers
//!
//! A model may start with wrappers, each applying to the *requests with this exact model
//! string* (counted per full model string, options included, from the mock's start; see
//! [`MockUpstream::count`]). A wrapper `<kind>:<N>:<rest>` handles the first `N`
//! requests that reach it and passes the others on to `<rest>` (with its count reduced
//! by `N`), so wrappers chain: `dropmid:1:flaky:1:429:echo` drops the first request
//! mid-stream, answers the second with 429, and echoes from the third on.
//!
//! | wrapper | its first `N` requests get |
//! |---|---|
//! | `flaky:<N>:<status>[+ra<S>\|+ram<MS>\|+radate<S>]:<rest>` | HTTP `<status>` with the dialect's error body (`mock upstream says <status>`); `Retry-After: <S>` (seconds), `retry-after-ms: <MS>`, or `Retry-After: <HTTP-date>` exactly `S` seconds after the response's own `Date` header (sent with it) when asked — no wait header otherwise |
//! | `dropmid:<N>:<rest>` | the first half (at least 3) of `<rest>`'s frames before its end (`finish_reason`, `[DONE]`, `message_delta`, `message_stop`), then the connection is dropped (the body errors: no terminating chunk) |
//! | `closemid:<N>:<rest>` | the same frames, then the body ends cleanly: no `[DONE]` / `message_stop` |
//! | `stall:<N>:<rest>` | the same frames, then nothing, never closing (idle-gap timeout) |
//! | `nobyte:<N>:<rest>` | status 200 and the headers, then no body byte, never closing (first-byte timeout) |
//! | `malformedmid:<N>:<rest>` | the same frames, then `data: {not json` |
//! | `overloaded:<N>:<rest>` | the same frames, then the upstream's mid-stream overload error: on Messages `event: error` with `overloaded_error`; on Chat Completions an OpenRouter-style chunk `{"error":{"message":"Overloaded","type":"overloaded_error","code":529}}` |
//! | `noend:<N>:<rest>` | all of `<rest>`'s frames but its terminator (`[DONE]`, `message_stop`), then a clean end: on Chat Completions a `finish_reason` and usage without `[DONE]` |
//! | `pass:<N>:<rest>` | `<rest>`'s base scenario, unwrapped (to script a failure on a later call: `pass:1:flaky:1:500:tools` fails the second request) |
//!
//! The frame-cutting wrappers need a streaming scenario at the end of `<rest>` (not
//! `status:<code>`).
//!
//! Any model may end in options (joined by `&`): `?delay_ms=N` puts a delay of `N`
//! milliseconds between frames (not before the first); `?calls=N` sets the calls per
//! tool of `tools`; `?call=NAME` makes the `tools` turn also call tool `NAME`, which the
//! request does not declare (arguments `{}`; a model may name any tool);
//! `?lead_ms=N` and `?gap_ms=N` put `N` milliseconds of keep-alives only before the
//! first frame and between the first two, one every `?keepalive_ms=N` (default 100; 0
//! sends nothing: silence). A keep-alive is what the upstream sends while it has
//! nothing to say: a `ping` event on Messages, the comment `: OPENROUTER PROCESSING` on
//! Chat Completions.
//! Unknown models answer 404, `model_not_found` on Chat Completions as OpenAI does,
//! `not_found_error` on Messages as Anthropic does.
//!
//! ## History validation
//!
//! Every request's history is checked the way the real APIs check it, and a violation
//! is answered HTTP 400 with the dialect's error body (and listed by
//! [`MockUpstream::rejected`]), before the model is even looked at:
//!
//! - Chat Completions: an assistant message with `tool_calls` must be followed by `tool`
//!   messages answering every `tool_call_id`; a `tool` message must answer a call of
//!   the assistant message before it.
//! - Messages: every `tool_use` block must be answered by a `tool_result` with its id
//!   in the next message, a user message; a `tool_result` must answer a `tool_use` of the
//!   previous message; `tool_result` blocks come first in their message; `tool_use`
//!   input is an object; no message but a final assistant one has empty content; a
//!   `thinking` block's `signature` is the one the mock gave its text, a
//!   `redacted_thinking` block has `data`; and with thinking on, when the last message
//!   holds tool results, the assistant message before it starts with a thinking or
//!   redacted thinking block (Anthropic's 400 text otherwise: "Expected `thinking` or
//!   `redacted_thinking`, but found `tool_use`. When `thinking` is enabled, a final
//!   `assistant` message must start with a thinking block…").
//!
//! Every request is recorded (path, headers, JSON body) before it is answered, so a
//! test can assert what its client sent: [`MockUpstream::requests`] and
//! [`MockUpstream::recorded`]. The fixtures are compiled into the crate, so the binary
//! works from any directory.

#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
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

/// A request the mock answered 400 because its history is invalid.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// Its position in [`Recorder::recorded`].
    pub request: usize,
    /// The request's `model`.
    pub model: String,
    /// The error message sent back (the API's wording).
    pub message: String,
}

#[derive(Debug, Default)]
struct Log {
    requests: Vec<RecordedRequest>,
    rejections: Vec<Rejection>,
    /// Requests per full model string that reached their scenario.
    counts: HashMap<String, u32>,
}

/// The shared log of received requests, history rejections and per-model request
/// counts. Cheap to clone; clones share the log.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    log: Arc<Mutex<Log>>,
}

impl Recorder {
    /// A new, empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// All requests received so far, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.log.lock().requests.clone()
    }

    /// The JSON bodies of all requests received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.log
            .lock()
            .requests
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// The requests answered 400 for an invalid history, oldest first.
    pub fn rejected(&self) -> Vec<Rejection> {
        self.log.lock().rejections.clone()
    }

    /// How many requests with exactly this `model` string reached their scenario (a
    /// request rejected for its history is not counted).
    pub fn count(&self, model: &str) -> u32 {
        self.log.lock().counts.get(model).copied().unwrap_or(0)
    }

    /// Records a request; returns its index.
    fn push(&self, request: RecordedRequest) -> usize {
        let mut log = self.log.lock();
        log.requests.push(request);
        log.requests.len() - 1
    }

    fn reject(&self, rejection: Rejection) {
        self.log.lock().rejections.push(rejection);
    }

    /// Counts one more request for `model`; returns how many came before it.
    fn next_index(&self, model: &str) -> u32 {
        let mut log = self.log.lock();
        let n = log.counts.entry(model.to_owned()).or_default();
        *n += 1;
        *n - 1
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

    /// The requests answered 400 for an invalid history, oldest first.
    pub fn rejected(&self) -> Vec<Rejection> {
        self.recorder.rejected()
    }

    /// How many requests with exactly this `model` string reached their scenario.
    pub fn count(&self, model: &str) -> u32 {
        self.recorder.count(model)
    }

    /// The JSON bodies of the requests with exactly this `model` string, oldest first
    /// (rejected ones included).
    pub fn requests_for(&self, model: &str) -> Vec<Value> {
        self.recorder
            .requests()
            .into_iter()
            .filter(|b| b.get("model").and_then(Value::as_str) == Some(model))
            .collect()
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

/// The base answer a `model` string asks for, once its wrappers let a request through.
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
    /// A tool-calling turn; with `forever: false`, the answer once results came.
    Tools {
        forever: bool,
    },
}

/// The wait header a `flaky` status carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RetryAfter {
    None,
    /// `Retry-After: <seconds>`.
    Secs(u64),
    /// `retry-after-ms: <milliseconds>`.
    Millis(u64),
    /// `Retry-After: <HTTP-date this many seconds from now>`.
    DateIn(u64),
}

/// What a wrapper does to the requests it handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Status(u16, RetryAfter),
    DropMid,
    CloseMid,
    StallMid,
    NoByte,
    MalformedMid,
    OverloadedMid,
    /// Every frame but the terminator (`[DONE]` / `message_stop`), then a clean end.
    NoTerminator,
    /// Answers with the base scenario.
    Pass,
}

/// A parsed `model` string.
#[derive(Clone, Debug, PartialEq)]
struct Plan {
    /// `(N, fault)`, outermost first.
    wrappers: Vec<(u32, Fault)>,
    scenario: Scenario,
    delay: Duration,
    /// Calls per declared tool in a `tools` turn.
    calls: u32,
    /// A tool the `tools` turn also calls, though the request does not declare it.
    undeclared: Option<String>,
    quiet: Quiet,
}

/// Stretches of a stream with nothing but keep-alives, or with nothing at all
/// (options `lead_ms`, `gap_ms`, `keepalive_ms`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Quiet {
    /// Before the first frame.
    lead: Duration,
    /// Between the first and the second frame.
    gap: Duration,
    /// A keep-alive this often during those stretches (the first at once); zero sends
    /// none: silence.
    every: Duration,
}

impl Plan {
    /// What request number `index` (0-based, of this model string) gets: a fault, or
    /// `None` for the base scenario.
    fn fault_for(&self, mut index: u32) -> Option<Fault> {
        for (n, fault) in &self.wrappers {
            if index < *n {
                return (*fault != Fault::Pass).then_some(*fault);
            }
            index -= n;
        }
        None
    }
}

/// Which API a request speaks: it decides the framing of streams and error bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    /// `data: <line>`, then `data: [DONE]`.
    ChatCompletions,
    /// `event: <type>` + `data: <line>`, no terminator of its own (`message_stop` is a
    /// line of the file).
    Messages,
}

/// Parses a `model` string: wrappers, base scenario and options.
fn parse_model(model: &str) -> Result<Plan, String> {
    let (base, query) = match model.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (model, None),
    };
    let mut delay = Duration::ZERO;
    let mut calls = 2;
    let mut undeclared = None;
    let mut quiet = Quiet {
        every: Duration::from_millis(100),
        ..Quiet::default()
    };
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let number = |v: &str, what: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{what} must be an integer, got `{v}`"))
        };
        let ms = |v: &str, what: &str| number(v, what).map(Duration::from_millis);
        match pair.split_once('=') {
            Some(("delay_ms", v)) => delay = ms(v, "delay_ms")?,
            Some(("lead_ms", v)) => quiet.lead = ms(v, "lead_ms")?,
            Some(("gap_ms", v)) => quiet.gap = ms(v, "gap_ms")?,
            Some(("keepalive_ms", v)) => quiet.every = ms(v, "keepalive_ms")?,
            Some(("calls", n)) => {
                calls = u32::try_from(number(n, "calls")?)
                    .map_err(|_| format!("calls too large: {n}"))?;
            }
            Some(("call", name)) if !name.is_empty() => undeclared = Some(name.to_owned()),
            _ => {
                return Err(format!(
                    "unknown model option `{pair}` (known: delay_ms, lead_ms, gap_ms, \
                     keepalive_ms, calls, call)"
                ));
            }
        }
    }
    let mut wrappers = Vec::new();
    let mut rest = base;
    while let Some((head, tail)) = rest.split_once(':') {
        let fault = match head {
            "flaky" => None,
            "dropmid" => Some(Fault::DropMid),
            "closemid" => Some(Fault::CloseMid),
            "stall" => Some(Fault::StallMid),
            "nobyte" => Some(Fault::NoByte),
            "malformedmid" => Some(Fault::MalformedMid),
            "overloaded" => Some(Fault::OverloadedMid),
            "noend" => Some(Fault::NoTerminator),
            "pass" => Some(Fault::Pass),
            _ => break,
        };
        let (n, tail) = tail
            .split_once(':')
            .ok_or_else(|| format!("`{head}` needs `{head}:<N>:<scenario>`"))?;
        let n: u32 = n
            .parse()
            .map_err(|_| format!("`{head}:<N>`: N must be an integer, got `{n}`"))?;
        let (fault, tail) = match fault {
            Some(fault) => (fault, tail),
            None => {
                let (status, tail) = tail
                    .split_once(':')
                    .ok_or("`flaky` needs `flaky:<N>:<status>:<scenario>`")?;
                (parse_flaky_status(status)?, tail)
            }
        };
        wrappers.push((n, fault));
        rest = tail;
    }
    let scenario = if let Some(path) = rest.strip_prefix("fixture:") {
        Scenario::Fixture(path.to_owned())
    } else if let Some(code) = rest.strip_prefix("status:") {
        let code: u16 = code
            .parse()
            .map_err(|_| format!("status must be an HTTP status code, got `{code}`"))?;
        Scenario::Status(code)
    } else {
        match rest {
            "malformed" => Scenario::Malformed,
            "truncated" => Scenario::Truncated,
            "overloaded" => Scenario::Overloaded,
            "echo" => Scenario::Echo,
            "stall" => Scenario::Stall,
            "tools" => Scenario::Tools { forever: false },
            "tools-forever" => Scenario::Tools { forever: true },
            _ => return Err(format!("unknown model `{rest}`")),
        }
    };
    Ok(Plan {
        wrappers,
        scenario,
        delay,
        calls,
        undeclared,
        quiet,
    })
}

/// `429`, `429+ra2`, `429+ram150`, `503+radate3`.
fn parse_flaky_status(spec: &str) -> Result<Fault, String> {
    let (code, wait) = match spec.split_once('+') {
        Some((code, wait)) => (code, Some(wait)),
        None => (spec, None),
    };
    let code: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..=999).contains(c))
        .ok_or_else(|| format!("flaky: `{code}` is not an HTTP status code"))?;
    let number = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("flaky: bad wait `+{}`", wait.unwrap_or_default()))
    };
    let retry_after = match wait {
        None => RetryAfter::None,
        Some(w) => {
            if let Some(v) = w.strip_prefix("radate") {
                RetryAfter::DateIn(number(v)?)
            } else if let Some(v) = w.strip_prefix("ram") {
                RetryAfter::Millis(number(v)?)
            } else if let Some(v) = w.strip_prefix("ra") {
                RetryAfter::Secs(number(v)?)
            } else {
                return Err(format!(
                    "flaky: unknown `+{w}` (use +ra<seconds>, +ram<ms> or +radate<seconds>)"
                ));
            }
        }
    };
    Ok(Fault::Status(code, retry_after))
}

/// Records one request; returns its index and its body parsed as JSON, if it is.
fn record(
    recorder: &Recorder,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> (usize, Option<Value>) {
    let text = String::from_utf8_lossy(body).into_owned();
    let parsed = serde_json::from_str::<Value>(&text).ok();
    let index = recorder.push(RecordedRequest {
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
        body: parsed.clone().unwrap_or(Value::String(text)),
    });
    (index, parsed)
}

async fn chat_completions(
    State(recorder): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(Dialect::ChatCompletions, &recorder, &uri, &headers, &body)
}

/// `POST /v1/messages`: the Anthropic Messages API.
async fn messages(
    State(recorder): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(Dialect::Messages, &recorder, &uri, &headers, &body)
}

/// Both endpoints: record, check the history, pick the answer.
fn handle(
    dialect: Dialect,
    recorder: &Recorder,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let (index, body) = record(recorder, uri, headers, body);
    let Some(body) = body else {
        return dialect_error(
            dialect,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "mock upstream: the request body is not JSON",
        );
    };
    if dialect == Dialect::Messages && !headers.contains_key("anthropic-version") {
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
    let checked = match dialect {
        Dialect::ChatCompletions => validate_chat_history(&body),
        Dialect::Messages => validate_messages_history(&body),
    };
    if let Err(message) = checked {
        recorder.reject(Rejection {
            request: index,
            model: model.to_owned(),
            message: message.clone(),
        });
        return dialect_error(
            dialect,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &message,
        );
    }
    let plan = match parse_model(model) {
        Ok(plan) => plan,
        Err(why) => return unknown_model(dialect, model, &why),
    };
    let fault = plan.fault_for(recorder.next_index(model));
    let base = || base_answer(dialect, model, &plan, &body);
    let stream = |frames, tail| stream_response(frames, plan.delay, plan.quiet, dialect, tail);
    match fault {
        None | Some(Fault::Pass) => match base() {
            Ok((frames, tail)) => stream(frames, tail),
            Err(response) => *response,
        },
        Some(Fault::Status(code, retry_after)) => status_answer(dialect, code, Some(retry_after)),
        Some(Fault::NoByte) => stream(Vec::new(), Tail::Hang),
        Some(Fault::NoTerminator) => match base() {
            Ok((mut frames, tail)) => {
                frames.retain(|f| !is_terminator(f));
                stream(frames, tail)
            }
            Err(response) => *response,
        },
        Some(fault) => {
            let Ok((frames, _)) = base() else {
                return dialect_error(
                    dialect,
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!(
                        "mock upstream: model `{model}`: a mid-stream failure needs a streaming \
                         scenario after it"
                    ),
                );
            };
            let mut frames = prefix(frames, dialect);
            let tail = match fault {
                Fault::DropMid => Tail::Abort,
                Fault::StallMid => Tail::Hang,
                Fault::MalformedMid => {
                    frames.push(match dialect {
                        Dialect::ChatCompletions => "data: {not json\n\n".to_owned(),
                        Dialect::Messages => {
                            "event: content_block_delta\ndata: {not json\n\n".to_owned()
                        }
                    });
                    Tail::End
                }
                Fault::OverloadedMid => {
                    frames.push(overloaded_frame(dialect));
                    Tail::End
                }
                _ => Tail::End, // CloseMid
            };
            stream(frames, tail)
        }
    }
}

/// The 404 for a model the mock does not know.
fn unknown_model(dialect: Dialect, model: &str, why: &str) -> Response {
    match dialect {
        Dialect::ChatCompletions => error_response(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!(
                "The model `{model}` does not exist (mock upstream: {why}; use \
                 fixture:<path>, status:<code>, malformed, truncated, echo, stall, tools, \
                 tools-forever, optionally wrapped in flaky/dropmid/closemid/stall/nobyte/\
                 malformedmid/overloaded/noend/pass)"
            ),
        ),
        Dialect::Messages => anthropic_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!(
                "model: {model} (mock upstream: {why}; use fixture:<path>, status:<code>, \
                 malformed, truncated, overloaded, echo, stall, tools or tools-forever, \
                 optionally wrapped in flaky/dropmid/closemid/stall/nobyte/malformedmid/\
                 overloaded/noend/pass)"
            ),
        ),
    }
}

/// The base scenario's stream (frames and how the body ends), or its non-stream
/// answer.
fn base_answer(
    dialect: Dialect,
    model: &str,
    plan: &Plan,
    body: &Value,
) -> Result<(Vec<String>, Tail), Box<Response>> {
    let frames = match (&plan.scenario, dialect) {
        (Scenario::Status(code), _) => return Err(Box::new(status_answer(dialect, *code, None))),
        (Scenario::Fixture(path), _) => match fixture_frames(path, dialect) {
            Some(frames) => frames,
            None => {
                let why = format!(
                    "no fixture `{path}`; have: {}",
                    fixture_paths().collect::<Vec<_>>().join(", ")
                );
                return Err(Box::new(match dialect {
                    Dialect::ChatCompletions => error_response(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        &format!("The model `{model}` does not exist (mock upstream: {why})"),
                    ),
                    Dialect::Messages => anthropic_error(
                        StatusCode::NOT_FOUND,
                        "not_found_error",
                        &format!("model: {model} (mock upstream: {why})"),
                    ),
                }));
            }
        },
        (Scenario::Malformed, Dialect::ChatCompletions) => vec![
            data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": "Hello"}),
                None,
            )),
            "data: {not json\n\n".to_owned(),
        ],
        (Scenario::Malformed, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            frames.push(event_frame(&text_delta(0, "Hello")));
            frames.push("event: content_block_delta\ndata: {not json\n\n".to_owned());
            frames
        }
        (Scenario::Truncated, Dialect::ChatCompletions) => {
            let mut frames = vec![data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            ))];
            for word in ["This ", "stream ", "stops ", "here"] {
                frames.push(data_frame(&chunk(model, json!({"content": word}), None)));
            }
            frames
        }
        (Scenario::Truncated, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            for word in ["This ", "stream ", "stops ", "here"] {
                frames.push(event_frame(&text_delta(0, word)));
            }
            frames
        }
        (Scenario::Overloaded, Dialect::ChatCompletions) => {
            return Err(Box::new(error_response(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!(
                    "The model `{model}` does not exist (mock upstream: `overloaded` is a \
                     /v1/messages scenario; `overloaded:<N>:<scenario>` works on both)"
                ),
            )));
        }
        (Scenario::Overloaded, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            frames.push("event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned());
            for word in ["Partial ", "answer ", "then"] {
                frames.push(event_frame(&text_delta(0, word)));
            }
            frames.push(overloaded_frame(Dialect::Messages));
            frames
        }
        (Scenario::Stall, Dialect::ChatCompletions) => {
            let frames = vec![data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": "Stalling"}),
                None,
            ))];
            return Ok((frames, Tail::Hang));
        }
        (Scenario::Stall, Dialect::Messages) => {
            let mut frames = anthropic_text_start(model);
            frames.push(event_frame(&text_delta(0, "Stalling")));
            return Ok((frames, Tail::Hang));
        }
        (Scenario::Echo, Dialect::ChatCompletions) => echo_frames(model, body),
        (Scenario::Echo, Dialect::Messages) => anthropic_echo_frames(model, body),
        (Scenario::Tools { forever }, _) => tools_frames(
            dialect,
            model,
            body,
            *forever,
            plan.calls,
            plan.undeclared.as_deref(),
        ),
    };
    Ok((frames, Tail::End))
}

/// The frames a mid-stream failure sends first: the first half (at least 3, if there
/// are that many) of the frames before the stream's end.
fn prefix(frames: Vec<String>, dialect: Dialect) -> Vec<String> {
    let body: Vec<String> = frames
        .into_iter()
        .take_while(|f| !is_end_frame(f, dialect))
        .collect();
    let keep = body.len().div_ceil(2).max(body.len().min(3));
    body.into_iter().take(keep).collect()
}

/// Whether a frame belongs to the end of a stream: `[DONE]`, a `finish_reason`, a
/// usage-only chunk, `message_delta` or `message_stop`.
fn is_end_frame(frame: &str, dialect: Dialect) -> bool {
    let data: String = frame
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    if data == "[DONE]" {
        return true;
    }
    let Ok(value) = serde_json::from_str::<Value>(&data) else {
        return false;
    };
    match dialect {
        Dialect::ChatCompletions => {
            let choices = value
                .get("choices")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let finished = choices.iter().any(|c| {
                c.get("finish_reason")
                    .and_then(Value::as_str)
                    .is_some_and(|r| !r.is_empty())
            });
            let usage_only = choices.is_empty() && value.get("usage").is_some_and(|u| !u.is_null());
            finished || usage_only
        }
        Dialect::Messages => matches!(
            value.get("type").and_then(Value::as_str),
            Some("message_delta" | "message_stop")
        ),
    }
}

/// Whether a frame is a stream's terminator: `data: [DONE]` or `message_stop`.
fn is_terminator(frame: &str) -> bool {
    frame.lines().any(|l| {
        let l = l.trim();
        l == "data: [DONE]" || l == "event: message_stop" || l.contains("\"type\":\"message_stop\"")
    })
}

/// The upstream's mid-stream overload error in `dialect`.
fn overloaded_frame(dialect: Dialect) -> String {
    match dialect {
        // OpenRouter reports failures inside a 200 stream as a chunk with `error`.
        Dialect::ChatCompletions => data_frame(&json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 0,
            "error": {"message": "Overloaded", "type": "overloaded_error", "code": 529},
            "choices": [],
        })),
        // The payload shape quoted in error logs, with Anthropic's padding.
        Dialect::Messages => "event: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\
             \"type\":\"overloaded_error\",\"message\":\"Overloaded\"},\
             \"request_id\":\"req_mock_overloaded\"}        \n\n"
            .to_owned(),
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

/// How a streamed body ends after its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tail {
    /// Cleanly (the last chunk of a chunked body).
    End,
    /// Never: the body stays open until the client goes away.
    Hang,
    /// The body fails, so the server drops the connection without ending the body.
    Abort,
}

/// What a streamed body sends, in order.
enum Piece {
    Bytes(String),
    Wait(Duration),
}

/// The keep-alive an upstream sends while it has nothing to say: Anthropic's `ping`
/// event on Messages; on Chat Completions the SSE comment OpenRouter sends while a
/// model is slow to start.
fn keepalive(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Messages => "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        Dialect::ChatCompletions => ": OPENROUTER PROCESSING\n\n",
    }
}

/// `length` of keep-alives every `quiet.every` (the first at once), or of silence.
fn quiet_pieces(out: &mut Vec<Piece>, length: Duration, quiet: Quiet, dialect: Dialect) {
    if length.is_zero() {
        return;
    }
    if quiet.every.is_zero() {
        out.push(Piece::Wait(length));
        return;
    }
    let mut left = length;
    while !left.is_zero() {
        out.push(Piece::Bytes(keepalive(dialect).to_owned()));
        let step = quiet.every.min(left);
        out.push(Piece::Wait(step));
        left -= step;
    }
}

/// A streaming `text/event-stream` response sending `frames` with `delay` between
/// them (and the `quiet` stretches before the first and after the first), then ending
/// as `tail` says.
fn stream_response(
    frames: Vec<String>,
    delay: Duration,
    quiet: Quiet,
    dialect: Dialect,
    tail: Tail,
) -> Response {
    let mut pieces = Vec::with_capacity(frames.len() * 2 + 2);
    if frames.is_empty() {
        quiet_pieces(&mut pieces, quiet.lead, quiet, dialect);
    }
    for (i, frame) in frames.into_iter().enumerate() {
        match i {
            0 => quiet_pieces(&mut pieces, quiet.lead, quiet, dialect),
            1 => quiet_pieces(&mut pieces, quiet.gap, quiet, dialect),
            _ => {}
        }
        if i > 0 && !delay.is_zero() {
            pieces.push(Piece::Wait(delay));
        }
        pieces.push(Piece::Bytes(frame));
    }
    let frames = futures::stream::iter(pieces)
        .then(|piece| async move {
            match piece {
                Piece::Wait(d) => {
                    tokio::time::sleep(d).await;
                    None
                }
                Piece::Bytes(b) => Some(Ok::<_, std::io::Error>(Bytes::from(b))),
            }
        })
        .filter_map(std::future::ready);
    let body = match tail {
        Tail::End => Body::from_stream(frames),
        Tail::Hang => Body::from_stream(frames.chain(futures::stream::pending())),
        Tail::Abort => Body::from_stream(frames.chain(futures::stream::once(async {
            // Let the frames before reach the socket first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "mock upstream: connection dropped mid-stream",
            ))
        }))),
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

/// A `status:<code>` or `flaky` answer in `dialect`. `retry_after`: `None` for
/// `status:<code>`'s default (`Retry-After: 1` on 429 and 503, and 529 on Messages),
/// else exactly the wait header asked for.
fn status_answer(dialect: Dialect, code: u16, retry_after: Option<RetryAfter>) -> Response {
    let Ok(status) = StatusCode::from_u16(code) else {
        return dialect_error(
            dialect,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("mock upstream: `{code}` is not an HTTP status code"),
        );
    };
    let kind = match dialect {
        Dialect::ChatCompletions => match code {
            400 | 404 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            408 => "timeout",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ if status.is_server_error() => "server_error",
            _ => "mock_error",
        },
        // Anthropic API docs, "Errors": the error type of each status.
        Dialect::Messages => match code {
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
        },
    };
    let mut response = dialect_error(dialect, status, kind, &format!("mock upstream says {code}"));
    let default_wait = match dialect {
        Dialect::ChatCompletions => matches!(code, 429 | 503),
        Dialect::Messages => matches!(code, 429 | 503 | 529),
    };
    let retry_after = retry_after.unwrap_or(if default_wait {
        RetryAfter::Secs(1)
    } else {
        RetryAfter::None
    });
    let headers = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).ok();
    match retry_after {
        RetryAfter::None => {}
        RetryAfter::Secs(s) => {
            if let Some(v) = value(s.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        RetryAfter::Millis(ms) => {
            if let Some(v) = value(ms.to_string()) {
                headers.insert("retry-after-ms", v);
            }
        }
        RetryAfter::DateIn(s) => {
            // The response's own `Date` is sent too (the second it was made, as
            // servers send it), so the date is exactly `s` seconds after it.
            let since = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            if let (Some(date), Some(at)) = (
                value(http_date(now)),
                value(http_date(now + Duration::from_secs(s))),
            ) {
                headers.insert(header::DATE, date);
                headers.insert(header::RETRY_AFTER, at);
            }
        }
    }
    response
}

/// An IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`, rounded up
/// to the next whole second.
fn http_date(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize]
    )
}

/// An error body in `dialect`'s shape.
fn dialect_error(dialect: Dialect, status: StatusCode, kind: &str, message: &str) -> Response {
    match dialect {
        Dialect::ChatCompletions => error_response(status, kind, message),
        Dialect::Messages => anthropic_error(status, kind, message),
    }
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

/// `text` as word pieces: `["one", " two", " three"]`.
fn word_pieces(text: &str) -> Vec<String> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// The `echo` answer: the last user message, word by word, then usage and `[DONE]`.
fn echo_frames(model: &str, body: &Value) -> Vec<String> {
    let messages = messages_of(body);
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    chat_text_frames(model, body, &last_user)
}

/// A Chat Completions text answer: `text` word by word, `finish_reason: stop`, a usage
/// chunk and `[DONE]`.
fn chat_text_frames(model: &str, body: &Value, text: &str) -> Vec<String> {
    let prompt_chars: usize = messages_of(body)
        .iter()
        .map(|m| content_text(m.get("content")).chars().count())
        .sum();
    let mut frames = vec![data_frame(&chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    let pieces = word_pieces(text);
    for piece in &pieces {
        frames.push(data_frame(&chunk(model, json!({"content": piece}), None)));
    }
    frames.push(data_frame(&chunk(model, json!({}), Some("stop"))));
    frames.push(chat_usage_frame(
        model,
        prompt_chars.div_ceil(4),
        pieces.len(),
    ));
    frames.push("data: [DONE]\n\n".to_owned());
    frames
}

fn chat_usage_frame(model: &str, prompt_tokens: usize, completion_tokens: usize) -> String {
    data_frame(&json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}

/// The request's `messages`, or none.
fn messages_of(body: &Value) -> Vec<Value> {
    body.get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// A tool the request declares: its name and the JSON Schema of its arguments.
struct DeclaredTool {
    name: String,
    schema: Value,
}

/// The tools a request declares, in its order.
fn declared_tools(dialect: Dialect, body: &Value) -> Vec<DeclaredTool> {
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let (name, schema) = match dialect {
                Dialect::ChatCompletions => {
                    let f = t.get("function")?;
                    (f.get("name")?, f.get("parameters"))
                }
                Dialect::Messages => (t.get("name")?, t.get("input_schema")),
            };
            Some(DeclaredTool {
                name: name.as_str()?.to_owned(),
                schema: schema.cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

/// The texts of the tool results the request ends with, in order; `None` when its
/// last message holds none.
fn trailing_tool_results(dialect: Dialect, body: &Value) -> Option<Vec<String>> {
    let messages = messages_of(body);
    let results: Vec<String> = match dialect {
        Dialect::ChatCompletions => {
            let mut out: Vec<String> = messages
                .iter()
                .rev()
                .take_while(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
                .map(|m| content_text(m.get("content")))
                .collect();
            out.reverse();
            out
        }
        Dialect::Messages => {
            let last = messages.last()?;
            // A user message with results *and* text is a new question (the API wants
            // the results of the last tool turn and the next question in one message).
            if last.get("role").and_then(Value::as_str) != Some("user")
                || blocks(last, "text").next().is_some()
            {
                return None;
            }
            last.get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                .map(|b| content_text(b.get("content")))
                .collect()
        }
    };
    (!results.is_empty()).then_some(results)
}

/// Assistant messages with tool calls already in the history.
fn tool_turns(dialect: Dialect, body: &Value) -> usize {
    messages_of(body)
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .filter(|m| match dialect {
            Dialect::ChatCompletions => m
                .get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty()),
            Dialect::Messages => blocks(m, "tool_use").next().is_some(),
        })
        .count()
}

/// The arguments of call `j` of turn `t` to a tool with `schema`.
fn tool_arguments(schema: &Value, turn: usize, j: usize) -> Value {
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if properties.contains_key("expression") {
        return json!({"expression": format!("{} * {}", 6 + j, 7 + turn)});
    }
    let mut args = Map::new();
    for (name, prop) in properties {
        let value = match prop.get("type").and_then(Value::as_str) {
            Some("integer" | "number") => json!(j),
            Some("boolean") => json!(true),
            _ => json!(format!("{name}-{turn}-{j}")),
        };
        args.insert(name, value);
    }
    Value::Object(args)
}

/// `text` in pieces of `n` characters.
fn pieces_of(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

/// The `tools` / `tools-forever` answer.
fn tools_frames(
    dialect: Dialect,
    model: &str,
    body: &Value,
    forever: bool,
    calls_per_tool: u32,
    undeclared: Option<&str>,
) -> Vec<String> {
    let tools = declared_tools(dialect, body);
    if !forever && let Some(results) = trailing_tool_results(dialect, body) {
        let text = format!("The tools said: {}.", results.join("; "));
        return match dialect {
            Dialect::ChatCompletions => chat_text_frames(model, body, &text),
            Dialect::Messages => anthropic_text_frames(model, body, &text),
        };
    }
    if tools.is_empty() {
        return match dialect {
            Dialect::ChatCompletions => chat_text_frames(model, body, "No tools to call."),
            Dialect::Messages => anthropic_text_frames(model, body, "No tools to call."),
        };
    }
    let turn = tool_turns(dialect, body);
    // (id, name, argument pieces)
    let mut calls: Vec<(String, String, Vec<String>)> = Vec::new();
    for tool in &tools {
        for _ in 0..calls_per_tool {
            let j = calls.len();
            let args = tool_arguments(&tool.schema, turn, j).to_string();
            let id = match dialect {
                Dialect::ChatCompletions => format!("call_mock_{turn}_{j}"),
                Dialect::Messages => format!("toolu_mock_{turn}_{j}"),
            };
            calls.push((id, tool.name.clone(), pieces_of(&args, 4)));
        }
    }
    if let Some(name) = undeclared {
        let j = calls.len();
        let id = match dialect {
            Dialect::ChatCompletions => format!("call_mock_{turn}_{j}"),
            Dialect::Messages => format!("toolu_mock_{turn}_{j}"),
        };
        calls.push((id, name.to_owned(), pieces_of("{}", 4)));
    }
    let output_tokens = calls.iter().map(|c| c.2.len()).sum::<usize>();
    let prompt_chars = body.to_string().chars().count();
    match dialect {
        Dialect::ChatCompletions => {
            let mut frames = vec![data_frame(&chunk(
                model,
                json!({"role": "assistant", "content": null}),
                None,
            ))];
            let rounds = calls.iter().map(|c| c.2.len()).max().unwrap_or(0);
            for r in 0..rounds {
                for (j, (id, name, pieces)) in calls.iter().enumerate() {
                    let Some(piece) = pieces.get(r) else { continue };
                    let call = if r == 0 {
                        json!({"index": j, "id": id, "type": "function",
                            "function": {"name": name, "arguments": piece}})
                    } else {
                        json!({"index": j, "function": {"arguments": piece}})
                    };
                    frames.push(data_frame(&chunk(
                        model,
                        json!({"tool_calls": [call]}),
                        None,
                    )));
                }
            }
            frames.push(data_frame(&chunk(model, json!({}), Some("tool_calls"))));
            frames.push(chat_usage_frame(
                model,
                prompt_chars.div_ceil(4),
                output_tokens,
            ));
            frames.push("data: [DONE]\n\n".to_owned());
            frames
        }
        Dialect::Messages => {
            let input_tokens = prompt_chars.div_ceil(4);
            let mut frames = vec![event_frame(&message_start(model, input_tokens))];
            // With extended thinking on, the turn starts as Claude's do: a signed
            // thinking block, here followed by a redacted one.
            let first_call = if thinking_enabled(body) {
                frames.extend(thinking_frames(0, &thinking_text(turn)));
                frames.extend(redacted_thinking_frames(1, &redacted_data(turn)));
                2
            } else {
                0
            };
            for (j, (id, name, pieces)) in calls.iter().enumerate() {
                let j = j + first_call;
                frames.push(event_frame(
                    &json!({"type": "content_block_start", "index": j,
                    "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
                ));
                frames.push(event_frame(
                    &json!({"type": "content_block_delta", "index": j,
                    "delta": {"type": "input_json_delta", "partial_json": ""}}),
                ));
                for piece in pieces {
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
                output_tokens,
            )));
            frames.push(event_frame(&json!({"type": "message_stop"})));
            frames
        }
    }
}

/// Whether a Messages request turns on extended thinking.
fn thinking_enabled(body: &Value) -> bool {
    body.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled")
}

/// The thinking of tool turn `turn`.
fn thinking_text(turn: usize) -> String {
    format!("Turn {turn}: the user wants numbers, so I call every tool I have.")
}

/// The opaque data of tool turn `turn`'s redacted thinking block.
fn redacted_data(turn: usize) -> String {
    format!("mock-redacted-{turn}-EmwKAhgBEgy3va3pzix")
}

/// The signature the mock gives a thinking block: a hash of its text, so that a
/// thinking block sent back with other text, or with another block's signature, is
/// refused as Anthropic refuses it.
fn signature_of(thinking: &str) -> String {
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

/// The blocks of type `kind` in a Messages message's content.
fn blocks<'a>(message: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |b| b.get("type").and_then(Value::as_str) == Some(kind))
}

/// Chat Completions' tool-call pairing (OpenAI answers 400 otherwise): an assistant
/// message with `tool_calls` is followed by `tool` messages answering each id, and a
/// `tool` message answers a call of the assistant message before it.
fn validate_chat_history(body: &Value) -> Result<(), String> {
    let messages = messages_of(body);
    // Ids of the last assistant message's calls not answered yet.
    let mut pending: Vec<String> = Vec::new();
    let unanswered = |pending: &[String]| {
        format!(
            "An assistant message with 'tool_calls' must be followed by tool messages \
             responding to each 'tool_call_id'. The following tool_call_ids did not have \
             response messages: {}",
            pending.join(", ")
        )
    };
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        if role == "tool" {
            let id = message
                .get("tool_call_id")
                .and_then(Value::as_str)
                .unwrap_or("");
            match pending.iter().position(|p| p == id) {
                Some(at) => {
                    pending.remove(at);
                }
                None => {
                    return Err(format!(
                        "Invalid parameter: messages.[{i}]: messages with role 'tool' must be \
                         a response to a preceeding message with 'tool_calls' (no pending call \
                         {id:?})."
                    ));
                }
            }
            continue;
        }
        if !pending.is_empty() {
            return Err(unanswered(&pending));
        }
        if role == "assistant" {
            for (k, call) in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let id = call.get("id").and_then(Value::as_str).unwrap_or("");
                let name = call.pointer("/function/name").and_then(Value::as_str);
                let args = call.pointer("/function/arguments").and_then(Value::as_str);
                if id.is_empty() || name.is_none_or(str::is_empty) || args.is_none() {
                    return Err(format!(
                        "Invalid parameter: messages.[{i}].tool_calls.[{k}]: a tool call needs \
                         an id, a function name and its arguments as a string."
                    ));
                }
                pending.push(id.to_owned());
            }
        }
    }
    if pending.is_empty() {
        Ok(())
    } else {
        Err(unanswered(&pending))
    }
}

/// The Messages API's rules for tool use and content (Anthropic answers 400 otherwise).
fn validate_messages_history(body: &Value) -> Result<(), String> {
    let messages = messages_of(body);
    let ids = |m: &Value, kind: &str, key: &str| -> Vec<String> {
        blocks(m, kind)
            .map(|b| {
                b.get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let empty = match message.get("content") {
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            _ => true,
        };
        let final_assistant = i + 1 == messages.len() && role == "assistant";
        if empty && !final_assistant {
            return Err(format!(
                "messages.{i}: all messages must have non-empty content except for the optional \
                 final assistant message"
            ));
        }
        for (k, block) in message
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if block.get("type").and_then(Value::as_str) == Some("tool_use")
                && !block.get("input").is_some_and(Value::is_object)
            {
                return Err(format!(
                    "messages.{i}.content.{k}.tool_use.input: Input should be a valid dictionary"
                ));
            }
        }
        let results = ids(message, "tool_result", "tool_use_id");
        if !results.is_empty() {
            let asked = if i > 0
                && messages[i - 1].get("role").and_then(Value::as_str) == Some("assistant")
            {
                ids(&messages[i - 1], "tool_use", "id")
            } else {
                Vec::new()
            };
            if let Some(stray) = results.iter().find(|r| !asked.contains(r)) {
                return Err(format!(
                    "messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: \
                     {stray}. Each `tool_result` block must have a corresponding `tool_use` block \
                     in the previous message."
                ));
            }
            let kinds: Vec<&str> = message
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|b| b.get("type").and_then(Value::as_str))
                .collect();
            if let Some(first_other) = kinds.iter().position(|k| *k != "tool_result")
                && kinds[first_other..].contains(&"tool_result")
            {
                return Err(format!(
                    "messages.{i}.content: `tool_result` blocks must come before any other \
                     content in their message"
                ));
            }
        }
        for (k, block) in blocks(message, "thinking").enumerate() {
            let text = block.get("thinking").and_then(Value::as_str).unwrap_or("");
            let signature = block.get("signature").and_then(Value::as_str).unwrap_or("");
            if signature != signature_of(text) {
                return Err(format!(
                    "messages.{i}.content.{k}: Invalid `signature` in `thinking` block"
                ));
            }
        }
        if blocks(message, "redacted_thinking").any(|b| {
            b.get("data")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        }) {
            return Err(format!(
                "messages.{i}.content: Invalid `data` in `redacted_thinking` block"
            ));
        }
        if role == "assistant" {
            let uses = ids(message, "tool_use", "id");
            if uses.is_empty() {
                continue;
            }
            let next = messages.get(i + 1);
            let answered = match next {
                Some(n) if n.get("role").and_then(Value::as_str) == Some("user") => {
                    ids(n, "tool_result", "tool_use_id")
                }
                _ => Vec::new(),
            };
            let missing: Vec<&str> = uses
                .iter()
                .filter(|u| !answered.contains(u))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "messages.{}: `tool_use` ids were found without `tool_result` blocks \
                     immediately after: {}. Each `tool_use` block must have a corresponding \
                     `tool_result` block in the next message.",
                    i + 1,
                    missing.join(", ")
                ));
            }
        }
    }
    // With thinking on, the assistant turn the last tool results answer must start
    // with its thinking (Anthropic docs, "Extended thinking with tool use": the signed
    // block is sent back as it came).
    let last = messages.len().wrapping_sub(1);
    if thinking_enabled(body)
        && let Some(results) = messages.get(last)
        && blocks(results, "tool_result").next().is_some()
        && last > 0
    {
        let first = messages[last - 1]
            .get("content")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .and_then(|b| b.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("text");
        if first != "thinking" && first != "redacted_thinking" {
            return Err(format!(
                "messages.{}.content.0.type: Expected `thinking` or `redacted_thinking`, but \
                 found `{first}`. When `thinking` is enabled, a final `assistant` message must \
                 start with a thinking block (preceeding the lastmost set of `tool_use` and \
                 `tool_result` blocks). We recommend you include thinking blocks from previous \
                 turns. To avoid this requirement, disable `thinking`. Please consult our \
                 documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking",
                last - 1
            ));
        }
    }
    Ok(())
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

/// `message_start` and the start of text block 0.
fn anthropic_text_start(model: &str) -> Vec<String> {
    vec![
        event_frame(&message_start(model, 10)),
        event_frame(&json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}})),
    ]
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

/// `message_delta` with `stop_reason` and cumulative usage.
fn message_delta(stop_reason: &str, input_tokens: usize, output_tokens: usize) -> Value {
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
fn anthropic_text_frames(model: &str, body: &Value, text: &str) -> Vec<String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn plain(scenario: Scenario, delay_ms: u64) -> Plan {
        Plan {
            wrappers: Vec::new(),
            scenario,
            delay: Duration::from_millis(delay_ms),
            calls: 2,
            undeclared: None,
            quiet: Quiet {
                every: Duration::from_millis(100),
                ..Quiet::default()
            },
        }
    }

    #[test]
    fn parses_models() {
        assert_eq!(
            parse_model("fixture:openai/chat-text-usage.sse?delay_ms=5"),
            Ok(plain(
                Scenario::Fixture("openai/chat-text-usage.sse".into()),
                5
            ))
        );
        assert_eq!(
            parse_model("status:429"),
            Ok(plain(Scenario::Status(429), 0))
        );
        assert_eq!(parse_model("echo"), Ok(plain(Scenario::Echo, 0)));
        assert_eq!(parse_model("stall"), Ok(plain(Scenario::Stall, 0)));
        assert_eq!(
            parse_model("overloaded?delay_ms=1"),
            Ok(plain(Scenario::Overloaded, 1))
        );
        assert!(parse_model("gpt-4o").is_err());
        assert!(parse_model("echo?speed=3").is_err());
        assert!(parse_model("status:abc").is_err());
    }

    #[test]
    fn parses_wrappers_and_counts_through_them() {
        let plan = parse_model("dropmid:1:flaky:2:429+ra3:pass:1:stall:1:tools?calls=3").unwrap();
        assert_eq!(
            plan.wrappers,
            vec![
                (1, Fault::DropMid),
                (2, Fault::Status(429, RetryAfter::Secs(3))),
                (1, Fault::Pass),
                (1, Fault::StallMid),
            ]
        );
        assert_eq!(plan.scenario, Scenario::Tools { forever: false });
        assert_eq!(plan.calls, 3);
        let faults: Vec<Option<Fault>> = (0..7).map(|i| plan.fault_for(i)).collect();
        assert_eq!(
            faults,
            vec![
                Some(Fault::DropMid),
                Some(Fault::Status(429, RetryAfter::Secs(3))),
                Some(Fault::Status(429, RetryAfter::Secs(3))),
                None,
                Some(Fault::StallMid),
                None,
                None,
            ]
        );
        for (spec, fault) in [
            ("flaky:1:500:echo", Fault::Status(500, RetryAfter::None)),
            (
                "flaky:1:429+ram150:echo",
                Fault::Status(429, RetryAfter::Millis(150)),
            ),
            (
                "flaky:1:503+radate2:echo",
                Fault::Status(503, RetryAfter::DateIn(2)),
            ),
            ("closemid:1:echo", Fault::CloseMid),
            ("nobyte:1:echo", Fault::NoByte),
            ("malformedmid:1:echo", Fault::MalformedMid),
            ("overloaded:1:echo", Fault::OverloadedMid),
        ] {
            let plan = parse_model(spec).unwrap();
            assert_eq!(plan.wrappers, vec![(1, fault)], "{spec}");
            assert_eq!(plan.scenario, Scenario::Echo, "{spec}");
        }
        for bad in [
            "flaky:x:500:echo",
            "flaky:1:echo",
            "flaky:1:429+wait3:echo",
            "dropmid:echo",
            "dropmid:1:nope",
            "tools?calls=x",
        ] {
            assert!(parse_model(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)),
            "Wed, 21 Oct 2015 07:28:00 GMT"
        );
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_001)),
            "Tue, 29 Feb 2000 00:00:01 GMT"
        );
    }

    #[test]
    fn prefixes_stop_before_the_end_of_the_stream() {
        let body = json!({"messages": [{"role": "user", "content": "a b c d e f g h"}]});
        let frames = prefix(echo_frames("m", &body), Dialect::ChatCompletions);
        // role + 8 words before the end: the first 5.
        assert_eq!(frames.len(), 5);
        assert!(
            frames
                .iter()
                .all(|f| !is_end_frame(f, Dialect::ChatCompletions))
        );
        let frames = prefix(anthropic_echo_frames("m", &body), Dialect::Messages);
        // message_start, block start, ping, 8 words, block stop: the first 6.
        assert_eq!(frames.len(), 6);
        assert!(frames[5].contains("\"text\":\" c\""), "{frames:?}");
        for path in fixture_paths() {
            let dialect = if path.starts_with("anthropic/") {
                Dialect::Messages
            } else {
                Dialect::ChatCompletions
            };
            let all = fixture_frames(path, dialect).unwrap();
            let cut = prefix(all.clone(), dialect);
            assert!(!cut.is_empty() && cut.len() < all.len(), "{path}");
            assert!(!cut.concat().contains("[DONE]"), "{path}");
            assert!(!cut.concat().contains("message_stop"), "{path}");
        }
    }

    /// The tool calls a Chat Completions stream makes: (id, name, arguments).
    fn chat_calls(frames: &[String]) -> Vec<(String, String, String)> {
        let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
        for f in frames {
            let Some(data) = f.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            for call in v
                .pointer("/choices/0/delta/tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let e = calls.entry(call["index"].as_u64().unwrap()).or_default();
                if let Some(id) = call["id"].as_str() {
                    e.0 = id.into();
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    e.1 = name.into();
                }
                e.2.push_str(
                    call.pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                );
            }
        }
        calls.into_values().collect()
    }

    #[test]
    fn tools_turns_call_every_declared_tool_then_answer() {
        let tools = json!([
            {"type": "function", "function": {"name": "calculator",
                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "lookup",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                    "days": {"type": "integer"}}}}},
        ]);
        let body = json!({"model": "tools", "tools": tools,
            "messages": [{"role": "user", "content": "go"}]});
        let frames = tools_frames(Dialect::ChatCompletions, "tools", &body, false, 2, None);
        assert_eq!(
            chat_calls(&frames),
            vec![
                (
                    "call_mock_0_0".into(),
                    "calculator".into(),
                    r#"{"expression":"6 * 7"}"#.into()
                ),
                (
                    "call_mock_0_1".into(),
                    "calculator".into(),
                    r#"{"expression":"7 * 7"}"#.into()
                ),
                (
                    "call_mock_0_2".into(),
                    "lookup".into(),
                    r#"{"city":"city-0-2","days":2}"#.into()
                ),
                (
                    "call_mock_0_3".into(),
                    "lookup".into(),
                    r#"{"city":"city-0-3","days":3}"#.into()
                ),
            ]
        );
        assert!(
            frames
                .iter()
                .any(|f| f.contains("\"finish_reason\":\"tool_calls\""))
        );
        // Fragments of the calls are interleaved.
        let first_args: Vec<usize> = frames
            .iter()
            .enumerate()
            .filter(|(_, f)| f.contains("\"index\":1"))
            .map(|(i, _)| i)
            .collect();
        assert!(
            first_args[0]
                < frames
                    .iter()
                    .rposition(|f| f.contains("\"index\":0,"))
                    .unwrap()
        );
        // With the results: the answer.
        let mut answered = body.clone();
        answered["messages"] = json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_mock_0_0", "type": "function", "function": {"name": "calculator", "arguments": "{}"}},
                {"id": "call_mock_0_1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_mock_0_0", "content": "42"},
            {"role": "tool", "tool_call_id": "call_mock_0_1", "content": "49"},
        ]);
        let text: String =
            tools_frames(Dialect::ChatCompletions, "tools", &answered, false, 2, None)
                .iter()
                .filter_map(|f| f.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
                .filter_map(|v| {
                    v.pointer("/choices/0/delta/content")?
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
        assert_eq!(text, "The tools said: 42; 49.");
        // Forever: a second turn of calls, with new ids and arguments.
        let again = tools_frames(
            Dialect::ChatCompletions,
            "tools-forever",
            &answered,
            true,
            1,
            None,
        );
        assert_eq!(
            chat_calls(&again),
            vec![
                (
                    "call_mock_1_0".into(),
                    "calculator".into(),
                    r#"{"expression":"6 * 8"}"#.into()
                ),
                (
                    "call_mock_1_1".into(),
                    "lookup".into(),
                    r#"{"city":"city-1-1","days":1}"#.into()
                ),
            ]
        );
    }

    #[test]
    fn anthropic_tools_turns() {
        let body = json!({"model": "tools", "tools": [{"name": "calculator",
            "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "go"}]});
        let frames = tools_frames(Dialect::Messages, "tools", &body, false, 2, None);
        let payloads: Vec<Value> = frames
            .iter()
            .filter_map(|f| f.split_once("data: "))
            .filter_map(|(_, d)| serde_json::from_str(d.trim()).ok())
            .collect();
        let starts: Vec<&Value> = payloads
            .iter()
            .filter(|p| p["type"] == "content_block_start")
            .collect();
        assert_eq!(starts.len(), 2);
        assert_eq!(starts[1]["content_block"]["id"], "toolu_mock_0_1");
        let args: String = payloads
            .iter()
            .filter(|p| p["index"] == 1)
            .filter_map(|p| p.pointer("/delta/partial_json")?.as_str())
            .collect();
        assert_eq!(args, r#"{"expression":"7 * 7"}"#);
        assert!(
            payloads
                .iter()
                .any(|p| p.pointer("/delta/stop_reason") == Some(&json!("tool_use")))
        );
        let answered = json!({"model": "tools", "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_mock_0_0", "name": "calculator", "input": {}},
                {"type": "tool_use", "id": "toolu_mock_0_1", "name": "calculator", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_mock_0_0", "content": "42"},
                {"type": "tool_result", "tool_use_id": "toolu_mock_0_1", "content": [{"type": "text", "text": "49"}]}]},
        ]});
        assert_eq!(validate_messages_history(&answered), Ok(()));
        let text: String = tools_frames(Dialect::Messages, "tools", &answered, false, 2, None)
            .iter()
            .filter_map(|f| f.split_once("data: "))
            .filter_map(|(_, d)| serde_json::from_str::<Value>(d.trim()).ok())
            .filter_map(|v| v.pointer("/delta/text")?.as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, "The tools said: 42; 49.");
        // Results followed by the next question (how a later turn is sent): a new
        // tool turn, the second of the conversation.
        let mut next = answered.clone();
        next["tools"] = body["tools"].clone();
        next["messages"][2]["content"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "text", "text": "and again"}));
        assert_eq!(validate_messages_history(&next), Ok(()));
        let frames = tools_frames(Dialect::Messages, "tools", &next, false, 1, None);
        assert!(
            frames.concat().contains("\"id\":\"toolu_mock_1_0\""),
            "{frames:?}"
        );
    }

    #[test]
    fn chat_history_pairs_every_call_with_its_result() {
        let call = |id: &str| {
            json!({"id": id, "type": "function",
            "function": {"name": "f", "arguments": "{}"}})
        };
        let check = |messages: Value| validate_chat_history(&json!({"messages": messages}));
        assert_eq!(check(json!([{"role": "user", "content": "hi"}])), Ok(()));
        assert_eq!(
            check(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [call("a"), call("b")]},
                {"role": "tool", "tool_call_id": "b", "content": "1"},
                {"role": "tool", "tool_call_id": "a", "content": "2"},
                {"role": "user", "content": "more"},
            ])),
            Ok(())
        );
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [call("a"), call("b")]},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
            {"role": "user", "content": "more"},
        ]))
        .unwrap_err();
        assert!(e.contains("did not have response messages: b"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [call("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains(": a"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
        ]))
        .unwrap_err();
        assert!(e.contains("role 'tool'"), "{e}");
        let e = check(json!([
            {"role": "assistant", "content": null, "tool_calls": [call("a")]},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
        ]))
        .unwrap_err();
        assert!(e.contains("role 'tool'"), "{e}");
    }

    /// With thinking on, the tool turn starts with a signed thinking block and a
    /// redacted one; its results are accepted only after that turn sent back as it
    /// came, with Anthropic's words otherwise.
    #[test]
    fn thinking_tool_turns_need_their_signed_blocks_back() {
        let body = json!({"model": "tools", "thinking": {"type": "enabled", "budget_tokens": 1024},
            "tools": [{"name": "calculator",
            "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "go"}]});
        let payloads: Vec<Value> = tools_frames(Dialect::Messages, "tools", &body, false, 1, None)
            .iter()
            .filter_map(|f| f.split_once("data: "))
            .filter_map(|(_, d)| serde_json::from_str(d.trim()).ok())
            .collect();
        let starts: Vec<&str> = payloads
            .iter()
            .filter(|p| p["type"] == "content_block_start")
            .filter_map(|p| p.pointer("/content_block/type")?.as_str())
            .collect();
        assert_eq!(starts, ["thinking", "redacted_thinking", "tool_use"]);
        let thinking: String = payloads
            .iter()
            .filter_map(|p| p.pointer("/delta/thinking")?.as_str())
            .collect();
        assert_eq!(thinking, thinking_text(0));
        let signature = payloads
            .iter()
            .find_map(|p| p.pointer("/delta/signature")?.as_str())
            .unwrap();
        assert_eq!(signature, signature_of(&thinking));
        assert_eq!(
            payloads[1..]
                .iter()
                .filter(|p| p["index"] == 2 && p["type"] == "content_block_start")
                .count(),
            1
        );

        let turn = |assistant: Value| {
            json!({"model": "tools", "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": assistant},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_mock_0_0", "content": "42"}]},
            ]})
        };
        let use_ =
            json!({"type": "tool_use", "id": "toolu_mock_0_0", "name": "calculator", "input": {}});
        let signed = json!({"type": "thinking", "thinking": thinking, "signature": signature});
        let redacted = json!({"type": "redacted_thinking", "data": redacted_data(0)});
        assert_eq!(
            validate_messages_history(&turn(json!([signed, redacted, use_]))),
            Ok(())
        );
        assert_eq!(
            validate_messages_history(&turn(json!([redacted, use_]))),
            Ok(())
        );
        let e = validate_messages_history(&turn(json!([use_]))).unwrap_err();
        assert!(
            e.starts_with(
                "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but \
                 found `tool_use`. When `thinking` is enabled, a final `assistant` message must \
                 start with a thinking block"
            ),
            "{e}"
        );
        let tampered = json!({"type": "thinking", "thinking": "other", "signature": signature});
        let e = validate_messages_history(&turn(json!([tampered, use_]))).unwrap_err();
        assert!(e.contains("Invalid `signature`"), "{e}");
        let unsigned = json!({"type": "thinking", "thinking": thinking});
        assert!(validate_messages_history(&turn(json!([unsigned, use_]))).is_err());
        // Without thinking, nothing of the kind is asked for.
        let mut off = turn(json!([use_]));
        off.as_object_mut().unwrap().remove("thinking");
        assert_eq!(validate_messages_history(&off), Ok(()));
    }

    #[test]
    fn quiet_stretches_send_keepalives_or_nothing() {
        let quiet = Quiet {
            lead: Duration::from_millis(250),
            gap: Duration::ZERO,
            every: Duration::from_millis(100),
        };
        let mut pieces = Vec::new();
        quiet_pieces(&mut pieces, quiet.lead, quiet, Dialect::ChatCompletions);
        let shape: Vec<String> = pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.clone(),
                Piece::Wait(d) => d.as_millis().to_string(),
            })
            .collect();
        assert_eq!(
            shape,
            [
                ": OPENROUTER PROCESSING\n\n",
                "100",
                ": OPENROUTER PROCESSING\n\n",
                "100",
                ": OPENROUTER PROCESSING\n\n",
                "50"
            ]
        );
        let mut pieces = Vec::new();
        let silent = Quiet {
            every: Duration::ZERO,
            ..quiet
        };
        quiet_pieces(&mut pieces, silent.lead, silent, Dialect::Messages);
        assert!(matches!(pieces.as_slice(), [Piece::Wait(d)] if d.as_millis() == 250));
        assert_eq!(
            keepalive(Dialect::Messages),
            "event: ping\ndata: {\"type\": \"ping\"}\n\n"
        );
        let plan =
            parse_model("noend:1:echo?lead_ms=5&gap_ms=7&keepalive_ms=0&call=lookup").unwrap();
        assert_eq!(plan.wrappers, vec![(1, Fault::NoTerminator)]);
        assert_eq!(
            plan.quiet,
            Quiet {
                lead: Duration::from_millis(5),
                gap: Duration::from_millis(7),
                every: Duration::ZERO
            }
        );
        assert_eq!(plan.undeclared.as_deref(), Some("lookup"));
        assert!(is_terminator("data: [DONE]\n\n"));
        assert!(is_terminator(
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        ));
        assert!(!is_terminator("data: {\"choices\":[]}\n\n"));
    }

    #[test]
    fn messages_history_pairs_every_tool_use_with_a_result() {
        let check = |messages: Value| validate_messages_history(&json!({"messages": messages}));
        let use_ = |id: &str| json!({"type": "tool_use", "id": id, "name": "f", "input": {}});
        let result = |id: &str| json!({"type": "tool_result", "tool_use_id": id, "content": "x"});
        assert_eq!(
            check(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}, use_("a"), use_("b")]},
                {"role": "user", "content": [result("a"), result("b"), {"type": "text", "text": "next"}]},
            ])),
            Ok(())
        );
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a"), use_("b")]},
            {"role": "user", "content": [result("a")]},
        ]))
        .unwrap_err();
        assert!(e.starts_with("messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: b"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a")]},
            {"role": "user", "content": "no results"},
        ]))
        .unwrap_err();
        assert!(e.contains("without `tool_result`"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains("without `tool_result`"), "{e}");
        let e = check(json!([
            {"role": "user", "content": [result("zz")]},
        ]))
        .unwrap_err();
        assert!(e.contains("unexpected `tool_use_id`"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a")]},
            {"role": "user", "content": [{"type": "text", "text": "first"}, result("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains("must come before"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": []},
            {"role": "user", "content": "again"},
        ]))
        .unwrap_err();
        assert!(e.contains("non-empty content"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": "{}"}]},
            {"role": "user", "content": [result("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains("valid dictionary"), "{e}");
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
