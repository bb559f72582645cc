//! The job manager: starts jobs, runs each in a tracked background task, aborts them,
//! reaps stalled ones, drops expired logs and shuts down gracefully (SPEC §4, §5).
//!
//! One task per job is the *single writer* of that job's log and response message, so
//! there is never a race between two writers of the same message (LESSONS: "Stop wrote
//! the partial message twice"). Abort, the stall reaper and shutdown do not write: they
//! set an [`EndReason`] and cancel the job's token; the job task saves the partial
//! answer and then appends the terminal event, and the abort route answers only once
//! that terminal event is in the log — which is after the message was saved.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::EngineError;
use crate::aggregate::{Aggregate, ResumeState, text_of};
use crate::event::{
    ConversationRef, Created, Delta, DeltaContent, ErrorEvent, EventBody, Final, FinalStatus,
    Message, MessageCreation, RunStep, RunStepDelta, StepDetails, StepType, ToolCall,
    ToolCallChunk, ToolCallsDelta,
};
use crate::log::{AppendError, EventLog};
use crate::persist::{Conversation, Persistence, SpendContext};
use crate::provider::{ChatMessage, ModelRequest, Provider, ProviderError, ProviderEvent, Role};
use crate::store::{JobMeta, JobStatus, JobStore};
use crate::usage::{UsageRecord, UsageTotals};
use crate::{new_id, now_rfc3339};

/// Timing and capacity settings of the manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// How long a finished log stays readable. Default 1 h.
    pub retention: Duration,
    /// A running job with no appended event for this long ends with `stalled`.
    /// Default 10 min.
    pub stall_timeout: Duration,
    /// Live (running) jobs this replica accepts; more → `server_busy`. Default 1,000.
    pub max_live_jobs: usize,
    /// How often the reaper looks for stalled and expired jobs. Default 5 s.
    pub reap_interval: Duration,
    /// How long an abort waits for the owner to end the job. Default 10 s.
    pub abort_wait: Duration,
    /// How long a job rides out a job-store outage (appends retried with backoff)
    /// before it gives up; the reaper then ends it once the store is back. Default 30 s.
    pub store_outage_grace: Duration,
    /// Model calls per job at most; a job whose last allowed call still asks for
    /// tools ends with `final` `reason: "max_tool_iterations"`. Default 10.
    pub max_tool_iterations: u32,
    /// Rate limits on starting chats; `None` turns one off.
    pub limits: RateLimits,
    /// Balances; `None` turns them off (nobody is refused for money).
    pub balance: Option<BalancePolicy>,
}

/// Message rate limits (GCRA: a burst of the limit, then evenly spread), shared by all
/// replicas through the job store. Off by default in the engine; the server's
/// `[limits]` defaults to 40 per minute per user and per IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub per_user: Option<u32>,
    pub per_ip: Option<u32>,
    /// The window the limits count in. Default 60 s.
    pub period: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_user: None,
            per_ip: None,
            period: Duration::from_secs(60),
        }
    }
}

/// Balance rules: new users start with `start_micro`; every `refill_interval` the
/// balance gains `refill_micro`; a chat needs a positive balance (else 402).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalancePolicy {
    pub start_micro: i64,
    pub refill_micro: i64,
    /// `None`: no refill.
    pub refill_interval: Option<Duration>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            retention: Duration::from_secs(3600),
            stall_timeout: Duration::from_secs(600),
            max_live_jobs: 1000,
            reap_interval: Duration::from_secs(5),
            abort_wait: Duration::from_secs(10),
            store_outage_grace: Duration::from_secs(30),
            max_tool_iterations: 10,
            limits: RateLimits::default(),
            balance: None,
        }
    }
}

/// A model clients can select.
#[derive(Clone)]
pub struct ModelEntry {
    /// The name clients send as `model`; also the response's `sender`.
    pub name: String,
    pub provider: Arc<dyn Provider>,
    /// Retry policy of its provider.
    pub retry: crate::retry::RetryPolicy,
    /// Timeouts of its provider.
    pub timeouts: crate::retry::Timeouts,
    /// Tools it may use (names in the registry); a request may narrow them.
    pub tools: Vec<String>,
    /// Prices; `None` costs nothing (usage is still recorded).
    pub pricing: Option<crate::billing::Pricing>,
}

