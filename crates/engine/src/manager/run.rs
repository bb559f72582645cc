//! The job task: one per job, the single writer of its log and response message. It
//! calls the model (with retries), streams the answer into the log as run steps and
//! deltas, runs tool calls in a loop, records usage, and on every way out saves the
//! response and appends exactly one terminal event.

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

/// How one job's task ended.
enum Outcome {
    /// The answer is complete; `Some(reason)` when the tool loop hit its cap.
    Complete(Option<&'static str>),
    Stopped(EndReason),
    Failed(ProviderError),
    LogFull,
    /// Someone else ended the log (a reaper on another replica); nothing to write.
    Ended,
    Internal(String),
}

/// Why one model call did not produce an answer.
enum CallError {
    /// The upstream failed; the retry layer decides what follows.
    Provider(ProviderError),
    /// The job must end now (abort, full log, store failure).
    Stop(Outcome),
}

impl From<Outcome> for CallError {
    fn from(o: Outcome) -> Self {
        CallError::Stop(o)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Text,
    Think,
}

/// A tool call of the current model call, as its fragments arrive.
#[derive(Clone, Debug)]
struct PendingCall {
    step_id: String,
    step_index: u32,
    call: ToolCall,
}

/// The state of one running job, owned by its task.
pub(super) struct JobRun {
    manager: JobManager,
    meta: JobMeta,
    title: String,
    model: ModelEntry,
    /// The history sent upstream; grows by one assistant turn per tool round.
    request: ModelRequest,
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<EndReason>>>,
    last_progress: Arc<Mutex<Instant>>,
    /// The fold of what this task appended: the answer so far.
    aggregate: Aggregate,
    /// Next content index (reset when a failed attempt's steps are discarded).
    next_index: u32,
    /// Next step id number (never reused).
    next_step_id: u32,
    /// Model calls made so far, failed attempts included (each has its own usage).
    calls: u32,
    current: Option<(String, PartKind)>,
    /// Steps created by the current attempt, named in `discardStepIds` if it fails.
    attempt_steps: Vec<String>,
    /// Characters streamed by the current attempt (for a usage estimate).
    attempt_chars: usize,
    /// What the current attempt streamed (for a usage estimate).
    attempt_text: String,
    /// Text of the current model call (the assistant turn sent back with tool results).
    call_text: String,
    /// Signed and redacted thinking blocks of the current model call, which begin the
    /// assistant turn sent back with its tool results.
    call_reasoning: Vec<ReasoningBlock>,
    /// Tool calls of the current model call, by the upstream's index.
    pending: std::collections::BTreeMap<u32, PendingCall>,
    /// The request's client tools, whose calls end the job instead of running
    /// (`client_tools.rs`).
    pub(super) client_tools: std::collections::HashSet<String>,
}

impl JobRun {
    /// The task state of a job whose `created` event (seq 0) is in the log.
    pub(super) fn new(
        manager: JobManager,
        meta: JobMeta,
        title: String,
        model: ModelEntry,
        request: ModelRequest,
        LiveJob {
            cancel,
            reason,
            last_progress,
        }: LiveJob,
        created: &EventBody,
    ) -> Self {
        let mut aggregate = Aggregate::default();
        aggregate.apply(0, created);
        JobRun {
            manager,
            meta,
            title,
            model,
            request,
            cancel,
            reason,
            last_progress,
            aggregate,
            next_index: 0,
            next_step_id: 0,
            calls: 0,
            current: None,
            attempt_steps: Vec::new(),
            attempt_chars: 0,
            attempt_text: String::new(),
            call_text: String::new(),
            call_reasoning: Vec::new(),
            pending: Default::default(),
            client_tools: Default::default(),
        }
    }

    pub(super) async fn run(mut self) {
        let outcome = self.generate().await;
        let stream_id = self.meta.stream_id.clone();
        if let Err(e) = self.finish(outcome).await {
            // The database failed while saving the answer: still end the log, so no
            // job is left `running` and every subscriber gets a terminal event.
            tracing::error!(stream_id = %stream_id, error = %e, "could not save the answer");
            let end = EventBody::Error(ErrorEvent {
                code: "internal".into(),
                message: format!("could not save the answer: {e}"),
                response_message: None,
            });
            let _ = self
                .manager
                .inner
                .store
                .append(&stream_id, &end, None)
                .await;
        }
        self.manager.inner.live.lock().remove(&stream_id);
    }

