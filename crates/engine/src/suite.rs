//! The job-store contract as executable tests, shared by every [`JobStore`]
//! implementation: the memory store runs it in `engine/tests/store_suite.rs`, the Redis
//! store in `redis/tests/store_suite.rs`. Each function takes a fresh, empty store made
//! with the caps given by [`SUITE_LIMITS`].
#![doc(hidden)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::event::*;
use crate::log::{AppendError, LogLimits};
use crate::store::{JobMeta, JobStatus, JobStore, OrphanReason, StoreError};
use crate::usage::UsageRecord;

/// Caps the suite's stores must be built with (the cap test relies on them).
pub const SUITE_LIMITS: LogLimits = LogLimits {
    max_events: 50,
    max_bytes: 1 << 20,
};

/// A running job's metadata for `user` in `conversation`.
pub fn meta(user: &str, conversation: &str) -> JobMeta {
    JobMeta {
        stream_id: crate::new_id(),
        user_id: user.into(),
        conversation_id: conversation.into(),
        user_message_id: crate::new_id(),
        response_message_id: crate::new_id(),
        model: "demo".into(),
        status: JobStatus::Running,
        created_at: crate::now_rfc3339(),
        webhook_url: None,
    }
}

fn delta(text: &str) -> EventBody {
    EventBody::MessageDelta(Delta {
        id: "step_0".into(),
        delta: DeltaContent {
            content: vec![ContentPart::Text { text: text.into() }],
        },
    })
}

fn step() -> EventBody {
    EventBody::RunStep(RunStep {
        id: "step_0".into(),
        run_id: "r".into(),
        index: 0,
        step_type: StepType::MessageCreation,
        step_details: StepDetails::MessageCreation {
            message_creation: MessageCreation {
                message_id: "m".into(),
            },
        },
    })
}

fn error_end() -> EventBody {
    EventBody::Error(ErrorEvent {
        code: "upstream_error".into(),
        message: "x".into(),
        response_message: None,
    })
}

fn usage() -> EventBody {
    EventBody::Usage(UsageRecord {
        model: "demo".into(),
        provider: "demo".into(),
        input_tokens: 3,
        output_tokens: 4,
        ..Default::default()
    })
}

async fn unique_user() -> String {
    format!("user-{}", crate::new_id())
}

/// Metadata round-trips; unknown ids are `None`; the running lists follow status.
pub async fn create_get_and_lists(store: Arc<dyn JobStore>) {
    let user = unique_user().await;
    let m = meta(&user, &crate::new_id());
    store.create_job(&m).await.unwrap();
    assert_eq!(store.get_job(&m.stream_id).await.unwrap(), Some(m.clone()));
    assert_eq!(
        store.latest_job(&m.conversation_id).await.unwrap(),
        Some(m.clone())
    );
    assert_eq!(store.running_jobs(&user).await.unwrap(), vec![m.clone()]);
    assert!(store.get_job("no-such-job").await.unwrap().is_none());
    assert!(store.open_log("no-such-job").await.unwrap().is_none());
    assert!(
        store
            .latest_job("no-such-conversation")
            .await
            .unwrap()
            .is_none()
    );
    store
        .append(&m.stream_id, &error_end(), None)
        .await
        .unwrap();
    let after = store.get_job(&m.stream_id).await.unwrap().unwrap();
    assert_eq!(after.status, JobStatus::Error);
    assert!(
        store.running_jobs(&user).await.unwrap().is_empty(),
        "self-healing list"
    );
}

/// One running job per conversation; free again once it ends.
pub async fn one_running_job_per_conversation(store: Arc<dyn JobStore>) {
    let user = unique_user().await;
    let conv = crate::new_id();
    let a = meta(&user, &conv);
    store.create_job(&a).await.unwrap();
    let b = meta(&user, &conv);
    assert!(matches!(
        store.create_job(&b).await,
        Err(StoreError::ConversationBusy(_))
    ));
    assert!(
        store.get_job(&b.stream_id).await.unwrap().is_none(),
        "the refused job left nothing"
    );
    store
        .append(&a.stream_id, &error_end(), None)
        .await
        .unwrap();
    store.create_job(&b).await.unwrap();
    assert_eq!(
        store.latest_job(&conv).await.unwrap().unwrap().stream_id,
        b.stream_id
    );
}

