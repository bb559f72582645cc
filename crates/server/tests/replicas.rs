//! Three replicas in one process, sharing the real Redis (127.0.0.1:6379, or
//! `GENSTREAM_TEST_REDIS_URL`) and a fresh PostgreSQL database (created through
//! `postgres://postgres@127.0.0.1:5432/postgres`, or `GENSTREAM_TEST_POSTGRES_ADMIN_URL`,
//! and dropped at the end). Each replica is what `genstream serve` builds
//! (`serve::build_state`: its own Redis connections and its own `JobManager`) behind its
//! own loopback listener (`common/cluster.rs`). Every test uses a Redis key prefix of its own.
//!
//! - docs/protocol.md §3's guarantee across replicas: readers that disconnect at random points and
//!   reconnect to a random replica, by `Last-Event-ID`, `cursor` or `resume=true`, get
//!   exactly the log (300 proptest plans per run, some jobs read while they run, some
//!   after they ended), byte for byte what Redis holds.
//! - One job watched from all three replicas from seq 0: identical bytes.
//! - Abort from a replica that does not own the job (docs/lessons.md: LibreChat #11462, #13611,
//!   #11433): the partial answer is saved before the answer, the owner stops, one
//!   terminal event, repeat gives the same body, a finished job is 409.
//! - Two reapers racing to end the same orphaned jobs: one terminal event per job.
//! - On a Redis Cluster of the test's own (`OwnRedisCluster`): the 300 resume plans, the
//!   cold-replica reads, and a primary failing over while jobs stream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::{
    A, B, C, Cluster, USER, cluster, cluster_on, cluster_with, demo_model, drive_plans, frames_of,
    now_ms, replica_config, samples,
};
use common::token;
use futures::StreamExt;
use genstream_engine::aggregate::Aggregate;
use genstream_engine::event::Event;
use genstream_server::app;
use genstream_server::config::ModelConfig;
use genstream_server::serve::build_state;
use genstream_test_support::{KeyPrefix, OwnRedisCluster, Served, TestDb, redis_url, wait_until};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------
// SSE frames, kept as the raw bytes that arrived.

#[derive(Clone, Debug, PartialEq)]
struct RawFrame {
    raw: Vec<u8>,
    id: Option<u64>,
    event: Option<String>,
    data: Option<Value>,
    comment: bool,
}

impl RawFrame {
    fn is_terminal(&self) -> bool {
        matches!(self.event.as_deref(), Some("final" | "error"))
    }
}

/// Splits complete frames (ending with a blank line) off the front of `buf`, leaving
/// out the stream's opening `retry:` field, which carries no event.
fn take_frames(buf: &mut Vec<u8>) -> Vec<RawFrame> {
    let mut out = Vec::new();
    while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
        let raw: Vec<u8> = buf.drain(..pos + 2).collect();
        if raw.starts_with(b"retry:") {
            continue;
        }
        out.push(parse_frame(raw));
    }
    out
}

