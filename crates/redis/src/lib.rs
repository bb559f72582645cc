//! The Redis job store: many replicas, one set of logs (SPEC §3–§5, issue 2/4).
//!
//! # Layout
//! Every key of a job carries the hash tag `{streamId}`, so a job's keys live in one
//! Cluster slot and the append function may touch them together:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:job:{sid}` | hash | the job's metadata, `owner` replica, `len` and `bytes` of its log, `ended`, `status`, the end claim (`reaper`, `reaperAt`), `abortRequested` |
//! | `P:log:{sid}` | stream | one entry per event, id `0-(seq+1)`, field `f` = the SSE frame bytes, `w` = the writer's replica id |
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
//! One server-side step, the Redis Function `genstream_append_v2` (`append.lua`): seq,
//! caps, frame, XADD, TTLs and PUBLISH together, so there is never a seq without a log
//! entry or an entry without a publish, and two writers racing to end a job produce
//! exactly one terminal event. The frame is built in Lua, so every replica serves the
//! very bytes that were published. One `FCALL` per event; if Redis lost the functions
//! (a restart without persistence, `FUNCTION FLUSH`, a failover) the call loads them
//! again and retries once.
//!
//! # Ending a job
//! Whoever ends a job — its owner, or a reaper of an orphan — first takes the job's
//! *end claim* (`genstream_claim_end_v2`), then saves the response message, then
//! appends the terminal event. Only the claimant may append after the claim, so there
//! is one writer per response message even when an owner presumed dead is alive.
//!
//! # Fan-out
//! A replica keeps a local [`EventLog`] *mirror* of each log its own subscribers read,
//! and serves them from it exactly as the memory store does. A mirror is filled
//! strictly by seq: subscribe to the job's channel first (confirmed by Redis), buffer
//! what is published meanwhile, read the stream from the mirror's head, then merge the
//! buffer by seq and apply published frames from then on; a frame whose seq is not the
//! next one makes the replica read the missing range from the stream. Nothing is
//! buffered by time and nothing is skipped. A healer compares each live mirror with the
//! job's `len` every second, so even a lost publish (or a lost terminal event) is
//! repaired within a second; after a lost connection the replica re-subscribes and
//! re-reads every mirror from its head. A mirror whose job vanished from Redis (a
//! restart without persistence) ends with a local `error` `store_unavailable`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use genstream_engine::EngineError;
use genstream_engine::event::{ErrorEvent, EventBody, Frame};
use genstream_engine::log::{AppendError, EventLog, LogLimits};
use genstream_engine::store::{AbortHandler, JobMeta, JobStatus, JobStore, Orphan, OrphanReason};
use parking_lot::{Mutex, RwLock};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{AsyncCommands, FromRedisValue, Value};
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;

/// The Redis function library; its name carries the version.
const LIBRARY: &str = include_str!("append.lua");
const LIBRARY_NAME: &str = "genstream_v2";
const APPEND_FN: &str = "genstream_append_v2";
const CLAIM_FN: &str = "genstream_claim_v2";
const CLAIM_END_FN: &str = "genstream_claim_end_v2";
const REQUEST_ABORT_FN: &str = "genstream_request_abort_v2";
const ACQUIRE_SLOT_FN: &str = "genstream_acquire_slot_v2";
const RATE_WINDOW_FN: &str = "genstream_rate_window_v2";
/// Stream entries read per XRANGE when catching a mirror up.
const RANGE_BATCH: usize = 1000;
/// Frames a mirror buffers while it is being opened; past it the rest are left to the
/// range read that follows (it reads to the stream's head anyway).
const PENDING_CAP: usize = 10_000;
/// How often, and how long, an abort request is published again while its job runs,
/// so an owner whose pub/sub connection was down at the first publish still gets it.
const ABORT_REPUBLISH_EVERY: Duration = Duration::from_millis(500);
const ABORT_REPUBLISH_FOR: Duration = Duration::from_secs(30);

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key and channel, so several deployments (or CI runs) can share
    /// one Redis. Default `genstream`.
    pub key_prefix: String,
    /// A replica's lease; its jobs are declared lost this long after it stops renewing.
    /// Also the age past which a reaper's unfinished end claim may be taken over.
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
    /// How often the healer compares mirrors with Redis and the pub/sub connection is
    /// sent a `PING` (a connection that does not answer within `timeout` is replaced).
    /// Default 1 s.
    pub heal_interval: Duration,
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
            heal_interval: Duration::from_secs(1),
        }
    }
}

struct Mirror {
    log: Arc<EventLog>,
    /// Set once the channel is subscribed and the stream read up to its head.
    ready: OnceCell<()>,
    /// Frames published while the mirror is being opened (subscribed, stream not read
    /// yet), merged by seq once the read is done; `None` from then on.
    pending: Mutex<Option<Vec<Frame>>>,
}

