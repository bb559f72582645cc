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
use crate::store::{JobMeta, JobStatus, JobStore, StoreError};
use crate::usage::{UsageRecord, UsageTotals};
use crate::{new_id, now_rfc3339};

mod client_tools;
mod history;
mod lifecycle;
mod run;

pub use client_tools::{PriorTurn, ToolResult};

use history::history_to;
pub use history::title_of;
use run::JobRun;

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

/// Message rate limits: at most the limit in any `period` (a sliding window, see
/// [`RateLimitStore::rate_limit`](crate::store::RateLimitStore::rate_limit)), shared by all replicas through the job store. Off by
/// default in the engine; the server's `[limits]` defaults to 40 per minute per user
/// and per IP.
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

pub use crate::billing::BalancePolicy;

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
    /// Function tools the client runs itself, offered to the model with the server's
    /// tools; a model call that asks for one ends the job (see `client_tools.rs`).
    pub client_tools: Vec<crate::provider::ToolSpec>,
    /// Turns the request carries, saved before the new input as a chain under the
    /// parent (Chat Completions sends its whole conversation).
    pub prior: Vec<PriorTurn>,
    /// Non-empty: the new input is these results of the parent answer's client tool
    /// calls (saved as one user-side message), and `text` must be empty.
    pub tool_results: Vec<ToolResult>,
    /// What a client protocol needs to project this job the same way on every replica
    /// (e.g. the Responses request's echoed parameters), carried opaquely in `created`.
    pub protocol_options: Option<serde_json::Value>,
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

