//! The Redis job store: many replicas, one set of logs (SPEC §3–§5, issue 2/4).
//!
//! # Layout
//! Every key of a job carries the hash tag `{streamId}`, so a job's keys live in one
//! Cluster slot and the append function may touch them together:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:job:{sid}` | hash | the job's metadata, `owner` replica, `len` and `bytes` of its log, `ended`, `status` |
//! | `P:log:{sid}` | stream | one entry per event, id `0-(seq+1)`, field `f` = the SSE frame bytes |
//! | `P:conv:{cid}` | string | the conversation's latest job (doubles as its one-running-job lock) |
//! | `P:user:{uid}:running` | set | the user's running jobs (self-healing: stale ids dropped when read) |
//! | `P:running` | set | every running job (the lease reaper's list; self-healing too) |
//! | `P:replica:{rid}` | string | a replica's lease, renewed every `lease_ttl / 3` |
//! | `P:rlw:{key}` | sorted set | a rate limit's hits in its window (member: a hit id, score: Redis `TIME` in µs) |
//!
//! Channels: `P:ch:{sid}` carries each appended frame, `P:ctl:abort` carries abort
//! requests (a stream id) to whichever replica owns the job.
//!
//! # Appending
//! One server-side step, the Redis Function `genstream_append_v1` (`append.lua`): seq,
//! caps, frame, XADD, TTLs and PUBLISH together, so there is never a seq without a log
//! entry or an entry without a publish, and two writers racing to end a job produce
//! exactly one terminal event. The frame is built in Lua, so every replica serves the
//! very bytes that were published.
//!
//! # Fan-out
//! A replica keeps a local [`EventLog`] *mirror* of each log its own subscribers read,
//! and serves them from it exactly as the memory store does. A mirror is filled
//! strictly by seq: subscribe to the job's channel first (confirmed by Redis), then read
//! the stream from the mirror's head, then apply published frames; a frame whose seq is
//! not the next one makes the replica read the missing range from the stream. Nothing
//! is buffered by time and nothing is skipped. A healer compares each live mirror with
//! the job's `len` every second, so even a lost publish (or a lost terminal event) is
//! repaired within a second; after a lost connection the replica re-subscribes and
//! re-reads every mirror from its head.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use genstream_engine::EngineError;
use genstream_engine::event::{EventBody, Frame};
use genstream_engine::log::{AppendError, EventLog, LogLimits};
use genstream_engine::store::{AbortHandler, JobMeta, JobStatus, JobStore, Orphan, OrphanReason};
use parking_lot::{Mutex, RwLock};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{AsyncCommands, Value};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// The Redis function library; its name carries the version.
const LIBRARY: &str = include_str!("append.lua");
const APPEND_FN: &str = "genstream_append_v1";
const CLAIM_FN: &str = "genstream_claim_v1";
const CLAIM_ORPHAN_FN: &str = "genstream_claim_orphan_v1";
const ACQUIRE_SLOT_FN: &str = "genstream_acquire_slot_v1";
const RATE_WINDOW_FN: &str = "genstream_rate_window_v1";
/// Stream entries read per XRANGE when catching a mirror up.
const RANGE_BATCH: usize = 1000;

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key and channel, so several deployments (or CI runs) can share
    /// one Redis. Default `genstream`.
    pub key_prefix: String,
    /// A replica's lease; its jobs are declared lost this long after it stops renewing.
    /// Default 8 s.
    pub lease_ttl: Duration,
    /// TTL of a running job's keys, refreshed by every append. Default 24 h.
    pub running_ttl: Duration,
    /// TTL of a finished job's keys (the retention). Default 1 h.
    pub retention: Duration,
    /// Per-job log caps, enforced by the append function.
    pub limits: LogLimits,
    /// Timeout to connect and for each command; past it the call fails and the caller
    /// sees `store_unavailable`. Default 2 s.
    pub timeout: Duration,
    /// Running jobs per user across all replicas (`None`: no cap).
    pub max_running_per_user: Option<usize>,
}