fn parse_frame(raw: Vec<u8>) -> RawFrame {
    let text = String::from_utf8_lossy(&raw).to_string();
    let mut f = RawFrame {
        raw,
        id: None,
        event: None,
        data: None,
        comment: false,
    };
    for line in text.lines() {
        if line.starts_with(':') {
            f.comment = true;
        } else if let Some(v) = line.strip_prefix("id: ") {
            f.id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            f.event = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("data: ") {
            f.data = serde_json::from_str(v).ok();
        }
    }
    f
}

fn delta_text(frames: &[RawFrame]) -> String {
    frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("on_message_delta"))
        .flat_map(|f| {
            f.data.as_ref().unwrap()["data"]["delta"]["content"]
                .as_array()
                .unwrap()
                .clone()
        })
        .filter_map(|p| p["text"].as_str().map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------------------------
// The resume property across replicas.

#[derive(Clone, Copy, Debug)]
enum Mode {
    LastEventId,
    Cursor,
    Resume,
}

#[derive(Clone, Debug)]
struct Step {
    replica: usize,
    mode: Mode,
    /// Frames to read before dropping the connection.
    frames: usize,
    /// Pause before the next connection.
    pause_ms: u64,
}

#[derive(Clone, Debug)]
struct Plan {
    join_after_ms: u64,
    steps: Vec<Step>,
}

fn plan_strategy() -> impl Strategy<Value = Plan> {
    let mode = prop_oneof![
        Just(Mode::LastEventId),
        Just(Mode::Cursor),
        Just(Mode::Resume)
    ];
    let step =
        (0usize..3, mode, 0usize..8, 0u64..6).prop_map(|(replica, mode, frames, pause_ms)| Step {
            replica,
            mode,
            frames,
            pause_ms,
        });
    (0u64..60, proptest::collection::vec(step, 1..12)).prop_map(|(join_after_ms, steps)| Plan {
        join_after_ms,
        steps,
    })
}

fn plans(n: usize) -> Vec<Plan> {
    samples(plan_strategy(), n)
}

fn stream_path(stream_id: &str, mode: Mode, cursor: Option<u64>) -> (String, Option<String>) {
    let base = format!("/api/chat/stream/{stream_id}");
    match (mode, cursor) {
        (Mode::Resume, _) => (format!("{base}?resume=true"), None),
        (_, None) => (base, None),
        (Mode::Cursor, Some(c)) => (format!("{base}?cursor={c}"), None),
        (Mode::LastEventId, Some(c)) => (base, Some(c.to_string())),
    }
}

/// Reads up to `limit` frames (comments skipped) from one connection to `addr`, then
/// drops it.
async fn one_connection(
    http: &reqwest::Client,
    addr: SocketAddr,
    stream_id: &str,
    mode: Mode,
    cursor: Option<u64>,
    limit: usize,
) -> Vec<RawFrame> {
    let (path, last_event_id) = stream_path(stream_id, mode, cursor);
    let mut req = http
        .get(format!("http://{addr}{path}"))
        .bearer_auth(token(USER));
    if let Some(id) = &last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    if status != 200 {
        let body = resp.text().await.unwrap_or_default();
        panic!("{addr}{path}: {status} {body}");
    }
    frames_of(resp, limit, |buf| {
        take_frames(buf)
            .into_iter()
            .filter(|f| !f.comment)
            .collect()
    })
    .await
}

/// What one reader got, and when it first connected (ms since the epoch).
struct ReaderRun {
    stream_id: String,
    plan: Plan,
    finished_group: bool,
    first_connect_ms: u64,
    frames: Vec<RawFrame>,
}

/// Follows `plan` until the terminal event, each connection to the plan's replica.
async fn read_with_plan(
    http: reqwest::Client,
    addrs: Vec<SocketAddr>,
    stream_id: String,
    plan: Plan,
    finished_group: bool,
) -> ReaderRun {
    tokio::time::sleep(Duration::from_millis(plan.join_after_ms)).await;
    let first_connect_ms = now_ms();
    let mut cursor: Option<u64> = None;
    let mut all = Vec::new();
    let mut steps = plan.steps.clone().into_iter();
    let tail_replica = plan.steps.len() % 3;
    'outer: loop {
        let step = steps.next().unwrap_or(Step {
            replica: tail_replica,
            mode: Mode::LastEventId,
            frames: usize::MAX,
            pause_ms: 0,
        });
        let frames = one_connection(
            &http,
            addrs[step.replica],
            &stream_id,
            step.mode,
            cursor,
            step.frames,
        )
        .await;
        for f in frames {
            cursor = f.id;
            let end = f.is_terminal();
            all.push(f);
            if end {
                break 'outer;
            }
        }
        tokio::time::sleep(Duration::from_millis(step.pause_ms)).await;
    }
    ReaderRun {
        stream_id,
        plan,
        finished_group,
        first_connect_ms,
        frames: all,
    }
}

/// The property: `received` is the log, modulo `sync` snapshots standing for a prefix;
/// every event frame byte-identical to the reference.
fn check(received: &[RawFrame], reference: &[RawFrame], plan: &Plan) {
    let events: Vec<Event> = reference
        .iter()
        .map(|f| serde_json::from_value(f.data.clone().unwrap()).unwrap())
        .collect();
    let mut cursor: Option<u64> = None;
    for f in received {
        let id =
            f.id.unwrap_or_else(|| panic!("frame without id {f:?}; plan {plan:?}"));
        if f.event.as_deref() == Some("sync") {
            let data = f.data.as_ref().unwrap();
            assert_eq!(data["sync"], true);
            assert_eq!(
                data["seq"], id,
                "the snapshot carries its seq; plan {plan:?}"
            );
            assert!(
                (id as usize) < events.len(),
                "snapshot at {id} beyond the log; plan {plan:?}"
            );
            assert!(
                !events[id as usize].body.is_terminal(),
                "snapshot folded the terminal event; plan {plan:?}"
            );
            let mut agg = Aggregate::default();
            for e in &events[..=id as usize] {
                agg.apply(e.seq, &e.body);
            }
            // The content is the fold of the log up to the snapshot's seq; the status
            // is the job's when the snapshot was taken: running, or how it ended.
            let mut snap = data["resumeState"].clone();
            let status = snap["status"].take();
            let mut expected = serde_json::to_value(agg.resume_state()).unwrap();
            expected["status"] = Value::Null;
            assert_eq!(
                snap, expected,
                "snapshot at {id} is not the fold of the log; plan {plan:?}"
            );
            let ended = events.last().unwrap().body.is_terminal();
            let final_status = match &events.last().unwrap().body {
                genstream_engine::event::EventBody::Final(f) => {
                    serde_json::to_value(f.status).unwrap()
                }
                _ => json!("error"),
            };
            assert!(
                status == "running" || (ended && status == final_status),
                "status {status} in a snapshot at {id}; plan {plan:?}"
            );
            cursor = Some(id);
            continue;
        }
        let expected = cursor.map_or(0, |c| c + 1);
        assert_eq!(
            id, expected,
            "gap or duplicate at seq {id} (expected {expected}); plan {plan:?}"
        );
        assert!(
            (id as usize) < reference.len(),
            "seq {id} beyond the log; plan {plan:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&f.raw),
            String::from_utf8_lossy(&reference[id as usize].raw),
            "frame {id} differs; plan {plan:?}"
        );
        cursor = Some(id);
    }
    assert_eq!(
        cursor,
        Some(reference.len() as u64 - 1),
        "did not reach the end; plan {plan:?}"
    );
}

const MODELS: [&str; 3] = ["demo", "demo60", "reasoning"];

fn property_models() -> Vec<ModelConfig> {
    vec![
        demo_model("demo", json!({"tokens": 30, "token_delay": "1ms"})),
        demo_model("demo60", json!({"tokens": 60, "token_delay": "2ms"})),
        demo_model(
            "reasoning",
            json!({"tokens": 40, "token_delay": "1ms", "behavior": "reasoning"}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_three_replicas_300_plans() {
    resume_across_three_replicas(&redis_url()).await;
}

/// The same 300 plans with the three replicas on a Redis Cluster of three primaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_three_replicas_300_plans_on_a_cluster() {
    let redis = OwnRedisCluster::start();
    resume_across_three_replicas(&redis.url()).await;
}

async fn resume_across_three_replicas(store: &str) {
    const PLANS: usize = 300;
    const READERS_PER_JOB: usize = 5;
    let started_at = Instant::now();
    let cl = cluster_on(store, property_models(), |_| {}).await;
    let addrs: Vec<SocketAddr> = cl.replicas.iter().map(|r| r.addr).collect();
    let (runs, finished_at_ms) = drive_plans(
        &plans(PLANS),
        READERS_PER_JOB,
        Duration::from_secs(120),
        async |i, finished| {
            let text = format!("{} {i}", if finished { "finished" } else { "running" });
            let v = cl.start(A, &text, MODELS[i % MODELS.len()]).await;
            v["streamId"].as_str().unwrap().to_string()
        },
        async |sid| {
            one_connection(&cl.http, addrs[A], sid, Mode::LastEventId, None, usize::MAX).await;
        },
        async |sid, plan, finished| {
            read_with_plan(cl.http.clone(), addrs.clone(), sid, plan, finished).await
        },
    )
    .await;
    let plans_done = started_at.elapsed();

    // References: each log read after its end from one replica (rotating), which must
    // be what Redis holds, byte for byte.
    let mut sids: Vec<String> = runs.iter().map(|r| r.stream_id.clone()).collect();
    sids.sort();
    sids.dedup();
    assert_eq!(sids.len(), PLANS / READERS_PER_JOB);
    let mut references: HashMap<String, Vec<RawFrame>> = HashMap::new();
    let mut finished_ms: HashMap<String, u64> = HashMap::new();
    for (i, sid) in sids.iter().enumerate() {
        let reference = one_connection(
            &cl.http,
            addrs[i % 3],
            sid,
            Mode::LastEventId,
            None,
            usize::MAX,
        )
        .await;
        let stored = cl.prefix.log(sid).await;
        assert_eq!(reference.len(), stored.len(), "{sid}");
        for (f, s) in reference.iter().zip(&stored) {
            assert_eq!(f.raw, *s, "replica {} serves what Redis holds", i % 3);
        }
        let terminals = reference.iter().filter(|f| f.is_terminal()).count();
        assert_eq!(terminals, 1);
        assert_eq!(reference.last().unwrap().event.as_deref(), Some("final"));
        let fin: u64 = cl
            .prefix
            .job_field(sid, "finishedAt")
            .await
            .expect("finishedAt")
            .parse()
            .unwrap();
        finished_ms.insert(sid.clone(), fin);
        references.insert(sid.clone(), reference);
    }

    let mut live_readers = 0;
    let mut replicas_used = [0usize; 3];
    let mut syncs = 0;
    for run in &runs {
        check(&run.frames, &references[&run.stream_id], &run.plan);
        let fin = finished_ms[&run.stream_id];
        if run.finished_group {
            assert!(fin <= finished_at_ms && run.first_connect_ms >= finished_at_ms);
        } else if run.first_connect_ms < fin {
            live_readers += 1;
        }
        for s in &run.plan.steps {
            replicas_used[s.replica] += 1;
        }
        syncs += run
            .frames
            .iter()
            .filter(|f| f.event.as_deref() == Some("sync"))
            .count();
    }
    eprintln!(
        "{PLANS} plans over 3 replicas in {plans_done:?} (total {:?}): {live_readers} of {} \
         live-group readers joined a running job; connections per replica {replicas_used:?}; \
         {syncs} sync snapshots checked",
        started_at.elapsed(),
        PLANS / 2
    );
    assert!(
        live_readers >= PLANS / 10,
        "too few readers joined a running job ({live_readers}); the test lost its point"
    );
    assert!(replicas_used.iter().all(|&n| n > 100));
    // Nothing is left running anywhere.
    for r in &cl.replicas {
        assert_eq!(r.state.manager.live_jobs(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_watched_from_three_replicas_is_byte_identical() {
    let cl = cluster(vec![demo_model(
        "long",
        json!({"tokens": 200, "token_delay": "2ms", "behavior": "reasoning"}),
    )])
    .await;
    let v = cl.start(A, "watch me", "long").await;
    let sid = v["streamId"].as_str().unwrap().to_string();
    let read_all = |r: usize| {
        let url = cl.url(r, &format!("/api/chat/stream/{sid}"));
        let http = cl.http.clone();
        async move {
            let resp = http.get(url).bearer_auth(token(USER)).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            let mut bytes = Vec::new();
            let mut first_chunk_ms = None;
            while let Some(chunk) = body.next().await {
                first_chunk_ms.get_or_insert_with(now_ms);
                bytes.extend_from_slice(&chunk.unwrap());
            }
            (bytes, first_chunk_ms.unwrap())
        }
    };
    let ((a, a_first), (b, b_first), (c, c_first)) = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join3(read_all(A), read_all(B), read_all(C)),
    )
    .await
    .expect("the job ends");
    assert_eq!(a, b, "A and B served different bytes");
    assert_eq!(a, c, "A and C served different bytes");
    // After the `retry:` field every stream opens with, the replicas serve exactly
    // what Redis holds.
    let stored: Vec<u8> = [
        b"retry: 1000\n\n".to_vec(),
        cl.prefix.log(&sid).await.concat(),
    ]
    .concat();
    assert!(a == stored, "the replicas serve exactly what Redis holds");
    let mut buf = a.clone();
    let frames = take_frames(&mut buf);
    assert!(buf.is_empty());
    assert!(frames.iter().all(|f| !f.comment));
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.id, Some(i as u64));
    }
    let last = frames.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("final"));
    assert_eq!(last.data.as_ref().unwrap()["data"]["status"], "complete");
    assert!(frames.len() > 200);
    // They watched it live, not a replay.
    let fin: u64 = cl
        .prefix
        .job_field(&sid, "finishedAt")
        .await
        .unwrap()
        .parse()
        .unwrap();
    for (name, first) in [("A", a_first), ("B", b_first), ("C", c_first)] {
        assert!(first < fin, "{name} got its first bytes only after the end");
    }
}

/// A replica with no copy of a job's log answers a reconnect from Redis's own log
/// (pages from the cursor on) while its copy fills and the job still appends; then it
/// goes on from its copy. Each reader gets exactly the log after its random cursor,
/// byte for byte what Redis holds: no gap, no duplicate, one terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_replicas_answer_from_redis_while_the_job_appends() {
    cold_replicas_resume(&redis_url()).await;
}

/// The same on a Redis Cluster of three primaries (`redis+cluster://`): the page reads
/// (`HMGET` + `XRANGE`, one slot), the mirrors' sharded channels and the healer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_replicas_answer_from_redis_while_the_job_appends_on_a_cluster() {
    let redis = OwnRedisCluster::start();
    cold_replicas_resume(&redis.url()).await;
}

async fn cold_replicas_resume(store: &str) {
    let cl = cluster_on(
        store,
        vec![demo_model(
            "long",
            json!({"tokens": 2500, "token_delay": "1ms"}),
        )],
        |_| {},
    )
    .await;
    let mut runner = TestRunner::default();
    let mut read_while_running = 0;
    for i in 0..3 {
        let v = cl.start(A, &format!("cold {i}"), "long").await;
        let sid = v["streamId"].as_str().unwrap().to_string();
        // Enough of the log in Redis for several pages behind the head.
        wait_until(Duration::from_secs(30), "300 events appended", || async {
            cl.prefix
                .job_field(&sid, "len")
                .await
                .is_some_and(|l| l.parse::<u64>().unwrap() >= 300)
        })
        .await;
        let len: u64 = cl
            .prefix
            .job_field(&sid, "len")
            .await
            .unwrap()
            .parse()
            .unwrap();
        let mut read = |r: usize| {
            let cursor = (0..len).new_tree(&mut runner).unwrap().current();
            let store = cl.replicas[r].state.manager.store().clone();
            let (http, addr, sid) = (cl.http.clone(), cl.replicas[r].addr, sid.clone());
            let prefix = &cl.prefix;
            async move {
                assert!(store.ready_log(&sid).is_none(), "replica {r} is cold");
                let running = prefix.job_field(&sid, "ended").await.as_deref() != Some("1");
                let got = one_connection(
                    &http,
                    addr,
                    &sid,
                    Mode::LastEventId,
                    Some(cursor),
                    usize::MAX,
                )
                .await;
                (cursor, running, got)
            }
        };
        let (b, c) = (read(B), read(C));
        let ((cb, rb, got_b), (cc, rc, got_c)) =
            tokio::time::timeout(Duration::from_secs(60), futures::future::join(b, c))
                .await
                .expect("the job ends");
        let stored = cl.prefix.log(&sid).await;
        for (cursor, running, got) in [(cb, rb, got_b), (cc, rc, got_c)] {
            let want = &stored[cursor as usize + 1..];
            assert_eq!(
                got.len(),
                want.len(),
                "cursor {cursor}: a gap or a duplicate"
            );
            for (f, w) in got.iter().zip(want) {
                assert_eq!(f.raw, *w, "cursor {cursor}: not what Redis holds");
            }
            assert_eq!(got.iter().filter(|f| f.is_terminal()).count(), 1);
            read_while_running += usize::from(running);
        }
    }
    assert!(
        read_while_running >= 3,
        "too few cold reads began while the job ran ({read_while_running}); the test lost \
         its point"
    );
}

/// A Redis Cluster primary fails over to its replica (`CLUSTER FAILOVER`) while jobs
/// stream on three replicas, each job read live from another replica than its owner:
/// every event a reader got is in the final log at its seq, byte for byte (nothing
/// acknowledged is lost, nothing is duplicated), the log's seqs are strict, and every
/// job ends with exactly one terminal event, `final` or an explicit `error`, that its
/// reader got too (no job ends silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_while_jobs_stream_loses_nothing_acknowledged() {
    cluster_failover(false).await;
}

/// The same when the primary is killed and its replica promoted (after
/// `cluster-node-timeout`, 2 s here): appends to its slots fail meanwhile and are
/// retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_primary_while_jobs_stream_loses_nothing_acknowledged() {
    cluster_failover(true).await;
}

