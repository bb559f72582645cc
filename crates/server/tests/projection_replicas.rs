//! The client protocol projections across three replicas sharing the real Redis and a
//! fresh PostgreSQL database (`common/cluster.rs`; the native stream's counterpart is
//! `replicas.rs`). Readers disconnect at random points (proptest plans) and reconnect
//! to a random replica; each asserts exactly what its protocol promises (README's
//! "OpenAI-compatible API" and "Vercel AI SDK (useChat)"):
//!
//! - Responses: `GET /v1/responses/{id}?stream=true&starting_after=N` after a
//!   disconnect continues after N, so the concatenation of what a reader got is the
//!   stream an uninterrupted reader gets: the same `sequence_number`s 0, 1, 2, … with
//!   no gap and no duplicate, each frame byte-equal, for jobs read while they run and
//!   after they ended; the whole stream and the response object are byte-identical on
//!   every replica.
//! - AI SDK: `GET /api/ai/chat/{chatId}/stream` has no cursor. While the job runs, each
//!   connection replays the message from its `start`: what it got is a prefix of the
//!   uninterrupted stream (`POST /api/ai/chat`'s answer), all of it when read to
//!   `[DONE]`, on every replica; once the job ended it is 204 on every replica.
//! - Chat Completions has no stream to reattach to: `GET /v1/chat/completions/{id}` is
//!   the same object on every replica, the streamed text.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::{
    A, B, C, Cluster, USER, cluster, demo_model, drive_plans, frames_of, now_ms, samples,
};
use common::token;
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------
// Frames of a projected stream, as the bytes that arrived.

/// One SSE block of a projected stream: its bytes (without the `retry:` line a
/// connection opens with, glued to its first event), its `event:` name and its `data:`
/// payload (JSON, or the string `[DONE]`).
#[derive(Clone, Debug, PartialEq)]
struct Frame {
    raw: Vec<u8>,
    event: Option<String>,
    data: Value,
}

impl Frame {
    /// The last frame of its stream: Responses' `response.completed` / `.failed` /
    /// `.incomplete`, the AI SDK's `[DONE]`.
    fn is_terminal(&self) -> bool {
        matches!(
            self.event.as_deref(),
            Some("response.completed" | "response.failed" | "response.incomplete")
        ) || self.data == "[DONE]"
    }

    fn sequence_number(&self) -> u64 {
        self.data["sequence_number"]
            .as_u64()
            .unwrap_or_else(|| panic!("no sequence_number in {self:?}"))
    }
}

/// Splits complete blocks off the front of `buf`, leaving out keep-alive comments.
fn take_frames(buf: &mut Vec<u8>) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
        let mut raw: Vec<u8> = buf.drain(..pos + 2).collect();
        if raw.starts_with(b"retry:") {
            let line = raw.iter().position(|&b| b == b'\n').unwrap();
            raw.drain(..=line);
        }
        if raw.starts_with(b":") {
            continue;
        }
        let text = String::from_utf8_lossy(&raw).to_string();
        let mut event = None;
        let mut data = Value::Null;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
            }
        }
        out.push(Frame { raw, event, data });
    }
    out
}

/// One connection: `GET url`, then up to `limit` frames before it is dropped.
async fn connection(http: &reqwest::Client, url: &str, limit: usize) -> (u16, Vec<Frame>) {
    let resp = http.get(url).bearer_auth(token(USER)).send().await.unwrap();
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, Vec::new());
    }
    (status, frames_of(resp, limit, take_frames).await)
}

async fn read_all(http: &reqwest::Client, url: &str) -> Vec<Frame> {
    let (status, frames) = connection(http, url, usize::MAX).await;
    assert_eq!(status, 200, "{url}");
    assert!(frames.last().is_some_and(Frame::is_terminal), "{url}");
    frames
}

// ---------------------------------------------------------------------------------
// Reader plans.

