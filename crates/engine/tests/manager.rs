//! Job manager behaviour against a scripted provider and the in-memory store and
//! persistence: completion, abort ordering, stall reaper, log cap, busy rules,
//! graceful shutdown, retention. Timing tests run on paused tokio time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::EngineError;
use genstream_engine::event::{EventBody, FinalStatus};
use genstream_engine::log::{EventLog, LogLimits};
use genstream_engine::manager::{JobManager, ManagerConfig, ModelEntry, StartRequest};
use genstream_engine::persist::{MemoryPersistence, Persistence};
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream,
};
use genstream_engine::store::{JobStatus, JobStore, MemoryStore};
use genstream_engine::usage::UsageRecord;
use tokio_util::sync::CancellationToken;

/// What the scripted provider does after its tokens.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    Finish,
    Hang,
    Fail,
}

struct Script {
    tokens: usize,
    delay: Duration,
    then: Then,
    fail_before: bool,
}

#[async_trait]
impl Provider for Script {
    fn kind(&self) -> &str {
        "script"
    }
    async fn stream(
        &self,
        _req: ModelRequest,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        if self.fail_before {
            return Err(ProviderError::new(
                ProviderErrorKind::Http,
                "upstream said no",
            ));
        }
        let (tokens, delay, then) = (self.tokens, self.delay, self.then);
        let s = futures::stream::unfold(0usize, move |i| async move {
            if i < tokens {
                tokio::time::sleep(delay).await;
                return Some((Ok(ProviderEvent::Text(format!("t{i} "))), i + 1));
            }
            match then {
                Then::Finish if i == tokens => Some((
                    Ok(ProviderEvent::Usage(UsageRecord {
                        input_tokens: 7,
                        output_tokens: tokens as u64,
                        ..Default::default()
                    })),
                    i + 1,
                )),
                Then::Finish => None,
                Then::Hang => {
                    futures::future::pending::<()>().await;
                    None
                }
                Then::Fail if i == tokens => Some((
                    Err(ProviderError::new(
                        ProviderErrorKind::Upstream,
                        "boom mid-stream",
                    )),
                    i + 1,
                )),
                Then::Fail => None,
            }
        });
        Ok(s.boxed())
    }
}

struct Harness {
    manager: JobManager,
    db: Arc<MemoryPersistence>,
}

fn harness(limits: LogLimits, config: ManagerConfig) -> Harness {
    let db = Arc::new(MemoryPersistence::default());
    let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(limits));
    let model = |name: &str, p: Script| {
        let mut m = ModelEntry::new(name, Arc::new(p));
        // Upstream timeouts beyond the stall timeout, so that the stall reaper (not
        // the retry layer) is what ends a hanging job here.
        m.timeouts.first_byte = Duration::from_secs(3600);
        m.timeouts.idle = Duration::from_secs(3600);
        m
    };
    let ms = Duration::from_millis(10);
    let models = vec![
        model(
            "fast",
            Script {
                tokens: 5,
                delay: ms,
                then: Then::Finish,
                fail_before: false,
            },
        ),
        model(
            "slow",
            Script {
                tokens: 1000,
                delay: ms * 10,
                then: Then::Finish,
                fail_before: false,
            },
        ),
        model(
            "hang",
            Script {
                tokens: 3,
                delay: ms,
                then: Then::Hang,
                fail_before: false,
            },
        ),
        model(
            "fail_mid",
            Script {
                tokens: 3,
                delay: ms,
                then: Then::Fail,
                fail_before: false,
            },
        ),
        model(
            "fail_before",
            Script {
                tokens: 0,
                delay: ms,
                then: Then::Finish,
                fail_before: true,
            },
        ),
    ];
    let manager = JobManager::new(store, db.clone() as Arc<dyn Persistence>, models, config);
    Harness { manager, db }
}

fn req(model: &str) -> StartRequest {
    StartRequest {
        user_id: "alice".into(),
        text: "hello there".into(),
        model: Some(model.into()),
        ..Default::default()
    }
}

async fn log_of(h: &Harness, stream_id: &str) -> Arc<EventLog> {
    h.manager.job_for("alice", stream_id).await.unwrap().1
}

