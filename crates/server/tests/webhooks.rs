//! Job-finished webhooks (`genstream_server::webhooks`) against an axum receiver on
//! 127.0.0.1: one signed POST per ended job (complete, aborted), retried after a 503,
//! loopback refused without `allow_private`, and the job's end never waits for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use common::*;
use genstream_server::webhooks::sign;
use genstream_server::{Config, app};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify, mpsc};
use tower::ServiceExt;

const HOOK_SECRET: &str = "whsec-test-0123456789";

/// What the receiver answers, in order; the last one for every later request.
struct Receiver {
    url: String,
    got: mpsc::UnboundedReceiver<(HeaderMap, Bytes)>,
}

/// A receiver answering `statuses` in turn; when `gate` is set, each request waits
/// for it (`notify_one`) before answering, after reporting itself on `got`.
async fn receiver(statuses: Vec<u16>, gate: Option<Arc<Notify>>) -> Receiver {
    let (tx, got) = mpsc::unbounded_channel();
    let statuses = Arc::new(Mutex::new(statuses));
    let handler = move |headers: HeaderMap, body: Bytes| {
        let tx = tx.clone();
        let statuses = statuses.clone();
        let gate = gate.clone();
        async move {
            let _ = tx.send((headers, body));
            if let Some(g) = gate {
                g.notified().await;
            }
            let mut s = statuses.lock().await;
            let code = if s.len() > 1 { s.remove(0) } else { s[0] };
            StatusCode::from_u16(code).unwrap()
        }
    };
    let router = Router::new().route("/hook", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Receiver {
        url: format!("http://{addr}/hook"),
        got,
    }
}

async fn server(allow_private: bool) -> TestApp {
    let config = json!({
        "bind": "127.0.0.1:0",
        "store": "memory",
        "database": "sqlite::memory:",
        "auth": {"jwt_secret": SECRET},
        "limits": {"concurrent_per_user": 0, "messages_per_user_per_minute": 0,
            "messages_per_ip_per_minute": 0},
        "webhooks": {"secret": HOOK_SECRET, "allow_private": allow_private,
            "retry_for": "30s"},
        "models": [
            {"name": "demo", "provider": "demo",
                "options": {"tokens": 20, "token_delay": "1ms"}},
            {"name": "slow", "provider": "demo",
                "options": {"tokens": 2000, "token_delay": "20ms"}},
        ],
    });
    let config: Config = serde_json::from_value(config).expect("config");
    let state = genstream_server::serve::build_state(&config)
        .await
        .expect("build_state")
        .0;
    let router = app(state.clone(), MAX_BODY);
    TestApp {
        state,
        router,
        db: Default::default(),
    }
}

async fn call(app: &TestApp, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {}", token("alice")))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The job's whole log, read from its stream (which ends after the terminal event).
async fn log_of(app: &TestApp, stream_id: &str) -> Vec<SseFrame> {
    let req = Request::get(format!("/api/chat/stream/{stream_id}"))
        .header("authorization", format!("Bearer {}", token("alice")))
        .body(Body::empty())
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    take_frames(&mut bytes.to_vec())
}

/// Checks the `genstream-signature` header as docs/operations.md tells a receiver to,
/// and returns the body as JSON.
fn verified(headers: &HeaderMap, body: &[u8]) -> Value {
    let header = headers
        .get("genstream-signature")
        .expect("signature header")
        .to_str()
        .unwrap();
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .expect("t=…,v1=…");
    let t: u64 = t.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(t) < 300, "timestamp {t} is not recent");
    assert_eq!(v1, sign(HOOK_SECRET, t, body), "signature");
    assert_ne!(v1, sign("another secret", t, body));
    serde_json::from_slice(body).unwrap()
}

async fn next(r: &mut Receiver) -> (HeaderMap, Bytes) {
    tokio::time::timeout(Duration::from_secs(30), r.got.recv())
        .await
        .expect("a webhook within 30 s")
        .expect("receiver open")
}

/// No second delivery: the manager has ended every job (so any delivery is spawned)
/// and a later job's hook arrived after it, in order.
async fn assert_no_more(app: &TestApp, r: &mut Receiver) {
    let (s, v) = call(
        app,
        "POST",
        "/api/chat",
        json!({"text": "marker", "webhookUrl": r.url}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (h, b) = next(r).await;
    let body = verified(&h, &b);
    assert_eq!(
        body["streamId"], v["streamId"],
        "a duplicate delivery came first"
    );
}

#[tokio::test]
async fn a_completed_job_posts_once_signed() {
    let app = server(true).await;
    let mut r = receiver(vec![200], None).await;
    let (s, started) = call(
        &app,
        "POST",
        "/api/chat",
        json!({"text": "hi", "webhookUrl": r.url}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{started}");
    let sid = started["streamId"].as_str().unwrap();
    let log = log_of(&app, sid).await;
    let last = log.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("final"));
    let (h, b) = next(&mut r).await;
    assert_eq!(h["content-type"], "application/json");
    let body = verified(&h, &b);
    let fin = &last.data.as_ref().unwrap()["data"];
    assert_eq!(
        body,
        json!({
            "streamId": sid,
            "conversationId": started["conversationId"],
            "status": "complete",
            "endReason": null,
            "responseMessageId": started["responseMessageId"],
            "usage": fin["usage"],
        })
    );
    assert!(body["usage"].is_object(), "{body}");
    assert_no_more(&app, &mut r).await;
}

#[tokio::test]
async fn an_aborted_job_posts_once() {
    let app = server(true).await;
    let mut r = receiver(vec![200], None).await;
    let (s, started) = call(
        &app,
        "POST",
        "/api/chat",
        json!({"text": "hi", "model": "slow", "webhookUrl": r.url}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{started}");
    let sid = started["streamId"].as_str().unwrap();
    let (s, v) = call(&app, "POST", "/api/chat/abort", json!({"streamId": sid})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (h, b) = next(&mut r).await;
    let body = verified(&h, &b);
    assert_eq!(body["streamId"], sid);
    assert_eq!(body["conversationId"], started["conversationId"]);
    assert_eq!(body["status"], "aborted");
    assert_eq!(body["endReason"], "aborted");
    assert_eq!(body["responseMessageId"], started["responseMessageId"]);
    assert!(body["usage"].is_object(), "{body}");
    assert_no_more(&app, &mut r).await;
}

#[tokio::test]
async fn a_503_is_retried_and_the_hook_arrives_once() {
    let app = server(true).await;
    let mut r = receiver(vec![503, 200], None).await;
    let (_, started) = call(
        &app,
        "POST",
        "/api/chat",
        json!({"text": "hi", "webhookUrl": r.url}),
    )
    .await;
    let (h1, b1) = next(&mut r).await;
    let (h2, b2) = next(&mut r).await;
    let first = verified(&h1, &b1);
    assert_eq!(first, verified(&h2, &b2), "the retry sends the same body");
    assert_eq!(first["streamId"], started["streamId"]);
    assert_no_more(&app, &mut r).await;
}

#[tokio::test]
async fn a_loopback_url_is_refused_without_allow_private() {
    let app = server(false).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/",
        "ftp://example.com/",
    ] {
        let (s, v) = call(
            &app,
            "POST",
            "/api/chat",
            json!({"text": "hi", "webhookUrl": url}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
        assert!(v.to_string().contains("webhookUrl"), "{v}");
    }
    // Without a URL the same request is accepted.
    let (s, v) = call(&app, "POST", "/api/chat", json!({"text": "hi"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn delivery_does_not_delay_the_jobs_end() {
    let app = server(true).await;
    let gate = Arc::new(Notify::new());
    let mut r = receiver(vec![200], Some(gate.clone())).await;
    let (_, started) = call(
        &app,
        "POST",
        "/api/chat",
        json!({"text": "hi", "webhookUrl": r.url}),
    )
    .await;
    let sid = started["streamId"].as_str().unwrap();
    // The receiver holds the delivery open (it waits on `gate`)…
    let (h, b) = next(&mut r).await;
    assert_eq!(verified(&h, &b)["streamId"], sid);
    // …and the job has ended all the same: every job task is done (a task awaiting
    // the delivery would keep this waiting until the deadline), and its log ends with
    // `final`.
    tokio::time::timeout(Duration::from_secs(30), app.state.manager.wait_idle())
        .await
        .expect("the job's task ended while its webhook is still in flight");
    assert_eq!(app.state.manager.live_jobs(), 0);
    let log = log_of(&app, sid).await;
    assert_eq!(log.last().unwrap().event.as_deref(), Some("final"));
    gate.notify_one();
}

/// Two replicas on Redis whose reapers race to end the same orphans (their owner's
/// lease lapsed): each orphan's webhook is delivered once, by the replica that won its
/// end claim, with `endReason` `replica_lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reapers_deliver_each_orphans_webhook_once() {
    use genstream_engine::store::EventLogStore;
    use genstream_server::config::{AuthConfig, JobsConfig, LimitsConfig, RedisSection};
    use genstream_server::webhooks::WebhooksConfig;
    use genstream_test_support::{KeyPrefix, redis_url, wait_until};

    const JOBS: usize = 10;
    let prefix = KeyPrefix::new();
    let config = Config {
        bind: "127.0.0.1:0".into(),
        store: redis_url(),
        database: "sqlite::memory:".into(),
        redis: RedisSection {
            key_prefix: prefix.name().into(),
            lease_ttl: Duration::from_millis(500),
            ..RedisSection::default()
        },
        auth: AuthConfig {
            jwt_secret: Some(SECRET.into()),
        },
        // The reapers are driven by hand below.
        jobs: JobsConfig {
            reap_interval: Duration::from_secs(3600),
            ..JobsConfig::default()
        },
        limits: LimitsConfig::off(),
        webhooks: WebhooksConfig {
            secret: Some(HOOK_SECRET.into()),
            allow_private: true,
            retry_for: Duration::from_secs(30),
            ..WebhooksConfig::default()
        },
        ..Config::default()
    };
    let mut managers = Vec::new();
    for _ in 0..2 {
        let (state, _) = genstream_server::serve::build_state(&config).await.unwrap();
        managers.push(state.manager);
    }
    let dead_owner = |ttl_ms: u64| {
        let mut rc = genstream_redis::RedisConfig::new(&redis_url());
        rc.key_prefix = prefix.name().to_owned();
        rc.lease_ttl = Duration::from_millis(ttl_ms);
        genstream_redis::RedisStore::connect(rc)
    };
    // A replica judges other replicas' leases only after a whole lease TTL of its own
    // health: wait until each ends a probe orphan (no webhook: no URL anywhere).
    for m in &managers {
        let owner = dead_owner(100).await.unwrap();
        let probe = genstream_engine::suite::meta("probe", &genstream_engine::new_id());
        owner.create_job(&probe).await.unwrap();
        owner.close();
        wait_until(
            Duration::from_secs(10),
            "a reaper judging leases",
            || async { m.reap_orphans().await.unwrap() == 1 },
        )
        .await;
    }
    let mut r = receiver(vec![200], None).await;
    let dead = dead_owner(300).await.unwrap();
    let mut sids = std::collections::BTreeSet::new();
    for _ in 0..JOBS {
        let mut meta = genstream_engine::suite::meta("alice", &genstream_engine::new_id());
        meta.webhook_url = Some(r.url.clone());
        dead.create_job(&meta).await.unwrap();
        sids.insert(meta.stream_id);
    }
    dead.close();
    let lease = format!("replica:{}", dead.replica_id());
    wait_until(
        Duration::from_secs(5),
        "the owner's lease to lapse",
        || async { !prefix.exists(&lease).await },
    )
    .await;
    let (na, nb) = tokio::join!(managers[0].reap_orphans(), managers[1].reap_orphans());
    assert_eq!(na.unwrap() + nb.unwrap(), JOBS);
    let mut delivered = std::collections::BTreeSet::new();
    for _ in 0..JOBS {
        let (h, b) = next(&mut r).await;
        let body = verified(&h, &b);
        assert_eq!(body["status"], "error", "{body}");
        assert_eq!(body["endReason"], "replica_lost", "{body}");
        assert_eq!(body["responseMessageId"], Value::Null, "{body}");
        let sid = body["streamId"].as_str().unwrap().to_string();
        assert!(delivered.insert(sid), "a second delivery: {body}");
    }
    assert_eq!(delivered, sids);
    // Every delivery was spawned before the reapers returned; one more orphan, reaped
    // now, arrives after any duplicate would have.
    let mut marker = genstream_engine::suite::meta("alice", &genstream_engine::new_id());
    marker.webhook_url = Some(r.url.clone());
    let dead = dead_owner(300).await.unwrap();
    dead.create_job(&marker).await.unwrap();
    dead.close();
    let lease = format!("replica:{}", dead.replica_id());
    wait_until(
        Duration::from_secs(5),
        "the owner's lease to lapse",
        || async { !prefix.exists(&lease).await },
    )
    .await;
    assert_eq!(managers[1].reap_orphans().await.unwrap(), 1);
    let (h, b) = next(&mut r).await;
    assert_eq!(verified(&h, &b)["streamId"], marker.stream_id.as_str());
    assert!(r.got.try_recv().is_err(), "no delivery after the marker");
}

/// `POST` `body` to `uri` as alice; the status, the job's stream id header and the
/// body as JSON (`Null` for a stream, read to its end).
async fn start_on(app: &TestApp, uri: &str, body: Value) -> (StatusCode, String, Value) {
    let req = Request::post(uri)
        .header("authorization", format!("Bearer {}", token("alice")))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let sid = resp
        .headers()
        .get("x-genstream-stream-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        sid,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The other start routes take a webhook URL too: `webhook_url` in the body on `/v1`
/// (an OpenAI SDK's `extra_body`), `webhookUrl` on `/api/ai/chat`; each job's hook
/// arrives once, and a refused URL is a 400 naming the route's field.
#[tokio::test]
async fn every_start_route_takes_a_webhook_url() {
    let app = server(true).await;
    let mut r = receiver(vec![200], None).await;
    let url = r.url.clone();
    let routes = [
        (
            "/v1/chat/completions",
            "webhook_url",
            json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                "webhook_url": url}),
        ),
        (
            "/v1/responses",
            "webhook_url",
            json!({"model": "demo", "input": "hi", "webhook_url": url}),
        ),
        (
            "/api/ai/chat",
            "webhookUrl",
            json!({"id": "hooked-chat", "webhookUrl": url, "messages": [{"id": "m1",
                "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}),
        ),
    ];
    for (uri, _, body) in &routes {
        let (s, sid, v) = start_on(&app, uri, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {v}");
        let (h, b) = next(&mut r).await;
        let hook = verified(&h, &b);
        assert_eq!(hook["streamId"], sid, "{uri}");
        assert_eq!(hook["status"], "complete", "{uri}");
    }
    assert_no_more(&app, &mut r).await;

    let strict = server(false).await;
    for (uri, field, mut body) in routes {
        body[field] = json!("http://127.0.0.1:9/hook");
        let (s, _, v) = start_on(&strict, uri, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert!(v.to_string().contains(field), "{uri}: {v}");
        body[field] = json!(7);
        let (s, _, v) = start_on(&strict, uri, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert!(v.to_string().contains(field), "{uri}: {v}");
    }
}
