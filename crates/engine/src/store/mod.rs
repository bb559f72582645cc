//! The job store: job metadata, event logs, who may write them, and rate limits,
//! behind three narrow traits, one per concern:
//!
//! - [`EventLogStore`]: jobs and their event logs (create, look up, append, read);
//! - [`JobCoordination`]: who ends a job (the end claims), which jobs nobody runs
//!   (orphans), and abort requests between replicas;
//! - [`RateLimitStore`]: sliding-window hit counters shared by all replicas;
//! - [`IdempotencyStore`]: `Idempotency-Key` claims, so that a repeated start attaches
//!   to the first one's job on any replica.
//!
//! [`JobStore`] is all four together (implemented for every type that has them), so
//! the engine passes one `Arc<dyn JobStore>` around. Implementations: [`MemoryStore`]
//! (one process, in [`memory`]) and the Redis store in `genstream-redis`; both pass the
//! one shared suite in [`crate::suite`]. No method that decides who may write (the end
//! claims above all) has a default body: a backend must answer each for itself.
//!
//! The store is where the rules that must hold across replicas are made atomic:
//! at most one running job per conversation ([`EventLogStore::create_job`]), exactly
//! one terminal event per log ([`EventLogStore::append`]), the job's status following
//! its terminal event in the same step, and one writer of a job's end
//! ([`JobCoordination::claim_end`], [`JobCoordination::claim_orphan`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::aggregate::TerminalKind;
use crate::event::{EventBody, Frame};
use crate::log::EventLog;

pub mod memory;

pub use crate::error::StoreError;
pub use memory::MemoryStore;

/// Lifecycle of a job (docs/protocol.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Running,
    Complete,
    Aborted,
    Error,
}

impl From<TerminalKind> for JobStatus {
    fn from(k: TerminalKind) -> Self {
        match k {
            TerminalKind::Complete => JobStatus::Complete,
            TerminalKind::Aborted => JobStatus::Aborted,
            TerminalKind::Error => JobStatus::Error,
        }
    }
}

/// A job's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobMeta {
    pub stream_id: String,
    pub user_id: String,
    pub conversation_id: String,
    pub user_message_id: String,
    pub response_message_id: String,
    pub model: String,
    pub status: JobStatus,
    /// RFC 3339.
    pub created_at: String,
    /// Where this job's job-finished webhook goes (`POST /api/chat`'s `webhookUrl`);
    /// `None` = the server's configured default, if any. Kept with the job so that
    /// whichever replica ends it (owner or reaper) can deliver it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// Called with a stream id when another replica asks this one to abort a job.
pub type AbortHandler = Arc<dyn Fn(&str) + Send + Sync>;

/// Why a running job has nobody generating it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrphanReason {
    /// Its owner replica's lease lapsed: the process died or lost the store
    /// (`replica_lost`).
    ReplicaLost,
    /// It is owned by this replica but no task runs it any more, e.g. its task gave up
    /// during a store outage (`store_unavailable`).
    Abandoned,
}

/// A running job that nobody generates; the reaper ends it.
#[derive(Clone, Debug)]
pub struct Orphan {
    pub meta: JobMeta,
    pub reason: OrphanReason,
}

/// A page of a job's log read from the store itself (see
/// [`EventLogStore::read_range`]).
#[derive(Clone, Debug, Default)]
pub struct RangePage {
    /// Frames of consecutive seqs, the first the one right after the cursor; at most
    /// the `max` asked for, fewer when the log held no more when it was read.
    pub frames: Vec<Frame>,
    /// Events the log held when it was read (its head's seq + 1), read before the
    /// frames: every frame's seq is below it or it grew meanwhile.
    pub len: u64,
    /// Whether the log held its terminal event (at seq `len - 1`) when `len` was read.
    pub ended: bool,
}

/// Most events one [`EventLogStore::append_batch`] call carries from a job's appender
/// (the events queued behind the call in flight, up to this many). A store may size
/// its reads by it: a Redis log entry holds one call's batch.
pub const MAX_APPEND_BATCH: usize = 64;

/// What [`EventLogStore::append_batch`] appended: `count` events (at least 1 unless
/// the batch was empty), the first at seq `first_seq`, the rest right after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub first_seq: u64,
    pub count: usize,
}

