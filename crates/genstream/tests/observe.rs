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
