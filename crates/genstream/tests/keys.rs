//! `genstream key create | list | revoke` through the real binary, against a real
//! `genstream serve` sharing the SQLite database: the key is printed once and works
//! as a bearer token, `list` shows it without the key, its use is recorded, and a
//! revocation made by the CLI is refused by the running server at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use genstream_test_support::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_genstream");

fn write_config(dir: &Path) -> std::path::PathBuf {
    let cfg = format!(
        "bind = \"127.0.0.1:0\"\ndatabase = \"sqlite://{}\"\n[auth]\njwt_secret = \"keys-test-secret-0123456789abcdef\"\n",
        dir.join("genstream.db").display()
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

/// Runs `genstream key ARGS --config CONFIG`.
fn key(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("key")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn ok(out: Output) -> (String, String) {
    assert!(
        out.status.success(),
        "exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

async fn status(s: &ServerProcess, key: &str, path: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{}{path}", s.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_made_listed_used_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());

    // Made: printed once on stdout, alone; its id on stderr.
    let (stdout, stderr) = ok(key(
        &config,
        &["create", "--user", "alice", "--name", "laptop"],
    ));
    let secret = stdout.trim().to_string();
    assert_eq!(stdout, format!("{secret}\n"));
    assert!(secret.starts_with("gsk_") && secret.len() == 68, "{secret}");
    assert!(secret[4..].bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(stderr.contains("not shown again"), "{stderr}");

    // Listed: id, prefix, label, never used — never the key.
    let (list, _) = ok(key(&config, &["list", "--user", "alice"]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(lines[0].starts_with("ID"));
    assert!(
        lines[1].contains(&secret[..12])
            && lines[1].contains("laptop")
            && lines[1].contains("never")
    );
    assert!(!list.contains(&secret[12..]), "{list}");
    let id = lines[1].split_whitespace().next().unwrap().to_string();
    assert!(stderr.contains(&id));
    let (bobs, _) = ok(key(&config, &["list", "--user", "bob"]));
    assert_eq!(bobs.trim(), "bob has no API keys");

    // Used against the running server, as the OpenAI SDKs send it.
    let server = serve(&config);
    assert_eq!(status(&server, &secret, "/api/balance").await, 200);
    let started = reqwest::Client::new()
        .post(format!("{}/api/chat", server.url))
        .bearer_auth(&secret)
        .json(&serde_json::json!({"text": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status().as_u16(), 200);
    let (list, _) = ok(key(&config, &["list", "--user", "alice"]));
    assert!(
        !list.lines().nth(1).unwrap().contains("never"),
        "use recorded: {list}"
    );

    // Revoked by the CLI while the server runs: refused at the next request.
    let (out, _) = ok(key(&config, &["revoke", &id]));
    assert!(out.starts_with(&format!("revoked {id} ")), "{out}");
    assert_eq!(status(&server, &secret, "/api/balance").await, 401);
    assert_eq!(
        status(
            &server,
            &secret,
            &format!("/api/chat/stream/x?access_token={secret}")
        )
        .await,
        401
    );
    let (list, _) = ok(key(&config, &["list", "--user", "alice"]));
    assert!(
        list.lines().nth(1).unwrap().trim_end().ends_with('Z'),
        "revoked at: {list}"
    );

    // An unknown id is an error.
    let out = key(&config, &["revoke", "no-such-key"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no API key no-such-key"));

    // The key is nowhere in the database's files.
    drop(server);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let needle = &secret.as_bytes()[12..];
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }
}