async fn cluster_failover(kill: bool) {
    const JOBS: usize = 9;
    let mut redis = OwnRedisCluster::start_with_replica();
    let cl = cluster_on(
        &redis.url(),
        vec![demo_model(
            "long",
            json!({"tokens": 2000, "token_delay": "4ms"}),
        )],
        |_| {},
    )
    .await;
    let mut sids = Vec::new();
    let mut readers = Vec::new();
    for i in 0..JOBS {
        let v = cl.start(i % 3, &format!("failover {i}"), "long").await;
        let sid = v["streamId"].as_str().unwrap().to_string();
        let (http, addr, s) = (cl.http.clone(), cl.replicas[(i + 1) % 3].addr, sid.clone());
        readers.push(tokio::spawn(async move {
            one_connection(&http, addr, &s, Mode::LastEventId, None, usize::MAX).await
        }));
        sids.push(sid);
    }
    // Every job streams when the failover begins (the last one started does).
    let last = sids.last().unwrap();
    wait_until(Duration::from_secs(20), "20 events appended", || async {
        cl.prefix
            .job_field(last, "len")
            .await
            .is_some_and(|l| l.parse::<u64>().unwrap() >= 20)
    })
    .await;
    let failover_ms = now_ms();
    let failover_began = Instant::now();
    tokio::task::block_in_place(|| {
        if kill {
            redis.kill_first_primary();
        } else {
            redis.fail_over();
        }
    });
    let failover_took = failover_began.elapsed();
    let readers_done =
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(readers)).await;
    let Ok(got) = readers_done else {
        for (i, sid) in sids.iter().enumerate() {
            let mirrors: Vec<Option<u64>> = cl
                .replicas
                .iter()
                .map(|r| r.state.manager.store().ready_log(sid).map(|l| l.len()))
                .collect();
            eprintln!(
                "job {i} {sid}: len {:?} ended {:?} owner replica {} reader replica {}, mirrors {mirrors:?}",
                cl.prefix.job_field(sid, "len").await,
                cl.prefix.job_field(sid, "ended").await,
                i % 3,
                (i + 1) % 3
            );
        }
        panic!("a reader's stream did not end within 60 s of the failover");
    };
    let (mut errors, mut moved, mut moved_running) = (0, 0, 0);
    for (sid, got) in sids.iter().zip(got) {
        let got = got.unwrap();
        // Strict seqs: `log` asserts entry ids 0-(seq+1).
        let stored = cl.prefix.log(sid).await;
        assert!(
            got.len() <= stored.len(),
            "{sid}: the reader got {} events, the log holds {}",
            got.len(),
            stored.len()
        );
        for (i, (f, s)) in got.iter().zip(&stored).enumerate() {
            assert_eq!(f.id, Some(i as u64), "{sid}: seq {i}");
            assert_eq!(f.raw, *s, "{sid}: event {i} is not what the log holds");
        }
        let terminals: Vec<_> = stored
            .iter()
            .enumerate()
            .filter(|(_, raw)| {
                raw.starts_with(b"id: ") && {
                    let text = String::from_utf8_lossy(raw);
                    text.contains("\nevent: final\n") || text.contains("\nevent: error\n")
                }
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            terminals,
            vec![stored.len() - 1],
            "{sid}: one terminal event, last"
        );
        let last = got.last().expect("events");
        assert!(
            last.is_terminal(),
            "{sid}: the reader's stream ended without its end"
        );
        assert_eq!(
            got.len(),
            stored.len(),
            "{sid}: the reader got the whole log"
        );
        errors += usize::from(last.event.as_deref() == Some("error"));
        // In the failed-over slots, and still running when the failover began.
        let finished: u64 = cl
            .prefix
            .job_field(sid, "finishedAt")
            .await
            .unwrap()
            .parse()
            .unwrap();
        if redis.on_first_primary(&format!("{}:job:{{{sid}}}", cl.prefix.name())) {
            moved += 1;
            moved_running += usize::from(finished > failover_ms);
        }
    }
    eprintln!(
        "{JOBS} jobs, {moved} in the failed-over primary's slots, {moved_running} of them \
         running at the failover (took {failover_took:?}), {errors} ended with an error"
    );
    assert!(
        moved_running >= 1,
        "no job of the failed-over slots ran at the failover; the test lost its point"
    );
}

