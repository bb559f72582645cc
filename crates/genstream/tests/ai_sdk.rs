//! The official `ai` npm package (pinned by `tests/ai-sdk/package-lock.json`) against
//! the real binary: `DefaultChatTransport` (what `useChat` uses) sends a message and
//! reads the UI message stream through the package's own chunk validation, finds
//! nothing to resume when idle, and resumes a running answer from its `start` after
//! the first connection is dropped; the text read equals the saved answer.
//!
//! This test is the harness: it starts `genstream serve`, makes an API key with
//! `genstream key` and runs `tests/ai-sdk/client_test.mjs` with Node, failing with its
//! output if a check failed. The npm packages are a prerequisite that `scripts/test`
//! installs (`npm ci` in `tests/ai-sdk`); when missing the test fails naming it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use genstream_test_support::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_genstream");

fn client_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ai-sdk");
    assert!(
        dir.join("node_modules/ai/package.json").is_file(),
        "ai-sdk tests: the `ai` npm package is missing in {}: run scripts/test, which installs it (npm ci)",
        dir.display()
    );
    dir
}

fn config(dir: &Path) -> PathBuf {
    let cfg = format!(
        r#"
bind = "127.0.0.1:0"
database = "sqlite://{db}"

[auth]
jwt_secret = "ai-sdk-client-test-secret-0123456789abcdef"

[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

[[models]]
name = "demo"
provider = "demo"
[models.options]
tokens = 40
token_delay = "5ms"

[[models]]
name = "mid"
provider = "demo"
[models.options]
tokens = 150
token_delay = "10ms"
"#,
        db = dir.join("genstream.db").display()
    );
    let path = dir.join("genstream.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// `genstream serve --config CONFIG`, listening.
fn serve(config: &Path) -> ServerProcess {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").arg("--config").arg(config);
    ServerProcess::spawn("server", cmd).listening()
}

#[test]
fn the_official_ai_sdk_transport_works() {
    let client = client_dir();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let server = serve(&config);
    let out = Command::new(BIN)
        .args(["key", "create", "--user", "alice", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let out = Command::new("node")
        .arg(client.join("client_test.mjs"))
        .current_dir(&client)
        .env("GENSTREAM_URL", &server.url)
        .env("GENSTREAM_KEY", key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the ai package's client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{stdout}"
    );
    drop(server);
}