impl Mirror {
    fn new() -> Mirror {
        Mirror {
            // The append function enforces the caps; a mirror takes whatever the log
            // holds.
            log: Arc::new(EventLog::new(LogLimits {
                max_events: usize::MAX,
                max_bytes: usize::MAX,
            })),
            ready: OnceCell::new(),
            pending: Mutex::new(Some(Vec::new())),
        }
    }
}

struct Inner {
    cfg: RedisConfig,
    replica_id: String,
    client: redis::Client,
    /// The multiplexed command connection. Replaced when it stops answering: the
    /// manager reconnects by itself after an I/O error, not after timeouts (a half-open
    /// connection gives nothing else).
    conn: RwLock<ConnectionManager>,
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    mirrors: Mutex<HashMap<String, Arc<Mirror>>>,
    abort_handler: RwLock<Option<AbortHandler>>,
    pubsub_up: AtomicBool,
    /// Tells the dispatcher to drop its pub/sub connection and open a new one (the
    /// connection did not answer a `PING`).
    reconnect: Notify,
    /// Stream ids whose abort request is being published again.
    republishing: Mutex<HashSet<String>>,
    /// Since when this replica has reached Redis without a failure (`None` while it
    /// cannot). Leases of others are judged only after a whole lease TTL of health:
    /// during an outage every lease expires, and a live owner needs up to a third of
    /// the TTL after recovery to renew its own.
    healthy_since: Mutex<Option<tokio::time::Instant>>,
    stop: CancellationToken,
    #[cfg(test)]
    gates: Mutex<HashMap<&'static str, Arc<tests::Gate>>>,
}

/// The Redis [`JobStore`]. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

fn store_err(e: impl std::fmt::Display) -> EngineError {
    genstream_engine::metrics::redis_error();
    EngineError::Store(format!("redis: {e}"))
}