    fn stop_reason(&self) -> EndReason {
        self.reason.lock().unwrap_or(EndReason::Abort)
    }

    fn stopped(&self) -> Outcome {
        Outcome::Stopped(self.stop_reason())
    }

    /// Appends through the store, riding out a store outage of up to
    /// `store_outage_grace` with backoff. The expected seq makes a retry whose first try
    /// did land a no-op, so an outage never duplicates an event.
    async fn append(&self, body: &EventBody) -> Result<u64, StoreError> {
        use backon::Retryable;
        let expected = self.aggregate.last_seq().map_or(0, |s| s + 1);
        let store = &self.manager.inner.store;
        (|| store.append(&self.meta.stream_id, body, Some(expected)))
            .retry(outage_backoff(self.manager.inner.config.store_outage_grace))
            .sleep(tokio::time::sleep)
            .when(StoreError::is_unavailable)
            .notify(|e, wait| {
                tracing::warn!(stream_id = %self.meta.stream_id, error = %e, ?wait, "append failed; retrying");
            })
            .await
    }

    async fn emit(&mut self, body: EventBody) -> Result<(), Outcome> {
        match self.append(&body).await {
            Ok(seq) => {
                self.aggregate.apply(seq, &body);
                *self.last_progress.lock() = Instant::now();
                Ok(())
            }
            Err(StoreError::Append(AppendError::Full)) => Err(Outcome::LogFull),
            Err(StoreError::Append(AppendError::Ended)) => Err(Outcome::Ended),
            Err(e) => Err(Outcome::Internal(e.to_string())),
        }
    }

    /// The agent loop: model call (with retries), then the tools it asked for, until
    /// it answers without tools or `max_tool_iterations` model calls were made.
    async fn generate(&mut self) -> Outcome {
        let max = self.manager.inner.config.max_tool_iterations.max(1);
        for iteration in 1..=max {
            let calls = match self.call_with_retries().await {
                Ok(c) => c,
                Err(o) => return o,
            };
            if calls.is_empty() {
                return Outcome::Complete(None);
            }
            // Calls of client tools end the job: the server tools of the same model
            // call run first, then the client's calls are handed over (saved without
            // output) with `final` `complete`.
            if calls
                .iter()
                .any(|c| self.client_tools.contains(&c.call.name))
            {
                let server: Vec<PendingCall> = calls
                    .into_iter()
                    .filter(|c| !self.client_tools.contains(&c.call.name))
                    .collect();
                self.pending.clear();
                if !server.is_empty()
                    && let Err(o) = self.execute_tools(server).await
                {
                    return o;
                }
                return Outcome::Complete(None);
            }
            if iteration == max {
                // The model would never see these results: the tools are not run (no
                // side effects for nothing), yet each call gets a result so the
                // history stays valid, and the cap ends the job with a terminal event
                // (LESSONS: grimoire's "loading forever").
                let outputs = vec![crate::tools::not_run_result(); calls.len()];
                if let Err(o) = self.complete_calls(calls, outputs).await {
                    return o;
                }
                return Outcome::Complete(Some("max_tool_iterations"));
            }
            if let Err(o) = self.run_tools(calls).await {
                return o;
            }
        }
        Outcome::Complete(None)
    }

