//! Logs for tests and benchmarks, written the way the engine's job task writes them
//! (`engine/src/manager/run.rs`): a `message_creation` step per run of text or
//! reasoning, a `tool_calls` step per call created by its first fragment, `usage` at
//! the end of every attempt that streamed, a `retry` naming the failed attempt's steps
//! (whose content indexes the next attempt reuses), `on_run_step_completed` per call
//! after the call, and a terminal event whose saved message is the engine's own fold.
//!
//! Public only so that the tests and `genstream-bench` can use it.

use std::collections::BTreeMap;

use genstream_engine::aggregate::{Aggregate, text_of};
use genstream_engine::event::{
    ContentPart, ConversationRef, Created, Delta, DeltaContent, ErrorEvent, Event, EventBody,
    Final, FinalStatus, Message, MessageCreation, Retry, RunStep, RunStepCompleted, RunStepDelta,
    StepDetails, StepResult, StepType, ToolCall, ToolCallChunk, ToolCallsDelta,
};
use genstream_engine::usage::{UsageRecord, UsageTotals};

/// The stream id of every built log.
pub const STREAM_ID: &str = "0190f5e6-7a1b-7c2d-8e3f-123456789abc";

/// Builds a log event by event.
pub struct LogBuilder {
    events: Vec<Event>,
    aggregate: Aggregate,
    next_index: u32,
    next_step: u32,
    calls: u32,
    /// The message step deltas go to, and whether it holds reasoning.
    current: Option<(String, bool)>,
    attempt_steps: Vec<String>,
    index_before: u32,
    /// Tool calls of the current model call by upstream index: step id, index, call.
    pending: BTreeMap<u32, (String, u32, ToolCall)>,
}

impl Default for LogBuilder {
    fn default() -> Self {
        Self::new("gpt-4o-mini")
    }
}

impl LogBuilder {
    /// A log whose `created` names `model`.
    pub fn new(model: &str) -> Self {
        let mut b = LogBuilder {
            events: Vec::new(),
            aggregate: Aggregate::default(),
            next_index: 0,
            next_step: 0,
            calls: 0,
            current: None,
            attempt_steps: Vec::new(),
            index_before: 0,
            pending: BTreeMap::new(),
        };
        b.push(EventBody::Created(Created {
            stream_id: STREAM_ID.into(),
            conversation_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000c1".into(),
            user_message: Message {
                message_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000a1".into(),
                conversation_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000c1".into(),
                parent_message_id: None,
                sender: "User".into(),
                text: "What is 1 + 2?".into(),
                content: Vec::new(),
                is_created_by_user: true,
                model: None,
                unfinished: false,
                error: false,
                created_at: "2026-01-02T03:04:05.678Z".into(),
            },
            response_message_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000b1".into(),
            model: model.into(),
            sender: model.into(),
            created_at: "2026-01-02T03:04:05.678Z".into(),
            client_tools: Vec::new(),
            protocol_options: None,
        }));
        b
    }

    fn push(&mut self, body: EventBody) {
        let seq = self.events.len() as u64;
        self.aggregate.apply(seq, &body);
        self.events.push(Event { seq, body });
    }

    /// The events so far.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The events, consuming the builder.
    pub fn build(self) -> Vec<Event> {
        self.events
    }

    /// The engine's fold of the events so far.
    pub fn aggregate(&self) -> &Aggregate {
        &self.aggregate
    }

    /// Whether the log has its terminal event.
    pub fn ended(&self) -> bool {
        self.aggregate.terminal().is_some()
    }

    /// Begins a model call (an attempt).
    pub fn call(&mut self) -> &mut Self {
        self.calls += 1;
        self.index_before = self.next_index;
        self.attempt_steps.clear();
        self.pending.clear();
        self.current = None;
        self
    }

    fn run_id(&self) -> String {
        format!("{STREAM_ID}:{}", self.calls.saturating_sub(1))
    }

    fn new_step(&mut self) -> (String, u32) {
        let id = format!("step_{}", self.next_step);
        self.next_step += 1;
        let index = self.next_index;
        self.next_index += 1;
        self.attempt_steps.push(id.clone());
        (id, index)
    }

