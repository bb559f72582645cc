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
//!
//! ## Where things are
//!
//! | module | holds |
//! |---|---|
//! | `model` | the model-name language: a `model` string parsed into wrappers, a scenario and options |
//! | `answer` | the endpoints' handler: record, check the history, pick the answer, apply a wrapper's failure |
//! | `body` | the streamed body: delays, keep-alives, silences, and how it ends |
//! | `status` | HTTP error answers and their wait headers |
//! | `chat_completions`, `messages` | the two wire dialects: frames and error bodies |
//! | `tools` | the `tools` scenarios: which calls a turn makes, with which arguments |
//! | `history` | the history checks the real APIs make |
//! | `fixtures` | the embedded recordings and how each is framed |
//! | `recorder` | the log of requests, rejections and per-model counts |
//! | `request`, `pieces` | reading a request body; cutting text into streamed pieces |

#![warn(missing_docs)]

mod answer;
mod body;
mod chat_completions;
mod fixtures;
mod history;
mod messages;
mod model;
mod pieces;
mod recorder;
mod request;
mod status;
mod tools;

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::routing::post;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use fixtures::{fixture, fixture_paths};
pub use recorder::{RecordedRequest, Recorder, Rejection};

use answer::{chat_completions, messages};

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

/// Which API a request speaks: it decides the framing of streams and error bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `data: <line>`, then `data: [DONE]`.
    ChatCompletions,
    /// `event: <type>` + `data: <line>`, no terminator of its own (`message_stop` is a
    /// line of the file).
    Messages,
}