    /// One model call through the retry layer (SPEC §6): retryable failures wait
    /// (cut short by abort) and try again; each retry is a `retry` event naming the
    /// failed attempt's steps, which the aggregator then drops.
    async fn call_with_retries(&mut self) -> Result<Vec<PendingCall>, Outcome> {
        let mut backoff = crate::retry::Backoff::new(self.model.retry, None);
        let mut attempt = 1;
        loop {
            let index_before = self.next_index;
            self.attempt_steps.clear();
            self.attempt_chars = 0;
            self.attempt_text.clear();
            self.call_text.clear();
            self.call_reasoning.clear();
            self.pending.clear();
            self.current = None;
            let error = match self.call_once().await {
                Ok(calls) => return Ok(calls),
                Err(CallError::Stop(o)) => return Err(o),
                Err(CallError::Provider(e)) => e,
            };
            let delay = match backoff.next_delay(&error) {
                Ok(d) => d,
                Err(crate::retry::GiveUp::RetryAfterTooLong(d)) => {
                    return Err(Outcome::Failed(ProviderError {
                        message: format!(
                            "{}; the upstream asked to wait {} s before retrying, more than the {} s allowed",
                            error.message,
                            d.as_secs_f64().ceil(),
                            self.model.retry.ceiling.as_secs()
                        ),
                        ..error
                    }));
                }
                Err(_) => return Err(Outcome::Failed(error)),
            };
            let discard = std::mem::take(&mut self.attempt_steps);
            self.next_index = index_before;
            self.emit(EventBody::Retry(crate::event::Retry {
                attempt,
                max_attempts: backoff.max_attempts(),
                delay_ms: delay.as_millis() as u64,
                error: error.message.clone(),
                discard_step_ids: discard,
            }))
            .await?;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(self.stopped()),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// One attempt: stream the upstream's answer into the log under the first-byte
    /// and idle-gap timeouts; returns the tool calls it asked for. A provider that
    /// applies the timeouts itself (the HTTP ones, to the upstream's bytes, so that
    /// pings and comments count) reports them as `Timeout` errors; for the others they
    /// are applied here, to the provider's events.
    async fn call_once(&mut self) -> Result<Vec<PendingCall>, CallError> {
        let mut request = self.request.clone();
        request.model = self.model.name.clone();
        request.call_index = self.calls;
        self.calls += 1;
        let first_byte = self.model.timeouts.first_byte;
        let idle = self.model.timeouts.idle;
        let provider = self.model.provider.clone();
        let timed_here = !provider.applies_timeouts();
        let cancel = self.cancel.clone();
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
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CallError::Provider(e)),
            Err(_) => return Err(CallError::Provider(timeout_error("first byte", first_byte))),
        };
        let mut usage: Option<UsageRecord> = None;
        let mut got_any = false;
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
                    self.record_usage(usage.take(), true).await.ok();
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
                    self.record_usage(usage.take(), false).await?;
                    return Err(CallError::Provider(timeout_error(what, limit)));
                }
                Some(None) => break,
                Some(Some(Err(e))) => {
                    self.record_usage(usage.take(), false).await?;
                    return Err(CallError::Provider(e));
                }
                Some(Some(Ok(ev))) => ev,
            };
            got_any = true;
            match event {
                ProviderEvent::Text(t) => self.delta(PartKind::Text, t).await?,
                ProviderEvent::Reasoning(t) => self.delta(PartKind::Think, t).await?,
                ProviderEvent::ReasoningSignature(sig) => self.signature(sig).await?,
                ProviderEvent::RedactedReasoning(data) => self.redacted(data).await?,
                ProviderEvent::ToolCall {
                    index,
                    id,
                    name,
                    args,
                } => self.tool_delta(index, id, name, args).await?,
                ProviderEvent::Usage(u) => usage = Some(u),
                ProviderEvent::Finish(_) => {}
            }
            // The idle gap runs from when we are ready for the next event, so time spent
            // appending this one (riding out a store outage, say) is not the upstream's.
            if timed_here {
                deadline.as_mut().reset(Instant::now() + idle);
            }
        }
        self.record_usage(usage, true).await?;
        Ok(self.pending.values().cloned().collect())
    }

    /// Appends the call's usage record. Without one from the upstream, an estimate is
    /// recorded if the call streamed anything (or `always`), so no spent tokens go
    /// unrecorded.
    async fn record_usage(
        &mut self,
        usage: Option<UsageRecord>,
        always: bool,
    ) -> Result<(), Outcome> {
        let mut record = match usage {
            Some(u) => u,
            None if always || self.attempt_chars > 0 => self.estimate_usage().await,
            None => return Ok(()),
        };
        record.call_index = self.calls.saturating_sub(1);
        if record.model.is_empty() {
            record.model = self.model.name.clone();
        }
        if record.provider.is_empty() {
            record.provider = self.model.provider.name().to_string();
        }
        self.emit(EventBody::Usage(record)).await
    }

    /// An estimate (tiktoken, with the upstream model's encoding) for a call cut off
    /// before the upstream reported usage; marked `estimated`.
    async fn estimate_usage(&self) -> UsageRecord {
        let mut input = String::new();
        if let Some(s) = &self.request.system_prompt {
            input.push_str(s);
        }
        for m in &self.request.messages {
            input.push_str(&m.text);
            for c in &m.tool_calls {
                input.push_str(&c.args);
                input.push_str(c.output.as_deref().unwrap_or(""));
            }
        }
        let upstream = self.model.provider.upstream_model();
        UsageRecord {
            input_tokens: crate::usage::count_tokens(upstream, input).await,
            output_tokens: crate::usage::count_tokens(upstream, self.attempt_text.clone()).await,
            estimated: true,
            ..UsageRecord::default()
        }
    }

    fn new_step(&mut self) -> (String, u32) {
        let index = self.next_index;
        self.next_index += 1;
        let id = format!("step_{}", self.next_step_id);
        self.next_step_id += 1;
        self.attempt_steps.push(id.clone());
        (id, index)
    }

    fn run_id(&self) -> String {
        format!("{}:{}", self.meta.stream_id, self.calls.saturating_sub(1))
    }

    async fn delta(&mut self, kind: PartKind, text: String) -> Result<(), Outcome> {
        self.attempt_chars += text.chars().count();
        self.attempt_text.push_str(&text);
        if kind == PartKind::Text {
            self.call_text.push_str(&text);
        }
        let step_id = self.message_step(kind).await?;
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
    async fn message_step(&mut self, kind: PartKind) -> Result<String, Outcome> {
        if let Some((id, k)) = &self.current
            && *k == kind
        {
            return Ok(id.clone());
        }
        let (id, index) = self.new_step();
        let step = EventBody::RunStep(RunStep {
            id: id.clone(),
            run_id: self.run_id(),
            index,
            step_type: StepType::MessageCreation,
            step_details: StepDetails::MessageCreation {
                message_creation: MessageCreation {
                    message_id: self.meta.response_message_id.clone(),
                },
            },
        });
        self.emit(step).await?;
        self.current = Some((id.clone(), kind));
        Ok(id)
    }

    /// The signature of the thinking block that just streamed: the last delta of its
    /// `think` part (a part of its own if the block had no text), which it closes, so
    /// the next thinking is a block of its own.
    async fn signature(&mut self, signature: String) -> Result<(), Outcome> {
        let step_id = self.message_step(PartKind::Think).await?;
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
        self.current = None;
        if let Some(crate::event::ContentPart::Think {
            think,
            signature: Some(signature),
        }) = self.aggregate.part(&step_id)
        {
            self.call_reasoning.push(ReasoningBlock::Thinking {
                thinking: think.clone(),
                signature: signature.clone(),
            });
        }
        Ok(())
    }

    /// A redacted thinking block: a `redacted_thinking` part of its own.
    async fn redacted(&mut self, data: String) -> Result<(), Outcome> {
        self.current = None;
        let step_id = self.message_step(PartKind::Think).await?;
        self.current = None;
        self.call_reasoning
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
        index: u32,
        id: Option<String>,
        name: Option<String>,
        args: String,
    ) -> Result<(), Outcome> {
        self.attempt_chars += args.chars().count();
        self.attempt_text.push_str(&args);
        let step_id = match self.pending.get_mut(&index) {
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
                let (step_id, step_index) = self.new_step();
                let call = ToolCall {
                    id: id.clone().unwrap_or_default(),
                    name: name.clone().unwrap_or_default(),
                    args: args.clone(),
                    output: None,
                };
                let step = EventBody::RunStep(RunStep {
                    id: step_id.clone(),
                    run_id: self.run_id(),
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
                self.current = None;
                self.pending.insert(
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

    /// Runs the model's tool calls concurrently, records each result, and adds the
    /// assistant turn with its results to the history. Only the tools this job was
    /// given (those in `request.tools`) run; a call of any other name — the model may
    /// name a tool it was never shown — gets [`crate::tools::unavailable_result`]. On
    /// abort every unfinished tool is cancelled and gets `{"error":"cancelled"}`, so
    /// the saved history stays valid.
    async fn run_tools(&mut self, calls: Vec<PendingCall>) -> Result<(), Outcome> {
        let done = self.execute_tools(calls).await?;
        self.request.messages.push(ChatMessage {
            role: Role::Assistant,
            text: std::mem::take(&mut self.call_text),
            tool_calls: done,
            tool_call_id: None,
            reasoning: std::mem::take(&mut self.call_reasoning),
        });
        Ok(())
    }

    /// Runs `calls` concurrently and records their results (see [`JobRun::run_tools`]);
    /// returns the calls with their outputs.
    async fn execute_tools(&mut self, calls: Vec<PendingCall>) -> Result<Vec<ToolCall>, Outcome> {
        let registry = &self.manager.inner.tools;
        let allowed = &self.request.tools;
        let cancel = self.cancel.child_token();
        let outputs = futures::future::join_all(calls.iter().map(|c| {
            let cancel = cancel.clone();
            let name = c.call.name.as_str();
            let given = allowed.iter().any(|t| t.name == name);
            async move {
                if !given {
                    return crate::tools::unavailable_result(name);
                }
                crate::tools::run_tool(registry, name, &c.call.args, cancel).await
            }
        }))
        .await;
        let done = self.complete_calls(calls, outputs).await?;
        if self.cancel.is_cancelled() {
            return Err(self.stopped());
        }
        Ok(done)
    }

    /// Records `outputs[i]` as the result of `calls[i]` (an `on_run_step_completed`
    /// each); returns the calls with their outputs.
    async fn complete_calls(
        &mut self,
        calls: Vec<PendingCall>,
        outputs: Vec<String>,
    ) -> Result<Vec<ToolCall>, Outcome> {
        self.pending.clear();
        let mut done = Vec::with_capacity(calls.len());
        for (c, output) in calls.into_iter().zip(outputs) {
            let call = ToolCall {
                output: Some(output),
                ..c.call
            };
            self.emit(EventBody::RunStepCompleted(
                crate::event::RunStepCompleted {
                    result: crate::event::StepResult {
                        id: c.step_id,
                        index: c.step_index,
                        tool_call: call.clone(),
                    },
                },
            ))
            .await?;
            done.push(call);
        }
        Ok(done)
    }

    /// Gives every tool call cut off mid-stream a "cancelled" result before the partial
    /// answer is saved, so no stored tool call lacks its result.
    async fn close_pending_tools(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for (_, c) in pending {
            let call = ToolCall {
                output: Some(crate::tools::cancelled_result()),
                ..c.call
            };
            let _ = self
                .emit(EventBody::RunStepCompleted(
                    crate::event::RunStepCompleted {
                        result: crate::event::StepResult {
                            id: c.step_id,
                            index: c.step_index,
                            tool_call: call,
                        },
                    },
                ))
                .await;
        }
    }

    /// The response as saved and sent in the terminal event: the aggregate's content,
    /// with every tool call that has no output given the cancelled result. A job that
    /// ends while a call is open (log full, a store or database failure, a call whose
    /// `on_run_step_completed` could not be appended) would otherwise persist a call
    /// without a result, and every later turn built on it would be refused upstream
    /// (LESSONS: grimoire's 400s).
    fn response_message(&self, unfinished: bool, error: bool) -> Message {
        let mut content = self.aggregate.content();
        for part in &mut content {
            // A completed answer's client tool calls are the client's to run.
            if let crate::event::ContentPart::ToolCall { tool_call } = part
                && tool_call.output.is_none()
                && (unfinished || !self.client_tools.contains(&tool_call.name))
            {
                tool_call.output = Some(crate::tools::cancelled_result());
            }
        }
        Message {
            message_id: self.meta.response_message_id.clone(),
            conversation_id: self.meta.conversation_id.clone(),
            parent_message_id: Some(self.meta.user_message_id.clone()),
            sender: self.model.name.clone(),
            text: text_of(&content),
            content,
            is_created_by_user: false,
            model: Some(self.model.name.clone()),
            unfinished,
            error,
            created_at: now_rfc3339(),
        }
    }

    /// Saves the response (complete or partial) and then appends the terminal event:
    /// the order SPEC §4 requires.
    async fn finish(&mut self, outcome: Outcome) -> Result<(), EngineError> {
        if !matches!(outcome, Outcome::Ended | Outcome::LogFull) {
            self.close_pending_tools().await;
        }
        let context = match &outcome {
            Outcome::Ended => return Ok(()),
            Outcome::Complete(_) => SpendContext::Message,
            Outcome::Stopped(EndReason::Abort | EndReason::Shutdown) => SpendContext::Abort,
            _ => SpendContext::Error,
        };
        // One writer per response message: the owner takes the same end claim as the
        // reapers before it spends or saves; a reaper that holds it ends the job.
        if !self.claim_end().await? {
            return Ok(());
        }
        // Spend before the terminal event, on every path (SPEC §7); the database's
        // unique key makes a second spend of the same calls a no-op.
        let usage = spend_usage(
            &self.manager.inner,
            &self.meta,
            self.model.pricing.as_ref(),
            self.aggregate.usage(),
            context,
        )
        .await?;
        let terminal = match outcome {
            Outcome::Ended => return Ok(()),
            Outcome::Complete(reason) => {
                let msg = self.response_message(false, false);
                self.save(&msg).await?;
                EventBody::Final(Final {
                    status: FinalStatus::Complete,
                    response_message: msg,
                    conversation: self.conversation_ref(),
                    usage,
                    reason: reason.map(str::to_string),
                })
            }
            Outcome::Stopped(EndReason::Abort) | Outcome::Stopped(EndReason::Shutdown) => {
                let reason = match self.stop_reason() {
                    EndReason::Shutdown => "shutdown",
                    _ => "aborted",
                };
                let msg = self.response_message(true, false);
                self.save(&msg).await?;
                EventBody::Final(Final {
                    status: FinalStatus::Aborted,
                    response_message: msg,
                    conversation: self.conversation_ref(),
                    usage,
                    reason: Some(reason.into()),
                })
            }
            Outcome::Stopped(EndReason::Stalled) => {
                let limit = self.manager.inner.config.stall_timeout;
                self.error_end("stalled", format!("no progress for {} s", limit.as_secs()))
                    .await?
            }
            Outcome::Failed(e) => self.error_end("upstream_error", e.message).await?,
            Outcome::LogFull => {
                self.error_end(
                    "log_full",
                    "the answer exceeded the server's per-job event log cap".into(),
                )
                .await?
            }
            Outcome::Internal(m) => self.error_end("internal", m).await?,
        };
        match self.append(&terminal).await {
            Ok(_) | Err(StoreError::Append(AppendError::Ended)) => Ok(()),
            Err(StoreError::Append(AppendError::Full)) => Err(EngineError::Internal(
                "terminal event refused as full".into(),
            )),
            // The store lost the job (Redis restarted without its data): the answer is
            // saved, and no log is left to end.
            Err(StoreError::UnknownJob(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// [`JobCoordination::claim_end`](crate::store::JobCoordination::claim_end), riding out a store outage like [`JobRun::append`].
    async fn claim_end(&self) -> Result<bool, StoreError> {
        use backon::Retryable;
        let store = &self.manager.inner.store;
        (|| store.claim_end(&self.meta.stream_id))
            .retry(outage_backoff(self.manager.inner.config.store_outage_grace))
            .sleep(tokio::time::sleep)
            .when(StoreError::is_unavailable)
            .notify(|e, wait| {
                tracing::warn!(stream_id = %self.meta.stream_id, error = %e, ?wait, "end claim failed; retrying");
            })
            .await
    }

    async fn error_end(&mut self, code: &str, message: String) -> Result<EventBody, EngineError> {
        let msg = self.response_message(true, true);
        self.save(&msg).await?;
        Ok(EventBody::Error(ErrorEvent {
            code: code.into(),
            message,
            response_message: Some(msg),
        }))
    }

    async fn save(&self, msg: &Message) -> Result<(), EngineError> {
        let db = &self.manager.inner.db;
        db.save_message(msg).await?;
        db.save_conversation(&Conversation {
            conversation_id: self.meta.conversation_id.clone(),
            user_id: self.meta.user_id.clone(),
            title: self.title.clone(),
            created_at: msg.created_at.clone(),
            updated_at: msg.created_at.clone(),
        })
        .await
    }

    fn conversation_ref(&self) -> ConversationRef {
        ConversationRef {
            conversation_id: self.meta.conversation_id.clone(),
            title: self.title.clone(),
        }
    }
}
