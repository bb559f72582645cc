//! The objects of the Responses API that the projection builds from the fold: the
//! `response` object (the body of `GET /v1/responses/{id}` and of the lifecycle
//! events), its output items and `usage`. Shapes follow the `openai` Python package's
//! `openai/types/responses/` (see the crate README).

use serde::Serialize;

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ResponsesOptions, SERVER_LABEL};
use crate::fold::{JobFold, Outcome, Step, StepKind, StepStatus, TokenUsage};

/// `usage` in the Responses shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResponsesUsage {
    /// Input tokens, cached ones included.
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    /// Output tokens, reasoning included.
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

/// `usage.input_tokens_details`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
}

/// `usage.output_tokens_details`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

impl From<&TokenUsage> for ResponsesUsage {
    fn from(u: &TokenUsage) -> Self {
        ResponsesUsage {
            input_tokens: u.input_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: u.cached_tokens,
                cache_write_tokens: u.cache_write_tokens,
            },
            output_tokens: u.output_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: u.reasoning_tokens,
            },
            total_tokens: u.total_tokens(),
        }
    }
}

/// The `response` object of the log folded so far (also the shape of
/// `GET /v1/responses/{id}`); `None` before `created`.
///
/// `status`: `in_progress` while the job runs; `completed`; `incomplete` when a
/// server limit cut the answer (`max_tool_iterations` or `log_full`, with
/// `incomplete_details.reason` `max_output_tokens`, the nearest of OpenAI's reasons)
/// or a shutdown aborted it (`reason` `null`); `cancelled` when a user aborted it;
/// `failed` on any other error, with `error: {code, message}` and genstream's code
/// (`upstream_error`, `stalled`, …). `usage` is set once the job ended.
pub fn response<'a>(
    fold: &'a JobFold,
    options: &'a ResponsesOptions,
) -> Option<ResponseObject<'a>> {
    let ids = fold.ids()?;
    let p = &options.params;
    let end = fold.end();
    let (status, error, incomplete_details) = match end.map(|e| &e.outcome) {
        None => ("in_progress", None, None),
        Some(o) if o.hit_limit() => (
            "incomplete",
            None,
            Some(IncompleteDetails {
                reason: Some("max_output_tokens"),
            }),
        ),
        Some(Outcome::Completed { .. }) => ("completed", None, None),
        Some(o @ Outcome::Aborted { .. }) if o.cancelled_by_user() => ("cancelled", None, None),
        Some(Outcome::Aborted { .. }) => {
            ("incomplete", None, Some(IncompleteDetails { reason: None }))
        }
        Some(Outcome::Failed { code, message }) => {
            ("failed", Some(ResponseError { code, message }), None)
        }
    };
    let completed_at = match end {
        Some(e) if status == "completed" => {
            e.saved_at.as_deref().and_then(crate::fold::unix_seconds)
        }
        _ => None,
    };
    Some(ResponseObject {
        id: ids.response_id(),
        object: "response",
        created_at: ids.created,
        status,
        background: options.background,
        completed_at,
        error,
        incomplete_details,
        instructions: p.instructions.as_deref(),
        max_output_tokens: p.max_output_tokens,
        model: &ids.model,
        output: fold
            .output()
            .into_iter()
            .map(|s| item(&ids.compact, s, false))
            .collect(),
        parallel_tool_calls: p.parallel_tool_calls,
        previous_response_id: p.previous_response_id.as_deref(),
        temperature: p.temperature,
        tool_choice: &p.tool_choice,
        tools: &p.tools,
        top_p: p.top_p,
        usage: end.map(|_| ResponsesUsage::from(fold.usage())),
        metadata: &p.metadata,
    })
}

/// A `response` object; serialize it with serde.
#[derive(Debug, Serialize)]
pub struct ResponseObject<'a> {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds: the job's `created.createdAt`.
    pub created_at: i64,
    pub status: &'static str,
    pub background: bool,
    /// Unix seconds of the saved answer, for a completed response.
    pub completed_at: Option<i64>,
    pub error: Option<ResponseError<'a>>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<&'a str>,
    pub max_output_tokens: Option<u64>,
    pub model: &'a str,
    pub output: Vec<Item<'a>>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<&'a str>,
    pub temperature: Option<f64>,
    pub tool_choice: &'a Value,
    pub tools: &'a [Value],
    pub top_p: Option<f64>,
    pub usage: Option<ResponsesUsage>,
    pub metadata: &'a BTreeMap<String, String>,
}

