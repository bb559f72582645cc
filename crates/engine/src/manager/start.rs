//! Starting a job, step by step: validate the request, load (or plan) the
//! conversation, check the limits, reserve a live slot, create the job in the store,
//! save the user message and append `created`, then spawn the job's task.

use super::run::JobRun;
use super::*;
use crate::store::IdempotencyClaim;
use backon::Retryable;

/// A valid request's model and the tools the job may use.
struct Validated {
    model: ModelEntry,
    tools: Vec<String>,
}

/// The conversation a job answers in: an existing one with its history, or a new one.
struct ConversationPlan {
    conversation_id: String,
    /// The existing conversation's row; `None` for a new one.
    existing: Option<Conversation>,
    history: Vec<Message>,
    /// The message the new user message answers.
    parent_message_id: Option<String>,
    title: String,
}

impl JobManager {
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
    /// An existing conversation is held (see `conversations.rs`) from its lookup until
    /// its job is in the store, so a delete on this replica either finds the job
    /// running (`ConversationBusy`) or has deleted the conversation before the lookup
    /// (`NotFound`); a delete on another replica that lands between the lookup and
    /// the user message's save makes that save refused (`NotFound`).
    ///
    /// Errors: `ShuttingDown`; `BadRequest` (text, model, tools, parentMessageId),
    /// `NotFound`/`Forbidden` for the conversation; `RateLimited`;
    /// `InsufficientBalance`; `ServerBusy`; `TooManyConcurrent`, `ConversationBusy`;
    /// and store or database failures.
    ///
    /// With [`StartRequest::idempotency`], after the request itself is found valid the
    /// key is claimed in the store (see [`JobManager::claim_key`]): a repeat answers the
    /// first start's ids and starts (and bills) nothing; the same key with another
    /// request is `IdempotencyConflict`; a repeat while the first start is still under
    /// way waits for it (`IdempotencyInProgress` past
    /// [`ManagerConfig::idempotency_wait`]). A start that fails releases its key, so a
    /// retry can start.
    pub async fn start(&self, req: StartRequest) -> Result<Started, EngineError> {
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let validated = self.validate(&req)?;
        if req.idempotency.is_none() {
            return self.start_job(&req, validated).await;
        }
        // In a task of its own: a client that drops the connection (the very client
        // that will retry) must not cut the start between its claim and its fill, which
        // would leave the key claimed, unfilled, until the claim lapses.
        let this = self.clone();
        let start = async move { this.start_idempotent(req, validated).await };
        self.inner
            .tracker
            .spawn(tracing::Instrument::instrument(
                start,
                tracing::Span::current(),
            ))
            .await
            .map_err(|e| EngineError::internal("idempotent start", e))?
    }

