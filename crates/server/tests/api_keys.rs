//! API keys over HTTP, in-process: a key is accepted wherever a JWT is (every `/api`
//! route, the stream route's `?access_token=`), an unknown, malformed or revoked key
//! is 401 — a revoked one at once, on a second replica sharing the database — and the
//! database never holds the key itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use genstream_engine::log::LogLimits;
use genstream_engine::manager::{JobManager, ManagerConfig};
use genstream_engine::persist::Persistence;
use genstream_engine::store::{JobStore, MemoryStore};
use genstream_server::auth::{self, JwtKeys};
use genstream_server::{AppState, app};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// One replica: its own job store and manager over the shared database `db`.
fn replica(db: Arc<dyn Persistence>) -> Router {
    let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(LogLimits::default()));
    let manager = JobManager::new(store, db, default_models(), ManagerConfig::default());
    app(
        AppState {
            manager,
            auth: Arc::new(JwtKeys::new(SECRET)),
            keepalive: Duration::from_secs(15),
            sse_retry: Duration::from_secs(1),
            sse_chunk_bytes: 16 * 1024,
            trusted_proxies: Arc::new(Vec::new()),
            webhooks: Default::default(),
        },
        MAX_BODY,
    )
}

/// A SQLite database in `dir`, as `genstream serve` opens it.
async fn sqlite(dir: &std::path::Path) -> Arc<dyn Persistence> {
    let url = format!("sqlite://{}", dir.join("genstream.db").display());
    genstream_sql::connect(&url, genstream_sql::PoolOptions::default())
        .await
        .unwrap()
}

/// Makes and stores a key for `user`; returns the key and its id.
async fn make_key(db: &Arc<dyn Persistence>, user: &str) -> (String, String) {
    let k = auth::new_api_key(user, Some("test"), &genstream_engine::now_rfc3339()).unwrap();
    db.create_api_key(&k.row).await.unwrap();
    (k.key, k.row.id)
}

async fn call(
    router: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Value, Vec<u8>) {
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
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v, bytes)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_accepted_wherever_a_jwt_is() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    let router = replica(db.clone());
    let (key, _) = make_key(&db, "alice").await;
    let jwt = token("alice");

    // Every /api route answers the key as it answers alice's JWT: never 401.
    for (method, uri) in ROUTES {
        let (with_key, v, _) = call(&router, method, uri, Some(&key), Some("{}")).await;
        assert_ne!(with_key, StatusCode::UNAUTHORIZED, "{method} {uri}: {v}");
        if *method == "GET" {
            let (with_jwt, _, _) = call(&router, method, uri, Some(&jwt), None).await;
            assert_eq!(with_key, with_jwt, "{method} {uri}");
        }
    }

    // The key acts as alice: her chat, her conversations, her stream.
    let (s, started, _) = call(
        &router,
        "POST",
        "/api/chat",
        Some(&key),
        Some(&json!({"text": "hi"}).to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{started}");
    let sid = started["streamId"].as_str().unwrap();
    let (s, bytes) = {
        let (s, _, b) = call(
            &router,
            "GET",
            &format!("/api/chat/stream/{sid}?access_token={key}"),
            None,
            None,
        )
        .await;
        (s, b)
    };
    assert_eq!(s, StatusCode::OK);
    let frames = take_frames(&mut bytes.clone());
    assert_eq!(frames[0].event.as_deref(), Some("created"));
    assert!(frames.last().is_some_and(is_terminal));
    let (_, list, _) = call(&router, "GET", "/api/conversations", Some(&jwt), None).await;
    assert_eq!(list["conversations"].as_array().unwrap().len(), 1, "{list}");
    // Another user's JWT does not see it: the key is alice's.
    let (_, bobs, _) = call(
        &router,
        "GET",
        "/api/conversations",
        Some(&token("bob")),
        None,
    )
    .await;
    assert_eq!(bobs, json!({"conversations": []}));
    // Its use is recorded.
    let keys = db.list_api_keys("alice").await.unwrap();
    assert!(keys[0].last_used_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_at_once_by_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    // Two replicas, each with its own pool, sharing one database.
    let (db_a, db_b) = (sqlite(dir.path()).await, sqlite(dir.path()).await);
    let (a, b) = (replica(db_a.clone()), replica(db_b));
    let (key, id) = make_key(&db_a, "alice").await;
    let (other, _) = make_key(&db_a, "alice").await;
    for r in [&a, &b] {
        assert_eq!(
            call(r, "GET", "/api/balance", Some(&key), None).await.0,
            StatusCode::OK
        );
    }
    db_a.revoke_api_key(&id, &genstream_engine::now_rfc3339())
        .await
        .unwrap()
        .unwrap();
    for r in [&a, &b] {
        let (s, v, _) = call(r, "GET", "/api/balance", Some(&key), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["error"]["code"], "unauthorized");
        assert!(v["error"]["message"].as_str().unwrap().contains("revoked"));
        let (s, _, _) = call(
            r,
            "GET",
            &format!("/api/chat/stream/x?access_token={key}"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        // The user's other key still works.
        assert_eq!(
            call(r, "GET", "/api/balance", Some(&other), None).await.0,
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_keys_are_401() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    let router = replica(db.clone());
    let (key, _) = make_key(&db, "alice").await;
    let mut flipped = key.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    for bad in [
        flipped.as_str(), // well formed, unknown
        "gsk_",           // malformed
        "gsk_not-hex",
        &key[..key.len() - 1],                           // one digit short
        &key.to_uppercase().replacen("GSK_", "gsk_", 1), // upper-case hex
    ] {
        for (method, uri) in ROUTES {
            let (s, v, _) = call(&router, method, uri, Some(bad), Some("{}")).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} with {bad:?}: {v}"
            );
            assert_eq!(v["error"]["code"], "unauthorized");
        }
        let (s, _, _) = call(
            &router,
            "GET",
            &format!("/api/chat/stream/x?access_token={bad}"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_holds_no_plaintext_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    let router = replica(db.clone());
    let (key, _) = make_key(&db, "alice").await;
    assert_eq!(
        call(&router, "GET", "/api/balance", Some(&key), None)
            .await
            .0,
        StatusCode::OK
    );
    drop(router);
    let row = db.list_api_keys("alice").await.unwrap().remove(0);
    assert_eq!(row.hash, auth::hash_api_key(&key));
    assert!(key.starts_with(&row.prefix) && row.prefix.len() < 16);
    // Neither the key nor its secret part appears anywhere in the database's files
    // (the main file, the WAL, the shared memory), while its hash does.
    let secret_part = &key[row.prefix.len()..];
    let mut files = String::new();
    let mut seen_hash = false;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(!contains(secret_part), "{} holds the key", path.display());
        seen_hash |= contains(&row.hash);
        files.push_str(&format!("{} ", path.display()));
    }
    assert!(seen_hash, "the hash is stored somewhere in {files}");
}
