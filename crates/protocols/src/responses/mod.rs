//! OpenAI Responses: the stream events and the `response` object.
//!
//! Shapes follow the `openai` Python package's types (`openai/types/responses/`,
//! version 3.63.0) and OpenAI's recorded streams. Each frame is
//! `event: <type>\ndata: {json}\n\n`; every event carries `sequence_number`, which is
//! the frame's position in the projected stream (0 for `response.created`), so a
//! resume with `starting_after=N` is exactly the frames after position N.
//!
//! The stream: `response.created` (status `in_progress`, or `queued` for a background
//! response, then `response.queued`), `response.in_progress`, then per output item
//! `response.output_item.added` … `response.output_item.done`, and one of
//! `response.completed`, `response.failed` (after an `error` event) or
//! `response.incomplete`, which carries the whole `response` object. Items:
//!
//! - text → a `message` item with one `output_text` part
//!   (`content_part.added`, `output_text.delta`…, `output_text.done`,
//!   `content_part.done`);
//! - reasoning → a `reasoning` item with one `reasoning_text` part
//!   (`reasoning_text.delta`…, `reasoning_text.done`) — genstream streams the model's
//!   reasoning itself, not a summary;
//! - a client tool's call → a `function_call` item (`function_call_arguments.delta`…,
//!   `.done` once the job completed, when the call is the client's to run);
//! - a server tool's call → an `mcp_call` item with `server_label: "genstream"`
//!   (`response.mcp_call.in_progress`, `mcp_call_arguments.delta`…, `.done`,
//!   `response.mcp_call.completed` with its `output`): OpenAI's own item for a tool
//!   the server ran, which no client mistakes for one it must run.
//!
//! Item ids derive from the stream id and the native step id (`msg_<stream>_<step>`),
//! so the stream and the final object agree and ids never repeat across a retry.
//! `output_index` numbers items in the order they appeared, discarded ones included,
//! as a streaming client accumulates them; the final object's `output` is the saved
//! answer only. An item a retry discards or an abort cuts is closed with status
//! `incomplete` (an `mcp_call` with `response.mcp_call.failed`).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use genstream_engine::event::EventBody;
use serde::Serialize;
use serde_json::Value;

use crate::ProjectionError;
use crate::fold::{Change, Close, JobFold, Outcome, StepKind};
use crate::frame::{ProjectedFrame, Projector, event_frame};

/// The `server_label` of the `mcp_call` items that show server tools.
pub const SERVER_LABEL: &str = "genstream";

/// What a Responses projection needs from the request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResponsesOptions {
    /// The request's own function tools, which the client runs.
    pub client_tools: BTreeSet<String>,
    /// `background: true`: the response starts `queued`.
    pub background: bool,
    /// Request parameters the `response` object echoes.
    pub params: ResponseParams,
}

/// The request parameters a `response` object repeats, as the request gave them.
#[derive(Clone, Debug, PartialEq)]
pub struct ResponseParams {
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub temperature: Option<f64>,
    /// `"auto"` unless the request said otherwise.
    pub tool_choice: Value,
    /// The request's tools, verbatim.
    pub tools: Vec<Value>,
    pub top_p: Option<f64>,
    pub metadata: BTreeMap<String, String>,
}

impl Default for ResponseParams {
    fn default() -> Self {
        ResponseParams {
            instructions: None,
            max_output_tokens: None,
            parallel_tool_calls: true,
            previous_response_id: None,
            temperature: None,
            tool_choice: Value::String("auto".into()),
            tools: Vec::new(),
            top_p: None,
            metadata: BTreeMap::new(),
        }
    }
}

mod object;

pub use object::*;
use object::{item, item_id};

/// The Responses projection of one job.
#[derive(Clone, Debug)]
pub struct ResponsesProjector {
    fold: JobFold,
    options: ResponsesOptions,
    emit: Emitter,
}

#[derive(Clone, Debug, Default)]
struct Emitter {
    next_position: u64,
    /// Per step (by fold index): its item id, once visible.
    item_ids: Vec<Option<String>>,
    /// Per step: whether its arguments' `.done` was sent (tool steps).
    args_done: Vec<bool>,
}

impl ResponsesProjector {
    /// A projector for a job started with `options`.
    pub fn new(options: ResponsesOptions) -> Self {
        ResponsesProjector {
            fold: JobFold::new(options.client_tools.clone()),
            options,
            emit: Emitter::default(),
        }
    }