// ---------------------------------------------------------------------------------
// Abort across replicas.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_from_another_replica_saves_partial_before_answering() {
    let cl = cluster(vec![
        demo_model("slow", json!({"tokens": 100000, "token_delay": "10ms"})),
        demo_model("demo", json!({"tokens": 30, "token_delay": "1ms"})),
    ])
    .await;
    let v = cl.start(A, "a long answer please", "slow").await;
    let sid = v["streamId"].as_str().unwrap().to_string();
    let cid = v["conversationId"].as_str().unwrap().to_string();
    let response_id = v["responseMessageId"].as_str().unwrap().to_string();

    // A subscriber on B, reading until the end; wait for some text first.
    let (tx, mut rx) = tokio::sync::watch::channel(0usize);
    let watcher = {
        let url = cl.url(B, &format!("/api/chat/stream/{sid}"));
        let http = cl.http.clone();
        tokio::spawn(async move {
            let resp = http.get(url).bearer_auth(token(USER)).send().await.unwrap();
            let mut body = resp.bytes_stream();
            let mut buf = Vec::new();
            let mut frames = Vec::new();
            while let Some(chunk) = body.next().await {
                buf.extend_from_slice(&chunk.unwrap());
                frames.extend(take_frames(&mut buf).into_iter().filter(|f| !f.comment));
                let _ = tx.send(frames.len());
            }
            frames
        })
    };
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= 10))
        .await
        .expect("the job streams")
        .unwrap();
    assert_eq!(cl.replicas[A].state.manager.live_jobs(), 1);
    assert_eq!(cl.replicas[C].state.manager.live_jobs(), 0);

    // Abort from C, which neither runs nor watches the job.
    let t0 = Instant::now();
    let (s, answer) = cl
        .post(C, "/api/chat/abort", json!({"streamId": sid}))
        .await;
    let round_trip = t0.elapsed();
    assert_eq!(s, 200, "{answer}");
    // Straight away, on B: the partial answer is in the database.
    let (s, msgs) = cl
        .get(B, &format!("/api/conversations/{cid}/messages"))
        .await;
    assert_eq!(s, 200, "{msgs}");
    assert_eq!(answer["success"], true);
    assert_eq!(answer["aborted"], sid.as_str());
    let partial = &answer["responseMessage"];
    assert_eq!(partial["messageId"], response_id.as_str());
    assert_eq!(partial["unfinished"], true, "{partial}");
    assert!(!partial["text"].as_str().unwrap().is_empty(), "{partial}");
    assert!(answer["usage"]["calls"].as_u64().unwrap() >= 1, "{answer}");
    assert!(
        answer["usage"]["outputTokens"].as_u64().unwrap() > 0,
        "{answer}"
    );
    let saved = msgs["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["messageId"] == response_id.as_str())
        .unwrap_or_else(|| {
            panic!("the partial answer was not saved before the abort answer: {msgs}")
        });
    assert_eq!(saved, partial, "the saved message is the one answered");

    // A's generation stopped; exactly one terminal event, `final` `aborted`.
    wait_until(Duration::from_secs(2), "A to stop running the job", || {
        let live = cl.replicas[A].state.manager.live_jobs();
        async move { live == 0 }
    })
    .await;
    let frames = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("B's subscriber ends")
        .unwrap();
    let last = frames.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("final"));
    let fin = &last.data.as_ref().unwrap()["data"];
    assert_eq!(fin["status"], "aborted");
    assert_eq!(fin["reason"], "aborted");
    assert_eq!(fin["responseMessage"], *partial);
    assert_eq!(fin["usage"], answer["usage"]);
    assert_eq!(
        delta_text(&frames),
        partial["text"].as_str().unwrap(),
        "the partial answer is all the text that was streamed"
    );
    let len_then = cl.prefix.log(&sid).await.len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stored: Vec<RawFrame> = cl
        .prefix
        .log(&sid)
        .await
        .into_iter()
        .map(parse_frame)
        .collect();
    assert_eq!(stored.len(), len_then, "nothing appended after the end");
    assert_eq!(stored.iter().filter(|f| f.is_terminal()).count(), 1);
    assert!(stored.last().unwrap().is_terminal());
    assert_eq!(stored.len(), frames.len());

    // Repeats, by stream id on B and by conversation on C, give the same body.
    let (s, again) = cl
        .post(B, "/api/chat/abort", json!({"streamId": sid}))
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again, answer);
    let (s, again) = cl
        .post(C, "/api/chat/abort", json!({"conversationId": cid}))
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again, answer);

    // A follow-up on B right away finds its parent (LibreChat #11462, #13611).
    let (s, follow) = cl
        .post(
            B,
            "/api/chat",
            json!({"text": "go on", "conversationId": cid, "parentMessageId": response_id, "model": "demo"}),
        )
        .await;
    assert_eq!(s, 200, "{follow}");

    // A completed job cannot be aborted, from any replica.
    let v = cl.start(A, "short", "demo").await;
    let done = v["streamId"].as_str().unwrap().to_string();
    let frames = one_connection(
        &cl.http,
        cl.replicas[A].addr,
        &done,
        Mode::LastEventId,
        None,
        usize::MAX,
    )
    .await;
    assert_eq!(frames.last().unwrap().event.as_deref(), Some("final"));
    let (s, e) = cl
        .post(B, "/api/chat/abort", json!({"streamId": done}))
        .await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "job_finished");

    eprintln!("abort round trip from a non-owner replica: {round_trip:?}");
    assert!(
        round_trip < Duration::from_secs(2),
        "abort took {round_trip:?}"
    );
}

