//! The shared job-store suite against the real Redis (127.0.0.1:6379, or
//! `GENSTREAM_TEST_REDIS_URL`), each case under a key prefix of its own.

use std::sync::Arc;

use genstream_engine::store::JobStore;
use genstream_engine::suite::{SUITE_LIMITS, run_all};
use genstream_redis::{RedisConfig, RedisStore};
use genstream_test_support::{redis_url, unique_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_suite() {
    run_all(|| async {
        let mut cfg = RedisConfig::new(&redis_url());
        cfg.key_prefix = unique_prefix();
        cfg.limits = SUITE_LIMITS;
        cfg.retention = std::time::Duration::from_secs(60);
        cfg.running_ttl = std::time::Duration::from_secs(120);
        Arc::new(RedisStore::connect(cfg).await.expect("redis")) as Arc<dyn JobStore>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_limits() {
    use genstream_engine::suite::{
        rate_limit_is_a_sliding_window_per_key, user_cap_holds_under_racing_creates,
    };
    let capped = || async {
        let mut cfg = RedisConfig::new(&redis_url());
        cfg.key_prefix = unique_prefix();
        cfg.running_ttl = std::time::Duration::from_secs(120);
        cfg.max_running_per_user = Some(2);
        Arc::new(RedisStore::connect(cfg).await.expect("redis")) as Arc<dyn JobStore>
    };
    user_cap_holds_under_racing_creates(capped().await).await;
    rate_limit_is_a_sliding_window_per_key(capped().await).await;
}

/// Random batch boundaries and random failures of the call in flight (before it reaches
/// Redis, or with its reply lost) never reorder, drop or duplicate an event.
#[test]
fn batched_appends_never_reorder_drop_or_duplicate() {
    use genstream_engine::suite::{BatchPlan, Fate, batched_appends_survive_lost_calls};
    use proptest::prelude::*;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(async {
        let mut cfg = RedisConfig::new(&redis_url());
        cfg.key_prefix = unique_prefix();
        cfg.limits = SUITE_LIMITS;
        cfg.retention = std::time::Duration::from_secs(60);
        cfg.running_ttl = std::time::Duration::from_secs(120);
        Arc::new(RedisStore::connect(cfg).await.expect("redis")) as Arc<dyn JobStore>
    });
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
    proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64))
        .run(&plans, |plan| {
            rt.block_on(batched_appends_survive_lost_calls(store.clone(), &plan));
            Ok(())
        })
        .unwrap();
}
