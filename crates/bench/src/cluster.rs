//! Redis-mode and usage-ledger benchmarks.
//!
//! - `redis-fanout`: one job fanned out to N subscribers spread over 1 or 3 in-process
//!   replicas sharing the real Redis at 127.0.0.1:6379, next to the memory store with
//!   the same load: delivered events/s, append→receipt delay, and Redis commands per
//!   event appended (from `INFO commandstats`, so it counts everything the replicas
//!   sent: appends, mirror reads, the heal checks). With `--processes` the replicas
//!   are `genstream serve` child processes instead ([`crate::processes`]).
//! - `resume-latency`: reconnect → first byte for a job of 10,000 events, on a replica
//!   whose mirror is cold (no subscriber of that job has read it there yet) and warm.
//! - `abort-latency`: abort round trip across replicas (request on B, job on A) and
//!   on the owner itself; the round trip includes stopping the generation, saving the
//!   partial answer and appending `final`.
//! - `ledger`: the latency of one `spend` (5 lines, one transaction) on SQLite and
//!   PostgreSQL, and of a repeated (no-op) spend.
//!
//! Each replica is a full server (`build_state` + axum on its own 127.0.0.1 port) with
//! its own Redis connections. The append instant of each seq is taken by a task on the
//! owner replica watching its own log mirror, so the delay under-states by that task's
//! wake-up latency (microseconds).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use genstream_engine::ledger::{Line, TokenType};
use genstream_engine::persist::{Persistence, SpendContext, SpendRequest};
use genstream_providers::DemoOptions;
use genstream_server::config::{Config, LimitsConfig, ModelConfig};
use genstream_server::{AppState, app};
use serde_json::json;

use crate::http;
use crate::memory::SECRET;
use crate::report::{ms, quantile, table, thousands};