impl ModelEntry {
    /// A model with the default retry policy and timeouts and no tools.
    pub fn new(name: &str, provider: Arc<dyn Provider>) -> Self {
        ModelEntry {
            name: name.to_string(),
            provider,
            retry: Default::default(),
            timeouts: Default::default(),
            tools: Vec::new(),
            pricing: None,
        }
    }
}

/// Why a job was stopped from outside its task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// `POST /api/chat/abort`.
    Abort,
    /// The stall reaper.
    Stalled,
    /// Graceful shutdown ran out of grace.
    Shutdown,
}

/// The body of `POST /api/chat`, validated.
#[derive(Clone, Debug, Default)]
pub struct StartRequest {
    pub user_id: String,
    pub text: String,
    /// `None` or `"new"` starts a conversation.
    pub conversation_id: Option<String>,
    /// `None` continues from the conversation's latest message.
    pub parent_message_id: Option<String>,
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    pub tools: Vec<String>,
    /// The client's address, for the per-IP rate limit.
    pub client_ip: Option<String>,
}

/// The answer to a started chat.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub stream_id: String,
    pub conversation_id: String,
    pub user_message_id: String,
    pub response_message_id: String,
}

/// The answer to an abort: the partial answer as saved and the usage collected.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortOutcome {
    pub stream_id: String,
    pub response_message: Message,
    pub usage: UsageTotals,
}

struct LiveJob {
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<EndReason>>>,
    last_progress: Arc<Mutex<Instant>>,
}

struct Inner {
    store: Arc<dyn JobStore>,
    db: Arc<dyn Persistence>,
    models: Vec<ModelEntry>,
    tools: crate::tools::ToolRegistry,
    config: ManagerConfig,
    tracker: TaskTracker,
    live: Mutex<HashMap<String, LiveJob>>,
    accepting: AtomicBool,
    /// Stops the background reaper.
    stop: CancellationToken,
}

/// Runs generation jobs. Cheap to clone.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

impl JobManager {
    /// A manager over `store` and `db` serving `models` (the first is the default).
    /// Call [`JobManager::spawn_reaper`] once to start the stall and retention reaper.
    pub fn new(
        store: Arc<dyn JobStore>,
        db: Arc<dyn Persistence>,
        models: Vec<ModelEntry>,
        config: ManagerConfig,
    ) -> Self {
        Self::with_tools(store, db, models, crate::tools::ToolRegistry::new(), config)
    }

