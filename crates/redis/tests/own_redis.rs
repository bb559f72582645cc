//! The store against a redis-server of the test's own that keeps nothing on disk (as
//! this machine's Redis): its functions flushed, or the server restarted and every key
//! and function gone, while a job streams.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use genstream_engine::store::{EventLogStore, JobCoordination, RateLimitStore, StoreError};
use genstream_redis::RedisStore;

async fn function_loaded(url: &str) -> bool {
    let libs: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("genstream_v6")
        .query_async(&mut conn(url).await)
        .await
        .unwrap();
    matches!(libs, redis::Value::Array(l) if !l.is_empty())
}

/// After `FUNCTION FLUSH` the next call loads the library again (one retry), and the
/// readiness check reloads it too: it does not say "ready" while every append fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_functions_are_loaded_again() {
    let redis = OwnRedis::start();
    let url = redis.url();
    let s = RedisStore::connect(config(&url, &prefix())).await.unwrap();
    let m = meta();
    s.create_job(&m).await.unwrap();
    s.append(&m.stream_id, &created(&m, "q"), Some(0))
        .await
        .unwrap();
    let flush = || async {
        let _: () = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query_async(&mut conn(&url).await)
            .await
            .unwrap();
    };
    flush().await;
    assert_eq!(
        s.append(&m.stream_id, &text_step(&m, "s0", 0, 0), Some(1))
            .await
            .unwrap(),
        1,
        "the append reloads the functions and retries"
    );
    flush().await;
    s.ping().await.unwrap();
    assert!(function_loaded(&url).await, "ping loaded them again");
    flush().await;
    // Every other function call recovers the same way.
    assert!(s.claim_end(&m.stream_id).await.unwrap());
    flush().await;
    assert_eq!(
        s.rate_limit("k", 5, Duration::from_secs(60)).await.unwrap(),
        None
    );
    flush().await;
    s.request_abort(&m.stream_id).await.unwrap();
    flush().await;
    let other = meta();
    s.create_job(&other).await.unwrap();
    s.close();
}

/// Redis restarted without persistence while a job streams to a subscriber on another
/// replica: the subscriber's stream ends with `error` `store_unavailable` at the next
/// seq (no log is left), the owner's next append finds the job gone, readiness comes
/// back once the functions are loaded again, and new jobs work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_persistence_ends_the_lost_jobs_and_recovers() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    let p = prefix();
    let mk = || {
        let mut cfg = config(&url, &p);
        cfg.heal_interval = Duration::from_millis(200);
        cfg.timeout = Duration::from_millis(500);
        cfg
    };
    let owner = RedisStore::connect(mk()).await.unwrap();
    let reader = RedisStore::connect(mk()).await.unwrap();
    let m = meta();
    owner.create_job(&m).await.unwrap();
    let sid = m.stream_id.as_str();
    let events = [
        created(&m, "q"),
        text_step(&m, "s0", 0, 0),
        delta("s0", "a"),
    ];
    for (seq, e) in events.iter().enumerate() {
        owner.append(sid, e, Some(seq as u64)).await.unwrap();
    }
    let log = reader.open_log(sid).await.unwrap().unwrap();
    assert_eq!(log.len(), 3);

    redis.restart();
    let up = Instant::now();

    // The subscriber's stream ends, with the next seq, within a few heal intervals.
    let mut rx = log.watch();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            rx.borrow_and_update();
            if log.terminal().is_some() {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the lost job's mirror ends");
    let frames = log.read_after(None, usize::MAX).frames;
    assert_eq!(frames.len(), 4);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.seq, i as u64, "no gap, no duplicate");
    }
    let end = log.terminal_event().unwrap();
    match end.body {
        genstream_engine::event::EventBody::Error(e) => assert_eq!(e.code, "store_unavailable"),
        other => panic!("{other:?}"),
    }
    eprintln!("mirror ended {:?} after the restart", up.elapsed());

    // The owner finds its job gone (after the command connection reconnects).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match owner.append(sid, &delta("s0", "b"), Some(3)).await {
            Err(StoreError::UnknownJob(_)) => break,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                eprintln!("while reconnecting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        owner.claim_end(sid).await.unwrap(),
        "nobody else can end a lost job"
    );
    assert!(owner.get_job(sid).await.unwrap().is_none());

    // Ready again on both, and new jobs work, with a subscriber on the other replica.
    for s in [&owner, &reader] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = s.ping().await {
            assert!(Instant::now() < deadline, "not ready: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(function_loaded(&url).await);
    let n = meta();
    owner.create_job(&n).await.unwrap();
    owner
        .append(&n.stream_id, &created(&n, "q"), Some(0))
        .await
        .unwrap();
    let log = reader.open_log(&n.stream_id).await.unwrap().unwrap();
    owner
        .append(&n.stream_id, &error_end("x"), Some(1))
        .await
        .unwrap();
    let mut rx = log.watch();
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            rx.borrow_and_update();
            if log.terminal().is_some() {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the new job streams to the other replica");
    owner.close();
    reader.close();
}
