//! OpenAI Chat Completions: the streamed `chat.completion.chunk`s and the
//! `chat.completion` object.
//!
//! Shapes follow the `openai` Python package's types (`openai/types/chat/`,
//! version 3.63.0) and OpenAI's recorded streams: every chunk is `data: {json}` with
//! `object: "chat.completion.chunk"`, the same `id`, `created` and `model`, and one
//! choice at index 0; the first chunk carries `role: "assistant"`; the stream ends
//! with `data: [DONE]`. With `stream_options.include_usage` every chunk has
//! `"usage": null` except the last before `[DONE]`, which has `choices: []` and the
//! usage. Reasoning travels as `delta.reasoning_content` (the DeepSeek convention;
//! OpenAI itself streams no reasoning here).
//!
//! Tool calls: only *client* tools reach a Chat Completions client (a server tool's call
//! in `tool_calls` would be taken for one the client must run), and each arrives whole
//! in one chunk — id, name and all the arguments, as xAI sends them — once the job
//! completed. A call is then never one a retry discards or an abort cut, and the
//! indexes a client accumulates by are 0, 1, 2, … with no hole. `finish_reason` is
//! then `tool_calls`.
//!
//! A retry cannot take back text already streamed; the `chat.completion` object, like
//! the saved answer, holds only the successful attempt's.

use std::collections::BTreeSet;

use bytes::Bytes;
use genstream_engine::event::EventBody;
use serde::Serialize;

use crate::ProjectionError;
use crate::fold::{Change, JobFold, Outcome, StepKind, StepStatus, TokenUsage};
use crate::frame::{DONE, ProjectedFrame, Projector, data_frame};

/// What a Chat Completions projection needs from the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatOptions {
    /// `stream_options.include_usage`: end with a usage chunk.
    pub include_usage: bool,
    /// The request's own function tools, which the client runs.
    pub client_tools: BTreeSet<String>,
}

/// `usage` in Chat Completions' shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatUsage {
    /// Input tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Output tokens, reasoning included.
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
}

/// `usage.completion_tokens_details`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: u64,
}

impl From<&TokenUsage> for ChatUsage {
    fn from(u: &TokenUsage) -> Self {
        ChatUsage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            total_tokens: u.total_tokens(),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: u.reasoning_tokens,
            },
        }
    }
}

/// The `finish_reason` of a job (`None` while it runs): `tool_calls` when the
/// client has calls to run, `length` when a server limit cut the answer
/// (`max_tool_iterations`, `log_full`), `stop` otherwise — an abort included.
pub fn finish_reason(fold: &JobFold) -> Option<&'static str> {
    let end = fold.end()?;
    Some(if end.outcome.hit_limit() {
        "length"
    } else if matches!(end.outcome, Outcome::Completed { .. })
        && client_calls(fold).next().is_some()
    {
        "tool_calls"
    } else {
        "stop"
    })
}

/// The client tool calls handed to the client, in content order.
fn client_calls(fold: &JobFold) -> impl Iterator<Item = &crate::fold::Step> {
    fold.output()
        .into_iter()
        .filter(|s| s.status == StepStatus::Done && s.call().is_some_and(|c| c.client))
}

/// The `chat.completion` object of the log folded so far (also the shape of
/// `GET /v1/chat/completions/{id}`): the saved answer's text as `content`, its
/// reasoning as `reasoning_content`, the client tool calls as `tool_calls`,
/// `finish_reason` `null` while the job runs. `None` before `created`.
pub fn completion(fold: &JobFold) -> Option<ChatCompletion<'_>> {
    let ids = fold.ids()?;
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for step in fold.output() {
        match &step.kind {
            StepKind::Text => content.push_str(&step.text),
            StepKind::Reasoning => reasoning.push_str(&step.text),
            StepKind::Tool(c) if c.client && step.status == StepStatus::Done => {
                tool_calls.push(ToolCallObject {
                    id: &c.call_id,
                    kind: "function",
                    function: FunctionCall {
                        name: &c.name,
                        arguments: &step.text,
                    },
                })
            }
            _ => {}
        }
    }
    Some(ChatCompletion {
        id: ids.chat_completion_id(),
        object: "chat.completion",
        created: ids.created,
        model: &ids.model,
        choices: [CompletionChoice {
            index: 0,
            message: CompletionMessage {
                role: "assistant",
                content: (!content.is_empty() || tool_calls.is_empty()).then_some(content),
                refusal: None,
                reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
            },
            logprobs: None,
            finish_reason: finish_reason(fold),
        }],
        usage: ChatUsage::from(fold.usage()),
    })
}

/// A `chat.completion` object; serialize it with serde.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds: the job's `created.createdAt`.
    pub created: i64,
    pub model: &'a str,
    pub choices: [CompletionChoice<'a>; 1],
    pub usage: ChatUsage,
}

/// `choices[0]` of a `chat.completion`.
#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub message: CompletionMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// The assistant message of a `chat.completion`.
#[derive(Debug, Serialize)]
pub struct CompletionMessage<'a> {
    pub role: &'static str,
    /// `null` only when the answer is tool calls and no text.
    pub content: Option<String>,
    pub refusal: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallObject<'a>>>,
}

