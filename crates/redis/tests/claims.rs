//! The end claim across replicas (one writer per response message), reapers that fail
//! or die half-way, appends retried after the claim moved, and job creation that fails
//! half-way. Two or three `RedisStore`s on one prefix are two or three replicas.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use genstream_engine::log::AppendError;
use genstream_engine::store::{EventLogStore, JobCoordination, OrphanReason, StoreError};

const LEASE: Duration = Duration::from_millis(500);

/// An owner judged lost retries an append at seq N after the reaper put its terminal
/// event there: that is not a duplicate of the owner's append (it would be told
/// "success"), and the owner's end claim fails, so it saves no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_shut_out_by_a_reaper_is_not_told_its_append_landed() {
    let p = prefix();
    let url = redis_url();
    let owner = store(&url, &p, LEASE).await;
    let reaper = store(&url, &p, LEASE).await;
    let m = meta();
    owner.create_job(&m).await.unwrap();
    let sid = m.stream_id.as_str();
    for (seq, e) in [
        created(&m, "q"),
        text_step(&m, "s0", 0, 0),
        delta("s0", "a"),
    ]
    .iter()
    .enumerate()
    {
        owner.append(sid, e, Some(seq as u64)).await.unwrap();
    }
    assert!(reaper.claim_orphan(sid).await.unwrap());
    assert!(
        matches!(
            owner.append(sid, &delta("s0", "b"), Some(3)).await,
            Err(StoreError::Append(AppendError::Ended))
        ),
        "only the claimant appends"
    );
    assert!(
        !owner.claim_end(sid).await.unwrap(),
        "the reaper holds the end"
    );
    let end = error_end("replica_lost");
    assert_eq!(reaper.append(sid, &end, Some(3)).await.unwrap(), 3);
    // The owner's retry of "its" terminal event at seq 3.
    let owners_end = error_end("upstream_error");
    assert!(
        matches!(
            owner.append(sid, &owners_end, Some(3)).await,
            Err(StoreError::Append(AppendError::Ended))
        ),
        "seq 3 is the reaper's event, not a landed try of the owner's"
    );
    // Even the very same bytes from another writer are not a duplicate.
    assert!(matches!(
        owner.append(sid, &end, Some(3)).await,
        Err(StoreError::Append(AppendError::Ended))
    ));
    // The claimant's own retry is.
    assert_eq!(reaper.append(sid, &end, Some(3)).await.unwrap(), 3);
    assert!(!reaper.claim_orphan(sid).await.unwrap(), "ended");
}

/// The owner claims its end first: reapers cannot take the job from under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_ending_its_job_keeps_the_reapers_out() {
    let p = prefix();
    let url = redis_url();
    let owner = store(&url, &p, LEASE).await;
    let reaper = store(&url, &p, LEASE).await;
    let m = meta();
    owner.create_job(&m).await.unwrap();
    let sid = m.stream_id.as_str();
    owner.append(sid, &created(&m, "q"), Some(0)).await.unwrap();
    assert!(owner.claim_end(sid).await.unwrap());
    assert!(
        owner.claim_end(sid).await.unwrap(),
        "a retry holds it again"
    );
    assert!(
        !reaper.claim_orphan(sid).await.unwrap(),
        "the owner is alive"
    );
    assert!(matches!(
        reaper.append(sid, &error_end("replica_lost"), None).await,
        Err(StoreError::Append(AppendError::Ended))
    ));
    let end = error_end("upstream_error");
    assert_eq!(owner.append(sid, &end, Some(1)).await.unwrap(), 1);
    // Its reply was lost; the retry is the same append.
    assert_eq!(owner.append(sid, &end, Some(1)).await.unwrap(), 1);
    assert!(!owner.claim_end(sid).await.unwrap(), "ended");
}

/// An owner that died while ending its job (after its claim, before its terminal
/// event) is an orphan like any other once its lease lapsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_died_holding_its_claim_is_reaped() {
    let p = prefix();
    let url = redis_url();
    let reaper = store(&url, &p, LEASE).await;
    let owner = store(&url, &p, LEASE).await;
    let m = meta();
    owner.create_job(&m).await.unwrap();
    let sid = m.stream_id.as_str();
    owner.append(sid, &created(&m, "q"), Some(0)).await.unwrap();
    assert!(owner.claim_end(sid).await.unwrap());
    owner.close();
    // Once its lease lapsed (and the reaper has been healthy for a lease TTL).
    wait_until(LEASE * 10, "the job listed as lost", || async {
        let orphans = reaper.orphaned_jobs(&HashSet::new()).await.unwrap();
        orphans
            .iter()
            .any(|o| o.meta.stream_id == sid && o.reason == OrphanReason::ReplicaLost)
    })
    .await;
    assert!(reaper.claim_orphan(sid).await.unwrap());
    assert_eq!(
        reaper
            .append(sid, &error_end("replica_lost"), Some(1))
            .await
            .unwrap(),
        1
    );
}