impl RedisConfig {
    /// Defaults for `url`.
    pub fn new(url: &str) -> Self {
        RedisConfig {
            url: url.to_string(),
            key_prefix: "genstream".into(),
            lease_ttl: Duration::from_secs(8),
            running_ttl: Duration::from_secs(86_400),
            retention: Duration::from_secs(3600),
            limits: LogLimits::default(),
            timeout: Duration::from_secs(2),
            max_running_per_user: None,
        }
    }
}

struct Mirror {
    log: Arc<EventLog>,
    /// Set once the channel is subscribed and the stream read up to its head.
    ready: OnceCell<()>,
}

struct Inner {
    cfg: RedisConfig,
    replica_id: String,
    client: redis::Client,
    conn: ConnectionManager,
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    mirrors: Mutex<HashMap<String, Arc<Mirror>>>,
    abort_handler: RwLock<Option<AbortHandler>>,
    pubsub_up: AtomicBool,
    /// Since when this replica has reached Redis without a failure (`None` while it
    /// cannot). Leases of others are judged only after a whole lease TTL of health:
    /// during an outage every lease expires, and a live owner needs up to a third of
    /// the TTL after recovery to renew its own.
    healthy_since: Mutex<Option<tokio::time::Instant>>,
    stop: CancellationToken,
}

/// The Redis [`JobStore`]. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