/// Jobs and their event logs.
///
/// Errors: [`StoreError::Unavailable`] when the backing service fails; the other
/// variants where a method says so.
#[async_trait]
pub trait EventLogStore: Send + Sync + 'static {
    /// Registers a new running job with an empty log.
    ///
    /// Errors: [`StoreError::ConversationBusy`] if the conversation already has a
    /// running job; [`StoreError::TooManyConcurrent`] if the user already runs the
    /// store's per-user maximum (see the stores' constructors). Each check and its
    /// insert are one atomic step, across replicas too (LibreChat #11840).
    async fn create_job(&self, meta: &JobMeta) -> Result<(), StoreError>;

    /// The job's metadata, `None` if unknown or past retention.
    async fn get_job(&self, stream_id: &str) -> Result<Option<JobMeta>, StoreError>;

    /// The conversation's most recent job still in the store.
    async fn latest_job(&self, conversation_id: &str) -> Result<Option<JobMeta>, StoreError>;

    /// The user's running jobs, oldest first.
    async fn running_jobs(&self, user_id: &str) -> Result<Vec<JobMeta>, StoreError>;

    /// Appends an event with the next seq and returns that seq. A terminal event also
    /// sets the job's status and frees its conversation, in the same atomic step.
    ///
    /// `expected_seq` is the seq the caller believes comes next (the job's owner knows
    /// it); if the log is already past it, an earlier try of this very append landed
    /// (its reply was lost) and the call returns that seq without appending again.
    ///
    /// Errors: [`StoreError::Append`] with `AppendError::Ended` once the log has its
    /// terminal event (or another replica holds the end claim), `AppendError::Full`
    /// past the cap, `AppendError::Encode` if the event cannot be serialized (see
    /// [`crate::log::AppendError`]); [`StoreError::UnknownJob`] if the store does not know
    /// the job; [`StoreError::Inconsistent`] if its log is not the one this writer
    /// wrote; [`StoreError::Unavailable`] when the store fails.
    async fn append(
        &self,
        stream_id: &str,
        body: &EventBody,
        expected_seq: Option<u64>,
    ) -> Result<u64, StoreError>;

    /// Appends `bodies` (at least one) with consecutive seqs from the log's head, in one
    /// atomic step per store call, and returns how many landed and the first one's seq
    /// ([`Appended`]). The rules of [`EventLogStore::append`] hold for each event in
    /// order (a terminal one sets the job's status in the same step, nothing follows a
    /// terminal event), so a batch is the same as its events appended one by one.
    ///
    /// `expected_first_seq` is the seq the caller believes the first body gets. Where
    /// the log is already past some of the batch, an earlier try of this very batch
    /// landed (whole or in part) and its reply was lost: those events are not appended
    /// again, only the rest is (the returned `first_seq` is then `expected_first_seq`).
    ///
    /// When an event cannot land (the log ended or is full), the events before it
    /// stay appended and the call returns `Ok` with `count` short of `bodies.len()`;
    /// only when the very first event cannot land does it fail, with the error
    /// [`EventLogStore::append`] gives. So a caller that sends the rest again gets
    /// that error, and never an error for events that did land.
    ///
    /// Errors: as [`EventLogStore::append`] (`AppendError::Encode` like an event
    /// that cannot land).
    async fn append_batch(
        &self,
        stream_id: &str,
        bodies: &[EventBody],
        expected_first_seq: Option<u64>,
    ) -> Result<Appended, StoreError>;

    /// True when an append is a local, in-process step that never waits on I/O (the
    /// memory store): a job then appends inline instead of handing each event to its
    /// appender task, which would only add a task hop per event. False (the default)
    /// for a store behind a network round trip, where keeping one call in flight and
    /// batching what queues meanwhile is what pays.
    fn appends_locally(&self) -> bool {
        false
    }

    /// The log that this replica's subscribers read (the log itself in memory, a
    /// local mirror in Redis mode); `None` if the job is unknown or expired.
    async fn open_log(&self, stream_id: &str) -> Result<Option<Arc<EventLog>>, StoreError>;

    /// This replica's copy of the log if it can be read right away, with no store
    /// round trip: what [`EventLogStore::open_log`] returns, but `None` where that would
    /// first have to fill the copy (a Redis replica with no mirror of the job yet), and
    /// `None` for an unknown job. The stream route serves a cold job with
    /// [`EventLogStore::read_range`] instead, while `open_log` fills the copy.
    fn ready_log(&self, stream_id: &str) -> Option<Arc<EventLog>>;

    /// Up to `max` (at least 1) frames right after `cursor` (from seq 0 when `None`),
    /// read from the store's log itself, not from this replica's copy, so a replica
    /// can answer a reconnect before its copy is filled; `None` if the job is unknown
    /// or expired. The frames are the very bytes every other read serves, and the log
    /// only grows, so a reader may serve pages of it and then go on from the copy at
    /// the seq it reached, with no gap and no duplicate (`docs/protocol.md` §3).
    async fn read_range(
        &self,
        stream_id: &str,
        cursor: Option<u64>,
        max: usize,
    ) -> Result<Option<RangePage>, StoreError>;

    /// Brings this replica's copy of the log up to the store's head. A mirror may lag
    /// the owner by a publish, so a cursor a client got from a faster replica can be
    /// past its head; the stream route calls this before it calls such a cursor out of
    /// range. The memory store's log is the log itself: it has nothing to do.
    async fn sync_log(&self, stream_id: &str) -> Result<(), StoreError>;

    /// Drops finished jobs whose terminal event is older than `retention`; returns how
    /// many went. A store that expires jobs by itself (Redis TTLs) returns 0.
    async fn remove_expired(&self, retention: Duration) -> Result<usize, StoreError>;

    /// Succeeds when the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Who may write a job's end, which running jobs nobody generates, and abort requests
