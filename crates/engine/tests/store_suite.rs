//! The shared job-store suite against the memory store.

use std::sync::Arc;

use genstream_engine::store::{JobStore, MemoryStore};
use genstream_engine::suite::{SUITE_LIMITS, run_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_suite() {
    run_all(|| async { Arc::new(MemoryStore::new(SUITE_LIMITS)) as Arc<dyn JobStore> }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_limits() {
    use genstream_engine::suite::{
        rate_limit_is_a_sliding_window_per_key, user_cap_holds_under_racing_creates,
    };
    let capped = || {
        Arc::new(MemoryStore::new(SUITE_LIMITS).with_max_running_per_user(Some(2)))
            as Arc<dyn JobStore>
    };
    user_cap_holds_under_racing_creates(capped()).await;
    rate_limit_is_a_sliding_window_per_key(capped()).await;
}

/// The job's status changes in the same step as its terminal event lands: a subscriber
/// woken by the terminal event never sees `running`, and a follow-up in the same
/// conversation is never refused as busy (a race the memory store had when it kept the
/// status apart from the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_subscriber_never_sees_a_finished_job_running() {
    use genstream_engine::event::{ErrorEvent, EventBody};
    use genstream_engine::store::{EventLogStore, JobStatus};
    use genstream_engine::suite::meta;
    let store = Arc::new(MemoryStore::new(SUITE_LIMITS));
    for _ in 0..200 {
        let m = meta("u", &genstream_engine::new_id());
        store.create_job(&m).await.unwrap();
        let log = store.open_log(&m.stream_id).await.unwrap().unwrap();
        let mut rx = log.watch();
        rx.borrow_and_update();
        let (s, id, conv) = (
            store.clone(),
            m.stream_id.clone(),
            m.conversation_id.clone(),
        );
        let watcher = tokio::spawn(async move {
            rx.changed().await.unwrap();
            let status = s.get_job(&id).await.unwrap().unwrap().status;
            let next = meta("u", &conv);
            (status, s.create_job(&next).await)
        });
        let end = EventBody::Error(ErrorEvent {
            code: "upstream_error".into(),
            message: "x".into(),
            response_message: None,
        });
        store.append(&m.stream_id, &end, Some(0)).await.unwrap();
        let (status, next) = watcher.await.unwrap();
        assert_eq!(status, JobStatus::Error);
        assert!(next.is_ok(), "follow-up refused: {next:?}");
    }
}

/// Random batch boundaries and random failures of the call in flight (before it reaches
/// the store, or with its reply lost) never reorder, drop or duplicate an event.
#[test]
fn batched_appends_never_reorder_drop_or_duplicate() {
    use genstream_engine::suite::{BatchPlan, Fate, batched_appends_survive_lost_calls};
    use proptest::prelude::*;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(MemoryStore::new(SUITE_LIMITS)) as Arc<dyn JobStore>;
    let fate = prop_oneof![
        Just(Fate::Lands),
        Just(Fate::FailsBefore),
        Just(Fate::ReplyLost)
    ];
    let plans = (
        proptest::collection::vec("\\PC{0,6}", 1..40),
        any::<bool>(),
        proptest::collection::vec(1usize..12, 1..8),
        proptest::collection::vec(fate, 0..30),
    )
        .prop_map(|(texts, terminal, sizes, fates)| BatchPlan {
            texts,
            terminal,
            sizes,
            fates,
        });
    proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(128))
        .run(&plans, |plan| {
            rt.block_on(batched_appends_survive_lost_calls(store.clone(), &plan));
            Ok(())
        })
        .unwrap();
}