    /// [`JobManager::new`] with the tools models may call.
    pub fn with_tools(
        store: Arc<dyn JobStore>,
        db: Arc<dyn Persistence>,
        models: Vec<ModelEntry>,
        tools: crate::tools::ToolRegistry,
        config: ManagerConfig,
    ) -> Self {
        let inner = Arc::new(Inner {
            store,
            db,
            models,
            tools,
            config,
            tracker: TaskTracker::new(),
            live: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            stop: CancellationToken::new(),
        });
        // The token counter for usage estimates is slow to build: build it off the
        // runtime's workers, once.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn_blocking(crate::usage::warm_token_counter));
        }
        // Abort requests from other replicas cancel our local job, if we run it. Weak:
        // the store must not keep the manager alive.
        let weak = Arc::downgrade(&inner);
        inner
            .store
            .set_abort_handler(Arc::new(move |stream_id: &str| {
                if let Some(inner) = weak.upgrade() {
                    cancel_local(&inner, stream_id, EndReason::Abort);
                }
            }));
        JobManager { inner }
    }

    /// The job store.
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.inner.store
    }

    /// The database.
    pub fn db(&self) -> &Arc<dyn Persistence> {
        &self.inner.db
    }

    /// The configured models, default first.
    pub fn models(&self) -> &[ModelEntry] {
        &self.inner.models
    }

    /// The balance rules, if balances are on.
    pub fn balance_policy(&self) -> Option<BalancePolicy> {
        self.inner.config.balance
    }

    /// Number of jobs running on this replica.
    pub fn live_jobs(&self) -> usize {
        self.inner.live.lock().len()
    }

    /// Starts a job: validates, reserves the conversation, saves the user message,
    /// appends `created` (seq 0) and spawns the generation — in that order, so the
    /// user message exists before anything can refer to it.
    ///
    /// Errors: `BadRequest` (text, model, parentMessageId), `NotFound`/`Forbidden` for
    /// the conversation, `ConversationBusy`, `ServerBusy`, `ShuttingDown`, and store or
    /// database failures.
    pub async fn start(&self, req: StartRequest) -> Result<Started, EngineError> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        if req.text.trim().is_empty() {
            return Err(EngineError::bad_request("text", "must not be empty"));
        }
        self.check_rate_limits(&req).await?;
        self.check_balance(&req.user_id).await?;
        let model = match &req.model {
            None => inner.models.first(),
            Some(name) => inner.models.iter().find(|m| &m.name == name),
        }
        .cloned()
        .ok_or_else(|| {
            EngineError::bad_request(
                "model",
                format!(
                    "unknown model {:?}; known: {}",
                    req.model.as_deref().unwrap_or(""),
                    inner
                        .models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;

        // Tools: the request may narrow the model's set, never widen it.
        let tools = if req.tools.is_empty() {
            model.tools.clone()
        } else {
            for t in &req.tools {
                if !model.tools.contains(t) {
                    return Err(EngineError::bad_request(
                        "tools",
                        format!(
                            "model {:?} may not use tool {t:?}; it may use: [{}]",
                            model.name,
                            model.tools.join(", ")
                        ),
                    ));
                }
            }
            req.tools.clone()
        };

        // The conversation: new, or the caller's own.
        let existing = match req.conversation_id.as_deref() {
            None | Some("new") | Some("") => None,
            Some(id) => match inner.db.get_conversation(id).await? {
                None => return Err(EngineError::NotFound(format!("conversation {id}"))),
                Some(c) if c.user_id != req.user_id => {
                    return Err(EngineError::Forbidden(format!("conversation {id}")));
                }
                Some(c) => Some(c),
            },
        };
        let conversation_id = existing
            .as_ref()
            .map_or_else(new_id, |c| c.conversation_id.clone());
        let history = match &existing {
            Some(_) => inner.db.list_messages(&conversation_id).await?,
            None => Vec::new(),
        };
        let parent_message_id = match &req.parent_message_id {
            Some(p) if !p.is_empty() => {
                if !history.iter().any(|m| &m.message_id == p) {
                    return Err(EngineError::bad_request(
                        "parentMessageId",
                        format!("no message {p} in this conversation"),
                    ));
                }
                Some(p.clone())
            }
            _ => history.last().map(|m| m.message_id.clone()),
        };

        let stream_id = new_id();
        let created_at = now_rfc3339();
        let user_message = Message {
            message_id: new_id(),
            conversation_id: conversation_id.clone(),
            parent_message_id: parent_message_id.clone(),
            sender: "User".into(),
            text: req.text.clone(),
            content: Vec::new(),
            is_created_by_user: true,
            model: None,
            unfinished: false,
            error: false,
            created_at: created_at.clone(),
        };
        let meta = JobMeta {
            stream_id: stream_id.clone(),
            user_id: req.user_id.clone(),
            conversation_id: conversation_id.clone(),
            user_message_id: user_message.message_id.clone(),
            response_message_id: new_id(),
            model: model.name.clone(),
            status: JobStatus::Running,
            created_at: created_at.clone(),
        };

        // Reserve a live slot first (never evicting a running job), then the
        // conversation; undo the slot if the conversation is busy.
        let live = LiveJob {
            cancel: CancellationToken::new(),
            reason: Arc::new(Mutex::new(None)),
            last_progress: Arc::new(Mutex::new(Instant::now())),
        };
        let (cancel, reason, last_progress) = (
            live.cancel.clone(),
            live.reason.clone(),
            live.last_progress.clone(),
        );
        {
            let mut map = inner.live.lock();
            if map.len() >= inner.config.max_live_jobs {
                return Err(EngineError::ServerBusy(inner.config.max_live_jobs));
            }
            map.insert(stream_id.clone(), live);
        }
        if let Err(e) = inner.store.create_job(&meta).await {
            inner.live.lock().remove(&stream_id);
            return Err(e);
        }

        let title = match &existing {
            Some(c) => c.title.clone(),
            None => title_of(&req.text),
        };
        let saved = async {
            inner
                .db
                .save_conversation(&Conversation {
                    conversation_id: conversation_id.clone(),
                    user_id: req.user_id.clone(),
                    title: title.clone(),
                    created_at: created_at.clone(),
                    updated_at: created_at.clone(),
                })
                .await?;
            inner.db.save_message(&user_message).await
        }
        .await;
        let created = EventBody::Created(Created {
            stream_id: stream_id.clone(),
            conversation_id: conversation_id.clone(),
            user_message: user_message.clone(),
            response_message_id: meta.response_message_id.clone(),
            model: model.name.clone(),
            sender: model.name.clone(),
            created_at: created_at.clone(),
        });
        let appended = match saved {
            Ok(()) => inner.store.append(&stream_id, &created, Some(0)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = appended.and_then(|r| {
            r.map(|_| ())
                .map_err(|e| EngineError::Internal(format!("append created: {e}")))
        }) {
            // Leave no job stuck `running`: end the log so the conversation is free.
            let _ = inner
                .store
                .append(
                    &stream_id,
                    &EventBody::Error(ErrorEvent {
                        code: "internal".into(),
                        message: e.to_string(),
                        response_message: None,
                    }),
                    None,
                )
                .await;
            inner.live.lock().remove(&stream_id);
            return Err(e);
        }

        let mut messages = history_to(&history, parent_message_id.as_deref());
        messages.push(ChatMessage {
            role: Role::User,
            text: req.text.clone(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        });
        let started = Started {
            stream_id: stream_id.clone(),
            conversation_id: conversation_id.clone(),
            user_message_id: meta.user_message_id.clone(),
            response_message_id: meta.response_message_id.clone(),
        };
        let mut aggregate = Aggregate::default();
        aggregate.apply(0, &created);
        let job = JobRun {
            manager: self.clone(),
            meta,
            title,
            model,
            request: ModelRequest {
                model: String::new(),
                system_prompt: req.system_prompt.clone(),
                messages,
                tools: inner.tools.specs(&tools),
                call_index: 0,
            },
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
            pending: Default::default(),
        };
        inner.tracker.spawn(job.run());
        Ok(started)
    }

    /// With balances on: creates a new user's balance, refills it when due, and
    /// refuses a chat when it is not positive.
    async fn check_balance(&self, user_id: &str) -> Result<(), EngineError> {
        let Some(policy) = self.inner.config.balance else {
            return Ok(());
        };
        let db = &self.inner.db;
        let now = now_rfc3339();
        let mut balance = db
            .ensure_balance(user_id, policy.start_micro, &now)
            .await?
            .balance_micro;
        if let Some(interval) = policy.refill_interval {
            let due_before = rfc3339_before(interval);
            if let Some(b) = db
                .refill_if_due(user_id, policy.refill_micro, &due_before, &now)
                .await?
            {
                balance = b;
            }
        }
        if balance <= 0 {
            return Err(EngineError::InsufficientBalance {
                balance: crate::billing::credits(balance),
            });
        }
        Ok(())
    }

    async fn check_rate_limits(&self, req: &StartRequest) -> Result<(), EngineError> {
        let l = self.inner.config.limits;
        let checks = [
            (
                l.per_ip,
                req.client_ip.as_deref().map(|ip| format!("ip:{ip}")),
                "IP address",
            ),
            (l.per_user, Some(format!("user:{}", req.user_id)), "user"),
        ];
        for (limit, key, scope) in checks {
            let (Some(limit), Some(key)) = (limit, key) else {
                continue;
            };
            if let Some(wait) = self.inner.store.rate_limit(&key, limit, l.period).await? {
                return Err(EngineError::RateLimited {
                    scope: format!("{scope} ({limit} per {} s)", l.period.as_secs()),
                    retry_after_ms: wait.as_millis() as u64,
                });
            }
        }
        Ok(())
    }

    /// The job with this stream id, if the caller may read it.
    ///
    /// Errors: `NotFound` (unknown or expired), `Forbidden` (another user's).
    pub async fn job_for(
        &self,
        user_id: &str,
        stream_id: &str,
    ) -> Result<(JobMeta, Arc<EventLog>), EngineError> {
        let not_found = || EngineError::NotFound(format!("stream {stream_id}"));
        let meta = self
            .inner
            .store
            .get_job(stream_id)
            .await?
            .ok_or_else(not_found)?;
        if meta.user_id != user_id {
            return Err(EngineError::Forbidden(format!("stream {stream_id}")));
        }
        let log = self
            .inner
            .store
            .open_log(stream_id)
            .await?
            .ok_or_else(not_found)?;
        Ok((meta, log))
    }

    /// The caller's running jobs.
    pub async fn active(&self, user_id: &str) -> Result<Vec<JobMeta>, EngineError> {
        self.inner.store.running_jobs(user_id).await
    }

    /// The conversation's latest job and its snapshot, if one is still in the store.
    ///
    /// Errors: `Forbidden` for another user's conversation.
    pub async fn status(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Option<(JobMeta, ResumeState)>, EngineError> {
        let Some(meta) = self.inner.store.latest_job(conversation_id).await? else {
            return Ok(None);
        };
        if meta.user_id != user_id {
            return Err(EngineError::Forbidden(format!(
                "conversation {conversation_id}"
            )));
        }
        let Some(log) = self.inner.store.open_log(&meta.stream_id).await? else {
            return Ok(None);
        };
        let (_, state) = log.snapshot();
        Ok(Some((meta, state)))
    }

    /// Aborts the conversation's running (or latest) job; see [`JobManager::abort`].
    pub async fn abort_conversation(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<AbortOutcome, EngineError> {
        let meta = self
            .inner
            .store
            .latest_job(conversation_id)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!("job of conversation {conversation_id}"))
            })?;
        self.abort(user_id, &meta.stream_id).await
    }

    /// Stops a job and returns its partial answer, once saved (SPEC §4).
    ///
    /// Idempotent: aborting an aborted job returns the same answer again.
    /// Errors: `NotFound`, `Forbidden`, `JobFinished` (completed or failed).
    pub async fn abort(&self, user_id: &str, stream_id: &str) -> Result<AbortOutcome, EngineError> {
        let (_meta, log) = self.job_for(user_id, stream_id).await?;
        if log.terminal().is_none() {
            if !cancel_local(&self.inner, stream_id, EndReason::Abort) {
                // Another replica owns it: ask through the store.
                self.inner.store.request_abort(stream_id).await?;
            }
            // Wait for the owner to save the partial answer and end the log.
            let mut rx = log.watch();
            let waited = tokio::time::timeout(self.inner.config.abort_wait, async {
                loop {
                    rx.borrow_and_update();
                    if log.terminal().is_some() {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if waited.is_err() {
                return Err(EngineError::Internal(format!(
                    "job {stream_id} did not stop within {:?}",
                    self.inner.config.abort_wait
                )));
            }
        }
        match log.terminal_event().map(|e| e.body) {
            Some(EventBody::Final(f)) if f.status == FinalStatus::Aborted => Ok(AbortOutcome {
                stream_id: stream_id.to_string(),
                response_message: f.response_message,
                usage: f.usage,
            }),
            Some(_) => Err(EngineError::JobFinished(stream_id.to_string())),
            None => Err(EngineError::Internal(format!("job {stream_id} has no end"))),
        }
    }

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
            let records = log.with_aggregate(|agg| {
                let mut records = agg.usage().to_vec();
                let last_call = agg
                    .run_steps()
                    .iter()
                    .filter_map(|s| s.run_id.rsplit(':').next()?.parse::<u32>().ok())
                    .max();
                if let Some(call) =
                    last_call.filter(|c| !records.iter().any(|r| r.call_index == *c))
                {
                    records.push(UsageRecord {
                        call_index: call,
                        model: meta.model.clone(),
                        output_tokens: crate::usage::count_tokens(&agg.text()),
                        estimated: true,
                        ..UsageRecord::default()
                    });
                }
                records
            });
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

/// Cancels a job this replica runs; false if it runs no such job.
fn cancel_local(inner: &Inner, stream_id: &str, reason: EndReason) -> bool {
    match inner.live.lock().get(stream_id) {
        Some(live) => {
            live.reason.lock().get_or_insert(reason);
            live.cancel.cancel();
            true
        }
        None => false,
    }
}

/// Prices the job's usage records and spends them (exactly once, by the database's
/// unique key); returns the totals with the job's whole cost in credits.
async fn spend_usage(
    inner: &Inner,
    meta: &JobMeta,
    pricing: Option<&crate::billing::Pricing>,
    records: &[UsageRecord],
    context: SpendContext,
) -> Result<UsageTotals, EngineError> {
    let lines: Vec<crate::billing::Line> = records
        .iter()
        .flat_map(|r| crate::billing::price(r, pricing))
        .collect();
    let total: i64 = lines.iter().map(|l| l.amount_micro).sum();
    let mut totals = UsageTotals::default();
    for r in records {
        totals.add(r);
    }
    totals.credits = crate::billing::credits(total);
    if !lines.is_empty() {
        inner
            .db
            .spend(&crate::persist::SpendRequest {
                user_id: meta.user_id.clone(),
                conversation_id: meta.conversation_id.clone(),
                stream_id: meta.stream_id.clone(),
                message_id: meta.response_message_id.clone(),
                model: meta.model.clone(),
                context,
                lines,
                created_at: now_rfc3339(),
            })
            .await?;
    }
    Ok(totals)
}

/// Now minus `d`, in the fixed-width RFC 3339 form of [`now_rfc3339`].
fn rfc3339_before(d: Duration) -> String {
    crate::rfc3339(time::OffsetDateTime::now_utc() - d)
}

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

/// The first 50 characters of the first message, on one line.
pub fn title_of(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(50).collect()
}

/// The path from the root to `parent`, as upstream history.
fn history_to(all: &[Message], parent: Option<&str>) -> Vec<ChatMessage> {
    let by_id: HashMap<&str, &Message> = all.iter().map(|m| (m.message_id.as_str(), m)).collect();
    let mut chain = Vec::new();
    let mut cur = parent;
    while let Some(id) = cur {
        let Some(m) = by_id.get(id) else { break };
        chain.push(*m);
        cur = m.parent_message_id.as_deref();
        if chain.len() > all.len() {
            break; // a cycle can only come from a corrupt database; do not spin
        }
    }
    chain.reverse();
    let mut out = Vec::new();
    for m in chain {
        if m.is_created_by_user {
            out.push(ChatMessage {
                role: Role::User,
                text: m.text.clone(),
                tool_calls: Vec::new(),
                tool_call_id: None,
            });
        } else {
            // One assistant turn per model call, in order: a text part after tool
            // calls begins the next call's turn, so each round's calls are followed by
            // their results before the text that quotes them.
            let new_turn = || ChatMessage {
                role: Role::Assistant,
                text: String::new(),
                tool_calls: Vec::new(),
                tool_call_id: None,
            };
            let mut turn = new_turn();
            for part in &m.content {
                match part {
                    crate::event::ContentPart::Text { text } => {
                        if !turn.tool_calls.is_empty() {
                            out.push(std::mem::replace(&mut turn, new_turn()));
                        }
                        turn.text.push_str(text);
                    }
                    crate::event::ContentPart::ToolCall { tool_call } => {
                        turn.tool_calls.push(tool_call.clone());
                    }
                    crate::event::ContentPart::Think { .. } => {}
                }
            }
            if m.content.is_empty() {
                turn.text.clone_from(&m.text);
            }
            out.push(turn);
        }
    }
    out
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
struct JobRun {
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
    /// Tool calls of the current model call, by the upstream's index.
    pending: std::collections::BTreeMap<u32, PendingCall>,
}

impl JobRun {
    async fn run(mut self) {
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
    async fn append(&self, body: &EventBody) -> Result<Result<u64, AppendError>, EngineError> {
        let expected = self.aggregate.last_seq().map_or(0, |s| s + 1);
        let grace = self.manager.inner.config.store_outage_grace;
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match self
                .manager
                .inner
                .store
                .append(&self.meta.stream_id, body, Some(expected))
                .await
            {
                Err(EngineError::Store(e)) if started.elapsed() < grace => {
                    tracing::warn!(stream_id = %self.meta.stream_id, error = %e, "append failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    async fn emit(&mut self, body: EventBody) -> Result<(), Outcome> {
        match self.append(&body).await {
            Ok(Ok(seq)) => {
                self.aggregate.apply(seq, &body);
                *self.last_progress.lock() = Instant::now();
                Ok(())
            }
            Ok(Err(AppendError::Full)) => Err(Outcome::LogFull),
            Ok(Err(AppendError::Ended)) => Err(Outcome::Ended),
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
            if let Err(o) = self.run_tools(calls).await {
                return o;
            }
            if iteration == max {
                // Every tool call has its result, so the history stays valid; the
                // cap ends the job with a terminal event (LESSONS: grimoire's
                // "loading forever").
                return Outcome::Complete(Some("max_tool_iterations"));
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
                            self.model.retry.ceiling_ms / 1000
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
    /// and idle-gap timeouts; returns the tool calls it asked for.
    async fn call_once(&mut self) -> Result<Vec<PendingCall>, CallError> {
        let mut request = self.request.clone();
        request.model = self.model.name.clone();
        request.call_index = self.calls;
        self.calls += 1;
        let first_byte = Duration::from_millis(self.model.timeouts.first_byte_ms);
        let idle = Duration::from_millis(self.model.timeouts.idle_ms);
        let provider = self.model.provider.clone();
        let cancel = self.cancel.clone();
        let started = Instant::now();
        let stream = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(self.stopped().into()),
            s = tokio::time::timeout(first_byte, provider.stream(request, cancel.child_token())) => s,
        };
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CallError::Provider(e)),
            Err(_) => return Err(CallError::Provider(timeout_error("first byte", first_byte))),
        };
        let mut usage: Option<UsageRecord> = None;
        let mut got_any = false;
        loop {
            // Until the first event the first-byte budget applies, then the idle gap.
            let (limit, what) = if got_any {
                (idle, "idle gap")
            } else {
                (first_byte.saturating_sub(started.elapsed()), "first byte")
            };
            let item = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.record_usage(usage.take(), true).await.ok();
                    return Err(self.stopped().into());
                }
                item = tokio::time::timeout(limit, stream.next()) => item,
            };
            let event = match item {
                Err(_) => {
                    let what = if got_any { what } else { "first byte" };
                    let limit = if got_any { idle } else { first_byte };
                    self.record_usage(usage.take(), false).await?;
                    return Err(CallError::Provider(timeout_error(what, limit)));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    self.record_usage(usage.take(), false).await?;
                    return Err(CallError::Provider(e));
                }
                Ok(Some(Ok(ev))) => ev,
            };
            got_any = true;
            match event {
                ProviderEvent::Text(t) => self.delta(PartKind::Text, t).await?,
                ProviderEvent::Reasoning(t) => self.delta(PartKind::Think, t).await?,
                ProviderEvent::ToolCall {
                    index,
                    id,
                    name,
                    args,
                } => self.tool_delta(index, id, name, args).await?,
                ProviderEvent::Usage(u) => usage = Some(u),
                ProviderEvent::Finish(_) => {}
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
            None if always || self.attempt_chars > 0 => self.estimate_usage(),
            None => return Ok(()),
        };
        record.call_index = self.calls.saturating_sub(1);
        if record.model.is_empty() {
            record.model = self.model.name.clone();
        }
        if record.provider.is_empty() {
            record.provider = self.model.provider.kind().to_string();
        }
        self.emit(EventBody::Usage(record)).await
    }

    /// An estimate (tiktoken `o200k_base`) for a call cut off before the upstream
    /// reported usage; marked `estimated`.
    fn estimate_usage(&self) -> UsageRecord {
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
        UsageRecord {
            input_tokens: crate::usage::count_tokens(&input),
            output_tokens: crate::usage::count_tokens(&self.attempt_text),
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
        let step_id = match &self.current {
            Some((id, k)) if *k == kind => id.clone(),
            _ => {
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
                id
            }
        };
        let part = match kind {
            PartKind::Text => crate::event::ContentPart::Text { text },
            PartKind::Think => crate::event::ContentPart::Think { think: text },
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
    /// assistant turn with its results to the history. On abort every unfinished tool
    /// is cancelled and gets `{"error":"cancelled"}`, so the saved history stays valid.
    async fn run_tools(&mut self, calls: Vec<PendingCall>) -> Result<(), Outcome> {
        self.pending.clear();
        let registry = self.manager.inner.tools.clone();
        let cancel = self.cancel.child_token();
        let outputs = futures::future::join_all(calls.iter().map(|c| {
            crate::tools::run_tool(&registry, &c.call.name, &c.call.args, cancel.clone())
        }))
        .await;
        let mut done = Vec::new();
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
        if self.cancel.is_cancelled() {
            return Err(self.stopped());
        }
        self.request.messages.push(ChatMessage {
            role: Role::Assistant,
            text: std::mem::take(&mut self.call_text),
            tool_calls: done,
            tool_call_id: None,
        });
        Ok(())
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

    fn response_message(&self, unfinished: bool, error: bool) -> Message {
        let content = self.aggregate.content();
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
        match self.append(&terminal).await? {
            Ok(_) | Err(AppendError::Ended) => Ok(()),
            Err(AppendError::Full) => Err(EngineError::Internal(
                "terminal event refused as full".into(),
            )),
        }
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
