//! The upstream model interface (docs/protocol.md §6).
//!
//! A provider turns one [`ModelRequest`] into a stream of [`ProviderEvent`]s: text and
//! reasoning deltas, tool-call fragments keyed by index (OpenAI and Anthropic both
//! stream them so), one usage report, and the finish reason. The engine turns those
//! into log events; providers know nothing of seqs, steps or subscribers.
//!
//! One call of [`Provider::stream`] is one attempt. Retries (`crate::retry`) wrap it in one
//! place, so that no provider retries on its own.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::event::ToolCall;
use crate::usage::UsageRecord;

/// Who said a history message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    Tool,
}

/// One message of the history sent upstream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// The text (for `Tool`, the tool's output).
    pub text: String,
    /// For `Assistant`: the tool calls it made (with their outputs, which become the
    /// following `Tool` messages upstream).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `Tool`: the id of the call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `Assistant`: the signed and redacted thinking blocks that began this turn,
    /// in order, for upstreams that need them back (Anthropic, with extended thinking
    /// on, requires them at the start of a turn with tool calls). Unsigned reasoning is
    /// not kept: it cannot be sent back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasoning: Vec<ReasoningBlock>,
}

/// A thinking block of an assistant turn, to be sent back as it came.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReasoningBlock {
    /// Thinking text and the signature the upstream gave it.
    Thinking { thinking: String, signature: String },
    /// A redacted thinking block's opaque data.
    Redacted { data: String },
}

/// A tool the model may call: name, description, JSON Schema of its arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// One model call.
#[derive(Clone, Debug, Default)]
pub struct ModelRequest {
    /// The configured model name (what clients select).
    pub model: String,
    pub system_prompt: Option<String>,
    /// Oldest first; the last one is the new user message (or tool results).
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolSpec>,
    /// Index of this call within the job (0 for the first).
    pub call_index: u32,
}

/// What a provider streams.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderEvent {
    /// Answer text.
    Text(String),
    /// Reasoning / thinking text.
    Reasoning(String),
    /// The signature of the thinking block whose text just streamed (Anthropic's
    /// `signature_delta`); it ends that block, so reasoning after it is a new block.
    ReasoningSignature(String),
    /// A whole redacted thinking block: its opaque data (Anthropic's
    /// `redacted_thinking`).
    RedactedReasoning(String),
    /// A fragment of tool call `index`; `id` and `name` may come in any fragment.
    ToolCall {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        args: String,
    },
    /// The call's token usage (last report wins if several come).
    Usage(UsageRecord),
    /// The upstream's finish reason (`stop`, `length`, `tool_calls`, `end_turn`…).
    Finish(String),
}

/// The stream of one attempt.
pub type ProviderStream = BoxStream<'static, Result<ProviderEvent, ProviderError>>;

/// Kinds of upstream failure, which decide retryability (`crate::retry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderErrorKind {
    /// The upstream answered with a non-success HTTP status.
    Http,
    /// Could not connect.
    Connect,
    /// Connect, first-byte or idle-gap timeout.
    Timeout,
    /// The stream ended without its terminator.
    Truncated,
    /// A chunk that is not what the protocol says.
    Malformed,
    /// An error reported inside the stream (`{"error": …}`, `event: error`).
    #[default]
    Upstream,
    /// Configuration (missing API key, unknown model…).
    Config,
}

/// An upstream failure, with what the upstream said.
#[derive(Clone, Debug, Default, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    /// HTTP status, when there was one; for an error reported inside a stream, the
    /// status the upstream gave it (OpenRouter's numeric `error.code`, or the status
    /// Anthropic documents for its `error.type`).
    pub status: Option<u16>,
    /// Human-readable, quoting the upstream's own message where it gave one.
    pub message: String,
    /// The upstream's `Retry-After` / `retry-after-ms`, parsed.
    pub retry_after: Option<Duration>,
    /// The upstream's structured identifiers of an error it reported, as given:
    /// Anthropic's `error.type` (`overloaded_error`), OpenAI-compatible `error.type` and
    /// string `error.code` (`server_error`, `rate_limit_exceeded`). With `status`, what
    /// the retry layer classifies an in-stream error by.
    pub codes: Vec<String>,
    /// The upstream's own error text (`Overloaded`), without genstream's wording around
    /// it: what the retry layer reads, as a last resort, when neither `status` nor
    /// `codes` says whether the error is worth a retry.
    pub detail: Option<String>,
}

impl ProviderError {
    /// An error of `kind` with `message` and nothing else.
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            message: message.into(),
            ..Default::default()
        }
    }
}

/// An upstream model API.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The provider's kind, its wire protocol (`demo`, `openai`, `anthropic`): `kind` in
    /// `GET /api/models`.
    fn kind(&self) -> &str;

    /// Whether the provider applies the first-byte and idle-gap timeouts itself. The
    /// HTTP providers do, to the upstream's bytes, so that pings, SSE comments and
    /// frames that make no event count as signs of life (a slow but live upstream is
    /// not killed and retried). When false (the default), the engine applies them to
    /// the provider's events, from its model's [`Timeouts`](crate::retry::Timeouts).
    fn applies_timeouts(&self) -> bool {
        false
    }

    /// The provider's configured name (its `[providers.NAME]` key, `demo` for the
    /// built-in one), which usage records and `GET /api/models` carry as `provider`.
    /// Default: its kind.
    fn name(&self) -> &str {
        self.kind()
    }

    /// The upstream's own model id (e.g. `gpt-4o-mini`), if it has one; usage
    /// estimates count tokens with that model's tiktoken encoding. Default `None`
    /// (estimates use `o200k_base`).
    fn upstream_model(&self) -> Option<&str> {
        None
    }

    /// Starts one attempt. `cancel` fires on abort; a provider should stop promptly
    /// (dropping the returned stream also stops it).
    async fn stream(
        &self,
        request: ModelRequest,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError>;
}