/// True for the error Redis gives when a called function is not loaded.
fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
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
    /// Connects, loads the function library and starts the pub/sub dispatcher and
    /// health check, the lease renewer and the mirror healer.
    ///
    /// Errors: one line naming the Redis that could not be reached.
    pub async fn connect(cfg: RedisConfig) -> Result<RedisStore, EngineError> {
        let shown = redact_url(&cfg.url);
        let fail = |e: redis::RedisError| {
            EngineError::Store(format!("could not connect to Redis at {shown}: {e}"))
        };
        let client = redis::Client::open(cfg.url.as_str()).map_err(fail)?;
        let mut conn = command_connection(&client, cfg.timeout)
            .await
            .map_err(fail)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(fail)?;
        load_library(&mut conn).await?;
        let store = RedisStore {
            inner: Arc::new(Inner {
                replica_id: uuid::Uuid::now_v7().to_string(),
                cfg,
                client,
                conn: RwLock::new(conn),
                sink: tokio::sync::Mutex::new(None),
                mirrors: Mutex::new(HashMap::new()),
                abort_handler: RwLock::new(None),
                pubsub_up: AtomicBool::new(false),
                reconnect: Notify::new(),
                republishing: Mutex::new(HashSet::new()),
                healthy_since: Mutex::new(Some(tokio::time::Instant::now())),
                stop: CancellationToken::new(),
                #[cfg(test)]
                gates: Mutex::new(HashMap::new()),
            }),
        };
        let stream = store.open_pubsub().await.map_err(fail)?;
        store.renew_lease().await?;
        tokio::spawn(store.clone().dispatch(stream));
        tokio::spawn(store.clone().lease_loop());
        tokio::spawn(store.clone().heal_loop());
        tokio::spawn(store.clone().pubsub_health_loop());
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
        self.inner.conn.read().clone()
    }

    /// Runs an `FCALL`; if Redis no longer has the function (it restarted without
    /// persistence, its functions were flushed, or it failed over to a node without
    /// them), loads the library again and retries once. One round trip when all is well.
    async fn fcall<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, EngineError> {
        let mut conn = self.conn();
        match cmd.query_async(&mut conn).await {
            Err(e) if is_missing_function(&e) => {
                tracing::warn!(
                    "Redis lost genstream's functions (restart without persistence, \
                     FUNCTION FLUSH or failover); loading them again"
                );
                load_library(&mut conn).await?;
                cmd.query_async(&mut conn).await.map_err(store_err)
            }
            r => r.map_err(store_err),
        }
    }

    /// Loads the function library unless Redis has it.
    async fn ensure_library(&self) -> Result<(), EngineError> {
        let mut conn = self.conn();
        let found: Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(LIBRARY_NAME)
            .query_async(&mut conn)
            .await
            .map_err(store_err)?;
        let loaded = match &found {
            Value::Array(libs) => !libs.is_empty(),
            Value::Set(libs) => !libs.is_empty(),
            _ => false,
        };
        if !loaded {
            tracing::warn!("Redis does not have genstream's functions; loading them");
            load_library(&mut conn).await?;
        }
        Ok(())
    }

    async fn renew_lease(&self) -> Result<(), EngineError> {
        self.try_renew_lease().await.map_err(store_err)
    }

    async fn try_renew_lease(&self) -> redis::RedisResult<()> {
        let ms = self.inner.cfg.lease_ttl.as_millis() as u64;
        self.conn()
            .set_options(
                self.lease_key(&self.inner.replica_id),
                1,
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ms)),
            )
            .await
    }

    /// A fresh pub/sub connection subscribed to the control channel and to every
    /// mirror's channel.
    async fn open_pubsub(&self) -> redis::RedisResult<redis::aio::PubSubStream> {
        let timeout = self.inner.cfg.timeout;
        let timed_out =
            || redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out"));
        let ps = tokio::time::timeout(timeout, self.inner.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out())??;
        let (mut sink, stream) = ps.split();
        // Holding the sink's lock while reading the mirror list: a mirror opened from
        // now on subscribes through the new sink, one opened before is in the list.
        let mut guard = self.inner.sink.lock().await;
        let mut channels = vec![self.ctl_channel()];
        channels.extend(
            self.inner
                .mirrors
                .lock()
                .keys()
                .map(|sid| self.channel(sid)),
        );
        tokio::time::timeout(timeout, sink.subscribe(&channels))
            .await
            .map_err(|_| timed_out())??;
        *guard = Some(sink);
        self.inner.pubsub_up.store(true, Ordering::SeqCst);
        Ok(stream)
    }

    /// Applies published frames and abort requests; reconnects when the connection
    /// drops (or fails its health check), then re-reads every mirror from its head.
    async fn dispatch(self, mut stream: redis::aio::PubSubStream) {
        let ch_prefix = format!("{}:ch:", self.inner.cfg.key_prefix);
        let ctl = self.ctl_channel();
        loop {
            loop {
                let msg = tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    _ = self.inner.reconnect.notified() => break,
                    m = stream.next() => m,
                };
                let Some(msg) = msg else { break };
                let channel = msg.get_channel_name();
                if channel == ctl {
                    if let Ok(sid) = std::str::from_utf8(msg.get_payload_bytes()) {
                        self.call_abort_handler(sid);
                    }
                } else if let Some(sid) = channel.strip_prefix(&ch_prefix) {
                    self.on_frame(sid, Bytes::copy_from_slice(msg.get_payload_bytes()));
                }
            }
            self.inner.pubsub_up.store(false, Ordering::SeqCst);
            *self.inner.sink.lock().await = None;
            drop(stream);
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
            let this = self.clone();
            tokio::spawn(async move {
                // Redis may have come back empty (no persistence): functions first.
                if let Err(e) = this.ensure_library().await {
                    tracing::warn!(error = %e, "could not check genstream's Redis functions");
                }
                let mirrors = this.mirror_list();
                let _ = this.resync(mirrors).await;
            });
        }
    }

    fn call_abort_handler(&self, sid: &str) {
        let handler = self.inner.abort_handler.read().clone();
        if let Some(h) = handler {
            h(sid);
        }
    }

    fn on_frame(&self, sid: &str, bytes: Bytes) {
        let Some(frame) = Frame::parse(bytes) else {
            return;
        };
        let Some(m) = self.inner.mirrors.lock().get(sid).cloned() else {
            return;
        };
        self.deliver(sid, &m, frame);
    }

    /// Puts a published (or just appended) frame into the mirror: buffered while the
    /// mirror is being opened, else inserted at its seq; a gap makes the replica read
    /// the missing range, never skip it.
    fn deliver(&self, sid: &str, m: &Arc<Mirror>, frame: Frame) {
        {
            let mut pending = m.pending.lock();
            if let Some(buf) = pending.as_mut() {
                if buf.len() < PENDING_CAP {
                    buf.push(frame);
                }
                return;
            }
        }
        let seq = frame.seq;
        if !m.log.insert_frame(frame) && seq > m.log.len() {
            self.spawn_catch_up(sid);
        }
    }

    fn spawn_catch_up(&self, sid: &str) {
        let this = self.clone();
        let sid = sid.to_string();
        tokio::spawn(async move {
            let _ = this.catch_up(&sid).await;
        });
    }

    /// Merges the frames buffered while the mirror was opened (by seq; those the range
    /// read already covered are ignored) and switches the mirror to live delivery.
    fn settle(&self, sid: &str, m: &Mirror) {
        let gap = {
            let mut pending = m.pending.lock();
            let mut buf = pending.take().unwrap_or_default();
            buf.sort_by_key(|f| f.seq);
            let mut gap = false;
            for f in buf {
                let seq = f.seq;
                if !m.log.insert_frame(f) && seq > m.log.len() {
                    gap = true;
                }
            }
            gap
        };
        if gap {
            self.spawn_catch_up(sid);
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

    /// Renews the lease every third of its TTL, in a task of its own so that nothing
    /// else (a slow heal pass) can delay it past the point where peers reap live jobs.
    /// Two renewals in a row that time out replace the command connection.
    async fn lease_loop(self) {
        let every = (self.inner.cfg.lease_ttl / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut timeouts = 0;
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.try_renew_lease().await {
                Err(e) => {
                    self.mark_unhealthy();
                    tracing::warn!(error = %e, "could not renew the replica lease");
                    timeouts = if e.is_timeout() { timeouts + 1 } else { 0 };
                    if timeouts >= 2 {
                        match command_connection(&self.inner.client, self.inner.cfg.timeout).await {
                            Ok(c) => {
                                tracing::warn!(
                                    "the Redis command connection stopped answering; replaced it"
                                );
                                *self.inner.conn.write() = c;
                                timeouts = 0;
                            }
                            Err(e) => tracing::debug!(error = %e, "could not reconnect"),
                        }
                    }
                }
                Ok(()) => {
                    timeouts = 0;
                    let mut h = self.inner.healthy_since.lock();
                    if h.is_none() && self.inner.pubsub_up.load(Ordering::SeqCst) {
                        *h = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }

    /// Heals mirrors every `heal_interval`; a pass is cut short after
    /// `timeout + heal_interval`, so one slow pass never stalls the next.
    async fn heal_loop(self) {
        let every = self.inner.cfg.heal_interval.max(Duration::from_millis(10));
        let bound = self.inner.cfg.timeout + every;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if tokio::time::timeout(bound, self.heal_mirrors())
                .await
                .is_err()
            {
                tracing::warn!("a mirror heal pass took longer than {bound:?}; cut short");
            }
        }
    }

    /// Sends the pub/sub connection a `PING` every `heal_interval`; one that does not
    /// answer within `timeout` (a half-open connection: no error, no frames either) is
    /// replaced.
    async fn pubsub_health_loop(self) {
        let every = self.inner.cfg.heal_interval.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.inner.pubsub_up.load(Ordering::SeqCst) {
                continue; // the dispatcher is reconnecting
            }
            let answered = {
                let mut sink = self.inner.sink.lock().await;
                match sink.as_mut() {
                    Some(s) => tokio::time::timeout(self.inner.cfg.timeout, s.ping::<Value>())
                        .await
                        .is_ok_and(|r| r.is_ok()),
                    None => true,
                }
            };
            // Once per dead connection: the flag is set again by the next one.
            if !answered && self.inner.pubsub_up.swap(false, Ordering::SeqCst) {
                tracing::warn!("the Redis pub/sub connection did not answer PING");
                self.inner.reconnect.notify_one();
            }
        }
    }

    /// The mirrors held now, each with its stream id: a copy of the map's entries, so
    /// that nothing awaits under its lock.
    fn mirror_list(&self) -> Vec<(String, Arc<Mirror>)> {
        self.inner
            .mirrors
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// One heal pass: mirrors that fell behind (a lost publish) read the missing
    /// range, mirrors whose job vanished end, mirrors nobody reads any more go.
    async fn heal_mirrors(&self) {
        self.pause_point("heal.pass").await;
        let mirrors = self.mirror_list();
        let mut unused = Vec::new();
        let mut live = Vec::new();
        for (sid, m) in mirrors {
            // The map and this loop hold the only references: no subscriber.
            if Arc::strong_count(&m) <= 2 && Arc::strong_count(&m.log) == 1 {
                unused.push(sid);
            } else {
                live.push((sid, m));
            }
        }
        let _ = self.resync(live).await;
        if !unused.is_empty() {
            self.drop_unused(&unused).await;
        }
    }

    /// Compares the mirrors with their jobs' hashes (one pipelined round trip) and
    /// catches up those behind; ends those whose log Redis no longer has.
    async fn resync(&self, mirrors: Vec<(String, Arc<Mirror>)>) -> Result<(), EngineError> {
        // Each mirror's length before Redis is asked: a mirror only ever holds a prefix
        // of the log, so Redis answering less than that (read later) means it lost
        // events, while the mirror growing meanwhile means nothing.
        let mirrors: Vec<(String, Arc<Mirror>, u64)> = mirrors
            .into_iter()
            .filter(|(_, m)| m.ready.get().is_some() && m.log.terminal().is_none())
            .map(|(sid, m)| {
                let have = m.log.len();
                (sid, m, have)
            })
            .collect();
        if mirrors.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (sid, _, _) in &mirrors {
            pipe.cmd("HMGET")
                .arg(self.key("job", sid))
                .arg("len")
                .arg("ended");
        }
        let heads: Vec<(Option<u64>, Option<String>)> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        for ((sid, m, have), (len, ended)) in mirrors.into_iter().zip(heads) {
            let ended = ended.as_deref() == Some("1");
            match len {
                None => self.end_lost_mirror(&sid, &m, "Redis no longer has this job"),
                // Redis holds fewer events than we served, or ended where we hold
                // something else: its log is not the one our subscribers read.
                Some(l) if l < have || (ended && l == have) => {
                    self.end_lost_mirror(&sid, &m, "Redis lost part of this job's log")
                }
                Some(l) if l > have => self.spawn_catch_up(&sid),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Ends a mirror whose log Redis lost (a restart without persistence, a failover to
    /// a node that lagged): its subscribers get a terminal `error` `store_unavailable`
    /// with the next seq, made here, since no log is left to hold one. The owner saves
    /// the partial answer when its next append finds the job gone; clients that come
    /// back get 404 and read the persisted messages.
    fn end_lost_mirror(&self, sid: &str, m: &Mirror, why: &str) {
        let body = EventBody::Error(ErrorEvent {
            code: "store_unavailable".into(),
            message: format!(
                "the job store lost this generation's event log ({why}); \
                 the partial answer is kept in the conversation"
            ),
            response_message: None,
        });
        if m.log.insert_frame(Frame::encode(m.log.len(), &body)) {
            tracing::warn!(stream_id = %sid, "{why}; ended its subscribers' streams");
        }
    }

    /// Drops mirrors nobody reads and unsubscribes their channels. The sink's lock is
    /// held from before the mirrors leave the map until Redis confirmed the
    /// unsubscribe: a mirror opened for the same job meanwhile subscribes only after
    /// that (Redis subscriptions are not counted, so an unsubscribe sent after its
    /// subscribe would silently cancel it).
    async fn drop_unused(&self, candidates: &[String]) {
        let mut sink = self.inner.sink.lock().await;
        let channels: Vec<String> = {
            let mut map = self.inner.mirrors.lock();
            let mut gone = Vec::new();
            for sid in candidates {
                let still_unused = map
                    .get(sid)
                    .is_some_and(|m| Arc::strong_count(m) == 1 && Arc::strong_count(&m.log) == 1);
                if still_unused {
                    map.remove(sid);
                    gone.push(self.channel(sid));
                }
            }
            gone
        };
        self.pause_point("heal.after_remove").await;
        if let Some(s) = sink.as_mut()
            && !channels.is_empty()
        {
            let _ = tokio::time::timeout(self.inner.cfg.timeout, s.unsubscribe(&channels)).await;
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

    /// Whether each replica's lease is alive, in one pipelined round trip.
    async fn leases_alive(&self, ids: &[String]) -> Result<HashMap<String, bool>, EngineError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.exists(self.lease_key(id));
        }
        let alive: Vec<bool> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        Ok(ids.iter().cloned().zip(alive).collect())
    }

    /// Claims the job's end for this replica (see `claim_end` in `append.lua`),
    /// taking it over from `takeover` (a replica whose lease the caller saw lapse);
    /// reaper claims older than `stale` may be taken over too (zero: never).
    async fn claim_end_as(
        &self,
        sid: &str,
        takeover: &str,
        stale: Duration,
    ) -> Result<String, EngineError> {
        self.fcall(
            redis::cmd("FCALL")
                .arg(CLAIM_END_FN)
                .arg(1)
                .arg(self.key("job", sid))
                .arg(&self.inner.replica_id)
                .arg(takeover)
                .arg(stale.as_millis() as u64),
        )
        .await
    }

    /// Sets `abortRequested` and publishes the request; false if the job ended.
    async fn publish_abort(&self, sid: &str) -> Result<bool, EngineError> {
        let asked: i64 = self
            .fcall(
                redis::cmd("FCALL")
                    .arg(REQUEST_ABORT_FN)
                    .arg(1)
                    .arg(self.key("job", sid))
                    .arg(self.ctl_channel())
                    .arg(sid),
            )
            .await?;
        Ok(asked == 1)
    }

    /// A point where a unit test may hold this task (no-op outside tests).
    async fn pause_point(&self, _point: &'static str) {
        #[cfg(test)]
        {
            let gate = self.inner.gates.lock().remove(_point);
            if let Some(g) = gate {
                g.reached.notify_one();
                let _ = g.release.acquire().await;
            }
        }
    }

    /// Registers `steps` of a new job: the job hash, the running slot, the
    /// conversation. Each can fail; the caller undoes them all.
    async fn create_steps(&self, meta: &JobMeta) -> Result<(), EngineError> {
        let mut conn = self.conn();
        let conv_key = self.key("conv", &meta.conversation_id);
        let user_key = self.user_running_key(&meta.user_id);
        let ttl_ms = self.inner.cfg.running_ttl.as_millis() as u64;
        if let Some(max) = self.inner.cfg.max_running_per_user {
            // Self-healing first: ids of jobs that ended (or expired) do not count.
            self.running_jobs(&meta.user_id).await?;
            let ok: i64 = self
                .fcall(
                    redis::cmd("FCALL")
                        .arg(ACQUIRE_SLOT_FN)
                        .arg(1)
                        .arg(&user_key)
                        .arg(&meta.stream_id)
                        .arg(max),
                )
                .await?;
            if ok == 0 {
                return Err(EngineError::TooManyConcurrent(max));
            }
        } else {
            let _: () = conn
                .sadd(&user_key, &meta.stream_id)
                .await
                .map_err(store_err)?;
        }
        for _ in 0..3 {
            let holder: Option<String> = conn.get(&conv_key).await.map_err(store_err)?;
            if let Some(h) = &holder {
                let running: (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(self.key("job", h))
                    .arg("ended")
                    .arg("status")
                    .query_async(&mut conn)
                    .await
                    .map_err(store_err)?;
                if let (ended, Some(status)) = running
                    && ended.as_deref() != Some("1")
                    && status == "running"
                {
                    return Err(EngineError::ConversationBusy(meta.conversation_id.clone()));
                }
            }
            let ok: i64 = self
                .fcall(
                    redis::cmd("FCALL")
                        .arg(CLAIM_FN)
                        .arg(1)
                        .arg(&conv_key)
                        .arg(&meta.stream_id)
                        .arg(holder.unwrap_or_default())
                        .arg(ttl_ms),
                )
                .await?;
            if ok == 1 {
                return Ok(());
            }
        }
        Err(EngineError::ConversationBusy(meta.conversation_id.clone()))
    }
}

/// A multiplexed command connection that reconnects by itself after I/O errors, with
/// `timeout` to connect and for every command.
async fn command_connection(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let mgr_cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    tokio::time::timeout(timeout, client.get_connection_manager_with_config(mgr_cfg))
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))?
}

/// `FUNCTION LOAD REPLACE` of the library.
async fn load_library(conn: &mut ConnectionManager) -> Result<(), EngineError> {
    let _: Value = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async(conn)
        .await
        .map_err(|e| {
            EngineError::Store(format!(
                "could not load genstream's Redis functions (Redis 7 or newer is needed): {e}"
            ))
        })?;
    Ok(())
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

/// A bulk or simple string reply as text.
fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).to_string(),
        Some(Value::SimpleString(s)) => s.clone(),
        _ => String::new(),
    }
}

fn int_of(v: Option<&Value>) -> Option<u64> {
    match v {
        Some(Value::Int(i)) => u64::try_from(*i).ok(),
        _ => None,
    }
}

#[async_trait]
impl JobStore for RedisStore {
    async fn create_job(&self, meta: &JobMeta) -> Result<(), EngineError> {
        // The job hash and the global running set first, in one MULTI: from then on the
        // job is visible to the lease reaper, so if this replica dies before the job's
        // first event, another replica ends it (which frees the conversation and the
        // user's slot) instead of both staying taken for the running TTL. Then a
        // running slot of the user (atomic count-and-add), then the conversation
        // (compare-and-set against the holder we saw ended). Any failure undoes all of
        // it; if even the undo fails, the reaper finds the job (owner: us, no task) and
        // ends it.
        let job_key = self.key("job", &meta.stream_id);
        let ttl_ms = self.inner.cfg.running_ttl.as_millis() as u64;
        let registered: redis::RedisResult<()> = redis::pipe()
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
            .sadd(self.running_key(), &meta.stream_id)
            .ignore()
            .query_async(&mut self.conn())
            .await;
        let result = match registered {
            Ok(()) => self.create_steps(meta).await,
            Err(e) => Err(store_err(e)),
        };
        if result.is_err() {
            let undone: redis::RedisResult<()> = redis::pipe()
                .srem(self.user_running_key(&meta.user_id), &meta.stream_id)
                .ignore()
                .srem(self.running_key(), &meta.stream_id)
                .ignore()
                .del(&job_key)
                .ignore()
                .query_async(&mut self.conn())
                .await;
            if let Err(e) = undone {
                tracing::warn!(stream_id = %meta.stream_id, error = %e,
                    "could not undo a failed job creation; the reaper will end it");
            }
        }
        result
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
        let reply: Vec<Value> = self
            .fcall(
                redis::cmd("FCALL")
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
                    .arg(&self.inner.replica_id),
            )
            .await?;
        let tag = text_of(reply.first());
        match tag.as_str() {
            "ok" => {
                let seq = int_of(reply.get(1)).ok_or_else(|| store_err("bad append reply"))?;
                if let Some(Value::BulkString(b)) = reply.get(2) {
                    // Local subscribers need not wait for the publish to come back.
                    let mirror = self.inner.mirrors.lock().get(stream_id).cloned();
                    if let Some(m) = mirror
                        && let Some(f) = Frame::parse(Bytes::from(b.clone()))
                    {
                        self.deliver(stream_id, &m, f);
                    }
                }
                if int_of(reply.get(3)) == Some(1) && !terminal {
                    // Someone asked to abort; the publish may not have reached us.
                    self.call_abort_handler(stream_id);
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
            "dup" => {
                if int_of(reply.get(2)) == Some(1) && !terminal {
                    self.call_abort_handler(stream_id);
                }
                Ok(Ok(int_of(reply.get(1)).unwrap_or_default()))
            }
            "ended" => Ok(Err(AppendError::Ended)),
            "full" => Ok(Err(AppendError::Full)),
            "missing" => Err(EngineError::NotFound(format!("job {stream_id}"))),
            "lost" => Err(EngineError::Internal(format!(
                "the job store lost events of job {stream_id} (its log is shorter than \
                 what was appended)"
            ))),
            "conflict" => Err(EngineError::Internal(format!(
                "another writer appended to job {stream_id}"
            ))),
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
                    .or_insert_with(|| Arc::new(Mirror::new()))
                    .clone()
            }
        };
        m.ready
            .get_or_try_init(|| async {
                // Subscribe first (Redis confirms it), buffering what is published from
                // then on; then read the stream; then merge the buffer by seq. No event
                // can fall between the two (LESSONS: Vercel resumable-stream #41), nor
                // between the read and the switch to live delivery.
                {
                    let mut sink = self.inner.sink.lock().await;
                    match sink.as_mut() {
                        Some(s) => tokio::time::timeout(
                            self.inner.cfg.timeout,
                            s.subscribe(self.channel(stream_id)),
                        )
                        .await
                        .map_err(|_| store_err("pub/sub subscribe timed out"))?
                        .map_err(store_err)?,
                        None => return Err(store_err("pub/sub is reconnecting")),
                    }
                }
                self.catch_up(stream_id).await?;
                self.pause_point("open.after_range").await;
                self.settle(stream_id, &m);
                Ok(())
            })
            .await?;
        Ok(Some(m.log.clone()))
    }

    async fn remove_expired(&self, _retention: Duration) -> Result<usize, EngineError> {
        // Redis expires finished jobs by TTL; unused mirrors are dropped by the healer.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), EngineError> {
        // Reachable, and able to run our functions (a Redis that restarted without
        // persistence answers PING but would fail every append).
        self.ensure_library().await?;
        if !self.inner.pubsub_up.load(Ordering::SeqCst) {
            return Err(store_err("pub/sub connection is down"));
        }
        Ok(())
    }

    async fn request_abort(&self, stream_id: &str) -> Result<(), EngineError> {
        // The flag in the job hash reaches the owner with its next append whatever
        // happens to the publish; the publish is the fast path, repeated while the job
        // runs in case the owner's pub/sub connection was down.
        if !self.publish_abort(stream_id).await? {
            return Ok(());
        }
        if !self.inner.republishing.lock().insert(stream_id.to_string()) {
            return Ok(());
        }
        let this = self.clone();
        let sid = stream_id.to_string();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + ABORT_REPUBLISH_FOR;
            while tokio::time::Instant::now() < until {
                tokio::select! {
                    _ = this.inner.stop.cancelled() => break,
                    _ = tokio::time::sleep(ABORT_REPUBLISH_EVERY) => {}
                }
                if let Ok(false) = this.publish_abort(&sid).await {
                    break; // it ended
                }
            }
            this.inner.republishing.lock().remove(&sid);
        });
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
        let wait_us: i64 = self
            .fcall(
                redis::cmd("FCALL")
                    .arg(RATE_WINDOW_FN)
                    .arg(1)
                    .arg(format!("{}:rlw:{{{key}}}", self.inner.cfg.key_prefix))
                    .arg(limit)
                    .arg(period_ms)
                    .arg(uuid::Uuid::now_v7().to_string()),
            )
            .await?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us as u64)))
    }

    async fn sync_log(&self, stream_id: &str) -> Result<(), EngineError> {
        self.catch_up(stream_id).await
    }

    async fn claim_orphan(&self, stream_id: &str) -> Result<bool, EngineError> {
        // A claim held by another replica whose lease lapsed (a reaper that died, or an
        // owner that died while ending its job) is taken over; so is a reaper's claim
        // older than a lease TTL (its reaper is alive but stopped trying).
        let (holder, owner): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key("job", stream_id))
            .arg("reaper")
            .arg("owner")
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        if owner.is_none() {
            return Ok(false);
        }
        let takeover = match holder {
            Some(h) if h != self.inner.replica_id => {
                let alive = self.leases_alive(std::slice::from_ref(&h)).await?;
                if alive.get(&h).copied().unwrap_or(true) {
                    String::new()
                } else {
                    h
                }
            }
            _ => String::new(),
        };
        let won = self
            .claim_end_as(stream_id, &takeover, self.inner.cfg.lease_ttl)
            .await?;
        Ok(won == "ok")
    }

    async fn claim_end(&self, stream_id: &str) -> Result<bool, EngineError> {
        // The owner never takes a claim over: a reaper that holds it ends the job.
        let won = self.claim_end_as(stream_id, "", Duration::ZERO).await?;
        Ok(won == "ok" || won == "missing")
    }

    fn set_abort_handler(&self, handler: AbortHandler) {
        *self.inner.abort_handler.write() = Some(handler);
    }

    async fn orphaned_jobs(&self, live: &HashSet<String>) -> Result<Vec<Orphan>, EngineError> {
        let judge_leases = self.may_judge_leases();
        let me = self.inner.replica_id.as_str();
        let ids: Vec<String> = self
            .conn()
            .smembers(self.running_key())
            .await
            .map_err(|e| {
                self.mark_unhealthy();
                store_err(e)
            })?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(self.key("job", id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        // Whose claims and leases matter, then one round trip for the leases and one
        // for the Redis clock (claim ages are stamped with it).
        let mut running = Vec::new();
        let mut stale = Vec::new();
        let mut replicas = HashSet::new();
        for (id, h) in ids.into_iter().zip(hashes) {
            let Some(meta) = meta_of(&h) else {
                stale.push(id);
                continue;
            };
            if meta.status != JobStatus::Running || h.get("ended").map(String::as_str) == Some("1")
            {
                stale.push(id);
                continue;
            }
            let owner = h.get("owner").cloned().unwrap_or_default();
            let reaper = h.get("reaper").cloned();
            match &reaper {
                Some(r) if *r != owner && r != me => replicas.insert(r.clone()),
                _ if owner != me => replicas.insert(owner.clone()),
                _ => false,
            };
            running.push((meta, owner, reaper, h));
        }
        let replicas: Vec<String> = replicas.into_iter().collect();
        let leases = if judge_leases {
            self.leases_alive(&replicas).await?
        } else {
            HashMap::new()
        };
        let alive = |rid: &str| leases.get(rid).copied().unwrap_or(true);
        let redis_now = if judge_leases
            && running
                .iter()
                .any(|(_, o, r, _)| r.as_ref().is_some_and(|r| r != o && r != me))
        {
            let (secs, micros): (u64, u64) = redis::cmd("TIME")
                .query_async(&mut self.conn())
                .await
                .map_err(store_err)?;
            Some(secs * 1000 + micros / 1000)
        } else {
            None
        };
        let lease_ms = self.inner.cfg.lease_ttl.as_millis() as u64;
        let mut out = Vec::new();
        for (meta, owner, reaper, h) in running {
            let reason = if owner == me {
                OrphanReason::Abandoned
            } else {
                OrphanReason::ReplicaLost
            };
            let orphan = match reaper {
                // A reaper's claim: ours (an earlier try failed; retry it), or another
                // reaper's that died or stopped trying.
                Some(r) if r != owner => {
                    if r == me {
                        true
                    } else {
                        let at: u64 = h.get("reaperAt").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let old = redis_now
                            .is_some_and(|now| at > 0 && now.saturating_sub(at) > lease_ms);
                        judge_leases && (!alive(&r) || old)
                    }
                }
                // No claim, or the owner's own (it is ending the job): an orphan if the
                // owner is gone, or if it is us and no task of ours runs it.
                _ => {
                    if owner == me {
                        !live.contains(&meta.stream_id)
                    } else {
                        judge_leases && !alive(&owner)
                    }
                }
            };
            if orphan {
                out.push(Orphan { meta, reason });
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
mod tests;
