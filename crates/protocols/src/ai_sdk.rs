//! The Vercel AI SDK UI message stream (`x-vercel-ai-ui-message-stream: v1`), what
//! `useChat` reads.
//!
//! Chunk types and fields follow the `ai` npm package's `UIMessageChunk` type and its
//! `uiMessageChunkSchema` (zod): checked against `ai` 5.0.277 and 7.0.185, and only
//! chunks both accept are sent by default, so `useChat` of AI SDK 5, 6 and 7 reads the
//! stream unmodified. Each chunk is `data: {json}\n\n`; the stream ends with
//! `data: [DONE]`. A resumed stream replays the message from its start (`useChat`
//! rebuilds the message from the chunks), so positions matter only for order.
//!
//! - `start` with `messageId` = genstream's response message id and `messageMetadata`
//!   `{streamId, conversationId}`;
//! - one `start-step` … `finish-step` per model call (a tool round is a step);
//! - `text-start`/`-delta`/`-end` and `reasoning-start`/`-delta`/`-end`, with the
//!   native step id as the part id;
//! - tool calls: `tool-input-start`, `tool-input-delta`…, `tool-input-available` and,
//!   for a server tool, `tool-output-available`. Server tools carry
//!   `providerExecuted: true` (the client must not run them; `useChat`'s
//!   `onToolCall` and `lastAssistantMessageIsCompleteWithToolCalls` skip them) and
//!   `dynamic: true` (the client's typed tool set does not declare them). A client
//!   tool's input becomes available only once the job completed, so `onToolCall`
//!   never fires for a call a retry discards; one cut off ends with `tool-input-error`;
//! - the end: `finish` with `finishReason` `stop`, `tool-calls` (client calls to
//!   run) or `length` (`max_tool_iterations`, `log_full`); `abort` with genstream's
//!   `reason` for an abort; `error` with the message, then `finish` `error`, for a
//!   failure.
//!
//! A retry's discarded parts are ended (`text-end`, `reasoning-end`,
//! `tool-input-error` / `tool-output-error`) and their step finished; the next attempt
//! is a new step. The text stays on the client's screen until the message is reloaded
//! from the saved answer. With [`AiSdkOptions::reset_step_on_retry`] the projection
//! sends AI SDK 7's `reset-step` instead, which removes the failed attempt's parts
//! from the client's message — but clients before AI SDK 7 reject that chunk.

use std::collections::BTreeSet;

use bytes::Bytes;
use genstream_engine::event::EventBody;
use serde::Serialize;
use serde_json::Value;

use crate::ProjectionError;
use crate::fold::{Change, Close, JobFold, Outcome, StepKind, StepStatus};
use crate::frame::{DONE, ProjectedFrame, Projector, data_frame};

/// The response headers a UI message stream is served with (as the `ai` package's
/// `UI_MESSAGE_STREAM_HEADERS`).
pub const HEADERS: [(&str, &str); 5] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("connection", "keep-alive"),
    ("x-vercel-ai-ui-message-stream", "v1"),
    ("x-accel-buffering", "no"),
];

/// What an AI SDK projection needs from the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AiSdkOptions {
    /// The tools the client runs (its `onToolCall` answers them).
    pub client_tools: BTreeSet<String>,
    /// On a retry, send `reset-step` (AI SDK ≥ 7) rather than ending the discarded
    /// parts, so the client drops them.
    pub reset_step_on_retry: bool,
}

/// One UI message chunk.
#[derive(Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
enum Chunk<'a> {
    Start {
        message_id: &'a str,
        message_metadata: Metadata<'a>,
    },
    StartStep,
    FinishStep,
    ResetStep,
    TextStart {
        id: &'a str,
    },
    TextDelta {
        id: &'a str,
        delta: &'a str,
    },
    TextEnd {
        id: &'a str,
    },
    ReasoningStart {
        id: &'a str,
    },
    ReasoningDelta {
        id: &'a str,
        delta: &'a str,
    },
    ReasoningEnd {
        id: &'a str,
    },
    ToolInputStart {
        tool_call_id: &'a str,
        tool_name: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider_executed: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dynamic: Option<bool>,
    },
    ToolInputDelta {
        tool_call_id: &'a str,
        input_text_delta: &'a str,
    },
    ToolInputAvailable {
        tool_call_id: &'a str,
        tool_name: &'a str,
        input: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider_executed: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dynamic: Option<bool>,
    },
    ToolInputError {
        tool_call_id: &'a str,
        tool_name: &'a str,
        input: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider_executed: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dynamic: Option<bool>,
        error_text: &'a str,
    },
    ToolOutputAvailable {
        tool_call_id: &'a str,
        output: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider_executed: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dynamic: Option<bool>,
    },
    ToolOutputError {
        tool_call_id: &'a str,
        error_text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider_executed: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dynamic: Option<bool>,
    },
    Finish {
        finish_reason: &'static str,
    },
    Abort {
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    Error {
        error_text: &'a str,
    },
}

