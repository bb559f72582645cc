//! Parsing a Messages API event stream into provider events.
//!
//! The wire (Anthropic API docs, "Streaming Messages"): named SSE events whose `data:`
//! is one JSON object with a matching `type`, in this order: `message_start` (the
//! message, with its initial `usage`), then for each content block `content_block_start`,
//! any number of `content_block_delta`, `content_block_stop` (each with the block's
//! `index`), then one or more `message_delta` (`delta.stop_reason`, `usage`), then
//! `message_stop`. `ping` events may come anywhere, and an `error` event (e.g.
//! `overloaded_error`) may come instead of the rest of the stream. The docs' versioning
//! policy says new event types may be added and must be handled gracefully, so unknown
//! event, block and delta types are ignored, never fatal. The types here are
//! hand-written and lenient: every field is optional unless the event means nothing
//! without it (a content block's `index`, a `tool_use` block's `id` and `name`),
//! unknown fields are ignored, and the spaces Anthropic pads its JSON with before the
//! closing brace are plain JSON whitespace.
//!
//! They are strict about what would lose data silently: a `data:` that is not JSON is a
//! `Malformed` error, never skipped; an `error` event is an `Upstream` error quoting its
//! `error.type` and `error.message` (`overloaded_error: Overloaded`), which the engine's
//! retry layer reads; a stream that ends without `message_stop` is `Truncated`.
//!
//! Mapping, by delta type (a block's deltas all have its type):
//! - `text_delta` → `Text`; `thinking_delta` → `Reasoning` (empty ones are dropped);
//!   `signature_delta` (the thinking block's signature, its last delta) →
//!   `ReasoningSignature`, and a `redacted_thinking` block (opaque `data` in its start,
//!   no deltas) → `RedactedReasoning`: with extended thinking on, the API wants both
//!   back verbatim at the start of an assistant turn with tool calls, or it refuses the
//!   tool results (see `request`). A thinking block whose start already holds its text
//!   or signature gives them too. `citations_delta` is ignored.
//! - A `tool_use` block → `ToolCall` fragments with `index` = the block's index: the
//!   first `input_json_delta` carries the `id` and `name` from `content_block_start`,
//!   later non-empty `partial_json` fragments the rest of the arguments. A call with no
//!   parameters streams a single `partial_json: ""` (the recorded
//!   `messages-tool-use-empty-input.sse`); so that the concatenated arguments are
//!   always a JSON object text, a block that ends (`content_block_stop`) with no
//!   non-empty fragment gets one more fragment `"{}"` (or the block start's `input`, if
//!   a server sent it there whole). The engine therefore never sees empty arguments.
//! - Blocks of tools that Anthropic runs itself (`server_tool_use`, `mcp_tool_use`) and
//!   their `*_tool_result` blocks are ignored: the engine must not run them, and their
//!   outcome reaches the answer as text blocks. `compaction` blocks are ignored too.
//! - `message_delta.delta.stop_reason` → the `Finish` reason (`end_turn`, `tool_use`,
//!   `max_tokens`, `stop_sequence`, `pause_turn`, `refusal`); no reason, no `Finish`.
//!
//! Usage (docs/protocol.md §7): `message_start.message.usage` gives the counts so far and each
//! `message_delta.usage` the cumulative totals ("the token counts shown in the usage
//! field of the message_delta event are cumulative"); newer API versions repeat
//! `input_tokens` and the cache fields there. The two are never added: each count is
//! the largest reported. When the server compacted the context first, the top-level
//! counts leave out the compaction step, and `usage.iterations` lists every sampling
//! step (Anthropic docs, "Compaction"): the counts are then the sums over the
//! iterations, which is what was billed (`messages-cache-read-compaction.sse`: input
//! 100 + 181, cache read 55096, output 83 + 8). The record has `input_tokens` without
//! the cache (`input_includes_cache: false`), `cache_write_tokens` =
//! `cache_creation_input_tokens`, `cache_read_tokens` = `cache_read_input_tokens`, and
//! `reasoning_tokens` = `output_tokens_details.thinking_tokens` when sent. It is emitted
//! once, after `message_stop`, followed by `Finish`. A stream that fails after a
//! `message_delta` (whose totals are final) still emits it before the error; before
//! that, the engine estimates.

use std::collections::BTreeMap;

use genstream_engine::provider::{ProviderError, ProviderErrorKind, ProviderEvent};
use genstream_engine::usage::UsageRecord;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sse_stream::Sse;

