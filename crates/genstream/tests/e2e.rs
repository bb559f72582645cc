//! End-to-end: the real `genstream` binary over real HTTP, with the `openai` provider
//! pointed at our own mock OpenAI-compatible server replaying recorded chunks.
//! Covers persistence across restarts, graceful shutdown on SIGTERM, the token
//! command, and the CLI's chat/attach/abort.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use genstream_test_support::{ServerProcess, wait_for_text};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_genstream");

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let db = dir.join("genstream.db");
    let cfg = format!(
        "bind = \"127.0.0.1:0\"\ndatabase = \"sqlite://{}\"\n{extra}",
        db.display()
    );
    let path = dir.join("genstream.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// `genstream serve` on `config`, listening; killed when dropped.
fn spawn(config: &Path, envs: &[(&str, &str)]) -> ServerProcess {
    let mut serve = Command::new(BIN);
    serve.arg("serve").arg("--config").arg(config);
    for (k, v) in envs {
        serve.env(k, v);
    }
    ServerProcess::spawn("server", serve).listening()
}

/// The dev token `serve` prints when no secret is configured.
fn dev_token(server: &ServerProcess) -> Option<String> {
    server.banner.iter().find_map(|line| {
        line.strip_prefix("dev token (user `dev`, 30 days): ")
            .map(str::to_owned)
    })
}

fn token(config: &Path, user: &str) -> String {
    let out = Command::new(BIN)
        .args(["token", "--user", user, "--config"])
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

async fn post(s: &ServerProcess, tok: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .bearer_auth(tok)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(s: &ServerProcess, tok: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", s.url))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Reads a whole stream; returns the events' data objects.
async fn stream(s: &ServerProcess, tok: &str, stream_id: &str, cursor: Option<u64>) -> Vec<Value> {
    let mut req = reqwest::Client::new()
        .get(format!("{}/api/chat/stream/{stream_id}", s.url))
        .bearer_auth(tok);
    if let Some(c) = cursor {
        req = req.header("last-event-id", c.to_string());
    }
    let text = req.send().await.unwrap().text().await.unwrap();
    text.split("\n\n")
        .filter_map(|f| f.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn openai_provider_against_mock_upstream_persists_the_answer() {
    let upstream = genstream_mock_upstream::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[providers.mock]
kind = "openai"
base_url = "{}"
api_key_env = "GENSTREAM_TEST_E2E_KEY"

[[models]]
name = "gpt-text"
provider = "mock"
[models.options]
model = "fixture:openai/chat-text-usage.sse"

[[models]]
name = "deepseek"
provider = "mock"
[models.options]
model = "fixture:openai-compatible/deepseek-reasoning-content.chunks.jsonl"

[[models]]
name = "broken"
provider = "mock"
[models.options]
model = "status:400"
"#,
            upstream.base_url()
        ),
    );
    let server = spawn(&config, &[("GENSTREAM_TEST_E2E_KEY", "sk-e2e")]);
    let tok = token(&config, "alice");

    let (s, started) = post(
        &server,
        &tok,
        "/api/chat",
        json!({"text": "What's the weather?", "model": "gpt-text"}),
    )
    .await;
    assert_eq!(s, 200, "{started}");
    let events = stream(&server, &tok, started["streamId"].as_str().unwrap(), None).await;
    let fin = events.last().unwrap();
    assert_eq!(fin["event"], "final", "{fin}");
    // The fixture's 30 content deltas, concatenated.
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mock-upstream/fixtures/openai/chat-text-usage.sse"
    ))
    .unwrap();
    let mut expected = String::new();
    let mut usage = Value::Null;
    for line in fixture.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            expected.push_str(t);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    assert!(!expected.is_empty());
    let msg = &fin["data"]["responseMessage"];
    assert_eq!(msg["text"], expected);
    assert_eq!(fin["data"]["usage"]["inputTokens"], usage["prompt_tokens"]);
    assert_eq!(
        fin["data"]["usage"]["outputTokens"],
        usage["completion_tokens"]
    );
    // Persisted, identical.
    let cid = started["conversationId"].as_str().unwrap();
    let (_, msgs) = get(&server, &tok, &format!("/api/conversations/{cid}/messages")).await;
    assert_eq!(msgs["messages"][1], *msg);
    assert_eq!(msgs["messages"][1]["unfinished"], false);
    // What the upstream received: streaming with usage, the key from the env var.
    let reqs = upstream.requests();
    let body = &reqs.last().unwrap();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(
        body["messages"].as_array().unwrap().last().unwrap()["content"],
        "What's the weather?"
    );

    // Reasoning deltas become a think part before the text.
    let (_, started) = post(
        &server,
        &tok,
        "/api/chat",
        json!({"text": "9.11 vs 9.8?", "model": "deepseek"}),
    )
    .await;
    let events = stream(&server, &tok, started["streamId"].as_str().unwrap(), None).await;
    let content = &events.last().unwrap()["data"]["responseMessage"]["content"];
    assert_eq!(content[0]["type"], "think", "{content}");
    assert_eq!(content[1]["type"], "text");

    // An upstream HTTP error ends the job with an error event quoting the upstream.
    let (_, started) = post(
        &server,
        &tok,
        "/api/chat",
        json!({"text": "x", "model": "broken"}),
    )
    .await;
    let events = stream(&server, &tok, started["streamId"].as_str().unwrap(), None).await;
    let end = events.last().unwrap();
    assert_eq!(end["event"], "error");
    assert!(
        end["data"]["message"]
            .as_str()
            .unwrap()
            .contains("mock upstream says 400"),
        "{end}"
    );
}

#[tokio::test]
async fn restart_keeps_conversations_and_tokens_and_sigterm_saves_partials() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[jobs]
shutdown_grace = "1s"

[[models]]
name = "demo"
provider = "demo"
[models.options]
tokens = 20
token_delay = "1ms"

[[models]]
name = "slow"
provider = "demo"
[models.options]
tokens = 100000
token_delay = "10ms"
"#,
    );
    let server = spawn(&config, &[]);
    let dev = dev_token(&server).expect("a dev token is printed when no secret is configured");
    let (s, done) = post(&server, &dev, "/api/chat", json!({"text": "first"})).await;
    assert_eq!(s, 200);
    let events = stream(&server, &dev, done["streamId"].as_str().unwrap(), None).await;
    assert_eq!(events.last().unwrap()["event"], "final");
    // A resume from the middle gets exactly the rest.
    let rest = stream(&server, &dev, done["streamId"].as_str().unwrap(), Some(5)).await;
    assert_eq!(rest, events[6..].to_vec());

    let (_, running) = post(
        &server,
        &dev,
        "/api/chat",
        json!({"text": "second", "model": "slow"}),
    )
    .await;
    // SIGTERM mid-answer, once there is text to save.
    wait_for_text(&server.url, &dev, running["streamId"].as_str().unwrap()).await;
    // SIGTERM: the slow job is aborted after the 1 s grace, its partial saved.
    let mut server = server;
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || {
        let code = server.child.wait().unwrap();
        (server, code)
    });
    let (server, code) = tokio::time::timeout(Duration::from_secs(20), exited)
        .await
        .expect("server exits after SIGTERM")
        .unwrap();
    assert!(code.success(), "{code:?}");
    drop(server);

    let server = spawn(&config, &[]);
    // The old token still works: the secret survived the restart.
    let (s, list) = get(&server, &dev, "/api/conversations").await;
    assert_eq!(s, 200);
    assert_eq!(list["conversations"].as_array().unwrap().len(), 2);
    let cid = running["conversationId"].as_str().unwrap();
    let (_, msgs) = get(&server, &dev, &format!("/api/conversations/{cid}/messages")).await;
    let partial = &msgs["messages"][1];
    assert_eq!(partial["unfinished"], true, "{msgs}");
    assert!(!partial["text"].as_str().unwrap().is_empty());
    // And the conversation continues from the partial answer.
    let (s, v) = post(
        &server,
        &dev,
        "/api/chat",
        json!({"text": "go on", "conversationId": cid, "parentMessageId": partial["messageId"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn cli_chat_attach_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[auth]
jwt_secret = "cli-test-secret-cli-test-secret-0000"

[[models]]
name = "demo"
provider = "demo"
[models.options]
tokens = 15
token_delay = "1ms"

[[models]]
name = "slow"
provider = "demo"
[models.options]
tokens = 100000
token_delay = "10ms"
"#,
    );
    let server = spawn(&config, &[]);
    let tok = token(&config, "carol");
    let out = Command::new(BIN)
        .args([
            "chat",
            "hello from the cli",
            "--server",
            &server.url,
            "--token",
            &tok,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let (_, list) = get(&server, &tok, "/api/conversations").await;
    let cid = list["conversations"][0]["conversationId"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, msgs) = get(&server, &tok, &format!("/api/conversations/{cid}/messages")).await;
    assert_eq!(
        printed.trim_end(),
        msgs["messages"][1]["text"].as_str().unwrap().trim_end()
    );

    // Without --token, the CLI mints one from the same config.
    let out = Command::new(BIN)
        .args(["chat", "no token", "--server", &server.url, "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Abort from another process, then attach to the finished stream.
    let (_, started) = post(
        &server,
        &tok,
        "/api/chat",
        json!({"text": "long", "model": "slow"}),
    )
    .await;
    let sid = started["streamId"].as_str().unwrap();
    // Abort mid-answer, once there is text for `attach` to print.
    wait_for_text(&server.url, &tok, sid).await;
    let out = Command::new(BIN)
        .args(["abort", sid, "--server", &server.url, "--token", &tok])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["attach", sid, "--server", &server.url, "--token", &tok])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an aborted answer exits non-zero");
    assert!(!out.stdout.is_empty());
    // Errors are one line and a non-zero exit.
    let out = Command::new(BIN)
        .args(["attach", "nope", "--server", &server.url, "--token", &tok])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
}

#[test]
fn unknown_config_key_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[jobs]\nretension = \"5s\"\n");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("retension"), "{err}");
}

#[test]
fn committed_example_config_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../genstream.toml");
    let out = Command::new(BIN)
        .args([
            "token",
            "--user",
            "x",
            "--database",
            "sqlite::memory:",
            "--config",
            path,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