/// Concurrent creates in one conversation: exactly one wins.
pub async fn concurrent_creates_one_wins(store: Arc<dyn JobStore>) {
    let user = unique_user().await;
    let conv = crate::new_id();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            let m = meta(&user, &conv);
            tokio::spawn(async move { store.create_job(&m).await.is_ok() })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

/// Seqs are 0..n with no holes; frames are the bytes `Frame::encode` makes; exactly
/// one terminal event; an append whose seq already landed is not repeated.
pub async fn append_assigns_seqs_and_one_terminal(store: Arc<dyn JobStore>) {
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    let bodies = [step(), delta("Hel"), delta("lo\n\"q\" ü 😀"), usage()];
    for (i, b) in bodies.iter().enumerate() {
        let seq = store.append(&m.stream_id, b, Some(i as u64)).await.unwrap();
        assert_eq!(seq, i as u64);
    }
    // A retried append (its first try landed): same seq, nothing appended.
    let again = store
        .append(&m.stream_id, &bodies[3], Some(3))
        .await
        .unwrap();
    assert_eq!(again, 3);
    let end = error_end();
    assert_eq!(store.append(&m.stream_id, &end, None).await.unwrap(), 4);
    assert!(matches!(
        store.append(&m.stream_id, &error_end(), None).await,
        Err(StoreError::Append(AppendError::Ended))
    ));
    assert!(matches!(
        store.append(&m.stream_id, &delta("late"), None).await,
        Err(StoreError::Append(AppendError::Ended))
    ));
    let log = store.open_log(&m.stream_id).await.unwrap().unwrap();
    let frames = log.read_after(None, usize::MAX).frames;
    assert_eq!(frames.len(), 5);
    for (i, f) in frames.iter().enumerate() {
        let body = if i < 4 { &bodies[i] } else { &end };
        assert_eq!(
            f.bytes,
            Frame::encode(i as u64, body).unwrap().bytes,
            "frame {i}"
        );
        assert_eq!(f.terminal, i == 4);
    }
    assert_eq!(
        log.snapshot().1.aggregated_content,
        vec![ContentPart::Text {
            text: "Hello\n\"q\" ü 😀".into()
        }]
    );
}

/// A batch lands like its events one by one: consecutive seqs, frames byte-equal to
/// `Frame::encode`; a retried batch (whole or overlapping the log) appends only what
/// had not landed; nothing follows a terminal event, and the events before it stay.
pub async fn append_batch_lands_in_order_exactly_once(store: Arc<dyn JobStore>) {
    use crate::store::Appended;
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    let sid = m.stream_id.as_str();
    let bodies = [
        step(),
        delta("a"),
        delta("b"),
        delta("c"),
        delta("d"),
        delta("e"),
        error_end(),
    ];
    let landed = |first_seq, count| Appended { first_seq, count };
    assert_eq!(
        store
            .append_batch(sid, &bodies[..3], Some(0))
            .await
            .unwrap(),
        landed(0, 3)
    );
    // The same batch again (its reply was lost): nothing more.
    assert_eq!(
        store
            .append_batch(sid, &bodies[..3], Some(0))
            .await
            .unwrap(),
        landed(0, 3)
    );
    // A batch that overlaps the log by one event appends the other two.
    assert_eq!(
        store
            .append_batch(sid, &bodies[2..5], Some(2))
            .await
            .unwrap(),
        landed(2, 3)
    );
    // The terminal event ends the batch: what follows it does not land, the events
    // before it do, and only a batch of nothing but late events fails.
    let with_late = [bodies[5].clone(), bodies[6].clone(), delta("late")];
    assert_eq!(
        store.append_batch(sid, &with_late, Some(5)).await.unwrap(),
        landed(5, 2)
    );
    assert!(matches!(
        store.append_batch(sid, &with_late[2..], Some(7)).await,
        Err(StoreError::Append(AppendError::Ended))
    ));
    assert_eq!(
        store.get_job(sid).await.unwrap().unwrap().status,
        JobStatus::Error
    );
    let log = store.open_log(sid).await.unwrap().unwrap();
    let frames = log.read_after(None, usize::MAX).frames;
    assert_eq!(frames.len(), bodies.len());
    for (i, (f, body)) in frames.iter().zip(&bodies).enumerate() {
        assert_eq!(
            f.bytes,
            Frame::encode(i as u64, body).unwrap().bytes,
            "frame {i}"
        );
        assert_eq!(f.terminal, i == bodies.len() - 1);
    }
    let page = store.read_range(sid, None, 100).await.unwrap().unwrap();
    assert_eq!((page.len, page.ended), (bodies.len() as u64, true));

    // At the cap: the events that fit land, the rest is refused, the terminal fits.
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    let sid = m.stream_id.as_str();
    let over: Vec<EventBody> = (0..SUITE_LIMITS.max_events + 3)
        .map(|i| delta(&format!("{i}")))
        .collect();
    let max = SUITE_LIMITS.max_events;
    assert_eq!(
        store.append_batch(sid, &over, Some(0)).await.unwrap(),
        landed(0, max)
    );
    assert!(matches!(
        store
            .append_batch(sid, &over[max..], Some(max as u64))
            .await,
        Err(StoreError::Append(AppendError::Full))
    ));
    assert_eq!(
        store
            .append_batch(sid, &[error_end()], Some(max as u64))
            .await
            .unwrap(),
        landed(max as u64, 1)
    );
}

/// What happens to one try of a batched append in [`batched_appends_survive_lost_calls`].
#[derive(Clone, Copy, Debug)]
pub enum Fate {
    /// The call reaches the store and its reply reaches the writer.
    Lands,
    /// The call fails before it reaches the store.
    FailsBefore,
    /// The call reaches the store (it lands, whole or in part) but its reply is lost.
    ReplyLost,
}

/// A writer's run for [`batched_appends_survive_lost_calls`]: the events' texts (one
/// delta each, then a terminal event if `terminal`), the size of each try's batch
/// (cycled; a retry may carry more events than the try it repeats, as a queue that
/// grew meanwhile would), and each try's fate (then [`Fate::Lands`] once used up).
#[derive(Clone, Debug)]
pub struct BatchPlan {
    pub texts: Vec<String>,
    pub terminal: bool,
    pub sizes: Vec<usize>,
    pub fates: Vec<Fate>,
}

/// A writer that sends its events in batches, each try with the seq it expects first,
/// and retries every failed try (failed before the store or with its reply lost) until
/// one lands, ends with the log holding every event exactly once, in order, with the
/// bytes `Frame::encode` gives them: batching never reorders, drops or duplicates.
pub async fn batched_appends_survive_lost_calls(store: Arc<dyn JobStore>, plan: &BatchPlan) {
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    let sid = m.stream_id.as_str();
    let mut events: Vec<EventBody> = plan.texts.iter().map(|t| delta(t)).collect();
    if plan.terminal {
        events.push(error_end());
    }
    let (mut next, mut tries) = (0usize, 0usize);
    while next < events.len() {
        let size = plan.sizes.get(tries % plan.sizes.len().max(1)).copied();
        let size = size.unwrap_or(1).clamp(1, events.len() - next);
        let fate = plan.fates.get(tries).copied().unwrap_or(Fate::Lands);
        tries += 1;
        let batch = &events[next..next + size];
        match fate {
            Fate::FailsBefore => continue,
            Fate::ReplyLost => {
                let _ = store.append_batch(sid, batch, Some(next as u64)).await;
                continue;
            }
            Fate::Lands => {
                let a = store
                    .append_batch(sid, batch, Some(next as u64))
                    .await
                    .unwrap();
                assert_eq!(a.first_seq, next as u64, "try {tries}");
                assert!(a.count >= 1 && a.count <= size, "try {tries}: {a:?}");
                next += a.count;
            }
        }
    }
    let log = store.open_log(sid).await.unwrap().unwrap();
    let frames = log.read_after(None, usize::MAX).frames;
    let page = store
        .read_range(sid, None, events.len() + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page.len, events.len() as u64);
    assert_eq!(page.ended, plan.terminal);
    assert_eq!(frames.len(), events.len());
    assert_eq!(page.frames.len(), events.len());
    for (i, body) in events.iter().enumerate() {
        let want = Frame::encode(i as u64, body).unwrap().bytes;
        assert_eq!(frames[i].bytes, want, "frame {i} of the log");
        assert_eq!(page.frames[i].bytes, want, "frame {i} read from the store");
    }
}

/// `read_range` pages the store's own log from any cursor: consecutive frames after
/// the cursor, byte-equal to what `open_log` serves, with the log's length and end.
pub async fn read_range_pages_the_log(store: Arc<dyn JobStore>) {
    assert!(
        store
            .read_range("no-such-job", None, 10)
            .await
            .unwrap()
            .is_none()
    );
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    let empty = store
        .read_range(&m.stream_id, None, 10)
        .await
        .unwrap()
        .unwrap();
    assert!(empty.frames.is_empty() && empty.len == 0 && !empty.ended);
    // In batches of several sizes, so that a page may start or end inside a batch (a
    // Redis log stream holds each batch as one entry).
    let mut seq = 0u64;
    for size in [1u64, 3, 7, 9] {
        let bodies: Vec<EventBody> = (seq..seq + size).map(|i| delta(&format!("t{i}"))).collect();
        store
            .append_batch(&m.stream_id, &bodies, Some(seq))
            .await
            .unwrap();
        seq += size;
    }
    let running = store
        .read_range(&m.stream_id, Some(19), 10)
        .await
        .unwrap()
        .unwrap();
    assert!(running.frames.is_empty() && running.len == 20 && !running.ended);
    store
        .append(&m.stream_id, &error_end(), None)
        .await
        .unwrap();
    let log = store.open_log(&m.stream_id).await.unwrap().unwrap();
    let all = log.read_after(None, usize::MAX).frames;
    assert_eq!(all.len(), 21);
    for cursor in [None, Some(0), Some(7), Some(18), Some(19), Some(20)] {
        for max in [1, 3, 100] {
            let page = store
                .read_range(&m.stream_id, cursor, max)
                .await
                .unwrap()
                .unwrap();
            assert_eq!((page.len, page.ended), (21, true));
            let from = cursor.map_or(0, |c| c as usize + 1);
            let want = &all[from..(from + max).min(all.len())];
            assert_eq!(page.frames.len(), want.len(), "cursor {cursor:?} max {max}");
            for (f, w) in page.frames.iter().zip(want) {
                assert_eq!((f.seq, f.terminal, &f.bytes), (w.seq, w.terminal, &w.bytes));
            }
        }
    }
}

/// Past the cap, non-terminal appends are refused and the terminal one still fits.
pub async fn caps_refuse_all_but_the_terminal_event(store: Arc<dyn JobStore>) {
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    for i in 0..SUITE_LIMITS.max_events {
        assert!(
            store
                .append(&m.stream_id, &delta("x"), Some(i as u64))
                .await
                .is_ok()
        );
    }
    assert!(matches!(
        store.append(&m.stream_id, &delta("x"), None).await,
        Err(StoreError::Append(AppendError::Full))
    ));
    assert!(store.append(&m.stream_id, &error_end(), None).await.is_ok());
}

/// A reader that opened the log before the appends sees every one of them, in order.
pub async fn readers_follow_live_appends(store: Arc<dyn JobStore>) {
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    store.append(&m.stream_id, &step(), Some(0)).await.unwrap();
    let log = store.open_log(&m.stream_id).await.unwrap().unwrap();
    let reader = tokio::spawn(async move {
        let mut rx = log.watch();
        let mut cursor = None;
        let mut seqs = Vec::new();
        loop {
            rx.borrow_and_update();
            let batch = log.read_after(cursor, 7);
            for f in &batch.frames {
                seqs.push(f.seq);
                cursor = Some(f.seq);
            }
            if batch.ended {
                return seqs;
            }
            if batch.frames.is_empty() {
                tokio::time::timeout(Duration::from_secs(5), rx.changed())
                    .await
                    .expect("no event within 5 s")
                    .unwrap();
            }
        }
    });
    for i in 1..40u64 {
        store
            .append(&m.stream_id, &delta("t"), Some(i))
            .await
            .unwrap();
    }
    store
        .append(&m.stream_id, &error_end(), None)
        .await
        .unwrap();
    let seqs = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seqs, (0..41).collect::<Vec<_>>());
}

