//! Schemathesis (PyPI, pinned in `tests/fuzz/requirements.txt`) fuzzes the real binary
//! from its own `GET /openapi.json`: for every operation it sends requests made from
//! the document (valid ones and broken ones, alone and in sequences that pass one
//! answer's ids on), and checks that no answer is a 5xx, that every status, content
//! type, header and body is one the document describes, that a route refuses a
//! request without its token and answers an undocumented method with 405 and
//! `Allow`, that what was deleted is gone, and afterwards that the server's log holds
//! no panic.
//!
//! The server runs as `genstream serve` does by default (memory store, SQLite) with
//! the demo provider. Before the run the test makes what the id-taking routes need
//! (a finished native chat, a chat completion, a response, an AI SDK chat) and hands
//! their ids and the model's name to Schemathesis as dictionaries, so that part of
//! the requests reach the handlers' real work instead of a 404. The run is bounded:
//! a few examples per operation (`FUZZ_EXAMPLES`, default 12) and a time
//! budget; `FUZZ_SEED` replays a run (the seed is printed).
//!
//! The venv is a prerequisite that `scripts/test` installs in `target/fuzz-venv` (or
//! set `FUZZ_VENV`); when it is missing the test fails with one line naming it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use genstream_test_support::ServerProcess;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_genstream");

fn schemathesis() -> PathBuf {
    genstream_test_support::services::installed(
        "FUZZ_VENV",
        "fuzz-venv",
        "bin/schemathesis",
        "fuzz test: the Python venv with `schemathesis`",
    )
}

fn config(dir: &Path) -> PathBuf {
    let cfg = format!(
        r#"
bind = "127.0.0.1:0"
database = "sqlite://{db}"

[auth]
jwt_secret = "fuzz-test-secret-0123456789abcdef0123456789"

[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

[[models]]
name = "demo"
provider = "demo"
[models.options]
tokens = 8
token_delay = "1ms"
"#,
        db = dir.join("genstream.db").display()
    );
    let path = dir.join("genstream.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// A `genstream key create` key for `user`.
fn api_key(config: &Path, user: &str) -> String {
    genstream_test_support::genstream_key(BIN, config, &["create", "--user", user])
        .trim()
        .to_string()
}

/// The ids the id-taking routes are fed with, made through the API itself.
struct Seeds {
    stream_id: String,
    conversation_id: String,
    chat_id: String,
    completion_id: String,
    response_id: String,
}

async fn seed(url: &str, key: &str) -> Seeds {
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{url}{path}"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let started: Value = post("/api/chat", json!({"text": "hello", "model": "demo"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stream_id = started["streamId"].as_str().unwrap().to_string();
    // The stream ends with the job's terminal event: the chat is saved then.
    let log = http
        .get(format!("{url}/api/chat/stream/{stream_id}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), 200);
    log.bytes().await.unwrap();
    let completion: Value = post(
        "/v1/chat/completions",
        json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let response: Value = post("/v1/responses", json!({"model": "demo", "input": "hi"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat_id = "fuzz-chat".to_string();
    let ai = post(
        "/api/ai/chat",
        json!({"id": chat_id, "messages": [{"id": "m1", "role": "user",
            "parts": [{"type": "text", "text": "hi"}]}]}),
    )
    .await
    .unwrap();
    assert_eq!(ai.status(), 200);
    ai.bytes().await.unwrap();
    Seeds {
        stream_id,
        conversation_id: started["conversationId"].as_str().unwrap().to_string(),
        chat_id,
        completion_id: completion["id"].as_str().unwrap().to_string(),
        response_id: response["id"].as_str().unwrap().to_string(),
    }
}

/// Schemathesis's config: the seeds as dictionaries, bound to the parameters that take
/// them with a probability, so the fuzzer still tries ids of its own.
fn schemathesis_toml(dir: &Path, s: &Seeds) -> PathBuf {
    let toml = format!(
        r#"
[dictionaries.models]
values = ["demo"]
[dictionaries.streams]
values = ["{stream}"]
[dictionaries.conversations]
values = ["{conv}"]
[dictionaries.chats]
values = ["{chat}", "{conv}"]
[dictionaries.completions]
values = ["{cmpl}"]
[dictionaries.responses]
values = ["{resp}"]

[parameters]
"body.model" = {{ dictionary = "models", probability = 0.6 }}
"path.stream_id" = {{ dictionary = "streams", probability = 0.6 }}
"path.conversation_id" = {{ dictionary = "conversations", probability = 0.6 }}
"path.chat_id" = {{ dictionary = "chats", probability = 0.6 }}
"body.streamId" = {{ dictionary = "streams", probability = 0.3 }}
"body.conversationId" = {{ dictionary = "conversations", probability = 0.3 }}

[[operations]]
include-path-regex = "^/api/conversations/"
parameters = {{ "path.id" = {{ dictionary = "conversations", probability = 0.6 }} }}

[[operations]]
include-path-regex = "^/v1/chat/completions/"
parameters = {{ "path.id" = {{ dictionary = "completions", probability = 0.6 }} }}

[[operations]]
include-path-regex = "^/v1/responses/"
parameters = {{ "path.id" = {{ dictionary = "responses", probability = 0.6 }} }}

[[operations]]
include-path-regex = "^/v1/models/"
parameters = {{ "path.id" = {{ dictionary = "models", probability = 0.6 }} }}
"#,
        stream = s.stream_id,
        conv = s.conversation_id,
        chat = s.chat_id,
        cmpl = s.completion_id,
        resp = s.response_id,
    );
    let path = dir.join("schemathesis.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let schemathesis = schemathesis();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").arg("--config").arg(&config);
    let server = ServerProcess::spawn("server", cmd).listening();
    let key = api_key(&config, "fuzz");
    let seeds = seed(&server.url, &key).await;
    let st_config = schemathesis_toml(dir.path(), &seeds);

    let examples = std::env::var("FUZZ_EXAMPLES").unwrap_or_else(|_| "12".into());
    let mut st = Command::new(schemathesis);
    st.arg("--config-file")
        .arg(&st_config)
        .arg("run")
        .arg(format!("{}/openapi.json", server.url))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,\
             unsupported_method,allow_header_conformance,missing_required_header,\
             ignored_auth,use_after_free,ensure_resource_availability",
        ])
        // Stateful: sequences that follow the ids one answer gives to the next request
        // (start a chat, then read, abort, delete it).
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", &examples])
        // The whole run stays well inside CI's budget on a 2-core machine.
        .args(["--max-time", "90"])
        .args(["--workers", "2"])
        .args(["--request-timeout", "20"])
        .args(["--max-failures", "20"])
        .args(["--no-color"])
        .current_dir(dir.path());
    if let Ok(seed) = std::env::var("FUZZ_SEED") {
        st.args(["--seed", &seed]);
    }
    let out = tokio::task::spawn_blocking(move || st.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found failures (FUZZ_SEED replays the run):\n{stdout}\n{stderr}"
    );
    // The summary names how many test cases ran: a run that tested nothing is no pass.
    assert!(stdout.contains("generated"), "{stdout}\n{stderr}");
    // The summary, seed included, for the record.
    let lines: Vec<&str> = stdout.lines().collect();
    eprintln!("{}", lines[lines.len().saturating_sub(12)..].join("\n"));

    // The server survived all of it, and no handler panicked along the way.
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let logs = server.logs();
    let panics: Vec<&str> = logs.lines().filter(|l| l.contains("panicked")).collect();
    assert!(
        panics.is_empty(),
        "the server panicked:\n{}",
        panics.join("\n")
    );
}
