//! The content aggregator: a pure fold of a log prefix into the response so far.
//!
//! It is used for three things that must agree byte for byte: the `resume=true`
//! snapshot (`{aggregatedContent, runSteps}`), `final.responseMessage.content`, and the
//! partial answer saved on abort. Because it is a pure function of the events, every
//! replica that holds the same prefix computes the same snapshot.
//!
//! Content parts are placed by their step's `index`. A `retry` event's
//! `discardStepIds` removes those steps and their parts, so text streamed by a failed
//! attempt never appears twice in the answer.

use serde::{Deserialize, Serialize};

use crate::event::{ContentPart, Created, EventBody, FinalStatus, RunStep, StepDetails, ToolCall};
use crate::provider::{ChatMessage, Role};
use crate::usage::{UsageRecord, UsageTotals};

/// The fold's state. Apply events in seq order with [`Aggregate::apply`].
#[derive(Clone, Debug, Default)]
pub struct Aggregate {
    created: Option<Created>,
    run_steps: Vec<RunStep>,
    /// One slot per live step, in log order.
    parts: Vec<Slot>,
    usage: Vec<UsageRecord>,
    /// Seq of the last event folded in, `None` before any.
    last_seq: Option<u64>,
    terminal: Option<TerminalKind>,
    /// Highest model call seen in any run step or usage record, discarded steps
    /// included.
    max_call: Option<u32>,
    /// What the last event folded in was, as far as the call fold cares.
    last_event: LastEvent,
}

/// A live step's place in the answer.
#[derive(Clone, Debug)]
struct Slot {
    id: String,
    /// The content part's position in the answer (the step's `index`).
    index: u32,
    /// The model call that made it (from the step's `runId`), if the id says.
    call: Option<u32>,
    /// `None` until the step's first delta says whether it is text or reasoning.
    part: Option<ContentPart>,
}

/// The kind of the last event folded in, for [`Aggregate::cut_off_call`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum LastEvent {
    #[default]
    None,
    /// `retry`: the next attempt had begun.
    Retry,
    /// `on_run_step_completed`: a tool result.
    ToolResult,
    Other,
}

/// How a log ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminalKind {
    Complete,
    Aborted,
    Error,
}

impl TerminalKind {
    /// The job status it leaves: `complete`, `aborted` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminalKind::Complete => "complete",
            TerminalKind::Aborted => "aborted",
            TerminalKind::Error => "error",
        }
    }
}

/// The snapshot sent in a `sync` frame's `resumeState` (docs/protocol.md §3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeState {
    pub run_steps: Vec<RunStep>,
    pub aggregated_content: Vec<ContentPart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_message: Option<crate::event::Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// `running` while no terminal event was folded in.
    pub status: String,
}