    /// [`JobManager::start`] for a request with an idempotency key, once validated.
    async fn start_idempotent(
        &self,
        req: StartRequest,
        validated: Validated,
    ) -> Result<Started, EngineError> {
        let Some(idem) = &req.idempotency else {
            return self.start_job(&req, validated).await;
        };
        let key = idem.store_key(&req.user_id);
        let token = new_id();
        if let Some(started) = self.claim_key(idem, &key, &token).await? {
            crate::metrics::idempotent_repeat();
            return Ok(started);
        }
        let store = &self.inner.ctx.store;
        match self.start_job(&req, validated).await {
            Ok(started) => {
                let value = serde_json::to_string(&started)
                    .map_err(|e| EngineError::internal("encode started ids", e))?;
                let ttl = self.inner.ctx.config.idempotency_ttl;
                // A few tries over a blip of the store: an unfilled claim lapses after
                // its claim TTL, and a repeat after that would start a second job.
                let fill = || store.fill_idempotency(&key, &token, &value, ttl);
                let filled = fill
                    .retry(
                        backon::ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(50))
                            .with_max_times(3),
                    )
                    .sleep(tokio::time::sleep)
                    .await;
                match filled {
                    Ok(true) => {}
                    // The job runs either way; only a repeat may now start another.
                    Ok(false) => tracing::warn!(stream_id = %started.stream_id,
                        "the idempotency claim lapsed before the start finished"),
                    Err(e) => tracing::warn!(stream_id = %started.stream_id, error = %e,
                        "could not save the idempotency key's ids"),
                }
                Ok(started)
            }
            Err(e) => {
                if let Err(release) = store.release_idempotency(&key, &token).await {
                    // The claim lapses by itself after its claim TTL.
                    tracing::warn!(error = %release, "could not release an idempotency key");
                }
                Err(e)
            }
        }
    }

    /// Claims the idempotency key `key` (already scoped to the user) with `token`:
    /// `None` when the caller now holds it and is to start; `Some` with the first
    /// start's ids for a repeat. A claim held by a start still under way is polled
    /// (25 ms, doubling to 250 ms) until it is filled, released (then this caller
    /// claims it) or [`ManagerConfig::idempotency_wait`] passes.
    ///
    /// Errors: `IdempotencyConflict` (another request under the key),
    /// `IdempotencyInProgress` (still under way after the wait), store failures.
    async fn claim_key(
        &self,
        idem: &Idempotency,
        key: &str,
        token: &str,
    ) -> Result<Option<Started>, EngineError> {
        let store = &self.inner.ctx.store;
        let config = &self.inner.ctx.config;
        let deadline = Instant::now() + config.idempotency_wait;
        let mut pause = Duration::from_millis(25);
        loop {
            let claim = store
                .claim_idempotency(key, &idem.request_hash, token, IDEMPOTENCY_CLAIM_TTL)
                .await?;
            let request_hash = match &claim {
                IdempotencyClaim::Claimed => return Ok(None),
                IdempotencyClaim::Pending { request_hash }
                | IdempotencyClaim::Filled { request_hash, .. } => request_hash,
            };
            if *request_hash != idem.request_hash {
                return Err(EngineError::IdempotencyConflict(idem.key.clone()));
            }
            if let IdempotencyClaim::Filled { value, .. } = claim {
                return serde_json::from_str(&value)
                    .map(Some)
                    .map_err(|e| EngineError::internal("decode an idempotency key's ids", e));
            }
            if Instant::now() + pause > deadline {
                return Err(EngineError::IdempotencyInProgress(idem.key.clone()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// The start itself, for a valid request (see [`JobManager::start`]).
    async fn start_job(
        &self,
        req: &StartRequest,
        Validated { model, tools }: Validated,
    ) -> Result<Started, EngineError> {
        let _held = match existing_id(req) {
            Some(id) => Some(self.inner.conversations.hold(id).await),
            None => None,
        };
        let plan = self.load_conversation(req).await?;
        // Only a valid request spends rate budget: a 400 or 404 costs nothing.
        self.check_rate_limits(req).await?;
        self.check_balance(&req.user_id).await?;

        let (meta, prior, user_message) = new_job(req, &model, &plan);
        let live = self.reserve_live_slot(&meta.stream_id)?;
        self.inner.ctx.store.create_job(&meta).await?;
        let created = self
            .save_and_announce(req, &model, &plan, &meta, &prior, &user_message)
            .await?;

        // The upstream history is the tree's path to the new input, prior turns included.
        let mut path = plan.history;
        path.extend(prior);
        path.push(user_message.clone());
        let messages = history_to(&path, Some(&user_message.message_id));
        let started = Started {
            stream_id: meta.stream_id.clone(),
            conversation_id: meta.conversation_id.clone(),
            user_message_id: meta.user_message_id.clone(),
            response_message_id: meta.response_message_id.clone(),
        };
        let request = ModelRequest {
            model: String::new(),
            system_prompt: req.system_prompt.clone(),
            messages,
            tools: {
                let mut specs = self.inner.ctx.tools.specs(&tools);
                specs.extend(req.client_tools.iter().cloned());
                specs
            },
            call_index: 0,
        };
        let model_name = model.name.clone();
        let mut job = JobRun::new(
            self.inner.ctx.clone(),
            meta,
            plan.title,
            model,
            request,
            live,
            &created,
        );
        job.client_tools = req.client_tools.iter().map(|t| t.name.clone()).collect();
        // The job's span is a child of the caller's (the HTTP request's, with its
        // request id), so the job's log lines carry both.
        let span = tracing::info_span!("job", stream_id = %started.stream_id);
        span.in_scope(|| crate::metrics::job_started(&model_name));
        self.inner
            .tracker
            .spawn(tracing::Instrument::instrument(job.run(), span));
        Ok(started)
    }

    /// The request itself: non-empty text, a known model, tools the model may use (a
    /// request may narrow the model's set, never widen it).
    fn validate(&self, req: &StartRequest) -> Result<Validated, EngineError> {
        if req.tool_results.is_empty() && req.text.trim().is_empty() {
            return Err(EngineError::bad_request("text", "must not be empty"));
        }
        if !req.tool_results.is_empty() && !req.text.is_empty() {
            return Err(EngineError::bad_request(
                "text",
                "must be empty when the input is tool results",
            ));
        }
        let models = &self.inner.models;
        let model = match &req.model {
            None => models.first(),
            Some(name) => models.iter().find(|m| &m.name == name),
        }
        .cloned()
        .ok_or_else(|| {
            EngineError::bad_request(
                "model",
                format!(
                    "unknown model {:?}; known: {}",
                    req.model.as_deref().unwrap_or(""),
                    models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        let tools = if req.tools.is_empty() {
            model.tools.clone()
        } else {
            if let Some(t) = req.tools.iter().find(|t| !model.tools.contains(t)) {
                return Err(EngineError::bad_request(
                    "tools",
                    format!(
                        "model {:?} may not use tool {t:?}; it may use: [{}]",
                        model.name,
                        model.tools.join(", ")
                    ),
                ));
            }
            req.tools.clone()
        };
        client_tools::check_client_tools(&req.client_tools, &tools)?;
        Ok(Validated { model, tools })
    }

    /// The conversation: new, or the caller's own with its history; and the message
    /// the new one answers (`parentMessageId`, or the latest).
    async fn load_conversation(&self, req: &StartRequest) -> Result<ConversationPlan, EngineError> {
        let db = &self.inner.ctx.db;
        let existing = match existing_id(req) {
            None => None,
            Some(id) => match self.own_conversation(&req.user_id, id).await {
                Err(EngineError::NotFound(_)) if req.create_conversation => None,
                r => Some(r?),
            },
        };
        let conversation_id = match (&existing, existing_id(req)) {
            (Some(c), _) => c.conversation_id.clone(),
            (None, Some(id)) if req.create_conversation => id.to_string(),
            (None, _) => new_id(),
        };
        let history = match &existing {
            Some(_) => db.list_messages(&conversation_id).await?,
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
        if req.answer_existing
            && !parent_message_id
                .as_ref()
                .and_then(|p| history.iter().find(|m| &m.message_id == p))
                .is_some_and(|m| m.is_created_by_user)
        {
            return Err(EngineError::bad_request(
                "parentMessageId",
                "must name a user message of the conversation to answer it again",
            ));
        }
        let title = match &existing {
            Some(c) => c.title.clone(),
            // A new conversation's title: its first user text (a request may carry
            // earlier turns).
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
        Ok(ConversationPlan {
            conversation_id,
            existing,
            history,
            parent_message_id,
            title,
        })
    }

    /// Reserves a live slot on this replica, never evicting a running job; the slot
    /// frees itself when dropped (a failed start, or the job's task ending).
    ///
    /// Errors: `ServerBusy` at `max_live_jobs`.
    fn reserve_live_slot(&self, stream_id: &str) -> Result<LiveSlot, EngineError> {
        let handles = LiveJob {
            cancel: CancellationToken::new(),
            reason: Arc::new(Mutex::new(None)),
            last_progress: Arc::new(Mutex::new(Instant::now())),
        };
        let mut map = self.inner.live.lock();
        let max = self.inner.ctx.config.max_live_jobs;
        if map.len() >= max {
            return Err(EngineError::ServerBusy(max));
        }
        map.insert(stream_id.to_string(), handles.clone());
        Ok(LiveSlot {
            map: self.inner.live.clone(),
            stream_id: stream_id.to_string(),
            handles,
        })
    }

    /// Saves the conversation (a new one) and the user message, then appends
    /// `created` (seq 0), which it returns. On a failure the job's log is ended, so
    /// no job is left `running` holding the conversation.
    ///
    /// Errors: `NotFound` when the conversation was deleted since its lookup (by
    /// another replica); database and store failures.
    async fn save_and_announce(
        &self,
        req: &StartRequest,
        model: &ModelEntry,
        plan: &ConversationPlan,
        meta: &JobMeta,
        prior: &[Message],
        user_message: &Message,
    ) -> Result<EventBody, EngineError> {
        let ctx = &self.inner.ctx;
        let created = EventBody::Created(Created {
            stream_id: meta.stream_id.clone(),
            conversation_id: meta.conversation_id.clone(),
            user_message: user_message.clone(),
            response_message_id: meta.response_message_id.clone(),
            model: model.name.clone(),
            sender: model.name.clone(),
            created_at: meta.created_at.clone(),
            client_tools: req.client_tools.iter().map(|t| t.name.clone()).collect(),
            protocol_options: req.protocol_options.clone(),
        });
        let saved = async {
            if plan.existing.is_none() {
                ctx.db
                    .save_conversation(&Conversation {
                        conversation_id: meta.conversation_id.clone(),
                        user_id: req.user_id.clone(),
                        title: plan.title.clone(),
                        created_at: meta.created_at.clone(),
                        updated_at: meta.created_at.clone(),
                    })
                    .await?;
                // A client-chosen id may have been saved by another user's start at
                // the same moment: the upsert kept the first owner.
                if req.create_conversation {
                    match ctx.db.get_conversation(&meta.conversation_id).await? {
                        Some(c) if c.user_id == req.user_id => {}
                        _ => {
                            return Err(EngineError::Forbidden(format!(
                                "conversation {}",
                                meta.conversation_id
                            )));
                        }
                    }
                }
            }
            let input = (!req.answer_existing).then_some(user_message);
            for m in prior.iter().chain(input) {
                if !ctx.db.add_message(m).await? {
                    return Err(EngineError::NotFound(format!(
                        "conversation {}",
                        meta.conversation_id
                    )));
                }
            }
            match ctx.store.append(&meta.stream_id, &created, Some(0)).await {
                Ok(_) => Ok(()),
                Err(e @ StoreError::Append(_)) => Err(EngineError::internal("append created", e)),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        if let Err(e) = saved {
            // Leave no job stuck `running`: end the log so the conversation is free.
            let end = EventBody::Error(ErrorEvent {
                code: "internal".into(),
                message: e.to_string(),
                response_message: None,
            });
            if let Err(end_err) = ctx.store.append(&meta.stream_id, &end, None).await {
                // Nobody generates it: the reaper ends it once the store answers.
                tracing::warn!(stream_id = %meta.stream_id, error = %end_err,
                    "could not end a job that failed to start; the reaper will");
            }
            return Err(e);
        }
        Ok(created)
    }

    /// With balances on, the user's balance in micro-credits as a chat is judged by it:
    /// a new user's is created at the start balance and a refill that is due is applied
    /// first ([`crate::billing::settle_balance`]). `None` with balances off.
    ///
    /// Errors: database failures.
    pub async fn balance(&self, user_id: &str) -> Result<Option<i64>, EngineError> {
        match &self.inner.ctx.config.balance {
            None => Ok(None),
            Some(policy) => crate::billing::settle_balance(&*self.inner.ctx.db, policy, user_id)
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

    /// The per-IP, then the per-user sliding window ([`RateLimitStore::rate_limit`](crate::store::RateLimitStore::rate_limit)).
    async fn check_rate_limits(&self, req: &StartRequest) -> Result<(), EngineError> {
        let l = self.inner.ctx.config.limits;
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
            if let Some(wait) = self
                .inner
                .ctx
                .store
                .rate_limit(&key, limit, l.period)
                .await?
            {
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
}

/// How long an unfilled idempotency claim holds its key: a replica that dies
/// mid-start frees the key after this long. A start takes well under a second.
const IDEMPOTENCY_CLAIM_TTL: Duration = Duration::from_secs(60);

impl Idempotency {
    /// The store's key for this key of `user_id`: a hex SHA-256 of both, so that keys
    /// of two users never meet and a key of any length or alphabet is a safe store key.
    pub fn store_key(&self, user_id: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(user_id.as_bytes());
        h.update([0u8]);
        h.update(self.key.as_bytes());
        format!("{:x}", h.finalize())
    }
}

/// The existing conversation a request names, if any (`None`, `"new"` and `""` start
/// a new one).
fn existing_id(req: &StartRequest) -> Option<&str> {
    match req.conversation_id.as_deref() {
        None | Some("new") | Some("") => None,
        Some(id) => Some(id),
    }
}

/// The new job's metadata, the turns its request carries (as messages) and its user
/// message (the new input: text, or tool results), with fresh ids.
fn new_job(
    req: &StartRequest,
    model: &ModelEntry,
    plan: &ConversationPlan,
) -> (JobMeta, Vec<Message>, Message) {
    let created_at = now_rfc3339();
    let prior = client_tools::prior_messages(
        &req.prior,
        &plan.conversation_id,
        plan.parent_message_id.clone(),
        &model.name,
        &created_at,
    );
    let existing_input = req
        .answer_existing
        .then(|| {
            plan.history
                .iter()
                .find(|m| Some(&m.message_id) == plan.parent_message_id.as_ref())
        })
        .flatten();
    let user_message = existing_input.cloned().unwrap_or_else(|| Message {
        message_id: new_id(),
        conversation_id: plan.conversation_id.clone(),
        parent_message_id: prior
            .last()
            .map(|m| m.message_id.clone())
            .or_else(|| plan.parent_message_id.clone()),
        sender: "User".into(),
        text: req.text.clone(),
        content: client_tools::results_content(&req.tool_results),
        is_created_by_user: true,
        model: None,
        unfinished: false,
        error: false,
        created_at: created_at.clone(),
    });
    let meta = JobMeta {
        stream_id: new_id(),
        user_id: req.user_id.clone(),
        conversation_id: plan.conversation_id.clone(),
        user_message_id: user_message.message_id.clone(),
        response_message_id: new_id(),
        model: model.name.clone(),
        status: JobStatus::Running,
        created_at,
        webhook_url: req.webhook_url.clone(),
    };
    (meta, prior, user_message)
}