// ---------------------------------------------------------------------------------
// Reapers racing.

/// Jobs whose owner is gone (a replica that created them and stopped renewing its
/// lease, with no generation running anywhere) are ended by two reapers at once: each
/// log gets exactly one terminal event, `replica_lost`, carrying the partial answer
/// (the fold of the log), and that answer is in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reapers_end_each_orphan_once() {
    racing_reapers(false).await;
}

/// As above, and the database holds exactly the message the terminal event carries
/// (docs/lessons.md: one writer per message): only the reaper that won the end claim saves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reapers_write_the_partial_message_once() {
    racing_reapers(true).await;
}

/// Waits until replica `reaper` judges other replicas' leases, which it does only after
/// a whole lease TTL of its own health, by the effect: it ends a probe job whose owner
/// stopped renewing its lease (a job without a `created` event: its log is ended,
/// nothing is saved). For clusters whose reapers are driven by hand.
async fn wait_until_judging_leases(cl: &Cluster, reaper: usize) {
    use genstream_engine::store::EventLogStore;
    let mut rc = genstream_redis::RedisConfig::new(&redis_url());
    rc.key_prefix = cl.prefix.name().to_owned();
    rc.lease_ttl = Duration::from_millis(100);
    let owner = genstream_redis::RedisStore::connect(rc).await.unwrap();
    let probe = genstream_engine::suite::meta("lease-probe", &genstream_engine::new_id());
    owner.create_job(&probe).await.unwrap();
    owner.close();
    let manager = &cl.replicas[reaper].state.manager;
    wait_until(
        Duration::from_secs(10),
        "the reaper to end a probe job",
        || async { manager.reap_orphans().await.unwrap() == 1 },
    )
    .await;
}