    /// The log folded so far, for [`response`].
    pub fn fold(&self) -> &JobFold {
        &self.fold
    }

    /// The options it was made with, for [`response`].
    pub fn options(&self) -> &ResponsesOptions {
        &self.options
    }
}

impl Projector for ResponsesProjector {
    fn push(
        &mut self,
        seq: u64,
        body: &EventBody,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let emit = &mut self.emit;
        let options = &self.options;
        self.fold.apply_emitting(seq, body, |fold, change| {
            emit.on(fold, options, change, seq, out)
        })
    }

    fn next_position(&self) -> u64 {
        self.emit.next_position
    }
}

/// `response.created` and the other lifecycle events.
#[derive(Serialize)]
struct Lifecycle<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    response: ResponseObject<'a>,
    sequence_number: u64,
}

#[derive(Serialize)]
struct ItemEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    output_index: u32,
    item: Item<'a>,
    sequence_number: u64,
}

#[derive(Serialize)]
struct PartEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    item_id: &'a str,
    output_index: u32,
    content_index: u32,
    part: TextPart<'a>,
    sequence_number: u64,
}

/// `output_text.delta`, `reasoning_text.delta` and the `*_arguments.delta` events.
#[derive(Serialize)]
struct DeltaEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    item_id: &'a str,
    output_index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_index: Option<u32>,
    delta: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[(); 0]>,
    sequence_number: u64,
}

/// `output_text.done` and `reasoning_text.done`.
#[derive(Serialize)]
struct TextDoneEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    item_id: &'a str,
    output_index: u32,
    content_index: u32,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[(); 0]>,
    sequence_number: u64,
}

/// `function_call_arguments.done` and `mcp_call_arguments.done`.
#[derive(Serialize)]
struct ArgsDoneEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    item_id: &'a str,
    output_index: u32,
    arguments: &'a str,
    sequence_number: u64,
}

/// `response.mcp_call.in_progress` / `.completed` / `.failed`.
#[derive(Serialize)]
struct McpStatusEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    item_id: &'a str,
    output_index: u32,
    sequence_number: u64,
}

/// The `error` event before `response.failed` (flat, as the SDK's
/// `ResponseErrorEvent` has it).
#[derive(Serialize)]
struct ErrorEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    message: &'a str,
    param: Option<()>,
    sequence_number: u64,
}

/// Appends the frame of event `value` at the next position.
fn push_frame<T: Serialize>(
    next_position: &mut u64,
    seq: u64,
    kind: &str,
    value: &T,
    terminal: bool,
    out: &mut Vec<ProjectedFrame>,
) -> Result<(), ProjectionError> {
    let bytes: Bytes = event_frame(kind, value)?;
    out.push(ProjectedFrame {
        position: *next_position,
        seq,
        terminal,
        bytes,
    });
    *next_position += 1;
    Ok(())
}

impl Emitter {
    fn push<T: Serialize>(
        &mut self,
        seq: u64,
        kind: &str,
        value: &T,
        terminal: bool,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        push_frame(&mut self.next_position, seq, kind, value, terminal, out)
    }

    fn item_id(&mut self, fold: &JobFold, i: usize) -> String {
        self.cached_item_id(fold, i).to_string()
    }

    /// Step `i`'s item id, computed once.
    fn cached_item_id(&mut self, fold: &JobFold, i: usize) -> &str {
        if self.item_ids.len() <= i {
            self.item_ids.resize(i + 1, None);
        }
        let compact = fold.ids().map_or("", |ids| ids.compact.as_str());
        self.item_ids[i].get_or_insert_with(|| item_id(compact, &fold.steps()[i]))
    }