/// `error` of a failed response.
#[derive(Debug, Serialize)]
pub struct ResponseError<'a> {
    /// genstream's error code (`upstream_error`, `stalled`, `internal`, …).
    pub code: &'a str,
    pub message: &'a str,
}

/// `incomplete_details` of an incomplete response.
#[derive(Debug, Serialize)]
pub struct IncompleteDetails {
    pub reason: Option<&'static str>,
}

/// An output item.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Item<'a> {
    Message(MessageItem<'a>),
    Reasoning(ReasoningItem<'a>),
    FunctionCall(FunctionCallItem<'a>),
    McpCall(McpCallItem<'a>),
}

/// A `message` item.
#[derive(Debug, Serialize)]
pub struct MessageItem<'a> {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub content: Vec<TextPart<'a>>,
    pub role: &'static str,
}

/// An `output_text` or `reasoning_text` content part.
#[derive(Debug, Serialize)]
pub struct TextPart<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<[(); 0]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<[(); 0]>,
    pub text: &'a str,
}

impl<'a> TextPart<'a> {
    pub(super) fn output_text(text: &'a str) -> Self {
        TextPart {
            kind: "output_text",
            annotations: Some([]),
            logprobs: Some([]),
            text,
        }
    }

    pub(super) fn reasoning_text(text: &'a str) -> Self {
        TextPart {
            kind: "reasoning_text",
            annotations: None,
            logprobs: None,
            text,
        }
    }
}

/// A `reasoning` item.
#[derive(Debug, Serialize)]
pub struct ReasoningItem<'a> {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub summary: [(); 0],
    pub content: Vec<TextPart<'a>>,
}

/// A `function_call` item (a client tool's call).
#[derive(Debug, Serialize)]
pub struct FunctionCallItem<'a> {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub arguments: &'a str,
    pub call_id: &'a str,
    pub name: &'a str,
}

/// An `mcp_call` item (a server tool's call).
#[derive(Debug, Serialize)]
pub struct McpCallItem<'a> {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub arguments: &'a str,
    pub name: &'a str,
    pub server_label: &'static str,
    pub output: Option<&'a str>,
    pub error: Option<()>,
}

/// The item id of a step: `<prefix>_<compact stream id>_<step id>`.
pub(super) fn item_id(compact: &str, step: &Step) -> String {
    let prefix = match &step.kind {
        StepKind::Pending | StepKind::Text => "msg",
        StepKind::Reasoning => "rs",
        StepKind::Tool(c) if c.client => "fc",
        StepKind::Tool(_) => "mcp",
    };
    format!("{prefix}_{compact}_{}", step.id)
}

pub(super) fn status(s: StepStatus) -> &'static str {
    match s {
        StepStatus::Open | StepStatus::InputDone => "in_progress",
        StepStatus::Done => "completed",
        StepStatus::Incomplete | StepStatus::Discarded => "incomplete",
    }
}

/// The item of `step` as it stands; `empty` for `output_item.added` (no content yet,
/// arguments `""`).
pub(super) fn item<'a>(compact: &str, step: &'a Step, empty: bool) -> Item<'a> {
    let id = item_id(compact, step);
    let st = if empty {
        "in_progress"
    } else {
        status(step.status)
    };
    let text = if empty { "" } else { step.text.as_str() };
    match &step.kind {
        StepKind::Pending | StepKind::Text => Item::Message(MessageItem {
            id,
            kind: "message",
            status: st,
            content: if empty {
                Vec::new()
            } else {
                vec![TextPart::output_text(text)]
            },
            role: "assistant",
        }),
        StepKind::Reasoning => Item::Reasoning(ReasoningItem {
            id,
            kind: "reasoning",
            status: st,
            summary: [],
            content: if empty {
                Vec::new()
            } else {
                vec![TextPart::reasoning_text(text)]
            },
        }),
        StepKind::Tool(c) if c.client => Item::FunctionCall(FunctionCallItem {
            id,
            kind: "function_call",
            status: st,
            arguments: text,
            call_id: &c.call_id,
            name: &c.name,
        }),
        StepKind::Tool(c) => Item::McpCall(McpCallItem {
            id,
            kind: "mcp_call",
            status: st,
            arguments: text,
            name: &c.name,
            server_label: SERVER_LABEL,
            output: if empty { None } else { c.output.as_deref() },
            error: None,
        }),
    }
}