#[derive(Clone, Debug)]
struct Step {
    replica: usize,
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

impl Plan {
    /// The plan's steps, then reads to the end on a replica of its choosing.
    fn steps(&self) -> impl Iterator<Item = Step> {
        let tail = Step {
            replica: self.steps.len() % 3,
            frames: usize::MAX,
            pause_ms: 0,
        };
        self.steps
            .clone()
            .into_iter()
            .chain(std::iter::repeat(tail))
    }
}

fn plans(n: usize, max_frames: usize) -> Vec<Plan> {
    let step =
        (0usize..3, 0usize..max_frames, 0u64..6).prop_map(|(replica, frames, pause_ms)| Step {
            replica,
            frames,
            pause_ms,
        });
    let plan =
        (0u64..60, proptest::collection::vec(step, 1..10)).prop_map(|(join_after_ms, steps)| {
            Plan {
                join_after_ms,
                steps,
            }
        });
    samples(plan, n)
}

/// The stream id a `resp_<32 hex>` / `chatcmpl-<32 hex>` id stands for.
fn stream_id_of(id: &str) -> String {
    let hex = id.rsplit(['_', '-']).next().unwrap();
    uuid::Uuid::try_parse(hex).unwrap().to_string()
}

async fn finished_at(cl: &Cluster, stream_id: &str) -> u64 {
    cl.prefix
        .job_field(stream_id, "finishedAt")
        .await
        .expect("finishedAt")
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------
// Responses: resume by `starting_after`.

/// What one Responses reader got.
struct ResponsesRun {
    id: String,
    plan: Plan,
    finished_group: bool,
    first_connect_ms: u64,
    frames: Vec<Frame>,
}

/// Follows `plan` until the terminal event, each reconnect after the last
/// `sequence_number` received.
async fn read_responses(
    http: reqwest::Client,
    addrs: Vec<SocketAddr>,
    id: String,
    plan: Plan,
    finished_group: bool,
) -> ResponsesRun {
    tokio::time::sleep(Duration::from_millis(plan.join_after_ms)).await;
    let first_connect_ms = now_ms();
    let mut last: Option<u64> = None;
    let mut all = Vec::new();
    'outer: for step in plan.steps() {
        let after = last.map_or(String::new(), |n| format!("&starting_after={n}"));
        let url = format!(
            "http://{}/v1/responses/{id}?stream=true{after}",
            addrs[step.replica]
        );
        let (status, frames) = connection(&http, &url, step.frames).await;
        assert_eq!(status, 200, "{url}; plan {plan:?}");
        for f in frames {
            last = Some(f.sequence_number());
            let end = f.is_terminal();
            all.push(f);
            if end {
                break 'outer;
            }
        }
        tokio::time::sleep(Duration::from_millis(step.pause_ms)).await;
    }
    ResponsesRun {
        id,
        plan,
        finished_group,
        first_connect_ms,
        frames: all,
    }
}

/// The property: `received` is `reference`, frame for frame and byte for byte, with
/// `sequence_number`s 0, 1, 2, ….
fn check_responses(received: &[Frame], reference: &[Frame], plan: &Plan) {
    for (i, f) in received.iter().enumerate() {
        assert_eq!(
            f.sequence_number(),
            i as u64,
            "gap or duplicate at position {i}; plan {plan:?}"
        );
        assert!(i < reference.len(), "beyond the stream; plan {plan:?}");
        assert_eq!(
            String::from_utf8_lossy(&f.raw),
            String::from_utf8_lossy(&reference[i].raw),
            "frame {i} differs; plan {plan:?}"
        );
    }
    assert_eq!(
        received.len(),
        reference.len(),
        "did not reach the end; plan {plan:?}"
    );
}

#[test]
fn check_responses_catches_a_duplicate_a_gap_and_altered_bytes() {
    let f = |n: u64, event: &str| {
        let mut buf = format!(
            "event: {event}\ndata: {}\n\n",
            json!({"type": event, "sequence_number": n})
        )
        .into_bytes();
        take_frames(&mut buf).remove(0)
    };
    let reference = vec![
        f(0, "response.created"),
        f(1, "response.in_progress"),
        f(2, "response.completed"),
    ];
    let plan = Plan {
        join_after_ms: 0,
        steps: Vec::new(),
    };
    check_responses(&reference, &reference, &plan);
    let dup = [&reference[..2], &reference[1..]].concat();
    assert!(std::panic::catch_unwind(|| check_responses(&dup, &reference, &plan)).is_err());
    let gap = vec![reference[0].clone(), reference[2].clone()];
    assert!(std::panic::catch_unwind(|| check_responses(&gap, &reference, &plan)).is_err());
    let short = reference[..2].to_vec();
    assert!(std::panic::catch_unwind(|| check_responses(&short, &reference, &plan)).is_err());
    let mut altered = reference.clone();
    altered[1].raw.insert(0, b' ');
    assert!(std::panic::catch_unwind(|| check_responses(&altered, &reference, &plan)).is_err());
}

const MODELS: [&str; 3] = ["demo", "demo60", "reasoning"];

fn models() -> Vec<genstream_server::config::ModelConfig> {
    vec![
        demo_model("demo", json!({"tokens": 30, "token_delay": "1ms"})),
        demo_model("demo60", json!({"tokens": 60, "token_delay": "2ms"})),
        demo_model(
            "reasoning",
            json!({"tokens": 40, "token_delay": "1ms", "behavior": "reasoning"}),
        ),
        // Long enough that AI SDK readers reconnect while it runs.
        demo_model("ai", json!({"tokens": 80, "token_delay": "10ms"})),
    ]
}

async fn create_response(cl: &Cluster, r: usize, text: &str, model: &str) -> String {
    let (s, v) = cl
        .post(
            r,
            "/v1/responses",
            json!({"model": model, "input": text, "background": true}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_resume_across_three_replicas_120_plans() {
    const PLANS: usize = 120;
    const READERS_PER_JOB: usize = 5;
    let started_at = Instant::now();
    let cl = cluster(models()).await;
    let addrs: Vec<SocketAddr> = cl.replicas.iter().map(|r| r.addr).collect();
    let (runs, finished_by_ms) = drive_plans(
        &plans(PLANS, 12),
        READERS_PER_JOB,
        Duration::from_secs(60),
        async |i, finished| {
            let text = format!("{} {i}", if finished { "finished" } else { "running" });
            create_response(&cl, A, &text, MODELS[i % 3]).await
        },
        async |id| {
            read_all(
                &cl.http,
                &cl.url(A, &format!("/v1/responses/{id}?stream=true")),
            )
            .await;
        },
        async |id, plan, finished| {
            read_responses(cl.http.clone(), addrs.clone(), id, plan, finished).await
        },
    )
    .await;

    // References: one uninterrupted read per replica after the end, byte-identical.
    let mut ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), PLANS / READERS_PER_JOB);
    let mut references: HashMap<String, Vec<Frame>> = HashMap::new();
    let mut finished_ms: HashMap<String, u64> = HashMap::new();
    for id in &ids {
        let path = format!("/v1/responses/{id}?stream=true");
        let reference = read_all(&cl.http, &cl.url(A, &path)).await;
        for r in [B, C] {
            assert_eq!(
                read_all(&cl.http, &cl.url(r, &path)).await,
                reference,
                "replica {r} serves another stream of {id}"
            );
        }
        assert_eq!(
            reference.iter().filter(|f| f.is_terminal()).count(),
            1,
            "{id}"
        );
        assert_eq!(
            reference.last().unwrap().event.as_deref(),
            Some("response.completed")
        );
        let (_, object) = cl.get(A, &format!("/v1/responses/{id}")).await;
        assert_eq!(object["status"], "completed", "{object}");
        for r in [B, C] {
            assert_eq!(cl.get(r, &format!("/v1/responses/{id}")).await.1, object);
        }
        finished_ms.insert(id.clone(), finished_at(&cl, &stream_id_of(id)).await);
        references.insert(id.clone(), reference);
    }

    let mut live_readers = 0;
    let mut replicas_used = [0usize; 3];
    for run in &runs {
        check_responses(&run.frames, &references[&run.id], &run.plan);
        let fin = finished_ms[&run.id];
        if run.finished_group {
            assert!(fin <= finished_by_ms && run.first_connect_ms >= finished_by_ms);
        } else if run.first_connect_ms < fin {
            live_readers += 1;
        }
        for s in &run.plan.steps {
            replicas_used[s.replica] += 1;
        }
    }
    eprintln!(
        "{PLANS} Responses plans over 3 replicas in {:?}: {live_readers} readers joined a \
         running job; connections per replica {replicas_used:?}",
        started_at.elapsed()
    );
    assert!(
        live_readers >= PLANS / 10,
        "too few readers joined a running job ({live_readers}); the test lost its point"
    );
    assert!(replicas_used.iter().all(|&n| n > 20));
}

// ---------------------------------------------------------------------------------
// AI SDK: a reconnect replays the message from its start while the job runs.

/// What one connection of an AI SDK reader got.
struct AiConnection {
    replica: usize,
    status: u16,
    /// When its answer arrived (ms since the epoch).
    at_ms: u64,
    frames: Vec<Frame>,
}

/// Follows `plan` until a connection reads the stream to `[DONE]` or is answered 204.
async fn read_ai_sdk(
    http: reqwest::Client,
    addrs: Vec<SocketAddr>,
    chat: String,
    plan: Plan,
) -> (String, Plan, Vec<AiConnection>) {
    tokio::time::sleep(Duration::from_millis(plan.join_after_ms)).await;
    let mut connections = Vec::new();
    for step in plan.steps() {
        let url = format!("http://{}/api/ai/chat/{chat}/stream", addrs[step.replica]);
        let (status, frames) = connection(&http, &url, step.frames).await;
        assert!(status == 200 || status == 204, "{status} from {url}");
        let done = status == 204 || frames.last().is_some_and(Frame::is_terminal);
        connections.push(AiConnection {
            replica: step.replica,
            status,
            at_ms: now_ms(),
            frames,
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(step.pause_ms)).await;
    }
    (chat, plan, connections)
}

/// Starts a chat on replica `r` and reads its whole answer (the uninterrupted
/// stream), signalling `started` once the answer began; the job's stream id and the
/// answer.
async fn ai_chat(
    cl: &Cluster,
    r: usize,
    chat: &str,
    started: tokio::sync::oneshot::Sender<()>,
) -> (String, Vec<Frame>) {
    let resp = cl
        .http
        .post(cl.url(r, "/api/ai/chat"))
        .bearer_auth(token(USER))
        .json(&json!({"id": chat, "model": "ai", "messages": [
            {"id": "u1", "role": "user", "parts": [{"type": "text", "text": chat}]}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stream_id = resp.headers()["x-genstream-stream-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = started.send(());
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        frames.extend(take_frames(&mut buf));
    }
    assert!(frames.last().is_some_and(Frame::is_terminal), "{chat}");
    (stream_id, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_sdk_resume_across_three_replicas_60_plans() {
    const PLANS: usize = 60;
    const READERS_PER_JOB: usize = 5;
    let started_at = Instant::now();
    let cl = cluster(models()).await;
    let addrs: Vec<SocketAddr> = cl.replicas.iter().map(|r| r.addr).collect();
    let run = uuid::Uuid::now_v7().simple().to_string();

    let cl_ref = &cl;
    let addrs_ref = &addrs;
    let jobs = plans(PLANS, 40)
        .chunks(READERS_PER_JOB)
        .enumerate()
        .map(|(i, chunk)| {
            let chat = format!("proj-{run}-{i}");
            let chunk = chunk.to_vec();
            async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let reference = ai_chat(cl_ref, A, &chat, tx);
                let readers = async {
                    rx.await.unwrap();
                    futures::future::join_all(chunk.into_iter().map(|p| {
                        read_ai_sdk(cl_ref.http.clone(), addrs_ref.clone(), chat.clone(), p)
                    }))
                    .await
                };
                futures::future::join(reference, readers).await
            }
        })
        .collect::<Vec<_>>();
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        futures::stream::iter(jobs)
            .buffer_unordered(4)
            .collect::<Vec<_>>(),
    )
    .await
    .expect("every reader reaches the end within 60 s");

    let mut full_replays = [0usize; 3];
    let mut prefixes = 0;
    let mut no_content = 0;
    for ((stream_id, reference), readers) in &results {
        let fin = finished_at(&cl, stream_id).await;
        assert_eq!(
            reference.iter().filter(|f| f.is_terminal()).count(),
            1,
            "one [DONE]"
        );
        assert_eq!(reference[0].data["type"], "start", "{:?}", reference[0]);
        for (chat, plan, connections) in readers {
            for c in connections {
                if c.status == 204 {
                    assert!(
                        c.at_ms >= fin,
                        "204 before the job ended ({} < {fin}) on replica {}; plan {plan:?}",
                        c.at_ms,
                        c.replica
                    );
                    no_content += 1;
                    continue;
                }
                assert!(
                    c.frames.len() <= reference.len()
                        && c.frames[..] == reference[..c.frames.len()],
                    "replica {} replayed something else than the stream's start; \
                     plan {plan:?}",
                    c.replica
                );
                if c.frames.len() == reference.len() {
                    full_replays[c.replica] += 1;
                } else {
                    prefixes += 1;
                }
            }
            let last = connections.last().unwrap();
            assert!(
                last.status == 204 || last.frames.len() == reference.len(),
                "reader {chat} ended without the whole answer or a 204; plan {plan:?}"
            );
        }
    }
    // Once the jobs ended, every replica answers 204.
    for (i, _) in results.iter().enumerate() {
        for r in [A, B, C] {
            let url = cl.url(r, &format!("/api/ai/chat/proj-{run}-{i}/stream"));
            assert_eq!(connection(&cl.http, &url, 0).await.0, 204, "{url}");
        }
    }
    eprintln!(
        "{PLANS} AI SDK plans over 3 replicas in {:?}: whole replays per replica \
         {full_replays:?}, {prefixes} dropped prefixes, {no_content} 204s after the end",
        started_at.elapsed()
    );
    assert!(
        full_replays.iter().all(|&n| n > 0),
        "every replica replayed a whole running answer at least once: {full_replays:?}"
    );
    assert!(
        prefixes >= PLANS / 2,
        "too few reconnects while running: {prefixes}"
    );
}

// ---------------------------------------------------------------------------------
// Chat Completions: nothing to reattach to, the same object everywhere.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_is_the_same_object_on_every_replica() {
    let cl = cluster(models()).await;
    let resp = cl
        .http
        .post(cl.url(A, "/v1/chat/completions"))
        .bearer_auth(token(USER))
        .json(&json!({"model": "reasoning", "stream": true,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    let mut buf = bytes.to_vec();
    let chunks = take_frames(&mut buf);
    assert_eq!(chunks.last().unwrap().data, "[DONE]");
    let chunks = &chunks[..chunks.len() - 1];
    let text: String = chunks
        .iter()
        .filter_map(|c| c.data["choices"][0]["delta"]["content"].as_str())
        .collect();
    let id = chunks[0].data["id"].as_str().unwrap();
    let (s, object) = cl.get(A, &format!("/v1/chat/completions/{id}")).await;
    assert_eq!(s, 200, "{object}");
    assert_eq!(object["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(object["choices"][0]["finish_reason"], "stop");
    for r in [B, C] {
        assert_eq!(
            cl.get(r, &format!("/v1/chat/completions/{id}")).await,
            (200, object.clone()),
            "replica {r}"
        );
    }
}