async fn racing_reapers(strict: bool) {
    use genstream_engine::event::ContentPart;
    use genstream_engine::event::{
        Created, Delta, DeltaContent, EventBody, Message, MessageCreation, RunStep, StepDetails,
        StepType,
    };
    use genstream_engine::store::{EventLogStore, JobMeta, JobStatus};

    const JOBS: usize = 20;
    let cl = cluster_with(
        vec![demo_model(
            "demo",
            json!({"tokens": 30, "token_delay": "1ms"}),
        )],
        |c| {
            // Reapers are driven by hand below. A short lease: a replica judges other
            // replicas' leases only after one whole lease TTL of health of its own.
            c.jobs.reap_interval = Duration::from_secs(3600);
            c.redis.lease_ttl = Duration::from_millis(500);
        },
    )
    .await;
    // The race needs both reapers able to judge the dead owner's lease.
    wait_until_judging_leases(&cl, B).await;
    wait_until_judging_leases(&cl, C).await;
    // The dead owner: a store of its own, whose lease lapses after 300 ms.
    let mut rc = genstream_redis::RedisConfig::new(&redis_url());
    rc.key_prefix = cl.prefix.name().to_owned();
    rc.lease_ttl = Duration::from_millis(300);
    let dead = genstream_redis::RedisStore::connect(rc).await.unwrap();
    let db = cl.replicas[A].state.manager.db().clone();
    let mut sids = Vec::new();
    for i in 0..JOBS {
        let meta = JobMeta {
            stream_id: uuid::Uuid::now_v7().to_string(),
            user_id: USER.into(),
            conversation_id: uuid::Uuid::now_v7().to_string(),
            user_message_id: uuid::Uuid::now_v7().to_string(),
            response_message_id: uuid::Uuid::now_v7().to_string(),
            model: "demo".into(),
            status: JobStatus::Running,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            webhook_url: None,
        };
        dead.create_job(&meta).await.unwrap();
        let user_message = Message {
            message_id: meta.user_message_id.clone(),
            conversation_id: meta.conversation_id.clone(),
            parent_message_id: None,
            sender: "User".into(),
            text: format!("orphan {i}"),
            content: Vec::new(),
            is_created_by_user: true,
            model: None,
            unfinished: false,
            error: false,
            created_at: meta.created_at.clone(),
        };
        db.save_conversation(&genstream_engine::persist::Conversation {
            conversation_id: meta.conversation_id.clone(),
            user_id: USER.into(),
            title: format!("orphan {i}"),
            created_at: meta.created_at.clone(),
            updated_at: meta.created_at.clone(),
        })
        .await
        .unwrap();
        db.save_message(&user_message).await.unwrap();
        let events = [
            EventBody::Created(Created {
                stream_id: meta.stream_id.clone(),
                conversation_id: meta.conversation_id.clone(),
                user_message,
                response_message_id: meta.response_message_id.clone(),
                model: "demo".into(),
                sender: "demo".into(),
                created_at: meta.created_at.clone(),
                client_tools: Vec::new(),
                protocol_options: None,
            }),
            EventBody::RunStep(RunStep {
                id: "step_0".into(),
                run_id: format!("{}:0", meta.stream_id),
                index: 0,
                step_type: StepType::MessageCreation,
                step_details: StepDetails::MessageCreation {
                    message_creation: MessageCreation {
                        message_id: meta.response_message_id.clone(),
                    },
                },
            }),
            EventBody::MessageDelta(Delta {
                id: "step_0".into(),
                delta: DeltaContent {
                    content: vec![ContentPart::Text {
                        text: format!("partial {i} "),
                    }],
                },
            }),
        ];
        for (seq, e) in events.iter().enumerate() {
            dead.append(&meta.stream_id, e, Some(seq as u64))
                .await
                .unwrap();
        }
        sids.push(meta);
    }
    dead.close();
    let lease = format!("replica:{}", dead.replica_id());
    wait_until(
        Duration::from_secs(5),
        "the dead owner's lease to lapse",
        || async { !cl.prefix.exists(&lease).await },
    )
    .await;

    let (b, c) = (
        cl.replicas[B].state.manager.clone(),
        cl.replicas[C].state.manager.clone(),
    );
    let (nb, nc) = tokio::join!(b.reap_orphans(), c.reap_orphans());
    let (nb, nc) = (nb.unwrap(), nc.unwrap());
    assert_eq!(nb + nc, JOBS, "each orphan is ended once (B {nb}, C {nc})");
    let mut db_mismatch = Vec::new();
    for meta in &sids {
        let stored: Vec<RawFrame> = cl
            .prefix
            .log(&meta.stream_id)
            .await
            .into_iter()
            .map(parse_frame)
            .collect();
        // created, step, delta, the winner's estimate of the cut-off call, error.
        assert_eq!(stored.len(), 5);
        assert_eq!(stored.iter().filter(|f| f.is_terminal()).count(), 1);
        assert_eq!(stored[3].event.as_deref(), Some("usage"));
        let estimate = &stored[3].data.as_ref().unwrap()["data"];
        assert_eq!(estimate["estimated"], true, "{estimate}");
        assert_eq!(estimate["callIndex"], 0, "{estimate}");
        assert!(estimate["outputTokens"].as_u64().unwrap() > 0, "{estimate}");
        let end = &stored[4].data.as_ref().unwrap()["data"];
        assert_eq!(stored[4].event.as_deref(), Some("error"));
        assert_eq!(end["code"], "replica_lost");
        let partial = &end["responseMessage"];
        assert_eq!(partial["unfinished"], true);
        assert_eq!(partial["text"], delta_text(&stored).as_str());
        let (_, msgs) = cl
            .get(
                A,
                &format!("/api/conversations/{}/messages", meta.conversation_id),
            )
            .await;
        let saved = msgs["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["messageId"] == meta.response_message_id.as_str())
            .cloned()
            .expect("the partial answer is saved");
        for k in [
            "messageId",
            "parentMessageId",
            "text",
            "content",
            "unfinished",
            "error",
        ] {
            assert_eq!(saved[k], partial[k], "saved message differs in {k}");
        }
        if saved != *partial {
            db_mismatch.push((saved, partial.clone()));
        }
    }
    eprintln!(
        "racing reapers: B ended {nb}, C ended {nc}; {} of {JOBS} saved messages are not \
         the one the terminal event carries",
        db_mismatch.len()
    );
    if !strict {
        return;
    }
    assert!(
        db_mismatch.is_empty(),
        "{} of {JOBS} saved messages differ from the one their terminal event carries \
         (the losing reaper wrote too), e.g. {:?}",
        db_mismatch.len(),
        db_mismatch.first()
    );
}

#[test]
fn check_catches_a_duplicate_a_gap_and_a_wrong_snapshot() {
    let f = |id: u64, ev: &str| {
        let raw = format!(
            "id: {id}\nevent: {ev}\ndata: {}\n\n",
            json!({"seq": id, "event": ev, "data": {"code": "x", "message": "m"}})
        );
        parse_frame(raw.into_bytes())
    };
    let usage = |id: u64| {
        let raw = format!(
            "id: {id}\nevent: usage\ndata: {}\n\n",
            json!({"seq": id, "event": "usage", "data": {"model": "m", "provider": "demo",
                "inputTokens": id, "outputTokens": 1, "cacheWriteTokens": 0,
                "cacheReadTokens": 0, "reasoningTokens": 0, "estimated": false}})
        );
        parse_frame(raw.into_bytes())
    };
    let reference = vec![usage(0), usage(1), f(2, "error")];
    let plan = Plan {
        join_after_ms: 0,
        steps: vec![],
    };
    check(&reference, &reference, &plan);
    let dup = vec![usage(0), usage(1), usage(1), f(2, "error")];
    assert!(std::panic::catch_unwind(|| check(&dup, &reference, &plan)).is_err());
    let gap = vec![usage(0), f(2, "error")];
    assert!(std::panic::catch_unwind(|| check(&gap, &reference, &plan)).is_err());
    let mut altered = reference.clone();
    altered[1].raw.push(b' ');
    assert!(std::panic::catch_unwind(|| check(&altered, &reference, &plan)).is_err());
    let bad_sync = parse_frame(
        format!(
            "id: 1\nevent: sync\ndata: {}\n\n",
            json!({"sync": true, "seq": 1, "resumeState": {"aggregatedContent": []}})
        )
        .into_bytes(),
    );
    let with_sync = vec![bad_sync, f(2, "error")];
    assert!(std::panic::catch_unwind(|| check(&with_sync, &reference, &plan)).is_err());
}

// ---------------------------------------------------------------------------------
// PostgreSQL lost while running.

/// A TCP proxy to the machine's PostgreSQL that the test can cut (every connection
/// closed, new ones closed at once) and restore, so the database "goes away" without
/// disturbing the PostgreSQL other tests share.
struct CutProxy {
    addr: SocketAddr,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn start(target: SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let c = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = c.subscribe();
                if *rx.borrow_and_update() {
                    continue; // dropped: closed at once
                }
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        CutProxy { addr, cut, task }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The database goes away while a replica runs: `/readyz` answers 503 naming the
/// database, a new chat gets 503 `database_unavailable`; when it is back, both recover
/// by themselves and a chat completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_lost_while_running_is_503_and_recovers() {
    let db = TestDb::create().await;
    let pg: SocketAddr = {
        let hostport = db
            .url
            .split("://")
            .nth(1)
            .and_then(|r| r.rsplit_once('@').map_or(Some(r), |(_, h)| Some(h)))
            .and_then(|h| h.split('/').next())
            .unwrap()
            .to_string();
        tokio::net::lookup_host(hostport)
            .await
            .unwrap()
            .next()
            .unwrap()
    };
    let proxy = CutProxy::start(pg).await;
    let url = db.url.replacen(&pg.to_string(), &proxy.addr.to_string(), 1);
    let url = if url == db.url {
        // The admin URL named the host differently (e.g. `localhost`).
        let (scheme_user, rest) = db.url.rsplit_once('@').unwrap();
        let path = rest.split_once('/').map_or("", |(_, p)| p);
        format!("{scheme_user}@{}/{path}", proxy.addr)
    } else {
        url
    };
    let prefix = KeyPrefix::new();
    let mut config = replica_config(
        prefix.name(),
        &url,
        vec![demo_model(
            "demo",
            json!({"tokens": 20, "token_delay": "1ms"}),
        )],
    );
    config.pool.acquire_timeout = Duration::from_secs(1);
    let (state, _) = build_state(&config).await.expect("replica starts");
    let served = Served::start(app(state.clone(), config.http.max_body_bytes)).await;
    let addr = served.addr;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let get = |path: &str| {
        let req = http
            .get(format!("http://{addr}{path}"))
            .bearer_auth(token(USER));
        async move {
            let r = req.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let chat = || {
        let req = http
            .post(format!("http://{addr}/api/chat"))
            .bearer_auth(token(USER))
            .json(&json!({"text": "hello", "model": "demo"}));
        async move {
            let r = req.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(get("/readyz").await.0, 200);
    assert_eq!(chat().await.0, 200);

    proxy.set_cut(true);
    let cut_at = Instant::now();
    let (s, body) = get("/readyz").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["store"], "ok", "{body}");
    assert_ne!(body["database"], "ok", "{body}");
    let (s, e) = chat().await;
    assert_eq!(s, 503, "{e}");
    assert_eq!(e["error"]["code"], "database_unavailable", "{e}");
    eprintln!(
        "database cut: readyz and chat 503 within {:?}",
        cut_at.elapsed()
    );

    proxy.set_cut(false);
    let back = Instant::now();
    loop {
        let (s, body) = get("/readyz").await;
        if s == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "not ready {:?} after the database came back: {body}",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = chat().await;
    assert_eq!(s, 200, "{v}");
    let sid = v["streamId"].as_str().unwrap().to_string();
    let frames = one_connection(&http, addr, &sid, Mode::LastEventId, None, usize::MAX).await;
    assert_eq!(frames.last().unwrap().event.as_deref(), Some("final"));
    eprintln!("database back: ready again after {:?}", back.elapsed());
}
