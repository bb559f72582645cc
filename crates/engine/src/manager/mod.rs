//! The job manager: starts jobs, runs each in a tracked background task, aborts them,
//! reaps stalled ones, drops expired logs and shuts down gracefully (docs/protocol.md §4, §5).
//!
//! One task per job is the *single writer* of that job's log and response message, so
//! there is never a race between two writers of the same message (docs/lessons.md: "Stop wrote
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

mod appender;
mod attempt;
mod client_tools;
mod context;
mod conversations;
mod ending;
mod history;
mod lifecycle;
mod replay;
mod run;
mod start;

pub use client_tools::{PriorTurn, ToolResult};
use context::JobContext;
use conversations::ConversationLocks;
pub use ending::EndHook;
use history::history_to;
pub use history::title_of;

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
    /// How long an idempotency key keeps answering with its start's ids (see
    /// [`Idempotency`]), counted from the start. Default 24 h, longer than the log's
    /// retention: a repeat after the log expired still gets the same ids.
    pub idempotency_ttl: Duration,
    /// How long a repeat waits for a concurrent start with the same key to finish
    /// before it answers `IdempotencyInProgress`. Default 10 s.
    pub idempotency_wait: Duration,
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
            idempotency_ttl: Duration::from_secs(86_400),
            idempotency_wait: Duration::from_secs(10),
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
    /// With a `conversation_id` that names no conversation yet, create it under that id
    /// (a client-chosen id, as the AI SDK's `useChat` sends) rather than answer
    /// `NotFound`. The first user to save it owns it; a later or concurrent start by
    /// another user is `Forbidden` (the store's upsert never changes an owner).
    pub create_conversation: bool,
    /// Regenerate: the input is the existing user message `parent_message_id` (its
    /// text, not `text`); no user message is saved and the new answer is a sibling of
    /// that message's earlier answers. `BadRequest` naming `parentMessageId` when it
    /// is not a user message of the conversation.
    pub answer_existing: bool,
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
    /// Where to POST the job-finished webhook (see [`EndHook`]); `None` = the server's
    /// default. Checked by the caller (the engine knows nothing of HTTP).
    pub webhook_url: Option<String>,
    /// Makes the start idempotent: a repeat with the same key by the same user within
    /// [`ManagerConfig::idempotency_ttl`] answers the first start's [`Started`] and
    /// starts nothing (see `start.rs`).
    pub idempotency: Option<Idempotency>,
}

/// A start's idempotency key (the client's `Idempotency-Key`) and the hash of its
/// request, as the caller canonicalized it: a repeat with the same key must carry the
/// same hash, else it is refused (`IdempotencyConflict`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    /// The client's key, scoped by the engine to the user (keys of two users never
    /// meet).
    pub key: String,
    /// Any string that is equal for equal requests, e.g. a hex SHA-256 of the route and
    /// the canonical JSON body.
    pub request_hash: String,
}

/// The answer to a started chat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
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

/// The jobs this replica runs, by stream id.
type LiveMap = Arc<Mutex<HashMap<String, LiveJob>>>;

/// A job's place in the live map, owned by its task (or by a start in progress);
/// dropping it frees the place.
struct LiveSlot {
    map: LiveMap,
    stream_id: String,
    handles: LiveJob,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.map.lock().remove(&self.stream_id);
    }
}