async fn wait_end(log: &EventLog) -> EventBody {
    let mut rx = log.watch();
    loop {
        rx.borrow_and_update();
        if let Some(e) = log.terminal_event() {
            return e.body;
        }
        rx.changed().await.unwrap();
    }
}

fn events(log: &EventLog) -> Vec<genstream_engine::event::Event> {
    log.read_after(None, usize::MAX)
        .frames
        .iter()
        .map(|f| serde_json::from_slice(f.data_json()).unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn completes_and_persists_before_final() {
    let h = harness(LogLimits::default(), ManagerConfig::default());
    let started = h.manager.start(req("fast")).await.unwrap();
    // The user message is saved before start returns.
    let user =
        h.db.get_message(&started.user_message_id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(user.text, "hello there");
    let log = log_of(&h, &started.stream_id).await;
    let end = wait_end(&log).await;
    let EventBody::Final(f) = end else {
        panic!("{end:?}")
    };
    assert_eq!(f.status, FinalStatus::Complete);
    assert_eq!(f.response_message.text, "t0 t1 t2 t3 t4 ");
    assert_eq!(f.usage.output_tokens, 5);
    assert_eq!(f.conversation.title, "hello there");
    let saved =
        h.db.get_message(&started.response_message_id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(saved, f.response_message);
    assert!(!saved.unfinished);
    let evs = events(&log);
    assert!(matches!(evs[0].body, EventBody::Created(_)));
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.seq, i as u64);
    }
    assert_eq!(evs.iter().filter(|e| e.body.is_terminal()).count(), 1);
    assert!(matches!(evs[evs.len() - 2].body, EventBody::Usage(_)));
    let meta = h
        .manager
        .store()
        .get_job(&started.stream_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(meta.status, JobStatus::Complete);
    h.manager.wait_idle().await;
    assert_eq!(h.manager.live_jobs(), 0);
}

#[tokio::test(start_paused = true)]
async fn abort_saves_partial_before_answering_and_is_idempotent() {
    let h = harness(LogLimits::default(), ManagerConfig::default());
    let started = h.manager.start(req("slow")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(550)).await;
    let out = h.manager.abort("alice", &started.stream_id).await.unwrap();
    // Saved before the answer: read it right away.
    let saved =
        h.db.get_message(&started.response_message_id)
            .await
            .unwrap()
            .unwrap();
    assert!(saved.unfinished);
    assert_eq!(saved, out.response_message);
    assert!(
        out.response_message.text.starts_with("t0 t1 "),
        "{}",
        out.response_message.text
    );
    assert!(
        out.usage.output_tokens > 0,
        "estimated usage for the cut-off call"
    );
    // Repeat: same answer.
    let again = h.manager.abort("alice", &started.stream_id).await.unwrap();
    assert_eq!(again.response_message, out.response_message);
    assert_eq!(again.usage, out.usage);
    // Another user: 403; unknown: 404.
    assert!(matches!(
        h.manager.abort("bob", &started.stream_id).await,
        Err(EngineError::Forbidden(_))
    ));
    assert!(matches!(
        h.manager.abort("alice", "nope").await,
        Err(EngineError::NotFound(_))
    ));
    // A follow-up on the aborted response succeeds at once.
    let follow = h
        .manager
        .start(StartRequest {
            conversation_id: Some(started.conversation_id.clone()),
            parent_message_id: Some(started.response_message_id.clone()),
            ..req("fast")
        })
        .await
        .unwrap();
    let log = log_of(&h, &follow.stream_id).await;
    assert!(matches!(wait_end(&log).await, EventBody::Final(_)));
    // Abort of a completed job: 409.
    assert!(matches!(
        h.manager.abort("alice", &follow.stream_id).await,
        Err(EngineError::JobFinished(_))
    ));
    let evs = events(&*log_of(&h, &started.stream_id).await);
    assert_eq!(evs.iter().filter(|e| e.body.is_terminal()).count(), 1);
}

#[tokio::test(start_paused = true)]
async fn stalled_job_is_reaped_with_partial_saved() {
    let config = ManagerConfig {
        stall_timeout: Duration::from_secs(600),
        reap_interval: Duration::from_secs(5),
        ..ManagerConfig::default()
    };
    let h = harness(LogLimits::default(), config);
    h.manager.spawn_reaper();
    let started = h.manager.start(req("hang")).await.unwrap();
    let log = log_of(&h, &started.stream_id).await;
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert!(log.terminal().is_none(), "not before the stall timeout");
    let end = tokio::time::timeout(Duration::from_secs(10), wait_end(&log))
        .await
        .unwrap();
    let EventBody::Error(e) = end else {
        panic!("{end:?}")
    };
    assert_eq!(e.code, "stalled");
    let partial = e.response_message.unwrap();
    assert_eq!(partial.text, "t0 t1 t2 ");
    let saved =
        h.db.get_message(&started.response_message_id)
            .await
            .unwrap()
            .unwrap();
    assert!(saved.unfinished && saved.error);
}

#[tokio::test(start_paused = true)]
async fn log_cap_ends_the_job_with_log_full() {
    let limits = LogLimits {
        max_events: 20,
        max_bytes: 1 << 20,
    };
    let h = harness(limits, ManagerConfig::default());
    let started = h.manager.start(req("slow")).await.unwrap();
    let log = log_of(&h, &started.stream_id).await;
    let end = wait_end(&log).await;
    let EventBody::Error(e) = end else {
        panic!("{end:?}")
    };
    assert_eq!(e.code, "log_full");
    assert!(e.response_message.is_some());
    assert_eq!(log.len(), 21, "20 events and the terminal one");
    // Byte cap too.
    let limits = LogLimits {
        max_events: 10_000,
        max_bytes: 4096,
    };
    let h = harness(limits, ManagerConfig::default());
    let started = h.manager.start(req("slow")).await.unwrap();
    let log = log_of(&h, &started.stream_id).await;
    let EventBody::Error(e) = wait_end(&log).await else {
        panic!()
    };
    assert_eq!(e.code, "log_full");
    assert!(log.bytes() < 4096 + 4096, "bounded: {}", log.bytes());
}

#[tokio::test(start_paused = true)]
async fn conversation_busy_and_server_busy() {
    let h = harness(
        LogLimits::default(),
        ManagerConfig {
            max_live_jobs: 2,
            ..Default::default()
        },
    );
    let a = h.manager.start(req("slow")).await.unwrap();
    let busy = h
        .manager
        .start(StartRequest {
            conversation_id: Some(a.conversation_id.clone()),
            ..req("fast")
        })
        .await;
    assert!(
        matches!(busy, Err(EngineError::ConversationBusy(_))),
        "{busy:?}"
    );
    let _b = h.manager.start(req("slow")).await.unwrap();
    let full = h.manager.start(req("fast")).await;
    assert!(matches!(full, Err(EngineError::ServerBusy(2))), "{full:?}");
    // Running jobs were not evicted.
    assert_eq!(h.manager.live_jobs(), 2);
    // Another user's conversation: 403.
    let other = h
        .manager
        .start(StartRequest {
            user_id: "bob".into(),
            conversation_id: Some(a.conversation_id.clone()),
            ..req("fast")
        })
        .await;
    assert!(matches!(other, Err(EngineError::Forbidden(_))));
    // Bad input.
    assert!(matches!(
        h.manager
            .start(StartRequest {
                text: "  ".into(),
                ..req("fast")
            })
            .await,
        Err(EngineError::BadRequest { .. })
    ));
    assert!(matches!(
        h.manager.start(req("no-such-model")).await,
        Err(EngineError::BadRequest { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn upstream_failures_end_with_error_and_partial() {
    let h = harness(LogLimits::default(), ManagerConfig::default());
    let s = h.manager.start(req("fail_before")).await.unwrap();
    let EventBody::Error(e) = wait_end(&*log_of(&h, &s.stream_id).await).await else {
        panic!()
    };
    assert_eq!(e.code, "upstream_error");
    assert!(e.message.contains("upstream said no"));
    let s = h.manager.start(req("fail_mid")).await.unwrap();
    let EventBody::Error(e) = wait_end(&*log_of(&h, &s.stream_id).await).await else {
        panic!()
    };
    assert_eq!(e.code, "upstream_error");
    assert_eq!(e.response_message.unwrap().text, "t0 t1 t2 ");
    let saved =
        h.db.get_message(&s.response_message_id)
            .await
            .unwrap()
            .unwrap();
    assert!(saved.error);
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_aborts_after_grace_and_saves_partials() {
    let h = harness(LogLimits::default(), ManagerConfig::default());
    let fast = h.manager.start(req("fast")).await.unwrap();
    let slow = h.manager.start(req("slow")).await.unwrap();
    let hang = h.manager.start(req("hang")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.manager.shutdown(Duration::from_secs(2)).await;
    assert!(matches!(
        h.manager.start(req("fast")).await,
        Err(EngineError::ShuttingDown)
    ));
    assert_eq!(h.manager.live_jobs(), 0);
    let EventBody::Final(f) = log_of(&h, &fast.stream_id)
        .await
        .terminal_event()
        .unwrap()
        .body
    else {
        panic!()
    };
    assert_eq!(f.status, FinalStatus::Complete, "finished within grace");
    for id in [&slow, &hang] {
        let log = log_of(&h, &id.stream_id).await;
        let EventBody::Final(f) = log.terminal_event().unwrap().body else {
            panic!()
        };
        assert_eq!(f.status, FinalStatus::Aborted);
        assert_eq!(f.reason.as_deref(), Some("shutdown"));
        let saved =
            h.db.get_message(&id.response_message_id)
                .await
                .unwrap()
                .unwrap();
        assert!(saved.unfinished);
        let meta = h
            .manager
            .store()
            .get_job(&id.stream_id)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(meta.status, JobStatus::Running);
    }
}

#[tokio::test(start_paused = true)]
async fn finished_logs_expire_after_retention() {
    let config = ManagerConfig {
        retention: Duration::from_secs(3600),
        reap_interval: Duration::from_secs(5),
        ..Default::default()
    };
    let h = harness(LogLimits::default(), config);
    h.manager.spawn_reaper();
    let s = h.manager.start(req("fast")).await.unwrap();
    wait_end(&*log_of(&h, &s.stream_id).await).await;
    tokio::time::sleep(Duration::from_secs(3500)).await;
    assert!(h.manager.job_for("alice", &s.stream_id).await.is_ok());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(matches!(
        h.manager.job_for("alice", &s.stream_id).await,
        Err(EngineError::NotFound(_))
    ));
    // The persisted conversation is still there.
    assert_eq!(
        h.db.list_messages(&s.conversation_id).await.unwrap().len(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn fifty_subscribers_before_during_after_see_identical_logs() {
    let h = harness(LogLimits::default(), ManagerConfig::default());
    let s = h.manager.start(req("fast")).await.unwrap();
    let log = log_of(&h, &s.stream_id).await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            // Join at staggered times: some before the first token, some mid-way,
            // some after the end.
            tokio::time::sleep(Duration::from_millis(i * 2)).await;
            let mut rx = log.watch();
            let mut cursor = None;
            let mut got: Vec<bytes::Bytes> = Vec::new();
            loop {
                rx.borrow_and_update();
                let batch = log.read_after(cursor, 3);
                for f in &batch.frames {
                    cursor = Some(f.seq);
                    got.push(f.bytes.clone());
                }
                if batch.ended {
                    return got;
                }
                if batch.frames.is_empty() {
                    rx.changed().await.unwrap();
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let reference: Vec<bytes::Bytes> = log
        .read_after(None, usize::MAX)
        .frames
        .into_iter()
        .map(|f| f.bytes)
        .collect();
    for got in &all {
        assert_eq!(got, &reference);
    }
    // Shared, not copied: every subscriber holds one of at most two allocations of a
    // frame, the frame's own (read before its block was sealed) or its slice of the
    // block (the log's now), never one of its own.
    for seq in 1..reference.len() {
        let mut seen: Vec<*const u8> = all.iter().map(|got| got[seq].as_ptr()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() <= 2, "seq {seq}: {} allocations", seen.len());
        assert!(seen.contains(&reference[seq].as_ptr()) || seen.len() == 1);
    }
}

/// A start whose key another start (say, on another replica) holds waits for it: it
/// answers the other's ids once filled, starts its own once released, and is
/// `IdempotencyInProgress` when the holder stays silent past `idempotency_wait`.
#[tokio::test(start_paused = true)]
async fn an_idempotent_start_waits_for_the_holder_of_its_key() {
    use genstream_engine::manager::{Idempotency, Started};
    let h = harness(LogLimits::default(), ManagerConfig::default());
    let store = h.manager.store().clone();
    let idem = |key: &str| Idempotency {
        key: key.into(),
        request_hash: "h".into(),
    };
    let with_key = |key: &str| StartRequest {
        idempotency: Some(idem(key)),
        ..req("fast")
    };
    let hold = |key: &str| {
        let (store, k) = (store.clone(), idem(key).store_key("alice"));
        async move {
            let claim = store
                .claim_idempotency(&k, "h", "other", Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(claim, genstream_engine::store::IdempotencyClaim::Claimed);
            k
        }
    };

    // Filled a second later: the other start's ids, and no job here.
    let k = hold("filled").await;
    let theirs = Started {
        stream_id: "s".into(),
        conversation_id: "c".into(),
        user_message_id: "u".into(),
        response_message_id: "r".into(),
    };
    let value = serde_json::to_string(&theirs).unwrap();
    let filler = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            store
                .fill_idempotency(&k, "other", &value, Duration::from_secs(60))
                .await
                .unwrap()
        })
    };
    assert_eq!(h.manager.start(with_key("filled")).await.unwrap(), theirs);
    assert!(filler.await.unwrap());
    assert!(
        h.manager.active("alice").await.unwrap().is_empty(),
        "no job"
    );

    // Released (the other start failed): this one starts.
    let k = hold("released").await;
    let releaser = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            store.release_idempotency(&k, "other").await.unwrap();
        })
    };
    let mine = h.manager.start(with_key("released")).await.unwrap();
    releaser.await.unwrap();
    wait_end(&*log_of(&h, &mine.stream_id).await).await;
    // …and its key now answers its ids.
    assert_eq!(h.manager.start(with_key("released")).await.unwrap(), mine);

    // Held past the wait: 409-to-be, nothing started.
    hold("stuck").await;
    let waited = tokio::time::Instant::now();
    let e = h.manager.start(with_key("stuck")).await.unwrap_err();
    assert!(
        matches!(&e, EngineError::IdempotencyInProgress(k) if k == "stuck"),
        "{e:?}"
    );
    let wait = ManagerConfig::default().idempotency_wait;
    assert!(waited.elapsed() <= wait, "{:?}", waited.elapsed());
    assert!(waited.elapsed() >= wait / 2, "{:?}", waited.elapsed());
    assert!(h.manager.active("alice").await.unwrap().is_empty());

    // Another request under a used key: refused, whoever holds it.
    let e = h
        .manager
        .start(StartRequest {
            idempotency: Some(Idempotency {
                key: "released".into(),
                request_hash: "other".into(),
            }),
            ..req("fast")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::IdempotencyConflict(k) if k == "released"),
        "{e:?}"
    );
}

/// The memory store whose `create_job` waits for a gate, so a test can drop a start
/// while it is under way.
struct GatedStore {
    inner: MemoryStore,
    reached: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
}

mod gated {
    use std::collections::HashSet;

    use genstream_engine::event::EventBody;
    use genstream_engine::store::*;

    use super::*;

    #[async_trait]
    impl EventLogStore for GatedStore {
        async fn create_job(&self, meta: &JobMeta) -> Result<(), StoreError> {
            self.reached.notify_one();
            let _pass = self.gate.acquire().await.unwrap();
            self.inner.create_job(meta).await
        }
        async fn get_job(&self, id: &str) -> Result<Option<JobMeta>, StoreError> {
            self.inner.get_job(id).await
        }
        async fn latest_job(&self, id: &str) -> Result<Option<JobMeta>, StoreError> {
            self.inner.latest_job(id).await
        }
        async fn running_jobs(&self, user: &str) -> Result<Vec<JobMeta>, StoreError> {
            self.inner.running_jobs(user).await
        }
        async fn append(
            &self,
            id: &str,
            body: &EventBody,
            seq: Option<u64>,
        ) -> Result<u64, StoreError> {
            self.inner.append(id, body, seq).await
        }
        async fn append_batch(
            &self,
            id: &str,
            bodies: &[EventBody],
            first: Option<u64>,
        ) -> Result<Appended, StoreError> {
            self.inner.append_batch(id, bodies, first).await
        }
        async fn open_log(&self, id: &str) -> Result<Option<Arc<EventLog>>, StoreError> {
            self.inner.open_log(id).await
        }
        fn ready_log(&self, id: &str) -> Option<Arc<EventLog>> {
            self.inner.ready_log(id)
        }
        async fn read_range(
            &self,
            id: &str,
            cursor: Option<u64>,
            max: usize,
        ) -> Result<Option<RangePage>, StoreError> {
            self.inner.read_range(id, cursor, max).await
        }
        async fn sync_log(&self, id: &str) -> Result<(), StoreError> {
            self.inner.sync_log(id).await
        }
        async fn remove_expired(&self, retention: Duration) -> Result<usize, StoreError> {
            self.inner.remove_expired(retention).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
    }

    #[async_trait]
    impl JobCoordination for GatedStore {
        async fn claim_orphan(&self, id: &str) -> Result<bool, StoreError> {
            self.inner.claim_orphan(id).await
        }
        async fn claim_end(&self, id: &str) -> Result<bool, StoreError> {
            self.inner.claim_end(id).await
        }
        async fn orphaned_jobs(&self, live: &HashSet<String>) -> Result<Vec<Orphan>, StoreError> {
            self.inner.orphaned_jobs(live).await
        }
        async fn request_abort(&self, id: &str) -> Result<(), StoreError> {
            self.inner.request_abort(id).await
        }
        fn set_abort_handler(&self, handler: AbortHandler) {
            self.inner.set_abort_handler(handler)
        }
    }

    #[async_trait]
    impl RateLimitStore for GatedStore {
        async fn rate_limit(
            &self,
            key: &str,
            limit: u32,
            period: Duration,
        ) -> Result<Option<Duration>, StoreError> {
            self.inner.rate_limit(key, limit, period).await
        }
    }

    #[async_trait]
    impl IdempotencyStore for GatedStore {
        async fn claim_idempotency(
            &self,
            key: &str,
            hash: &str,
            token: &str,
            ttl: Duration,
        ) -> Result<IdempotencyClaim, StoreError> {
            self.inner.claim_idempotency(key, hash, token, ttl).await
        }
        async fn fill_idempotency(
            &self,
            key: &str,
            token: &str,
            value: &str,
            ttl: Duration,
        ) -> Result<bool, StoreError> {
            self.inner.fill_idempotency(key, token, value, ttl).await
        }
        async fn release_idempotency(&self, key: &str, token: &str) -> Result<(), StoreError> {
            self.inner.release_idempotency(key, token).await
        }
    }
}

/// A client that drops its connection mid-start (its handler future is dropped) does
/// not cut an idempotent start: the start finishes and fills its key, so the client's
/// retry gets that job, and only it.
#[tokio::test(start_paused = true)]
async fn a_dropped_idempotent_start_still_finishes_and_fills_its_key() {
    use genstream_engine::manager::Idempotency;
    let store = Arc::new(GatedStore {
        inner: MemoryStore::new(LogLimits::default()),
        reached: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let db = Arc::new(MemoryPersistence::default());
    let model = ModelEntry::new(
        "fast",
        Arc::new(Script {
            tokens: 5,
            delay: Duration::from_millis(10),
            then: Then::Finish,
            fail_before: false,
        }),
    );
    let manager = JobManager::new(
        store.clone() as Arc<dyn JobStore>,
        db as Arc<dyn Persistence>,
        vec![model],
        ManagerConfig::default(),
    );
    let with_key = || StartRequest {
        idempotency: Some(Idempotency {
            key: "k".into(),
            request_hash: "h".into(),
        }),
        ..req("fast")
    };
    let first = tokio::spawn({
        let m = manager.clone();
        async move { m.start(with_key()).await }
    });
    store.reached.notified().await;
    first.abort(); // the connection is gone
    assert!(first.await.unwrap_err().is_cancelled());
    store.gate.add_permits(1000);
    let retry = manager.start(with_key()).await.unwrap();
    let jobs = manager.active("alice").await.unwrap();
    let ended = manager.job_for("alice", &retry.stream_id).await.unwrap().1;
    let running: Vec<_> = jobs.iter().map(|j| j.stream_id.clone()).collect();
    assert!(
        running.is_empty() || running == vec![retry.stream_id.clone()],
        "one job: {running:?}"
    );
    wait_end(&ended).await;
    assert_eq!(
        manager.conversations("alice").await.unwrap().len(),
        1,
        "the retry started nothing"
    );
}