/// A running job that no local task runs is an orphan; a finished one is not.
pub async fn orphans_are_running_jobs_nobody_runs(store: Arc<dyn JobStore>) {
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    let mut live = HashSet::new();
    live.insert(m.stream_id.clone());
    let orphans = store.orphaned_jobs(&live).await.unwrap();
    assert!(!orphans.iter().any(|o| o.meta.stream_id == m.stream_id));
    let orphans = store.orphaned_jobs(&HashSet::new()).await.unwrap();
    let mine: Vec<_> = orphans
        .iter()
        .filter(|o| o.meta.stream_id == m.stream_id)
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].reason, OrphanReason::Abandoned);
    store
        .append(&m.stream_id, &error_end(), None)
        .await
        .unwrap();
    let orphans = store.orphaned_jobs(&HashSet::new()).await.unwrap();
    assert!(!orphans.iter().any(|o| o.meta.stream_id == m.stream_id));
}

/// The end claim, as one store (one replica) sees it: a running job's end can be
/// claimed, by the owner and by a reaper, and claimed again by the same replica (a
/// retry); the claimant still appends; once the terminal event is in, nobody claims
/// it. An unknown job has nothing to reap, while its owner may end it (the store lost
/// it, so nobody else can).
pub async fn end_claims(store: Arc<dyn JobStore>) {
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    store.append(&m.stream_id, &step(), Some(0)).await.unwrap();
    assert!(store.claim_orphan(&m.stream_id).await.unwrap());
    assert!(store.claim_orphan(&m.stream_id).await.unwrap(), "a retry");
    assert!(store.claim_end(&m.stream_id).await.unwrap());
    assert_eq!(
        store.append(&m.stream_id, &usage(), Some(1)).await.unwrap(),
        1,
        "the claimant appends"
    );
    assert_eq!(
        store
            .append(&m.stream_id, &error_end(), Some(2))
            .await
            .unwrap(),
        2
    );
    assert!(!store.claim_orphan(&m.stream_id).await.unwrap(), "ended");
    assert!(!store.claim_end(&m.stream_id).await.unwrap(), "ended");
    assert!(!store.claim_orphan("no-such-job").await.unwrap());
    assert!(store.claim_end("no-such-job").await.unwrap());
}

