//! Browser tests of the web app: headless Chromium (Debian's), driven by Playwright,
//! against the real `genstream` binary.
//!
//! This test is the harness: it starts the mock upstream (for the models whose output
//! is scripted: an echo, a retry) and the binary with the models the specs use, runs
//! `playwright test` in `tests/browser/` (see its README), and fails with Playwright's
//! output if a spec failed, none ran, or one was skipped. Afterwards it reads the
//! server's whole log, at debug level, and checks that no token the run used — the dev
//! token, every token the specs minted — nor any `access_token` appears in it.
//!
//! Chromium and the npm packages are prerequisites that `scripts/test` installs; when
//! one is missing the test fails with one line naming it, never skips.
//!
//! `BROWSER_SCREENSHOTS=1` runs the screenshot generator instead of the tests: it
//! rewrites `docs/screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_genstream");

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What the run needs, found; or a one-line reason naming what is missing.
struct Prerequisites {
    chromium: PathBuf,
    cli: PathBuf,
}

fn prerequisites() -> Result<Prerequisites, String> {
    let install = "run scripts/test, which installs it";
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        return Err(format!(
            "browser tests: Chromium is missing ({}; `apt-get install -y chromium`): {install}",
            chromium.display()
        ));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err(format!(
            "browser tests: Node.js (`node`) is missing: {install}"
        ));
    }
    let cli = browser_dir().join("node_modules/@playwright/test/cli.js");
    if !cli.is_file() {
        return Err(format!(
            "browser tests: Playwright is missing ({}; `npm ci` in crates/genstream/tests/browser): {install}",
            cli.display()
        ));
    }
    Ok(Prerequisites { chromium, cli })
}

