//! A half-open pub/sub connection (no error, no bytes: a dead NAT entry, a frozen
//! peer) is found by the store's PING health check and replaced, so abort requests and
//! published frames reach the replica again; a silent command connection is replaced
//! after two lease renewals time out. The replica talks to Redis through a TCP
//! proxy of the test's own that black-holes the connections open at one moment.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use genstream_engine::store::{EventLogStore, JobCoordination};
use genstream_redis::RedisStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_pubsub_connection_is_replaced() {
    let url = redis_url();
    let target = {
        let hostport = url
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .unwrap();
        tokio::net::lookup_host(hostport)
            .await
            .unwrap()
            .next()
            .unwrap()
    };
    let proxy = Proxy::start(target).await;
    let p = prefix();
    let mut cfg = config(&proxy.url(), &p);
    cfg.heal_interval = Duration::from_millis(200);
    cfg.timeout = Duration::from_millis(500);
    cfg.lease_ttl = Duration::from_millis(1500);
    let owner = RedisStore::connect(cfg).await.unwrap();
    let asker = store(&url, &p, Duration::from_secs(8)).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    owner.set_abort_handler(Arc::new(move |sid: &str| {
        let _ = tx.send(sid.to_string());
    }));
    let m = meta();
    asker.create_job(&m).await.unwrap();
    asker
        .append(&m.stream_id, &created(&m, "q"), Some(0))
        .await
        .unwrap();

    proxy.blackhole();
    let cut = Instant::now();
    // Readiness notices (the command connection is silent too).
    let deadline = Instant::now() + Duration::from_secs(5);
    while owner.ping().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "ping stayed ok on a silent connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An abort asked now reaches the owner once its pub/sub connection was replaced
    // (the asker publishes again while the job runs).
    asker.request_abort(&m.stream_id).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the abort request reaches the owner over a new pub/sub connection")
        .unwrap();
    assert_eq!(got, m.stream_id);
    eprintln!(
        "abort delivered {:?} after the connections went silent",
        cut.elapsed()
    );
    // And the command connection is replaced too: ready again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = owner.ping().await {
        assert!(Instant::now() < deadline, "not ready again: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "ready again {:?} after the connections went silent",
        cut.elapsed()
    );
    owner.close();
    asker.close();
}
