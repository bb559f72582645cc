//! Several replicas as real processes: three `genstream serve` binaries sharing Redis
//! and a fresh PostgreSQL database (created through
//! `postgres://postgres@127.0.0.1:5432/postgres`, or `GENSTREAM_TEST_POSTGRES_ADMIN_URL`,
//! and dropped at the end), each test under a Redis key prefix of its own.
//!
//! - SIGKILL the owner mid-generation, with the default lease TTL and reap interval:
//!   the other replicas notice the lapsed lease and end the job with `error`
//!   `replica_lost` and the partial answer, saved, within 15 s; one terminal event
//!   although two reapers raced (docs/protocol.md §5; docs/lessons.md: "a replica that died left its jobs
//!   running for 20 minutes").
//! - Redis restarted while jobs stream (a redis-server of the test's own, with an
//!   append-only file so its data survives): every job ends, every subscriber's events
//!   are exactly the log, readiness and `POST /api/chat` report the outage as 503 and
//!   recover.
//! - Redis restarted without persistence (as this machine's Redis keeps nothing on
//!   disk): the jobs whose logs vanished end for every subscriber with one terminal
//!   `error` `store_unavailable` at the next seq, their partial answers are saved,
//!   nothing is left running, and the replicas load their Redis functions again (new
//!   chats work, `/readyz` is 200).
//! - Redis unreachable at start: `serve` exits with one line naming it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use genstream_client::{Client, StreamEvent};
use genstream_test_support::{KeyPrefix, OwnRedis, ServerProcess, TestDb, redis_url, unused_addr};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_genstream");
const SECRET: &str = "replicas-test-secret-0123456789abcdef";
const USER: &str = "alice";

fn token() -> String {
    genstream_server::auth::JwtKeys::new(SECRET)
        .mint(USER, Duration::from_secs(600))
        .unwrap()
}

// ---------------------------------------------------------------------------------
// Replicas as processes.

