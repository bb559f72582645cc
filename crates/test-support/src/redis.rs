//! Redis for tests: the shared server's URL, a key prefix per test, and a
//! redis-server of a test's own.
//!
//! The shared Redis (`GENSTREAM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`)
//! serves every test at once; each works under a prefix of its own
//! ([`unique_prefix`], or [`KeyPrefix`], which also deletes its keys at the end). A
//! test that stops, restarts or loses Redis starts its own with [`OwnRedis`].

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared test Redis, checked to answer (once per process).
///
/// # Panics
/// With one line naming Redis and `scripts/test` when it does not answer
/// ([`crate::services::require`]).
pub fn redis_url() -> String {
    let url = std::env::var("GENSTREAM_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    crate::services::require(crate::services::Service::Redis, &url);
    url
}

/// A key prefix no other test uses: `gstest-<uuid v7>`.
pub fn unique_prefix() -> String {
    format!("gstest-{}", uuid::Uuid::now_v7())
}

/// A test's key prefix on one Redis; its keys are deleted (best effort) when it goes,
/// also on panic. It also reads what genstream keeps under it (the layout is in
/// ARCHITECTURE.md, "Several replicas: Redis").
pub struct KeyPrefix {
    name: String,
    url: String,
}

impl KeyPrefix {
    /// A fresh prefix on the shared Redis.
    pub fn new() -> KeyPrefix {
        KeyPrefix::on(&redis_url())
    }

    /// A fresh prefix on the Redis at `url`.
    pub fn on(url: &str) -> KeyPrefix {
        KeyPrefix {
            name: unique_prefix(),
            url: url.to_owned(),
        }
    }

    /// The prefix, e.g. for `redis.key_prefix`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to its Redis.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The job's log as Redis holds it (`P:log:{sid}`): each entry's frame bytes, in
    /// order. Asserts that entry ids are `0-(seq+1)`.
    pub async fn log(&self, sid: &str) -> Vec<Vec<u8>> {
        let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(format!("{}:log:{{{sid}}}", self.name))
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        entries
            .into_iter()
            .enumerate()
            .map(|(i, (id, mut f))| {
                assert_eq!(id, format!("0-{}", i + 1), "stream ids are 0-(seq+1)");
                f.remove("f").expect("field f")
            })
            .collect()
    }

    /// Whether the key `P:{rest}` exists, e.g. `replica:{rid}` (a replica's lease).
    pub async fn exists(&self, rest: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(format!("{}:{rest}", self.name))
            .query_async(&mut self.conn().await)
            .await
            .unwrap()
    }

    /// A field of the job's hash (`P:job:{sid}`).
    pub async fn job_field(&self, sid: &str, field: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg(format!("{}:job:{{{sid}}}", self.name))
            .arg(field)
            .query_async(&mut self.conn().await)
            .await
            .unwrap()
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        KeyPrefix::new()
    }
}

impl Drop for KeyPrefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        // A Redis of the test's own may be gone already.
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.name))
            .query(&mut conn)
            .unwrap_or_default();
        for k in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut conn);
        }
    }
}

/// A redis-server of the test's own on a free port, in a temporary directory. It keeps
/// nothing on disk, as this project's development Redis does (a restart loses every
/// key and every function), or, started with [`OwnRedis::start_persistent`], an
/// append-only file synced on every write (a restart loses nothing). Killed when
/// dropped, also on panic. Needs `redis-server` on the `PATH`.
pub struct OwnRedis {
    /// The port it listens on, kept across restarts.
    pub port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts one that keeps nothing on disk.
    pub fn start() -> OwnRedis {
        OwnRedis::start_with(false)
    }

    /// Starts one with an append-only file, so its data survives a restart.
    pub fn start_persistent() -> OwnRedis {
        OwnRedis::start_with(true)
    }

    fn start_with(persistent: bool) -> OwnRedis {
        let mut r = OwnRedis {
            port: 0,
            dir: tempfile::tempdir().unwrap(),
            persistent,
            child: None,
        };
        // A free port can be taken by someone else before redis-server binds it.
        for _ in 0..5 {
            r.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if r.launch() {
                return r;
            }
            r.kill();
        }
        panic!("could not start redis-server");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server and polls until it answers PING (10 s at most); false if
    /// it exited or never answered.
    fn launch(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(if self.persistent {
                &["--appendonly", "yes", "--appendfsync", "always"][..]
            } else {
                &["--appendonly", "no"][..]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            let ping = redis::Client::open(self.url().as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills it if it runs (SIGKILL), then starts it again on the same port: without
    /// persistence everything it held is gone.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.launch(), "redis-server restarts on port {}", self.port);
    }

    /// SIGTERM (redis flushes its append-only file and exits), then waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// SIGKILL, then waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
