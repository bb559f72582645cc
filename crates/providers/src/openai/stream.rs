//! Parsing a Chat Completions event stream into provider events.
//!
//! The wire (OpenAI API reference, "The chat completion chunk object"; "Streaming"):
//! SSE frames whose `data:` is one `chat.completion.chunk` JSON object, ending with
//! `data: [DONE]`. With `stream_options.include_usage` a last chunk carries `usage` and
//! `choices: []`. OpenAI-compatible servers add their own fields, and the types here are
//! hand-written to be lenient about them: every field is optional, unknown fields are
//! ignored, `finish_reason` may be null, empty or absent, `choices` may be empty (see
//! the recorded streams in the mock upstream's `fixtures/`).
//!
//! They are strict about what would lose data silently: a `data:` that is not JSON is a
//! `Malformed` error, never skipped; a top-level `"error"` in a chunk (OpenRouter) or an
//! `event: error` frame (Groq) is an `Upstream` error. A stream is complete only with
//! both a `finish_reason` and `[DONE]`: a body that ends without `[DONE]` (even after a
//! `finish_reason`: the usage chunk that follows it may be lost) or a `[DONE]` that
//! came without any `finish_reason` is `Truncated`, a retryable failure, never a
//! completed answer.
//!
//! Mapping: `delta.reasoning_content` (DeepSeek, xAI) or `delta.reasoning` (OpenRouter,
//! Groq) → `Reasoning`; `delta.content` and `delta.refusal` → `Text`;
//! `delta.tool_calls[]` → `ToolCall` fragments keyed by `index`; `usage` → `Usage`; the
//! first non-empty `finish_reason` → one `Finish`, emitted last (at `[DONE]`), so that
//! usage sent after it still comes first. Only choice 0 is
//! read (genstream never asks for `n > 1`).

use genstream_engine::provider::{ProviderError, ProviderErrorKind, ProviderEvent};
use genstream_engine::usage::UsageRecord;
use serde::Deserialize;
use serde_json::Value;
use sse_stream::Sse;

use crate::error_text::truncate;
use crate::http::{error_message, reported_error};
use crate::sse::{FrameParser, Item, SNIPPET_CHARS};

