//! `GET /openapi.json` describes every route the app serves, and nothing it does not.
//!
//! Routes are registered through utoipa-axum's `routes!`, which takes the path and the
//! methods from the handler's `#[utoipa::path]`, so a route cannot be served without
//! its description. What could still slip past: a route registered around it (a plain
//! axum `.route(…)`), and a description whose path or method the router does not
//! answer. These tests walk the real router for both: every documented operation is
//! answered by its handler (not the 404/405 fallbacks), every other method of a
//! documented path is a 405, the app's route list is the document's, and no source
//! file but the web app's (`ui.rs`, left out of the document on purpose) registers a
//! route by hand.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// The app's routes: every path and method it answers, the web app's aside. A new
/// route goes here and into the document (by `routes!`) together.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/chat"),
    ("GET", "/api/chat/stream/{stream_id}"),
    ("GET", "/api/chat/active"),
    ("GET", "/api/chat/status/{conversation_id}"),
    ("POST", "/api/chat/abort"),
    ("POST", "/api/ai/chat"),
    ("GET", "/api/ai/chat/{chat_id}/stream"),
    ("GET", "/api/conversations"),
    ("GET", "/api/conversations/{id}"),
    ("DELETE", "/api/conversations/{id}"),
    ("GET", "/api/conversations/{id}/messages"),
    ("GET", "/api/models"),
    ("GET", "/api/balance"),
    ("GET", "/api/usage"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/chat/completions/{id}"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{id}"),
    ("DELETE", "/v1/responses/{id}"),
    ("POST", "/v1/responses/{id}/cancel"),
    ("GET", "/v1/responses/{id}/input_items"),
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// The app as the binary serves it: the API, the web app and `GET /metrics`.
fn full_app() -> axum::Router {
    let app = test_app(default_models());
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let metrics = genstream_server::observe::metrics_router(handle, app.state.manager.clone());
    genstream_server::app_with(app.state, MAX_BODY, metrics)
}

async fn get_json(router: &axum::Router, uri: &str) -> (StatusCode, Value) {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The document's operations, as (METHOD, path).
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

/// A concrete path for a templated one (`{id}` → `x`).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether an answer is one of the router's fallbacks: the 404 of no route, or the 405
/// of a path that has no such method.
fn is_fallback(status: StatusCode, body: &Value) -> bool {
    let code = body["error"]["code"].as_str();
    let message = body["error"]["message"].as_str().unwrap_or("");
    status == StatusCode::METHOD_NOT_ALLOWED
        || (status == StatusCode::NOT_FOUND
            && code == Some("not_found")
            && message.starts_with("no route"))
}

#[tokio::test]
async fn the_document_lists_exactly_the_apps_routes() {
    let router = full_app();
    let (status, doc) = get_json(&router, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let documented = operations(&doc);
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = listed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&listed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes the document lacks: {missing:?}; documented routes not in the list: {extra:?}"
    );
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_no_other_method_is() {
    let router = full_app();
    let (_, doc) = get_json(&router, "/openapi.json").await;
    let documented = operations(&doc);
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let uri = concrete(path);
        for method in METHODS {
            let req = Request::builder()
                .method(Method::from_bytes(method.as_bytes()).unwrap())
                .uri(&uri)
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let resp = router.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let is_sse = resp
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            // A stream would not end: its answer is its handler's by its headers alone.
            let body = if is_sse {
                Value::Null
            } else {
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            };
            let is_documented = documented.contains(&(method.to_string(), path.clone()));
            if is_documented {
                assert!(
                    !is_fallback(status, &body),
                    "{method} {path} is documented but not routed: {status} {body}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is answered ({body}) but not documented"
                );
            }
        }
    }
}

/// A route registered with plain axum (`.route(`, `.route_service(`, `.nest_service(`)
/// bypasses `routes!` and so the document; only the web app (`ui.rs`) may.
#[test]
fn no_route_is_registered_around_the_document() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    let mut dirs = vec![src];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.file_name().is_some_and(|n| n == "ui.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if [".route(", ".route_service(", ".nest_service("]
                    .iter()
                    .any(|r| code.contains(r))
                {
                    offenders.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "routes registered without their OpenAPI description (use utoipa-axum's routes!):\n{}",
        offenders.join("\n")
    );
}

#[tokio::test]
async fn the_document_has_the_security_schemes_errors_and_idempotency_key() {
    let router = full_app();
    let (_, doc) = get_json(&router, "/openapi.json").await;
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["access_token"]["in"], "query");
    assert_eq!(doc["security"][0]["bearer"], Value::Array(vec![]));
    // Unauthenticated operations say so.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"] {
        assert_eq!(
            doc["paths"][path]["get"]["security"],
            serde_json::json!([{}]),
            "{path}"
        );
    }
    // Both error shapes, each on its own routes.
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["ErrorBody"].is_object() && schemas["OpenAiErrorBody"].is_object());
    let error_ref = |path: &str, method: &str| {
        doc["paths"][path][method]["responses"]["401"]["content"]["application/json"]["schema"]
            ["$ref"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(error_ref("/api/chat", "post").ends_with("/ErrorBody"));
    assert!(error_ref("/v1/responses", "post").ends_with("/OpenAiErrorBody"));
    // SSE answers are described as such.
    let sse = &doc["paths"]["/api/chat/stream/{stream_id}"]["get"]["responses"]["200"];
    assert!(sse["content"]["text/event-stream"].is_object(), "{sse}");
    // The Idempotency-Key header on the four job-starting operations.
    for (path, method) in [
        ("/api/chat", "post"),
        ("/v1/responses", "post"),
        ("/v1/chat/completions", "post"),
        ("/api/ai/chat", "post"),
    ] {
        let params = doc["paths"][path][method]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            params
                .iter()
                .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header"),
            "{method} {path}: {params:?}"
        );
    }
    // The reference page embeds the document.
    let req = Request::get("/docs").body(Body::empty()).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8_lossy(&html);
    assert!(html.contains("api-reference") && html.contains("/v1/chat/completions"));
    // Its one script is pinned and integrity-checked.
    assert!(html.contains("@scalar/api-reference@1.76.4/") && html.contains("integrity=\"sha384-"));
    assert!(!html.contains("$title") && !html.contains("$spec"));
}