fn write_config(dir: &Path, store: &str, database: &str, prefix: &str, extra: &str) -> PathBuf {
    let cfg = format!(
        r#"bind = "127.0.0.1:0"
store = "{store}"
database = "{database}"

[auth]
jwt_secret = "{SECRET}"

[pool]
max_connections = 4

{extra}
"#
    )
    .replace("@PREFIX@", prefix);
    let path = dir.join("genstream.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// A replica: `genstream serve` as a child process, killed when dropped.
type Replica = ServerProcess;

/// Starts the three replicas at once (they race to migrate the fresh database) and
/// waits for each to print its address.
fn spawn_replicas(config: &Path) -> Vec<Replica> {
    spawn_named(config, &["A", "B", "C"])
}

fn spawn_named(config: &Path, names: &[&'static str]) -> Vec<Replica> {
    let starting: Vec<_> = names
        .iter()
        .map(|&name| {
            let mut serve = Command::new(BIN);
            serve
                .arg("serve")
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1");
            ServerProcess::spawn(name, serve)
        })
        .collect();
    starting.into_iter().map(|s| s.listening()).collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(r: &Replica, path: &str, body: Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}{path}", r.url))
        .bearer_auth(token())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get(r: &Replica, path: &str) -> (u16, Value) {
    let resp = http()
        .get(format!("{}{path}", r.url))
        .bearer_auth(token())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// One parsed SSE frame with its raw bytes.
#[derive(Clone, Debug)]
struct RawFrame {
    raw: Vec<u8>,
    event: Option<String>,
    data: Value,
}

fn parse_frame(raw: Vec<u8>) -> RawFrame {
    let text = String::from_utf8_lossy(&raw).to_string();
    let mut event = None;
    let mut data = Value::Null;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = serde_json::from_str(v).unwrap();
        }
    }
    RawFrame { raw, event, data }
}

fn is_terminal(event: &str) -> bool {
    event == "final" || event == "error"
}

/// Reads the whole stream of `sid` from `r` over one connection, reporting the number
/// of frames so far on `progress`; returns the frames and when the last one arrived.
async fn subscribe(
    url: String,
    sid: String,
    progress: tokio::sync::watch::Sender<usize>,
) -> (Vec<RawFrame>, Instant) {
    let resp = http()
        .get(format!("{url}/api/chat/stream/{sid}"))
        .bearer_auth(token())
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = buf.drain(..pos + 2).collect();
            // Comments (`: ping`) and the stream's opening `retry:` carry no event.
            if raw.starts_with(b":") || raw.starts_with(b"retry:") {
                continue;
            }
            frames.push(parse_frame(raw));
        }
        let _ = progress.send(frames.len());
    }
    (frames, Instant::now())
}

fn delta_text(frames: &[RawFrame]) -> String {
    frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("on_message_delta"))
        .flat_map(|f| {
            f.data["data"]["delta"]["content"]
                .as_array()
                .unwrap()
                .clone()
        })
        .filter_map(|p| p["text"].as_str().map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------------------------
// The owner dies.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_is_reaped_by_the_others_with_replica_lost() {
    let db = TestDb::create().await;
    let prefix = KeyPrefix::new();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &redis_url(),
        &db.url,
        prefix.name(),
        // The default lease TTL (8 s) and reap interval (5 s): what a user gets.
        r#"[redis]
key_prefix = "@PREFIX@"

[jobs]
retention = "10m"

[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

[[models]]
name = "slow"
provider = "demo"
[models.options]
tokens = 100000
token_delay = "20ms"
"#,
    );
    let mut replicas = spawn_replicas(&config);
    let (s, started) = post(
        &replicas[0],
        "/api/chat",
        json!({"text": "tell me everything", "model": "slow"}),
    )
    .await;
    assert_eq!(s, 200, "{started}");
    let sid = started["streamId"].as_str().unwrap().to_string();
    let cid = started["conversationId"].as_str().unwrap().to_string();
    let response_id = started["responseMessageId"].as_str().unwrap().to_string();

    // Subscribers on B and C; wait until both have streamed some text.
    let mut subs = Vec::new();
    for r in &replicas[1..] {
        let (tx, rx) = tokio::sync::watch::channel(0usize);
        subs.push((
            r.name,
            tokio::spawn(subscribe(r.url.clone(), sid.clone(), tx)),
            rx,
        ));
    }
    for (name, _, rx) in &mut subs {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= 15))
            .await
            .unwrap_or_else(|_| panic!("{name} streams"))
            .unwrap();
    }

    // SIGKILL the owner mid-generation.
    replicas[0].child.kill().unwrap();
    replicas[0].child.wait().unwrap();
    let killed = Instant::now();

    let mut streams = Vec::new();
    let mut last_end = killed;
    for (name, task, _) in subs {
        let (frames, ended) = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap_or_else(|_| panic!("{name}'s stream did not end within 20 s of the kill"))
            .unwrap();
        last_end = last_end.max(ended);
        let after = ended.duration_since(killed);
        eprintln!(
            "{name}: terminal event {after:?} after the kill (default lease 8 s, reaper \
             every 5 s)"
        );
        assert!(after < Duration::from_secs(15), "{name} waited {after:?}");
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.data["seq"], i as u64, "{name}: gap or duplicate");
        }
        let terminals = frames
            .iter()
            .filter(|f| is_terminal(f.event.as_deref().unwrap()))
            .count();
        assert_eq!(terminals, 1, "{name}");
        let last = frames.last().unwrap();
        assert_eq!(
            last.event.as_deref(),
            Some("error"),
            "{name}: {:?}",
            last.data
        );
        let end = &last.data["data"];
        assert_eq!(end["code"], "replica_lost", "{name}: {end}");
        let partial = &end["responseMessage"];
        assert_eq!(partial["messageId"], response_id.as_str());
        assert_eq!(partial["unfinished"], true);
        let text = partial["text"].as_str().unwrap();
        let streamed = delta_text(&frames);
        assert!(!text.is_empty(), "{name}: empty partial answer");
        assert!(
            streamed.starts_with(text),
            "{name}: the partial answer is not a prefix of what was streamed"
        );
        assert_eq!(
            text, streamed,
            "{name}: the partial answer is not all that was streamed"
        );
        streams.push(frames);
    }
    // Both saw the same bytes, which are what Redis holds: one terminal event.
    let stored = prefix.log(&sid).await;
    assert_eq!(streams[0].len(), stored.len());
    for (i, s) in stored.iter().enumerate() {
        assert_eq!(streams[0][i].raw, *s, "B differs from Redis at seq {i}");
        assert_eq!(streams[1][i].raw, *s, "C differs from Redis at seq {i}");
    }
    assert_eq!(
        prefix.job_field(&sid, "status").await.as_deref(),
        Some("error")
    );
    let partial = streams[0].last().unwrap().data["data"]["responseMessage"].clone();

    // Persisted, and no longer active, as seen from B and C.
    for r in &replicas[1..] {
        let (s, msgs) = get(r, &format!("/api/conversations/{cid}/messages")).await;
        assert_eq!(s, 200, "{msgs}");
        let saved = msgs["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["messageId"] == response_id.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("the partial answer is not saved: {msgs}"));
        assert_eq!(saved["unfinished"], true);
        assert_eq!(saved["text"], partial["text"]);
        assert_eq!(saved["content"], partial["content"]);
        let (s, active) = get(r, "/api/chat/active").await;
        assert_eq!(s, 200);
        assert!(
            !active["activeJobIds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|id| id == sid.as_str()),
            "{} still lists the job: {active}",
            r.name
        );
    }
    // Give the losing reaper a sweep of its own: still one terminal event, and exactly
    // one replica reports having ended the job. An absence check, so it waits out the
    // period in which the loser would act: its next sweep starts within one reap
    // interval (5 s) of the end, which the subscribers saw, and takes a moment.
    let losers_sweep_done = last_end + Duration::from_millis(5500);
    tokio::time::sleep_until(losers_sweep_done.into()).await;
    let stored_later = prefix.log(&sid).await;
    assert_eq!(stored_later, stored, "something was appended after the end");
    let reaped: Vec<(&str, usize)> = replicas[1..]
        .iter()
        .map(|r| {
            let logs = r.logs();
            (
                r.name,
                logs.lines()
                    .filter(|l| l.contains("ended an orphaned job") && l.contains(&sid))
                    .count(),
            )
        })
        .collect();
    eprintln!("orphan endings reported: {reaped:?}");
    assert_eq!(
        reaped.iter().map(|(_, n)| n).sum::<usize>(),
        1,
        "{reaped:?}"
    );
}

// ---------------------------------------------------------------------------------
// Redis goes away and comes back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_loses_nothing() {
    redis_restart(None, Duration::from_secs(2)).await;
}

