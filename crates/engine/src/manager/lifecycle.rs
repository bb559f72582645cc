//! The background sweeps (stalled jobs, orphans of dead replicas, expired logs) and
//! graceful shutdown.

use super::ending::{Ending, conclude, estimate_usage};
use super::*;

impl JobManager {
    /// Starts the background reaper: every `reap_interval` it ends stalled jobs and
    /// drops logs past retention. Runs until [`JobManager::shutdown`].
    pub fn spawn_reaper(&self) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut tick = tokio::time::interval(this.inner.ctx.config.reap_interval);
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
                    .ctx
                    .store
                    .remove_expired(this.inner.ctx.config.retention)
                    .await
                {
                    tracing::warn!(error = %e, "retention sweep failed");
                }
            }
        });
    }

    /// Ends every local job with no progress for `stall_timeout`. Returns how many.
    pub fn reap_stalled(&self) -> usize {
        let limit = self.inner.ctx.config.stall_timeout;
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
        let orphans = self.inner.ctx.store.orphaned_jobs(&live).await?;
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
        let ctx = &self.inner.ctx;
        let store = &ctx.store;
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
        let end = if log.with_aggregate(|a| a.created().is_some()) {
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
            let title = ctx
                .db
                .get_conversation(&meta.conversation_id)
                .await?
                .map(|c| c.title)
                .unwrap_or_default();
            // The same ending as the owner's: cancelled results for open tool calls,
            // the message saved into its conversation before the terminal event.
            let aggregate = log.with_aggregate(|a| a.clone());
            conclude(
                ctx,
                &meta,
                &title,
                model.and_then(|m| m.pricing).as_ref(),
                &aggregate,
                Ending::Orphaned { code, message },
            )
            .await?
        } else {
            EventBody::Error(ErrorEvent {
                code: code.into(),
                message,
                response_message: None,
            })
        };
        match store.append(sid, &end, Some(log.len())).await {
            Ok(_) => {
                tracing::warn!(stream_id = %sid, code, "ended an orphaned job");
                crate::metrics::finished(&end);
                super::ending::announce_end(ctx, &meta, &end);
                Ok(true)
            }
            Err(StoreError::Append(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The usage of the model call the owner was in when it died, estimated from shared
    /// state by the same [`estimate_usage`] the owner uses for a call cut off before
    /// the upstream reported usage: output = what that call streamed (its own run
    /// steps' text, reasoning and tool arguments, [`Aggregate::output_of`]), input =
    /// the prompt it was sent (the persisted history up to the user message, as
    /// [`history_to`] builds it, plus the earlier calls' assistant turns and tool
    /// results, [`Aggregate::turns_before`]). A call that died before its first delta
    /// gets the input estimate alone. The system prompt is not in shared state and is
    /// not counted. `None` when the owner was not in a call
    /// ([`Aggregate::cut_off_call`]).
    async fn estimate_cut_off_call(
        &self,
        meta: &JobMeta,
        log: &EventLog,
    ) -> Result<Option<UsageRecord>, EngineError> {
        let max_calls = self.inner.ctx.config.max_tool_iterations;
        let Some((cut, turns, output, created)) = log.with_aggregate(|a| {
            a.cut_off_call(max_calls).map(|cut| {
                (
                    cut,
                    a.turns_before(cut),
                    a.output_of(cut),
                    a.created().cloned(),
                )
            })
        }) else {
            return Ok(None);
        };
        let history = self
            .inner
            .ctx
            .db
            .list_messages(&meta.conversation_id)
            .await?;
        let mut prompt = history_to(&history, Some(&meta.user_message_id));
        if prompt.is_empty()
            && let Some(c) = created
        {
            prompt.push(ChatMessage {
                role: Role::User,
                text: c.user_message.text,
                tool_calls: Vec::new(),
                tool_call_id: None,
                reasoning: Vec::new(),
            });
        }
        prompt.extend(turns);
        let entry = self.inner.models.iter().find(|m| m.name == meta.model);
        Ok(Some(
            estimate_usage(&meta.model, entry, cut, None, &prompt, output).await,
        ))
    }

    /// Stops accepting jobs; new chats get `ShuttingDown` from now on.
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
    }

    /// Graceful shutdown (docs/protocol.md §5): stop accepting, let running jobs finish within
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