/// The handles of a job running on this replica, shared with its task.
#[derive(Clone)]
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
        // The token encodings for usage estimates are slow to build: start now, off the
        // runtime's workers, so the first estimate need not wait.
        crate::usage::warm_token_counter(inner.models.iter().map(|m| m.provider.upstream_model()));
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

    /// Resolves once the token encodings of the models' upstreams are built (about a
    /// second of CPU, once per process), so that no usage estimate — e.g. the one an
    /// abort makes for the call it cuts off — waits for one. The server awaits it
    /// before it accepts requests; [`JobManager::new`] has started the builds already.
    pub async fn prepare_estimates(&self) {
        crate::usage::prepare_token_counter(
            self.inner
                .models
                .iter()
                .map(|m| m.provider.upstream_model()),
        )
        .await;
    }

    /// The balance rules, if balances are on.
    pub fn balance_policy(&self) -> Option<BalancePolicy> {
        self.inner.config.balance
    }

    /// Number of jobs running on this replica.
    pub fn live_jobs(&self) -> usize {
        self.inner.live.lock().len()
    }

    /// Starts a job: validates, checks the limits, reserves the conversation, saves the
    /// user message, appends `created` (seq 0) and spawns the generation — in that
    /// order, so the user message exists before anything can refer to it.
    ///
    /// The checks run in this order, each only if the ones before passed, so that a
    /// refused request spends no budget it was refused before: shutting down → the
    /// request itself (text, model, tools, conversation, parentMessageId) → the rate
    /// limits (per IP, then per user; a hit that passes counts from here on) → the
    /// balance → this replica's live-job bound → the per-user concurrency limit and the
    /// conversation's one running job (one atomic step in the store).
    ///
    /// Errors: `ShuttingDown`; `BadRequest` (text, model, tools, parentMessageId),
    /// `NotFound`/`Forbidden` for the conversation; `RateLimited`;
    /// `InsufficientBalance`; `ServerBusy`; `TooManyConcurrent`, `ConversationBusy`;
    /// and store or database failures.
    pub async fn start(&self, req: StartRequest) -> Result<Started, EngineError> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        if req.tool_results.is_empty() && req.text.trim().is_empty() {
            return Err(EngineError::bad_request("text", "must not be empty"));
        }
        if !req.tool_results.is_empty() && !req.text.is_empty() {
            return Err(EngineError::bad_request(
                "text",
                "must be empty when the input is tool results",
            ));
        }
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
        client_tools::check_client_tools(&req.client_tools, &tools)?;

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

        // Only a valid request spends rate budget: a 400 or 404 costs nothing.
        self.check_rate_limits(&req).await?;
        self.check_balance(&req.user_id).await?;

        let stream_id = new_id();
        let created_at = now_rfc3339();
        let prior = client_tools::prior_messages(
            &req.prior,
            &conversation_id,
            parent_message_id.clone(),
            &model.name,
            &created_at,
        );
        let user_message = Message {
            message_id: new_id(),
            conversation_id: conversation_id.clone(),
            parent_message_id: prior
                .last()
                .map(|m| m.message_id.clone())
                .or_else(|| parent_message_id.clone()),
            sender: "User".into(),
            text: req.text.clone(),
            content: client_tools::results_content(&req.tool_results),
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
        let handles = live.clone();
        {
            let mut map = inner.live.lock();
            if map.len() >= inner.config.max_live_jobs {
                return Err(EngineError::ServerBusy(inner.config.max_live_jobs));
            }
            map.insert(stream_id.clone(), live);
        }
        if let Err(e) = inner.store.create_job(&meta).await {
            inner.live.lock().remove(&stream_id);
            return Err(e.into());
        }

        let title = match &existing {
            Some(c) => c.title.clone(),
            None => title_of(
                req.prior
                    .iter()
                    .find_map(|t| match t {
                        PriorTurn::User(text) => Some(text.as_str()),
                        _ => None,
                    })
                    .unwrap_or(&req.text),
            ),
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
            for m in &prior {
                inner.db.save_message(m).await?;
            }
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
            client_tools: req.client_tools.iter().map(|t| t.name.clone()).collect(),
            protocol_options: req.protocol_options.clone(),
        });
        let appended = match saved {
            Ok(()) => match inner.store.append(&stream_id, &created, Some(0)).await {
                Ok(_) => Ok(()),
                Err(e @ StoreError::Append(_)) => Err(EngineError::internal("append created", e)),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = appended {
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

        // The upstream history is the tree's path to the new input, prior turns included.
        let mut path = history;
        path.extend(prior);
        path.push(user_message.clone());
        let messages = history_to(&path, Some(&user_message.message_id));
        let started = Started {
            stream_id: stream_id.clone(),
            conversation_id: conversation_id.clone(),
            user_message_id: meta.user_message_id.clone(),
            response_message_id: meta.response_message_id.clone(),
        };
        let mut tool_specs = inner.tools.specs(&tools);
        tool_specs.extend(req.client_tools.iter().cloned());
        let mut job = JobRun::new(
            self.clone(),
            meta,
            title,
            model,
            ModelRequest {
                model: String::new(),
                system_prompt: req.system_prompt.clone(),
                messages,
                tools: tool_specs,
                call_index: 0,
            },
            handles,
            &created,
        );
        job.client_tools = req.client_tools.iter().map(|t| t.name.clone()).collect();
        inner.tracker.spawn(job.run());
        Ok(started)
    }

    /// With balances on, the user's balance in micro-credits as a chat is judged by it:
    /// a new user's is created at the start balance and a refill that is due is applied
    /// first ([`crate::billing::settle_balance`]). `None` with balances off.
    ///
    /// Errors: database failures.
    pub async fn balance(&self, user_id: &str) -> Result<Option<i64>, EngineError> {
        match &self.inner.config.balance {
            None => Ok(None),
            Some(policy) => crate::billing::settle_balance(&*self.inner.db, policy, user_id)
                .await
                .map(Some),
        }
    }

    /// With balances on: refuses a chat when the balance (see [`JobManager::balance`])
    /// is not positive.
    async fn check_balance(&self, user_id: &str) -> Result<(), EngineError> {
        let Some(balance) = self.balance(user_id).await? else {
            return Ok(());
        };
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
                    // Rounded up, so that waiting this long is always enough.
                    retry_after_ms: u64::try_from(wait.as_micros().div_ceil(1000))
                        .unwrap_or(u64::MAX),
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
        Ok(self.inner.store.running_jobs(user_id).await?)
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
                return Err(EngineError::Internal(
                    format!(
                        "job {stream_id} did not stop within {:?}",
                        self.inner.config.abort_wait
                    )
                    .into(),
                ));
            }
        }
        match log.terminal_event().map(|e| e.body) {
            Some(EventBody::Final(f)) if f.status == FinalStatus::Aborted => Ok(AbortOutcome {
                stream_id: stream_id.to_string(),
                response_message: f.response_message,
                usage: f.usage,
            }),
            Some(_) => Err(EngineError::JobFinished(stream_id.to_string())),
            None => Err(EngineError::Internal(
                format!("job {stream_id} has no end").into(),
            )),
        }
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
///
/// A database failure is retried with backoff (50 ms doubling to 2 s, jittered) for up
/// to `store_outage_grace` in all: the spend is keyed by (job, model call, token type),
/// so a retry of a spend that did land, its answer lost, charges nothing more. Errors:
/// the last [`EngineError::Persistence`] once the grace is used up; any other error at
/// once (e.g. a line that does not fit the ledger).
async fn spend_usage(
    inner: &Inner,
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
    (|| inner.db.spend(&req))
        .retry(outage_backoff(inner.config.store_outage_grace))
        .sleep(tokio::time::sleep)
        .when(|e| matches!(e, EngineError::Persistence(_)))
        .notify(|e, wait| {
            tracing::warn!(stream_id = %meta.stream_id, error = %e, ?wait, "spend failed; retrying");
        })
        .await?;
    Ok(totals)
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