impl Aggregate {
    /// Folds one event in. Events must come in seq order; the fold ignores nothing
    /// that changes the answer and is cheap for the common case (a delta to the last
    /// step).
    pub fn apply(&mut self, seq: u64, body: &EventBody) {
        self.last_seq = Some(seq);
        self.last_event = match body {
            EventBody::Retry(_) => LastEvent::Retry,
            EventBody::RunStepCompleted(_) => LastEvent::ToolResult,
            _ => LastEvent::Other,
        };
        match body {
            EventBody::Created(c) => self.created = Some(c.clone()),
            EventBody::RunStep(step) => {
                let part = match &step.step_details {
                    StepDetails::ToolCalls { tool_calls } => Some(ContentPart::ToolCall {
                        tool_call: tool_calls.first().cloned().unwrap_or_default(),
                    }),
                    StepDetails::MessageCreation { .. } => None,
                };
                let call = call_of_run(&step.run_id);
                if call.is_some() {
                    self.max_call = self.max_call.max(call);
                }
                self.parts.push(Slot {
                    id: step.id.clone(),
                    index: step.index,
                    call,
                    part,
                });
                self.run_steps.push(step.clone());
            }
            EventBody::MessageDelta(d) => {
                if let Some(slot) = self.slot(&d.id) {
                    for c in &d.delta.content {
                        if let ContentPart::Text { text } = c {
                            match slot {
                                Some(ContentPart::Text { text: t }) => t.push_str(text),
                                _ => *slot = Some(ContentPart::Text { text: text.clone() }),
                            }
                        }
                    }
                }
            }
            EventBody::ReasoningDelta(d) => {
                if let Some(slot) = self.slot(&d.id) {
                    for c in &d.delta.content {
                        match (c, &mut *slot) {
                            (
                                ContentPart::Think { think, signature },
                                Some(ContentPart::Think {
                                    think: t,
                                    signature: s,
                                }),
                            ) => {
                                t.push_str(think);
                                if signature.is_some() {
                                    s.clone_from(signature);
                                }
                            }
                            (
                                ContentPart::Think { .. } | ContentPart::RedactedThinking { .. },
                                _,
                            ) => {
                                *slot = Some(c.clone());
                            }
                            _ => {}
                        }
                    }
                }
            }
            EventBody::RunStepDelta(d) => {
                if let Some(slot) = self.slot(&d.id) {
                    let Some(call) = tool_call_of(slot) else {
                        return;
                    };
                    for chunk in &d.delta.tool_calls {
                        if let Some(id) = &chunk.id {
                            call.id.clone_from(id);
                        }
                        if let Some(name) = &chunk.name {
                            call.name.clone_from(name);
                        }
                        call.args.push_str(&chunk.args);
                    }
                }
            }
            EventBody::RunStepCompleted(c) => {
                if let Some(slot) = self.slot(&c.result.id) {
                    *slot = Some(ContentPart::ToolCall {
                        tool_call: c.result.tool_call.clone(),
                    });
                }
            }
            EventBody::Retry(r) => {
                if !r.discard_step_ids.is_empty() {
                    self.parts.retain(|p| !r.discard_step_ids.contains(&p.id));
                    self.run_steps
                        .retain(|s| !r.discard_step_ids.contains(&s.id));
                }
            }
            EventBody::Usage(u) => {
                self.max_call = self.max_call.max(Some(u.call_index));
                self.usage.push(u.clone());
            }
            EventBody::Final(f) => {
                self.terminal = Some(match f.status {
                    FinalStatus::Complete => TerminalKind::Complete,
                    FinalStatus::Aborted => TerminalKind::Aborted,
                })
            }
            EventBody::Error(_) => self.terminal = Some(TerminalKind::Error),
        }
    }

    fn slot(&mut self, step_id: &str) -> Option<&mut Option<ContentPart>> {
        self.parts
            .iter_mut()
            .rev()
            .find(|p| p.id == step_id)
            .map(|p| &mut p.part)
    }

    /// The content part of live step `step_id`, once its first delta came.
    pub fn part(&self, step_id: &str) -> Option<&ContentPart> {
        self.parts
            .iter()
            .rev()
            .find(|p| p.id == step_id)
            .and_then(|p| p.part.as_ref())
    }

    /// The response's content parts, ordered by step index.
    pub fn content(&self) -> Vec<ContentPart> {
        let mut parts: Vec<(u32, &ContentPart)> = self
            .parts
            .iter()
            .filter_map(|s| s.part.as_ref().map(|p| (s.index, p)))
            .collect();
        parts.sort_by_key(|(i, _)| *i);
        parts.into_iter().map(|(_, p)| p.clone()).collect()
    }

    /// The answer's plain text: every text part, concatenated.
    pub fn text(&self) -> String {
        text_of(&self.content())
    }

    /// The live run steps.
    pub fn run_steps(&self) -> &[RunStep] {
        &self.run_steps
    }

    /// The `created` event's data, once folded in.
    pub fn created(&self) -> Option<&Created> {
        self.created.as_ref()
    }

