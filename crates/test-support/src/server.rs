//! Servers for tests: a router served in-process on a free port ([`Served`]), the real
//! `genstream` binary as a child process ([`ServerProcess`]), and an address nothing
//! listens on ([`unused_addr`]).
//!
//! `genstream serve` prints `genstream listening on http://ADDR` once it has bound its
//! port (`bind = "127.0.0.1:0"` picks a free one), so a test reads the address from
//! the process's stdout instead of choosing a port that may be taken meanwhile.

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
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
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
            rx,
        }
    }

    /// Everything it wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A spawned server that has not printed its address yet.
pub struct Starting {
    name: &'static str,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
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
