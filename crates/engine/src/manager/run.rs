//! The job task: one per job, the single writer of its log and response message. It
//! calls the model (with retries; each attempt is an [`Attempt`] of its own, streamed
//! into the log by `attempt.rs`), runs tool calls in a loop, and on every way out ends
//! the job through [`super::ending::conclude`] and appends exactly one terminal event.

use super::appender::Appender;
use super::attempt::{Attempt, PendingCall};
use super::ending::{Ending, conclude};
use super::*;

/// How one job's task ended.
pub(super) enum Outcome {
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
pub(super) enum CallError {
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

/// The state of one running job, owned by its task. Per-attempt state lives in the
/// [`Attempt`] each upstream attempt creates; this holds what spans the whole job.
pub(super) struct JobRun {
    pub(super) ctx: Arc<JobContext>,
    pub(super) meta: JobMeta,
    title: String,
    pub(super) model: ModelEntry,
    /// The history sent upstream; grows by one assistant turn per tool round.
    pub(super) request: ModelRequest,
    pub(super) live: LiveSlot,
    /// The fold of what this task appended and saw land: the answer so far.
    pub(super) aggregate: Aggregate,
    /// Sends the job's events to the store without waiting for each to land
    /// (`appender.rs`); what lands comes back into `aggregate`.
    appender: Appender,
    /// Next content index (back to an attempt's first when its steps are discarded).
    pub(super) next_index: u32,
    /// Next step id number (never reused).
    pub(super) next_step_id: u32,
    /// Model calls made so far, failed attempts included (each has its own usage).
    pub(super) calls: u32,
    /// The request's client tools, whose calls end the job instead of running
    /// (`client_tools.rs`).
    pub(super) client_tools: std::collections::HashSet<String>,
}

/// How a store error of an append ends the job.
fn outcome_of(e: StoreError) -> Outcome {
    match e {
        StoreError::Append(AppendError::Full) => Outcome::LogFull,
        StoreError::Append(AppendError::Ended) => Outcome::Ended,
        e => Outcome::Internal(e.to_string()),
    }
}

impl JobRun {
    /// The task state of a job whose `created` event (seq 0) is in the log.
    pub(super) fn new(
        ctx: Arc<JobContext>,
        meta: JobMeta,
        title: String,
        model: ModelEntry,
        request: ModelRequest,
        live: LiveSlot,
        created: &EventBody,
    ) -> Self {
        let mut aggregate = Aggregate::default();
        aggregate.apply(0, created);
        JobRun {
            appender: Appender::new(ctx.clone(), meta.stream_id.clone()),
            ctx,
            meta,
            title,
            model,
            request,
            live,
            aggregate,
            next_index: 0,
            next_step_id: 0,
            calls: 0,
            client_tools: Default::default(),
        }
    }

    /// Runs the job to its end; its live slot is freed when this returns.
    pub(super) async fn run(mut self) {
        let outcome = self.generate().await;
        // What the job emitted lands before it ends; a store error of those events
        // came first, so it decides how the job ends.
        let outcome = match self.flush().await {
            Ok(()) => outcome,
            Err(o) => o,
        };
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
            // If this fails too, the job stays running with nobody generating it:
            // the reaper ends it (`store_unavailable`) once the store answers.
            if let Err(e) = self.ctx.store.append(&stream_id, &end, None).await {
                tracing::warn!(stream_id = %stream_id, error = %e,
                    "could not end the log; the reaper will");
            }
        }
    }

    fn stop_reason(&self) -> EndReason {
        self.live.handles.reason.lock().unwrap_or(EndReason::Abort)
    }

    pub(super) fn stopped(&self) -> Outcome {
        Outcome::Stopped(self.stop_reason())
    }

    pub(super) fn cancel(&self) -> &CancellationToken {
        &self.live.handles.cancel
    }

    /// The seq the next emitted event gets: after what landed and what is on its way.
    fn next_seq(&self) -> u64 {
        self.aggregate.last_seq().map_or(0, |s| s + 1) + self.appender.pending() as u64
    }

