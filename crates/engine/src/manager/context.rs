//! What a job's task and the reaper need of the manager, and nothing more: the job
//! store, the database, the tools and the settings, with the writes that ride out an
//! outage of either (appends, the end claim, spends).

use super::*;

/// The narrow context a job's task runs in, shared (`Arc`) by the manager, every job
/// task and the reaper. It holds no job state: each task owns its own.
pub(super) struct JobContext {
    pub(super) store: Arc<dyn JobStore>,
    pub(super) db: Arc<dyn Persistence>,
    pub(super) tools: crate::tools::ToolRegistry,
    pub(super) config: ManagerConfig,
    /// Told of every job this replica ends ([`JobManager::set_end_hook`]).
    pub(super) end_hook: std::sync::OnceLock<Arc<dyn super::EndHook>>,
}

impl JobContext {
    /// Appends through the store, riding out a store outage of up to
    /// `store_outage_grace` with backoff. The expected seq makes a retry whose first
    /// try did land a no-op, so an outage never duplicates an event.
    ///
    /// Errors: as [`EventLogStore::append`](crate::store::EventLogStore::append), once
    /// the grace is used up.
    pub(super) async fn append(
        &self,
        stream_id: &str,
        body: &EventBody,
        expected: u64,
    ) -> Result<u64, StoreError> {
        use backon::Retryable;
        let began = std::time::Instant::now();
        let appended = (|| self.store.append(stream_id, body, Some(expected)))
            .retry(outage_backoff(self.config.store_outage_grace))
            .sleep(tokio::time::sleep)
            .when(StoreError::is_unavailable)
            .notify(|e, wait| {
                tracing::warn!(stream_id, error = %e, ?wait, "append failed; retrying");
            })
            .await;
        if appended.is_ok() {
            crate::metrics::appended(body, began.elapsed());
        }
        appended
    }

    /// Appends a batch through the store
    /// ([`EventLogStore::append_batch`](crate::store::EventLogStore::append_batch)),
    /// riding out an outage like [`JobContext::append`]: a retry whose earlier try
    /// landed (whole or in part) appends only what had not. `queued_at[i]` is when the
    /// job emitted `bodies[i]`; the append-duration metric counts from then, so it
    /// includes the wait behind the call in flight.
    ///
    /// Errors: as `append_batch`, once the grace is used up.
    pub(super) async fn append_batch(
        &self,
        stream_id: &str,
        bodies: &[EventBody],
        queued_at: &[Instant],
        expected: u64,
    ) -> Result<crate::store::Appended, StoreError> {
        use backon::Retryable;
        let appended = (|| self.store.append_batch(stream_id, bodies, Some(expected)))
            .retry(outage_backoff(self.config.store_outage_grace))
            .sleep(tokio::time::sleep)
            .when(StoreError::is_unavailable)
            .notify(|e, wait| {
                tracing::warn!(stream_id, error = %e, ?wait, "append failed; retrying");
            })
            .await;
        if let Ok(a) = &appended {
            for (body, at) in bodies.iter().zip(queued_at).take(a.count) {
                crate::metrics::appended(body, at.elapsed());
            }
        }
        appended
    }

    /// [`JobCoordination::claim_end`](crate::store::JobCoordination::claim_end), riding
    /// out a store outage like [`JobContext::append`].
    pub(super) async fn claim_end(&self, stream_id: &str) -> Result<bool, StoreError> {
        use backon::Retryable;
        (|| self.store.claim_end(stream_id))
            .retry(outage_backoff(self.config.store_outage_grace))
            .sleep(tokio::time::sleep)
            .when(StoreError::is_unavailable)
            .notify(|e, wait| {
                tracing::warn!(stream_id, error = %e, ?wait, "end claim failed; retrying");
            })
            .await
    }

    /// Prices the job's usage records and spends them (exactly once, by the database's
    /// unique key); returns the totals with the job's whole cost in credits.
    ///
    /// A database failure is retried with backoff (50 ms doubling to 2 s, jittered)
    /// for up to `store_outage_grace` in all: the spend is keyed by (job, model call,
    /// token type), so a retry of a spend that did land, its answer lost, charges
    /// nothing more. Errors: the last [`EngineError::Persistence`] once the grace is
    /// used up; any other error at once (e.g. a line that does not fit the ledger).
    pub(super) async fn spend_usage(
        &self,
        meta: &JobMeta,
        pricing: Option<&crate::billing::Pricing>,
        records: &[UsageRecord],
        context: SpendContext,
    ) -> Result<UsageTotals, EngineError> {
        use backon::Retryable;
        let lines: Vec<crate::ledger::Line> = records
            .iter()
            .flat_map(|r| crate::billing::price(r, pricing))
            .collect();
        let total: i64 = lines.iter().map(|l| l.amount_micro).sum();
        let mut totals = UsageTotals::default();
        for r in records {
            totals.add(r);
        }
        totals.credits = crate::billing::credits(total);
        if lines.is_empty() {
            crate::metrics::spent(&meta.model, &totals, 0);
            return Ok(totals);
        }
        let req = crate::persist::SpendRequest {
            user_id: meta.user_id.clone(),
            conversation_id: meta.conversation_id.clone(),
            stream_id: meta.stream_id.clone(),
            message_id: meta.response_message_id.clone(),
            model: meta.model.clone(),
            context,
            lines,
            created_at: now_rfc3339(),
        };
        (|| self.db.spend(&req))
            .retry(outage_backoff(self.config.store_outage_grace))
            .sleep(tokio::time::sleep)
            .when(|e| matches!(e, EngineError::Persistence(_)))
            .notify(|e, wait| {
                tracing::warn!(stream_id = %meta.stream_id, error = %e, ?wait, "spend failed; retrying");
            })
            .await?;
        crate::metrics::spent(&meta.model, &totals, total);
        Ok(totals)
    }
}

/// How a job's own writes (appends, its end claim, spends) ride out an outage of the
/// job store or the database: 50 ms doubling to 2 s, jittered, for at most `grace` of
/// waiting in all. Every such write is idempotent (an expected seq, a claim its holder
/// may retake, a unique ledger key), so a retry whose first try landed is harmless.
fn outage_backoff(grace: Duration) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(grace))
}