/// An abort request reaches the abort handler with the stream id (on this replica
/// here: the owner and the asker are the same store); a finished job is not asked.
pub async fn abort_requests_reach_the_handler(store: Arc<dyn JobStore>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    store.set_abort_handler(Arc::new(move |sid: &str| {
        let _ = tx.send(sid.to_string());
    }));
    let m = meta(&unique_user().await, &crate::new_id());
    store.create_job(&m).await.unwrap();
    store.append(&m.stream_id, &step(), Some(0)).await.unwrap();
    store.request_abort(&m.stream_id).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the abort request reaches the handler")
        .unwrap();
    assert_eq!(got, m.stream_id);
    store
        .append(&m.stream_id, &error_end(), Some(1))
        .await
        .unwrap();
    // Drain repeats of the first request (a store may publish it more than once).
    tokio::time::sleep(Duration::from_millis(700)).await;
    while rx.try_recv().is_ok() {}
    let done = meta(&unique_user().await, &crate::new_id());
    store.create_job(&done).await.unwrap();
    store
        .append(&done.stream_id, &error_end(), Some(0))
        .await
        .unwrap();
    store.request_abort(&done.stream_id).await.unwrap();
    store.request_abort("no-such-job").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.try_recv().is_err(),
        "a finished or unknown job is not asked"
    );
}

