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

    /// One command on its Redis: on one Redis, or routed by key on the Redis Cluster a
    /// `redis+cluster://host:port,...` URL names.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        match cluster_nodes(&self.url) {
            Some(nodes) => {
                let mut conn = redis::cluster::ClusterClient::new(nodes)
                    .unwrap()
                    .get_async_connection()
                    .await
                    .unwrap();
                cmd.query_async(&mut conn).await.unwrap()
            }
            None => {
                let mut conn = redis::Client::open(self.url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                cmd.query_async(&mut conn).await.unwrap()
            }
        }
    }

    /// The job's log as Redis holds it (`P:log:{sid}`): each event's frame bytes, in
    /// seq order. An entry holds one appended batch (its frames concatenated, each
    /// ending with a blank line); asserts that the frames' ids run 0, 1, 2, ... and
    /// that each entry's id is `0-(its last seq + 1)`.
    pub async fn log(&self, sid: &str) -> Vec<Vec<u8>> {
        let entries: Vec<(String, HashMap<String, Vec<u8>>)> = self
            .query(
                redis::cmd("XRANGE")
                    .arg(format!("{}:log:{{{sid}}}", self.name))
                    .arg("-")
                    .arg("+"),
            )
            .await;
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for (id, mut fields) in entries {
            let batch = fields.remove("f").expect("field f");
            let mut rest = &batch[..];
            while !rest.is_empty() {
                let end = rest
                    .windows(2)
                    .position(|w| w == b"\n\n")
                    .expect("each frame ends with a blank line")
                    + 2;
                let frame = &rest[..end];
                let want = format!("id: {}\n", frames.len());
                assert!(
                    frame.starts_with(want.as_bytes()),
                    "frame {} of the log is {:?}",
                    frames.len(),
                    String::from_utf8_lossy(frame)
                );
                frames.push(frame.to_vec());
                rest = &rest[end..];
            }
            assert_eq!(
                id,
                format!("0-{}", frames.len()),
                "an entry's id is 0-(its last seq + 1)"
            );
        }
        frames
    }

    /// Whether the key `P:{rest}` exists, e.g. `replica:{rid}` (a replica's lease).
    pub async fn exists(&self, rest: &str) -> bool {
        self.query(redis::cmd("EXISTS").arg(format!("{}:{rest}", self.name)))
            .await
    }

    /// A field of the job's hash (`P:job:{sid}`).
    pub async fn job_field(&self, sid: &str, field: &str) -> Option<String> {
        self.query(
            redis::cmd("HGET")
                .arg(format!("{}:job:{{{sid}}}", self.name))
                .arg(field),
        )
        .await
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        KeyPrefix::new()
    }
}

impl Drop for KeyPrefix {
    fn drop(&mut self) {
        if cluster_nodes(&self.url).is_some() {
            // A Cluster here is a test's own (`OwnRedisCluster`): its keys go with it.
            return;
        }
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
    /// Further redis-server arguments (a Cluster node's).
    extra: Vec<String>,
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
        OwnRedis::start_args(persistent, |_| Vec::new())
    }