    /// Usage records folded in so far, in order.
    pub fn usage(&self) -> &[UsageRecord] {
        &self.usage
    }

    /// Sum of the usage records.
    pub fn usage_totals(&self) -> UsageTotals {
        let mut t = UsageTotals::default();
        for u in &self.usage {
            t.add(u);
        }
        t
    }

    /// Seq of the last event folded in.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// How the log ended, if it did.
    pub fn terminal(&self) -> Option<TerminalKind> {
        self.terminal
    }

    /// The live tool calls that have no result yet, in log order: (step id, step
    /// index, call). A job that ends with such a call gives it the cancelled result.
    pub fn open_tool_calls(&self) -> Vec<(String, u32, ToolCall)> {
        self.parts
            .iter()
            .filter_map(|s| match &s.part {
                Some(ContentPart::ToolCall { tool_call }) if tool_call.output.is_none() => {
                    Some((s.id.clone(), s.index, tool_call.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// The model call the log stops inside, if any: one whose steps streamed but that
    /// reported no usage; else the next one, if the log shows it had begun with
    /// nothing streamed yet (after a `retry`, or after the last call's tool results
    /// while fewer than `max_tool_iterations` calls asked for tools); else `None` (the
    /// job was between a call's usage and its tools' results, or past its last call).
    /// A log with no call at all stops inside the first one (call 0).
    pub fn cut_off_call(&self, max_tool_iterations: u32) -> Option<u32> {
        let with_usage = |c: u32| self.usage.iter().any(|u| u.call_index == c);
        if let Some(call) = self
            .parts
            .iter()
            .filter_map(|s| s.call)
            .filter(|c| !with_usage(*c))
            .max()
        {
            return Some(call);
        }
        let Some(last_call) = self.max_call else {
            return Some(0);
        };
        let began = match self.last_event {
            LastEvent::Retry => true,
            LastEvent::ToolResult => {
                let mut tools = self
                    .parts
                    .iter()
                    .filter(|s| s.call == Some(last_call))
                    .filter_map(|s| match &s.part {
                        Some(ContentPart::ToolCall { tool_call }) => Some(tool_call),
                        _ => None,
                    })
                    .peekable();
                let tool_rounds = self
                    .parts
                    .iter()
                    .filter(|s| matches!(s.part, Some(ContentPart::ToolCall { .. })))
                    .filter_map(|s| s.call)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len() as u32;
                tools.peek().is_some()
                    && tools.all(|t| t.output.is_some())
                    && tool_rounds < max_tool_iterations.max(1)
            }
            LastEvent::None | LastEvent::Other => false,
        };
        began.then_some(last_call + 1)
    }

    /// The assistant turns, with their tool calls and results, of the tool rounds
    /// before model call `call`: what the owner sent back upstream after each round.
    pub fn turns_before(&self, call: u32) -> Vec<ChatMessage> {
        let mut turns: std::collections::BTreeMap<u32, ChatMessage> = Default::default();
        for s in &self.parts {
            let Some(c) = s.call.filter(|c| *c < call) else {
                continue;
            };
            let turn = turns.entry(c).or_insert_with(|| ChatMessage {
                role: Role::Assistant,
                text: String::new(),
                tool_calls: Vec::new(),
                tool_call_id: None,
                reasoning: Vec::new(),
            });
            match &s.part {
                Some(ContentPart::Text { text }) => turn.text.push_str(text),
                Some(ContentPart::ToolCall { tool_call }) => {
                    turn.tool_calls.push(tool_call.clone())
                }
                _ => {}
            }
        }
        // A call answered without tools ended the job; only tool rounds went back.
        turns
            .into_values()
            .filter(|t| !t.tool_calls.is_empty())
            .collect()
    }

    /// Everything model call `call` streamed in its live steps: text, reasoning and
    /// tool arguments, in log order.
    pub fn output_of(&self, call: u32) -> String {
        let mut out = String::new();
        for s in self.parts.iter().filter(|s| s.call == Some(call)) {
            match &s.part {
                Some(ContentPart::Text { text }) => out.push_str(text),
                Some(ContentPart::Think { think, .. }) => out.push_str(think),
                Some(ContentPart::ToolCall { tool_call }) => out.push_str(&tool_call.args),
                Some(ContentPart::RedactedThinking { .. }) | None => {}
            }
        }
        out
    }

    /// The `resumeState` of a `sync` frame.
    pub fn resume_state(&self) -> ResumeState {
        let created = self.created.as_ref();
        ResumeState {
            run_steps: self.run_steps.clone(),
            aggregated_content: self.content(),
            user_message: created.map(|c| c.user_message.clone()),
            response_message_id: created.map(|c| c.response_message_id.clone()),
            conversation_id: created.map(|c| c.conversation_id.clone()),
            sender: created.map(|c| c.sender.clone()),
            status: self
                .terminal
                .map_or("running", TerminalKind::as_str)
                .to_string(),
        }
    }
}

/// The model call a run step's `runId` (`streamId:call`) names.
fn call_of_run(run_id: &str) -> Option<u32> {
    run_id.rsplit(':').next().and_then(|c| c.parse().ok())
}

/// The slot's tool call, turning the slot into one if it is not yet.
fn tool_call_of(slot: &mut Option<ContentPart>) -> Option<&mut ToolCall> {
    if !matches!(slot, Some(ContentPart::ToolCall { .. })) {
        *slot = Some(ContentPart::ToolCall {
            tool_call: ToolCall::default(),
        });
    }
    match slot {
        Some(ContentPart::ToolCall { tool_call }) => Some(tool_call),
        _ => None,
    }
}

/// Concatenates the text parts of `content`.
pub fn text_of(content: &[ContentPart]) -> String {
    let mut s = String::new();
    for p in content {
        if let ContentPart::Text { text } = p {
            s.push_str(text);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use proptest::prelude::*;

    fn step(id: &str, index: u32, t: StepType) -> EventBody {
        EventBody::RunStep(RunStep {
            id: id.into(),
            run_id: "r".into(),
            index,
            step_type: t,
            step_details: match t {
                StepType::MessageCreation => StepDetails::MessageCreation {
                    message_creation: MessageCreation {
                        message_id: "m".into(),
                    },
                },
                StepType::ToolCalls => StepDetails::ToolCalls {
                    tool_calls: vec![ToolCall {
                        id: "call_1".into(),
                        name: "calc".into(),
                        ..Default::default()
                    }],
                },
            },
        })
    }
    fn text(id: &str, t: &str) -> EventBody {
        EventBody::MessageDelta(Delta {
            id: id.into(),
            delta: DeltaContent {
                content: vec![ContentPart::Text { text: t.into() }],
            },
        })
    }
    fn think(id: &str, t: &str) -> EventBody {
        EventBody::ReasoningDelta(Delta {
            id: id.into(),
            delta: DeltaContent {
                content: vec![ContentPart::Think {
                    think: t.into(),
                    signature: None,
                }],
            },
        })
    }

    fn fold(events: &[EventBody]) -> Aggregate {
        let mut a = Aggregate::default();
        for (i, e) in events.iter().enumerate() {
            a.apply(i as u64, e);
        }
        a
    }

    #[test]
    fn parts_by_index_with_reasoning_text_and_tool_call() {
        let a = fold(&[
            step("s0", 0, StepType::MessageCreation),
            think("s0", "hmm "),
            think("s0", "ok"),
            step("s1", 1, StepType::MessageCreation),
            text("s1", "Hel"),
            text("s1", "lo"),
            step("s2", 2, StepType::ToolCalls),
            EventBody::RunStepDelta(RunStepDelta {
                id: "s2".into(),
                delta: ToolCallsDelta {
                    kind: StepType::ToolCalls,
                    tool_calls: vec![ToolCallChunk {
                        id: None,
                        name: None,
                        args: "{\"a\":".into(),
                        index: 0,
                    }],
                },
            }),
            EventBody::RunStepDelta(RunStepDelta {
                id: "s2".into(),
                delta: ToolCallsDelta {
                    kind: StepType::ToolCalls,
                    tool_calls: vec![ToolCallChunk {
                        id: None,
                        name: None,
                        args: "1}".into(),
                        index: 0,
                    }],
                },
            }),
        ]);
        assert_eq!(
            a.content(),
            vec![
                ContentPart::Think {
                    think: "hmm ok".into(),
                    signature: None,
                },
                ContentPart::Text {
                    text: "Hello".into()
                },
                ContentPart::ToolCall {
                    tool_call: ToolCall {
                        id: "call_1".into(),
                        name: "calc".into(),
                        args: "{\"a\":1}".into(),
                        output: None
                    }
                },
            ]
        );
        assert_eq!(a.text(), "Hello");
        assert_eq!(a.run_steps().len(), 3);
    }

    /// A thinking block's signature comes as the part's last delta and is kept; a
    /// redacted block is a part of its own; both survive into the content verbatim.
    #[test]
    fn signatures_and_redacted_thinking_are_kept() {
        let signed = |id: &str, sig: &str| {
            EventBody::ReasoningDelta(Delta {
                id: id.into(),
                delta: DeltaContent {
                    content: vec![ContentPart::Think {
                        think: String::new(),
                        signature: Some(sig.into()),
                    }],
                },
            })
        };
        let a = fold(&[
            step("s0", 0, StepType::MessageCreation),
            think("s0", "let me "),
            think("s0", "see"),
            signed("s0", "EqSig=="),
            step("s1", 1, StepType::MessageCreation),
            EventBody::ReasoningDelta(Delta {
                id: "s1".into(),
                delta: DeltaContent {
                    content: vec![ContentPart::RedactedThinking {
                        data: "EmwKAhgB".into(),
                    }],
                },
            }),
            step("s2", 2, StepType::MessageCreation),
            signed("s2", "EqEmpty=="),
            step("s3", 3, StepType::MessageCreation),
            text("s3", "Hi"),
        ]);
        assert_eq!(
            a.content(),
            vec![
                ContentPart::Think {
                    think: "let me see".into(),
                    signature: Some("EqSig==".into()),
                },
                ContentPart::RedactedThinking {
                    data: "EmwKAhgB".into()
                },
                ContentPart::Think {
                    think: String::new(),
                    signature: Some("EqEmpty==".into()),
                },
                ContentPart::Text { text: "Hi".into() },
            ]
        );
        let json = serde_json::to_value(a.content()).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"type": "think", "think": "let me see", "signature": "EqSig=="},
                {"type": "redacted_thinking", "data": "EmwKAhgB"},
                {"type": "think", "think": "", "signature": "EqEmpty=="},
                {"type": "text", "text": "Hi"},
            ])
        );
        // Unsigned reasoning keeps LibreChat's shape exactly.
        let plain = fold(&[step("s", 0, StepType::MessageCreation), think("s", "x")]);
        assert_eq!(
            serde_json::to_value(plain.content()).unwrap(),
            serde_json::json!([{"type": "think", "think": "x"}])
        );
    }

    #[test]
    fn retry_discards_the_failed_attempts_steps() {
        let a = fold(&[
            step("s0", 0, StepType::MessageCreation),
            text("s0", "partial dup"),
            EventBody::Retry(Retry {
                attempt: 1,
                max_attempts: 3,
                delay_ms: 1000,
                error: "x".into(),
                discard_step_ids: vec!["s0".into()],
            }),
            step("s1", 0, StepType::MessageCreation),
            text("s1", "the whole answer"),
        ]);
        assert_eq!(a.text(), "the whole answer");
        assert_eq!(a.run_steps().len(), 1);
    }

    fn run_step(id: &str, index: u32, call: u32, t: StepType) -> EventBody {
        let EventBody::RunStep(mut s) = step(id, index, t) else {
            unreachable!()
        };
        s.run_id = format!("job:{call}");
        EventBody::RunStep(s)
    }

    fn usage(call_index: u32) -> EventBody {
        EventBody::Usage(UsageRecord {
            call_index,
            ..Default::default()
        })
    }

    fn args(id: &str, a: &str) -> EventBody {
        EventBody::RunStepDelta(RunStepDelta {
            id: id.into(),
            delta: ToolCallsDelta {
                kind: StepType::ToolCalls,
                tool_calls: vec![ToolCallChunk {
                    id: None,
                    name: None,
                    args: a.into(),
                    index: 0,
                }],
            },
        })
    }

    fn result(id: &str, index: u32) -> EventBody {
        EventBody::RunStepCompleted(RunStepCompleted {
            result: StepResult {
                id: id.into(),
                index,
                tool_call: ToolCall {
                    id: "call_1".into(),
                    name: "calc".into(),
                    args: "{}".into(),
                    output: Some("4".into()),
                },
            },
        })
    }

    /// The fold of the model calls: which call the log stops in, the tool rounds
    /// before it, what it streamed.
    #[test]
    fn the_call_a_log_stops_in() {
        // Nothing streamed yet: the first call.
        assert_eq!(fold(&[]).cut_off_call(10), Some(0));
        // Call 0 streamed and reported no usage: it.
        let mut events = vec![
            run_step("s0", 0, 0, StepType::MessageCreation),
            text("s0", "Let me "),
            run_step("s1", 1, 0, StepType::ToolCalls),
            args("s1", "{}"),
        ];
        assert_eq!(fold(&events).cut_off_call(10), Some(0));
        assert_eq!(fold(&events).output_of(0), "Let me {}");
        assert_eq!(fold(&events).open_tool_calls().len(), 1);
        // Its usage came, then its tool result: the next call had begun.
        events.push(usage(0));
        assert_eq!(
            fold(&events).cut_off_call(10),
            None,
            "between usage and results"
        );
        events.push(result("s1", 1));
        let a = fold(&events);
        assert!(a.open_tool_calls().is_empty());
        assert_eq!(a.cut_off_call(10), Some(1));
        assert_eq!(a.cut_off_call(1), None, "no call left under the cap");
        let turns = a.turns_before(1);
        assert_eq!(turns.len(), 1);
        assert_eq!(turns[0].text, "Let me ");
        assert_eq!(turns[0].tool_calls[0].output.as_deref(), Some("4"));
        // Call 1 fails after streaming; the retry discards its step: call 2 had begun
        // and streamed nothing.
        events.extend([
            run_step("s2", 2, 1, StepType::MessageCreation),
            text("s2", "The answer"),
            usage(1),
            EventBody::Retry(Retry {
                attempt: 1,
                max_attempts: 3,
                delay_ms: 10,
                error: "x".into(),
                discard_step_ids: vec!["s2".into()],
            }),
        ]);
        let a = fold(&events);
        assert_eq!(a.cut_off_call(10), Some(2));
        assert_eq!(a.output_of(2), "");
        assert_eq!(a.turns_before(2).len(), 1, "only the tool round went back");
    }

    proptest! {
        /// However the text is split into deltas, the fold is the concatenation.
        #[test]
        fn fold_is_concatenation(chunks in proptest::collection::vec(".{0,8}", 0..40)) {
            let mut events = vec![step("s", 0, StepType::MessageCreation)];
            events.extend(chunks.iter().map(|c| text("s", c)));
            prop_assert_eq!(fold(&events).text(), chunks.concat());
        }
    }
}
