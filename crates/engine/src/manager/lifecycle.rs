//! The background sweeps (stalled jobs, orphans of dead replicas, expired logs) and
//! graceful shutdown.

use super::*;

impl JobManager {
    /// Starts the background reaper: every `reap_interval` it ends stalled jobs and
    /// drops logs past retention. Runs until [`JobManager::shutdown`].
    pub fn spawn_reaper(&self) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut tick = tokio::time::interval(this.inner.config.reap_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = this.inner.stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                this.reap_stalled();
                if let Err(e) = this.reap_orphans().await {
                    tracing::warn!(error = %e, "orphan sweep failed");
                }
                if let Err(e) = this
                    .inner
                    .store
                    .remove_expired(this.inner.config.retention)
                    .await
                {
                    tracing::warn!(error = %e, "retention sweep failed");
                }
            }
        });
    }

    /// Ends every local job with no progress for `stall_timeout`. Returns how many.
    pub fn reap_stalled(&self) -> usize {
        let limit = self.inner.config.stall_timeout;
        let mut n = 0;
        for (id, live) in self.inner.live.lock().iter() {
            if live.last_progress.lock().elapsed() >= limit && !live.cancel.is_cancelled() {
                tracing::warn!(stream_id = %id, "job stalled; ending it");
                live.reason.lock().get_or_insert(EndReason::Stalled);
                live.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    /// Ends running jobs that nobody generates (their owner replica died, or their task
    /// gave up during a store outage). For each: claim its end (one reaper wins; from
    /// then on only it may append), re-read the log (appends that landed before the
    /// claim may not have reached this replica's mirror yet), bill the call the owner
    /// was in when it died, save the partial answer, then append `error`
    /// (`replica_lost` / `store_unavailable`) through the same atomic append as
    /// everything else. A failure ends only that orphan's attempt; the claim stays
    /// ours and the next sweep retries it. Returns how many this call ended.
    pub async fn reap_orphans(&self) -> Result<usize, EngineError> {
        let live: std::collections::HashSet<String> =
            self.inner.live.lock().keys().cloned().collect();
        let orphans = self.inner.store.orphaned_jobs(&live).await?;
        let mut ended = 0;
        for orphan in orphans {
            let stream_id = orphan.meta.stream_id.clone();
            match self.reap_orphan(orphan).await {
                Ok(true) => ended += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    stream_id = %stream_id, error = %e,
                    "could not end an orphaned job; the next sweep retries"
                ),
            }
        }
        Ok(ended)
    }

    /// Ends one orphan; false if another reaper (or its owner) ends it.
    async fn reap_orphan(&self, orphan: crate::store::Orphan) -> Result<bool, EngineError> {
        let store = &self.inner.store;
        let meta = orphan.meta;
        let sid = meta.stream_id.as_str();
        // A job started after the snapshot above is live by now (a live slot is taken
        // before the job is created), so re-check before ending it.
        if orphan.reason == crate::store::OrphanReason::Abandoned
            && self.inner.live.lock().contains_key(sid)
        {
            return Ok(false);
        }
        // One writer: the claim decides who saves the partial answer.
        if !store.claim_orphan(sid).await? {
            return Ok(false);
        }
        let Some(log) = store.open_log(sid).await? else {
            return Ok(false);
        };
        // Nobody else appends now, so after this read the mirror is the whole log.
        store.sync_log(sid).await?;
        if log.terminal().is_some() {
            return Ok(false);
        }
        let (code, message) = match orphan.reason {
            crate::store::OrphanReason::ReplicaLost => (
                "replica_lost",
                "the replica running this generation stopped".to_string(),
            ),
            crate::store::OrphanReason::Abandoned => (
                "store_unavailable",
                "the job store was unreachable for too long".to_string(),
            ),
        };
        // A job whose owner died before its `created` event has no answer and maybe no
        // saved user message: end its log, save nothing.
        let response_message = if log.with_aggregate(|a| a.created().is_some()) {
            // The call the owner was in reported no usage: estimate it and append it
            // as a `usage` event first, so the log and the ledger agree.
            if let Some(record) = self.estimate_cut_off_call(&meta, &log).await? {
                match store
                    .append(sid, &EventBody::Usage(record), Some(log.len()))
                    .await
                {
                    Ok(_) => store.sync_log(sid).await?,
                    Err(StoreError::Append(_)) => return Ok(false),
                    Err(e) => return Err(e.into()),
                }
            }
            let model = self.inner.models.iter().find(|m| m.name == meta.model);
            let records = log.with_aggregate(|agg| agg.usage().to_vec());
            spend_usage(
                &self.inner,
                &meta,
                model.and_then(|m| m.pricing).as_ref(),
                &records,
                SpendContext::ReplicaLost,
            )
            .await?;
            let partial = log.with_aggregate(|agg| {
                let content = agg.content();
                Message {
                    message_id: meta.response_message_id.clone(),
                    conversation_id: meta.conversation_id.clone(),
                    parent_message_id: Some(meta.user_message_id.clone()),
                    sender: meta.model.clone(),
                    text: text_of(&content),
                    content,
                    is_created_by_user: false,
                    model: Some(meta.model.clone()),
                    unfinished: true,
                    error: true,
                    created_at: now_rfc3339(),
                }
            });
            // Saved before the terminal event, as on every other path.
            self.inner.db.save_message(&partial).await?;
            Some(partial)
        } else {
            None
        };
        let end = EventBody::Error(ErrorEvent {
            code: code.into(),
            message,
            response_message,
        });
        match store.append(sid, &end, Some(log.len())).await {
            Ok(_) => {
                tracing::warn!(stream_id = %sid, code, "ended an orphaned job");
                Ok(true)
            }
            Err(StoreError::Append(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The usage of the model call the owner was in when it died, estimated from shared
    /// state the way [`super::run::JobRun`] estimates a call cut off before the
    /// upstream reported usage: output = what that call streamed (its own run steps'
    /// text, reasoning and tool arguments), input = the prompt it was sent (the
    /// persisted history up to the user message, as [`history_to`] builds it, plus the
    /// earlier calls' assistant turns and tool results). A call that died before its
    /// first delta gets the input estimate alone. The system prompt is not in shared
    /// state and is not counted. `None` when the owner was not in a call (between a
    /// call's usage and its tools' results, or after the last call).
    async fn estimate_cut_off_call(
        &self,
        meta: &JobMeta,
        log: &EventLog,
    ) -> Result<Option<UsageRecord>, EngineError> {
        let events: Vec<crate::event::Event> = log
            .read_after(None, usize::MAX)
            .frames
            .iter()
            .filter_map(|f| serde_json::from_slice(f.data_json()).ok())
            .collect();
        let calls = CallFold::of(&events);
        let Some(cut) = calls.cut_off_call(self.inner.config.max_tool_iterations) else {
            return Ok(None);
        };
        let history = self.inner.db.list_messages(&meta.conversation_id).await?;
        let mut prompt = history_to(&history, Some(&meta.user_message_id));
        if prompt.is_empty()
            && let Some(c) = log.with_aggregate(|a| a.created().cloned())
        {
            prompt.push(ChatMessage {
                role: Role::User,
                text: c.user_message.text,
                tool_calls: Vec::new(),
                tool_call_id: None,
                reasoning: Vec::new(),
            });
        }
        prompt.extend(calls.turns_before(cut));
        let mut input = String::new();
        for m in &prompt {
            input.push_str(&m.text);
            for c in &m.tool_calls {
                input.push_str(&c.args);
                input.push_str(c.output.as_deref().unwrap_or(""));
            }
        }
        let entry = self.inner.models.iter().find(|m| m.name == meta.model);
        let upstream = entry.and_then(|m| m.provider.upstream_model());
        Ok(Some(UsageRecord {
            call_index: cut,
            model: meta.model.clone(),
            provider: entry
                .map(|m| m.provider.name().to_string())
                .unwrap_or_default(),
            input_tokens: crate::usage::count_tokens(upstream, input).await,
            output_tokens: crate::usage::count_tokens(upstream, calls.output_of(cut)).await,
            estimated: true,
            ..UsageRecord::default()
        }))
    }

    /// Stops accepting jobs; new chats get `ShuttingDown` from now on.
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
    }

    /// Graceful shutdown (SPEC §5): stop accepting, let running jobs finish within
    /// `grace`, then abort the rest (partial answers saved, terminal events appended)
    /// and wait for them to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop_accepting();
        self.inner.stop.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_err()
        {
            let live: Vec<String> = {
                let map = self.inner.live.lock();
                for l in map.values() {
                    l.reason.lock().get_or_insert(EndReason::Shutdown);
                    l.cancel.cancel();
                }
                map.keys().cloned().collect()
            };
            tracing::info!(
                jobs = live.len(),
                "grace period over; aborting running jobs"
            );
            self.inner.tracker.wait().await;
        }
    }

    /// Resolves when every job task (and the reaper) has ended; for tests.
    pub async fn wait_idle(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        self.inner.tracker.reopen();
    }
}

/// A job's log folded per model call, for the reaper's usage estimate: which call each
/// live run step belongs to (its `runId` is `streamId:call`), what each streamed, and
/// which calls reported usage.
#[derive(Default, Debug)]
pub(super) struct CallFold {
    /// Live steps in log order: (step id, call, kind, text streamed, tool call).
    steps: Vec<FoldStep>,
    /// Calls that have a usage record.
    with_usage: std::collections::BTreeSet<u32>,
    /// Highest call index seen in any step or usage record, discarded ones included.
    max_call: Option<u32>,
    /// The last event's name.
    last: Option<&'static str>,
}

#[derive(Debug)]
struct FoldStep {
    id: String,
    call: u32,
    /// Text of a text part (what goes back upstream as the assistant turn).
    text: String,
    /// Everything the step streamed: text, reasoning, tool arguments.
    streamed: String,
    tool: Option<ToolCall>,
    completed: bool,
}

impl CallFold {
    pub(super) fn of(events: &[crate::event::Event]) -> CallFold {
        let mut f = CallFold::default();
        for e in events {
            f.last = Some(e.body.name());
            match &e.body {
                EventBody::RunStep(s) => {
                    let Some(call) = s.run_id.rsplit(':').next().and_then(|c| c.parse().ok())
                    else {
                        continue;
                    };
                    f.max_call = f.max_call.max(Some(call));
                    let tool = match &s.step_details {
                        StepDetails::ToolCalls { tool_calls } => {
                            Some(tool_calls.first().cloned().unwrap_or_default())
                        }
                        StepDetails::MessageCreation { .. } => None,
                    };
                    f.steps.push(FoldStep {
                        id: s.id.clone(),
                        call,
                        text: String::new(),
                        streamed: String::new(),
                        tool,
                        completed: false,
                    });
                }
                EventBody::MessageDelta(d) | EventBody::ReasoningDelta(d) => {
                    if let Some(step) = f.step(&d.id) {
                        for part in &d.delta.content {
                            match part {
                                crate::event::ContentPart::Text { text } => {
                                    step.text.push_str(text);
                                    step.streamed.push_str(text);
                                }
                                crate::event::ContentPart::Think { think, .. } => {
                                    step.streamed.push_str(think)
                                }
                                crate::event::ContentPart::ToolCall { .. }
                                | crate::event::ContentPart::RedactedThinking { .. } => {}
                            }
                        }
                    }
                }
                EventBody::RunStepDelta(d) => {
                    if let Some(step) = f.step(&d.id) {
                        for chunk in &d.delta.tool_calls {
                            step.streamed.push_str(&chunk.args);
                            if let Some(t) = step.tool.as_mut() {
                                t.args.push_str(&chunk.args);
                            }
                        }
                    }
                }
                EventBody::RunStepCompleted(c) => {
                    if let Some(step) = f.step(&c.result.id) {
                        step.tool = Some(c.result.tool_call.clone());
                        step.completed = true;
                    }
                }
                EventBody::Retry(r) => f.steps.retain(|s| !r.discard_step_ids.contains(&s.id)),
                EventBody::Usage(u) => {
                    f.with_usage.insert(u.call_index);
                    f.max_call = f.max_call.max(Some(u.call_index));
                }
                _ => {}
            }
        }
        f
    }

    fn step(&mut self, id: &str) -> Option<&mut FoldStep> {
        self.steps.iter_mut().rev().find(|s| s.id == id)
    }

    /// The call the owner was in when the log stops, if any: one that streamed but
    /// reported no usage; else the next one, if the log shows it had begun (nothing
    /// streamed yet; after a `retry`, or after the last call's tool results while
    /// model calls remain); else none.
    pub(super) fn cut_off_call(&self, max_tool_iterations: u32) -> Option<u32> {
        if let Some(call) = self
            .steps
            .iter()
            .map(|s| s.call)
            .filter(|c| !self.with_usage.contains(c))
            .max()
        {
            return Some(call);
        }
        let Some(last_call) = self.max_call else {
            return Some(0); // the first call, before its first delta
        };
        let next = last_call + 1;
        let tool_rounds = self
            .steps
            .iter()
            .filter(|s| s.tool.is_some())
            .map(|s| s.call)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u32;
        let began = match self.last {
            Some("retry") => true,
            Some("on_run_step_completed") => {
                let tools: Vec<&FoldStep> = self
                    .steps
                    .iter()
                    .filter(|s| s.call == last_call && s.tool.is_some())
                    .collect();
                !tools.is_empty()
                    && tools.iter().all(|s| s.completed)
                    && tool_rounds < max_tool_iterations.max(1)
            }
            _ => false,
        };
        began.then_some(next)
    }

    /// The assistant turns (with tool results) of the calls before `call`, as the
    /// owner added them to the request after each tool round.
    pub(super) fn turns_before(&self, call: u32) -> Vec<ChatMessage> {
        let mut turns: std::collections::BTreeMap<u32, ChatMessage> = Default::default();
        for s in self.steps.iter().filter(|s| s.call < call) {
            let turn = turns.entry(s.call).or_insert_with(|| ChatMessage {
                role: Role::Assistant,
                text: String::new(),
                tool_calls: Vec::new(),
                tool_call_id: None,
                reasoning: Vec::new(),
            });
            turn.text.push_str(&s.text);
            if let Some(t) = &s.tool {
                turn.tool_calls.push(t.clone());
            }
        }
        // Only tool rounds were sent back upstream; a call answered without tools
        // ended the job.
        turns
            .into_values()
            .filter(|t| !t.tool_calls.is_empty())
            .collect()
    }

    /// Everything `call` streamed.
    pub(super) fn output_of(&self, call: u32) -> String {
        self.steps
            .iter()
            .filter(|s| s.call == call)
            .map(|s| s.streamed.as_str())
            .collect()
    }
}
