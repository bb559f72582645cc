//! An HTTP tool against a local endpoint: arguments are POSTed as JSON, the body is
//! the result, errors and timeouts are results, cancellation is prompt.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use axum::Json;
use axum::routing::post;
use genstream_engine::tools::Tool;
use genstream_tools::{HttpTool, HttpToolConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A local endpoint: `/echo` answers its arguments, `/fail` 502, `/slow` never in time.
/// The receiver counts the requests `/slow` got.
async fn endpoint() -> (String, tokio::sync::watch::Receiver<u32>) {
    let (slow_hits, hits) = tokio::sync::watch::channel(0u32);
    let slow_hits = std::sync::Arc::new(slow_hits);
    let app = axum::Router::new()
        .route(
            "/echo",
            post(|Json(v): Json<Value>| async move { Json(json!({"got": v})) }),
        )
        .route(
            "/fail",
            post(|| async { (axum::http::StatusCode::BAD_GATEWAY, "upstream down") }),
        )
        .route(
            "/slow",
            post(move || {
                let slow_hits = slow_hits.clone();
                async move {
                    slow_hits.send_modify(|n| *n += 1);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

fn tool(url: String, timeout_ms: u64) -> HttpTool {
    HttpTool::new(HttpToolConfig {
        name: "t".into(),
        description: "d".into(),
        parameters: json!({"type": "object"}),
        url,
        timeout: std::time::Duration::from_millis(timeout_ms),
    })
    .unwrap()
}

#[tokio::test]
async fn posts_arguments_and_returns_the_body() {
    let (base, mut slow_hits) = endpoint().await;
    let out = tool(format!("{base}/echo"), 2000)
        .execute(json!({"city": "Paris"}), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"got": {"city": "Paris"}})
    );
    let err = tool(format!("{base}/fail"), 2000)
        .execute(json!({}), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.contains("502") && err.contains("upstream down"),
        "{err}"
    );
    let err = tool(format!("{base}/slow"), 200)
        .execute(json!({}), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.contains("request failed"), "{err}");
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let before = *slow_hits.borrow_and_update();
    tokio::spawn(async move {
        // Cancel mid-request: once the endpoint has it.
        let _ = slow_hits.wait_for(|n| *n > before).await;
        c2.cancel();
    });
    let t0 = std::time::Instant::now();
    let err = tool(format!("{base}/slow"), 20_000)
        .execute(json!({}), cancel)
        .await
        .unwrap_err();
    assert_eq!(err, "cancelled");
    assert!(t0.elapsed() < Duration::from_secs(5));
}
