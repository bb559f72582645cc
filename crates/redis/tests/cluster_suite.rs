//! The shared job-store suite on a Redis Cluster of the test's own: three primaries on
//! free ports (`OwnRedisCluster`), the store connected with a `redis+cluster://` URL.
//! Every call's keys must lie in one slot, frames go out on sharded channels, and the
//! function library is on every primary; the suite's cases (the same ones the single
//! Redis and the memory store pass) find out if any of that is wrong.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::sync::Arc;
use std::time::Duration;

use genstream_engine::store::JobStore;
use genstream_engine::suite::{SUITE_LIMITS, run_all};
use genstream_redis::{RedisConfig, RedisStore};
use genstream_test_support::{OwnRedisCluster, unique_prefix};

fn config(url: &str) -> RedisConfig {
    let mut cfg = RedisConfig::new(url);
    cfg.key_prefix = unique_prefix();
    cfg.limits = SUITE_LIMITS;
    cfg.retention = Duration::from_secs(60);
    cfg.running_ttl = Duration::from_secs(120);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_store_passes_the_suite() {
    let cluster = OwnRedisCluster::start();
    let url = cluster.url();
    run_all(|| {
        let cfg = config(&url);
        async move {
            Arc::new(RedisStore::connect(cfg).await.expect("redis cluster")) as Arc<dyn JobStore>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_store_limits() {
    use genstream_engine::suite::{
        rate_limit_is_a_sliding_window_per_key, user_cap_holds_under_racing_creates,
    };
    let cluster = OwnRedisCluster::start();
    let capped = || async {
        let mut cfg = config(&cluster.url());
        cfg.max_running_per_user = Some(2);
        Arc::new(RedisStore::connect(cfg).await.expect("redis cluster")) as Arc<dyn JobStore>
    };
    user_cap_holds_under_racing_creates(capped().await).await;
    rate_limit_is_a_sliding_window_per_key(capped().await).await;
}

fn job() -> genstream_engine::store::JobMeta {
    let id = || uuid::Uuid::now_v7().to_string();
    genstream_engine::store::JobMeta {
        stream_id: id(),
        user_id: id(),
        conversation_id: id(),
        user_message_id: id(),
        response_message_id: id(),
        model: "demo".into(),
        status: genstream_engine::store::JobStatus::Running,
        created_at: "2026-01-01T00:00:00.000Z".into(),
        webhook_url: None,
    }
}

fn delta(text: &str) -> genstream_engine::event::EventBody {
    use genstream_engine::event::{ContentPart, Delta, DeltaContent, EventBody};
    EventBody::MessageDelta(Delta {
        id: "step_0".into(),
        delta: DeltaContent {
            content: vec![ContentPart::Text { text: text.into() }],
        },
    })
}

/// Creates `jobs` on `writer` with one event each and opens `reader`'s mirror of each.
async fn start_mirrored(
    writer: &RedisStore,
    reader: &RedisStore,
    jobs: &[genstream_engine::store::JobMeta],
) -> Vec<Arc<genstream_engine::log::EventLog>> {
    use genstream_engine::store::EventLogStore;
    let mut logs = Vec::new();
    for m in jobs {
        writer.create_job(m).await.unwrap();
        writer
            .append(&m.stream_id, &delta("a"), Some(0))
            .await
            .unwrap();
        logs.push(reader.open_log(&m.stream_id).await.unwrap().unwrap());
    }
    logs
}

/// Appends seqs 1..5 to every job on `writer`, then waits (5 s at most) until each
/// mirror in `logs` holds all 5 events.
async fn append_rest_and_wait(
    writer: &RedisStore,
    jobs: &[genstream_engine::store::JobMeta],
    logs: &[Arc<genstream_engine::log::EventLog>],
) {
    use genstream_engine::store::EventLogStore;
    for m in jobs {
        for seq in 1..5 {
            writer
                .append(&m.stream_id, &delta(&format!("e{seq}")), Some(seq))
                .await
                .unwrap();
        }
    }
    for (m, log) in jobs.iter().zip(logs) {
        let reached = tokio::time::timeout(Duration::from_secs(5), async {
            let mut rx = log.watch();
            while log.len() < 5 {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(
            reached.is_ok() && log.len() == 5,
            "job {} mirror has {}",
            m.stream_id,
            log.len()
        );
    }
}

/// With the healer off, only pub/sub can bring another replica's appends to a mirror:
/// frames of jobs spread over all three primaries' slots reach it on their sharded
/// channels, and an abort request (a plain `PUBLISH` from whichever primary holds the
/// job) reaches the owner whichever node its connection listens on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_and_abort_requests_cross_replicas_by_pubsub() {
    use genstream_engine::store::JobCoordination;
    let cluster = OwnRedisCluster::start();
    let mut cfg = config(&cluster.url());
    cfg.heal_interval = Duration::from_secs(3600);
    let writer = RedisStore::connect(cfg.clone()).await.unwrap();
    let reader = RedisStore::connect(cfg).await.unwrap();
    let (tx, mut aborts) = tokio::sync::mpsc::unbounded_channel::<String>();
    writer.set_abort_handler(Arc::new(move |sid: &str| {
        let _ = tx.send(sid.to_string());
    }));
    // 12 jobs: the chance that all fall in the slots of fewer than three primaries
    // is 3 × (2/3)^12 ≈ 2.3%, and the test holds either way.
    let jobs: Vec<_> = (0..12).map(|_| job()).collect();
    let logs = start_mirrored(&writer, &reader, &jobs).await;
    append_rest_and_wait(&writer, &jobs, &logs).await;
    for m in &jobs {
        reader.request_abort(&m.stream_id).await.unwrap();
        // Requests of earlier jobs are published again while those run: skip them.
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(sid) = aborts.recv().await {
                if sid == m.stream_id {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            got.ok(),
            Some(true),
            "abort of {} reached the owner",
            m.stream_id
        );
    }
    writer.close();
    reader.close();
}

/// After a failover moves a primary's slots to its replica, frames published there
/// still reach another replica's mirrors by pub/sub (the healer is off): the sharded
/// subscriptions follow the slots to their new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_subscriptions_follow_a_failover() {
    let cluster = OwnRedisCluster::start_with_replica();
    let mut cfg = config(&cluster.url());
    cfg.heal_interval = Duration::from_secs(3600);
    let writer = RedisStore::connect(cfg.clone()).await.unwrap();
    let reader = RedisStore::connect(cfg.clone()).await.unwrap();
    let mut jobs = Vec::new();
    while jobs.len() < 3 {
        let m = job();
        if cluster.on_first_primary(&format!("{}:job:{{{}}}", cfg.key_prefix, m.stream_id)) {
            jobs.push(m);
        }
    }
    let logs = start_mirrored(&writer, &reader, &jobs).await;
    tokio::task::block_in_place(|| cluster.fail_over());
    append_rest_and_wait(&writer, &jobs, &logs).await;
    writer.close();
    reader.close();
}