    /// Starts one with the further arguments `extra(port)` gives.
    fn start_args(persistent: bool, extra: impl Fn(u16) -> Vec<String>) -> OwnRedis {
        let mut r = OwnRedis {
            port: 0,
            dir: tempfile::tempdir().unwrap(),
            persistent,
            extra: Vec::new(),
            child: None,
        };
        // A free port can be taken by someone else before redis-server binds it.
        for _ in 0..5 {
            r.port = free_port();
            r.extra = extra(r.port);
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
            .args(&self.extra)
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

/// The `redis://host:port` of each node a `redis+cluster://host:port,...` URL names;
/// `None` for any other URL.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let hosts = url.strip_prefix("redis+cluster://")?;
    Some(
        hosts
            .trim_end_matches('/')
            .split(',')
            .map(|h| format!("redis://{h}"))
            .collect(),
    )
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis Cluster of the test's own: three primaries sharing the 16,384 slots, and
/// optionally one replica of the first, each an [`OwnRedis`] (nothing on disk but the
/// cluster's `nodes.conf`) made into a cluster with `redis-cli --cluster create`.
/// Killed when dropped, also on panic. Needs `redis-server` and `redis-cli` on the
/// `PATH`.
pub struct OwnRedisCluster {
    /// The three primaries as created, then the replica if any. After
    /// [`OwnRedisCluster::fail_over`] the replica is the first slot range's primary.
    pub nodes: Vec<OwnRedis>,
}

impl OwnRedisCluster {
    /// Three primaries, no replica; returns once every node reports `cluster_state:ok`.
    pub fn start() -> OwnRedisCluster {
        OwnRedisCluster::start_with(false)
    }

    /// Three primaries and a replica of the first (synced), for
    /// [`OwnRedisCluster::fail_over`].
    pub fn start_with_replica() -> OwnRedisCluster {
        OwnRedisCluster::start_with(true)
    }

    fn start_with(replica: bool) -> OwnRedisCluster {
        let node = || {
            OwnRedis::start_args(false, |_| {
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    // The bus port would be port + 10000 by default, past 65535 for
                    // many free ports.
                    "--cluster-port",
                    &free_port().to_string(),
                ]
                .map(String::from)
                .to_vec()
            })
        };
        let mut nodes: Vec<OwnRedis> = (0..3).map(|_| node()).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        redis_cli(
            &[
                &["--cluster", "create"][..],
                &addrs.iter().map(String::as_str).collect::<Vec<_>>()[..],
                &["--cluster-replicas", "0", "--cluster-yes"][..],
            ]
            .concat(),
        );
        let c = OwnRedisCluster { nodes: Vec::new() };
        for n in &nodes {
            c.wait_for(n.port, "cluster_state:ok", "CLUSTER", "INFO");
        }
        if replica {
            let r = node();
            let master_id: String = query(nodes[0].port, &["CLUSTER", "MYID"]);
            redis_cli(&[
                "--cluster",
                "add-node",
                &format!("127.0.0.1:{}", r.port),
                &addrs[0],
                "--cluster-slave",
                "--cluster-master-id",
                &master_id,
            ]);
            c.wait_for(r.port, "master_link_status:up", "INFO", "replication");
            nodes.push(r);
            for n in &nodes {
                c.wait_for(n.port, "cluster_state:ok", "CLUSTER", "INFO");
            }
        }
        OwnRedisCluster { nodes }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3` (the three primaries as
    /// created, the seed nodes).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// A manual failover of the first primary to its replica (`CLUSTER FAILOVER` on the
    /// replica: the primary stops taking writes, the replica catches up, then takes
    /// over, so no acknowledged write is lost). Returns once the replica is primary and
    /// every node reports `cluster_state:ok`.
    ///
    /// # Panics
    /// Without a replica ([`OwnRedisCluster::start_with_replica`]), or if the failover
    /// does not finish within 20 s.
    pub fn fail_over(&self) {
        let replica = self.nodes.get(3).expect("a cluster with a replica").port;
        let _: String = query(replica, &["CLUSTER", "FAILOVER"]);
        self.wait_for(replica, "role:master", "INFO", "replication");
        for n in &self.nodes {
            self.wait_for(n.port, "cluster_state:ok", "CLUSTER", "INFO");
        }
    }

    /// Whether `key` lies in the first primary's slots (0 to 5460: `redis-cli --cluster
    /// create` gives the three primaries the slots in equal ranges, in order), the ones
    /// [`OwnRedisCluster::fail_over`] moves to the replica.
    pub fn on_first_primary(&self, key: &str) -> bool {
        let slot: i64 = query(self.nodes[1].port, &["CLUSTER", "KEYSLOT", key]);
        slot <= 5460
    }

    /// Kills the first primary (SIGKILL): its replica is promoted once the others judge
    /// it failed (`cluster-node-timeout` 2 s, then an election). Returns once the replica
    /// is primary and the live nodes report `cluster_state:ok`. Writes the replica had
    /// not received (replication is asynchronous) are lost.
    ///
    /// # Panics
    /// Without a replica, or if the promotion does not finish within 20 s.
    pub fn kill_first_primary(&mut self) {
        let replica = self.nodes.get(3).expect("a cluster with a replica").port;
        self.nodes[0].kill();
        self.wait_for(replica, "role:master", "INFO", "replication");
        for n in &self.nodes[1..] {
            self.wait_for(n.port, "cluster_state:ok", "CLUSTER", "INFO");
        }
    }

    /// Polls `cmd arg` on the node at `port` until its reply contains `text` (20 s at
    /// most).
    fn wait_for(&self, port: u16, text: &str, cmd: &str, arg: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let reply: Result<String, _> = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| redis::cmd(cmd).arg(arg).query(&mut c));
            if reply.as_deref().is_ok_and(|r| r.contains(text)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {port}: no {text:?} in {cmd} {arg} after 20 s: {reply:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `redis-cli args…`, panicking with its output if it fails.
fn redis_cli(args: &[&str]) {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli on PATH");
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One command on the node at `port`.
fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).unwrap()
}