/// A reaper whose attempt failed half-way (after its claim) finds the job again on its
/// next sweep and may retry; others leave it alone while it is alive and fresh; once
/// its claim is older than a lease TTL (alive but stuck) or its lease lapsed (dead),
/// another reaper takes the job over and the first one is shut out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reapers_claim_is_retried_by_it_and_taken_over_when_stale_or_dead() {
    let p = prefix();
    let url = redis_url();
    let b = store(&url, &p, LEASE).await;
    let c = store(&url, &p, LEASE).await;
    let dead = store(&url, &p, Duration::from_millis(300)).await;
    let (m1, m2) = (meta(), meta());
    for m in [&m1, &m2] {
        dead.create_job(m).await.unwrap();
        dead.append(&m.stream_id, &created(m, "q"), Some(0))
            .await
            .unwrap();
    }
    dead.close();
    let listed = |orphans: Vec<genstream_engine::store::Orphan>, sid: &str| {
        orphans.iter().any(|o| o.meta.stream_id == sid)
    };
    // dead's lease lapsed, and both b and c judge leases (c's "keeps out" below means
    // something only then).
    wait_until(LEASE * 10, "b and c to list dead's job", || async {
        listed(
            b.orphaned_jobs(&HashSet::new()).await.unwrap(),
            &m1.stream_id,
        ) && listed(
            c.orphaned_jobs(&HashSet::new()).await.unwrap(),
            &m1.stream_id,
        )
    })
    .await;
    assert!(b.claim_orphan(&m1.stream_id).await.unwrap());
    assert!(b.claim_orphan(&m2.stream_id).await.unwrap());
    // b's attempts "fail" here: nothing appended. Its next sweep finds them again.
    let again = b.orphaned_jobs(&HashSet::new()).await.unwrap();
    assert!(
        listed(again.clone(), &m1.stream_id),
        "b retries its own claim"
    );
    assert!(b.claim_orphan(&m1.stream_id).await.unwrap());
    // c keeps out while b is alive and its claims are fresh.
    assert!(!listed(
        c.orphaned_jobs(&HashSet::new()).await.unwrap(),
        &m1.stream_id
    ));
    assert!(!c.claim_orphan(&m1.stream_id).await.unwrap());
    // m1: b is alive but its claim ages past a lease TTL (b last claimed it above).
    wait_until(
        LEASE * 10,
        "c to list m1 once b's claim is stale",
        || async {
            listed(
                c.orphaned_jobs(&HashSet::new()).await.unwrap(),
                &m1.stream_id,
            )
        },
    )
    .await;
    assert!(
        c.claim_orphan(&m1.stream_id).await.unwrap(),
        "a stale claim is taken over"
    );
    assert!(
        matches!(
            b.append(&m1.stream_id, &error_end("replica_lost"), Some(1))
                .await,
            Err(StoreError::Append(AppendError::Ended))
        ),
        "the first reaper is shut out"
    );
    assert_eq!(
        c.append(&m1.stream_id, &error_end("replica_lost"), Some(1))
            .await
            .unwrap(),
        1
    );
    // m2: b dies holding its claim.
    b.close();
    wait_until(LEASE * 10, "c to list m2", || async {
        listed(
            c.orphaned_jobs(&HashSet::new()).await.unwrap(),
            &m2.stream_id,
        )
    })
    .await;
    assert!(
        c.claim_orphan(&m2.stream_id).await.unwrap(),
        "a dead reaper's claim is taken over"
    );
}

/// Job creation that fails half-way leaves nothing behind: no job hash, no running
/// slot, no conversation lock, and the conversation takes a new job at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_creation_that_fails_half_way_undoes_every_step() {
    let p = prefix();
    let url = redis_url();
    let s = store(&url, &p, LEASE).await;
    let base = conn(&url).await;
    let mut raw = base.clone();
    let user_set =
        |m: &genstream_engine::store::JobMeta| format!("{p}:user:{{{}}}:running", m.user_id);
    let check_clean = |m: genstream_engine::store::JobMeta| {
        let mut raw = base.clone();
        let p = p.clone();
        let user_key = user_set(&m);
        async move {
            let job: bool = redis::cmd("EXISTS")
                .arg(format!("{p}:job:{{{}}}", m.stream_id))
                .query_async(&mut raw)
                .await
                .unwrap();
            assert!(!job, "the job hash is gone");
            let in_user: bool = redis::cmd("SISMEMBER")
                .arg(&user_key)
                .arg(&m.stream_id)
                .query_async(&mut raw)
                .await
                .unwrap();
            assert!(!in_user, "the user's running slot is free");
            let conv: Option<String> = redis::cmd("GET")
                .arg(format!("{p}:conv:{{{}}}", m.conversation_id))
                .query_async(&mut raw)
                .await
                .unwrap_or(None);
            assert_ne!(
                conv.as_deref(),
                Some(m.stream_id.as_str()),
                "the conversation is free"
            );
        }
    };

    // The last step (the global running set, in the old order) fails.
    let running = format!("{p}:running");
    let _: () = redis::cmd("SET")
        .arg(&running)
        .arg("not a set")
        .query_async(&mut raw)
        .await
        .unwrap();
    let m = meta();
    assert!(matches!(
        s.create_job(&m).await,
        Err(StoreError::Unavailable { .. })
    ));
    check_clean(m.clone()).await;
    let _: () = redis::cmd("DEL")
        .arg(&running)
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut next = meta();
    next.conversation_id.clone_from(&m.conversation_id);
    next.user_id.clone_from(&m.user_id);
    s.create_job(&next)
        .await
        .expect("the conversation is not busy");

    // The conversation step fails (its key holds another type).
    let m = meta();
    let conv = format!("{p}:conv:{{{}}}", m.conversation_id);
    let _: () = redis::cmd("HSET")
        .arg(&conv)
        .arg("x")
        .arg("y")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(matches!(
        s.create_job(&m).await,
        Err(StoreError::Unavailable { .. })
    ));
    check_clean(m.clone()).await;
    let in_running: bool = redis::cmd("SISMEMBER")
        .arg(&running)
        .arg(&m.stream_id)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!in_running);
    assert!(s.running_jobs(&m.user_id).await.unwrap().is_empty());
}