use super::error_detail;
use crate::error_text::truncate;
use crate::http::reported_error;
use crate::sse::{FrameParser, Item, SNIPPET_CHARS};

/// The event types this parser acts on; events named otherwise are skipped unread.
const KNOWN_EVENTS: &[&str] = &[
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
];

/// `message_start`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MessageStart {
    message: Option<MessageInfo>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MessageInfo {
    usage: Option<Usage>,
}

/// `content_block_start`.
#[derive(Debug, Deserialize)]
struct BlockStart {
    index: u32,
    #[serde(default)]
    content_block: Option<ContentBlock>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    name: Option<String>,
    input: Option<Value>,
    text: Option<String>,
    thinking: Option<String>,
    signature: Option<String>,
    data: Option<String>,
}

/// `content_block_delta`.
#[derive(Debug, Deserialize)]
struct BlockDelta {
    index: u32,
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Delta {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    thinking: Option<String>,
    signature: Option<String>,
    partial_json: Option<String>,
}

/// `content_block_stop`.
#[derive(Debug, Deserialize)]
struct BlockStop {
    index: u32,
}

/// `message_delta`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MessageDelta {
    delta: Option<MessageDeltaBody>,
    usage: Option<Usage>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MessageDeltaBody {
    stop_reason: Option<String>,
}

/// Anthropic's `usage` (docs/protocol.md §7); also the shape of each `iterations` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    output_tokens_details: Option<OutputTokensDetails>,
    /// Per sampling step, when the server compacted the context (beta).
    iterations: Option<Vec<Usage>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OutputTokensDetails {
    thinking_tokens: Option<u64>,
}

/// Token counts as reported so far; `None` where never reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    input: Option<u64>,
    output: Option<u64>,
    cache_write: Option<u64>,
    cache_read: Option<u64>,
    reasoning: Option<u64>,
}

impl Counts {
    /// The counts of one `usage` object: the sums over its `iterations` where it has
    /// any (the top-level counts then leave out the compaction step), else its own.
    fn of(usage: &Usage) -> Counts {
        let iterations = usage.iterations.as_deref().unwrap_or_default();
        let field = |get: fn(&Usage) -> Option<u64>| {
            iterations
                .iter()
                .filter_map(get)
                .reduce(u64::saturating_add)
                .or_else(|| get(usage))
        };
        Counts {
            input: field(|u| u.input_tokens),
            output: field(|u| u.output_tokens),
            cache_write: field(|u| u.cache_creation_input_tokens),
            cache_read: field(|u| u.cache_read_input_tokens),
            reasoning: usage
                .output_tokens_details
                .as_ref()
                .and_then(|d| d.thinking_tokens),
        }
    }

    /// Folds in a later report: each count is the largest reported, never a sum
    /// (reports are cumulative).
    fn merge(&mut self, later: Counts) {
        let max = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.input = max(self.input, later.input);
        self.output = max(self.output, later.output);
        self.cache_write = max(self.cache_write, later.cache_write);
        self.cache_read = max(self.cache_read, later.cache_read);
        self.reasoning = max(self.reasoning, later.reasoning);
    }
}

/// What a started content block is, as far as this parser cares.
#[derive(Debug)]
enum Block {
    /// A client tool call being streamed.
    ToolUse {
        id: String,
        name: String,
        /// The block start's `input` (normally `{}`).
        start_input: Option<Value>,
        /// Whether the fragment carrying `id` and `name` was emitted.
        head_sent: bool,
        /// Whether a non-empty `partial_json` came.
        has_args: bool,
    },
    /// Text, thinking, or a block this parser ignores.
    Other,
}

/// Turns SSE events of one Messages stream into provider events.
#[derive(Debug)]
pub(crate) struct EventParser {
    provider: String,
    model: String,
    call_index: u32,
    /// Started, not yet stopped blocks by index.
    blocks: BTreeMap<u32, Block>,
    usage: Option<Counts>,
    /// Whether a `message_delta` reported usage (the totals are then final).
    final_usage: bool,
    stop_reason: Option<String>,
    done: bool,
}

impl EventParser {
    /// A parser for a stream from provider `provider` (its config name, for messages),
    /// reporting usage for configured model `model`, call `call_index`.
    pub(crate) fn new(provider: &str, model: &str, call_index: u32) -> Self {
        EventParser {
            provider: provider.to_owned(),
            model: model.to_owned(),
            call_index,
            blocks: BTreeMap::new(),
            usage: None,
            final_usage: false,
            stop_reason: None,
            done: false,
        }
    }

