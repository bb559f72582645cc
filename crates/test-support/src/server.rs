//! Servers for tests: a router served in-process on a free port ([`Served`]), the real
//! `genstream` binary as a child process ([`ServerProcess`]), and an address nothing
//! listens on ([`unused_addr`]).
//!
//! `genstream serve` prints `genstream listening on http://ADDR` once it has bound its
//! port (`bind = "127.0.0.1:0"` picks a free one), so a test reads the address from
//! the process's stdout instead of choosing a port that may be taken meanwhile.
//!
//! Every [`ServerProcess`] scans its own log (stderr) when it is dropped and fails the
//! test if the log holds a token ([`secrets_in`]: a JWT, an API key, an
//! `access_token` value): so each spawned-binary test also checks that nothing it
//! sent leaked into the server's log.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use tokio::task::JoinHandle;

/// The line `genstream serve` prints once it listens, before the URL.
pub const LISTENING: &str = "genstream listening on ";

/// How long a process may take to print [`LISTENING`] (migrations included).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// An address nothing listens on: a port that was free a moment ago.
pub fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A router served on `127.0.0.1:<free port>` in a task of the current runtime;
/// stopped (open connections cut) when dropped.
pub struct Served {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://ADDR`.
    pub url: String,
    task: JoinHandle<()>,
}

