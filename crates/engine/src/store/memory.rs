//! [`MemoryStore`]: the job store of a single process, every log in its memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    AbortHandler, Appended, EventLogStore, IdempotencyClaim, IdempotencyStore, JobCoordination,
    JobMeta, JobStatus, Orphan, OrphanReason, RangePage, RateLimitStore, StoreError,
};
use crate::event::EventBody;
use crate::log::{EventLog, LogLimits};

/// The single-process job store: every log lives in this process's memory.
pub struct MemoryStore {
    limits: LogLimits,
    max_running_per_user: Option<usize>,
    inner: Mutex<MemInner>,
    /// Rate-limit key → the times of its hits still in the window, oldest first.
    rate_windows: Mutex<HashMap<String, VecDeque<tokio::time::Instant>>>,
    abort_handler: Mutex<Option<AbortHandler>>,
    /// Idempotency key → its claim.
    idempotency: Mutex<HashMap<String, IdemEntry>>,
}

/// An idempotency key's claim (see [`IdempotencyStore`]).
struct IdemEntry {
    request_hash: String,
    token: String,
    /// The start's result, once filled.
    value: Option<String>,
    /// On tokio's clock, so tests can pause it.
    expires_at: tokio::time::Instant,
}

/// Keys the rate windows hold before idle ones are dropped.
const RATE_KEYS_BEFORE_SWEEP: usize = 100_000;

/// Idempotency keys held before expired ones are dropped (an expired key is also
/// replaced when claimed again).
const IDEMPOTENCY_KEYS_BEFORE_SWEEP: usize = 100_000;

#[derive(Default)]
struct MemInner {
    /// The stored meta's `status` is never read: a job's status is its log's (see
    /// [`current`]), so nobody can see `running` after the terminal event is in.
    jobs: HashMap<String, (JobMeta, Arc<EventLog>)>,
    /// conversation id → its latest job's stream id.
    latest: HashMap<String, String>,
}

impl MemoryStore {
    /// An empty store whose logs have the given caps.
    pub fn new(limits: LogLimits) -> Self {
        MemoryStore {
            limits,
            max_running_per_user: None,
            inner: Mutex::new(MemInner::default()),
            rate_windows: Mutex::new(HashMap::new()),
            abort_handler: Mutex::new(None),
            idempotency: Mutex::new(HashMap::new()),
        }
    }

    /// The job's log if it is known and still running.
    fn running_log(&self, stream_id: &str) -> Option<Arc<EventLog>> {
        self.inner
            .lock()
            .jobs
            .get(stream_id)
            .map(|(_, log)| log.clone())
            .filter(|log| log.terminal().is_none())
    }

    /// Caps the running jobs per user (`None`: no cap).
    pub fn with_max_running_per_user(mut self, max: Option<usize>) -> Self {
        self.max_running_per_user = max;
        self
    }

    /// Number of jobs held (running and retained).
    pub fn len(&self) -> usize {
        self.inner.lock().jobs.len()
    }

    /// True when no job is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `meta` with the status its log says: `running` until the terminal event.
fn current(meta: &JobMeta, log: &EventLog) -> JobMeta {
    JobMeta {
        status: log.terminal().map_or(JobStatus::Running, Into::into),
        ..meta.clone()
    }
}

#[async_trait]
impl EventLogStore for MemoryStore {
    async fn create_job(&self, meta: &JobMeta) -> Result<(), StoreError> {
        let mut g = self.inner.lock();
        if let Some(max) = self.max_running_per_user {
            let running = g
                .jobs
                .values()
                .filter(|(m, l)| m.user_id == meta.user_id && l.terminal().is_none())
                .count();
            if running >= max {
                return Err(StoreError::TooManyConcurrent(max));
            }
        }
        if let Some(prev) = g.latest.get(&meta.conversation_id)
            && g.jobs
                .get(prev)
                .is_some_and(|(_, l)| l.terminal().is_none())
        {
            return Err(StoreError::ConversationBusy(meta.conversation_id.clone()));
        }
        g.latest
            .insert(meta.conversation_id.clone(), meta.stream_id.clone());
        g.jobs.insert(
            meta.stream_id.clone(),
            (meta.clone(), Arc::new(EventLog::new(self.limits))),
        );
        Ok(())
    }

    async fn get_job(&self, stream_id: &str) -> Result<Option<JobMeta>, StoreError> {
        Ok(self
            .inner
            .lock()
            .jobs
            .get(stream_id)
            .map(|(m, l)| current(m, l)))
    }

    async fn latest_job(&self, conversation_id: &str) -> Result<Option<JobMeta>, StoreError> {
        let g = self.inner.lock();
        Ok(g.latest
            .get(conversation_id)
            .and_then(|id| g.jobs.get(id))
            .map(|(m, l)| current(m, l)))
    }

    async fn running_jobs(&self, user_id: &str) -> Result<Vec<JobMeta>, StoreError> {
        let g = self.inner.lock();
        let mut v: Vec<JobMeta> = g
            .jobs
            .values()
            .filter(|(m, l)| m.user_id == user_id && l.terminal().is_none())
            .map(|(m, l)| current(m, l))
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(v)
    }