    fn malformed(&self, what: &str, data: &str) -> ProviderError {
        ProviderError::new(
            ProviderErrorKind::Malformed,
            format!(
                "{}: upstream sent {what}: {}",
                self.provider,
                truncate(data, SNIPPET_CHARS)
            ),
        )
    }

    /// `value` read as event type `T`, or a `Malformed` error quoting `data`.
    fn parse<T: DeserializeOwned>(
        &self,
        kind: &str,
        value: Value,
        data: &str,
    ) -> Result<T, ProviderError> {
        serde_json::from_value(value)
            .map_err(|e| self.malformed(&format!("a `{kind}` event that is not valid ({e})"), data))
    }

    fn on_event(
        &mut self,
        kind: &str,
        value: Value,
        data: &str,
    ) -> Result<Vec<Item>, ProviderError> {
        let mut out = Vec::new();
        match kind {
            "message_start" => {
                let start: MessageStart = self.parse(kind, value, data)?;
                if let Some(usage) = start.message.and_then(|m| m.usage) {
                    self.add_usage(&usage);
                }
            }
            "content_block_start" => {
                let start: BlockStart = self.parse(kind, value, data)?;
                let block = start.content_block.unwrap_or_default();
                let block = match block.kind.as_deref() {
                    Some("text") => {
                        push_text(&mut out, ProviderEvent::Text, block.text);
                        Block::Other
                    }
                    Some("thinking") => {
                        push_text(&mut out, ProviderEvent::Reasoning, block.thinking);
                        push_text(&mut out, ProviderEvent::ReasoningSignature, block.signature);
                        Block::Other
                    }
                    Some("redacted_thinking") => {
                        push_text(&mut out, ProviderEvent::RedactedReasoning, block.data);
                        Block::Other
                    }
                    Some("tool_use") => {
                        let id = block.id.filter(|s| !s.is_empty());
                        let name = block.name.filter(|s| !s.is_empty());
                        let (Some(id), Some(name)) = (id, name) else {
                            return Err(self.malformed("a tool_use block without id or name", data));
                        };
                        Block::ToolUse {
                            id,
                            name,
                            start_input: block.input,
                            head_sent: false,
                            has_args: false,
                        }
                    }
                    _ => Block::Other,
                };
                self.blocks.insert(start.index, block);
            }
            "content_block_delta" => {
                let delta: BlockDelta = self.parse(kind, value, data)?;
                let index = delta.index;
                let delta = delta.delta.unwrap_or_default();
                match delta.kind.as_deref() {
                    Some("text_delta") => push_text(&mut out, ProviderEvent::Text, delta.text),
                    Some("thinking_delta") => {
                        push_text(&mut out, ProviderEvent::Reasoning, delta.thinking);
                    }
                    Some("signature_delta") => {
                        push_text(&mut out, ProviderEvent::ReasoningSignature, delta.signature);
                    }
                    Some("input_json_delta") => match self.blocks.get_mut(&index) {
                        Some(Block::ToolUse {
                            id,
                            name,
                            head_sent,
                            has_args,
                            ..
                        }) => {
                            let args = delta.partial_json.unwrap_or_default();
                            *has_args |= !args.is_empty();
                            if !*head_sent {
                                *head_sent = true;
                                out.push(Ok(ProviderEvent::ToolCall {
                                    index,
                                    id: Some(id.clone()),
                                    name: Some(name.clone()),
                                    args,
                                }));
                            } else if !args.is_empty() {
                                out.push(Ok(ProviderEvent::ToolCall {
                                    index,
                                    id: None,
                                    name: None,
                                    args,
                                }));
                            }
                        }
                        // The input of a server-side tool: not ours to run.
                        Some(Block::Other) => {}
                        None => {
                            return Err(self.malformed(
                                &format!("input_json_delta for content block {index}, which was not started"),
                                data,
                            ));
                        }
                    },
                    // citations_delta, compaction_delta, future types.
                    _ => {}
                }
            }
            "content_block_stop" => {
                let stop: BlockStop = self.parse(kind, value, data)?;
                if let Some(block) = self.blocks.remove(&stop.index) {
                    out.extend(close_block(stop.index, block));
                }
            }
            "message_delta" => {
                let delta: MessageDelta = self.parse(kind, value, data)?;
                if let Some(reason) = delta
                    .delta
                    .and_then(|d| d.stop_reason)
                    .filter(|r| !r.is_empty())
                {
                    self.stop_reason = Some(reason);
                }
                if let Some(usage) = delta.usage {
                    self.add_usage(&usage);
                    self.final_usage = true;
                }
            }
            "message_stop" => {
                self.done = true;
                // Blocks a server left open still give their calls whole arguments.
                for (index, block) in std::mem::take(&mut self.blocks) {
                    out.extend(close_block(index, block));
                }
                out.extend(self.usage_event().map(Ok));
                out.extend(
                    self.stop_reason
                        .take()
                        .map(|r| Ok(ProviderEvent::Finish(r))),
                );
            }
            "error" => {
                let mut error = reported_error(
                    &self.provider,
                    Some(&value),
                    &truncate(data, SNIPPET_CHARS),
                    error_detail,
                );
                // The status Anthropic uses for this error type over HTTP, so the retry
                // layer classifies an in-stream error exactly like the HTTP one.
                if error.status.is_none() {
                    error.status = error.codes.first().and_then(|t| status_of_error_type(t));
                }
                return Err(error);
            }
            // ping, and event types added after this was written.
            _ => {}
        }
        Ok(out)
    }