/// One `chat.completion.chunk`, leniently.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Chunk {
    choices: Option<Vec<Choice>>,
    usage: Option<Usage>,
    /// OpenRouter reports failures inside a 200 stream this way.
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Choice {
    index: Option<u32>,
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

/// The text fields are kept as JSON values: some servers send content as an array of
/// parts, or reasoning as an object, and that must not fail the stream.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Delta {
    content: Option<Value>,
    reasoning_content: Option<Value>,
    reasoning: Option<Value>,
    refusal: Option<Value>,
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ToolCallDelta {
    index: Option<u32>,
    id: Option<String>,
    function: Option<FunctionDelta>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FunctionDelta {
    name: Option<String>,
    /// A JSON text fragment; a few servers send a whole object instead.
    arguments: Option<Value>,
}

/// `usage` of OpenAI and the compatible servers (docs/protocol.md §7).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptTokensDetails>,
    completion_tokens_details: Option<CompletionTokensDetails>,
    input_token_details: Option<InputTokenDetails>,
    /// DeepSeek's name for cache hits (it also sends `prompt_tokens_details`).
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PromptTokensDetails {
    cached_tokens: Option<u64>,
    cache_creation_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CompletionTokensDetails {
    reasoning_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct InputTokenDetails {
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
}

/// The text of a delta field: a string, or the `text` of an array of parts.
fn text_of(value: Option<&Value>) -> Option<String> {
    let text = match value? {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        Value::Object(o) => o.get("text").and_then(Value::as_str)?.to_owned(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

/// Turns SSE frames of one Chat Completions stream into provider events.
#[derive(Debug)]
pub(crate) struct ChunkParser {
    provider: String,
    model: String,
    call_index: u32,
    finish: Option<String>,
    done: bool,
}

impl ChunkParser {
    /// A parser for a stream from provider `provider` (its config name, for messages),
    /// reporting usage for configured model `model`, call `call_index`.
    pub(crate) fn new(provider: &str, model: &str, call_index: u32) -> Self {
        ChunkParser {
            provider: provider.to_owned(),
            model: model.to_owned(),
            call_index,
            finish: None,
            done: false,
        }
    }

    fn on_chunk(&mut self, chunk: Chunk) -> Vec<Item> {
        let mut out = Vec::new();
        if let Some(error) = chunk.error {
            // Usage sent with the error was still spent.
            if let Some(usage) = chunk.usage {
                out.push(Ok(ProviderEvent::Usage(self.usage_record(usage))));
            }
            let raw = error.to_string();
            let chunk = serde_json::json!({ "error": error });
            out.push(Err(reported_error(
                &self.provider,
                Some(&chunk),
                &raw,
                error_message,
            )));
            return out;
        }
        for choice in chunk.choices.unwrap_or_default() {
            if choice.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                // DeepSeek sends `reasoning_content`, OpenRouter and Groq `reasoning`;
                // a server sending both means the same text twice.
                let reasoning = text_of(delta.reasoning_content.as_ref())
                    .or_else(|| text_of(delta.reasoning.as_ref()));
                if let Some(reasoning) = reasoning {
                    out.push(Ok(ProviderEvent::Reasoning(reasoning)));
                }
                if let Some(text) = text_of(delta.content.as_ref()) {
                    out.push(Ok(ProviderEvent::Text(text)));
                }
                if let Some(refusal) = text_of(delta.refusal.as_ref()) {
                    out.push(Ok(ProviderEvent::Text(refusal)));
                }
                for (position, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate()
                {
                    let (name, args) = match call.function {
                        Some(f) => (f.name, f.arguments),
                        None => (None, None),
                    };
                    let args = match args {
                        Some(Value::String(s)) => s,
                        None | Some(Value::Null) => String::new(),
                        Some(other) => other.to_string(),
                    };
                    let id = call.id.filter(|s| !s.is_empty());
                    let name = name.filter(|s| !s.is_empty());
                    if id.is_none() && name.is_none() && args.is_empty() {
                        continue;
                    }
                    out.push(Ok(ProviderEvent::ToolCall {
                        index: call.index.unwrap_or(position as u32),
                        id,
                        name,
                        args,
                    }));
                }
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty())
                && self.finish.is_none()
            {
                self.finish = Some(reason);
            }
        }
        if let Some(usage) = chunk.usage {
            out.push(Ok(ProviderEvent::Usage(self.usage_record(usage))));
        }
        out
    }

    fn finish_event(&mut self) -> Option<ProviderEvent> {
        self.finish.take().map(ProviderEvent::Finish)
    }

    fn usage_record(&self, usage: Usage) -> UsageRecord {
        let prompt = usage.prompt_tokens_details.unwrap_or_default();
        let input = usage.input_token_details.unwrap_or_default();
        let completion = usage.completion_tokens_details.unwrap_or_default();
        let input_tokens = usage.prompt_tokens.unwrap_or(0);
        let mut output_tokens = usage.completion_tokens.unwrap_or(0);
        let mut reasoning_tokens = completion.reasoning_tokens.unwrap_or(0);
        // Some OpenAI-compatible servers leave reasoning out of `completion_tokens` and
        // only `total_tokens` shows it: the excess is reasoning, billed as output, never
        // dropped (LibreChat #13014).
        let excess = usage
            .total_tokens
            .unwrap_or(0)
            .saturating_sub(input_tokens + output_tokens);
        if excess > 0 {
            output_tokens += excess;
            reasoning_tokens = reasoning_tokens.max(excess);
        }
        UsageRecord {
            call_index: self.call_index,
            model: self.model.clone(),
            // The configured name (`deepseek`, `groq`…), not the wire protocol's.
            provider: self.provider.clone(),
            input_tokens,
            output_tokens,
            cache_write_tokens: prompt
                .cache_creation_tokens
                .or(input.cache_creation)
                .unwrap_or(0),
            cache_read_tokens: prompt
                .cached_tokens
                .or(input.cache_read)
                .or(usage.prompt_cache_hit_tokens)
                .unwrap_or(0),
            reasoning_tokens,
            input_includes_cache: true,
            estimated: false,
        }
    }
}

impl FrameParser for ChunkParser {
    fn provider(&self) -> &str {
        &self.provider
    }

    /// The items one frame yields; an `Err` is the last item of the stream.
    fn on_frame(&mut self, sse: &Sse) -> Vec<Item> {
        match sse.event.as_deref() {
            None | Some("" | "message") => {}
            Some("error") => {
                let data = sse.data.as_deref().unwrap_or_default();
                let value = serde_json::from_str::<Value>(data).ok();
                return vec![Err(reported_error(
                    &self.provider,
                    value.as_ref(),
                    &truncate(data.trim(), SNIPPET_CHARS),
                    error_message,
                ))];
            }
            // Chat Completions sends no other event types; a client listens to
            // messages only (WHATWG HTML, "Server-sent events", dispatch by type).
            Some(_) => return Vec::new(),
        }
        let Some(data) = sse.data.as_deref().map(str::trim) else {
            return Vec::new(); // `id:` / `retry:` alone
        };
        if data.is_empty() {
            return Vec::new(); // an empty keep-alive frame
        }
        if data == "[DONE]" {
            self.done = true;
            return match self.finish_event() {
                Some(finish) => vec![Ok(finish)],
                None => vec![Err(ProviderError::new(
                    ProviderErrorKind::Truncated,
                    format!(
                        "{}: upstream sent [DONE] without a finish_reason",
                        self.provider
                    ),
                ))],
            };
        }
        let chunk: Chunk = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(e) => {
                return vec![Err(ProviderError::new(
                    ProviderErrorKind::Malformed,
                    format!(
                        "{}: upstream sent a chunk that is not valid ({e}): {}",
                        self.provider,
                        truncate(data, SNIPPET_CHARS)
                    ),
                ))];
            }
        };
        self.on_chunk(chunk)
    }

    /// The items for the end of the body without `[DONE]`: a `Truncated` error, whether
    /// or not a `finish_reason` came.
    fn on_end(&mut self) -> Vec<Item> {
        if self.done {
            return Vec::new();
        }
        let after = if self.finish_event().is_some() {
            " (after a finish_reason)"
        } else {
            ""
        };
        vec![Err(ProviderError::new(
            ProviderErrorKind::Truncated,
            format!(
                "{}: upstream stream ended without [DONE]{after}",
                self.provider
            ),
        ))]
    }

    /// True once `[DONE]` was seen.
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
    use std::collections::BTreeMap;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn usage_normalization_table() {
        let p = ChunkParser::new("t", "m", 0);
        let u = |v: serde_json::Value| p.usage_record(serde_json::from_value(v).unwrap());
        // Cached tokens are inside prompt_tokens (OpenAI).
        let r = u(
            serde_json::json!({"prompt_tokens": 1000, "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 800}}),
        );
        assert_eq!(
            (r.input_tokens, r.cache_read_tokens, r.input_includes_cache),
            (1000, 800, true)
        );
        // Reasoning inside completion_tokens.
        let r = u(
            serde_json::json!({"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110,
            "completion_tokens_details": {"reasoning_tokens": 64}}),
        );
        assert_eq!((r.output_tokens, r.reasoning_tokens), (100, 64));
        // Reasoning only visible in total_tokens: kept, as output.
        let r = u(
            serde_json::json!({"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 90}),
        );
        assert_eq!((r.output_tokens, r.reasoning_tokens), (80, 40));
        // Nothing reported: zeros, not a failure (the engine then estimates).
        let r = u(serde_json::json!({}));
        assert_eq!((r.input_tokens, r.output_tokens), (0, 0));
    }

    /// Replays `text` through [`event_stream`], in chunks of `split` bytes (to exercise
    /// frames cut across reads).
    async fn replay(text: &str, split: usize) -> Vec<Item> {
        let bytes: Vec<Result<Bytes, std::io::Error>> = text
            .as_bytes()
            .chunks(split)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let parser = ChunkParser::new("test", "configured-model", 3);
        event_stream(
            futures::stream::iter(bytes),
            parser,
            CancellationToken::new(),
            crate::deadline::Deadlines::relaxed(),
        )
        .collect()
        .await
    }

    /// A fixture as the mock upstream serves it.
    fn wire(path: &str) -> String {
        let text = fixture(path).unwrap();
        if path.ends_with(".jsonl") {
            let mut out: String = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("data: {l}\n\n"))
                .collect();
            out.push_str("data: [DONE]\n\n");
            out
        } else {
            text.to_owned()
        }
    }

    #[derive(Debug, Default)]
    struct Summary {
        text: String,
        reasoning: String,
        tools: BTreeMap<u32, (String, String, String)>,
        usage: Option<UsageRecord>,
        finish: Option<String>,
        error: Option<ProviderError>,
        order: String,
    }

    fn summarize(items: Vec<Item>) -> Summary {
        let mut s = Summary::default();
        for item in items {
            assert!(s.error.is_none(), "an item after an error");
            assert!(s.finish.is_none(), "an item after finish");
            match item {
                Ok(ProviderEvent::Text(t)) => {
                    s.text.push_str(&t);
                    s.order.push('t');
                }
                Ok(ProviderEvent::Reasoning(t)) => {
                    s.reasoning.push_str(&t);
                    s.order.push('r');
                }
                Ok(
                    other @ (ProviderEvent::ReasoningSignature(_)
                    | ProviderEvent::RedactedReasoning(_)),
                ) => {
                    panic!("not a Chat Completions event: {other:?}")
                }
                Ok(ProviderEvent::ToolCall {
                    index,
                    id,
                    name,
                    args,
                }) => {
                    let e = s.tools.entry(index).or_default();
                    if let Some(id) = id {
                        e.0 = id;
                    }
                    if let Some(name) = name {
                        e.1 = name;
                    }
                    e.2.push_str(&args);
                    s.order.push('c');
                }
                Ok(ProviderEvent::Usage(u)) => {
                    s.usage = Some(u);
                    s.order.push('u');
                }
                Ok(ProviderEvent::Finish(f)) => {
                    s.finish = Some(f);
                    s.order.push('f');
                }
                Err(e) => {
                    s.error = Some(e);
                    s.order.push('e');
                }
            }
        }
        let mut order: Vec<char> = s.order.chars().collect();
        order.dedup();
        s.order = order.into_iter().collect();
        s
    }

    #[tokio::test]
    async fn text_usage_fixture() {
        let s = summarize(replay(&wire("openai/chat-text-usage.sse"), 4096).await);
        assert!(
            s.text
                .starts_with("I'm unable to provide real-time weather updates"),
            "{}",
            s.text
        );
        assert_eq!(s.order, "tuf");
        assert_eq!(s.finish.as_deref(), Some("stop"));
        assert_eq!(
            s.usage,
            Some(UsageRecord {
                call_index: 3,
                model: "configured-model".into(),
                provider: "test".into(),
                input_tokens: 14,
                output_tokens: 30,
                input_includes_cache: true,
                ..UsageRecord::default()
            })
        );
    }

    /// The fixtures of Chat Completions streams (not the Anthropic ones).
    fn chat_fixture_paths() -> impl Iterator<Item = &'static str> {
        fixture_paths().filter(|p| !p.starts_with("anthropic/"))
    }

    #[tokio::test]
    async fn byte_by_byte_equals_whole() {
        for path in chat_fixture_paths() {
            let whole = replay(&wire(path), 1 << 20).await;
            let split = replay(&wire(path), 7).await;
            assert_eq!(format!("{whole:?}"), format!("{split:?}"), "{path}");
        }
    }

    #[tokio::test]
    async fn every_fixture_parses() {
        // path → (ends with, text non-empty, reasoning non-empty, tool calls)
        let expect: &[(&str, &str, bool, bool, usize)] = &[
            (
                "openai/azure-chat-content-filter.chunks.jsonl",
                "tuf",
                true,
                false,
                0,
            ),
            ("openai/chat-finish-length.sse", "tuf", true, false, 0),
            (
                "openai/chat-parallel-tool-calls-obfuscation.sse",
                "cuf",
                false,
                false,
                2,
            ),
            (
                "openai/chat-parallel-tool-calls.sse",
                "cuf",
                false,
                false,
                2,
            ),
            ("openai/chat-refusal.sse", "tuf", true, false, 0),
            (
                "openai/chat-text-usage-obfuscation.chunks.jsonl",
                "tuf",
                true,
                false,
                0,
            ),
            ("openai/chat-text-usage.sse", "tuf", true, false, 0),
            ("openai/chat-tool-call.sse", "cuf", false, false, 1),
            (
                "openai-compatible/deepseek-reasoning-content.chunks.jsonl",
                "rtuf",
                true,
                true,
                0,
            ),
            (
                "openai-compatible/deepseek-reasoning-tool-call.chunks.jsonl",
                "rcuf",
                false,
                true,
                1,
            ),
            (
                "openai-compatible/groq-midstream-error-event.sse",
                "re",
                false,
                true,
                0,
            ),
            (
                "openai-compatible/openrouter-midstream-error.sse",
                "rue",
                false,
                true,
                0,
            ),
            (
                "openai-compatible/openrouter-reasoning.sse",
                "rtuf",
                true,
                true,
                0,
            ),
            (
                "openai-compatible/xai-grok3mini-reasoning-tool-call.chunks.jsonl",
                "rcuf",
                false,
                true,
                1,
            ),
        ];
        assert_eq!(expect.len(), chat_fixture_paths().count());
        for (path, order, text, reasoning, tools) in expect {
            let s = summarize(replay(&wire(path), 4096).await);
            assert_eq!(&s.order, order, "{path}");
            assert_eq!(!s.text.is_empty(), *text, "{path}");
            assert_eq!(!s.reasoning.is_empty(), *reasoning, "{path}");
            assert_eq!(s.tools.len(), *tools, "{path}");
            for (id, name, args) in s.tools.values() {
                assert!(!id.is_empty() && !name.is_empty(), "{path}");
                let args: Value =
                    serde_json::from_str(args).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert!(args.is_object(), "{path}");
            }
        }
    }

    #[tokio::test]
    async fn usage_details_and_cache() {
        let s = summarize(
            replay(
                &wire("openai/chat-parallel-tool-calls-obfuscation.sse"),
                4096,
            )
            .await,
        );
        let u = s.usage.unwrap();
        assert!(u.cache_read_tokens <= u.input_tokens);
        let s = summarize(
            replay(
                &wire("openai-compatible/xai-grok3mini-reasoning-tool-call.chunks.jsonl"),
                4096,
            )
            .await,
        );
        let u = s.usage.unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cache_read_tokens,
                u.reasoning_tokens
            ),
            // xAI leaves reasoning out of completion_tokens (26); total_tokens (513)
            // shows it, and it is billed as output: 26 + 196.
            (291, 222, 290, 196)
        );
        let s = summarize(
            replay(
                &wire("openai-compatible/deepseek-reasoning-content.chunks.jsonl"),
                4096,
            )
            .await,
        );
        let u = s.usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.reasoning_tokens),
            (18, 219, 205)
        );
        assert_eq!(s.finish.as_deref(), Some("stop"));
    }

    #[tokio::test]
    async fn cache_write_from_either_shape() {
        let body = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":5,\
                    \"prompt_tokens_details\":{\"cached_tokens\":40,\"cache_creation_tokens\":7}}}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":5,\
                    \"input_token_details\":{\"cache_creation\":9,\"cache_read\":30}}}\n\n\
                    data: [DONE]\n\n";
        let items = replay(body, 4096).await;
        let usages: Vec<_> = items
            .into_iter()
            .filter_map(|i| match i {
                Ok(ProviderEvent::Usage(u)) => Some((u.cache_write_tokens, u.cache_read_tokens)),
                _ => None,
            })
            .collect();
        assert_eq!(usages, vec![(7, 40), (9, 30)]);
    }

    #[tokio::test]
    async fn error_chunk_and_error_event_quote_the_message() {
        let s = summarize(
            replay(
                &wire("openai-compatible/openrouter-midstream-error.sse"),
                4096,
            )
            .await,
        );
        let e = s.error.unwrap();
        assert_eq!(e.kind, ProviderErrorKind::Upstream);
        assert!(e.message.contains("Token limit reached"), "{}", e.message);
        // OpenRouter's numeric code is the HTTP status: a 400 is not retried.
        assert_eq!(
            (e.status, e.detail.as_deref()),
            (Some(400), Some("Token limit reached"))
        );
        assert!(!genstream_engine::retry::is_retryable(&e));
        assert_eq!(s.usage.map(|u| u.output_tokens), Some(10));
        let s = summarize(
            replay(
                &wire("openai-compatible/groq-midstream-error-event.sse"),
                4096,
            )
            .await,
        );
        let e = s.error.unwrap();
        assert_eq!(e.kind, ProviderErrorKind::Upstream);
        assert!(
            e.message.contains("Tool call validation failed"),
            "{}",
            e.message
        );
        assert_eq!(e.status, Some(400), "Groq's status_code");
        assert_eq!(e.codes, ["invalid_request_error", "tool_use_failed"]);
        assert!(!genstream_engine::retry::is_retryable(&e));
        // The mock's OpenRouter-style overload chunk, and an error whose only clue is
        // its text: classified by the upstream's words, never by the provider's name.
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
            data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\",\"code\":529},\"choices\":[]}\n\n";
        let e = summarize(replay(body, 4096).await).error.unwrap();
        assert_eq!(
            (e.status, e.codes.as_slice()),
            (Some(529), &["overloaded_error".to_owned()][..])
        );
        assert!(genstream_engine::retry::is_retryable(&e));
        let body = "data: {\"error\":{\"message\":\"upstream timed out\"}}\n\n";
        let e = summarize(replay(body, 4096).await).error.unwrap();
        assert_eq!((e.status, e.codes.len()), (None, 0));
        assert_eq!(e.detail.as_deref(), Some("upstream timed out"));
        assert!(genstream_engine::retry::is_retryable(&e));
        let body = "event: error\ndata: not json at all\n\n";
        let e = summarize(replay(body, 4096).await).error.unwrap();
        assert_eq!(e.detail.as_deref(), Some("not json at all"));
        assert!(!genstream_engine::retry::is_retryable(&e));
    }

    #[tokio::test]
    async fn lenient_shapes() {
        let body = ": comment\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"\"}]}\n\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":[{\"type\":\"text\",\"text\":\"b\"}]}}],\"extra\":1}\n\n\
            data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"other choice\"}}]}\n\n\
            data: {\"choices\":null,\"usage\":null}\n\n\
            data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":{\"x\":1}}}]}}]}\n\n\
            event: message\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n\
            data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
            data: [DONE]\n\n";
        let s = summarize(replay(body, 4096).await);
        assert_eq!(s.text, "ab");
        assert_eq!(s.tools[&0], ("c1".into(), "f".into(), "{\"x\":1}".into()));
        assert_eq!(s.finish.as_deref(), Some("tool_calls"));
        assert!(s.error.is_none());
    }

    #[tokio::test]
    async fn malformed_is_never_skipped() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {not json\n\ndata: [DONE]\n\n";
        let s = summarize(replay(body, 4096).await);
        let e = s.error.unwrap();
        assert_eq!(e.kind, ProviderErrorKind::Malformed);
        assert!(e.message.contains("{not json"), "{}", e.message);
        assert_eq!(s.order, "te");
    }

    /// Complete only with a finish_reason *and* `[DONE]`; either alone is a truncated
    /// stream.
    #[tokio::test]
    async fn truncated_unless_finished_and_done() {
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let finish = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        let done = "data: [DONE]\n\n";
        let truncated = |body: String| async move {
            let s = summarize(replay(&body, 4096).await);
            assert!(s.finish.is_none(), "{body}: {:?}", s.finish);
            let e = s.error.unwrap_or_else(|| panic!("{body}: no error"));
            assert_eq!(e.kind, ProviderErrorKind::Truncated, "{body}");
            e.message
        };
        assert_eq!(
            truncated(text.to_owned()).await,
            "test: upstream stream ended without [DONE]"
        );
        assert_eq!(
            truncated(format!("{text}{finish}")).await,
            "test: upstream stream ended without [DONE] (after a finish_reason)"
        );
        assert_eq!(
            truncated(format!("{text}{done}")).await,
            "test: upstream sent [DONE] without a finish_reason"
        );
        let s = summarize(replay(&format!("{text}{finish}{done}"), 4096).await);
        assert_eq!(
            (s.order.as_str(), s.finish.as_deref()),
            ("tf", Some("stop"))
        );
        assert!(s.error.is_none());
    }

    #[tokio::test]
    async fn cancel_ends_the_stream() {
        let cancel = CancellationToken::new();
        let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        ))])
        .chain(futures::stream::pending());
        let mut s = event_stream(
            body,
            ChunkParser::new("t", "m", 0),
            cancel.clone(),
            crate::deadline::Deadlines::relaxed(),
        );
        assert!(matches!(s.next().await, Some(Ok(ProviderEvent::Text(_)))));
        cancel.cancel();
        assert!(s.next().await.is_none());
    }
}
