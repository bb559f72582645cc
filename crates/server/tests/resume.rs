//! The guarantee of docs/protocol.md §3, as a property: a reader that disconnects at random points
//! and resumes — by `Last-Event-ID`, by `cursor`, or by a `resume=true` snapshot —
//! ends with exactly the uninterrupted log: no duplicate, no gap, in order, and every
//! snapshot equal to the fold of the log up to its seq.
//!
//! Plans (which resume mode, how many frames before each disconnect, how long to
//! wait) come from a proptest strategy. 1,000 plans run per test run: 700 in-process
//! through the router and 300 over real loopback HTTP, five readers per job. Each job
//! starts with its readers, who join at random times in its first 60 ms, so most
//! connections meet a running job (the test asserts at least a quarter do, under load) and some a
//! finished one. The plans run concurrently, so proptest's sequential runner only
//! generates them; a failure prints its plan.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::Request;
use common::*;
use futures::StreamExt;
use genstream_engine::aggregate::Aggregate;
use genstream_engine::event::Event;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use tower::ServiceExt;

#[derive(Clone, Copy, Debug)]
enum Mode {
    LastEventId,
    Cursor,
    Resume,
}

#[derive(Clone, Debug)]
struct Plan {
    join_after_ms: u64,
    /// Per connection: how to resume, frames to read before dropping, pause after.
    steps: Vec<(Mode, usize, u64)>,
}

fn plan_strategy() -> impl Strategy<Value = Plan> {
    let mode = prop_oneof![
        Just(Mode::LastEventId),
        Just(Mode::Cursor),
        Just(Mode::Resume)
    ];
    (
        0u64..60,
        proptest::collection::vec((mode, 0usize..8, 0u64..6), 1..12),
    )
        .prop_map(|(join_after_ms, steps)| Plan {
            join_after_ms,
            steps,
        })
}

fn plans(n: usize) -> Vec<Plan> {
    let mut runner = TestRunner::default();
    let s = plan_strategy();
    (0..n)
        .map(|_| s.new_tree(&mut runner).expect("plan").current())
        .collect()
}

/// How a reader connects: in-process or over a socket.
#[derive(Clone)]
enum Transport {
    InProcess(axum::Router),
    Http(SocketAddr, reqwest::Client),
}

fn uri(stream_id: &str, mode: Mode, cursor: Option<u64>) -> (String, Option<String>) {
    let base = format!("/api/chat/stream/{stream_id}");
    match (mode, cursor) {
        (Mode::Resume, _) => (format!("{base}?resume=true"), None),
        (_, None) => (base, None),
        (Mode::Cursor, Some(c)) => (format!("{base}?cursor={c}"), None),
        (Mode::LastEventId, Some(c)) => (base, Some(c.to_string())),
    }
}

