//! The official `openai` Python client (PyPI, pinned in `tests/openai/requirements.txt`)
//! against the real binary: models, Chat Completions streamed and not, a client tool
//! round trip through both APIs (the tool model runs on the mock upstream), Responses
//! in the background with polling, a stream resumed with `starting_after`, cancel
//! keeping the partial output, delete, and API keys (a revoked key is 401).
//!
//! This test is the harness: it starts the mock upstream and `genstream serve`, makes
//! the keys with `genstream key`, and runs `tests/openai/client_test.py` with the
//! venv's Python, failing with its output if a check failed. The venv is a
//! prerequisite that `scripts/test` installs in `target/openai-venv` (or set
//! `OPENAI_VENV`); when it is missing the test fails with one line naming it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use genstream_test_support::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_genstream");
const TOOLS_MODEL: &str = "tools?calls=1";

fn python() -> PathBuf {
    genstream_test_support::services::installed(
        "OPENAI_VENV",
        "openai-venv",
        "bin/python",
        "openai tests: the Python venv with the `openai` package",
    )
}

fn config(dir: &Path, upstream: &str) -> PathBuf {
    let cfg = format!(
        r#"
bind = "127.0.0.1:0"
database = "sqlite://{db}"

[auth]
jwt_secret = "openai-client-test-secret-0123456789abcdef"

[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

[providers.mock]
kind = "openai"
base_url = "{upstream}"

[[models]]
name = "demo"
provider = "demo"
[models.options]
tokens = 40
token_delay = "5ms"

[[models]]
name = "slow"
provider = "demo"
[models.options]
tokens = 2000
token_delay = "20ms"

[[models]]
name = "{TOOLS_MODEL}"
provider = "mock"
tools = ["calculator"]
[models.options]
model = "{TOOLS_MODEL}"
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

/// Runs `genstream key ARGS --config CONFIG`; its stdout.
fn key(config: &Path, args: &[&str]) -> String {
    genstream_test_support::genstream_key(BIN, config, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_works() {
    let python = python();
    let mock = genstream_mock_upstream::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &mock.base_url());
    let server = serve(&config);

    // A key that is revoked before the client runs, and the key it uses.
    let revoked = key(&config, &["create", "--user", "alice"])
        .trim()
        .to_string();
    let list = key(&config, &["list", "--user", "alice"]);
    let id = list
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    key(&config, &["revoke", id]);
    let good = key(&config, &["create", "--user", "alice", "--name", "python"])
        .trim()
        .to_string();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/client_test.py");
    let url = server.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("GENSTREAM_URL", url)
            .env("GENSTREAM_KEY", good)
            .env("GENSTREAM_REVOKED_KEY", revoked)
            .env("GENSTREAM_TOOLS_MODEL", TOOLS_MODEL)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        8,
        "{stdout}"
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    drop(server);
}