    fn message_step(&mut self, reasoning: bool) -> String {
        if let Some((id, r)) = &self.current
            && *r == reasoning
        {
            return id.clone();
        }
        let (id, index) = self.new_step();
        let run_id = self.run_id();
        self.push(EventBody::RunStep(RunStep {
            id: id.clone(),
            run_id,
            index,
            step_type: StepType::MessageCreation,
            step_details: StepDetails::MessageCreation {
                message_creation: MessageCreation {
                    message_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000b1".into(),
                },
            },
        }));
        self.current = Some((id.clone(), reasoning));
        id
    }

    /// Answer text.
    pub fn text(&mut self, t: &str) -> &mut Self {
        let id = self.message_step(false);
        self.push(EventBody::MessageDelta(Delta {
            id,
            delta: DeltaContent {
                content: vec![ContentPart::Text { text: t.into() }],
            },
        }));
        self
    }

    /// Reasoning text.
    pub fn think(&mut self, t: &str) -> &mut Self {
        let id = self.message_step(true);
        self.push(EventBody::ReasoningDelta(Delta {
            id,
            delta: DeltaContent {
                content: vec![ContentPart::Think {
                    think: t.into(),
                    signature: None,
                }],
            },
        }));
        self
    }

    /// A thinking block's signature, which ends the block.
    pub fn signature(&mut self, sig: &str) -> &mut Self {
        let id = self.message_step(true);
        self.push(EventBody::ReasoningDelta(Delta {
            id,
            delta: DeltaContent {
                content: vec![ContentPart::Think {
                    think: String::new(),
                    signature: Some(sig.into()),
                }],
            },
        }));
        self.current = None;
        self
    }

    /// A redacted thinking block: a part of its own.
    pub fn redacted(&mut self, data: &str) -> &mut Self {
        self.current = None;
        let id = self.message_step(true);
        self.current = None;
        self.push(EventBody::ReasoningDelta(Delta {
            id,
            delta: DeltaContent {
                content: vec![ContentPart::RedactedThinking { data: data.into() }],
            },
        }));
        self
    }

    /// A fragment of tool call `index` (the upstream's index within the model call).
    pub fn tool(
        &mut self,
        index: u32,
        id: Option<&str>,
        name: Option<&str>,
        args: &str,
    ) -> &mut Self {
        let step_id = match self.pending.get_mut(&index) {
            Some((step_id, _, call)) => {
                if let Some(id) = id {
                    call.id = id.into();
                }
                if let Some(name) = name {
                    call.name = name.into();
                }
                call.args.push_str(args);
                step_id.clone()
            }
            None => {
                let (step_id, step_index) = self.new_step();
                let call = ToolCall {
                    id: id.unwrap_or_default().into(),
                    name: name.unwrap_or_default().into(),
                    args: args.into(),
                    output: None,
                };
                let run_id = self.run_id();
                self.push(EventBody::RunStep(RunStep {
                    id: step_id.clone(),
                    run_id,
                    index: step_index,
                    step_type: StepType::ToolCalls,
                    step_details: StepDetails::ToolCalls {
                        tool_calls: vec![ToolCall {
                            args: String::new(),
                            ..call.clone()
                        }],
                    },
                }));
                self.current = None;
                self.pending
                    .insert(index, (step_id.clone(), step_index, call));
                step_id
            }
        };
        self.push(EventBody::RunStepDelta(RunStepDelta {
            id: step_id,
            delta: ToolCallsDelta {
                kind: StepType::ToolCalls,
                tool_calls: vec![ToolCallChunk {
                    id: id.map(Into::into),
                    name: name.map(Into::into),
                    args: args.into(),
                    index,
                }],
            },
        }));
        self
    }

    /// The model call's usage.
    pub fn usage(&mut self, input: u64, output: u64) -> &mut Self {
        self.usage_record(UsageRecord {
            model: "gpt-4o-mini".into(),
            provider: "openai".into(),
            input_tokens: input,
            output_tokens: output,
            input_includes_cache: true,
            ..UsageRecord::default()
        })
    }

    /// The model call's usage record (its `call_index` is set here).
    pub fn usage_record(&mut self, mut u: UsageRecord) -> &mut Self {
        u.call_index = self.calls.saturating_sub(1);
        self.push(EventBody::Usage(u));
        self
    }

