//! One upstream attempt of a model call, streamed into the log: the attempt's own
//! state is an [`Attempt`] made fresh for each try, so a retry starts clean with
//! nothing to reset; text and reasoning become `message_creation` run steps and their
//! deltas, tool-call fragments `tool_calls` steps and their deltas.

use std::collections::BTreeMap;

use super::ending::estimate_usage;
use super::run::{CallError, JobRun, Outcome};
use super::*;
use crate::provider::ReasoningBlock;

/// A retryable timeout error naming which budget ran out.
fn timeout_error(what: &str, limit: Duration) -> ProviderError {
    ProviderError::new(
        crate::provider::ProviderErrorKind::Timeout,
        format!(
            "the upstream sent nothing within the {what} timeout of {} s",
            limit.as_secs_f64()
        ),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PartKind {
    Text,
    Think,
}

/// A tool call of the current model call, as its fragments arrive.
#[derive(Clone, Debug)]
pub(super) struct PendingCall {
    pub(super) step_id: String,
    pub(super) step_index: u32,
    pub(super) call: ToolCall,
}

/// One upstream attempt: created when it begins, dropped when the next begins.
pub(super) struct Attempt {
    /// The model call it makes (a retry is a call of its own, with its own usage).
    pub(super) call_index: u32,
    /// The job's next content index when it began; a retry starts from it again.
    pub(super) first_index: u32,
    /// Steps it created, named in `discardStepIds` if it fails.
    pub(super) steps: Vec<String>,
    /// Everything it streamed (text, reasoning, tool arguments), for a usage estimate.
    pub(super) output: String,
    /// Its text: the assistant turn sent back with its tool results.
    pub(super) text: String,
    /// Its signed and redacted thinking blocks, which begin that assistant turn.
    pub(super) reasoning: Vec<ReasoningBlock>,
    /// Its tool calls, by the upstream's index.
    pub(super) pending: BTreeMap<u32, PendingCall>,
    /// The step text or reasoning deltas go to now.
    current: Option<(String, PartKind)>,
}

impl Attempt {
    pub(super) fn new(call_index: u32, first_index: u32) -> Self {
        Attempt {
            call_index,
            first_index,
            steps: Vec::new(),
            output: String::new(),
            text: String::new(),
            reasoning: Vec::new(),
            pending: BTreeMap::new(),
            current: None,
        }
    }
}

impl JobRun {
    /// One attempt: stream the upstream's answer into the log under the first-byte
    /// and idle-gap timeouts; returns the tool calls it asked for. A provider that
    /// applies the timeouts itself (the HTTP ones, to the upstream's bytes, so that
    /// pings and comments count) reports them as `Timeout` errors; for the others they
    /// are applied here, to the provider's events.
    pub(super) async fn call_once(&mut self, a: &mut Attempt) -> Result<(), CallError> {
        let mut request = self.request.clone();
        request.model = self.model.name.clone();
        request.call_index = a.call_index;
        let first_byte = self.model.timeouts.first_byte;
        let idle = self.model.timeouts.idle;
        let provider = self.model.provider.clone();
        let timed_here = !provider.applies_timeouts();
        let cancel = self.cancel().clone();
        let started = Instant::now();
        let opened = provider.stream(request, cancel.child_token());
        let stream = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(self.stopped().into()),
            s = async {
                if timed_here {
                    tokio::time::timeout(first_byte, opened).await
                } else {
                    Ok(opened.await)
                }
            } => s,
        };
        let opened = stream.unwrap_or_else(|_| Err(timeout_error("first byte", first_byte)));
        crate::metrics::upstream_request(
            provider.name(),
            &self.model.name,
            opened.as_ref().map(|_| ()),
        );
        let mut stream = opened.map_err(CallError::Provider)?;
        let mut usage: Option<UsageRecord> = None;
        let mut got_any = false;
        let mut finished = false;
        // One cancellation future and one timer for the whole call, re-armed after each
        // event, rather than a new pair per event: this loop runs once per token.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        // Until the first event the first-byte budget applies, then the idle gap.
        let deadline = tokio::time::sleep_until(started + first_byte);
        tokio::pin!(deadline);
        loop {
            let item = tokio::select! {
                biased;
                _ = &mut cancelled => {
                    self.record_usage(a, usage.take(), true).await.ok();
                    return Err(self.stopped().into());
                }
                _ = &mut deadline, if timed_here => None,
                item = stream.next() => Some(item),
            };
            let event = match item {
                None => {
                    let (what, limit) = if got_any {
                        ("idle gap", idle)
                    } else {
                        ("first byte", first_byte)
                    };
                    self.record_usage(a, usage.take(), false).await?;
                    return Err(CallError::Provider(timeout_error(what, limit)));
                }
                // A provider ends its stream early when the job's token is cancelled;
                // if that happened after the cancel branch above was polled, an end
                // without the upstream's finish is the abort's, not the answer's.
                Some(None) if cancel.is_cancelled() && !finished => {
                    self.record_usage(a, usage.take(), true).await.ok();
                    return Err(self.stopped().into());
                }
                Some(None) => break,
                Some(Some(Err(e))) => {
                    self.record_usage(a, usage.take(), false).await?;
                    return Err(CallError::Provider(e));
                }
                Some(Some(Ok(ev))) => ev,
            };
            if !got_any {
                crate::metrics::first_token(&self.model.name, started.elapsed());
            }
            got_any = true;
            match event {
                ProviderEvent::Text(t) => self.delta(a, PartKind::Text, t).await?,
                ProviderEvent::Reasoning(t) => self.delta(a, PartKind::Think, t).await?,
                ProviderEvent::ReasoningSignature(sig) => self.signature(a, sig).await?,
                ProviderEvent::RedactedReasoning(data) => self.redacted(a, data).await?,
                ProviderEvent::ToolCall {
                    index,
                    id,
                    name,
                    args,
                } => self.tool_delta(a, index, id, name, args).await?,
                ProviderEvent::Usage(u) => usage = Some(u),
                ProviderEvent::Finish(_) => finished = true,
            }
            // The idle gap runs from when we are ready for the next event, so time spent
            // appending this one (riding out a store outage, say) is not the upstream's.
            if timed_here {
                deadline.as_mut().reset(Instant::now() + idle);
            }
        }
        self.record_usage(a, usage, true).await?;
        Ok(())
    }

    /// Appends the call's usage record. Without one from the upstream, an estimate
    /// ([`estimate_usage`]) is recorded if the attempt streamed anything (or
    /// `always`), so no spent tokens go unrecorded.
    async fn record_usage(
        &mut self,
        a: &Attempt,
        usage: Option<UsageRecord>,
        always: bool,
    ) -> Result<(), Outcome> {
        let mut record = match usage {
            Some(u) => u,
            None if always || !a.output.is_empty() => {
                estimate_usage(
                    &self.model.name,
                    Some(&self.model),
                    a.call_index,
                    self.request.system_prompt.as_deref(),
                    &self.request.messages,
                    a.output.clone(),
                )
                .await
            }
            None => return Ok(()),
        };
        record.call_index = a.call_index;
        if record.model.is_empty() {
            record.model = self.model.name.clone();
        }
        if record.provider.is_empty() {
            record.provider = self.model.provider.name().to_string();
        }
        self.emit(EventBody::Usage(record)).await
    }

    fn new_step(&mut self, a: &mut Attempt) -> (String, u32) {
        let index = self.next_index;
        self.next_index += 1;
        let id = format!("step_{}", self.next_step_id);
        self.next_step_id += 1;
        a.steps.push(id.clone());
        (id, index)
    }

    fn run_id(&self, a: &Attempt) -> String {
        format!("{}:{}", self.meta.stream_id, a.call_index)
    }

    async fn delta(
        &mut self,
        a: &mut Attempt,
        kind: PartKind,
        text: String,
    ) -> Result<(), Outcome> {
        a.output.push_str(&text);
        if kind == PartKind::Text {
            a.text.push_str(&text);
        }
        let step_id = self.message_step(a, kind).await?;
        let part = match kind {
            PartKind::Text => crate::event::ContentPart::Text { text },
            PartKind::Think => crate::event::ContentPart::Think {
                think: text,
                signature: None,
            },
        };
        let delta = Delta {
            id: step_id,
            delta: DeltaContent {
                content: vec![part],
            },
        };
        self.emit(match kind {
            PartKind::Text => EventBody::MessageDelta(delta),
            PartKind::Think => EventBody::ReasoningDelta(delta),
        })
        .await
    }

    /// The step deltas of `kind` go to: the current one if it is of that kind, else a
    /// new `message_creation` step.
    async fn message_step(&mut self, a: &mut Attempt, kind: PartKind) -> Result<String, Outcome> {
        if let Some((id, k)) = &a.current
            && *k == kind
        {
            return Ok(id.clone());
        }
        let (id, index) = self.new_step(a);
        let step = EventBody::RunStep(RunStep {
            id: id.clone(),
            run_id: self.run_id(a),
            index,
            step_type: StepType::MessageCreation,
            step_details: StepDetails::MessageCreation {
                message_creation: MessageCreation {
                    message_id: self.meta.response_message_id.clone(),
                },
            },
        });
        self.emit(step).await?;
        a.current = Some((id.clone(), kind));
        Ok(id)
    }

    /// The signature of the thinking block that just streamed: the last delta of its
    /// `think` part (a part of its own if the block had no text), which it closes, so
    /// the next thinking is a block of its own.
    async fn signature(&mut self, a: &mut Attempt, signature: String) -> Result<(), Outcome> {
        let step_id = self.message_step(a, PartKind::Think).await?;
        self.emit(EventBody::ReasoningDelta(Delta {
            id: step_id.clone(),
            delta: DeltaContent {
                content: vec![crate::event::ContentPart::Think {
                    think: String::new(),
                    signature: Some(signature),
                }],
            },
        }))
        .await?;
        a.current = None;
        // The block as it landed, so every emitted delta must have.
        self.flush().await?;
        if let Some(crate::event::ContentPart::Think {
            think,
            signature: Some(signature),
        }) = self.aggregate.part(&step_id)
        {
            a.reasoning.push(ReasoningBlock::Thinking {
                thinking: think.clone(),
                signature: signature.clone(),
            });
        }
        Ok(())
    }

    /// A redacted thinking block: a `redacted_thinking` part of its own.
    async fn redacted(&mut self, a: &mut Attempt, data: String) -> Result<(), Outcome> {
        a.current = None;
        let step_id = self.message_step(a, PartKind::Think).await?;
        a.current = None;
        a.reasoning
            .push(ReasoningBlock::Redacted { data: data.clone() });
        self.emit(EventBody::ReasoningDelta(Delta {
            id: step_id,
            delta: DeltaContent {
                content: vec![crate::event::ContentPart::RedactedThinking { data }],
            },
        }))
        .await
    }

    async fn tool_delta(
        &mut self,
        a: &mut Attempt,
        index: u32,
        id: Option<String>,
        name: Option<String>,
        args: String,
    ) -> Result<(), Outcome> {
        a.output.push_str(&args);
        let step_id = match a.pending.get_mut(&index) {
            Some(p) => {
                if let Some(id) = &id {
                    p.call.id.clone_from(id);
                }
                if let Some(name) = &name {
                    p.call.name.clone_from(name);
                }
                p.call.args.push_str(&args);
                p.step_id.clone()
            }
            None => {
                let (step_id, step_index) = self.new_step(a);
                let call = ToolCall {
                    id: id.clone().unwrap_or_default(),
                    name: name.clone().unwrap_or_default(),
                    args: args.clone(),
                    output: None,
                };
                let step = EventBody::RunStep(RunStep {
                    id: step_id.clone(),
                    run_id: self.run_id(a),
                    index: step_index,
                    step_type: StepType::ToolCalls,
                    step_details: StepDetails::ToolCalls {
                        tool_calls: vec![ToolCall {
                            args: String::new(),
                            ..call.clone()
                        }],
                    },
                });
                self.emit(step).await?;
                a.current = None;
                a.pending.insert(
                    index,
                    PendingCall {
                        step_id: step_id.clone(),
                        step_index,
                        call,
                    },
                );
                step_id
            }
        };
        self.emit(EventBody::RunStepDelta(RunStepDelta {
            id: step_id,
            delta: ToolCallsDelta {
                kind: StepType::ToolCalls,
                tool_calls: vec![ToolCallChunk {
                    id,
                    name,
                    args,
                    index,
                }],
            },
        }))
        .await
    }
}