fn store_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Store(format!("redis: {e}"))
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl RedisStore {
    /// Connects, loads the function library and starts the pub/sub dispatcher, the
    /// lease renewer and the mirror healer.
    ///
    /// Errors: one line naming the Redis that could not be reached.
    pub async fn connect(cfg: RedisConfig) -> Result<RedisStore, EngineError> {
        let shown = redact_url(&cfg.url);
        let fail = |e: redis::RedisError| {
            EngineError::Store(format!("could not connect to Redis at {shown}: {e}"))
        };
        let client = redis::Client::open(cfg.url.as_str()).map_err(fail)?;
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let mut conn = tokio::time::timeout(
            cfg.timeout,
            client.get_connection_manager_with_config(mgr_cfg),
        )
        .await
        .map_err(|_| {
            EngineError::Store(format!("could not connect to Redis at {shown}: timed out"))
        })?
        .map_err(fail)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(fail)?;
        let _: Value = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(LIBRARY)
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                EngineError::Store(format!(
                    "could not load genstream's Redis functions (Redis 7 or newer is needed): {e}"
                ))
            })?;
        let store = RedisStore {
            inner: Arc::new(Inner {
                replica_id: uuid::Uuid::now_v7().to_string(),
                cfg,
                client,
                conn,
                sink: tokio::sync::Mutex::new(None),
                mirrors: Mutex::new(HashMap::new()),
                abort_handler: RwLock::new(None),
                pubsub_up: AtomicBool::new(false),
                healthy_since: Mutex::new(Some(tokio::time::Instant::now())),
                stop: CancellationToken::new(),
            }),
        };
        let stream = store.open_pubsub().await.map_err(fail)?;
        store.renew_lease().await?;
        tokio::spawn(store.clone().dispatch(stream));
        tokio::spawn(store.clone().background());
        Ok(store)
    }

    /// This replica's id (the `owner` of the jobs it runs).
    pub fn replica_id(&self) -> &str {
        &self.inner.replica_id
    }

    /// Stops the background tasks (the lease lapses after its TTL).
    pub fn close(&self) {
        self.inner.stop.cancel();
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{{{id}}}", self.inner.cfg.key_prefix)
    }
    fn channel(&self, sid: &str) -> String {
        format!("{}:ch:{sid}", self.inner.cfg.key_prefix)
    }
    fn ctl_channel(&self) -> String {
        format!("{}:ctl:abort", self.inner.cfg.key_prefix)
    }
    fn running_key(&self) -> String {
        format!("{}:running", self.inner.cfg.key_prefix)
    }
    fn user_running_key(&self, uid: &str) -> String {
        format!("{}:user:{{{uid}}}:running", self.inner.cfg.key_prefix)
    }
    fn lease_key(&self, rid: &str) -> String {
        format!("{}:replica:{rid}", self.inner.cfg.key_prefix)
    }
    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    async fn renew_lease(&self) -> Result<(), EngineError> {
        let ms = self.inner.cfg.lease_ttl.as_millis() as u64;
        let _: () = self
            .conn()
            .set_options(
                self.lease_key(&self.inner.replica_id),
                1,
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ms)),
            )
            .await
            .map_err(store_err)?;
        Ok(())
    }

    /// A fresh pub/sub connection subscribed to the control channel and to every
    /// mirror's channel.
    async fn open_pubsub(&self) -> redis::RedisResult<redis::aio::PubSubStream> {
        let ps = tokio::time::timeout(self.inner.cfg.timeout, self.inner.client.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out"))
            })??;
        let (mut sink, stream) = ps.split();
        let mut channels = vec![self.ctl_channel()];
        channels.extend(
            self.inner
                .mirrors
                .lock()
                .keys()
                .map(|sid| self.channel(sid)),
        );
        sink.subscribe(&channels).await?;
        *self.inner.sink.lock().await = Some(sink);
        self.inner.pubsub_up.store(true, Ordering::SeqCst);
        Ok(stream)
    }

    /// Applies published frames and abort requests; reconnects when the connection
    /// drops, then re-reads every mirror from its head.
    async fn dispatch(self, mut stream: redis::aio::PubSubStream) {
        let ch_prefix = format!("{}:ch:", self.inner.cfg.key_prefix);
        let ctl = self.ctl_channel();
        loop {
            loop {
                let msg = tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    m = stream.next() => m,
                };
                let Some(msg) = msg else { break };
                let channel = msg.get_channel_name();
                if channel == ctl {
                    if let Ok(sid) = std::str::from_utf8(msg.get_payload_bytes()) {
                        let handler = self.inner.abort_handler.read().clone();
                        if let Some(h) = handler {
                            h(sid);
                        }
                    }
                } else if let Some(sid) = channel.strip_prefix(&ch_prefix) {
                    self.on_frame(sid, Bytes::copy_from_slice(msg.get_payload_bytes()));
                }
            }
            self.inner.pubsub_up.store(false, Ordering::SeqCst);
            self.mark_unhealthy();
            tracing::warn!("lost the Redis pub/sub connection; reconnecting");
            let mut delay = Duration::from_millis(100);
            stream = loop {
                tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match self.open_pubsub().await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::debug!(error = %e, "pub/sub reconnect failed");
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            };
            tracing::info!("Redis pub/sub reconnected; re-reading mirrors");
            let sids: Vec<String> = self.inner.mirrors.lock().keys().cloned().collect();
            for sid in sids {
                let this = self.clone();
                tokio::spawn(async move {
                    let _ = this.catch_up(&sid).await;
                });
            }
        }
    }

    fn on_frame(&self, sid: &str, bytes: Bytes) {
        let Some(frame) = Frame::parse(bytes) else {
            return;
        };
        let Some(m) = self.inner.mirrors.lock().get(sid).cloned() else {
            return;
        };
        if m.ready.get().is_none() {
            return; // the initial read will cover it
        }
        let seq = frame.seq;
        if !m.log.insert_frame(frame) && seq > m.log.len() {
            // A gap: read the missing range from the stream, never skip.
            let this = self.clone();
            let sid = sid.to_string();
            tokio::spawn(async move {
                let _ = this.catch_up(&sid).await;
            });
        }
    }

    /// Reads the stream from the mirror's head into the mirror.
    async fn catch_up(&self, sid: &str) -> Result<(), EngineError> {
        let Some(m) = self.inner.mirrors.lock().get(sid).cloned() else {
            return Ok(());
        };
        let key = self.key("log", sid);
        let mut conn = self.conn();
        loop {
            let from = m.log.len() + 1;
            let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("0-{from}"))
                .arg("+")
                .arg("COUNT")
                .arg(RANGE_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(store_err)?;
            let n = entries.len();
            for (_, fields) in entries {
                if let Some(f) = fields
                    .get("f")
                    .and_then(|b| Frame::parse(Bytes::from(b.clone())))
                {
                    m.log.insert_frame(f);
                }
            }
            if n < RANGE_BATCH {
                return Ok(());
            }
        }
    }

    /// Renews the lease; heals mirrors that fell behind (a lost publish); drops mirrors
    /// nobody reads any more.
    async fn background(self) {
        let lease_every = self.inner.cfg.lease_ttl / 3;
        let mut lease = tokio::time::interval(lease_every.max(Duration::from_millis(100)));
        let mut heal = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = lease.tick() => {
                    match self.renew_lease().await {
                        Err(e) => {
                            self.mark_unhealthy();
                            tracing::warn!(error = %e, "could not renew the replica lease");
                        }
                        Ok(()) => {
                            let mut h = self.inner.healthy_since.lock();
                            if h.is_none() && self.inner.pubsub_up.load(Ordering::SeqCst) {
                                *h = Some(tokio::time::Instant::now());
                            }
                        }
                    }
                }
                _ = heal.tick() => self.heal_mirrors().await,
            }
        }
    }

    async fn heal_mirrors(&self) {
        let mirrors: Vec<(String, Arc<Mirror>)> = self
            .inner
            .mirrors
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut unused = Vec::new();
        for (sid, m) in mirrors {
            // The map and this loop hold the only references: no subscriber.
            if Arc::strong_count(&m) <= 2 && Arc::strong_count(&m.log) == 1 {
                unused.push(sid);
                continue;
            }
            if m.ready.get().is_none() || m.log.terminal().is_some() {
                continue;
            }
            let len: Option<u64> = self
                .conn()
                .hget(self.key("job", &sid), "len")
                .await
                .unwrap_or(None);
            if len.is_some_and(|l| l > m.log.len()) {
                let _ = self.catch_up(&sid).await;
            }
        }
        if !unused.is_empty() {
            let channels: Vec<String> = {
                let mut map = self.inner.mirrors.lock();
                let mut gone = Vec::new();
                for sid in &unused {
                    let still_unused = map.get(sid).is_some_and(|m| {
                        Arc::strong_count(m) == 1 && Arc::strong_count(&m.log) == 1
                    });
                    if still_unused {
                        map.remove(sid);
                        gone.push(self.channel(sid));
                    }
                }
                gone
            };
            if let Some(sink) = self.inner.sink.lock().await.as_mut() {
                let _ = sink.unsubscribe(&channels).await;
            }
        }
    }

    fn mark_unhealthy(&self) {
        *self.inner.healthy_since.lock() = None;
    }

    /// True once this replica has been healthy for a whole lease TTL, so a missing
    /// lease really means a dead owner.
    fn may_judge_leases(&self) -> bool {
        self.inner
            .healthy_since
            .lock()
            .is_some_and(|t| t.elapsed() >= self.inner.cfg.lease_ttl)
    }

    async fn meta(
        &self,
        sid: &str,
    ) -> Result<Option<(JobMeta, HashMap<String, String>)>, EngineError> {
        let h: HashMap<String, String> = self
            .conn()
            .hgetall(self.key("job", sid))
            .await
            .map_err(store_err)?;
        Ok(meta_of(&h).map(|m| (m, h)))
    }
}