    /// The current attempt failed and will be retried: a `retry` naming its steps.
    pub fn retry(&mut self, error: &str) -> &mut Self {
        let discard = std::mem::take(&mut self.attempt_steps);
        self.next_index = self.index_before;
        self.pending.clear();
        self.current = None;
        self.push(EventBody::Retry(Retry {
            attempt: 1,
            max_attempts: 4,
            delay_ms: 1000,
            error: error.into(),
            discard_step_ids: discard,
        }));
        self
    }

    /// The tools of the current model call ran: one `on_run_step_completed` per call,
    /// in upstream index order, with `outputs[i]` (the last one repeats).
    pub fn results(&mut self, outputs: &[&str]) -> &mut Self {
        let pending = std::mem::take(&mut self.pending);
        for (n, (_, (step_id, index, call))) in pending.into_iter().enumerate() {
            let output = outputs
                .get(n)
                .or(outputs.last())
                .copied()
                .unwrap_or("ok")
                .to_string();
            self.push(EventBody::RunStepCompleted(RunStepCompleted {
                result: StepResult {
                    id: step_id,
                    index,
                    tool_call: ToolCall {
                        output: Some(output),
                        ..call
                    },
                },
            }));
        }
        self
    }

    fn saved(&self, unfinished: bool, error: bool) -> Message {
        let mut content = self.aggregate.content();
        for part in &mut content {
            if let ContentPart::ToolCall { tool_call } = part
                && tool_call.output.is_none()
            {
                tool_call.output = Some("{\"error\":\"cancelled\"}".into());
            }
        }
        Message {
            message_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000b1".into(),
            conversation_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000c1".into(),
            parent_message_id: Some("0190f5e6-7a1b-7c2d-8e3f-0000000000a1".into()),
            sender: "gpt-4o-mini".into(),
            text: text_of(&content),
            content,
            is_created_by_user: false,
            model: Some("gpt-4o-mini".into()),
            unfinished,
            error,
            created_at: "2026-01-02T03:04:09.000Z".into(),
        }
    }

    fn totals(&self) -> UsageTotals {
        self.aggregate.usage_totals()
    }

    /// `final` `complete` (with `reason`, e.g. `max_tool_iterations`).
    pub fn complete(&mut self, reason: Option<&str>) -> &mut Self {
        let msg = self.saved(false, false);
        let usage = self.totals();
        self.push(EventBody::Final(Final {
            status: FinalStatus::Complete,
            response_message: msg,
            conversation: ConversationRef {
                conversation_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000c1".into(),
                title: "What is 1 + 2?".into(),
            },
            usage,
            reason: reason.map(Into::into),
        }));
        self
    }

    /// `final` `aborted` with `reason` (`aborted` or `shutdown`). As the engine does,
    /// the current call's unfinished tool calls first get the cancelled result.
    pub fn abort(&mut self, reason: &str) -> &mut Self {
        self.results(&["{\"error\":\"cancelled\"}"]);
        let msg = self.saved(true, false);
        let usage = self.totals();
        self.push(EventBody::Final(Final {
            status: FinalStatus::Aborted,
            response_message: msg,
            conversation: ConversationRef {
                conversation_id: "0190f5e6-7a1b-7c2d-8e3f-0000000000c1".into(),
                title: "What is 1 + 2?".into(),
            },
            usage,
            reason: Some(reason.into()),
        }));
        self
    }

    /// `error` with `code`. For `log_full` nothing is appended before it (the log is
    /// full); otherwise unfinished tool calls first get the cancelled result.
    pub fn error(&mut self, code: &str, message: &str) -> &mut Self {
        if code != "log_full" {
            self.results(&["{\"error\":\"cancelled\"}"]);
        }
        let msg = self.saved(true, true);
        self.push(EventBody::Error(ErrorEvent {
            code: code.into(),
            message: message.into(),
            response_message: Some(msg),
        }));
        self
    }
}

/// Reads a log stored one event JSON per line.
pub fn parse_jsonl(text: &str) -> Result<Vec<Event>, serde_json::Error> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect()
}

/// A text answer of `events` events in all: `created`, a step, text deltas of `token`,
/// `usage`, `final` — the shape of the long answers the benchmarks stream.
pub fn long_text(events: usize, token: &str) -> Vec<Event> {
    let mut b = LogBuilder::default();
    b.call();
    let deltas = events.saturating_sub(4).max(1);
    for _ in 0..deltas {
        b.text(token);
    }
    b.usage(1000, deltas as u64).complete(None);
    b.build()
}