/// The models the specs use, by name.
fn config(dir: &Path, upstream: &str) -> PathBuf {
    let db = dir.join("genstream.db");
    let cfg = format!(
        r#"
bind = "127.0.0.1:0"
database = "sqlite://{db}"

# Many tests from one address and a few users at once: no rate limits here.
[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

# Balances on: every user starts with $1; only `claude` has a price.
[balance]
enabled = true
start_balance = 1000000

[providers.mock]
kind = "openai"
base_url = "{upstream}"
api_key_env = "BROWSER_TEST_UPSTREAM_KEY"

[providers.mock-anthropic]
kind = "anthropic"
base_url = "{upstream}"
api_key_env = "BROWSER_TEST_UPSTREAM_KEY"

[[models]]
name = "demo"
provider = "demo"
[models.options]
tokens = 30
token_delay = "20ms"

[[models]]
name = "slow"
provider = "demo"
[models.options]
tokens = 120
token_delay = "100ms"

[[models]]
name = "long"
provider = "demo"
[models.options]
tokens = 400
token_delay = "100ms"

[[models]]
name = "cut"
provider = "demo"
[models.options]
tokens = 150
token_delay = "40ms"

[[models]]
name = "reasoning"
provider = "demo"
[models.options]
behavior = "reasoning"
tokens = 40
token_delay = "20ms"

[[models]]
name = "tools"
provider = "demo"
tools = ["calculator"]
[models.options]
behavior = "tools"
token_delay = "50ms"

[[models]]
name = "fails"
provider = "demo"
[models.options]
behavior = "fail_mid_stream"
tokens = 30
token_delay = "20ms"

# The question, streamed back word by word: model output the test chooses.
[[models]]
name = "echo"
provider = "mock"
[models.options]
model = "echo?delay_ms=20"

# The first request answers 503 with Retry-After: 2, then the echo.
[[models]]
name = "flaky"
provider = "mock"
[models.options]
model = "flaky:1:503+ra2:echo?delay_ms=20"

# For the screenshots: a long retry wait, and a long Markdown answer.
[[models]]
name = "flaky-long"
provider = "mock"
[models.options]
model = "flaky:1:503+ra30:echo?delay_ms=20"

# A recorded Anthropic answer: reasoning, then Markdown (bold, lists). Priced.
[[models]]
name = "claude"
provider = "mock-anthropic"
[models.options]
model = "fixture:anthropic/messages-thinking-text.sse?delay_ms=25"
[models.pricing]
input_per_mtok = 3.0
output_per_mtok = 15.0
"#,
        db = db.display()
    );
    let path = dir.join("genstream.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser() {
    let pre = match prerequisites() {
        Ok(p) => p,
        Err(line) => panic!("{line}"),
    };
    let upstream = genstream_mock_upstream::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &upstream.base_url());
    let log_path = dir.path().join("server.log");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug,tower_http=trace")
        .env("NO_COLOR", "1")
        .env("BROWSER_TEST_UPSTREAM_KEY", "sk-browser-test")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut dev_token, mut sign_in) = (None, None);
    let url = loop {
        let Some(Ok(line)) = lines.next() else {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("genstream serve exited before listening:\n{log}");
        };
        if let Some(t) = line.strip_prefix("dev token (user `dev`, 30 days): ") {
            dev_token = Some(t.to_string());
        }
        if let Some(l) = line.strip_prefix("sign in: ") {
            sign_in = Some(l.to_string());
        }
        if let Some(u) = line.strip_prefix("genstream listening on ") {
            break u.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let dev_token = dev_token.expect("serve printed no dev token");
    let sign_in = sign_in.expect("serve printed no sign-in link");
    assert_eq!(sign_in, format!("{url}/#token={dev_token}"));

    let screenshots = std::env::var_os("BROWSER_SCREENSHOTS").is_some();
    let report = dir.path().join("report.json");
    let tokens_file = dir.path().join("tokens.txt");
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots");
    let mut cmd = Command::new("node");
    cmd.current_dir(browser_dir())
        .arg(&pre.cli)
        .arg("test")
        .arg(format!(
            "--project={}",
            if screenshots { "screenshots" } else { "tests" }
        ))
        .env("CHROMIUM", &pre.chromium)
        .env("BROWSER_TEST_URL", &url)
        .env("BROWSER_TEST_SIGNIN", &sign_in)
        .env("BROWSER_TEST_BIN", BIN)
        .env("BROWSER_TEST_CONFIG", &config)
        .env("BROWSER_TEST_REPORT", &report)
        .env("BROWSER_TEST_TOKENS_FILE", &tokens_file)
        .env("BROWSER_TEST_ARTIFACTS", dir.path().join("artifacts"))
        .env("BROWSER_TEST_SCREENSHOT_DIR", &shots)
        .env("FORCE_COLOR", "0");
    // Extra arguments for `playwright test`, e.g. BROWSER_TEST_ARGS="--grep tabs".
    let extra = std::env::var("BROWSER_TEST_ARGS").unwrap_or_default();
    cmd.args(extra.split_whitespace());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("could not run node");
    let _ = child.kill();
    let _ = child.wait();
    drop(upstream);

    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{output}");
    let keep = |why: &str| -> ! {
        // Keep the traces of failed specs (and the server log) for a look.
        let kept = dir.path().to_path_buf();
        std::mem::forget(dir);
        panic!(
            "{why}\n{output}\nserver log and Playwright traces kept in {}",
            kept.display()
        );
    };
    if !out.status.success() {
        keep("browser tests failed (playwright test exited non-zero)");
    }
    let stats: serde_json::Value = match std::fs::read(&report) {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b).unwrap()["stats"].clone(),
        Err(_) => keep("playwright wrote no report"),
    };
    let passed = stats["expected"].as_u64().unwrap_or(0);
    if passed == 0
        || stats["unexpected"].as_u64() != Some(0)
        || stats["skipped"].as_u64() != Some(0)
        || stats["flaky"].as_u64() != Some(0)
    {
        keep(&format!(
            "browser tests: none ran, or some failed or were skipped: {stats}"
        ));
    }

    // No token in the server's log.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines().count() > 10,
        "the server logged almost nothing; is RUST_LOG honoured?\n{log}"
    );
    let mut tokens = vec![dev_token];
    tokens.extend(
        std::fs::read_to_string(&tokens_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned),
    );
    if !screenshots && extra.is_empty() {
        assert!(
            tokens.len() > 10,
            "the specs minted too few tokens: {}",
            tokens.len()
        );
    }
    for t in &tokens {
        // A token's signature alone is enough to use it with its header and claims.
        let signature = t.rsplit('.').next().unwrap();
        if log.contains(signature) {
            keep(&format!("a token is in the server log: …{signature}"));
        }
    }
    for needle in ["access_token", "Bearer ", "sk-browser-test"] {
        if log.contains(needle) {
            keep(&format!("`{needle}` is in the server log"));
        }
    }
    println!(
        "{passed} browser tests passed; the server log ({} lines) holds no token",
        log.lines().count()
    );
}
