//! `redis-fanout --processes`: the fan-out rows with every replica a `genstream serve`
//! child process, and this process holding only the subscribers. Server, Redis and
//! clients are then separate processes, as issue 13 measured its baseline black-box
//! (the in-process rows share one process, and with `--server-runtime` only its
//! threads are apart).
//!
//! Nothing inside the server is observed: the lateness is taken where a user sees it,
//! at the subscriber. For each seq on the demo's fixed-rate clock, its receipt instant
//! minus seq × token delay, less the least of that over the subscriber's stream (the
//! job's clock origin as its most punctual token shows it); so it counts the append,
//! the fan-out and the socket, where the in-process rows' "behind the token clock"
//! stops at the owner's log.

use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};

use crate::cluster::{behind_clock, drop_keys, redis_calls, redis_cpu};
use crate::http;
use crate::memory::{Server, ServerArgs, config_toml_with};
use crate::report::{AllRunning, ms, quantile, thousands};
use crate::sys;

/// The table's headers, one per [`fanout_run`] row cell.
pub(crate) const HEADERS: &[&str] = &[
    "store",
    "server processes",
    "jobs × subscribers",
    "token delay × tokens",
    "events delivered",
    "delivered ev/s (all jobs running)",
    "p50 ms behind the token clock",
    "p99 ms behind the token clock",
    "max ms behind the token clock",
    "Redis commands / event",
    "server CPU s",
    "Redis CPU s",
    "client CPU s",
    "setup s",
];

/// One run: `replicas` server processes on `store` ("memory" or a Redis URL; memory
/// with one process only), `jobs` jobs started on the first, each read by
/// `subs_per_job` subscribers spread over the processes. Every job's first token
/// waits 3 s + 4 ms per job, so that all are started and subscribed to before any
/// streams. CPU seconds count from the end of the setup to the last receipt: the
/// server processes' (all threads), Redis's (`INFO cpu`, every client of it) and this
/// process's. Errors: a server that does not start, a start or subscription refused,
/// or a subscriber that misses a seq.
pub(crate) async fn fanout_run(
    store: &str,
    replicas: usize,
    jobs: usize,
    subs_per_job: usize,
    tokens: u32,
    delay_ms: u64,
    server: &ServerArgs,
) -> Result<Vec<String>, String> {
    let redis = store != "memory";
    let prefix = format!("gsbench-{}", genstream_engine::new_id());
    let first_token_ms = 3000 + 4 * jobs as u64;
    let options = format!(
        "tokens = {tokens}\ntoken_delay = \"{delay_ms}ms\"\n\
         first_token_delay = \"{first_token_ms}ms\""
    );
    let tail = if redis {
        format!("[redis]\nkey_prefix = \"{prefix}\"\n")
    } else {
        String::new()
    };
    // The processes share the first one's SQLite file (the owner writes the
    // conversations; the others only serve streams from Redis).
    let mut shared_db: Option<String> = None;
    let mut servers = Vec::with_capacity(replicas);
    for i in 0..replicas {
        servers.push(Server::start_config(
            server,
            &format!("fanout-{i}"),
            |db| {
                let db = shared_db.get_or_insert_with(|| db.to_owned());
                config_toml_with(
                    store,
                    db,
                    jobs * 2 + 100,
                    "max_events_per_job = 50000",
                    &options,
                    &tail,
                )
            },
        )?);
    }
    let token = servers[0].token.clone();
    let base = servers[0].base();
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let client = reqwest::Client::new();
    let calls_before = if redis { redis_calls().await } else { 0 };
    let setup_started = Instant::now();
    // Jobs are started 16 at a time; subscriber k of job j goes to process
    // (j × subs_per_job + k) mod replicas.
    let subs: Vec<Vec<_>> = futures::stream::iter(0..jobs)
        .map(|j| {
            let (client, base, token, addrs) = (&client, &base, &token, &addrs);
            async move {
                let sid =
                    http::start_chat(client, base, token, "bench", &format!("fan out {j}")).await?;
                let mut subs = Vec::with_capacity(subs_per_job);
                for k in 0..subs_per_job {
                    let addr = addrs[(j * subs_per_job + k) % addrs.len()];
                    let stream = http::open_stream(addr, &sid, token, true).await?;
                    subs.push(tokio::spawn(http::read_ids(
                        stream,
                        Instant::now(),
                        Duration::from_secs(120),
                    )));
                }
                Ok::<_, String>(subs)
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let setup = setup_started.elapsed();
    let server_ticks = || -> u64 { servers.iter().map(|s| sys::process_ticks(s.pid)).sum() };
    let (server0, client0) = (server_ticks(), sys::process_ticks(std::process::id()));
    let redis0 = if redis { redis_cpu().await } else { 0.0 };
    // Each subscriber's receipt instant of every seq, in seq order.
    let mut streams: Vec<Vec<Instant>> = Vec::with_capacity(jobs * subs_per_job);
    for t in subs.into_iter().flatten() {
        let r = t.await.map_err(|e| e.to_string())?;
        let mut at = Vec::with_capacity(r.seen.len());
        for (seq, when) in r.seen {
            if seq as usize != at.len() {
                return Err(format!(
                    "a subscriber got seq {seq} after {} events: a gap or a duplicate",
                    at.len()
                ));
            }
            at.push(when);
        }
        streams.push(at);
    }
    let tck = sys::clk_tck();
    let server_cpu = server_ticks().saturating_sub(server0) as f64 / tck;
    let client_cpu = sys::process_ticks(std::process::id()).saturating_sub(client0) as f64 / tck;
    let redis_cpu = if redis {
        (redis_cpu().await - redis0).max(0.0)
    } else {
        0.0
    };
    let calls = if redis {
        redis_calls().await.saturating_sub(calls_before)
    } else {
        0
    };
    drop(servers);
    if redis {
        drop_keys(&prefix).await;
    }

    let delivered: u64 = streams.iter().map(|s| s.len() as u64).sum();
    let rate_all_running = match AllRunning::of(&streams) {
        Some(w) => {
            let n = streams
                .iter()
                .flatten()
                .filter(|at| w.contains(**at))
                .count();
            thousands(w.rate(n as u64) as u64)
        }
        None => "— (never all at once)".into(),
    };
    let behind = behind_clock(&streams, delay_ms);
    // Each job's events, appended once, read by `subs_per_job` subscribers.
    let appended = delivered / subs_per_job.max(1) as u64;
    Ok(vec![
        if redis { "redis" } else { "memory" }.into(),
        replicas.to_string(),
        format!("{jobs} × {subs_per_job}"),
        format!("{delay_ms} ms × {tokens}"),
        thousands(delivered),
        rate_all_running,
        ms(quantile(&behind, 0.5)),
        ms(quantile(&behind, 0.99)),
        ms(behind.last().copied().unwrap_or(0)),
        if redis {
            format!("{:.1}", calls as f64 / appended.max(1) as f64)
        } else {
            "—".into()
        },
        format!("{server_cpu:.1}"),
        if redis {
            format!("{redis_cpu:.1}")
        } else {
            "—".into()
        },
        format!("{client_cpu:.1}"),
        format!("{:.1}", setup.as_secs_f64()),
    ])
}
