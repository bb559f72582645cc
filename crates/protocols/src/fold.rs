//! The job's log read once, the way every projection needs it.
//!
//! The native log says when steps start and what their deltas are, but several things
//! every client protocol needs are only implied: when a text part is over (the next
//! step started, or the model call ended), when a tool call's arguments are complete
//! (the call ended — for a client tool, only once the job completed), which of the
//! failed attempt's parts a `retry` takes back, where one model call ends and the next
//! begins. [`JobFold`] works these out in one place and reports them as a stream of
//! [`Change`]s, which each protocol turns into its own frames; it also keeps, per step,
//! the content the final objects (`chat.completion`, the Responses `response`) are
//! built from. Everything is a pure function of the events folded so far: no clock, no
//! randomness, no hash-map iteration order.
//!
//! The rules (the README's mapping tables restate them per protocol):
//!
//! - A text or reasoning step becomes *visible* at its first non-empty delta (a step
//!   that only carries an Anthropic signature or a redacted block never does: neither
//!   has a representation in the OpenAI or AI SDK wire formats). It is *closed* as
//!   completed when another step starts, or at the event after its model call's
//!   `usage` — unless that event is a `retry`, which discards it, or an abort or a
//!   failure, which cut it (the engine writes the usage of a failed or cut call too,
//!   just before).
//! - A tool step becomes visible once its tool's name is known (at `on_run_step`, or
//!   a later argument fragment that carries it). A *server* tool's arguments are
//!   complete at its model call's `usage`; its output comes with
//!   `on_run_step_completed`. A *client* tool (a name in the set given at
//!   construction: the server does not run it, the client does) gets its arguments
//!   marked complete only when the job ends with `final` `complete` in the model call
//!   that made it — so a call that a retry later discards, that an abort cut off, or
//!   that the job went on past, never reaches a client as something to run. Its
//!   `on_run_step_completed`, if any, is not shown.
//! - A `retry` whose `discardStepIds` is not empty discards those steps: the ones
//!   still open are closed as discarded (what was sent of them cannot be taken back),
//!   and they are left out of the final objects, which are exactly the saved answer.
//! - A model call starts with the first step of a new `runId` and ends when the next
//!   one starts, when a `retry` discards it, or at the terminal event.
//! - At the terminal event, open parts are closed: as completed when the job completed,
//!   as incomplete otherwise.

use std::collections::BTreeSet;

use genstream_engine::event::{ContentPart, Created, EventBody, FinalStatus, StepDetails};
use genstream_engine::usage::UsageRecord;

use crate::ProjectionError;

/// A job's ids and creation time, as every protocol derives them from `created`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobIds {
    /// genstream's stream id (a UUID).
    pub stream_id: String,
    /// The stream id with only its ASCII letters and digits (a UUID's 32 hex digits),
    /// the base of the protocols' ids.
    pub compact: String,
    pub conversation_id: String,
    /// The id the response message is saved under.
    pub response_message_id: String,
    /// genstream's model name, as the client asked for it.
    pub model: String,
    /// `created.createdAt` as Unix seconds (0 if it is not RFC 3339).
    pub created: i64,
}

impl JobIds {
    /// The ids of the job whose `created` event is `c`.
    pub fn of(c: &Created) -> JobIds {
        JobIds {
            stream_id: c.stream_id.clone(),
            compact: c
                .stream_id
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect(),
            conversation_id: c.conversation_id.clone(),
            response_message_id: c.response_message_id.clone(),
            model: c.model.clone(),
            created: unix_seconds(&c.created_at).unwrap_or(0),
        }
    }

    /// The Chat Completions id: `chatcmpl-<compact stream id>`.
    pub fn chat_completion_id(&self) -> String {
        format!("chatcmpl-{}", self.compact)
    }

    /// The Responses id: `resp_<compact stream id>`.
    pub fn response_id(&self) -> String {
        format!("resp_{}", self.compact)
    }
}

/// An RFC 3339 timestamp as Unix seconds.
pub(crate) fn unix_seconds(rfc3339: &str) -> Option<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Token usage summed over a job's `usage` events, in OpenAI's terms: input tokens
/// include the cached ones (genstream's records say per record whether theirs do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Input tokens, cache reads and writes included.
    pub input_tokens: u64,
    /// Input tokens read from the cache.
    pub cached_tokens: u64,
    /// Input tokens written to the cache.
    pub cache_write_tokens: u64,
    /// Output tokens, reasoning included.
    pub output_tokens: u64,
    /// Reasoning tokens (part of `output_tokens`).
    pub reasoning_tokens: u64,
    /// Model calls summed (failed attempts included: their tokens were spent too).
    pub calls: u32,
}

