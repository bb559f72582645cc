//! `genstream balance` through the real binary: an operator's grant to a new user
//! comes on top of the start balance (and does not make a refill due at once), a
//! second grant does not give the start again, and showing a balance settles it the
//! way `GET /api/balance` does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_genstream");

fn write_config(dir: &Path, balance: &str) -> std::path::PathBuf {
    let db = dir.join("genstream.db");
    let cfg = format!(
        "database = \"sqlite://{}\"\n[auth]\njwt_secret = \"balance-test-secret-0123456789abcdef\"\n{balance}",
        db.display()
    );
    let path = dir.join("genstream.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Runs `genstream balance --user USER [--add N]` and returns its one line of output.
fn balance(config: &Path, user: &str, add: Option<&str>) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("balance")
        .arg("--user")
        .arg(user)
        .arg("--config")
        .arg(config);
    if let Some(n) = add {
        cmd.arg("--add").arg(n);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "genstream balance failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn grants_start_from_the_start_balance() {
    let dir = tempfile::tempdir().unwrap();
    // A refill every hour: a row that did not count as refilled would get one at once.
    let config = write_config(
        dir.path(),
        "[balance]\nenabled = true\nstart_balance = 100\nrefill_amount = 1000\nrefill_interval = \"1h\"\n",
    );
    assert_eq!(balance(&config, "neu", Some("5")), "neu: 105 credits");
    // Showing settles the balance as GET /api/balance does: no refill is due yet.
    assert_eq!(balance(&config, "neu", None), "neu: 105 credits");
    // The row exists: a second grant does not give the start again; negative takes.
    assert_eq!(balance(&config, "neu", Some("-7.5")), "neu: 97.5 credits");
    // A user first seen by `balance` gets the start balance, as on a first chat.
    assert_eq!(balance(&config, "old", None), "old: 100 credits");
    assert_eq!(balance(&config, "old", Some("1")), "old: 101 credits");
}

#[test]
fn with_balances_off_a_grant_still_starts_from_the_start_balance() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[balance]\nstart_balance = 50\n");
    assert_eq!(balance(&config, "sam", None), "sam: 0 credits");
    assert_eq!(balance(&config, "sam", Some("2")), "sam: 52 credits");
    assert_eq!(balance(&config, "sam", None), "sam: 52 credits");
}