fn meta_of(h: &HashMap<String, String>) -> Option<JobMeta> {
    let g = |k: &str| h.get(k).cloned();
    Some(JobMeta {
        stream_id: g("streamId")?,
        user_id: g("userId")?,
        conversation_id: g("conversationId")?,
        user_message_id: g("userMessageId")?,
        response_message_id: g("responseMessageId")?,
        model: g("model")?,
        status: match g("status")?.as_str() {
            "complete" => JobStatus::Complete,
            "aborted" => JobStatus::Aborted,
            "error" => JobStatus::Error,
            _ => JobStatus::Running,
        },
        created_at: g("createdAt")?,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait]
impl JobStore for RedisStore {
    async fn create_job(&self, meta: &JobMeta) -> Result<(), EngineError> {
        let mut conn = self.conn();
        let conv_key = self.key("conv", &meta.conversation_id);
        let ttl_ms = self.inner.cfg.running_ttl.as_millis() as u64;
        // The job hash first: the self-healing pass below drops set members whose
        // job is not running, so a slot must never exist before its job. Then a
        // running slot of the user (atomic count-and-add); then claim the conversation
        // (compare-and-set against the holder we saw ended), so the conversation never
        // points at a job that is not there; then the global running set. Each failure
        // undoes what came before it.
        let user_key = self.user_running_key(&meta.user_id);
        let job_key = self.key("job", &meta.stream_id);
        let _: () = redis::pipe()
            .atomic()
            .hset_multiple(
                &job_key,
                &[
                    ("streamId", meta.stream_id.as_str()),
                    ("userId", meta.user_id.as_str()),
                    ("conversationId", meta.conversation_id.as_str()),
                    ("userMessageId", meta.user_message_id.as_str()),
                    ("responseMessageId", meta.response_message_id.as_str()),
                    ("model", meta.model.as_str()),
                    ("status", "running"),
                    ("createdAt", meta.created_at.as_str()),
                    ("owner", self.inner.replica_id.as_str()),
                    ("len", "0"),
                    ("bytes", "0"),
                    ("ended", "0"),
                ],
            )
            .ignore()
            .pexpire(&job_key, ttl_ms as i64)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(store_err)?;
        if let Some(max) = self.inner.cfg.max_running_per_user {
            // Self-healing first: ids of jobs that ended (or expired) do not count.
            self.running_jobs(&meta.user_id).await?;
            let ok: i64 = redis::cmd("FCALL")
                .arg(ACQUIRE_SLOT_FN)
                .arg(1)
                .arg(&user_key)
                .arg(&meta.stream_id)
                .arg(max)
                .query_async(&mut conn)
                .await
                .map_err(store_err)?;
            if ok == 0 {
                let _: Result<(), _> = conn.del(&job_key).await;
                return Err(EngineError::TooManyConcurrent(max));
            }
        } else {
            let _: () = conn
                .sadd(&user_key, &meta.stream_id)
                .await
                .map_err(store_err)?;
        }
        let release = |mut conn: ConnectionManager, job_key: String| {
            let user_key = user_key.clone();
            let sid = meta.stream_id.clone();
            async move {
                let _: Result<(), _> = redis::pipe()
                    .srem(&user_key, &sid)
                    .ignore()
                    .del(&job_key)
                    .ignore()
                    .query_async(&mut conn)
                    .await;
            }
        };
        let mut claimed = false;
        for _ in 0..3 {
            let holder: Option<String> = conn.get(&conv_key).await.map_err(store_err)?;
            if let Some(h) = &holder {
                let running: Option<(Option<String>, Option<String>)> = redis::cmd("HMGET")
                    .arg(self.key("job", h))
                    .arg("ended")
                    .arg("status")
                    .query_async(&mut conn)
                    .await
                    .map_err(store_err)?;
                if let Some((ended, Some(status))) = running
                    && ended.as_deref() != Some("1")
                    && status == "running"
                {
                    release(conn.clone(), job_key.clone()).await;
                    return Err(EngineError::ConversationBusy(meta.conversation_id.clone()));
                }
            }
            let ok: i64 = redis::cmd("FCALL")
                .arg(CLAIM_FN)
                .arg(1)
                .arg(&conv_key)
                .arg(&meta.stream_id)
                .arg(holder.unwrap_or_default())
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await
                .map_err(store_err)?;
            if ok == 1 {
                claimed = true;
                break;
            }
        }
        if !claimed {
            release(conn.clone(), job_key.clone()).await;
            return Err(EngineError::ConversationBusy(meta.conversation_id.clone()));
        }
        let _: () = conn
            .sadd(self.running_key(), &meta.stream_id)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn get_job(&self, stream_id: &str) -> Result<Option<JobMeta>, EngineError> {
        Ok(self.meta(stream_id).await?.map(|(m, _)| m))
    }

    async fn latest_job(&self, conversation_id: &str) -> Result<Option<JobMeta>, EngineError> {
        let holder: Option<String> = self
            .conn()
            .get(self.key("conv", conversation_id))
            .await
            .map_err(store_err)?;
        match holder {
            Some(sid) => self.get_job(&sid).await,
            None => Ok(None),
        }
    }

    async fn running_jobs(&self, user_id: &str) -> Result<Vec<JobMeta>, EngineError> {
        let set = self.user_running_key(user_id);
        let ids: Vec<String> = self.conn().smembers(&set).await.map_err(store_err)?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for id in ids {
            match self.get_job(&id).await? {
                Some(m) if m.status == JobStatus::Running => out.push(m),
                _ => stale.push(id),
            }
        }
        if !stale.is_empty() {
            let _: () = self.conn().srem(&set, &stale).await.map_err(store_err)?;
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    async fn append(
        &self,
        stream_id: &str,
        body: &EventBody,
        expected_seq: Option<u64>,
    ) -> Result<Result<u64, AppendError>, EngineError> {
        let json = serde_json::to_string(body).map_err(|e| EngineError::Internal(e.to_string()))?;
        let terminal = body.is_terminal();
        let status = match body {
            EventBody::Final(f) => match f.status {
                genstream_engine::event::FinalStatus::Complete => "complete",
                genstream_engine::event::FinalStatus::Aborted => "aborted",
            },
            EventBody::Error(_) => "error",
            _ => "running",
        };
        let cfg = &self.inner.cfg;
        let reply: Vec<Value> = redis::cmd("FCALL")
            .arg(APPEND_FN)
            .arg(2)
            .arg(self.key("job", stream_id))
            .arg(self.key("log", stream_id))
            .arg(body.name())
            .arg(json)
            .arg(if terminal { "1" } else { "0" })
            .arg(cfg.limits.max_events)
            .arg(cfg.limits.max_bytes)
            .arg(cfg.running_ttl.as_millis() as u64)
            .arg(cfg.retention.as_millis() as u64)
            .arg(self.channel(stream_id))
            .arg(status)
            .arg(now_ms())
            .arg(expected_seq.map(|s| s.to_string()).unwrap_or_default())
            .arg(&self.inner.replica_id)
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        let tag = match reply.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).to_string(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        };
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(i)) => Some(*i as u64),
            _ => None,
        };
        match tag.as_str() {
            "ok" => {
                let seq = int(reply.get(1)).ok_or_else(|| store_err("bad append reply"))?;
                if let Some(Value::BulkString(b)) = reply.get(2) {
                    // Local subscribers need not wait for the publish to come back.
                    let mirror = self.inner.mirrors.lock().get(stream_id).cloned();
                    if let Some(m) = mirror.filter(|m| m.ready.get().is_some())
                        && let Some(f) = Frame::parse(Bytes::from(b.clone()))
                    {
                        m.log.insert_frame(f);
                    }
                }
                if terminal && let Some((meta, _)) = self.meta(stream_id).await? {
                    let _: Result<(), _> = redis::pipe()
                        .srem(self.user_running_key(&meta.user_id), stream_id)
                        .ignore()
                        .srem(self.running_key(), stream_id)
                        .ignore()
                        .query_async(&mut self.conn())
                        .await;
                }
                Ok(Ok(seq))
            }
            "dup" => Ok(Ok(int(reply.get(1)).unwrap_or_default())),
            "ended" => Ok(Err(AppendError::Ended)),
            "full" => Ok(Err(AppendError::Full)),
            "missing" => Err(EngineError::NotFound(format!("job {stream_id}"))),
            other => Err(store_err(format!("unexpected append reply {other:?}"))),
        }
    }

    async fn open_log(&self, stream_id: &str) -> Result<Option<Arc<EventLog>>, EngineError> {
        let existing = self.inner.mirrors.lock().get(stream_id).cloned();
        let m = match existing {
            Some(m) => m,
            None => {
                let exists: bool = self
                    .conn()
                    .exists(self.key("job", stream_id))
                    .await
                    .map_err(store_err)?;
                if !exists {
                    return Ok(None);
                }
                self.inner
                    .mirrors
                    .lock()
                    .entry(stream_id.to_string())
                    .or_insert_with(|| {
                        Arc::new(Mirror {
                            // The owner's function enforces the caps; a mirror takes
                            // whatever the log holds.
                            log: Arc::new(EventLog::new(LogLimits {
                                max_events: usize::MAX,
                                max_bytes: usize::MAX,
                            })),
                            ready: OnceCell::new(),
                        })
                    })
                    .clone()
            }
        };
        m.ready
            .get_or_try_init(|| async {
                // Subscribe first (Redis confirms it), then read: no event can fall
                // between the two (LESSONS: Vercel resumable-stream #41).
                {
                    let mut sink = self.inner.sink.lock().await;
                    match sink.as_mut() {
                        Some(s) => s
                            .subscribe(self.channel(stream_id))
                            .await
                            .map_err(store_err)?,
                        None => return Err(store_err("pub/sub is reconnecting")),
                    }
                }
                self.catch_up(stream_id).await
            })
            .await?;
        Ok(Some(m.log.clone()))
    }

    async fn remove_expired(&self, _retention: Duration) -> Result<usize, EngineError> {
        // Redis expires finished jobs by TTL; unused mirrors are dropped by the healer.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), EngineError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        if !self.inner.pubsub_up.load(Ordering::SeqCst) {
            return Err(store_err("pub/sub connection is down"));
        }
        Ok(())
    }

    async fn request_abort(&self, stream_id: &str) -> Result<(), EngineError> {
        let _: () = self
            .conn()
            .publish(self.ctl_channel(), stream_id)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    /// One step of `genstream_rate_window_v1` (`append.lua`): drop the hits that left
    /// the window, count, add this one if under the limit — judged by Redis's clock, so
    /// all replicas share one window whatever their own clocks say.
    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
    ) -> Result<Option<Duration>, EngineError> {
        let period_ms = period.as_millis() as u64;
        if limit == 0 || period_ms == 0 {
            return Ok(None);
        }
        let wait_us: i64 = redis::cmd("FCALL")
            .arg(RATE_WINDOW_FN)
            .arg(1)
            .arg(format!("{}:rlw:{{{key}}}", self.inner.cfg.key_prefix))
            .arg(limit)
            .arg(period_ms)
            .arg(uuid::Uuid::now_v7().to_string())
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us as u64)))
    }

    async fn sync_log(&self, stream_id: &str) -> Result<(), EngineError> {
        self.catch_up(stream_id).await
    }

    async fn claim_orphan(&self, stream_id: &str) -> Result<bool, EngineError> {
        let ok: i64 = redis::cmd("FCALL")
            .arg(CLAIM_ORPHAN_FN)
            .arg(1)
            .arg(self.key("job", stream_id))
            .arg(&self.inner.replica_id)
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        Ok(ok == 1)
    }

    fn set_abort_handler(&self, handler: AbortHandler) {
        *self.inner.abort_handler.write() = Some(handler);
    }

    async fn orphaned_jobs(&self, live: &HashSet<String>) -> Result<Vec<Orphan>, EngineError> {
        let judge_leases = self.may_judge_leases();
        let ids: Vec<String> = self
            .conn()
            .smembers(self.running_key())
            .await
            .map_err(|e| {
                self.mark_unhealthy();
                store_err(e)
            })?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        let mut leases: HashMap<String, bool> = HashMap::new();
        for id in ids {
            let Some((meta, h)) = self.meta(&id).await? else {
                stale.push(id);
                continue;
            };
            if meta.status != JobStatus::Running || h.get("ended").map(String::as_str) == Some("1")
            {
                stale.push(id);
                continue;
            }
            let owner = h.get("owner").cloned().unwrap_or_default();
            if h.contains_key("reaper") {
                continue; // a reaper has it already
            }
            if owner == self.inner.replica_id {
                if !live.contains(&id) {
                    out.push(Orphan {
                        meta,
                        reason: OrphanReason::Abandoned,
                    });
                }
                continue;
            }
            if !judge_leases {
                continue;
            }
            let alive = match leases.get(&owner) {
                Some(a) => *a,
                None => {
                    let a: bool = self
                        .conn()
                        .exists(self.lease_key(&owner))
                        .await
                        .map_err(store_err)?;
                    leases.insert(owner.clone(), a);
                    a
                }
            };
            if !alive {
                out.push(Orphan {
                    meta,
                    reason: OrphanReason::ReplicaLost,
                });
            }
        }
        if !stale.is_empty() {
            let _: () = self
                .conn()
                .srem(self.running_key(), &stale)
                .await
                .map_err(store_err)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