/// One entry of `message.tool_calls`.
#[derive(Debug, Serialize)]
pub struct ToolCallObject<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall<'a>,
}

/// `function` of a tool call.
#[derive(Debug, Serialize)]
pub struct FunctionCall<'a> {
    pub name: &'a str,
    /// The arguments, a JSON text as the model wrote it.
    pub arguments: &'a str,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// Absent without `include_usage`; `null` on every chunk but the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<ChatUsage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ChunkToolCall<'a>; 1]>,
}

#[derive(Serialize)]
struct ChunkToolCall<'a> {
    index: u32,
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall<'a>,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<()>,
    code: &'a str,
}

/// The Chat Completions projection of one job: a stream of `chat.completion.chunk`
/// frames ending in `data: [DONE]`.
#[derive(Clone, Debug)]
pub struct ChatProjector {
    fold: JobFold,
    emit: Emitter,
}

#[derive(Clone, Debug)]
struct Emitter {
    include_usage: bool,
    id: String,
    next_position: u64,
    /// Client tool calls sent so far (the next one's `index`).
    tool_calls: u32,
}

impl ChatProjector {
    /// A projector for a job started with `options`.
    pub fn new(options: ChatOptions) -> Self {
        ChatProjector {
            fold: JobFold::new(options.client_tools),
            emit: Emitter {
                include_usage: options.include_usage,
                id: String::new(),
                next_position: 0,
                tool_calls: 0,
            },
        }
    }

    /// The log folded so far, for [`completion`].
    pub fn fold(&self) -> &JobFold {
        &self.fold
    }
}

impl Projector for ChatProjector {
    fn push(
        &mut self,
        seq: u64,
        body: &EventBody,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let emit = &mut self.emit;
        self.fold
            .apply_emitting(seq, body, |fold, change| emit.on(fold, change, seq, out))
    }

    fn next_position(&self) -> u64 {
        self.emit.next_position
    }
}

impl Emitter {
    fn frame(&mut self, seq: u64, bytes: Bytes, terminal: bool, out: &mut Vec<ProjectedFrame>) {
        out.push(ProjectedFrame {
            position: self.next_position,
            seq,
            terminal,
            bytes,
        });
        self.next_position += 1;
    }

    fn chunk(
        &mut self,
        fold: &JobFold,
        seq: u64,
        delta: Delta<'_>,
        finish_reason: Option<&'static str>,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let Some(ids) = fold.ids() else {
            return Ok(());
        };
        let bytes = data_frame(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: ids.created,
            model: &ids.model,
            choices: &[ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: self.include_usage.then_some(None),
        })?;
        self.frame(seq, bytes, false, out);
        Ok(())
    }

    fn on(
        &mut self,
        fold: &JobFold,
        change: Change<'_>,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        match change {
            Change::Created => {
                if let Some(ids) = fold.ids() {
                    self.id = ids.chat_completion_id();
                }
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..Delta::default()
                };
                self.chunk(fold, seq, delta, None, out)
            }
            Change::Text(_, text) => {
                let delta = Delta {
                    content: Some(text),
                    ..Delta::default()
                };
                self.chunk(fold, seq, delta, None, out)
            }
            Change::Reasoning(_, text) => {
                let delta = Delta {
                    reasoning_content: Some(text),
                    ..Delta::default()
                };
                self.chunk(fold, seq, delta, None, out)
            }
            Change::ToolInput(i) => {
                let step = &fold.steps()[i];
                let Some(call) = step.call().filter(|c| c.client) else {
                    return Ok(());
                };
                let delta = Delta {
                    tool_calls: Some([ChunkToolCall {
                        index: self.tool_calls,
                        id: &call.call_id,
                        kind: "function",
                        function: FunctionCall {
                            name: &call.name,
                            arguments: &step.text,
                        },
                    }]),
                    ..Delta::default()
                };
                self.tool_calls += 1;
                self.chunk(fold, seq, delta, None, out)
            }
            Change::End => self.end(fold, seq, out),
            _ => Ok(()),
        }
    }

    fn end(
        &mut self,
        fold: &JobFold,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let (Some(ids), Some(end)) = (fold.ids(), fold.end()) else {
            return Ok(());
        };
        let failed = match &end.outcome {
            Outcome::Failed { code, message } if !end.outcome.hit_limit() => {
                Some((code.as_str(), message.as_str()))
            }
            _ => None,
        };
        if failed.is_none() {
            self.chunk(fold, seq, Delta::default(), finish_reason(fold), out)?;
        }
        if self.include_usage {
            let bytes = data_frame(&Chunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: ids.created,
                model: &ids.model,
                choices: &[],
                usage: Some(Some(ChatUsage::from(fold.usage()))),
            })?;
            self.frame(seq, bytes, false, out);
        }
        if let Some((code, message)) = failed {
            // What OpenAI sends when a stream fails; the official SDKs raise it.
            let bytes = data_frame(&ErrorFrame {
                error: ErrorBody {
                    message,
                    kind: "server_error",
                    param: None,
                    code,
                },
            })?;
            self.frame(seq, bytes, false, out);
        }
        self.frame(seq, Bytes::from_static(DONE), true, out);
        Ok(())
    }
}