    /// Appends `body` to the job's log through its [`Appender`]: returns once it is
    /// queued, not once it landed (it is in `aggregate` once it did).
    ///
    /// Errors: the outcome that ends the job when an earlier or this event could not
    /// land (the log is full or ended, the store failed).
    pub(super) async fn emit(&mut self, body: EventBody) -> Result<(), Outcome> {
        let seq = self.next_seq();
        let JobRun {
            appender,
            aggregate,
            live,
            ..
        } = self;
        let mut landed = |seq: u64, body: &EventBody| {
            aggregate.apply(seq, body);
            *live.handles.last_progress.lock() = Instant::now();
        };
        appender
            .push(body, seq, &mut landed)
            .await
            .map_err(outcome_of)
    }

    /// Waits until every emitted event landed and is in `aggregate`.
    ///
    /// Errors: as [`JobRun::emit`].
    pub(super) async fn flush(&mut self) -> Result<(), Outcome> {
        let JobRun {
            appender,
            aggregate,
            live,
            ..
        } = self;
        let mut landed = |seq: u64, body: &EventBody| {
            aggregate.apply(seq, body);
            *live.handles.last_progress.lock() = Instant::now();
        };
        appender.flush(&mut landed).await.map_err(outcome_of)
    }

    /// The agent loop: model call (with retries), then the tools it asked for, until
    /// it answers without tools or `max_tool_iterations` model calls were made.
    async fn generate(&mut self) -> Outcome {
        let max = self.ctx.config.max_tool_iterations.max(1);
        for iteration in 1..=max {
            let attempt = match self.call_with_retries().await {
                Ok(a) => a,
                Err(o) => return o,
            };
            let calls: Vec<PendingCall> = attempt.pending.values().cloned().collect();
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
                // (docs/lessons.md: grimoire's "loading forever").
                let outputs = vec![crate::tools::not_run_result(); calls.len()];
                if let Err(o) = self.complete_calls(calls, outputs).await {
                    return o;
                }
                return Outcome::Complete(Some("max_tool_iterations"));
            }
            if let Err(o) = self.run_tools(attempt, calls).await {
                return o;
            }
        }
        Outcome::Complete(None)
    }