    fn add_usage(&mut self, usage: &Usage) {
        self.usage
            .get_or_insert_with(Counts::default)
            .merge(Counts::of(usage));
    }

    fn usage_event(&self) -> Option<ProviderEvent> {
        let counts = self.usage?;
        Some(ProviderEvent::Usage(UsageRecord {
            call_index: self.call_index,
            model: self.model.clone(),
            // The configured name, like every provider's usage.
            provider: self.provider.clone(),
            input_tokens: counts.input.unwrap_or(0),
            output_tokens: counts.output.unwrap_or(0),
            cache_write_tokens: counts.cache_write.unwrap_or(0),
            cache_read_tokens: counts.cache_read.unwrap_or(0),
            reasoning_tokens: counts.reasoning.unwrap_or(0),
            input_includes_cache: false,
            estimated: false,
        }))
    }

    /// The items ending a failed stream: the final usage if it came, then `error`.
    fn fail(&self, error: ProviderError) -> Vec<Item> {
        let usage = self.usage_event().filter(|_| self.final_usage);
        usage.map(Ok).into_iter().chain([Err(error)]).collect()
    }
}

/// The HTTP status Anthropic documents for an error `type` ("Errors", HTTP errors).
fn status_of_error_type(t: &str) -> Option<u16> {
    Some(match t {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "overloaded_error" => 529,
        _ => return None,
    })
}

/// Pushes `wrap(text)` when `text` is non-empty.
fn push_text(out: &mut Vec<Item>, wrap: fn(String) -> ProviderEvent, text: Option<String>) {
    if let Some(text) = text.filter(|t| !t.is_empty()) {
        out.push(Ok(wrap(text)));
    }
}

/// The last fragment of a stopped block: for a tool call that streamed no arguments,
/// `{}` (or the start's `input`), with `id` and `name` if they were not sent yet.
fn close_block(index: u32, block: Block) -> Option<Item> {
    let Block::ToolUse {
        id,
        name,
        start_input,
        head_sent,
        has_args,
    } = block
    else {
        return None;
    };
    if has_args {
        return None;
    }
    let args = match start_input {
        Some(input @ Value::Object(_)) => input.to_string(),
        _ => Value::Object(Map::new()).to_string(),
    };
    Some(Ok(ProviderEvent::ToolCall {
        index,
        id: (!head_sent).then_some(id),
        name: (!head_sent).then_some(name),
        args,
    }))
}

impl FrameParser for EventParser {
    fn provider(&self) -> &str {
        &self.provider
    }

