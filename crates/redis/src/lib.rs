//! The Redis job store: many replicas, one set of logs (docs/protocol.md §3–§5).
//!
//! # Modules
//! - this file: [`RedisConfig`], [`RedisStore`], key names;
//! - `conn`: the connections, to one Redis or to a Redis Cluster, behind one type each;
//! - `jobs`: [`EventLogStore`](genstream_engine::store::EventLogStore) — registering a
//!   job, its metadata, the append, opening a log;
//! - `coordination`: [`JobCoordination`](genstream_engine::store::JobCoordination) —
//!   end claims, orphans, abort requests;
//! - `rate_limit`: [`RateLimitStore`](genstream_engine::store::RateLimitStore);
//! - `idempotency`: [`IdempotencyStore`](genstream_engine::store::IdempotencyStore) —
//!   `Idempotency-Key` claims, one Lua script per step;
//! - `functions`: the function library (`append.lua`), loading and calling it;
//! - `mirror`: the local mirrors of logs and their healer;
//! - `pubsub`: the pub/sub connection, its dispatcher and health check;
//! - `lease`: this replica's lease and the health that lets it judge others'.
//!
//! # Layout
//! Every key of a job carries the hash tag `{streamId}`, so a job's keys live in one
//! Cluster slot and the append function may touch them together:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:job:{sid}` | hash | the job's metadata, `owner` replica, `len` and `bytes` of its log, `ended`, `status`, the end claim (`reaper`, `reaperAt`), `abortRequested` |
//! | `P:log:{sid}` | stream | one entry per appended batch, id `0-(last seq + 1)`, field `f` = the batch's SSE frames concatenated in seq order, `w` = the writer's replica id; the entries from id `0-(s+1)` on hold seq `s` (in the first) and all after it |
//! | `P:conv:{cid}` | string | the conversation's latest job (doubles as its one-running-job lock) |
//! | `P:user:{uid}:running` | set | the user's running jobs (self-healing: stale ids dropped when read) |
//! | `P:running` | set | every running job (the lease reaper's list; self-healing too) |
//! | `P:replica:{rid}` | string | a replica's lease, renewed every `lease_ttl / 3` |
//! | `P:idem:{key}` | hash | an idempotency key's claim: request hash `h`, holder token `t`, the start's ids `v` once filled (TTL: the claim TTL, then the idempotency TTL, 24 h by default) |
//! | `P:rlw:{key}` | sorted set | a rate limit's hits in its window (member: a hit id, score: Redis `TIME` in µs) |
//!
//! Channels: `P:ch4:sid` carries each appended batch as one message (its frames
//! concatenated in seq order; `4` is the payload's version, see `functions.rs`; on a
//! Cluster the sharded channel `P:ch4:{sid}`, in the job's slot), `P:ctl:abort`
//! carries abort requests (a stream id) to whichever replica owns the job.
//!
//! # Appending
//! One server-side step, the Redis Function `genstream_append_batch_v6` (`append.lua`),
//! for a batch of events (a job's appender sends what queued behind the call in
//! flight; `append` is a batch of one): seq, caps and frame of each event, one XADD of
//! the batch's frames as one entry, TTLs and one PUBLISH (`SPUBLISH` on a Cluster) of
//! the same bytes, so there
//! is never a seq without a log entry or an entry without a publish, and two writers
//! racing to end a job produce exactly one terminal event. The writer sends each
//! event as the SSE frame it built for the seq it expects (`Frame::encode`; the
//! function rewrites the seq of one that lands elsewhere), and its own mirror takes
//! the landed frames with the events it sent (`EventLog::insert_encoded`): no JSON
//! decode of its own frames; other replicas decode each frame once, for their
//! mirror's fold. The log stream holds the frames as published, so every replica
//! serves the very bytes that were published. One `FCALL` per batch; if Redis lost the functions
//! (a restart without persistence, `FUNCTION FLUSH`, a failover) the call loads them
//! again and retries once.
//!
//! # Redis Cluster
//! With a `redis+cluster://host:port,...` URL the store runs on a Redis Cluster: the
//! command connection is a `cluster_async::ClusterConnection` (`conn`), and no call
//! crosses slots. A job's keys share `{sid}`; the conversation, user, idempotency and
//! rate-limit keys are each touched alone; what a pipeline or `MULTI` joined across
//! slots on one Redis (creating a job: hash and `P:running`; undoing it; freeing the
//! running sets; the reaper's, healer's and lease reads) becomes separate calls
//! (`query_each`). Only creation loses atomicity: the hash goes first, then the set, so
//! a replica dying in between leaves a hash nobody waits for (nothing else was taken
//! yet, the caller never got the job) that expires. The function library is loaded on
//! every primary, with frames published by `SPUBLISH` to the job's sharded channel;
//! abort requests stay a plain `PUBLISH` (it reaches every node's subscribers). When a
//! job's slot moves, its node drops the sharded subscription: the dispatcher then
//! replaces the pub/sub connection (a fresh topology), re-subscribes and re-reads every
//! mirror. ARCHITECTURE.md, "Redis Cluster", has the whole of it.
//!
//! # Ending a job
//! Whoever ends a job — its owner, or a reaper of an orphan — first takes the job's
//! *end claim* (`genstream_claim_end_v6`), then saves the response message, then
//! appends the terminal event. Only the claimant may append after the claim, so there
//! is one writer per response message even when an owner presumed dead is alive.
//!
//! # Fan-out
//! A replica keeps a local [`EventLog`](genstream_engine::log::EventLog) *mirror* of each log its own subscribers read,
//! and serves them from it exactly as the memory store does. A mirror is filled
//! strictly by seq: subscribe to the job's channel first (confirmed by Redis), buffer
//! what is published meanwhile, read the stream from the mirror's head, then merge the
//! buffer by seq and apply published frames from then on; a frame whose seq is not the
//! next one makes the replica read the missing range from the stream. Nothing is
//! buffered by time and nothing is skipped. The owner of a job (the replica that
//! created it and writes it alone) does not subscribe its own mirror: each append puts
//! its frames there as the call returns; it subscribes once an append fails (see
//! `RedisStore::disown`). A healer compares each live mirror with the job's `len` every
//! second, so even a lost publish (or a lost terminal event) is repaired within two
//! seconds (a mirror is read only if it is still short of what Redis had a pass
//! earlier: one short only of what landed since waits for the publish or reply in
//! flight, see `mirror::Catch`); after a lost connection the replica re-subscribes and
//! re-reads every mirror from its head. A mirror whose job vanished from Redis (a
//! restart without persistence) ends with a local `error` `store_unavailable`.
//!
//! A reader that comes to a replica with no mirror of its job yet is not made to wait
//! for one: `read_range` pages the stream itself from the reader's cursor (with the
//! job's `len` and `ended`, one pipelined round trip; a second `XRANGE` when the
//! entries asked for first held fewer frames than the page wants) while the mirror
//! opens, and the reader moves to the mirror at the seq it reached.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use genstream_engine::error::BoxError;
use genstream_engine::log::LogLimits;
use genstream_engine::store::{AbortHandler, StoreError};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::conn::{Conn, PubSubSink, Target};
use crate::functions::CHANNEL_KIND;
use crate::functions::load_library;
use crate::mirror::Mirror;