/// An outage longer than the lease must not end jobs whose owners are alive: the
/// owners ride it out (`store_outage_grace`, 30 s) and renew their leases once Redis
/// is back. When Redis comes back every lease has expired, so a replica judges leases
/// only after a whole lease TTL of health (`RedisStore::may_judge_leases`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_longer_than_the_lease_keeps_live_jobs_running() {
    redis_restart(Some(1500), Duration::from_secs(3)).await;
}

/// Three replicas on a Redis of the test's own, which goes down for `outage` while
/// jobs stream; `lease_ttl` as given in milliseconds (default 8 s).
async fn redis_restart(lease_ttl_ms: Option<u64>, outage_for: Duration) {
    const JOBS: usize = 3;
    const TOKENS: usize = 300;
    let mut redis = OwnRedis::start_persistent();
    let db = TestDb::create().await;
    let prefix = KeyPrefix::on(&redis.url());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &redis.url(),
        &db.url,
        prefix.name(),
        &format!(
            r#"[redis]
key_prefix = "@PREFIX@"
timeout = "1s"
{lease}

[jobs]
reap_interval = "500ms"
retention = "10m"

[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

[[models]]
name = "long"
provider = "demo"
[models.options]
tokens = {TOKENS}
token_delay = "10ms"
"#,
            lease = lease_ttl_ms
                .map(|ms| format!("lease_ttl = \"{ms}ms\""))
                .unwrap_or_default()
        ),
    );
    let replicas = spawn_replicas(&config);
    for r in &replicas {
        assert_eq!(get(r, "/readyz").await.0, 200);
    }

    // One job per replica, each followed from the two others with the client library
    // (which resumes by cursor whenever a connection fails).
    let mut jobs = Vec::new();
    for (j, r) in replicas.iter().enumerate() {
        let (s, v) = post(
            r,
            "/api/chat",
            json!({"text": format!("question {j}"), "model": "long"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        jobs.push(v);
    }
    let mut followers = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let sid = job["streamId"].as_str().unwrap().to_string();
        for k in [(j + 1) % 3, (j + 2) % 3] {
            let client = Client::new(&replicas[k].url, &token())
                .unwrap()
                .with_backoff(
                    Duration::from_millis(50),
                    Duration::from_millis(500),
                    Duration::from_secs(60),
                );
            let (tx, rx) = tokio::sync::watch::channel(0usize);
            let sid = sid.clone();
            let task = tokio::spawn(async move {
                let mut events: Vec<StreamEvent> = Vec::new();
                let end = client
                    .follow(&sid, None, |ev| {
                        events.push(ev.clone());
                        let _ = tx.send(events.len());
                    })
                    .await;
                (end, events)
            });
            followers.push((j, replicas[k].name, task, rx));
        }
    }
    for (j, name, _, rx) in &mut followers {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= 20))
            .await
            .unwrap_or_else(|_| panic!("job {j} streams to {name}"))
            .unwrap();
    }

    // Redis goes down mid-stream, for about two seconds.
    redis.stop();
    let down = Instant::now();
    let at_stop: Vec<usize> = followers.iter().map(|(_, _, _, rx)| *rx.borrow()).collect();
    let mut saw_unready = false;
    while down.elapsed() < Duration::from_millis(1500) {
        let (s, body) = get(&replicas[0], "/readyz").await;
        if s == 503 {
            saw_unready = true;
            assert_ne!(body["store"], "ok", "{body}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_unready, "/readyz stayed 200 while Redis was down");
    let (s, e) = post(
        &replicas[1],
        "/api/chat",
        json!({"text": "while down", "model": "long"}),
    )
    .await;
    assert_eq!(s, 503, "{e}");
    assert_eq!(e["error"]["code"], "store_unavailable", "{e}");
    if let Some(rest) = outage_for.checked_sub(down.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let outage = down.elapsed();
    redis.restart();
    let up = Instant::now();

    // Ready again within a few seconds, everywhere.
    for r in &replicas {
        loop {
            let (s, body) = get(r, "/readyz").await;
            if s == 200 {
                break;
            }
            assert!(
                up.elapsed() < Duration::from_secs(5),
                "{} not ready {:?} after Redis came back: {body}",
                r.name,
                up.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ready_after = up.elapsed();

    // Every job ends; every follower got exactly the log.
    let mut by_job: HashMap<usize, Vec<Vec<StreamEvent>>> = HashMap::new();
    for (i, (j, name, task, _)) in followers.into_iter().enumerate() {
        let (end, events) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap_or_else(|_| panic!("job {j} did not end for {name}"))
            .unwrap();
        let end = end.unwrap_or_else(|e| panic!("job {j} on {name}: {e}"));
        assert!(
            at_stop[i] < events.len() && !events[..at_stop[i]].iter().any(StreamEvent::is_terminal),
            "job {j} on {name}: the outage was not mid-stream"
        );
        for (seq, ev) in events.iter().enumerate() {
            assert_eq!(ev.seq, seq as u64, "job {j} on {name}: gap or duplicate");
        }
        assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
        assert_eq!(events.last().unwrap(), &end);
        assert_eq!(end.event, "final", "job {j} on {name}: {:?}", end.data);
        assert_eq!(end.data["status"], "complete", "job {j} on {name}");
        let text: String = events.iter().map(StreamEvent::text).collect();
        assert_eq!(
            end.data["responseMessage"]["text"].as_str().unwrap(),
            text,
            "job {j} on {name}: final text is not the deltas"
        );
        assert_eq!(text.split_whitespace().count(), TOKENS);
        by_job.entry(j).or_default().push(events);
    }
    for (j, job) in jobs.iter().enumerate() {
        let sid = job["streamId"].as_str().unwrap();
        let runs = &by_job[&j];
        assert_eq!(runs[0], runs[1], "job {j}: the two followers differ");
        let stored = prefix.log(sid).await;
        assert_eq!(
            stored.len(),
            runs[0].len(),
            "job {j}: Redis holds another log"
        );
        let stored_terminals = stored
            .iter()
            .filter(|f| {
                let f = parse_frame(f.to_vec());
                is_terminal(f.event.as_deref().unwrap())
            })
            .count();
        assert_eq!(stored_terminals, 1);
        let cid = job["conversationId"].as_str().unwrap();
        let (_, msgs) = get(&replicas[j], &format!("/api/conversations/{cid}/messages")).await;
        let saved = &msgs["messages"][1];
        assert_eq!(saved["unfinished"], false, "{msgs}");
        assert_eq!(
            saved["text"],
            runs[0].last().unwrap().data["responseMessage"]["text"]
        );
    }
    eprintln!(
        "Redis down {outage:?}; replicas ready {ready_after:?} after it came back; \
         {JOBS} jobs × 2 followers exact"
    );
    drop(replicas);
    redis.kill();
}

// ---------------------------------------------------------------------------------
// Redis restarted without persistence.

/// Two replicas on a Redis of the test's own that keeps nothing on disk; it is killed
/// and started again on the same port while two jobs stream (one owned by each
/// replica), each followed from both replicas. Every log is gone, so what a user can
/// be given is the end of each stream: one terminal `error` `store_unavailable` with
/// the next seq, no event lost or repeated before it, the partial answer saved by the
/// owner (`unfinished`, `error`), nothing left running. Then the replicas load their
/// functions again: `/readyz` is 200 and a new chat completes, watched from the other
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_ends_the_lost_jobs_and_recovers() {
    let mut redis = OwnRedis::start();
    let db = TestDb::create().await;
    let prefix = KeyPrefix::on(&redis.url());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &redis.url(),
        &db.url,
        prefix.name(),
        r#"[redis]
key_prefix = "@PREFIX@"
timeout = "1s"

[jobs]
reap_interval = "500ms"
retention = "10m"

[limits]
concurrent_per_user = 0
messages_per_user_per_minute = 0
messages_per_ip_per_minute = 0

[[models]]
name = "long"
provider = "demo"
[models.options]
tokens = 100000
token_delay = "10ms"

[[models]]
name = "short"
provider = "demo"
[models.options]
tokens = 30
token_delay = "5ms"
"#,
    );
    let replicas = spawn_named(&config, &["A", "B"]);
    let mut jobs = Vec::new();
    for (j, r) in replicas.iter().enumerate() {
        let (s, v) = post(
            r,
            "/api/chat",
            json!({"text": format!("question {j}"), "model": "long"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        jobs.push(v);
    }
    let mut followers = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let sid = job["streamId"].as_str().unwrap().to_string();
        for r in &replicas {
            let client = Client::new(&r.url, &token()).unwrap().with_backoff(
                Duration::from_millis(50),
                Duration::from_millis(500),
                Duration::from_secs(30),
            );
            let (tx, rx) = tokio::sync::watch::channel(0usize);
            let sid = sid.clone();
            let task = tokio::spawn(async move {
                let mut events: Vec<StreamEvent> = Vec::new();
                let end = client
                    .follow(&sid, None, |ev| {
                        events.push(ev.clone());
                        let _ = tx.send(events.len());
                    })
                    .await;
                (end, events)
            });
            followers.push((j, r.name, task, rx));
        }
    }
    for (j, name, _, rx) in &mut followers {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= 20))
            .await
            .unwrap_or_else(|_| panic!("job {j} streams to {name}"))
            .unwrap();
    }

    redis.kill();
    let at_kill: Vec<usize> = followers.iter().map(|(_, _, _, rx)| *rx.borrow()).collect();
    redis.restart();
    let up = Instant::now();

    for (i, (j, name, task, _)) in followers.into_iter().enumerate() {
        let (end, events) = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap_or_else(|_| panic!("job {j} did not end for {name}"))
            .unwrap();
        let end = end.unwrap_or_else(|e| panic!("job {j} on {name}: {e}"));
        assert!(
            at_kill[i] < events.len(),
            "job {j} on {name}: not mid-stream"
        );
        for (seq, ev) in events.iter().enumerate() {
            assert_eq!(ev.seq, seq as u64, "job {j} on {name}: gap or duplicate");
        }
        assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
        assert_eq!(events.last().unwrap(), &end);
        assert_eq!(end.event, "error", "job {j} on {name}: {:?}", end.data);
        assert_eq!(end.data["code"], "store_unavailable", "job {j} on {name}");
        eprintln!(
            "job {j} on {name}: {} events, ended {:?} after Redis came back",
            events.len(),
            up.elapsed()
        );
    }

    // Ready again; the owners saved their partial answers; nothing runs.
    for r in &replicas {
        loop {
            let (s, body) = get(r, "/readyz").await;
            if s == 200 {
                break;
            }
            assert!(
                up.elapsed() < Duration::from_secs(10),
                "{} not ready {:?} after Redis came back: {body}",
                r.name,
                up.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (j, job) in jobs.iter().enumerate() {
        let cid = job["conversationId"].as_str().unwrap();
        let rid = job["responseMessageId"].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, msgs) = get(
                &replicas[1 - j],
                &format!("/api/conversations/{cid}/messages"),
            )
            .await;
            let saved = msgs["messages"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["messageId"] == rid).cloned());
            if let Some(saved) = saved {
                assert_eq!(saved["unfinished"], true, "{saved}");
                assert_eq!(saved["error"], true, "{saved}");
                assert!(!saved["text"].as_str().unwrap().is_empty());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "job {j}: no partial answer saved: {msgs}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (s, gone) = get(
            &replicas[j],
            &format!("/api/chat/stream/{}", job["streamId"].as_str().unwrap()),
        )
        .await;
        assert_eq!(s, 404, "the lost log is gone: {gone}");
    }
    for r in &replicas {
        let (_, active) = get(r, "/api/chat/active").await;
        assert_eq!(active["activeJobIds"], json!([]), "{}: {active}", r.name);
    }

    // New chats work (the functions are loaded again), watched from the other replica;
    // a lost job's conversation takes a new turn.
    let (s, v) = post(
        &replicas[0],
        "/api/chat",
        json!({"text": "after", "model": "short", "conversationId": jobs[0]["conversationId"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let client = Client::new(&replicas[1].url, &token()).unwrap();
    let end = tokio::time::timeout(
        Duration::from_secs(20),
        client.follow(v["streamId"].as_str().unwrap(), None, |_| {}),
    )
    .await
    .expect("the new chat ends")
    .unwrap();
    assert_eq!(end.event, "final", "{:?}", end.data);
    assert_eq!(end.data["status"], "complete");
    drop(replicas);
    redis.kill();
}

/// Redis unreachable at start: `serve` exits non-zero with one line on stderr that
/// names Redis and its address.
#[test]
fn serve_exits_with_one_line_when_redis_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redis://{}", unused_addr());
    let db = format!("sqlite://{}", dir.path().join("g.db").display());
    let config = write_config(dir.path(), &store, &db, "unused", "");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("genstream: "), "{stderr}");
    assert!(lines[0].contains("Redis"), "{stderr}");
    assert!(lines[0].contains(&store), "{stderr}");
    eprintln!("{}", lines[0]);
}