struct Inner {
    /// What job tasks and the reaper use: store, database, tools, settings.
    ctx: Arc<JobContext>,
    models: Vec<ModelEntry>,
    tracker: TaskTracker,
    live: LiveMap,
    /// Held by a start and a delete of the same conversation (`conversations.rs`).
    conversations: ConversationLocks,
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
            ctx: Arc::new(JobContext {
                store,
                db,
                tools,
                config,
                end_hook: std::sync::OnceLock::new(),
            }),
            models,
            tracker: TaskTracker::new(),
            live: LiveMap::default(),
            conversations: ConversationLocks::default(),
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
            .ctx
            .store
            .set_abort_handler(Arc::new(move |stream_id: &str| {
                if let Some(inner) = weak.upgrade() {
                    cancel_local(&inner, stream_id, EndReason::Abort);
                }
            }));
        JobManager { inner }
    }

    /// Sets the hook told of every job this replica ends ([`EndHook`]); once, at
    /// startup. Returns false (and keeps the first) if one is already set.
    pub fn set_end_hook(&self, hook: Arc<dyn EndHook>) -> bool {
        self.inner.ctx.end_hook.set(hook).is_ok()
    }

    /// The job store, for tests and benches that inspect it; the server's routes go
    /// through the manager's own methods instead (`conversations.rs`).
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.inner.ctx.store
    }

    /// The database, for tests and benches that inspect it; the server's
    /// routes go through the manager's own methods instead (`conversations.rs`).
    pub fn db(&self) -> &Arc<dyn Persistence> {
        &self.inner.ctx.db
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
        self.inner.ctx.config.balance
    }

    /// Number of jobs running on this replica.
    pub fn live_jobs(&self) -> usize {
        self.inner.live.lock().len()
    }

    /// The job with this stream id, if the caller may read it: its metadata only, not
    /// its log (see [`JobManager::job_for`] for both).
    ///
    /// Errors: `NotFound` (unknown or expired), `Forbidden` (another user's).
    pub async fn job_meta_for(
        &self,
        user_id: &str,
        stream_id: &str,
    ) -> Result<JobMeta, EngineError> {
        let meta = self
            .inner
            .ctx
            .store
            .get_job(stream_id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("stream {stream_id}")))?;
        if meta.user_id != user_id {
            return Err(EngineError::Forbidden(format!("stream {stream_id}")));
        }
        Ok(meta)
    }

    /// The job with this stream id and this replica's copy of its log, if the caller
    /// may read it.
    ///
    /// Errors: `NotFound` (unknown or expired), `Forbidden` (another user's).
    pub async fn job_for(
        &self,
        user_id: &str,
        stream_id: &str,
    ) -> Result<(JobMeta, Arc<EventLog>), EngineError> {
        let not_found = || EngineError::NotFound(format!("stream {stream_id}"));
        let meta = self.job_meta_for(user_id, stream_id).await?;
        let log = self
            .inner
            .ctx
            .store
            .open_log(stream_id)
            .await?
            .ok_or_else(not_found)?;
        Ok((meta, log))
    }

    /// The caller's running jobs.
    pub async fn active(&self, user_id: &str) -> Result<Vec<JobMeta>, EngineError> {
        Ok(self.inner.ctx.store.running_jobs(user_id).await?)
    }

    /// The conversation's latest job and its snapshot, if one is still in the store.
    ///
    /// Errors: `Forbidden` for another user's conversation, whether or not it has a
    /// job in the store.
    pub async fn status(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Option<(JobMeta, ResumeState)>, EngineError> {
        if let Some(c) = self.inner.ctx.db.get_conversation(conversation_id).await?
            && c.user_id != user_id
        {
            return Err(EngineError::Forbidden(format!(
                "conversation {conversation_id}"
            )));
        }
        let Some(meta) = self.inner.ctx.store.latest_job(conversation_id).await? else {
            return Ok(None);
        };
        if meta.user_id != user_id {
            return Err(EngineError::Forbidden(format!(
                "conversation {conversation_id}"
            )));
        }
        let Some(log) = self.inner.ctx.store.open_log(&meta.stream_id).await? else {
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
            .ctx
            .store
            .latest_job(conversation_id)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!("job of conversation {conversation_id}"))
            })?;
        self.abort(user_id, &meta.stream_id).await
    }

    /// Stops a job and returns its partial answer, once saved (docs/protocol.md §4).
    ///
    /// Idempotent: aborting an aborted job returns the same answer again.
    /// Errors: `NotFound`, `Forbidden`, `JobFinished` (completed or failed).
    pub async fn abort(&self, user_id: &str, stream_id: &str) -> Result<AbortOutcome, EngineError> {
        let (_meta, log) = self.job_for(user_id, stream_id).await?;
        if log.terminal().is_none() {
            if !cancel_local(&self.inner, stream_id, EndReason::Abort) {
                // Another replica owns it: ask through the store.
                self.inner.ctx.store.request_abort(stream_id).await?;
            }
            // Wait for the owner to save the partial answer and end the log.
            let mut rx = log.watch();
            let waited = tokio::time::timeout(self.inner.ctx.config.abort_wait, async {
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
                        self.inner.ctx.config.abort_wait
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