pub use crate::conn::CLUSTER_SCHEME;

mod conn;
mod coordination;
mod functions;
mod idempotency;
mod jobs;
mod lease;
mod mirror;
mod pubsub;
mod rate_limit;

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (one Redis), or
    /// `redis+cluster://[user:password@]host:port,host:port,...` (the seed nodes of a
    /// Redis Cluster; the credentials apply to every node).
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

struct Inner {
    cfg: RedisConfig,
    replica_id: String,
    /// One Redis or a Cluster's seed nodes.
    target: Target,
    /// The multiplexed command connection. Replaced when it stops answering: the
    /// manager reconnects by itself after an I/O error, not after timeouts (a half-open
    /// connection gives nothing else).
    conn: RwLock<Conn>,
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    mirrors: Mutex<HashMap<String, Arc<Mirror>>>,
    /// Jobs this replica created and still writes alone: from `create_job` until their
    /// terminal event lands through this replica or one of its appends fails. Their
    /// mirrors are filled by the appends themselves and are not subscribed to the
    /// job's channel (see `Mirror::subscribed`).
    owned: Mutex<HashSet<String>>,
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

/// The Redis [`JobStore`](genstream_engine::store::JobStore). Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// A Redis failure (or a reply we cannot read), keeping its cause: worth retrying.
fn store_err(e: impl Into<BoxError>) -> StoreError {
    genstream_engine::metrics::redis_error();
    StoreError::unavailable("redis", e)
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
    pub async fn connect(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let shown = redact_url(&cfg.url);
        let fail = |e: redis::RedisError| {
            StoreError::unavailable(format!("could not connect to Redis at {shown}"), e)
        };
        let target = Target::open(&cfg.url).map_err(fail)?;
        let mut conn = target.command_connection(cfg.timeout).await.map_err(fail)?;
        // On a Cluster: every primary answers (a cluster with a slot unserved refuses
        // commands for it anyway).
        let _ = conn
            .on_all_primaries(&redis::cmd("PING"))
            .await
            .map_err(fail)?;
        load_library(&mut conn).await?;
        let store = RedisStore {
            inner: Arc::new(Inner {
                replica_id: uuid::Uuid::now_v7().to_string(),
                cfg,
                target,
                conn: RwLock::new(conn),
                sink: tokio::sync::Mutex::new(None),
                mirrors: Mutex::new(HashMap::new()),
                owned: Mutex::new(HashSet::new()),
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
    /// The job's frame channel: `P:ch4:sid`, or on a Cluster the sharded channel
    /// `P:ch4:{sid}`, in the slot of the job's keys (the append function publishes to it).
    fn channel(&self, sid: &str) -> String {
        let prefix = &self.inner.cfg.key_prefix;
        if self.is_cluster() {
            format!("{prefix}:{CHANNEL_KIND}:{{{sid}}}")
        } else {
            format!("{prefix}:{CHANNEL_KIND}:{sid}")
        }
    }
    /// The stream id of a frame channel's name (see [`Self::channel`]).
    fn channel_sid<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let rest = channel
            .strip_prefix(self.inner.cfg.key_prefix.as_str())?
            .strip_prefix(':')?
            .strip_prefix(CHANNEL_KIND)?
            .strip_prefix(':')?;
        if self.is_cluster() {
            rest.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(rest)
        }
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
    fn conn(&self) -> Conn {
        self.inner.conn.read().clone()
    }

    /// True on a Redis Cluster.
    fn is_cluster(&self) -> bool {
        matches!(self.inner.target, Target::Cluster(_))
    }

    /// Runs `cmds` and returns their replies in order: one pipelined round trip on one
    /// Redis; on a Cluster, where their keys may lie in different slots (a pipeline
    /// must stay in one), each on its own, all at once.
    ///
    /// Errors: the first that fails.
    async fn query_each<T: redis::FromRedisValue>(
        &self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn();
        if !conn.is_cluster() {
            let mut pipe = redis::pipe();
            for c in cmds {
                pipe.add_command(c);
            }
            let mut conn = conn;
            return pipe.query_async(&mut conn).await.map_err(store_err);
        }
        let calls = cmds.into_iter().map(|c| {
            let mut conn = conn.clone();
            async move { c.query_async::<T>(&mut conn).await }
        });
        futures::future::try_join_all(calls)
            .await
            .map_err(store_err)
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
}

#[cfg(test)]
mod tests;