/// Reads up to `limit` frames (comments skipped) from one connection, then drops it.
async fn one_connection(
    t: &Transport,
    stream_id: &str,
    mode: Mode,
    cursor: Option<u64>,
    limit: usize,
) -> Vec<SseFrame> {
    let (path, last_event_id) = uri(stream_id, mode, cursor);
    let tok = token("alice");
    let mut buf = Vec::new();
    let mut got = Vec::new();
    match t {
        Transport::InProcess(router) => {
            let mut req = Request::get(&path).header("authorization", format!("Bearer {tok}"));
            if let Some(id) = &last_event_id {
                req = req.header("last-event-id", id);
            }
            let resp = router
                .clone()
                .oneshot(req.body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            let mut body = resp.into_body();
            while got.len() < limit {
                let Some(frame) = body.frame().await else {
                    break;
                };
                if let Ok(data) = frame.unwrap().into_data() {
                    buf.extend_from_slice(&data);
                    got.extend(take_frames(&mut buf).into_iter().filter(|f| !f.comment));
                }
            }
        }
        Transport::Http(addr, client) => {
            let mut req = client.get(format!("http://{addr}{path}")).bearer_auth(&tok);
            if let Some(id) = &last_event_id {
                req = req.header("last-event-id", id);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            let mut body = resp.bytes_stream();
            while got.len() < limit {
                let Some(chunk) = body.next().await else {
                    break;
                };
                buf.extend_from_slice(&chunk.unwrap());
                got.extend(take_frames(&mut buf).into_iter().filter(|f| !f.comment));
            }
        }
    }
    // A disconnect may fall in the middle of a batch: keep only what "arrived".
    got.truncate(limit);
    got
}

/// What one reader got: every frame, and how many of its connections were opened while
/// the job was still running (the live case of the snapshot/subscribe race).
struct Reading {
    frames: Vec<SseFrame>,
    connections: usize,
    live_connections: usize,
}

/// Follows `plan` until the terminal event.
async fn read_with_plan(t: Transport, app: &TestApp, stream_id: String, plan: Plan) -> Reading {
    tokio::time::sleep(std::time::Duration::from_millis(plan.join_after_ms)).await;
    let mut cursor: Option<u64> = None;
    let mut r = Reading {
        frames: Vec::new(),
        connections: 0,
        live_connections: 0,
    };
    let mut steps = plan.steps.clone().into_iter();
    loop {
        let (mode, limit, pause) = steps.next().unwrap_or((Mode::LastEventId, usize::MAX, 0));
        let running = app
            .state
            .manager
            .store()
            .get_job(&stream_id)
            .await
            .unwrap()
            .is_some_and(|m| m.status == genstream_engine::store::JobStatus::Running);
        r.connections += 1;
        r.live_connections += usize::from(running);
        let frames = one_connection(&t, &stream_id, mode, cursor, limit).await;
        for f in frames {
            cursor = f.id;
            let end = is_terminal(&f);
            r.frames.push(f);
            if end {
                return r;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
    }
}

/// The property: `received` is the log, modulo snapshots that stand for a prefix.
fn check(received: &[SseFrame], reference: &[SseFrame], plan: &Plan) {
    let events = || -> Vec<Event> {
        reference
            .iter()
            .map(|f| serde_json::from_value(f.data.clone().unwrap()).unwrap())
            .collect()
    };
    let mut cursor: Option<u64> = None;
    for f in received {
        let id =
            f.id.unwrap_or_else(|| panic!("frame without id {f:?}; plan {plan:?}"));
        if f.event.as_deref() == Some("sync") {
            // A snapshot never stands for less than the reader already has: that would
            // make it replay events again (LibreChat #12225).
            assert!(
                cursor.is_none_or(|c| id >= c),
                "snapshot at seq {id} behind the cursor {cursor:?}; plan {plan:?}"
            );
            let events = events();
            let mut agg = Aggregate::default();
            for e in &events[..=id as usize] {
                agg.apply(e.seq, &e.body);
            }
            let data = f.data.as_ref().unwrap();
            assert_eq!(data["seq"], id, "sync data seq differs from its id");
            let snap = &data["resumeState"];
            let expected = serde_json::to_value(agg.resume_state()).unwrap();
            for field in [
                "aggregatedContent",
                "runSteps",
                "userMessage",
                "responseMessageId",
                "conversationId",
            ] {
                assert_eq!(snap[field], expected[field], "{field}; plan {plan:?}");
            }
            assert!(
                !events[id as usize].body.is_terminal(),
                "snapshot folded the terminal event"
            );
            cursor = Some(id);
            continue;
        }
        let expected = cursor.map_or(0, |c| c + 1);
        assert_eq!(
            id, expected,
            "gap or duplicate at seq {id} (expected {expected}); plan {plan:?}"
        );
        assert_eq!(
            f, &reference[id as usize],
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

/// Models paced so that a job runs ~100-200 ms: long enough that most connections
/// open while it runs, short enough for 1,000 plans.
fn paced_models() -> Vec<genstream_engine::manager::ModelEntry> {
    vec![
        demo("paced", json!({"tokens": 40, "token_delay": "5ms"})),
        demo(
            "paced-reasoning",
            json!({"tokens": 40, "token_delay": "5ms", "behavior": "reasoning"}),
        ),
    ]
}

/// Each job starts together with its readers, so they join it while it runs, read
/// it as it grows and some of them reconnect after it ended.
async fn run_plans(t: Transport, app: &TestApp, plans: Vec<Plan>) {
    const READERS_PER_JOB: usize = 5;
    const JOBS_AT_ONCE: usize = 12;
    let groups: Vec<(usize, Vec<Plan>)> = plans
        .chunks(READERS_PER_JOB)
        .map(<[Plan]>::to_vec)
        .enumerate()
        .collect();
    let results = futures::stream::iter(groups.into_iter().map(|(n, plans)| {
        let t = t.clone();
        async move {
            let model = if n % 3 == 0 {
                "paced-reasoning"
            } else {
                "paced"
            };
            let sid = app
                .state
                .manager
                .start(genstream_engine::manager::StartRequest {
                    user_id: "alice".into(),
                    text: format!("question {n}"),
                    model: Some(model.into()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .stream_id;
            let readings = futures::future::join_all(
                plans
                    .iter()
                    .map(|p| read_with_plan(t.clone(), app, sid.clone(), p.clone())),
            )
            .await;
            let reference = one_connection(&t, &sid, Mode::LastEventId, None, usize::MAX).await;
            assert!(is_terminal(reference.last().unwrap()));
            let (mut conns, mut live) = (0, 0);
            for (plan, r) in plans.iter().zip(&readings) {
                check(&r.frames, &reference, plan);
                conns += r.connections;
                live += r.live_connections;
            }
            (conns, live)
        }
    }))
    .buffer_unordered(JOBS_AT_ONCE)
    .collect::<Vec<_>>()
    .await;
    let connections: usize = results.iter().map(|r| r.0).sum();
    let live: usize = results.iter().map(|r| r.1).sum();
    eprintln!("{connections} connections, {live} opened while their job ran");
    // The test is about live jobs: if most connections only replayed finished logs,
    // the race it guards would go untested.
    assert!(
        live * 4 >= connections,
        "only {live} of {connections} connections met a running job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_in_process_700_plans() {
    let app = test_app(paced_models());
    run_plans(Transport::InProcess(app.router.clone()), &app, plans(700)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_over_http_300_plans() {
    let app = test_app(paced_models());
    let server = genstream_test_support::Served::start(app.router.clone()).await;
    let addr = server.addr;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    run_plans(Transport::Http(addr, client), &app, plans(300)).await;
}

#[test]
fn check_catches_a_duplicate_and_a_gap() {
    let f = |id: u64, ev: &str| SseFrame {
        id: Some(id),
        event: Some(ev.into()),
        data: Some(json!({"seq": id, "event": ev, "data": {}})),
        comment: false,
    };
    let _ = Value::Null;
    let reference = vec![f(0, "usage"), f(1, "usage"), f(2, "error")];
    let plan = Plan {
        join_after_ms: 0,
        steps: vec![],
    };
    let dup = vec![f(0, "usage"), f(1, "usage"), f(1, "usage"), f(2, "error")];
    assert!(std::panic::catch_unwind(|| check(&dup, &reference, &plan)).is_err());
    let gap = vec![f(0, "usage"), f(2, "error")];
    assert!(std::panic::catch_unwind(|| check(&gap, &reference, &plan)).is_err());
    // A snapshot behind the cursor would make the events after it come twice.
    let stale = vec![f(0, "usage"), f(1, "usage"), f(0, "sync"), f(1, "usage")];
    assert!(std::panic::catch_unwind(|| check(&stale, &reference, &plan)).is_err());
    check(&reference, &reference, &plan);
}
