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
    /// gave up during a store outage): saves the partial answer from the log, then
    /// appends `error` (`replica_lost` / `store_unavailable`) through the same atomic
    /// append as everything else, so when several replicas reap at once exactly one
    /// terminal event results. Returns how many this call ended.
    pub async fn reap_orphans(&self) -> Result<usize, EngineError> {
        let live: std::collections::HashSet<String> =
            self.inner.live.lock().keys().cloned().collect();
        let orphans = self.inner.store.orphaned_jobs(&live).await?;
        let mut ended = 0;
        for orphan in orphans {
            let meta = orphan.meta;
            // A job started after the snapshot above is live by now (a live slot is
            // taken before the job is created), so re-check before ending it.
            if orphan.reason == crate::store::OrphanReason::Abandoned
                && self.inner.live.lock().contains_key(&meta.stream_id)
            {
                continue;
            }
            let Some(log) = self.inner.store.open_log(&meta.stream_id).await? else {
                continue;
            };
            // One reaper only: the claim decides who saves the partial answer.
            if !self.inner.store.claim_orphan(&meta.stream_id).await? {
                continue;
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
            // The call the owner was in when it died reported no usage: estimate it
            // from what it streamed, so the reaper spends it too.
            let (mut records, cut_off) = log.with_aggregate(|agg| {
                let records = agg.usage().to_vec();
                let last_call = agg
                    .run_steps()
                    .iter()
                    .filter_map(|s| s.run_id.rsplit(':').next()?.parse::<u32>().ok())
                    .max();
                let cut_off = last_call
                    .filter(|c| !records.iter().any(|r| r.call_index == *c))
                    .map(|c| (c, agg.text()));
                (records, cut_off)
            });
            let entry = self.inner.models.iter().find(|m| m.name == meta.model);
            if let Some((call, text)) = cut_off {
                let upstream = entry.and_then(|m| m.provider.upstream_model());
                records.push(UsageRecord {
                    call_index: call,
                    model: meta.model.clone(),
                    output_tokens: crate::usage::count_tokens(upstream, text).await,
                    estimated: true,
                    ..UsageRecord::default()
                });
            }
            let pricing = self
                .inner
                .models
                .iter()
                .find(|m| m.name == meta.model)
                .and_then(|m| m.pricing);
            spend_usage(
                &self.inner,
                &meta,
                pricing.as_ref(),
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
            let end = EventBody::Error(ErrorEvent {
                code: code.into(),
                message,
                response_message: Some(partial),
            });
            if let Ok(_seq) = self.inner.store.append(&meta.stream_id, &end, None).await? {
                tracing::warn!(stream_id = %meta.stream_id, code, "ended an orphaned job");
                ended += 1;
            }
        }
        Ok(ended)
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