/// With `max_running_per_user = 2`: 30 racing creates for one user (different
/// conversations) let exactly 2 through; a slot comes back when a job ends.
pub async fn user_cap_holds_under_racing_creates(store: Arc<dyn JobStore>) {
    let user = unique_user().await;
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let store = store.clone();
            let m = meta(&user, &crate::new_id());
            tokio::spawn(async move { store.create_job(&m).await.map(|_| m) })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(m) => won.push(m),
            Err(StoreError::TooManyConcurrent(2)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(won.len(), 2);
    // Another user is not affected.
    store
        .create_job(&meta(&unique_user().await, &crate::new_id()))
        .await
        .unwrap();
    store
        .append(&won[0].stream_id, &error_end(), None)
        .await
        .unwrap();
    store
        .create_job(&meta(&user, &crate::new_id()))
        .await
        .unwrap();
    assert!(matches!(
        store.create_job(&meta(&user, &crate::new_id())).await,
        Err(StoreError::TooManyConcurrent(2))
    ));
}

/// A sliding window, on the store's clock (Redis's in Redis mode): at most `limit`
/// hits in any `period`; a refused hit is told when the oldest hit leaves the window
/// and is not counted; keys are apart. Takes about 3.5 s of real time: the window is
/// long enough that a sleep overshooting by up to a second on a loaded machine still
/// lands where the case expects.
pub async fn rate_limit_is_a_sliding_window_per_key(store: Arc<dyn JobStore>) {
    use tokio::time::{Instant, sleep};
    let key = format!("k-{}", crate::new_id());
    let period = Duration::from_millis(3000);
    let margin = Duration::from_millis(30);
    let hit = || store.rate_limit(&key, 3, period);
    let t0 = Instant::now();
    assert_eq!(hit().await.unwrap(), None, "first hit");
    let t0_done = Instant::now();
    // The other two a third of the window later, so that they outlive the first.
    sleep(period / 3).await;
    assert_eq!(hit().await.unwrap(), None, "second hit");
    assert_eq!(hit().await.unwrap(), None, "third hit");
    // Half a window on, GCRA would have let one more through; the window does not.
    sleep(period / 6).await;
    let asked = Instant::now();
    let wait = hit().await.unwrap().expect("the fourth hit is refused");
    let answered = Instant::now();
    // The first hit, made in [t0, t0_done], leaves the window one period later.
    assert!(
        wait + margin >= (t0 + period).saturating_duration_since(answered)
            && wait <= (t0_done + period).saturating_duration_since(asked) + margin,
        "told to wait {wait:?}"
    );
    assert_eq!(
        store
            .rate_limit(&format!("{key}-other"), 3, period)
            .await
            .unwrap(),
        None,
        "another key"
    );
    // Once the first hit has left, exactly one more passes: the refused hit never
    // counted, and the other two are still in the window until a third of a period
    // later.
    sleep(wait + margin).await;
    assert_eq!(hit().await.unwrap(), None, "a place came free");
    let wait = hit().await.unwrap().expect("and only one");
    assert!(wait <= period / 3, "{wait:?}");
    assert_eq!(
        store.rate_limit(&key, 0, period).await.unwrap(),
        None,
        "0 is off"
    );
}

/// Idempotency keys: of 50 racing claims of a free key exactly one holds it; only
/// its token fills or releases it; a filled key answers its value and request hash; a
/// released key can be claimed again; an unfilled claim lapses after its claim TTL;
/// keys are apart.
pub async fn idempotency_keys_are_claimed_once(store: Arc<dyn JobStore>) {
    use crate::store::IdempotencyClaim as C;
    let key = format!("idem-{}", crate::new_id());
    let long = Duration::from_secs(60);
    let claims = futures::future::join_all((0..50).map(|i| {
        let (store, key) = (store.clone(), key.clone());
        async move {
            let token = format!("t{i}");
            let claim = store
                .claim_idempotency(&key, "hash-a", &token, long)
                .await
                .unwrap();
            (token, claim)
        }
    }))
    .await;
    let winners: Vec<_> = claims.iter().filter(|(_, c)| *c == C::Claimed).collect();
    assert_eq!(winners.len(), 1, "{claims:?}");
    let holder = winners[0].0.clone();
    for (_, c) in claims.iter().filter(|(t, _)| *t != holder) {
        assert_eq!(
            *c,
            C::Pending {
                request_hash: "hash-a".into()
            }
        );
    }
    // Another hash sees the first one's, so the caller can tell a conflict.
    assert_eq!(
        store
            .claim_idempotency(&key, "hash-b", "x", long)
            .await
            .unwrap(),
        C::Pending {
            request_hash: "hash-a".into()
        }
    );
    // Only the holder fills or releases.
    assert!(!store.fill_idempotency(&key, "x", "v", long).await.unwrap());
    store.release_idempotency(&key, "x").await.unwrap();
    assert!(
        store
            .fill_idempotency(&key, &holder, "ids", long)
            .await
            .unwrap()
    );
    assert!(
        !store
            .fill_idempotency(&key, &holder, "again", long)
            .await
            .unwrap(),
        "filled once"
    );
    store.release_idempotency(&key, &holder).await.unwrap();
    let filled = C::Filled {
        request_hash: "hash-a".into(),
        value: "ids".into(),
    };
    assert_eq!(
        store
            .claim_idempotency(&key, "hash-a", "y", long)
            .await
            .unwrap(),
        filled,
        "a filled key is never released"
    );
    // A released key is free again; keys are apart.
    let other = format!("{key}-other");
    assert_eq!(
        store
            .claim_idempotency(&other, "h", "a", long)
            .await
            .unwrap(),
        C::Claimed
    );
    store.release_idempotency(&other, "a").await.unwrap();
    assert_eq!(
        store
            .claim_idempotency(&other, "h2", "b", long)
            .await
            .unwrap(),
        C::Claimed
    );
    // An unfilled claim lapses (a replica died mid-start); polled, not slept for.
    let lapsing = format!("{key}-lapsing");
    let short = Duration::from_millis(200);
    assert_eq!(
        store
            .claim_idempotency(&lapsing, "h", "a", short)
            .await
            .unwrap(),
        C::Claimed
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store
            .claim_idempotency(&lapsing, "h", "b", short)
            .await
            .unwrap()
        {
            C::Claimed => break,
            C::Pending { .. } => {}
            c => panic!("{c:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !store
            .fill_idempotency(&lapsing, "a", "v", long)
            .await
            .unwrap(),
        "the lapsed holder cannot fill the new claim"
    );
}

/// Runs every case, each on a store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn JobStore>>,
{
    create_get_and_lists(make().await).await;
    one_running_job_per_conversation(make().await).await;
    concurrent_creates_one_wins(make().await).await;
    append_assigns_seqs_and_one_terminal(make().await).await;
    append_batch_lands_in_order_exactly_once(make().await).await;
    read_range_pages_the_log(make().await).await;
    caps_refuse_all_but_the_terminal_event(make().await).await;
    readers_follow_live_appends(make().await).await;
    orphans_are_running_jobs_nobody_runs(make().await).await;
    end_claims(make().await).await;
    abort_requests_reach_the_handler(make().await).await;
    idempotency_keys_are_claimed_once(make().await).await;
}