/// between replicas. Every method decides or carries a decision about who writes, so
/// none has a default: a backend that got one wrong would let two writers end a job.
///
/// Errors: [`StoreError::Unavailable`] when the backing service fails.
#[async_trait]
pub trait JobCoordination: Send + Sync + 'static {
    /// Claims an orphan's end for this replica's reaper, so that exactly one reaper
    /// saves its partial answer and ends it (one writer per message), and a falsely
    /// presumed dead owner appends nothing more. A reaper may retry its own claim (an
    /// earlier try failed half-way); a claim whose holder's lease lapsed, or a reaper's
    /// claim older than a lease TTL, may be taken over. False if the job ended, is
    /// unknown, or someone else holds the claim.
    async fn claim_orphan(&self, stream_id: &str) -> Result<bool, StoreError>;

    /// The owner's side of the same end claim: taken by a job's own task before it
    /// saves its response message, so that the owner and the reapers agree on who
    /// writes it (one writer per message). True if the caller is to end the job: it
    /// holds the claim now (a retry holds it again), or the store no longer knows the
    /// job (it lost it, so nobody else can end it). False if the job ended or a reaper
    /// holds the claim; the caller then saves and appends nothing.
    async fn claim_end(&self, stream_id: &str) -> Result<bool, StoreError>;

    /// Running jobs that nobody generates: owned by a replica whose lease lapsed, or
    /// owned by this replica but not in `live` (the ids of the jobs its tasks run).
    async fn orphaned_jobs(&self, live: &HashSet<String>) -> Result<Vec<Orphan>, StoreError>;

    /// Asks the job's owner, wherever it runs, to abort it: the owner's store calls its
    /// abort handler (see [`JobCoordination::set_abort_handler`]) with the stream id,
    /// even if a message between the replicas is lost on the way. Nothing happens for
    /// a job that ended or is unknown.
    async fn request_abort(&self, stream_id: &str) -> Result<(), StoreError>;

    /// Registers what to call when an abort is requested for a job this replica owns.
    fn set_abort_handler(&self, handler: AbortHandler);
}

/// Hit counters for rate limits.
#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// Counts one hit on `key` against a sliding-window limit: at most `limit` hits in
    /// any `period` (the window is `(now − period, now]`). `Ok(None)` if the hit is
    /// allowed, and then it counts; else `Ok(Some(wait))`, the time until the oldest hit
    /// in the window leaves it. A refused hit is not counted, so a client that waits
    /// `wait` passes. `limit` 0 is no limit. Shared by all replicas when the store is
    /// shared; the Redis store judges time by Redis's clock, so clock skew between
    /// replicas does not matter.
    ///
    /// Errors: [`StoreError::Unavailable`] when the backing service fails.
    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
    ) -> Result<Option<Duration>, StoreError>;
}

/// What [`IdempotencyStore::claim_idempotency`] found under a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The key was free: the caller holds it now (with its token) and must fill it
    /// ([`IdempotencyStore::fill_idempotency`]) or release it
    /// ([`IdempotencyStore::release_idempotency`]).
    Claimed,
    /// Another start holds the key and has not filled it yet; `request_hash` is that
    /// start's.
    Pending { request_hash: String },
    /// A start with `request_hash` finished and saved `value` (the engine's started
    /// ids, opaque to the store).
    Filled { request_hash: String, value: String },
}

/// `Idempotency-Key` claims: one start per key, across replicas.
///
/// A key is claimed by one caller (identified by a token it chose), then either filled
/// with the start's result (kept for the key's TTL) or released when the start failed,
/// so a retry can start. Only the holder's token fills or releases; a claim never
/// filled lapses after its claim TTL (a replica that died mid-start frees the key).
///
/// Errors: [`StoreError::Unavailable`] when the backing service fails.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for a start of the request whose hash is `request_hash`, held by
    /// `token` for `claim_ttl` (ms precision) unless filled. One atomic step: of any
    /// number of concurrent claims of a free key, on any replica, exactly one gets
    /// [`IdempotencyClaim::Claimed`]; the others see the claim.
    async fn claim_idempotency(
        &self,
        key: &str,
        request_hash: &str,
        token: &str,
        claim_ttl: Duration,
    ) -> Result<IdempotencyClaim, StoreError>;

    /// Saves `value` under `key` for `ttl` if `token` still holds the key's unfilled
    /// claim; false otherwise (the claim lapsed, or was filled or released).
    async fn fill_idempotency(
        &self,
        key: &str,
        token: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Drops `key` if `token` holds its claim and has not filled it (the start failed),
    /// so that a retry can claim it; nothing otherwise.
    async fn release_idempotency(&self, key: &str, token: &str) -> Result<(), StoreError>;
}

/// The whole job store: its event logs, its coordination of writers, its rate limits
/// and its idempotency keys. Implemented for every type that implements the four, so a
/// backend implements those and never this.
pub trait JobStore: EventLogStore + JobCoordination + RateLimitStore + IdempotencyStore {}

impl<T: EventLogStore + JobCoordination + RateLimitStore + IdempotencyStore> JobStore for T {}