    fn lifecycle(
        &mut self,
        fold: &JobFold,
        options: &ResponsesOptions,
        kind: &'static str,
        status: Option<&'static str>,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let Some(mut response) = response(fold, options) else {
            return Ok(());
        };
        if let Some(s) = status {
            response.status = s;
        }
        let sequence_number = self.next_position;
        self.push(
            seq,
            kind,
            &Lifecycle {
                kind,
                response,
                sequence_number,
            },
            false,
            out,
        )
    }

    fn on(
        &mut self,
        fold: &JobFold,
        options: &ResponsesOptions,
        change: Change<'_>,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        match change {
            Change::Created => {
                if options.background {
                    self.lifecycle(fold, options, "response.created", Some("queued"), seq, out)?;
                    self.lifecycle(fold, options, "response.queued", Some("queued"), seq, out)?;
                } else {
                    self.lifecycle(fold, options, "response.created", None, seq, out)?;
                }
                self.lifecycle(fold, options, "response.in_progress", None, seq, out)
            }
            Change::PartStart(i) | Change::ToolStart(i) => self.added(fold, i, seq, out),
            Change::Text(i, delta) => {
                self.delta(fold, i, "response.output_text.delta", delta, seq, out)
            }
            Change::Reasoning(i, delta) => {
                self.delta(fold, i, "response.reasoning_text.delta", delta, seq, out)
            }
            Change::ToolArgs(i, delta) => self.args_delta(fold, i, delta, seq, out),
            Change::ToolInput(i) => {
                self.args_done(fold, i, seq, out)?;
                if fold.steps()[i].call().is_some_and(|c| c.client) {
                    self.item_done(fold, i, seq, out)?;
                }
                Ok(())
            }
            Change::ToolOutput(i) => {
                self.mcp_status(fold, i, "response.mcp_call.completed", seq, out)?;
                self.item_done(fold, i, seq, out)
            }
            Change::Close(i, how) => self.close(fold, i, how, seq, out),
            Change::End => self.end(fold, options, seq, out),
            Change::CallStart | Change::CallEnd { .. } | Change::Usage => Ok(()),
        }
    }

    fn output_index(fold: &JobFold, i: usize) -> u32 {
        fold.steps()[i].visible.unwrap_or(0)
    }

    fn added(
        &mut self,
        fold: &JobFold,
        i: usize,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let step = &fold.steps()[i];
        let compact = fold.ids().map_or("", |ids| ids.compact.as_str());
        let output_index = Self::output_index(fold, i);
        let sequence_number = self.next_position;
        self.push(
            seq,
            "response.output_item.added",
            &ItemEvent {
                kind: "response.output_item.added",
                output_index,
                item: item(compact, step, true),
                sequence_number,
            },
            false,
            out,
        )?;
        let item_id = self.item_id(fold, i);
        match &step.kind {
            StepKind::Text | StepKind::Reasoning => {
                let part = if step.kind == StepKind::Text {
                    TextPart::output_text("")
                } else {
                    TextPart::reasoning_text("")
                };
                let sequence_number = self.next_position;
                self.push(
                    seq,
                    "response.content_part.added",
                    &PartEvent {
                        kind: "response.content_part.added",
                        item_id: &item_id,
                        output_index,
                        content_index: 0,
                        part,
                        sequence_number,
                    },
                    false,
                    out,
                )
            }
            StepKind::Tool(c) => {
                if !c.client {
                    self.mcp_status(fold, i, "response.mcp_call.in_progress", seq, out)?;
                }
                if !step.text.is_empty() {
                    self.args_delta(fold, i, &step.text, seq, out)?;
                }
                Ok(())
            }
            StepKind::Pending => Ok(()),
        }
    }

    fn delta(
        &mut self,
        fold: &JobFold,
        i: usize,
        kind: &'static str,
        delta: &str,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        // The hot path (one per token): the item id is borrowed from the cache.
        self.cached_item_id(fold, i);
        let item_id = self.item_ids[i].as_deref().unwrap_or_default();
        let sequence_number = self.next_position;
        let text = kind == "response.output_text.delta";
        push_frame(
            &mut self.next_position,
            seq,
            kind,
            &DeltaEvent {
                kind,
                item_id,
                output_index: Self::output_index(fold, i),
                content_index: Some(0),
                delta,
                logprobs: text.then_some([]),
                sequence_number,
            },
            false,
            out,
        )
    }

    fn args_delta(
        &mut self,
        fold: &JobFold,
        i: usize,
        delta: &str,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let client = fold.steps()[i].call().is_some_and(|c| c.client);
        let kind = if client {
            "response.function_call_arguments.delta"
        } else {
            "response.mcp_call_arguments.delta"
        };
        let item_id = self.item_id(fold, i);
        let sequence_number = self.next_position;
        self.push(
            seq,
            kind,
            &DeltaEvent {
                kind,
                item_id: &item_id,
                output_index: Self::output_index(fold, i),
                content_index: None,
                delta,
                logprobs: None,
                sequence_number,
            },
            false,
            out,
        )
    }

    fn args_done(
        &mut self,
        fold: &JobFold,
        i: usize,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        if self.args_done.len() <= i {
            self.args_done.resize(i + 1, false);
        }
        if self.args_done[i] {
            return Ok(());
        }
        self.args_done[i] = true;
        let step = &fold.steps()[i];
        let kind = if step.call().is_some_and(|c| c.client) {
            "response.function_call_arguments.done"
        } else {
            "response.mcp_call_arguments.done"
        };
        let item_id = self.item_id(fold, i);
        let sequence_number = self.next_position;
        self.push(
            seq,
            kind,
            &ArgsDoneEvent {
                kind,
                item_id: &item_id,
                output_index: Self::output_index(fold, i),
                arguments: &step.text,
                sequence_number,
            },
            false,
            out,
        )
    }

    fn mcp_status(
        &mut self,
        fold: &JobFold,
        i: usize,
        kind: &'static str,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let item_id = self.item_id(fold, i);
        let sequence_number = self.next_position;
        self.push(
            seq,
            kind,
            &McpStatusEvent {
                kind,
                item_id: &item_id,
                output_index: Self::output_index(fold, i),
                sequence_number,
            },
            false,
            out,
        )
    }

    fn item_done(
        &mut self,
        fold: &JobFold,
        i: usize,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let compact = fold.ids().map_or("", |ids| ids.compact.as_str());
        let sequence_number = self.next_position;
        self.push(
            seq,
            "response.output_item.done",
            &ItemEvent {
                kind: "response.output_item.done",
                output_index: Self::output_index(fold, i),
                item: item(compact, &fold.steps()[i], false),
                sequence_number,
            },
            false,
            out,
        )
    }

    fn close(
        &mut self,
        fold: &JobFold,
        i: usize,
        how: Close,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let _ = how; // the step's status already says how it ended
        let step = &fold.steps()[i];
        let output_index = Self::output_index(fold, i);
        let item_id = self.item_id(fold, i);
        match &step.kind {
            StepKind::Text | StepKind::Reasoning => {
                let text_kind = step.kind == StepKind::Text;
                let (done, part) = if text_kind {
                    (
                        "response.output_text.done",
                        TextPart::output_text(&step.text),
                    )
                } else {
                    (
                        "response.reasoning_text.done",
                        TextPart::reasoning_text(&step.text),
                    )
                };
                let sequence_number = self.next_position;
                self.push(
                    seq,
                    done,
                    &TextDoneEvent {
                        kind: done,
                        item_id: &item_id,
                        output_index,
                        content_index: 0,
                        text: &step.text,
                        logprobs: text_kind.then_some([]),
                        sequence_number,
                    },
                    false,
                    out,
                )?;
                let sequence_number = self.next_position;
                self.push(
                    seq,
                    "response.content_part.done",
                    &PartEvent {
                        kind: "response.content_part.done",
                        item_id: &item_id,
                        output_index,
                        content_index: 0,
                        part,
                        sequence_number,
                    },
                    false,
                    out,
                )?;
            }
            StepKind::Tool(c) => {
                self.args_done(fold, i, seq, out)?;
                if !c.client {
                    self.mcp_status(fold, i, "response.mcp_call.failed", seq, out)?;
                }
            }
            StepKind::Pending => return Ok(()),
        }
        self.item_done(fold, i, seq, out)
    }

    fn end(
        &mut self,
        fold: &JobFold,
        options: &ResponsesOptions,
        seq: u64,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError> {
        let Some(end) = fold.end() else {
            return Ok(());
        };
        let Some(object) = response(fold, options) else {
            return Ok(());
        };
        let kind = match object.status {
            "completed" => "response.completed",
            "failed" => "response.failed",
            _ => "response.incomplete",
        };
        if let Outcome::Failed { code, message } = &end.outcome
            && kind == "response.failed"
        {
            let sequence_number = self.next_position;
            self.push(
                seq,
                "error",
                &ErrorEvent {
                    kind: "error",
                    code,
                    message,
                    param: None,
                    sequence_number,
                },
                false,
                out,
            )?;
        }
        let sequence_number = self.next_position;
        self.push(
            seq,
            kind,
            &Lifecycle {
                kind,
                response: object,
                sequence_number,
            },
            true,
            out,
        )
    }
}