impl TokenUsage {
    /// Adds one record.
    pub fn add(&mut self, u: &UsageRecord) {
        let input = if u.input_includes_cache {
            u.input_tokens
        } else {
            u.input_tokens
                .saturating_add(u.cache_read_tokens)
                .saturating_add(u.cache_write_tokens)
        };
        self.input_tokens = self.input_tokens.saturating_add(input);
        self.cached_tokens = self.cached_tokens.saturating_add(u.cache_read_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(u.cache_write_tokens);
        self.output_tokens = self.output_tokens.saturating_add(u.output_tokens);
        self.reasoning_tokens = self
            .reasoning_tokens
            .saturating_add(u.reasoning_tokens.min(u.output_tokens));
        self.calls = self.calls.saturating_add(1);
    }

    /// Input plus output tokens.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// How a job ended, from its terminal event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `final` `complete`; `reason` is `Some("max_tool_iterations")` when the tool
    /// loop's cap ended it.
    Completed { reason: Option<String> },
    /// `final` `aborted`; `reason` is `"aborted"` (a user) or `"shutdown"`.
    Aborted { reason: Option<String> },
    /// `error`, with its `code` (`upstream_error`, `stalled`, `log_full`, …).
    Failed { code: String, message: String },
}

impl Outcome {
    /// A completion cut by a server limit: the tool loop's cap, or the log's.
    pub fn hit_limit(&self) -> bool {
        match self {
            Outcome::Completed { reason } => reason.as_deref() == Some("max_tool_iterations"),
            Outcome::Failed { code, .. } => code == "log_full",
            Outcome::Aborted { .. } => false,
        }
    }

    /// A user's abort (not a shutdown's).
    pub fn cancelled_by_user(&self) -> bool {
        matches!(self, Outcome::Aborted { reason } if reason.as_deref() == Some("aborted"))
    }
}

/// The terminal event's data the projections use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    pub outcome: Outcome,
    /// `createdAt` of the saved response message (RFC 3339), when there is one.
    pub saved_at: Option<String>,
}

/// What a step holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A `message_creation` step whose first visible delta has not come yet.
    Pending,
    /// Answer text.
    Text,
    /// Reasoning text.
    Reasoning,
    /// A tool call.
    Tool(ToolCallInfo),
}

/// A tool step's call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCallInfo {
    /// The call id the wire shows: the tool call's id as known when the step became
    /// visible, or the step id if the upstream gave none, suffixed with `_<step id>`
    /// if an earlier call of the job had the same id. Never changes after that.
    pub call_id: String,
    /// The tool's name (fixed once visible).
    pub name: String,
    /// A client tool: the client runs it, the server does not.
    pub client: bool,
    /// The tool's output (server tools), once `on_run_step_completed` brought it.
    pub output: Option<String>,
}

/// Where a step is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepStatus {
    /// Streaming.
    Open,
    /// A tool call whose arguments are complete, waiting for its output.
    InputDone,
    /// Finished normally.
    Done,
    /// Cut off by an abort or a failure.
    Incomplete,
    /// Dropped by a `retry`: not part of the answer.
    Discarded,
}

/// One step of the log, as the projections see it.
#[derive(Clone, Debug)]
pub struct Step {
    /// The native step id.
    pub id: String,
    /// The step's position in the response's content array.
    pub index: u32,
    pub kind: StepKind,
    pub status: StepStatus,
    /// The order in which the step became visible (0, 1, 2, … over the whole stream,
    /// discarded steps included); `None` while invisible. This is its Responses
    /// `output_index`.
    pub visible: Option<u32>,
    /// The text, the reasoning text, or the tool call's arguments so far.
    pub text: String,
}

impl Step {
    /// The step's tool call, if it is one.
    pub fn call(&self) -> Option<&ToolCallInfo> {
        match &self.kind {
            StepKind::Tool(c) => Some(c),
            _ => None,
        }
    }