pub(crate) fn redis_url() -> String {
    std::env::var("GENSTREAM_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub(crate) fn pg_url() -> String {
    std::env::var("GENSTREAM_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub(crate) struct Replica {
    pub(crate) state: AppState,
    pub(crate) addr: SocketAddr,
}

/// Demo options: `tokens` tokens, `token_delay` apart.
pub(crate) fn demo(tokens: u32, token_delay: Duration) -> DemoOptions {
    DemoOptions {
        tokens,
        token_delay,
        ..DemoOptions::default()
    }
}

// Field by field reads better than a nested struct literal for a dozen settings.
#[allow(clippy::field_reassign_with_default)]
pub(crate) fn config(store: &str, prefix: &str, options: DemoOptions) -> Config {
    let mut c = Config::default();
    c.bind = "127.0.0.1:0".into();
    c.store = store.into();
    c.database = "sqlite::memory:".into();
    c.redis.key_prefix = prefix.into();
    c.redis.timeout = Duration::from_secs(10);
    c.auth.jwt_secret = Some(SECRET.into());
    c.limits = LimitsConfig::off();
    c.jobs.max_events_per_job = 50_000;
    c.jobs.max_live_jobs = 10_000;
    c.models = vec![ModelConfig::demo("bench", options)];
    c
}

pub(crate) async fn replica(config: &Config) -> Result<Replica, String> {
    let (state, _) = genstream_server::serve::build_state(config)
        .await
        .map_err(|e| e.to_string())?;
    state.manager.spawn_reaper();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let router = app(state.clone(), 1 << 20);
    tokio::spawn(
        async move { axum::serve(genstream_server::serve::no_delay(listener), router).await },
    );
    Ok(Replica { state, addr })
}

pub(crate) fn token(state: &AppState) -> Result<String, String> {
    state
        .auth
        .mint("bench", Duration::from_secs(3600))
        .map_err(|e| e.to_string())
}

/// One section of the bench Redis's `INFO`; empty when Redis cannot be reached.
async fn redis_info(section: &str) -> String {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return String::new();
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return String::new();
    };
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap_or_default()
}

/// Commands Redis has run so far (`INFO commandstats`, every command's `calls=`).
pub(crate) async fn redis_calls() -> u64 {
    redis_info("commandstats")
        .await
        .lines()
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Deletes the keys under `prefix` (a scenario's own), so that a run does not leave
/// its logs in a shared Redis for the whole retention time (about 1 GB for
/// `redis-fanout`). Best effort: a failure leaves the keys to their TTLs.
pub(crate) async fn drop_keys(prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: Result<u64, _> = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

type StampTask = tokio::task::JoinHandle<Vec<Instant>>;
type SubTask = tokio::task::JoinHandle<http::Receipts>;

/// Options of [`fanout_run`] beyond the load's shape (`Default`: as `redis-fanout`).
#[derive(Default)]
pub(crate) struct RunOptions {
    /// Run the replicas on this runtime (name its threads `server-N`, so their CPU is
    /// told apart from the subscribers'), instead of the caller's.
    pub(crate) server: Option<tokio::runtime::Handle>,
    /// `http.sse_chunk_bytes` of the replicas (default: the config's).
    pub(crate) sse_chunk_bytes: Option<usize>,
    /// The demo's wait before the first token, in ms (default 2 s + 4 ms per job).
    pub(crate) first_token_ms: Option<u64>,
}

/// What one [`fanout_run`] measured, beyond its `redis-fanout` table row.
pub(crate) struct RunFigures {
    pub(crate) row: Vec<String>,
    /// Events received by all subscribers.
    pub(crate) delivered: u64,
    /// Delivered events/s while every job was producing tokens, if they ever all were.
    pub(crate) rate_all_running: Option<f64>,
    /// Delivered events/s from the first receipt to the last.
    pub(crate) rate_overall: f64,
    /// Appends/s of one job, mean over the jobs (from its first token to its end).
    pub(crate) per_job_rate: f64,
    /// CPU seconds of the `server-N` threads (user + system, and system alone) from the
    /// end of the setup to the last receipt; 0 without [`RunOptions::server`].
    pub(crate) server_cpu: f64,
    pub(crate) server_sys: f64,
    /// CPU seconds Redis spent meanwhile (`INFO cpu`: user + system, all its clients).
    pub(crate) redis_cpu: f64,
    /// From the end of the setup to the last receipt.
    pub(crate) wall: Duration,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
}

/// One fan-out run: `jobs` jobs, each with `subs_per_job` subscribers spread over the
/// replicas; every job starts on the first replica. Returns the `redis-fanout` table
/// row and the figures behind it.
pub(crate) async fn fanout_run(
    store: &str,
    replicas: usize,
    jobs: usize,
    subs_per_job: usize,
    tokens: u32,
    delay_ms: u64,
    opts: &RunOptions,
) -> Result<RunFigures, String> {
    let prefix = format!("gsbench-{}", genstream_engine::new_id());
    // Every job waits this long before its first token, so that all of them are
    // started and subscribed to before any streams: the rates below are then those of
    // all jobs running at once, not of a staggered start.
    let first_token_ms = opts.first_token_ms.unwrap_or(2000 + 4 * jobs as u64);
    let options = DemoOptions {
        tokens,
        token_delay: Duration::from_millis(delay_ms),
        first_token_delay: Duration::from_millis(first_token_ms),
        ..DemoOptions::default()
    };
    let mut cfg = config(store, &prefix, options);
    if let Some(n) = opts.sse_chunk_bytes {
        cfg.http.sse_chunk_bytes = n;
    }
    let mut rs = Vec::new();
    for _ in 0..replicas {
        rs.push(match &opts.server {
            Some(h) => {
                // `block_on` on a blocking thread: the future stays on that thread
                // (the compiler cannot prove it `Send` for `spawn`), while everything
                // it spawns (the listener, the job tasks) runs on `h`'s runtime.
                let (cfg, h) = (cfg.clone(), h.clone());
                tokio::task::spawn_blocking(move || h.block_on(replica(&cfg)))
                    .await
                    .map_err(|e| e.to_string())??
            }
            None => replica(&cfg).await?,
        });
    }
    let owner = &rs[0];
    let tok = token(&owner.state)?;
    let http_client = reqwest::Client::new();
    let calls_before = redis_calls().await;
    let append_before = append_buckets();
    let setup_started = Instant::now();
    // Jobs are started 16 at a time (a job's start is several round trips in Redis
    // mode); subscriber k of job j goes to replica (j × subs_per_job + k) mod replicas.
    let started: Vec<(StampTask, Vec<(usize, SubTask)>)> = futures::stream::iter(0..jobs)
        .map(|j| {
            let (rs, tok, http_client) = (&rs, &tok, &http_client);
            async move {
                let owner = &rs[0];
                let sid = http::start_chat(
                    http_client,
                    &format!("http://{}", owner.addr),
                    tok,
                    "bench",
                    &format!("fan out {j}"),
                )
                .await?;
                // Append instants, as seen by the owner's own log.
                let (_, log) = owner
                    .state
                    .manager
                    .job_for("bench", &sid)
                    .await
                    .map_err(|e| e.to_string())?;
                let stamp_task = tokio::spawn(async move {
                    let mut rx = log.watch();
                    let mut stamps: Vec<Instant> = Vec::new();
                    loop {
                        rx.borrow_and_update();
                        let len = log.len() as usize;
                        let now = Instant::now();
                        while stamps.len() < len {
                            stamps.push(now);
                        }
                        if log.terminal().is_some() || rx.changed().await.is_err() {
                            return stamps;
                        }
                    }
                });
                let mut subs = Vec::new();
                for k in 0..subs_per_job {
                    let addr = rs[(j * subs_per_job + k) % replicas].addr;
                    let stream = http::open_stream(addr, &sid, tok, true).await?;
                    subs.push((
                        j,
                        tokio::spawn(http::read_ids(
                            stream,
                            Instant::now(),
                            Duration::from_secs(120),
                        )),
                    ));
                }
                Ok::<_, String>((stamp_task, subs))
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let setup = setup_started.elapsed();
    let (stamp_tasks, subs): (Vec<StampTask>, Vec<Vec<(usize, SubTask)>>) =
        started.into_iter().unzip();
    let subs: Vec<(usize, SubTask)> = subs.into_iter().flatten().collect();
    let cpu0 = crate::sys::thread_ticks();
    let redis0 = redis_cpu().await;
    let streaming = Instant::now();
    let mut stamps = Vec::new();
    for t in stamp_tasks {
        stamps.push(t.await.map_err(|e| e.to_string())?);
    }
    let mut receipts = Vec::with_capacity(subs.len());
    for (j, s) in subs {
        receipts.push((j, s.await.map_err(|e| e.to_string())?));
    }
    let wall = streaming.elapsed();
    let cpu1 = crate::sys::thread_ticks();
    let redis_cpu = (redis_cpu().await - redis0).max(0.0);
    let (server_user, server_sys) =
        crate::sys::cpu_secs_between(&cpu0, &cpu1, |n| n.starts_with("server-"));
    let calls = redis_calls().await.saturating_sub(calls_before);
    let append_p99 = append_quantile(&append_before, &append_buckets(), 0.99);
    if store != "memory" {
        drop_keys(&prefix).await;
    }
    let all_running = crate::report::AllRunning::of(&stamps);
    let mut in_window = 0u64;
    let mut delays: Vec<u64> = Vec::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for (j, r) in &receipts {
        let j = *j;
        for (seq, at) in &r.seen {
            if let Some(appended) = stamps[j].get(*seq as usize) {
                delays.push(at.saturating_duration_since(*appended).as_micros() as u64);
            }
            if all_running.is_some_and(|w| w.contains(*at)) {
                in_window += 1;
            }
            first = Some(first.map_or(*at, |f: Instant| f.min(*at)));
            last = Some(last.map_or(*at, |l: Instant| l.max(*at)));
        }
    }
    delays.sort_unstable();
    let behind = behind_clock(&stamps, delay_ms);
    let secs = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64().max(1e-3),
        _ => 1.0,
    };
    let rate_all_running = all_running.map_or_else(
        || "— (never all at once)".into(),
        |w| thousands(w.rate(in_window) as u64),
    );
    let events: u64 = stamps.iter().map(|s| s.len() as u64).sum();
    let per_job_rate = {
        let rates: Vec<f64> = stamps
            .iter()
            .filter(|v| v.len() > 2 && v[v.len() - 1] > v[1])
            .map(|v| (v.len() - 2) as f64 / (v[v.len() - 1] - v[1]).as_secs_f64())
            .collect();
        rates.iter().sum::<f64>() / rates.len().max(1) as f64
    };
    let row = vec![
        if store == "memory" {
            "memory".into()
        } else {
            format!("redis, {replicas} replica(s)")
        },
        format!("{jobs} × {subs_per_job}"),
        format!("{delay_ms} ms × {tokens}"),
        thousands(delays.len() as u64),
        rate_all_running,
        thousands((delays.len() as f64 / secs) as u64),
        ms(quantile(&delays, 0.5)),
        ms(quantile(&delays, 0.99)),
        ms(delays.last().copied().unwrap_or(0)),
        ms(quantile(&behind, 0.99)),
        append_p99,
        if store == "memory" {
            "—".into()
        } else {
            format!("{:.1}", calls as f64 / events.max(1) as f64)
        },
        format!("{:.1}", setup.as_secs_f64()),
    ];
    Ok(RunFigures {
        row,
        delivered: delays.len() as u64,
        rate_all_running: all_running.map(|w| w.rate(in_window)),
        rate_overall: delays.len() as f64 / secs,
        per_job_rate,
        server_cpu: server_user + server_sys,
        server_sys,
        redis_cpu,
        wall,
        p50_us: quantile(&delays, 0.5),
        p99_us: quantile(&delays, 0.99),
    })
}

/// How late each event came behind the demo's fixed-rate token clock, in µs, sorted:
/// for each of `streams` (one job's instants by seq: when its owner's log got each,
/// or when a subscriber received each), instant(seq) − seq × `delay_ms`, less the
/// least of that over the stream (the job's clock origin, as its most punctual token
/// shows it). The first two seqs (created, the step) and the last three (usage, final
/// and the like) are not on the clock; a stream of fewer than 6 is skipped.
pub(crate) fn behind_clock(streams: &[Vec<Instant>], delay_ms: u64) -> Vec<u64> {
    let tick = Duration::from_millis(delay_ms);
    let mut behind: Vec<u64> = Vec::new();
    for s in streams {
        if s.len() < 6 {
            continue;
        }
        let on_clock = &s[2..s.len() - 3];
        let offsets: Vec<Instant> = on_clock
            .iter()
            .enumerate()
            .map(|(k, at)| at.checked_sub(tick * k as u32).unwrap_or(*at))
            .collect();
        if let Some(origin) = offsets.iter().min() {
            behind.extend(
                offsets
                    .iter()
                    .map(|o| o.duration_since(*origin).as_micros() as u64),
            );
        }
    }
    behind.sort_unstable();
    behind
}

/// Redis's own CPU seconds so far (`INFO cpu`: `used_cpu_user` + `used_cpu_sys`), 0
/// when it cannot be read. It counts every client of that Redis, not only this run.
pub(crate) async fn redis_cpu() -> f64 {
    redis_info("cpu")
        .await
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            matches!(k, "used_cpu_user" | "used_cpu_sys")
                .then(|| v.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The cumulative bucket counts of `genstream_append_duration_seconds` (one event's
/// append, from the job's emit to the store's acknowledgement) in this process's
/// Prometheus recorder, by upper bound in seconds.
fn append_buckets() -> Vec<(f64, u64)> {
    let Some(handle) = genstream_server::observe::prometheus() else {
        return Vec::new();
    };
    // Samples are folded into the buckets by upkeep.
    handle.run_upkeep();
    let prefix = format!(
        "{}_bucket{{le=\"",
        genstream_engine::metrics::APPEND_SECONDS
    );
    handle
        .render()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the appends between two [`append_buckets`] readings, as the
/// upper bound of its histogram bucket ("≤ 25" ms), or "—" without samples.
fn append_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> String {
    let at = |b: &[(f64, u64)], le: f64| b.iter().find(|(l, _)| *l == le).map_or(0, |x| x.1);
    let deltas: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| (*le, n.saturating_sub(at(before, *le))))
        .collect();
    let total = deltas.iter().map(|d| d.1).max().unwrap_or(0);
    if total == 0 {
        return "—".into();
    }
    let want = (q * total as f64).ceil() as u64;
    match deltas.iter().find(|(_, n)| *n >= want) {
        Some((le, _)) if le.is_finite() => format!("≤ {}", le * 1000.0),
        _ => "> 30,000".into(),
    }
}

/// `redis-fanout`: 1 job × `subscribers` and `subscribers` jobs × 1 (only the latter
/// with `many_jobs_only`), each on the memory store and on Redis with 1 and 3 replicas.
/// With `processes`, each replica is a `genstream serve` child process
/// ([`crate::processes`]); else in-process, on this process's runtime or, with
/// `server_runtime`, on a runtime of their own.
pub fn redis_fanout(
    subscribers: usize,
    tokens: u32,
    delay_ms: u64,
    many_jobs_only: bool,
    server_runtime: bool,
    processes: Option<&crate::memory::ServerArgs>,
) -> Result<(), String> {
    let rt = runtime()?;
    let shapes: &[(usize, usize)] = if many_jobs_only {
        &[(subscribers, 1)]
    } else {
        &[(1, subscribers), (subscribers, 1)]
    };
    let server_rt = if server_runtime {
        Some(crate::saturation::server_runtime("server")?)
    } else {
        None
    };
    let opts = RunOptions {
        server: server_rt.as_ref().map(|r| r.handle().clone()),
        ..RunOptions::default()
    };
    let mut rows = Vec::new();
    for &(jobs, per_job) in shapes {
        for (store, replicas) in [("memory", 1), ("redis", 1), ("redis", 3)] {
            eprintln!("redis-fanout: {jobs} × {per_job}, {store} × {replicas}");
            let store = if store == "redis" {
                redis_url()
            } else {
                "memory".into()
            };
            rows.push(rt.block_on(async {
                match processes {
                    Some(server) => {
                        crate::processes::fanout_run(
                            &store, replicas, jobs, per_job, tokens, delay_ms, server,
                        )
                        .await
                    }
                    None => fanout_run(&store, replicas, jobs, per_job, tokens, delay_ms, &opts)
                        .await
                        .map(|f| f.row),
                }
            })?);
        }
    }
    if processes.is_some() {
        println!(
            "\n### redis-fanout --processes\n\nevery replica a `genstream serve` process, the subscribers in the bench process, Redis its own; subscribers spread evenly over the processes, every job started on the first; every job's first token waits 3 s + 4 ms per job; lateness taken at the subscriber (receipt − seq × token delay, against the job's most punctual token); CPU s from the end of the setup to the last receipt\n"
        );
        table(crate::processes::HEADERS, &rows);
        return Ok(());
    }
    let runtimes = if server_runtime {
        "in-process replicas on a 2-worker runtime of their own, the subscribers on another"
    } else {
        "in-process replicas on one 2-worker runtime with the subscribers"
    };
    println!(
        "\n### redis-fanout\n\nsubscribers spread evenly over the replicas, every job on the first; {runtimes}; every job's first token waits 2 s + 4 ms per job, so that all jobs are started and subscribed to before any streams (setup s: how long that took)\n"
    );
    table(
        &[
            "store",
            "jobs × subscribers",
            "token delay × tokens",
            "events delivered",
            "delivered ev/s (all jobs running)",
            "delivered ev/s (whole run)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99 ms behind the token clock",
            "p99 ms emit → landed",
            "Redis commands / event appended",
            "setup s",
        ],
        &rows,
    );
    if let Some(r) = server_rt {
        r.shutdown_timeout(Duration::from_secs(2));
    }
    Ok(())
}

/// Time to the first body byte of a stream request.
async fn first_byte(
    addr: SocketAddr,
    sid: &str,
    tok: &str,
    cursor: Option<u64>,
) -> Result<u64, String> {
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    let mut req = client
        .get(format!("http://{addr}/api/chat/stream/{sid}"))
        .bearer_auth(tok);
    if let Some(c) = cursor {
        req = req.header("last-event-id", c.to_string());
    }
    let mut resp = req.send().await.map_err(|e| e.to_string())?;
    let _ = resp.chunk().await.map_err(|e| e.to_string())?;
    Ok(t0.elapsed().as_micros() as u64)
}

/// `resume-latency`.
///
/// `jobs` finished jobs of 10,000 events; each is read cold once on each replica
/// (the owner `a`, `b` from seq 0, `c` from `Last-Event-ID` 9990), then warm.
pub fn resume_latency(jobs: usize) -> Result<(), String> {
    let rt = runtime()?;
    rt.block_on(async {
        let prefix = format!("gsbench-{}", genstream_engine::new_id());
        let cfg = config(&redis_url(), &prefix, demo(9_995, Duration::ZERO));
        let a = replica(&cfg).await?;
        let b = replica(&cfg).await?;
        let c = replica(&cfg).await?;
        let tok = token(&a.state)?;
        let client = reqwest::Client::new();
        let mut rows = Vec::new();
        let mut samples: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
        for i in 0..jobs {
            let sid = http::start_chat(&client, &format!("http://{}", a.addr), &tok, "bench", &format!("long {i}")).await?;
            // Let it finish (10,000 events).
            loop {
                let meta = a.state.manager.store().get_job(&sid).await.map_err(|e| e.to_string())?;
                if meta.is_some_and(|m| m.status != genstream_engine::store::JobStatus::Running) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Cold: no subscriber has opened this log on the replica yet.
            samples.entry("other replica, cold mirror, from seq 0").or_default().push(first_byte(b.addr, &sid, &tok, None).await?);
            samples.entry("other replica, cold mirror, Last-Event-ID 9990").or_default().push(first_byte(c.addr, &sid, &tok, Some(9_990)).await?);
            samples.entry("other replica, warm mirror, from seq 0").or_default().push(first_byte(b.addr, &sid, &tok, None).await?);
            samples.entry("other replica, warm mirror, Last-Event-ID 9990").or_default().push(first_byte(b.addr, &sid, &tok, Some(9_990)).await?);
            samples.entry("owner, cold mirror, Last-Event-ID 9990").or_default().push(first_byte(a.addr, &sid, &tok, Some(9_990)).await?);
            samples.entry("owner, warm mirror, from seq 0").or_default().push(first_byte(a.addr, &sid, &tok, None).await?);
        }
        for (what, mut v) in samples {
            v.sort_unstable();
            rows.push(vec![what.to_string(), v.len().to_string(), ms(quantile(&v, 0.5)), ms(quantile(&v, 0.99)), ms(*v.last().unwrap_or(&0))]);
        }
        println!("\n### resume-latency\n\nreconnect → first body byte, job of 10,000 events (Redis store, 3 replicas; each cold read is the first read of that job on that replica)\n");
        table(&["where", "samples", "p50 ms", "p99 ms", "max ms"], &rows);
        drop_keys(&prefix).await;
        Ok(())
    })
}

/// `abort-latency`.
pub fn abort_latency(n: usize) -> Result<(), String> {
    let rt = runtime()?;
    rt.block_on(async {
        let prefix = format!("gsbench-{}", genstream_engine::new_id());
        let cfg = config(&redis_url(), &prefix, demo(100_000, Duration::from_millis(10)));
        let a = replica(&cfg).await?;
        let b = replica(&cfg).await?;
        let tok = token(&a.state)?;
        let client = reqwest::Client::new();
        let mut rows = Vec::new();
        for (label, from) in [("from another replica", &b), ("on the owner", &a)] {
            let mut v = Vec::new();
            for i in 0..n {
                let sid = http::start_chat(&client, &format!("http://{}", a.addr), &tok, "bench", &format!("abort {i}")).await?;
                tokio::time::sleep(Duration::from_millis(30)).await;
                let t0 = Instant::now();
                let r = client
                    .post(format!("http://{}/api/chat/abort", from.addr))
                    .bearer_auth(&tok)
                    .json(&json!({"streamId": sid}))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("abort: {}", r.status()));
                }
                v.push(t0.elapsed().as_micros() as u64);
            }
            v.sort_unstable();
            rows.push(vec![label.to_string(), n.to_string(), ms(quantile(&v, 0.5)), ms(quantile(&v, 0.99)), ms(*v.last().unwrap_or(&0))]);
        }
        println!("\n### abort-latency\n\nabort request → answer (generation stopped, partial saved, `final` appended and seen by the asking replica); Redis store, 2 replicas, SQLite in memory\n");
        table(&["abort", "aborts", "p50 ms", "p99 ms", "max ms"], &rows);
        drop_keys(&prefix).await;
        Ok(())
    })
}

/// `ledger`.
pub fn ledger(n: usize) -> Result<(), String> {
    let rt = runtime()?;
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("gsbench-ledger-{}", genstream_engine::new_id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let sqlite = format!("sqlite://{}", dir.join("ledger.db").display());
        let schema = format!("gsbench_{}", genstream_engine::new_id().replace('-', "_"));
        let mut rows = Vec::new();
        for (label, db) in [
            ("SQLite (file, WAL)", genstream_sql::connect(&sqlite, Default::default()).await),
            ("PostgreSQL", genstream_sql::connect_with_schema(&pg_url(), &schema, Default::default()).await),
        ] {
            let db: Arc<dyn Persistence> = db.map_err(|e| e.to_string())?;
            let now = genstream_engine::now_rfc3339();
            db.ensure_balance("bench", 1_000_000_000_000, &now).await.map_err(|e| e.to_string())?;
            let mut first = Vec::new();
            let mut again = Vec::new();
            for i in 0..n {
                let req = SpendRequest {
                    user_id: "bench".into(),
                    conversation_id: "c".into(),
                    stream_id: format!("s-{i}-{}", genstream_engine::new_id()),
                    message_id: "m".into(),
                    model: "bench".into(),
                    context: SpendContext::Message,
                    lines: [TokenType::Input, TokenType::Output, TokenType::Reasoning, TokenType::CacheWrite, TokenType::CacheRead]
                        .into_iter()
                        .map(|t| Line { call_index: 0, token_type: t, tokens: 1000, rate_micro: 3_000_000, amount_micro: 3_000_000_000, estimated: false })
                        .collect(),
                    created_at: genstream_engine::now_rfc3339(),
                };
                let t0 = Instant::now();
                db.spend(&req).await.map_err(|e| e.to_string())?;
                first.push(t0.elapsed().as_micros() as u64);
                let t0 = Instant::now();
                db.spend(&req).await.map_err(|e| e.to_string())?;
                again.push(t0.elapsed().as_micros() as u64);
            }
            first.sort_unstable();
            again.sort_unstable();
            rows.push(vec![label.into(), "first spend (5 lines + balance)".into(), n.to_string(), ms(quantile(&first, 0.5)), ms(quantile(&first, 0.99))]);
            rows.push(vec![label.into(), "repeated spend (no-op)".into(), n.to_string(), ms(quantile(&again, 0.5)), ms(quantile(&again, 0.99))]);
        }
        let _ = std::fs::remove_dir_all(&dir);
        println!("\n### ledger\n\n`Persistence::spend` latency, sequential, one job's 5 lines per spend, on this machine's SQLite file and local PostgreSQL\n");
        table(&["database", "call", "spends", "p50 ms", "p99 ms"], &rows);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of `n` seqs, seq k received at `origin + k × 10 ms + late(k)`.
    fn stream(origin: Instant, n: usize, late: impl Fn(usize) -> u64) -> Vec<Instant> {
        (0..n)
            .map(|k| origin + Duration::from_millis(10 * k as u64 + late(k)))
            .collect()
    }

    #[test]
    fn behind_clock_measures_each_token_against_the_most_punctual() {
        let t0 = Instant::now();
        // On the clock throughout: nothing is behind, whatever the origin.
        let on_time = stream(t0 + Duration::from_secs(1), 20, |_| 0);
        assert_eq!(behind_clock(&[on_time], 10), vec![0; 15]);
        // Seq 7 arrives 25 ms late, seqs 2..=4 are 3 ms late (the origin is the most
        // punctual token, seq 5 on), the created / step seqs and the last three are
        // off the clock and may be anything.
        let late = stream(t0, 20, |k| match k {
            0 | 1 => 500,
            2..=4 => 3,
            7 => 25,
            17.. => 900,
            _ => 0,
        });
        let behind = behind_clock(&[late], 10);
        assert_eq!(behind.len(), 15);
        assert_eq!(behind.iter().filter(|&&b| b == 3_000).count(), 3);
        assert_eq!(behind.last(), Some(&25_000));
        assert_eq!(behind.iter().filter(|&&b| b == 0).count(), 11);
        // Streams too short to have a clock are skipped.
        assert!(behind_clock(&[stream(t0, 5, |_| 0)], 10).is_empty());
    }
}