    /// One model call through the retry layer (docs/protocol.md §6): retryable
    /// failures wait (cut short by abort) and try again; each retry is a `retry` event
    /// naming the failed attempt's steps, which the aggregator then drops. Returns the
    /// attempt that answered.
    async fn call_with_retries(&mut self) -> Result<Attempt, Outcome> {
        let mut backoff = crate::retry::Backoff::new(self.model.retry, None);
        let mut attempt_no = 1;
        loop {
            let mut attempt = Attempt::new(self.calls, self.next_index);
            self.calls += 1;
            let error = match self.call_once(&mut attempt).await {
                Ok(()) => return Ok(attempt),
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
            crate::metrics::retry(&self.model.name, &error);
            self.next_index = attempt.first_index;
            self.emit(EventBody::Retry(crate::event::Retry {
                attempt: attempt_no,
                max_attempts: backoff.max_attempts(),
                delay_ms: delay.as_millis() as u64,
                error: error.message.clone(),
                discard_step_ids: attempt.steps,
            }))
            .await?;
            tokio::select! {
                biased;
                _ = self.cancel().cancelled() => return Err(self.stopped()),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt_no += 1;
        }
    }

    /// Runs the model's tool calls concurrently, records each result, and adds the
    /// assistant turn with its results to the history. Only the tools this job was
    /// given (those in `request.tools`) run; a call of any other name — the model may
    /// name a tool it was never shown — gets [`crate::tools::unavailable_result`]. On
    /// abort every unfinished tool is cancelled and gets `{"error":"cancelled"}`, so
    /// the saved history stays valid.
    async fn run_tools(
        &mut self,
        attempt: Attempt,
        calls: Vec<PendingCall>,
    ) -> Result<(), Outcome> {
        let done = self.execute_tools(calls).await?;
        self.request.messages.push(ChatMessage {
            role: Role::Assistant,
            text: attempt.text,
            tool_calls: done,
            tool_call_id: None,
            reasoning: attempt.reasoning,
        });
        Ok(())
    }

    /// Runs `calls` concurrently and records their results (see [`JobRun::run_tools`]);
    /// returns the calls with their outputs.
    async fn execute_tools(&mut self, calls: Vec<PendingCall>) -> Result<Vec<ToolCall>, Outcome> {
        let registry = &self.ctx.tools;
        let allowed = &self.request.tools;
        let cancel = self.cancel().child_token();
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
        if self.cancel().is_cancelled() {
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

    /// Gives every tool call still without a result a "cancelled" one (an
    /// `on_run_step_completed` each) before the partial answer is saved, so the log,
    /// too, pairs every call with a result. Best effort: the saved message pairs them
    /// anyway ([`super::ending::response_message`]).
    async fn close_open_tool_calls(&mut self) {
        for (step_id, index, call) in self.aggregate.open_tool_calls() {
            let call = ToolCall {
                output: Some(crate::tools::cancelled_result()),
                ..call
            };
            let completed = EventBody::RunStepCompleted(crate::event::RunStepCompleted {
                result: crate::event::StepResult {
                    id: step_id,
                    index,
                    tool_call: call,
                },
            });
            if self.emit(completed).await.is_err() {
                return; // the log refuses more; the saved message still pairs them
            }
        }
        let _ = self.flush().await; // likewise
    }

    /// Ends the job: closes open tool calls, takes the end claim (one writer per
    /// response message: a reaper that holds it ends the job instead), then
    /// [`conclude`] spends, saves and builds the terminal event, which is appended
    /// last — the order docs/protocol.md §4 requires.
    async fn finish(&mut self, outcome: Outcome) -> Result<(), EngineError> {
        let ending = match outcome {
            Outcome::Ended => return Ok(()),
            Outcome::Complete(reason) => Ending::Complete { reason },
            Outcome::Stopped(EndReason::Abort) => Ending::Aborted { shutdown: false },
            Outcome::Stopped(EndReason::Shutdown) => Ending::Aborted { shutdown: true },
            Outcome::Stopped(EndReason::Stalled) => Ending::Error {
                code: "stalled",
                message: format!(
                    "no progress for {} s",
                    self.ctx.config.stall_timeout.as_secs()
                ),
            },
            Outcome::Failed(e) => Ending::Error {
                code: "upstream_error",
                message: e.message,
            },
            Outcome::LogFull => Ending::Error {
                code: "log_full",
                message: "the answer exceeded the server's per-job event log cap".into(),
            },
            Outcome::Internal(m) => Ending::Error {
                code: "internal",
                message: m,
            },
        };
        let log_full = matches!(
            &ending,
            Ending::Error {
                code: "log_full",
                ..
            }
        );
        // A completed job's open calls are the client's (`client_tools.rs`).
        if !log_full && !matches!(ending, Ending::Complete { .. }) {
            self.close_open_tool_calls().await;
        }
        if !self.ctx.claim_end(&self.meta.stream_id).await? {
            return Ok(());
        }
        let terminal = conclude(
            &self.ctx,
            &self.meta,
            &self.title,
            self.model.pricing.as_ref(),
            &self.aggregate,
            ending,
        )
        .await?;
        match self
            .ctx
            .append(&self.meta.stream_id, &terminal, self.next_seq())
            .await
        {
            Ok(_) => {
                super::ending::announce_end(&self.ctx, &self.meta, &terminal);
                Ok(())
            }
            Err(StoreError::Append(AppendError::Ended)) => Ok(()),
            Err(e @ StoreError::Append(_)) => Err(EngineError::internal("terminal event", e)),
            // The store lost the job (Redis restarted without its data): the answer is
            // saved, and no log is left to end.
            Err(StoreError::UnknownJob(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