    /// Whether it is part of the answer and shown (visible and not discarded).
    pub fn is_output(&self) -> bool {
        self.visible.is_some() && self.status != StepStatus::Discarded
    }
}

/// How a part was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Close {
    Completed,
    Incomplete,
    Discarded,
}

/// One thing that happened to the projected answer, reported by [`JobFold`] in log
/// order. Step numbers index [`JobFold::steps`]; the fold's state is already updated
/// when a change is reported, except that [`Change::PartStart`] comes before the first
/// delta's text is added.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Change<'a> {
    /// `created` (seq 0): the ids are known.
    Created,
    /// A model call began (its first step).
    CallStart,
    /// The current model call is over; `discarded` when a retry took it back.
    CallEnd {
        discarded: bool,
    },
    /// A text or reasoning step became visible; a `Text` / `Reasoning` follows.
    PartStart(usize),
    Text(usize, &'a str),
    Reasoning(usize, &'a str),
    /// A tool step became visible; its `text` holds the arguments so far.
    ToolStart(usize),
    ToolArgs(usize, &'a str),
    /// The tool call's arguments are complete.
    ToolInput(usize),
    /// A server tool's output arrived (the step is done).
    ToolOutput(usize),
    /// A visible step was closed (a tool step only when not by `ToolOutput` or, for
    /// a client tool, `ToolInput`).
    Close(usize, Close),
    /// A `usage` event was added to [`JobFold::usage`].
    Usage,
    /// The terminal event: [`JobFold::end`] is set.
    End,
}

/// The log folded for projection: steps with their content and status, usage, the
/// ending. Feed it events in seq order with [`JobFold::apply`]; the final objects
/// ([`crate::chat::completion`], [`crate::responses::response`]) are functions of it.
#[derive(Clone, Debug)]
pub struct JobFold {
    client_tools: BTreeSet<String>,
    /// Wire call ids given so far.
    call_ids: BTreeSet<String>,
    ids: Option<JobIds>,
    steps: Vec<Step>,
    /// Steps not yet finished (status `Open` or `InputDone`), in creation order.
    live: Vec<usize>,
    usage: TokenUsage,
    end: Option<End>,
    current_call: Option<String>,
    /// A `usage` came last: close the call's text at the next event unless it is a
    /// `retry`.
    close_after_usage: bool,
    next_visible: u32,
    next_seq: u64,
}

impl JobFold {
    /// An empty fold. `client_tools` names the tools the client runs itself (the
    /// request's own function tools); every other tool is the server's.
    pub fn new(client_tools: BTreeSet<String>) -> Self {
        JobFold {
            client_tools,
            call_ids: BTreeSet::new(),
            ids: None,
            steps: Vec::new(),
            live: Vec::new(),
            usage: TokenUsage::default(),
            end: None,
            current_call: None,
            close_after_usage: false,
            next_visible: 0,
            next_seq: 0,
        }
    }

    /// Folds in the event at `seq`.
    ///
    /// Errors: [`ProjectionError::OutOfOrder`], [`ProjectionError::NotCreated`],
    /// [`ProjectionError::AfterTerminal`]; the fold is unchanged then.
    pub fn apply(&mut self, seq: u64, body: &EventBody) -> Result<(), ProjectionError> {
        self.apply_with(seq, body, &mut |_, _| {})
    }

    /// The job's ids, once `created` was folded in.
    pub fn ids(&self) -> Option<&JobIds> {
        self.ids.as_ref()
    }

    /// Every step so far, in creation order, discarded ones included.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The answer's visible steps in content order: what the final objects show.
    pub fn output(&self) -> Vec<&Step> {
        let mut v: Vec<&Step> = self.steps.iter().filter(|s| s.is_output()).collect();
        v.sort_by_key(|s| s.index);
        v
    }

    /// Usage summed over the `usage` events so far.
    pub fn usage(&self) -> &TokenUsage {
        &self.usage
    }

    /// How the job ended, once it did.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Events folded so far (the next expected seq).
    pub fn events(&self) -> u64 {
        self.next_seq
    }

    /// Whether `name` is a client tool.
    pub fn is_client_tool(&self, name: &str) -> bool {
        self.client_tools.contains(name)
    }

    /// Folds in the event at `seq` and hands each change to `emit`, as every projector
    /// does: the fold always takes the whole event (so its state stays that of the log),
    /// and the first error `emit` returns is the result.
    pub(crate) fn apply_emitting<'a, F>(
        &mut self,
        seq: u64,
        body: &'a EventBody,
        mut emit: F,
    ) -> Result<(), ProjectionError>
    where
        F: FnMut(&JobFold, Change<'a>) -> Result<(), ProjectionError>,
    {
        let mut failure = None;
        self.apply_with(seq, body, &mut |fold, change| {
            if failure.is_none()
                && let Err(e) = emit(fold, change)
            {
                failure = Some(e);
            }
        })?;
        failure.map_or(Ok(()), Err)
    }

    /// Folds in the event at `seq`, reporting each change to `f` with the fold's state.
    pub(crate) fn apply_with<'a, F>(
        &mut self,
        seq: u64,
        body: &'a EventBody,
        f: &mut F,
    ) -> Result<(), ProjectionError>
    where
        F: FnMut(&JobFold, Change<'a>),
    {
        if seq != self.next_seq {
            return Err(ProjectionError::OutOfOrder {
                expected: self.next_seq,
                got: seq,
            });
        }
        if self.end.is_some() {
            return Err(ProjectionError::AfterTerminal(seq));
        }
        match (self.ids.is_none(), body) {
            (true, EventBody::Created(_)) | (false, _) => {}
            (true, other) => return Err(ProjectionError::NotCreated(other.name())),
        }
        self.next_seq += 1;
        let cut = matches!(body, EventBody::Retry(_) | EventBody::Error(_))
            || matches!(body, EventBody::Final(f) if f.status == FinalStatus::Aborted);
        if std::mem::take(&mut self.close_after_usage) && !cut {
            // The model call whose `usage` came last ended normally: its text is
            // complete. A `retry` right after discards it instead, and an abort or a
            // failure right after cut it (both below).
            self.close_messages(Close::Completed, f);
        }
        match body {
            EventBody::Created(c) => {
                // A second `created` (never written by the engine) changes nothing.
                if self.ids.is_none() {
                    self.ids = Some(JobIds::of(c));
                    f(self, Change::Created);
                }
            }
            EventBody::RunStep(step) => {
                // A new step ends the text or reasoning before it: the engine never
                // writes to a message step again once another step began.
                self.close_messages(Close::Completed, f);
                if self.current_call.as_deref() != Some(step.run_id.as_str()) {
                    if self.current_call.is_some() {
                        // The job went on past the call: its client tool calls were
                        // answered without the client, which must not run them now.
                        let client: Vec<usize> = self
                            .live
                            .iter()
                            .copied()
                            .filter(|&i| self.steps[i].call().is_some_and(|c| c.client))
                            .collect();
                        for i in client {
                            self.finish(i, StepStatus::Incomplete);
                            f(self, Change::Close(i, Close::Incomplete));
                        }
                        f(self, Change::CallEnd { discarded: false });
                    }
                    self.current_call = Some(step.run_id.clone());
                    f(self, Change::CallStart);
                }
                let (kind, text) = match &step.step_details {
                    StepDetails::MessageCreation { .. } => (StepKind::Pending, String::new()),
                    StepDetails::ToolCalls { tool_calls } => {
                        let first = tool_calls.first();
                        (
                            StepKind::Tool(ToolCallInfo {
                                call_id: first.map(|c| c.id.clone()).unwrap_or_default(),
                                name: first.map(|c| c.name.clone()).unwrap_or_default(),
                                client: false,
                                output: None,
                            }),
                            first.map(|c| c.args.clone()).unwrap_or_default(),
                        )
                    }
                };
                let named = matches!(&kind, StepKind::Tool(c) if !c.name.is_empty());
                let i = self.steps.len();
                self.steps.push(Step {
                    id: step.id.clone(),
                    index: step.index,
                    kind,
                    status: StepStatus::Open,
                    visible: None,
                    text,
                });
                self.live.push(i);
                if named {
                    self.show_tool(i, f);
                }
            }
            EventBody::MessageDelta(d) | EventBody::ReasoningDelta(d) => {
                let reasoning = matches!(body, EventBody::ReasoningDelta(_));
                let Some(i) = self.find_open(&d.id) else {
                    return Ok(());
                };
                for part in &d.delta.content {
                    let piece = match (part, reasoning) {
                        (ContentPart::Text { text }, false) => text.as_str(),
                        (ContentPart::Think { think, .. }, true) => think.as_str(),
                        _ => continue,
                    };
                    if piece.is_empty() {
                        continue;
                    }
                    match (&self.steps[i].kind, reasoning) {
                        (StepKind::Pending, _) => {
                            self.steps[i].kind = if reasoning {
                                StepKind::Reasoning
                            } else {
                                StepKind::Text
                            };
                            self.steps[i].visible = Some(self.next_visible);
                            self.next_visible += 1;
                            f(self, Change::PartStart(i));
                        }
                        (StepKind::Text, false) | (StepKind::Reasoning, true) => {}
                        _ => continue,
                    }
                    self.steps[i].text.push_str(piece);
                    f(
                        self,
                        if reasoning {
                            Change::Reasoning(i, piece)
                        } else {
                            Change::Text(i, piece)
                        },
                    );
                }
            }
            EventBody::RunStepDelta(d) => {
                let Some(i) = self.find_open(&d.id) else {
                    return Ok(());
                };
                for chunk in &d.delta.tool_calls {
                    let visible = self.steps[i].visible.is_some();
                    let step = &mut self.steps[i];
                    let StepKind::Tool(call) = &mut step.kind else {
                        break;
                    };
                    if !visible {
                        if let Some(id) = chunk.id.as_deref().filter(|s| !s.is_empty()) {
                            call.call_id = id.to_string();
                        }
                        if let Some(name) = chunk.name.as_deref().filter(|s| !s.is_empty()) {
                            call.name = name.to_string();
                        }
                    }
                    let named = !call.name.is_empty();
                    step.text.push_str(&chunk.args);
                    if !visible && named {
                        self.show_tool(i, f);
                    } else if visible && !chunk.args.is_empty() {
                        f(self, Change::ToolArgs(i, &chunk.args));
                    }
                }
            }
            EventBody::RunStepCompleted(c) => {
                let Some(i) = self.find_live(&c.result.id) else {
                    return Ok(());
                };
                let StepKind::Tool(call) = &mut self.steps[i].kind else {
                    return Ok(());
                };
                if call.name.is_empty() {
                    call.name.clone_from(&c.result.tool_call.name);
                }
                self.ensure_visible(i, f);
                if self.steps[i].call().is_some_and(|c| c.client) {
                    // The client runs its tools; a result the server recorded for one
                    // (a placeholder to keep the history valid) is not its output.
                    return Ok(());
                }
                if self.steps[i].status == StepStatus::Open {
                    self.steps[i].status = StepStatus::InputDone;
                    f(self, Change::ToolInput(i));
                }
                if let StepKind::Tool(call) = &mut self.steps[i].kind {
                    call.output = Some(c.result.tool_call.output.clone().unwrap_or_default());
                }
                self.finish(i, StepStatus::Done);
                f(self, Change::ToolOutput(i));
            }
            EventBody::Retry(r) => {
                if r.discard_step_ids.is_empty() {
                    self.close_messages(Close::Completed, f);
                    return Ok(());
                }
                for i in 0..self.steps.len() {
                    if !r.discard_step_ids.contains(&self.steps[i].id)
                        || self.steps[i].status == StepStatus::Discarded
                    {
                        continue;
                    }
                    let was_live = matches!(
                        self.steps[i].status,
                        StepStatus::Open | StepStatus::InputDone
                    );
                    self.finish(i, StepStatus::Discarded);
                    if was_live && self.steps[i].visible.is_some() {
                        f(self, Change::Close(i, Close::Discarded));
                    }
                }
                self.close_messages(Close::Completed, f);
                if self.current_call.take().is_some() {
                    f(self, Change::CallEnd { discarded: true });
                }
            }
            EventBody::Usage(u) => {
                self.usage.add(u);
                // The model call is over, and so are the arguments of the server
                // tools it called: they run now. Whether its text is complete or
                // discarded, the next event says (a `retry` or not), so the text is
                // closed then; a call's last text is followed at once by the
                // terminal event, a `retry`, or the results of its tools.
                self.close_after_usage = true;
                let tools: Vec<usize> = self
                    .live
                    .iter()
                    .copied()
                    .filter(|&i| {
                        self.steps[i].status == StepStatus::Open
                            && matches!(&self.steps[i].kind, StepKind::Tool(c) if !c.client)
                    })
                    .collect();
                for i in tools {
                    self.ensure_visible(i, f);
                    self.steps[i].status = StepStatus::InputDone;
                    f(self, Change::ToolInput(i));
                }
                f(self, Change::Usage);
            }
            EventBody::Final(_) | EventBody::Error(_) => {
                let (outcome, saved_at) = match body {
                    EventBody::Final(fin) => (
                        match fin.status {
                            FinalStatus::Complete => Outcome::Completed {
                                reason: fin.reason.clone(),
                            },
                            FinalStatus::Aborted => Outcome::Aborted {
                                reason: fin.reason.clone(),
                            },
                        },
                        Some(fin.response_message.created_at.clone()),
                    ),
                    EventBody::Error(e) => (
                        Outcome::Failed {
                            code: e.code.clone(),
                            message: e.message.clone(),
                        },
                        e.response_message.as_ref().map(|m| m.created_at.clone()),
                    ),
                    _ => return Ok(()),
                };
                let completed = matches!(outcome, Outcome::Completed { .. });
                for i in self.live.clone() {
                    let client = self.steps[i].call().is_some_and(|c| c.client);
                    match (&self.steps[i].kind, completed) {
                        (StepKind::Pending, _) => self.finish(i, StepStatus::Done),
                        (StepKind::Tool(_), true) if client => {
                            // The job is done: the model's calls of client tools are
                            // what the client must run next.
                            self.finish(i, StepStatus::Done);
                            f(self, Change::ToolInput(i));
                        }
                        (StepKind::Text | StepKind::Reasoning, true) => {
                            self.finish(i, StepStatus::Done);
                            f(self, Change::Close(i, Close::Completed));
                        }
                        (StepKind::Tool(_), _) => {
                            self.ensure_visible(i, f);
                            self.finish(i, StepStatus::Incomplete);
                            f(self, Change::Close(i, Close::Incomplete));
                        }
                        (StepKind::Text | StepKind::Reasoning, false) => {
                            self.finish(i, StepStatus::Incomplete);
                            f(self, Change::Close(i, Close::Incomplete));
                        }
                    }
                }
                if self.current_call.take().is_some() {
                    f(self, Change::CallEnd { discarded: false });
                }
                self.end = Some(End { outcome, saved_at });
                f(self, Change::End);
            }
        }
        Ok(())
    }

    /// The open step with this id (the latest, as the engine's aggregator finds it).
    fn find_open(&self, step_id: &str) -> Option<usize> {
        self.find_live(step_id)
            .filter(|&i| self.steps[i].status == StepStatus::Open)
    }

    /// The live step (open, or a tool call waiting for its output) with this id.
    fn find_live(&self, step_id: &str) -> Option<usize> {
        self.live
            .iter()
            .rev()
            .copied()
            .find(|&i| self.steps[i].id == step_id)
    }

    /// Ends step `i` with `status` and forgets it as live.
    fn finish(&mut self, i: usize, status: StepStatus) {
        self.steps[i].status = status;
        self.live.retain(|&j| j != i);
    }

    /// Closes every open text and reasoning step (invisible ones silently).
    fn close_messages<'a, F: FnMut(&JobFold, Change<'a>)>(&mut self, how: Close, f: &mut F) {
        let open: Vec<usize> = self
            .live
            .iter()
            .copied()
            .filter(|&i| !matches!(self.steps[i].kind, StepKind::Tool(_)))
            .collect();
        for i in open {
            let visible = self.steps[i].visible.is_some();
            self.finish(
                i,
                match how {
                    Close::Completed => StepStatus::Done,
                    Close::Incomplete => StepStatus::Incomplete,
                    Close::Discarded => StepStatus::Discarded,
                },
            );
            if visible {
                f(self, Change::Close(i, how));
            }
        }
    }

    /// Makes tool step `i` visible: fixes its call id and name and decides whether it
    /// is a client tool.
    fn show_tool<'a, F: FnMut(&JobFold, Change<'a>)>(&mut self, i: usize, f: &mut F) {
        let visible = self.next_visible;
        let step = &mut self.steps[i];
        let StepKind::Tool(call) = &mut step.kind else {
            return;
        };
        if call.call_id.is_empty() {
            call.call_id.clone_from(&step.id);
        } else if self.call_ids.contains(&call.call_id) {
            // An upstream that repeats a call id within a job (some compatible servers
            // number them per response): clients key tool calls by id, so the wire
            // id is made unique.
            call.call_id = format!("{}_{}", call.call_id, step.id);
        }
        self.call_ids.insert(call.call_id.clone());
        call.client = self.client_tools.contains(&call.name);
        step.visible = Some(visible);
        self.next_visible += 1;
        f(self, Change::ToolStart(i));
    }

    /// Makes a tool step visible if it is not yet (its name never came).
    fn ensure_visible<'a, F: FnMut(&JobFold, Change<'a>)>(&mut self, i: usize, f: &mut F) {
        if self.steps[i].visible.is_none() {
            self.show_tool(i, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::LogBuilder;

    #[test]
    fn ids_and_time_come_from_created() {
        let events = LogBuilder::default().build();
        let EventBody::Created(c) = &events[0].body else {
            panic!("created first")
        };
        let ids = JobIds::of(c);
        assert_eq!(ids.compact, "0190f5e67a1b7c2d8e3f123456789abc");
        assert_eq!(ids.response_id(), "resp_0190f5e67a1b7c2d8e3f123456789abc");
        assert_eq!(
            ids.chat_completion_id(),
            "chatcmpl-0190f5e67a1b7c2d8e3f123456789abc"
        );
        // 2026-01-02T03:04:05.678Z
        assert_eq!(ids.created, 1_767_323_045);
        assert_eq!(unix_seconds("not a time"), None);
    }

    #[test]
    fn usage_counts_cached_input_once_whatever_the_provider() {
        let mut u = TokenUsage::default();
        // OpenAI: prompt tokens include the cached ones.
        u.add(&UsageRecord {
            input_tokens: 100,
            cache_read_tokens: 40,
            output_tokens: 10,
            reasoning_tokens: 4,
            input_includes_cache: true,
            ..UsageRecord::default()
        });
        // Anthropic: input tokens exclude cache reads and writes.
        u.add(&UsageRecord {
            input_tokens: 5,
            cache_read_tokens: 20,
            cache_write_tokens: 30,
            output_tokens: 2,
            reasoning_tokens: 9, // more than the output: capped
            input_includes_cache: false,
            ..UsageRecord::default()
        });
        assert_eq!(
            u,
            TokenUsage {
                input_tokens: 155,
                cached_tokens: 60,
                cache_write_tokens: 30,
                output_tokens: 12,
                reasoning_tokens: 6,
                calls: 2,
            }
        );
        assert_eq!(u.total_tokens(), 167);
    }

    #[test]
    fn a_tool_call_named_late_appears_when_named_and_keeps_its_id() {
        let mut b = LogBuilder::default();
        b.call()
            .tool(0, Some("call_1"), None, "{\"a\":")
            .tool(0, None, Some("add"), "1}")
            .usage(1, 1)
            .results(&["1"])
            .complete(None);
        let mut fold = JobFold::new(BTreeSet::new());
        let mut starts = Vec::new();
        for e in b.build() {
            fold.apply_with(e.seq, &e.body, &mut |f, c| {
                if let Change::ToolStart(i) = c {
                    starts.push((e.seq, f.steps()[i].text.clone()));
                }
            })
            .unwrap();
        }
        // Visible at the fragment that named it, with the arguments so far.
        assert_eq!(starts, [(3, "{\"a\":1}".to_string())]);
        let call = fold.steps()[0].call().unwrap();
        assert_eq!(
            (call.call_id.as_str(), call.name.as_str()),
            ("call_1", "add")
        );
        assert_eq!(call.output.as_deref(), Some("1"));
    }

    #[test]
    fn repeated_call_ids_are_made_unique() {
        let mut b = LogBuilder::default();
        b.call()
            .tool(0, Some("call_0"), Some("add"), "{}")
            .usage(1, 1)
            .results(&["1"]);
        b.call()
            .tool(0, Some("call_0"), Some("add"), "{}")
            .usage(1, 1)
            .results(&["1"]);
        b.complete(None);
        let mut fold = JobFold::new(BTreeSet::new());
        for e in b.build() {
            fold.apply(e.seq, &e.body).unwrap();
        }
        let ids: Vec<&str> = fold
            .steps()
            .iter()
            .map(|s| s.call().unwrap().call_id.as_str())
            .collect();
        assert_eq!(ids, ["call_0", "call_0_step_1"]);
    }
}