    fn on_frame(&mut self, sse: &Sse) -> Vec<Item> {
        let event = sse.event.as_deref().filter(|e| !e.is_empty());
        if let Some(event) = event
            && event != "message"
            && !KNOWN_EVENTS.contains(&event)
        {
            return Vec::new(); // a new event type: ignored, whatever its data
        }
        let Some(data) = sse.data.as_deref().map(str::trim) else {
            return Vec::new(); // `id:` / `retry:` alone
        };
        if data.is_empty() {
            return Vec::new(); // an empty keep-alive frame
        }
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            Err(_) if event == Some("error") => {
                let error = reported_error(
                    &self.provider,
                    None,
                    &truncate(data, SNIPPET_CHARS),
                    error_detail,
                );
                return self.fail(error);
            }
            Err(e) => {
                let error = self.malformed(&format!("an event that is not JSON ({e})"), data);
                return vec![Err(error)];
            }
        };
        // The JSON `type` names the event; the SSE event name repeats it.
        let kind = match (event, value.get("type").and_then(Value::as_str)) {
            (Some("error"), _) => "error".to_owned(),
            (_, Some(kind)) => kind.to_owned(),
            (Some(event), None) => event.to_owned(),
            (None, None) => return Vec::new(),
        };
        match self.on_event(&kind, value, data) {
            Ok(items) => items,
            Err(error) if error.kind == ProviderErrorKind::Upstream => self.fail(error),
            Err(error) => vec![Err(error)],
        }
    }

    /// The items for the end of the body without `message_stop`: `Truncated` (after
    /// the final usage, if a `message_delta` reported it).
    fn on_end(&mut self) -> Vec<Item> {
        if self.done {
            return Vec::new();
        }
        self.fail(ProviderError::new(
            ProviderErrorKind::Truncated,
            format!(
                "{}: upstream stream ended without message_stop",
                self.provider
            ),
        ))
    }

    /// True once `message_stop` was seen.
    fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::sse::event_stream;
    use bytes::Bytes;
    use futures::StreamExt;
    use genstream_mock_upstream::{fixture, fixture_paths};
    use tokio_util::sync::CancellationToken;

    /// Replays `text` through [`event_stream`], in chunks of `split` bytes (to exercise
    /// events cut across reads).
    async fn replay(text: &str, split: usize) -> Vec<Item> {
        let bytes: Vec<Result<Bytes, std::io::Error>> = text
            .as_bytes()
            .chunks(split)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let parser = EventParser::new("test", "configured-model", 2);
        event_stream(
            futures::stream::iter(bytes),
            parser,
            CancellationToken::new(),
            crate::deadline::Deadlines::relaxed(),
        )
        .collect()
        .await
    }

    /// A fixture as the mock upstream serves it on `/v1/messages`.
    fn wire(path: &str) -> String {
        let text = fixture(path).unwrap();
        if path.ends_with(".jsonl") {
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    format!("event: {}\ndata: {l}\n\n", v["type"].as_str().unwrap())
                })
                .collect()
        } else {
            text.to_owned()
        }
    }

    fn anthropic_paths() -> impl Iterator<Item = &'static str> {
        fixture_paths().filter(|p| p.starts_with("anthropic/"))
    }

    #[derive(Debug, Default)]
    struct Summary {
        text: String,
        reasoning: String,
        /// `ReasoningSignature`s, and how much reasoning had streamed before each.
        signatures: Vec<(String, usize)>,
        redacted: Vec<String>,
        tools: BTreeMap<u32, (String, String, String)>,
        usage: Option<UsageRecord>,
        usages: usize,
        finish: Option<String>,
        error: Option<ProviderError>,
        order: String,
    }

    fn summarize(items: Vec<Item>) -> Summary {
        let mut s = Summary::default();
        for item in items {
            assert!(s.error.is_none(), "an item after an error");
            assert!(s.finish.is_none(), "an item after finish");
            let c = match item {
                Ok(ProviderEvent::Text(t)) => {
                    s.text.push_str(&t);
                    't'
                }
                Ok(ProviderEvent::Reasoning(t)) => {
                    s.reasoning.push_str(&t);
                    'r'
                }
                Ok(ProviderEvent::ReasoningSignature(sig)) => {
                    s.signatures.push((sig, s.reasoning.len()));
                    continue;
                }
                Ok(ProviderEvent::RedactedReasoning(data)) => {
                    s.redacted.push(data);
                    continue;
                }
                Ok(ProviderEvent::ToolCall {
                    index,
                    id,
                    name,
                    args,
                }) => {
                    let e = s.tools.entry(index).or_default();
                    if let Some(id) = id {
                        assert!(e.0.is_empty(), "id sent twice");
                        e.0 = id;
                    }
                    if let Some(name) = name {
                        e.1 = name;
                    }
                    e.2.push_str(&args);
                    'c'
                }
                Ok(ProviderEvent::Usage(u)) => {
                    s.usage = Some(u);
                    s.usages += 1;
                    'u'
                }
                Ok(ProviderEvent::Finish(f)) => {
                    s.finish = Some(f);
                    'f'
                }
                Err(e) => {
                    s.error = Some(e);
                    'e'
                }
            };
            if !s.order.ends_with(c) {
                s.order.push(c);
            }
        }
        s
    }

    async fn run(path: &str) -> Summary {
        summarize(replay(&wire(path), 4096).await)
    }

    #[tokio::test]
    async fn byte_by_byte_equals_whole() {
        for path in anthropic_paths() {
            let whole = replay(&wire(path), 1 << 20).await;
            let split = replay(&wire(path), 7).await;
            assert_eq!(format!("{whole:?}"), format!("{split:?}"), "{path}");
        }
    }

    #[tokio::test]
    async fn every_fixture_parses() {
        // path → (order, text non-empty, reasoning non-empty, tool calls, finish)
        let expect: &[(&str, &str, bool, bool, usize, &str)] = &[
            (
                "anthropic/messages-cache-creation-and-read-server-tool.chunks.jsonl",
                "tuf",
                true,
                false,
                0,
                "end_turn",
            ),
            (
                "anthropic/messages-cache-read-compaction.sse",
                "tuf",
                true,
                false,
                0,
                "end_turn",
            ),
            (
                "anthropic/messages-redacted-thinking.sse",
                "tuf",
                true,
                false,
                0,
                "end_turn",
            ),
            (
                "anthropic/messages-text-parallel-tool-use.sse",
                "tcuf",
                true,
                false,
                2,
                "tool_use",
            ),
            (
                "anthropic/messages-text-then-tool-use.sdk-fixture.sse",
                "tcuf",
                true,
                false,
                1,
                "tool_use",
            ),
            (
                "anthropic/messages-text.chunks.jsonl",
                "tuf",
                true,
                false,
                0,
                "end_turn",
            ),
            (
                "anthropic/messages-text.sse",
                "tuf",
                true,
                false,
                0,
                "end_turn",
            ),
            (
                "anthropic/messages-thinking-text.chunks.jsonl",
                "rtuf",
                true,
                true,
                0,
                "end_turn",
            ),
            (
                "anthropic/messages-thinking-text.sse",
                "rtuf",
                true,
                true,
                0,
                "end_turn",
            ),
            (
                "anthropic/messages-thinking-tool-use.sse",
                "rcuf",
                false,
                true,
                1,
                "tool_use",
            ),
            (
                "anthropic/messages-tool-use-empty-input.sse",
                "cuf",
                false,
                false,
                1,
                "tool_use",
            ),
        ];
        assert_eq!(expect.len(), anthropic_paths().count());
        for (path, order, text, reasoning, tools, finish) in expect {
            let s = run(path).await;
            assert_eq!(&s.order, order, "{path}");
            assert_eq!(!s.text.is_empty(), *text, "{path}");
            assert_eq!(!s.reasoning.is_empty(), *reasoning, "{path}");
            assert_eq!(s.tools.len(), *tools, "{path}");
            assert_eq!(s.finish.as_deref(), Some(*finish), "{path}");
            assert_eq!(s.usages, 1, "{path}");
            for (id, name, args) in s.tools.values() {
                assert!(id.starts_with("toolu_") && !name.is_empty(), "{path}");
                let args: Value =
                    serde_json::from_str(args).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert!(args.is_object(), "{path}");
            }
            let u = s.usage.unwrap();
            assert_eq!(
                (u.provider.as_str(), u.model.as_str(), u.call_index),
                ("test", "configured-model", 2)
            );
            assert!(!u.input_includes_cache && !u.estimated);
        }
    }

    #[tokio::test]
    async fn usage_is_never_added_up() {
        let counts = |path| async move {
            let u = run(path).await.usage.unwrap();
            (
                u.input_tokens,
                u.output_tokens,
                u.cache_write_tokens,
                u.cache_read_tokens,
                u.reasoning_tokens,
            )
        };
        // message_start 16/5, message_delta repeats input 16 with output 38.
        assert_eq!(
            counts("anthropic/messages-text.sse").await,
            (16, 38, 0, 0, 0)
        );
        // message_delta has only output_tokens: input comes from message_start.
        assert_eq!(
            counts("anthropic/messages-text-then-tool-use.sdk-fixture.sse").await,
            (377, 65, 0, 0, 0)
        );
        // Creation 3068 at the start, cumulative 3337 / 6289 at the end.
        assert_eq!(
            counts("anthropic/messages-cache-creation-and-read-server-tool.chunks.jsonl").await,
            (6, 198, 3337, 6289, 0)
        );
        // Compaction: the iterations are summed (the top level omits the compaction
        // step), and the 55096 cache read is neither lost nor doubled.
        assert_eq!(
            counts("anthropic/messages-cache-read-compaction.sse").await,
            (281, 91, 0, 55096, 0)
        );
    }

    #[tokio::test]
    async fn tool_arguments_accumulate_by_block_index() {
        let s = run("anthropic/messages-text-then-tool-use.sdk-fixture.sse").await;
        assert_eq!(s.text, "I'll check the current weather in Paris for you.");
        let (id, name, args) = &s.tools[&1];
        assert_eq!(
            (id.as_str(), name.as_str()),
            ("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather")
        );
        assert_eq!(
            serde_json::from_str::<Value>(args).unwrap(),
            serde_json::json!({"location": "Paris"})
        );
        let s = run("anthropic/messages-text-parallel-tool-use.sse").await;
        let names: Vec<(u32, &str)> = s
            .tools
            .iter()
            .map(|(i, (_, name, _))| (*i, name.as_str()))
            .collect();
        assert_eq!(names, [(1, "add"), (2, "multiply")]);
    }

    #[tokio::test]
    async fn empty_input_becomes_an_object() {
        let items = replay(&wire("anthropic/messages-tool-use-empty-input.sse"), 4096).await;
        let calls: Vec<&ProviderEvent> = items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .filter(|e| matches!(e, ProviderEvent::ToolCall { .. }))
            .collect();
        assert_eq!(
            calls,
            [
                &ProviderEvent::ToolCall {
                    index: 0,
                    id: Some("toolu_01UmKD1vMphVCN9vw8PEMk1q".into()),
                    name: Some("fixed_version".into()),
                    args: String::new(),
                },
                &ProviderEvent::ToolCall {
                    index: 0,
                    id: None,
                    name: None,
                    args: "{}".into(),
                },
            ]
        );
        // A block with no delta at all, and a server that sends the input whole.
        let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n\
            data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_a\",\"name\":\"now\",\"input\":{}}}\n\n\
            data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
            data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_b\",\"name\":\"add\",\"input\":{\"a\":1}}}\n\n\
            data: {\"type\":\"message_stop\"}\n\n";
        let s = summarize(replay(body, 4096).await);
        assert_eq!(s.tools[&0], ("toolu_a".into(), "now".into(), "{}".into()));
        assert_eq!(
            s.tools[&1],
            ("toolu_b".into(), "add".into(), "{\"a\":1}".into())
        );
        assert_eq!(s.order, "c");
        assert!(s.error.is_none() && s.usage.is_none() && s.finish.is_none());
    }

    #[tokio::test]
    async fn reasoning_then_text_with_signatures_apart() {
        let s = run("anthropic/messages-thinking-text.chunks.jsonl").await;
        assert!(s.reasoning.starts_with("The previous result was 925."));
        assert!(s.reasoning.ends_with("= 185"));
        assert!(!s.reasoning.contains("EvQB"), "the signature leaked");
        assert_eq!(s.text, "925 ÷ 5 = 185");
        // The signature comes once, after all of its block's thinking.
        assert_eq!(s.signatures.len(), 1);
        assert!(s.signatures[0].0.starts_with("EvQBCkYICxgCKkAxhD4N"));
        assert_eq!(s.signatures[0].1, s.reasoning.len());
        for path in [
            "anthropic/messages-thinking-text.sse",
            "anthropic/messages-thinking-tool-use.sse",
        ] {
            let s = run(path).await;
            assert_eq!(s.signatures.len(), 1, "{path}");
            assert!(s.signatures[0].0.starts_with("E"), "{path}");
            assert_eq!(s.signatures[0].1, s.reasoning.len(), "{path}");
        }
        // Redacted blocks: their data, whole and in order, and no reasoning text.
        let s = run("anthropic/messages-redacted-thinking.sse").await;
        assert!(s.reasoning.is_empty());
        assert_eq!(s.redacted.len(), 2);
        assert!(s.redacted[0].starts_with("EqkECkYIBxgCKkA8AZ4noDfV5VcOJe/p3JTRB6Xz"));
        assert!(s.redacted[1].starts_with("EtgBCkYIBxgCKkDQfGkwzflEJP5asG3oQfJXcTwJ"));
        let raw = fixture("anthropic/messages-redacted-thinking.sse").unwrap();
        assert!(
            s.redacted
                .iter()
                .all(|d| raw.contains(&format!("\"data\":\"{d}\"")))
        );
        // A server that sends a thinking block whole in its start.
        let body = "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"hm\",\"signature\":\"EqW\"}}\n\n\
            data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
            data: {\"type\":\"message_stop\"}\n\n";
        let s = summarize(replay(body, 4096).await);
        assert_eq!(
            (s.reasoning.as_str(), s.signatures),
            ("hm", vec![("EqW".to_owned(), 2)])
        );
    }

    #[tokio::test]
    async fn server_tool_blocks_are_not_tool_calls() {
        let s = run("anthropic/messages-cache-creation-and-read-server-tool.chunks.jsonl").await;
        assert!(s.tools.is_empty());
        assert_eq!(
            s.text,
            "The sum of the squares of the numbers 1 through 12 is **650**."
        );
    }

    #[tokio::test]
    async fn error_event_quotes_type_and_message() {
        let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n\
            event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
            event: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\"type\":\"overloaded_error\",\"message\":\"Overloaded\"},\"request_id\":\"req_1\"}      \n\n";
        let s = summarize(replay(body, 4096).await);
        assert_eq!(s.order, "te");
        let e = s.error.unwrap();
        assert_eq!((e.kind, e.status), (ProviderErrorKind::Upstream, Some(529)));
        assert_eq!(
            e.message,
            "test: upstream reported an error: overloaded_error: Overloaded (request_id req_1)"
        );
        assert_eq!(
            (e.codes.as_slice(), e.detail.as_deref()),
            (&["overloaded_error".to_owned()][..], Some("Overloaded"))
        );
        // Not JSON, and after final usage: the usage comes first.
        let body = "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n\
            event: error\ndata: upstream exploded\n\n";
        let s = summarize(replay(body, 4096).await);
        assert_eq!(s.order, "ue");
        assert!(s.error.unwrap().message.ends_with("upstream exploded"));
    }

    #[tokio::test]
    async fn unknown_events_and_padding_are_fine() {
        let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1,\"brand_new\":{}}}}     \n\n\
            event: brand_new_event\ndata: not even json\n\n\
            data: {\"type\":\"another_new_event\",\"index\":\"x\"}\n\n\
            : a comment\n\n\
            event: ping\ndata: {\"type\": \"ping\"}\n\n\
            event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"brand_new_block\"}}   \n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"brand_new_delta\",\"x\":1}}\n\n\
            event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0 }\n\n\
            event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"Hel\"}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\",\"citations\":[]}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"citations_delta\",\"citation\":{}}}\n\n\
            event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n\
            event: message_stop\ndata: {\"type\":\"message_stop\"          }\n\n";
        let s = summarize(replay(body, 4096).await);
        assert!(s.error.is_none(), "{:?}", s.error);
        assert_eq!(s.text, "Hello");
        assert_eq!(s.order, "tuf");
        assert_eq!(s.finish.as_deref(), Some("max_tokens"));
        let u = s.usage.unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (3, 2));
    }

    #[tokio::test]
    async fn malformed_is_never_skipped() {
        let body = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n\
            event: content_block_delta\ndata: {not json\n\n\
            event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let s = summarize(replay(body, 4096).await);
        assert_eq!(s.order, "te");
        let e = s.error.unwrap();
        assert_eq!(e.kind, ProviderErrorKind::Malformed);
        assert!(e.message.contains("{not json"), "{}", e.message);

        for bad in [
            // A known event of the wrong shape.
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"input\":{}}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":4,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\"}}\n\n",
        ] {
            let s = summarize(replay(bad, 4096).await);
            assert_eq!(
                s.error.map(|e| e.kind),
                Some(ProviderErrorKind::Malformed),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn truncated_without_message_stop() {
        let body = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n";
        let s = summarize(replay(body, 4096).await);
        assert_eq!(s.order, "te");
        assert_eq!(s.error.unwrap().kind, ProviderErrorKind::Truncated);
        // After message_delta the usage is final: it still counts.
        let text = wire("anthropic/messages-text.sse");
        let cut = &text[..text.find("event: message_stop").unwrap()];
        let s = summarize(replay(cut, 4096).await);
        assert_eq!(s.order, "tue");
        assert_eq!(s.usage.unwrap().output_tokens, 38);
        assert_eq!(s.error.unwrap().kind, ProviderErrorKind::Truncated);
    }

    #[tokio::test]
    async fn cancel_ends_the_stream() {
        let cancel = CancellationToken::new();
        let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from_static(
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n",
        ))])
        .chain(futures::stream::pending());
        let mut s = event_stream(
            body,
            EventParser::new("t", "m", 0),
            cancel.clone(),
            crate::deadline::Deadlines::relaxed(),
        );
        assert!(matches!(s.next().await, Some(Ok(ProviderEvent::Text(_)))));
        cancel.cancel();
        assert!(s.next().await.is_none());
    }
}