impl Served {
    /// Serves `router`. Handlers see no peer address (`ConnectInfo`).
    pub async fn start(router: Router) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Only fails when the listener does; the test then sees connection errors.
            let _ = axum::serve(listener, router).await;
        });
        Served::new(addr, task)
    }

    /// Serves `router` with each connection's peer address as `ConnectInfo`, as
    /// `genstream serve` does (client IPs, `X-Forwarded-For`).
    pub async fn start_with_peer_addr(router: Router) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(listener, service).await;
        });
        Served::new(addr, task)
    }

    fn new(addr: SocketAddr, task: JoinHandle<()>) -> Served {
        Served {
            addr,
            url: format!("http://{addr}"),
            task,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `genstream serve` child process, listening. Killed when dropped, also on panic.
pub struct ServerProcess {
    /// A name for messages and log lines (`A`, `server`).
    pub name: &'static str,
    /// The process.
    pub child: Child,
    /// `http://ADDR`, from its [`LISTENING`] line.
    pub url: String,
    /// The lines it printed on stdout before that one (the dev token, for one).
    pub banner: Vec<String>,
    logs: Arc<Mutex<String>>,
    /// Ends when the stderr reader has read the last line (the process exited).
    logs_done: Option<Receiver<()>>,
}

impl ServerProcess {
    /// Spawns `command` (a `genstream serve …`) and returns at once, so that several
    /// can start together; [`Starting::listening`] waits for its address. Its stdout is
    /// read to the end (so it never blocks on a full pipe); its stderr (the logs) is
    /// kept for [`ServerProcess::logs`] and echoed to the test's stderr, each line
    /// prefixed with `[name]`.
    pub fn spawn(name: &'static str, mut command: Command) -> Starting {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {command:?}: {e}"));
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        let (done_tx, logs_done) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
            let _ = done_tx.send(());
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut banner = Vec::new();
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                match line.strip_prefix(LISTENING) {
                    Some(url) => {
                        let _ = tx.send((url.to_owned(), std::mem::take(&mut banner)));
                        break;
                    }
                    None => banner.push(line),
                }
            }
            for _ in lines {}
        });
        Starting {
            name,
            child: Some(child),
            logs,
            logs_done: Some(logs_done),
            rx,
        }
    }

    /// Everything it wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for ServerProcess {
    /// Kills the process, reads its log to the end and fails the test (unless it is
    /// failing already) if the log holds a token ([`secrets_in`]).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(done) = self.logs_done.take() {
            // The reader ends at EOF, right after the exit; bounded all the same.
            let _ = done.recv_timeout(Duration::from_secs(10));
        }
        let found = secrets_in(&self.logs.lock().unwrap());
        if found.is_empty() {
            return;
        }
        let message = format!(
            "{}: its log holds a token (shown cut to 12 characters):\n{}",
            self.name,
            found
                .iter()
                .map(|s| format!("  {s:.12}…"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        if std::thread::panicking() {
            eprintln!("{message}");
        } else {
            panic!("{message}");
        }
    }
}

/// The tokens in `log`: JWTs (`eyJ…` `.` `…` `.`, base64url segments), API keys
/// (`gsk_` and 64 lowercase hex digits, `genstream-server::auth`'s shape) and
/// `access_token=` values of 8 characters or more (a URL's query). Shapes, not the
/// secrets a test happened to use, so that a token the server made itself (a dev
/// token, an API key) is caught too.
pub fn secrets_in(log: &str) -> Vec<String> {
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let run = |s: &str, ok: &dyn Fn(char) -> bool| s.find(|c| !ok(c)).unwrap_or(s.len());
    let mut found = Vec::new();
    for (i, _) in log.match_indices("eyJ") {
        let rest = &log[i..];
        let head = run(rest, &b64);
        let Some(after) = rest[head..].strip_prefix('.') else {
            continue;
        };
        let payload = run(after, &b64);
        if head >= 10 && payload >= 10 && after[payload..].starts_with('.') {
            found.push(rest[..head + 1 + payload].to_string());
        }
    }
    for (i, _) in log.match_indices("gsk_") {
        let hex = &log[i + 4..];
        let n = run(hex, &|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if n >= 64 {
            found.push(log[i..i + 4 + n].to_string());
        }
    }
    for (i, m) in log.match_indices("access_token=") {
        let value = &log[i + m.len()..];
        let n = run(value, &|c| b64(c) || c == '.' || c == '%');
        if n >= 8 {
            found.push(log[i..i + m.len() + n].to_string());
        }
    }
    found
}

/// A spawned server that has not printed its address yet.
pub struct Starting {
    name: &'static str,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    logs_done: Option<Receiver<()>>,
    rx: Receiver<(String, Vec<String>)>,
}

impl Starting {
    /// Waits (up to [`START_TIMEOUT`]) for its [`LISTENING`] line.
    ///
    /// # Panics
    /// When it exits or stays silent first, quoting its logs.
    pub fn listening(mut self) -> ServerProcess {
        let Ok((url, banner)) = self.rx.recv_timeout(START_TIMEOUT) else {
            panic!(
                "{} did not start listening; its logs:\n{}",
                self.name,
                self.logs.lock().unwrap()
            );
        };
        ServerProcess {
            name: self.name,
            child: self.child.take().unwrap(),
            url,
            banner,
            logs: self.logs.clone(),
            logs_done: self.logs_done.take(),
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `BIN key ARGS --config CONFIG` (the `genstream key` command, `bin` being
/// `env!("CARGO_BIN_EXE_genstream")`) and returns its stdout.
///
/// # Panics
/// When the command fails, with its stderr.
pub fn genstream_key(bin: &str, config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(bin)
        .arg("key")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap_or_else(|e| panic!("{bin} key: {e}"));
    assert!(
        out.status.success(),
        "genstream key {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{LISTENING, ServerProcess, secrets_in};

    /// A process whose log holds a token fails the test when dropped; one whose log
    /// is clean does not.
    #[test]
    fn a_process_that_logged_a_token_fails_when_dropped() {
        let fake = |stderr: &str| {
            let mut cmd = std::process::Command::new("sh");
            cmd.arg("-c").arg(format!(
                "echo '{stderr}' >&2; echo '{LISTENING}http://127.0.0.1:9'; exec sleep 30"
            ));
            cmd
        };
        let clean = ServerProcess::spawn("clean", fake("job finished")).listening();
        drop(clean);
        let leaky = ServerProcess::spawn(
            "leaky",
            fake("GET /api/chat/stream/x?access_token=eyJhbGciOi.eyJzdWIiOiJh.sig"),
        )
        .listening();
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(leaky)));
        let message = *dropped
            .expect_err("the leak was not caught")
            .downcast::<String>()
            .unwrap();
        assert!(
            message.contains("leaky: its log holds a token"),
            "{message}"
        );
        assert!(
            !message.contains("eyJzdWIiOiJh"),
            "the token is shown cut: {message}"
        );
    }

    #[test]
    fn finds_tokens_and_nothing_else() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        let key = format!("gsk_{}", "0123456789abcdef".repeat(4));
        let log = format!("a {jwt} b\nkey={key}\nGET /s?access_token=abcdefgh12 200\n");
        let found = secrets_in(&log);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().any(|f| jwt.starts_with(f.as_str())));
        assert!(found.contains(&key));
        let clean = "job finished stream_id=0190-… key gsk_ (64 hex) eyJ short.eyJ.x \
            send ?access_token= or a header; access_token=short";
        assert_eq!(secrets_in(clean), Vec::<String>::new());
        assert_eq!(
            secrets_in(&format!("gsk_{}", "a".repeat(63))),
            Vec::<String>::new()
        );
    }
}
