//! What an operator sees of the real binary: request ids on every response and in the
//! log lines of the request and of the job it started, JSON logs, no secret in any
//! log line (debug level), and Prometheus metrics that move by exactly the jobs run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use genstream_test_support::{ServerProcess, wait_until};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_genstream");
const SECRET: &str = "observe-test-secret-0123456789abcdef";

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let cfg = format!(
        r#"bind = "127.0.0.1:0"
database = "sqlite://{db}"
{extra}
[auth]
jwt_secret = "{SECRET}"

[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

[[models]]
name = "demo"
provider = "demo"
[models.options]
tokens = 5
token_delay = "1ms"

[[models]]
name = "slow"
provider = "demo"
[models.options]
tokens = 100000
token_delay = "20ms"
"#,
        db = dir.join("genstream.db").display()
    );
    let path = dir.join("genstream.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn serve(config: &Path, rust_log: &str) -> ServerProcess {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1");
    ServerProcess::spawn("server", cmd).listening()
}

fn cli(config: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A debug-level run in JSON: a chat started with a JWT and a request id of the
/// client's, its stream read with `?access_token=`, a route called with an API key.
/// Every response has an `x-request-id`; the client's id is in the request's log lines
/// and in the job's; no JWT, API key or `access_token` is in any line.
#[tokio::test]
async fn request_ids_reach_the_job_and_no_secret_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[log]\nformat = \"json\"\n");
    let jwt = cli(&config, &["token", "--user", "alice"]);
    let key = cli(&config, &["key", "create", "--user", "alice"]);
    assert!(key.starts_with("gsk_"), "{key}");
    let server = serve(&config, "debug");
    let http = reqwest::Client::new();

    let resp = http
        .post(format!("{}/api/chat", server.url))
        .bearer_auth(&jwt)
        .header("x-request-id", "req-observe-1")
        .json(&json!({"text": "hello", "model": "demo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-observe-1");
    let started: Value = resp.json().await.unwrap();
    let sid = started["streamId"].as_str().unwrap();

    let resp = http
        .get(format!(
            "{}/api/chat/stream/{sid}?access_token={jwt}",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Generated when the request has none: a UUID.
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "{generated}");
    assert!(resp.text().await.unwrap().contains("event: final"));

    let resp = http
        .get(format!("{}/api/models", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    // Errors too.
    let resp = http
        .get(format!("{}/api/nowhere", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-request-id"));

    // The job's last line is written just after its terminal event.
    wait_until(
        Duration::from_secs(10),
        "the job's `job finished` line",
        || {
            let logs = server.logs();
            async move { logs.contains("job finished") }
        },
    )
    .await;
    let logs = server.logs();
    for secret in [jwt.as_str(), key.as_str(), "access_token"] {
        assert!(
            !logs.contains(secret),
            "{secret:.12}… is in the log:\n{}",
            logs.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let with_id = |id: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| {
                l["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["request_id"] == id))
            })
            .collect()
    };
    let start_lines = with_id("req-observe-1");
    let messages: Vec<&str> = start_lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    assert!(
        messages.contains(&"finished processing request"),
        "{messages:?}"
    );
    for job_line in ["job started", "job finished"] {
        let line = start_lines
            .iter()
            .find(|l| l["fields"]["message"] == job_line)
            .unwrap_or_else(|| panic!("no {job_line:?} line with the request id: {messages:?}"));
        assert_eq!(line["span"]["name"], "job");
        assert_eq!(line["span"]["stream_id"], sid);
    }
    // The stream request logs its route and path, never its query.
    let stream_line = with_id(&generated)
        .into_iter()
        .find(|l| l["fields"]["message"] == "finished processing request")
        .expect("the stream request's line");
    assert_eq!(stream_line["span"]["route"], "/api/chat/stream/{stream_id}");
    assert_eq!(
        stream_line["span"]["path"],
        format!("/api/chat/stream/{sid}")
    );
}

/// The sum of the samples of `name` whose labels include every `labels` pair, in
/// the Prometheus text format; 0 when there is none.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

async fn scrape(http: &reqwest::Client, url: &str) -> String {
    let resp = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    resp.text().await.unwrap()
}

/// Reads a stream to its end; returns its events (the `data` of each frame).
async fn read_events(http: &reqwest::Client, url: &str, jwt: &str, sid: &str) -> Vec<Value> {
    let text = http
        .get(format!("{url}/api/chat/stream/{sid}"))
        .bearer_auth(jwt)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.split("\n\n")
        .filter_map(|f| f.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// Two completed jobs and one aborted one move every counter by exactly that much:
/// jobs started and finished (by status and reason), events appended and frames
/// delivered (each log read once), tokens as the `final` events report them, model
/// calls, first-token samples, HTTP requests by route; the gauges come back to 0.
#[tokio::test]
async fn metrics_move_by_exactly_the_jobs_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let jwt = cli(&config, &["token", "--user", "bob"]);
    let server = serve(&config, "info");
    let http = reqwest::Client::new();
    let url = server.url.as_str();
    let before = scrape(&http, url).await;
    assert_eq!(metric(&before, "genstream_jobs_started_total", &[]), 0.0);

    let start = |model: &'static str| {
        let http = http.clone();
        let jwt = jwt.clone();
        async move {
            let v: Value = http
                .post(format!("{url}/api/chat"))
                .bearer_auth(&jwt)
                .json(&json!({"text": "count me", "model": model}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["streamId"].as_str().unwrap().to_string()
        }
    };
    let slow = start("slow").await;
    // Mid-answer, seen from /metrics alone (a subscriber would add frames): running.
    wait_until(Duration::from_secs(20), "the slow job to stream", || {
        let http = http.clone();
        async move {
            let m = scrape(&http, url).await;
            metric(&m, "genstream_events_appended_total", &[]) >= 5.0
        }
    })
    .await;
    let m = scrape(&http, url).await;
    assert_eq!(metric(&m, "genstream_jobs_running", &[]), 1.0);
    let resp = http
        .post(format!("{url}/api/chat/abort"))
        .bearer_auth(&jwt)
        .json(&json!({"streamId": slow}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let done = [start("demo").await, start("demo").await];

    let mut events = 0;
    let mut output_tokens = std::collections::HashMap::<&str, f64>::new();
    for (sid, model) in [(&slow, "slow"), (&done[0], "demo"), (&done[1], "demo")] {
        let evs = read_events(&http, url, &jwt, sid).await;
        let last = evs.last().unwrap();
        assert_eq!(last["event"], "final", "{last}");
        events += evs.len();
        *output_tokens.entry(model).or_default() +=
            last["data"]["usage"]["outputTokens"].as_f64().unwrap();
    }
    let events = events as f64;

    // Frames are counted when a stream goes idle or closes: wait for the last close.
    wait_until(Duration::from_secs(10), "the streams to be closed", || {
        let http = http.clone();
        async move {
            let m = scrape(&http, url).await;
            metric(&m, "genstream_subscribers_connected", &[]) == 0.0
                && metric(&m, "genstream_jobs_running", &[]) == 0.0
                && metric(&m, "genstream_frames_delivered_total", &[]) >= events
        }
    })
    .await;
    let m = scrape(&http, url).await;
    let has = |name: &str, labels: &[(&str, &str)], want: f64| {
        assert_eq!(metric(&m, name, labels), want, "{name} {labels:?}:\n{m}");
    };
    has("genstream_jobs_started_total", &[], 3.0);
    has("genstream_jobs_started_total", &[("model", "demo")], 2.0);
    has("genstream_jobs_finished_total", &[], 3.0);
    has(
        "genstream_jobs_finished_total",
        &[("status", "complete"), ("reason", "none")],
        2.0,
    );
    has(
        "genstream_jobs_finished_total",
        &[("status", "aborted"), ("reason", "aborted")],
        1.0,
    );
    has("genstream_events_appended_total", &[], events);
    // Every append a job task made is timed; `created` is the start's, not timed.
    has("genstream_append_duration_seconds_count", &[], events - 3.0);
    has("genstream_frames_delivered_total", &[], events);
    has(
        "genstream_upstream_requests_total",
        &[("model", "demo"), ("status", "200")],
        2.0,
    );
    has("genstream_upstream_requests_total", &[], 3.0);
    has(
        "genstream_time_to_first_token_seconds_count",
        &[("model", "demo")],
        2.0,
    );
    for (model, tokens) in output_tokens {
        assert!(tokens > 0.0);
        has(
            "genstream_tokens_total",
            &[("model", model), ("type", "output")],
            tokens,
        );
    }
    has("genstream_upstream_retries_total", &[], 0.0);
    has(
        "genstream_http_requests_total",
        &[
            ("route", "/api/chat"),
            ("method", "POST"),
            ("status", "200"),
        ],
        3.0,
    );
    has(
        "genstream_http_requests_total",
        &[("route", "/api/chat/stream/{stream_id}"), ("status", "200")],
        3.0,
    );
    has(
        "genstream_http_requests_total",
        &[("route", "/api/chat/abort"), ("status", "200")],
        1.0,
    );
}

/// With `metrics_bind`, `GET /metrics` is served there and not on the API's port.
#[tokio::test]
async fn metrics_bind_serves_metrics_apart_from_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "metrics_bind = \"127.0.0.1:0\"");
    let server = serve(&config, "info");
    let metrics_url = server
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("genstream metrics on "))
        .expect("the metrics line")
        .trim_end_matches("/metrics")
        .to_string();
    let http = reqwest::Client::new();
    let m = scrape(&http, &metrics_url).await;
    assert!(m.contains("genstream_jobs_running"), "{m}");
    let resp = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
