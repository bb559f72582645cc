//! The HTTP surface in-process (`oneshot`): every route's auth (401/403), bad input
//! (400/413, never 5xx), the stream route's pre-header errors and headers, abort and
//! the conversation routes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

async fn call(
    app: &TestApp,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

async fn start(app: &TestApp, user: &str, body: Value) -> Value {
    let (s, v) = call(
        app,
        "POST",
        "/api/chat",
        Some(&token(user)),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn read_stream(app: &TestApp, uri: &str, user: &str) -> Vec<SseFrame> {
    let req = Request::get(uri)
        .header("authorization", format!("Bearer {}", token(user)))
        .body(Body::empty())
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    take_frames(&mut bytes.to_vec())
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/chat"),
    ("GET", "/api/chat/stream/x"),
    ("GET", "/api/chat/active"),
    ("GET", "/api/chat/status/x"),
    ("POST", "/api/chat/abort"),
    ("GET", "/api/conversations"),
    ("GET", "/api/conversations/x"),
    ("GET", "/api/conversations/x/messages"),
    ("DELETE", "/api/conversations/x"),
    ("GET", "/api/models"),
    ("GET", "/api/balance"),
    ("GET", "/api/usage"),
];

#[tokio::test]
async fn every_api_route_needs_a_valid_token() {
    let app = test_app(default_models());
    let expired = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        encode(
            &Header::default(),
            &json!({"sub": "alice", "exp": 1, "iat": 0}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let wrong_key = genstream_server::auth::JwtKeys::new("another-secret")
        .mint("alice", std::time::Duration::from_secs(60))
        .unwrap();
    for (method, uri) in ROUTES {
        for tok in [
            None,
            Some(expired.as_str()),
            Some(wrong_key.as_str()),
            Some("garbage"),
        ] {
            let (s, v) = call(&app, method, uri, tok, Some("{}")).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} with {tok:?}: {v}"
            );
            assert_eq!(v["error"]["code"], "unauthorized");
        }
    }
    // Health routes are open.
    assert_eq!(
        call(&app, "GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/readyz", None, None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn another_users_job_and_conversation_are_forbidden() {
    let app = test_app(default_models());
    let started = start(&app, "alice", json!({"text": "hi", "model": "slow"})).await;
    let sid = started["streamId"].as_str().unwrap();
    let cid = started["conversationId"].as_str().unwrap();
    let bob = token("bob");
    for (method, uri, body) in [
        ("GET", format!("/api/chat/stream/{sid}"), None),
        ("GET", format!("/api/chat/status/{cid}"), None),
        (
            "POST",
            "/api/chat/abort".to_string(),
            Some(json!({"streamId": sid}).to_string()),
        ),
        (
            "POST",
            "/api/chat/abort".to_string(),
            Some(json!({"conversationId": cid}).to_string()),
        ),
        ("GET", format!("/api/conversations/{cid}"), None),
        ("GET", format!("/api/conversations/{cid}/messages"), None),
        ("DELETE", format!("/api/conversations/{cid}"), None),
        (
            "POST",
            "/api/chat".to_string(),
            Some(json!({"text": "x", "conversationId": cid}).to_string()),
        ),
    ] {
        let (s, v) = call(&app, method, &uri, Some(&bob), body.as_deref()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {uri}: {v}");
        assert_eq!(v["error"]["code"], "forbidden");
    }
    // The stream route also takes ?access_token=, and checks it the same way.
    let (s, _) = call(
        &app,
        "GET",
        &format!("/api/chat/stream/{sid}?access_token={bob}"),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Bob sees none of it.
    let (_, v) = call(&app, "GET", "/api/conversations", Some(&bob), None).await;
    assert_eq!(v["conversations"], json!([]));
    let (_, v) = call(&app, "GET", "/api/chat/active", Some(&bob), None).await;
    assert_eq!(v["activeJobIds"], json!([]));
    let (s, _) = call(
        &app,
        "POST",
        "/api/chat/abort",
        Some(&token("alice")),
        Some(&json!({"streamId": sid}).to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_never_a_5xx() {
    let app = test_app(default_models());
    let t = token("alice");
    let cases: &[(&str, &str, &str, StatusCode, &str)] = &[
        (
            "POST",
            "/api/chat",
            "{not json",
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        ("POST", "/api/chat", "{}", StatusCode::BAD_REQUEST, "text"),
        (
            "POST",
            "/api/chat",
            "{\"text\": 5}",
            StatusCode::BAD_REQUEST,
            "text",
        ),
        (
            "POST",
            "/api/chat",
            "{\"text\": \"   \"}",
            StatusCode::BAD_REQUEST,
            "text",
        ),
        (
            "POST",
            "/api/chat",
            "{\"text\": \"hi\", \"model\": \"nope\"}",
            StatusCode::BAD_REQUEST,
            "model",
        ),
        (
            "POST",
            "/api/chat",
            "{\"text\": \"hi\", \"tools\": \"calculator\"}",
            StatusCode::BAD_REQUEST,
            "tools",
        ),
        (
            "POST",
            "/api/chat",
            "[]",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "POST",
            "/api/chat",
            "",
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/chat",
            "{\"text\": \"hi\", \"conversationId\": \"nope\"}",
            StatusCode::NOT_FOUND,
            "conversation",
        ),
        (
            "POST",
            "/api/chat/abort",
            "{}",
            StatusCode::BAD_REQUEST,
            "streamId",
        ),
        (
            "POST",
            "/api/chat/abort",
            "{\"streamId\": \"nope\"}",
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            "GET",
            "/api/chat/stream/nope",
            "",
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            "GET",
            "/api/conversations/nope",
            "",
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            "GET",
            "/api/no-such-route",
            "",
            StatusCode::NOT_FOUND,
            "no route",
        ),
    ];
    for (method, uri, body, status, needle) in cases {
        let (s, v) = call(&app, method, uri, Some(&t), Some(body)).await;
        assert_eq!(s, *status, "{method} {uri} {body:?}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {uri} {body:?}: message {msg:?} lacks {needle:?}"
        );
    }
    // Over the body limit: 413 with a JSON error.
    let big = json!({"text": "x".repeat(MAX_BODY + 1)}).to_string();
    let (s, v) = call(&app, "POST", "/api/chat", Some(&t), Some(&big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    // Nothing was lost by the bad requests: no conversation was created.
    let (_, v) = call(&app, "GET", "/api/conversations", Some(&t), None).await;
    assert_eq!(v["conversations"], json!([]));
}

#[tokio::test]
async fn stream_errors_before_headers_are_json() {
    let app = test_app(default_models());
    let started = start(&app, "alice", json!({"text": "hi"})).await;
    let sid = started["streamId"].as_str().unwrap();
    let t = token("alice");
    // Wait for the end, then probe cursors.
    let frames = read_stream(&app, &format!("/api/chat/stream/{sid}"), "alice").await;
    let head = frames.last().unwrap().id.unwrap();
    let (s, v) = call(
        &app,
        "GET",
        &format!("/api/chat/stream/{sid}?cursor={}", head + 1),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "cursor_out_of_range");
    let (s, v) = call(
        &app,
        "GET",
        &format!("/api/chat/stream/{sid}?cursor=abc"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("cursor"));
    let req = Request::get(format!("/api/chat/stream/{sid}"))
        .header("authorization", format!("Bearer {t}"))
        .header("last-event-id", "-3")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.router.clone().oneshot(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // Headers of a good stream.
    let req = Request::get(format!("/api/chat/stream/{sid}?access_token={t}"))
        .body(Body::empty())
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache, no-transform");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    // The query cursor wins over Last-Event-ID.
    let req = Request::get(format!("/api/chat/stream/{sid}?cursor={}", head - 1))
        .header("authorization", format!("Bearer {t}"))
        .header("last-event-id", "0")
        .body(Body::empty())
        .unwrap();
    let bytes = app
        .router
        .clone()
        .oneshot(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let got = take_frames(&mut bytes.to_vec());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, Some(head));
}

#[tokio::test]
async fn finished_job_replays_and_resume_snapshot_excludes_terminal() {
    let app = test_app(default_models());
    let started = start(
        &app,
        "alice",
        json!({"text": "think first", "model": "reasoning"}),
    )
    .await;
    let sid = started["streamId"].as_str().unwrap();
    let all = read_stream(&app, &format!("/api/chat/stream/{sid}"), "alice").await;
    assert_eq!(all[0].event.as_deref(), Some("created"));
    assert!(is_terminal(all.last().unwrap()));
    for (i, f) in all.iter().enumerate() {
        assert_eq!(f.id, Some(i as u64));
        assert_eq!(f.data.as_ref().unwrap()["seq"], i as u64);
    }
    let resumed = read_stream(
        &app,
        &format!("/api/chat/stream/{sid}?resume=true"),
        "alice",
    )
    .await;
    assert_eq!(resumed.len(), 2, "sync + the terminal event");
    assert_eq!(resumed[0].event.as_deref(), Some("sync"));
    let sync = resumed[0].data.as_ref().unwrap();
    assert_eq!(sync["seq"], all.len() as u64 - 2);
    let final_msg = &all.last().unwrap().data.as_ref().unwrap()["data"]["responseMessage"];
    assert_eq!(
        sync["resumeState"]["aggregatedContent"],
        final_msg["content"]
    );
    assert_eq!(resumed[1], *all.last().unwrap());
    // The content stops before the terminal event, the status does not.
    assert_eq!(sync["resumeState"]["status"], "complete");
    // The reasoning model's content has a think part and then text.
    assert_eq!(final_msg["content"][0]["type"], "think");
    assert_eq!(final_msg["content"][1]["type"], "text");

    let cid = started["conversationId"].as_str().unwrap();
    let (s, status) = call(
        &app,
        "GET",
        &format!("/api/chat/status/{cid}"),
        Some(&token("alice")),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(status["active"], false, "{status}");
    assert_eq!(status["status"], "complete");
    assert_eq!(status["resumeState"]["status"], "complete", "{status}");
}

/// A client that already holds the terminal event (an EventSource reconnecting with
/// the last id it saw) gets 204, which stops EventSource's reconnect loop, instead of
/// an open stream that would only ever carry pings.
#[tokio::test]
async fn cursor_at_the_terminal_event_is_204_and_ends_at_once() {
    let app = test_app(default_models());
    let started = start(&app, "alice", json!({"text": "hi"})).await;
    let sid = started["streamId"].as_str().unwrap();
    let all = read_stream(&app, &format!("/api/chat/stream/{sid}"), "alice").await;
    let last = all.last().unwrap().id.unwrap();
    for uri in [
        format!("/api/chat/stream/{sid}?cursor={last}"),
        format!("/api/chat/stream/{sid}?cursor={last}&resume=false"),
    ] {
        let req = Request::get(&uri)
            .header("authorization", format!("Bearer {}", token("alice")))
            .body(Body::empty())
            .unwrap();
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            app.router.clone().oneshot(req),
        )
        .await
        .expect("answered at once")
        .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{uri}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty());
    }
    // The same cursor given as Last-Event-ID.
    let req = Request::get(format!("/api/chat/stream/{sid}"))
        .header("authorization", format!("Bearer {}", token("alice")))
        .header("last-event-id", last.to_string())
        .body(Body::empty())
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // One before the end still gets the terminal event, and then the stream ends.
    let prev = read_stream(
        &app,
        &format!("/api/chat/stream/{sid}?cursor={}", last - 1),
        "alice",
    )
    .await;
    assert_eq!(prev.len(), 1);
    assert!(is_terminal(&prev[0]));
}

/// docs/protocol.md §4 asks only for `sub` and `exp`; a token from another issuer without `iat`
/// must work.
#[tokio::test]
async fn a_token_with_only_sub_and_exp_is_accepted() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let app = test_app(default_models());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let tok = encode(
        &Header::default(),
        &json!({"sub": "carol", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (s, v) = call(&app, "GET", "/api/conversations", Some(&tok), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Without `exp` it is refused.
    let no_exp = encode(
        &Header::default(),
        &json!({"sub": "carol"}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (s, _) = call(&app, "GET", "/api/conversations", Some(&no_exp), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// `?access_token=` is for EventSource, so only the stream route takes it; and there
/// it is checked like a header token.
#[tokio::test]
async fn access_token_query_only_on_the_stream_route_and_checked_there() {
    let app = test_app(default_models());
    let started = start(&app, "alice", json!({"text": "hi"})).await;
    let sid = started["streamId"].as_str().unwrap();
    let good = token("alice");
    let wrong_key = genstream_server::auth::JwtKeys::new("another-secret")
        .mint("alice", std::time::Duration::from_secs(60))
        .unwrap();
    let expired = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        encode(
            &Header::default(),
            &json!({"sub": "alice", "exp": 1}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    for (method, uri) in ROUTES {
        if uri.starts_with("/api/chat/stream") {
            continue;
        }
        let sep = if uri.contains('?') { '&' } else { '?' };
        let (s, v) = call(
            &app,
            method,
            &format!("{uri}{sep}access_token={good}"),
            None,
            Some("{}"),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri}: {v}");
    }
    let stream = format!("/api/chat/stream/{sid}");
    for bad in [wrong_key.as_str(), expired.as_str(), "garbage"] {
        let (s, v) = call(
            &app,
            "GET",
            &format!("{stream}?access_token={bad}"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    }
    let frames = {
        let req = Request::get(format!("{stream}?access_token={good}"))
            .body(Body::empty())
            .unwrap();
        let resp = app.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        take_frames(&mut bytes.to_vec())
    };
    assert!(is_terminal(frames.last().unwrap()));
}

#[tokio::test]
async fn a_known_path_with_the_wrong_method_is_a_json_405() {
    let app = test_app(default_models());
    for (method, uri) in [
        ("GET", "/api/chat"),
        ("PUT", "/api/chat/abort"),
        ("POST", "/api/conversations"),
        ("DELETE", "/healthz"),
    ] {
        let (s, v) = call(&app, method, uri, Some(&token("alice")), None).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_eq!(
            v["error"]["code"], "method_not_allowed",
            "{method} {uri}: {v}"
        );
    }
}

#[test]
fn titles_are_the_first_50_characters_on_one_line() {
    use genstream_engine::manager::title_of;
    let long: String = "é".repeat(60);
    assert_eq!(title_of(&long).chars().count(), 50);
    assert_eq!(title_of("short"), "short");
    assert_eq!(
        title_of("  line one\n\tline   two  "),
        "line one line two",
        "whitespace runs become one space"
    );
    let exactly: String = "x".repeat(50);
    assert_eq!(title_of(&format!("{exactly}tail")), exactly);
}

#[tokio::test]
async fn abort_status_active_and_conversation_routes() {
    let app = test_app(default_models());
    let t = token("alice");
    let started = start(
        &app,
        "alice",
        json!({"text": "a long one please", "model": "slow"}),
    )
    .await;
    let sid = started["streamId"].as_str().unwrap().to_string();
    let cid = started["conversationId"].as_str().unwrap().to_string();
    // The abort below must find a partial answer: wait until there is text.
    let server = genstream_test_support::Served::start(app.router.clone()).await;
    genstream_test_support::wait_for_text(&server.url, &t, &sid).await;
    let (_, active) = call(&app, "GET", "/api/chat/active", Some(&t), None).await;
    assert_eq!(active["activeJobIds"], json!([sid]));
    let (_, status) = call(
        &app,
        "GET",
        &format!("/api/chat/status/{cid}"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(status["active"], true);
    assert_eq!(status["streamId"], sid);
    // Busy conversation.
    let (s, v) = call(
        &app,
        "POST",
        "/api/chat",
        Some(&t),
        Some(&json!({"text": "again", "conversationId": cid}).to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "conversation_busy");
    // Delete while running: 409.
    assert_eq!(
        call(
            &app,
            "DELETE",
            &format!("/api/conversations/{cid}"),
            Some(&t),
            None
        )
        .await
        .0,
        StatusCode::CONFLICT
    );
    // Abort: the partial answer comes back, saved.
    let (s, ab) = call(
        &app,
        "POST",
        "/api/chat/abort",
        Some(&t),
        Some(&json!({"streamId": sid}).to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ab}");
    assert_eq!(ab["success"], true);
    assert_eq!(ab["aborted"], sid);
    assert_eq!(ab["responseMessage"]["unfinished"], true);
    assert!(!ab["responseMessage"]["text"].as_str().unwrap().is_empty());
    let (_, msgs) = call(
        &app,
        "GET",
        &format!("/api/conversations/{cid}/messages"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(msgs["messages"][1], ab["responseMessage"]);
    // Repeat: same answer.
    let (s, again) = call(
        &app,
        "POST",
        "/api/chat/abort",
        Some(&t),
        Some(&json!({"conversationId": cid}).to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again, ab);
    // Follow-up on the aborted response, at once.
    let follow = start(&app, "alice", json!({"text": "go on", "conversationId": cid, "parentMessageId": ab["responseMessage"]["messageId"]})).await;
    let frames = read_stream(
        &app,
        &format!("/api/chat/stream/{}", follow["streamId"].as_str().unwrap()),
        "alice",
    )
    .await;
    assert_eq!(frames.last().unwrap().event.as_deref(), Some("final"));
    // Abort of a completed job: 409.
    let (s, v) = call(
        &app,
        "POST",
        "/api/chat/abort",
        Some(&t),
        Some(&json!({"streamId": follow["streamId"]}).to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "job_finished");
    // Conversation routes.
    let (_, list) = call(&app, "GET", "/api/conversations", Some(&t), None).await;
    assert_eq!(list["conversations"][0]["conversationId"], cid);
    assert_eq!(list["conversations"][0]["title"], "a long one please");
    let (_, msgs) = call(
        &app,
        "GET",
        &format!("/api/conversations/{cid}/messages"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(msgs["messages"].as_array().unwrap().len(), 4);
    assert_eq!(
        msgs["messages"][2]["parentMessageId"],
        ab["responseMessage"]["messageId"]
    );
    let (s, _) = call(
        &app,
        "DELETE",
        &format!("/api/conversations/{cid}"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        call(
            &app,
            "GET",
            &format!("/api/conversations/{cid}"),
            Some(&t),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let (_, models) = call(&app, "GET", "/api/models", Some(&t), None).await;
    assert_eq!(models["models"][0]["name"], "demo");
    assert_eq!(models["models"][0]["provider"], "demo");
}

#[tokio::test(start_paused = true)]
async fn idle_streams_get_keepalive_comments_every_15s() {
    let app = test_app(vec![demo(
        "stall",
        json!({"tokens": 50, "token_delay": "1ms", "behavior": "stall"}),
    )]);
    let started = start(&app, "alice", json!({"text": "hang"})).await;
    let sid = started["streamId"].as_str().unwrap();
    let req = Request::get(format!("/api/chat/stream/{sid}"))
        .header("authorization", format!("Bearer {}", token("alice")))
        .body(Body::empty())
        .unwrap();
    let mut body = app.router.clone().oneshot(req).await.unwrap().into_body();
    let t0 = tokio::time::Instant::now();
    let mut pings = Vec::new();
    while pings.len() < 2 {
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        if frame.as_ref() == b": ping\n\n" {
            pings.push(t0.elapsed());
        }
    }
    // Paused time: the pings come at 15 s and 30 s of stream idleness.
    assert!(
        pings[0] >= std::time::Duration::from_secs(15)
            && pings[0] < std::time::Duration::from_secs(16),
        "{pings:?}"
    );
    assert!(
        pings[1] >= std::time::Duration::from_secs(30)
            && pings[1] < std::time::Duration::from_secs(31),
        "{pings:?}"
    );
}

/// Every stream opens with the SSE `retry:` field (`http.sse_retry`, 1000 ms by
/// default), before any event or snapshot: a browser's EventSource then reconnects
/// after that long rather than its own default of about three seconds.
#[tokio::test]
async fn streams_open_with_the_configured_retry_field() {
    async fn raw(router: &axum::Router, uri: &str) -> String {
        let req = Request::get(uri)
            .header("authorization", format!("Bearer {}", token("alice")))
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
    let app = test_app(default_models());
    let sid = start(&app, "alice", json!({"text": "hi"})).await["streamId"]
        .as_str()
        .unwrap()
        .to_string();
    let stream = format!("/api/chat/stream/{sid}");

    let body = raw(&app.router, &stream).await;
    assert!(
        body.starts_with("retry: 1000\n\nid: 0\nevent: created\n"),
        "{body:.80}"
    );
    // The snapshot follows the field, as the next block.
    let body = raw(&app.router, &format!("{stream}?resume=true")).await;
    assert!(body.starts_with("retry: 1000\n\nid: "), "{body:.80}");
    assert!(body.contains("\nevent: sync\n"), "{body:.200}");
    // The field dispatches no event: the frames parsed are the log's, from seq 0.
    let frames = read_stream(&app, &stream, "alice").await;
    assert_eq!(frames[0].id, Some(0));

    // The configured value is what is sent, in milliseconds.
    let mut state = app.state.clone();
    state.sse_retry = std::time::Duration::from_millis(2500);
    let router = genstream_server::app(state, MAX_BODY);
    let body = raw(&router, &format!("{stream}?cursor=3")).await;
    assert!(body.starts_with("retry: 2500\n\nid: 4\n"), "{body:.80}");
}

/// `DELETE /api/conversations/{id}` raced against `POST /api/chat` in the same
/// conversation, 100 times: the delete is 409 `conversation_busy` (the job runs, the
/// conversation keeps its messages) or the chat is 404 (the conversation is gone,
/// nothing written). Never both 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_racing_a_chat_is_409_or_the_chat_is_404() {
    let app = std::sync::Arc::new(test_app(default_models()));
    let t = token("alice");
    let (mut refused, mut deleted) = (0, 0);
    for round in 0..100 {
        let first = start(&app, "alice", json!({"text": "first", "model": "demo"})).await;
        let cid = first["conversationId"].as_str().unwrap().to_string();
        // Let the first turn end, so only the racing chat can be running.
        let frames = read_stream(
            &app,
            &format!("/api/chat/stream/{}", first["streamId"].as_str().unwrap()),
            "alice",
        )
        .await;
        assert_eq!(frames.last().unwrap().event.as_deref(), Some("final"));
        let body = json!({"text": "again", "model": "slow", "conversationId": cid}).to_string();
        let chat = tokio::spawn({
            let (app, t) = (app.clone(), t.clone());
            async move { call(&app, "POST", "/api/chat", Some(&t), Some(&body)).await }
        });
        let delete = tokio::spawn({
            let (app, t, uri) = (app.clone(), t.clone(), format!("/api/conversations/{cid}"));
            async move { call(&app, "DELETE", &uri, Some(&t), None).await }
        });
        let ((cs, cv), (ds, dv)) = (chat.await.unwrap(), delete.await.unwrap());
        match (cs, ds) {
            (StatusCode::OK, StatusCode::CONFLICT) => {
                refused += 1;
                assert_eq!(dv["error"]["code"], "conversation_busy", "{dv}");
                let abort = json!({"streamId": cv["streamId"]}).to_string();
                let (s, v) = call(&app, "POST", "/api/chat/abort", Some(&t), Some(&abort)).await;
                assert_eq!(s, StatusCode::OK, "{v}");
                assert_eq!(v["responseMessage"]["unfinished"], true, "{v}");
                let (s, v) = call(
                    &app,
                    "GET",
                    &format!("/api/conversations/{cid}/messages"),
                    Some(&t),
                    None,
                )
                .await;
                assert_eq!(s, StatusCode::OK);
                assert_eq!(v["messages"].as_array().unwrap().len(), 4, "{v}");
            }
            (StatusCode::NOT_FOUND, StatusCode::OK) => {
                deleted += 1;
                assert_eq!(dv["deleted"], true);
                let (s, _) = call(
                    &app,
                    "GET",
                    &format!("/api/conversations/{cid}"),
                    Some(&t),
                    None,
                )
                .await;
                assert_eq!(s, StatusCode::NOT_FOUND);
            }
            other => panic!("round {round}: {other:?}: chat {cv}, delete {dv}"),
        }
    }
    app.state.manager.wait_idle().await;
    assert_eq!(refused + deleted, 100);
    eprintln!("delete refused {refused}, chat refused {deleted}");
}
