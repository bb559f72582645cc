//! Fan-out and lifecycle over real loopback HTTP: 50 subscribers joining before,
//! during and after a generation receive byte-identical streams; concurrent aborts
//! produce one terminal event and one answer; a new turn in the same conversation gets
//! a new log starting at seq 0 while old subscribers are unaffected (docs/lessons.md: LibreChat
//! #13117, #14411); cursors compare as integers (LangGraph #8112).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use genstream_test_support::{Served, wait_for_text};
use serde_json::{Value, json};

/// `app`'s router on a free port, until the returned server is dropped.
async fn serve(app: &TestApp) -> Served {
    Served::start(app.router.clone()).await
}

async fn post(base: &str, user: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token(user))
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

async fn read_all(base: &str, stream_id: &str, query: &str) -> Vec<u8> {
    let r = reqwest::Client::new()
        .get(format!("{base}/api/chat/stream/{stream_id}{query}"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut out = Vec::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_subscribers_before_during_after_get_identical_bytes() {
    let app = test_app(vec![demo(
        "demo",
        json!({"tokens": 60, "token_delay": "2ms", "first_token_delay": "40ms"}),
    )]);
    let server = serve(&app).await;
    let base = server.url.clone();
    let (_, started) = post(&base, "alice", "/api/chat", json!({"text": "fan out"})).await;
    let sid = started["streamId"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let (base, sid) = (base.clone(), sid.clone());
        tasks.push(tokio::spawn(async move {
            // 0 ms: before the first token; up to ~250 ms: during; the last ones after.
            tokio::time::sleep(Duration::from_millis(i * i / 4)).await;
            read_all(&base, &sid, "").await
        }));
    }
    let results: Vec<Vec<u8>> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let reference = read_all(&base, &sid, "").await;
    let frames = take_frames(&mut reference.clone());
    assert!(is_terminal(frames.last().unwrap()));
    assert!(frames.len() > 60);
    for (i, r) in results.iter().enumerate() {
        let got: Vec<SseFrame> = take_frames(&mut r.clone())
            .into_iter()
            .filter(|f| !f.comment)
            .collect();
        assert_eq!(got, frames, "subscriber {i} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_aborts_give_one_terminal_and_one_answer() {
    let app = test_app(vec![demo(
        "slow",
        json!({"tokens": 100000, "token_delay": "5ms"}),
    )]);
    let server = serve(&app).await;
    let base = server.url.clone();
    let (_, started) = post(&base, "alice", "/api/chat", json!({"text": "stop me"})).await;
    let sid = started["streamId"].as_str().unwrap().to_string();
    // Abort mid-answer, once the job has streamed text.
    wait_for_text(&base, &token("alice"), &sid).await;
    let aborts = (0..10).map(|_| {
        let (base, sid) = (base.clone(), sid.clone());
        tokio::spawn(async move {
            post(&base, "alice", "/api/chat/abort", json!({"streamId": sid})).await
        })
    });
    let answers: Vec<(u16, Value)> = futures::future::join_all(aborts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for (s, v) in &answers {
        assert_eq!(*s, 200, "{v}");
        assert_eq!(
            v, &answers[0].1,
            "every abort returns the same saved answer"
        );
    }
    let frames = take_frames(&mut read_all(&base, &sid, "").await);
    assert_eq!(frames.iter().filter(|f| is_terminal(f)).count(), 1);
    let fin = frames.last().unwrap().data.as_ref().unwrap();
    assert_eq!(fin["data"]["status"], "aborted");
    assert_eq!(
        fin["data"]["responseMessage"],
        answers[0].1["responseMessage"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_has_its_own_log_and_cursors_are_integers() {
    let app = test_app(vec![demo(
        "demo",
        json!({"tokens": 20, "token_delay": "0ms"}),
    )]);
    let server = serve(&app).await;
    let base = server.url.clone();
    let (_, first) = post(&base, "alice", "/api/chat", json!({"text": "turn one"})).await;
    let sid1 = first["streamId"].as_str().unwrap().to_string();
    let turn1 = read_all(&base, &sid1, "").await;
    let (_, second) = post(
        &base,
        "alice",
        "/api/chat",
        json!({"text": "turn two", "conversationId": first["conversationId"]}),
    )
    .await;
    let sid2 = second["streamId"].as_str().unwrap().to_string();
    assert_ne!(sid1, sid2);
    let frames2 = take_frames(&mut read_all(&base, &sid2, "").await);
    assert_eq!(frames2[0].id, Some(0), "a new turn's log starts at seq 0");
    assert_eq!(
        frames2[0].data.as_ref().unwrap()["data"]["streamId"],
        sid2.as_str()
    );
    // The first turn's log is untouched by the second.
    assert_eq!(read_all(&base, &sid1, "").await, turn1);
    // Integer comparison: after 9 comes 10 (as strings, "10" < "9").
    let after9 = take_frames(&mut read_all(&base, &sid2, "?cursor=9").await);
    assert_eq!(after9[0].id, Some(10));
    assert_eq!(after9.len(), frames2.len() - 10);
}

/// A subscriber that is behind takes runs of consecutive frames as one chunk
/// (`http.sse_chunk_bytes`): from any cursor of a finished job of a few hundred
/// events, the body is byte for byte the log's frames after that cursor, the same as
/// with one frame per chunk, and it ends right after the terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_frames_give_the_same_bytes_as_one_frame_per_chunk() {
    let app = test_app(vec![demo(
        "demo",
        json!({"tokens": 400, "token_delay": "0ms"}),
    )]);
    let batched = serve(&app).await;
    let single = Served::start(genstream_server::app(
        genstream_server::AppState {
            sse_chunk_bytes: 0,
            ..app.state.clone()
        },
        MAX_BODY,
    ))
    .await;
    let (_, started) = post(&batched.url, "alice", "/api/chat", json!({"text": "runs"})).await;
    let sid = started["streamId"].as_str().unwrap().to_string();
    // Read once to the end, so the job is finished and its whole log sealed.
    read_all(&batched.url, &sid, "").await;
    let (_, log) = app.state.manager.job_for("alice", &sid).await.unwrap();
    let frames = log.read_after(None, usize::MAX).frames;
    assert!(frames.len() > 400);
    let head = frames.len() as u64 - 1;
    for cursor in [
        None,
        Some(0),
        Some(1),
        Some(57),
        Some(head / 2),
        Some(head - 1),
    ] {
        let query = cursor.map_or(String::new(), |c| format!("?cursor={c}"));
        let expected: Vec<u8> = frames[cursor.map_or(0, |c| c as usize + 1)..]
            .iter()
            .flat_map(|f| f.bytes.to_vec())
            .collect();
        for base in [&batched.url, &single.url] {
            let body = read_all(base, &sid, &query).await;
            let events = body
                .strip_prefix(b"retry: 1000\n\n".as_slice())
                .expect("the stream opens with retry:");
            assert!(
                events == expected.as_slice(),
                "cursor {cursor:?} on {base}: {} bytes, expected {}",
                events.len(),
                expected.len()
            );
        }
    }
}