    async fn append(
        &self,
        stream_id: &str,
        body: &EventBody,
        expected_seq: Option<u64>,
    ) -> Result<u64, StoreError> {
        let log = {
            let g = self.inner.lock();
            match g.jobs.get(stream_id) {
                Some((_, log)) => log.clone(),
                None => return Err(StoreError::UnknownJob(stream_id.to_string())),
            }
        };
        if let Some(seq) = expected_seq.filter(|s| log.len() > *s) {
            return Ok(seq); // one process: cannot happen, but keep the contract
        }
        // The status follows from the log itself, so it changes in the same step as the
        // terminal event lands (before any subscriber is woken).
        Ok(log.append(body)?.seq)
    }

    async fn append_batch(
        &self,
        stream_id: &str,
        bodies: &[EventBody],
        expected_first_seq: Option<u64>,
    ) -> Result<Appended, StoreError> {
        let log = {
            let g = self.inner.lock();
            match g.jobs.get(stream_id) {
                Some((_, log)) => log.clone(),
                None => return Err(StoreError::UnknownJob(stream_id.to_string())),
            }
        };
        // Already in the log (one process: cannot happen, but keep the contract).
        let skip = expected_first_seq.map_or(0, |e| log.len().saturating_sub(e) as usize);
        let skip = skip.min(bodies.len());
        let mut first_seq = expected_first_seq.filter(|_| skip > 0);
        let mut count = skip;
        for body in &bodies[skip..] {
            match log.append(body) {
                Ok(f) => {
                    first_seq.get_or_insert(f.seq);
                    count += 1;
                }
                Err(e) if count == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        Ok(Appended {
            first_seq: first_seq.unwrap_or_else(|| log.len()),
            count,
        })
    }

    /// An append is a lock and an encode in this process: jobs append inline.
    fn appends_locally(&self) -> bool {
        true
    }

    async fn open_log(&self, stream_id: &str) -> Result<Option<Arc<EventLog>>, StoreError> {
        Ok(self
            .inner
            .lock()
            .jobs
            .get(stream_id)
            .map(|(_, l)| l.clone()))
    }

    fn ready_log(&self, stream_id: &str) -> Option<Arc<EventLog>> {
        self.inner
            .lock()
            .jobs
            .get(stream_id)
            .map(|(_, l)| l.clone())
    }

    async fn read_range(
        &self,
        stream_id: &str,
        cursor: Option<u64>,
        max: usize,
    ) -> Result<Option<RangePage>, StoreError> {
        let Some(log) = self.ready_log(stream_id) else {
            return Ok(None);
        };
        // Length and end first, as the Redis store reads them: the frames that follow
        // can only be more.
        let (len, ended) = (log.len(), log.terminal().is_some());
        let frames = log.read_after(cursor, max).frames;
        Ok(Some(RangePage { frames, len, ended }))
    }

    async fn remove_expired(&self, retention: Duration) -> Result<usize, StoreError> {
        let mut g = self.inner.lock();
        let before = g.jobs.len();
        g.jobs
            .retain(|_, (_, log)| log.finished_for().is_none_or(|d| d < retention));
        let MemInner { jobs, latest } = &mut *g;
        latest.retain(|_, id| jobs.contains_key(id));
        Ok(before - g.jobs.len())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sync_log(&self, _stream_id: &str) -> Result<(), StoreError> {
        Ok(()) // the log is the log itself: nothing to catch up
    }
}

#[async_trait]
impl RateLimitStore for MemoryStore {
    /// The same sliding-window log as the Redis store's, on tokio's clock (so tests
    /// can pause it).
    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        if limit == 0 || period.is_zero() {
            return Ok(None);
        }
        let now = tokio::time::Instant::now();
        let left = |hit: &tokio::time::Instant| *hit + period <= now;
        let mut windows = self.rate_windows.lock();
        if windows.len() >= RATE_KEYS_BEFORE_SWEEP {
            // Forget keys (e.g. IP addresses) whose hits have all left their window.
            windows.retain(|_, hits| hits.back().is_some_and(|h| !left(h)));
        }
        let hits = windows.entry(key.to_string()).or_default();
        while hits.front().is_some_and(left) {
            hits.pop_front();
        }
        if hits.len() < limit as usize {
            hits.push_back(now);
            return Ok(None);
        }
        Ok(hits.front().map(|oldest| *oldest + period - now))
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim_idempotency(
        &self,
        key: &str,
        request_hash: &str,
        token: &str,
        claim_ttl: Duration,
    ) -> Result<IdempotencyClaim, StoreError> {
        let now = tokio::time::Instant::now();
        let mut keys = self.idempotency.lock();
        if keys.len() >= IDEMPOTENCY_KEYS_BEFORE_SWEEP {
            keys.retain(|_, e| e.expires_at > now);
        }
        if let Some(e) = keys.get(key).filter(|e| e.expires_at > now) {
            return Ok(match &e.value {
                None => IdempotencyClaim::Pending {
                    request_hash: e.request_hash.clone(),
                },
                Some(v) => IdempotencyClaim::Filled {
                    request_hash: e.request_hash.clone(),
                    value: v.clone(),
                },
            });
        }
        keys.insert(
            key.to_string(),
            IdemEntry {
                request_hash: request_hash.to_string(),
                token: token.to_string(),
                value: None,
                expires_at: now + claim_ttl,
            },
        );
        Ok(IdempotencyClaim::Claimed)
    }

    async fn fill_idempotency(
        &self,
        key: &str,
        token: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = tokio::time::Instant::now();
        let mut keys = self.idempotency.lock();
        match keys.get_mut(key) {
            Some(e) if e.token == token && e.value.is_none() && e.expires_at > now => {
                e.value = Some(value.to_string());
                e.expires_at = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_idempotency(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut keys = self.idempotency.lock();
        if keys
            .get(key)
            .is_some_and(|e| e.token == token && e.value.is_none())
        {
            keys.remove(key);
        }
        Ok(())
    }
}

#[async_trait]
impl JobCoordination for MemoryStore {
    // One process, one reaper and at most one task per job: the end claims need no
    // holder, only a running job.
    async fn claim_orphan(&self, stream_id: &str) -> Result<bool, StoreError> {
        Ok(self.running_log(stream_id).is_some())
    }

    async fn claim_end(&self, stream_id: &str) -> Result<bool, StoreError> {
        let known = self.inner.lock().jobs.contains_key(stream_id);
        Ok(!known || self.running_log(stream_id).is_some())
    }

    async fn request_abort(&self, stream_id: &str) -> Result<(), StoreError> {
        if self.running_log(stream_id).is_some() {
            let handler = self.abort_handler.lock().clone();
            if let Some(h) = handler {
                h(stream_id);
            }
        }
        Ok(())
    }

    fn set_abort_handler(&self, handler: AbortHandler) {
        *self.abort_handler.lock() = Some(handler);
    }

    async fn orphaned_jobs(&self, live: &HashSet<String>) -> Result<Vec<Orphan>, StoreError> {
        Ok(self
            .inner
            .lock()
            .jobs
            .values()
            .filter(|(m, l)| l.terminal().is_none() && !live.contains(&m.stream_id))
            .map(|(m, l)| Orphan {
                meta: current(m, l),
                reason: OrphanReason::Abandoned,
            })
            .collect())
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::*;

    /// One hit every `every` for `total`, through the memory store, on paused time;
    /// returns the times (since the start) of the hits that passed and, for each
    /// refused hit, its time and the wait it was told.
    async fn hammer(
        limit: u32,
        period: Duration,
        every: Duration,
        total: Duration,
    ) -> (Vec<Duration>, Vec<(Duration, Duration)>) {
        let store = MemoryStore::new(LogLimits::default());
        let start = tokio::time::Instant::now();
        let (mut passed, mut refused) = (Vec::new(), Vec::new());
        while start.elapsed() < total {
            let t = start.elapsed();
            match store.rate_limit("user:u", limit, period).await.unwrap() {
                None => passed.push(t),
                Some(wait) => refused.push((t, wait)),
            }
            tokio::time::sleep(every).await;
        }
        (passed, refused)
    }

    /// At most `limit` hits in any window of `period`: GCRA with a burst of N let
    /// about 2N − 1 through in one window.
    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_window() {
        let period = Duration::from_secs(60);
        let (passed, refused) = hammer(
            40,
            period,
            Duration::from_millis(250),
            Duration::from_secs(200),
        )
        .await;
        for (i, t) in passed.iter().enumerate() {
            let in_window = passed[i..].iter().take_while(|u| **u < *t + period).count();
            assert!(in_window <= 40, "{in_window} hits in the 60 s from {t:?}");
        }
        // The window is used fully: 40 at once, then 40 more each time the first of
        // the window leaves it (at 60 s, 120 s, 180 s).
        assert_eq!(passed.len(), 160);
        assert_eq!(&passed[..2], &[Duration::ZERO, Duration::from_millis(250)]);
        assert_eq!(passed[40], Duration::from_secs(60));
        // Each refused hit was told exactly when the oldest hit leaves.
        for (t, wait) in refused {
            let oldest = passed.iter().rev().filter(|p| **p <= t).nth(39).unwrap();
            assert_eq!(t + wait, *oldest + period, "refused at {t:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_hit_is_not_counted_and_keys_are_apart() {
        let store = MemoryStore::new(LogLimits::default());
        let period = Duration::from_secs(10);
        assert_eq!(store.rate_limit("k", 2, period).await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(store.rate_limit("k", 2, period).await.unwrap(), None);
        for _ in 0..5 {
            assert_eq!(
                store.rate_limit("k", 2, period).await.unwrap(),
                Some(Duration::from_secs(7))
            );
        }
        assert_eq!(store.rate_limit("other", 2, period).await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(7)).await;
        // The first hit left; the refused ones never counted.
        assert_eq!(store.rate_limit("k", 2, period).await.unwrap(), None);
        assert_eq!(
            store.rate_limit("k", 2, period).await.unwrap(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(store.rate_limit("k", 0, period).await.unwrap(), None, "off");
    }
}