/// `start.messageMetadata`: where the message comes from in genstream.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Metadata<'a> {
    stream_id: &'a str,
    conversation_id: &'a str,
}

/// Why a discarded or cut-off tool call ended, as `errorText`.
const DISCARDED: &str = "discarded: the model call failed and was retried";
const CUT_OFF: &str = "the generation ended before the tool call finished";

/// A tool's input or output text as JSON: the value it parses to, `{}` when empty,
/// else the text itself as a string.
fn json_or_string(text: &str) -> Value {
    if text.trim().is_empty() {
        return Value::Object(serde_json::Map::new());
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// The AI SDK projection of one job.
#[derive(Clone, Debug)]
pub struct AiSdkProjector {
    fold: JobFold,
    emit: Emitter,
}

#[derive(Clone, Debug)]
struct Emitter {
    reset_step_on_retry: bool,
    next_position: u64,
    /// A `start-step` was sent and its `finish-step` not yet.
    step_open: bool,
    /// The open step was reset by a retry: the next model call continues it.
    reuse_step: bool,
    /// Per step (by fold index): its input was made available.
    input_available: Vec<bool>,
}

impl AiSdkProjector {
    /// A projector for a job started with `options`.
    pub fn new(options: AiSdkOptions) -> Self {
        AiSdkProjector {
            fold: JobFold::new(options.client_tools),
            emit: Emitter {
                reset_step_on_retry: options.reset_step_on_retry,
                next_position: 0,
                step_open: false,
                reuse_step: false,
                input_available: Vec::new(),
            },
        }
    }

    /// The log folded so far.
    pub fn fold(&self) -> &JobFold {
        &self.fold
    }
}

impl Projector for AiSdkProjector {
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

/// `providerExecuted` and `dynamic` of a tool's chunks: both `true` for a server
/// tool, absent for a client tool.
fn server_flags(client: bool) -> (Option<bool>, Option<bool>) {
    if client {
        (None, None)
    } else {
        (Some(true), Some(true))
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

    fn send(
        &mut self,
        seq: u64,
        chunk: &Chunk<'_>,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let bytes = data_frame(chunk)?;
        self.frame(seq, bytes, false, out);
        Ok(())
    }

    fn input_available(&mut self, i: usize) -> bool {
        self.input_available.get(i).copied().unwrap_or(false)
    }

    fn set_input_available(&mut self, i: usize) {
        if self.input_available.len() <= i {
            self.input_available.resize(i + 1, false);
        }
        self.input_available[i] = true;
    }

    fn on(
        &mut self,
        fold: &JobFold,
        change: Change<'_>,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let steps = fold.steps();
        match change {
            Change::Created => {
                let Some(ids) = fold.ids() else {
                    return Ok(());
                };
                self.send(
                    seq,
                    &Chunk::Start {
                        message_id: &ids.response_message_id,
                        message_metadata: Metadata {
                            stream_id: &ids.stream_id,
                            conversation_id: &ids.conversation_id,
                        },
                    },
                    out,
                )
            }
            Change::CallStart => {
                if self.reuse_step {
                    self.reuse_step = false;
                    return Ok(());
                }
                if self.step_open {
                    self.send(seq, &Chunk::FinishStep, out)?;
                }
                self.step_open = true;
                self.send(seq, &Chunk::StartStep, out)
            }
            Change::CallEnd { discarded } => {
                if !self.step_open {
                    return Ok(());
                }
                if discarded && self.reset_step_on_retry {
                    self.reuse_step = true;
                    return self.send(seq, &Chunk::ResetStep, out);
                }
                self.step_open = false;
                self.send(seq, &Chunk::FinishStep, out)
            }
            Change::PartStart(i) => {
                let id = steps[i].id.as_str();
                let chunk = if steps[i].kind == StepKind::Text {
                    Chunk::TextStart { id }
                } else {
                    Chunk::ReasoningStart { id }
                };
                self.send(seq, &chunk, out)
            }
            Change::Text(i, delta) => self.send(
                seq,
                &Chunk::TextDelta {
                    id: &steps[i].id,
                    delta,
                },
                out,
            ),
            Change::Reasoning(i, delta) => self.send(
                seq,
                &Chunk::ReasoningDelta {
                    id: &steps[i].id,
                    delta,
                },
                out,
            ),
            Change::ToolStart(i) => {
                let Some(call) = steps[i].call() else {
                    return Ok(());
                };
                let (provider_executed, dynamic) = server_flags(call.client);
                self.send(
                    seq,
                    &Chunk::ToolInputStart {
                        tool_call_id: &call.call_id,
                        tool_name: &call.name,
                        provider_executed,
                        dynamic,
                    },
                    out,
                )?;
                if !steps[i].text.is_empty() {
                    self.send(
                        seq,
                        &Chunk::ToolInputDelta {
                            tool_call_id: &call.call_id,
                            input_text_delta: &steps[i].text,
                        },
                        out,
                    )?;
                }
                Ok(())
            }
            Change::ToolArgs(i, delta) => {
                let Some(call) = steps[i].call() else {
                    return Ok(());
                };
                self.send(
                    seq,
                    &Chunk::ToolInputDelta {
                        tool_call_id: &call.call_id,
                        input_text_delta: delta,
                    },
                    out,
                )
            }
            Change::ToolInput(i) => {
                let Some(call) = steps[i].call() else {
                    return Ok(());
                };
                self.set_input_available(i);
                let (provider_executed, dynamic) = server_flags(call.client);
                self.send(
                    seq,
                    &Chunk::ToolInputAvailable {
                        tool_call_id: &call.call_id,
                        tool_name: &call.name,
                        input: json_or_string(&steps[i].text),
                        provider_executed,
                        dynamic,
                    },
                    out,
                )
            }
            Change::ToolOutput(i) => {
                let Some(call) = steps[i].call() else {
                    return Ok(());
                };
                let (provider_executed, dynamic) = server_flags(call.client);
                self.send(
                    seq,
                    &Chunk::ToolOutputAvailable {
                        tool_call_id: &call.call_id,
                        output: json_or_string(call.output.as_deref().unwrap_or("")),
                        provider_executed,
                        dynamic,
                    },
                    out,
                )
            }
            Change::Close(i, how) => {
                if how == Close::Discarded && self.reset_step_on_retry {
                    // `reset-step` (sent next) removes the whole attempt.
                    return Ok(());
                }
                let step = &steps[i];
                let error_text = if step.status == StepStatus::Discarded {
                    DISCARDED
                } else {
                    CUT_OFF
                };
                match &step.kind {
                    StepKind::Text => self.send(seq, &Chunk::TextEnd { id: &step.id }, out),
                    StepKind::Reasoning => {
                        self.send(seq, &Chunk::ReasoningEnd { id: &step.id }, out)
                    }
                    StepKind::Tool(call) => {
                        let (provider_executed, dynamic) = server_flags(call.client);
                        let chunk = if self.input_available(i) {
                            Chunk::ToolOutputError {
                                tool_call_id: &call.call_id,
                                error_text,
                                provider_executed,
                                dynamic,
                            }
                        } else {
                            Chunk::ToolInputError {
                                tool_call_id: &call.call_id,
                                tool_name: &call.name,
                                input: json_or_string(&step.text),
                                provider_executed,
                                dynamic,
                                error_text,
                            }
                        };
                        self.send(seq, &chunk, out)
                    }
                    StepKind::Pending => Ok(()),
                }
            }
            Change::End => self.end(fold, seq, out),
            Change::Usage => Ok(()),
        }
    }

    fn end(
        &mut self,
        fold: &JobFold,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let Some(end) = fold.end() else {
            return Ok(());
        };
        if self.step_open {
            self.step_open = false;
            self.send(seq, &Chunk::FinishStep, out)?;
        }
        let client_calls = fold
            .output()
            .iter()
            .any(|s| s.status == StepStatus::Done && s.call().is_some_and(|c| c.client));
        match &end.outcome {
            o if o.hit_limit() => self.send(
                seq,
                &Chunk::Finish {
                    finish_reason: "length",
                },
                out,
            )?,
            Outcome::Completed { .. } => self.send(
                seq,
                &Chunk::Finish {
                    finish_reason: if client_calls { "tool-calls" } else { "stop" },
                },
                out,
            )?,
            Outcome::Aborted { reason } => self.send(
                seq,
                &Chunk::Abort {
                    reason: reason.as_deref(),
                },
                out,
            )?,
            Outcome::Failed { message, .. } => {
                self.send(
                    seq,
                    &Chunk::Error {
                        error_text: message,
                    },
                    out,
                )?;
                self.send(
                    seq,
                    &Chunk::Finish {
                        finish_reason: "error",
                    },
                    out,
                )?;
            }
        }
        self.frame(seq, Bytes::from_static(DONE), true, out);
        Ok(())
    }
}
