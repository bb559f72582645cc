//! `starts`: how many `POST /api/chat` one replica answers per second, each answer a
//! job that runs, for every store × database pair: the memory and Redis stores,
//! SQLite (a file, WAL) and PostgreSQL.
//!
//! A start is on the request path: authenticate, the conversation's claim and lock,
//! the rate and balance checks, the user message saved, the job created in the store
//! (the one-running-job-per-conversation check), `created` appended, then the answer.
//! Each start here opens a new conversation. The demo model answers with one token, so
//! the jobs end (answer saved, usage spent) while later starts arrive: the figure is
//! what a replica sustains with its jobs' own ends competing, not starts alone.
//!
//! `concurrency` clients each send their next start as soon as the last is answered,
//! over loopback HTTP/1.1 with keep-alive, until `starts` were answered; the first
//! `warmup` starts (migrations done, pools filled) are not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

use crate::cluster::{config, demo, drop_keys, pg_url, redis_url, replica, runtime, token};
use crate::report::{ms, quantile, table};
use crate::sys;

/// `genstream-bench starts`.
#[derive(clap::Args, Debug)]
pub struct StartsArgs {
    /// Starts counted per store × database pair.
    #[arg(long, default_value_t = 2000)]
    pub starts: usize,
    /// Clients sending starts at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Starts sent first and not counted.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// The database pool's connections (`pool.max_connections`); 0 = the default
    /// (8 for SQLite, 16 for PostgreSQL).
    #[arg(long, default_value_t = 0)]
    pub pool: u32,
}

/// A fresh PostgreSQL database for one row, dropped afterwards.
struct PgDb {
    admin: String,
    name: String,
    url: String,
}

impl PgDb {
    async fn create() -> Result<PgDb, String> {
        let url = pg_url();
        let (base, _) = url
            .rsplit_once('/')
            .ok_or_else(|| format!("no database in {url}"))?;
        let admin = format!("{base}/postgres");
        let name = format!("gsbench_{}", genstream_engine::new_id().replace('-', "_"));
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .map_err(|e| format!("PostgreSQL at {admin}: {e}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        Ok(PgDb {
            url: format!("{base}/{name}"),
            admin,
            name,
        })
    }

    async fn drop(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

/// Sends starts from `concurrency` clients until `n` were answered; their latencies in µs.
async fn burst(base: &str, tok: &str, n: usize, concurrency: usize) -> Result<Vec<u64>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, base, tok) = (next.clone(), base.to_string(), tok.to_string());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t0 = Instant::now();
                crate::http::start_chat(&client, &base, &tok, "bench", "start").await?;
                lat.push(t0.elapsed().as_micros() as u64);
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(all)
}

/// `starts`.
pub fn run(args: &StartsArgs) -> Result<(), String> {
    let rt = runtime()?;
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("gsbench-starts-{}", genstream_engine::new_id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut rows = Vec::new();
        for (store_label, redis) in [("memory", false), ("Redis", true)] {
            for db_label in ["SQLite (file, WAL)", "PostgreSQL"] {
                let prefix = format!("gsbench-{}", genstream_engine::new_id());
                let pg = if db_label == "PostgreSQL" { Some(PgDb::create().await?) } else { None };
                let database = match &pg {
                    Some(pg) => pg.url.clone(),
                    None => format!("sqlite://{}?mode=rwc", dir.join(format!("{prefix}.db")).display()),
                };
                let store = if redis { redis_url() } else { "memory".to_string() };
                let mut cfg = config(&store, &prefix, demo(1, Duration::from_millis(1)));
                cfg.database = database;
                cfg.pool.max_connections = args.pool;
                let r = replica(&cfg).await?;
                let tok = token(&r.state)?;
                let base = format!("http://{}", r.addr);
                burst(&base, &tok, args.warmup, args.concurrency).await?;
                let cpu0 = sys::process_ticks(std::process::id());
                let t0 = Instant::now();
                let mut lat = burst(&base, &tok, args.starts, args.concurrency).await?;
                let secs = t0.elapsed().as_secs_f64();
                let cpu = (sys::process_ticks(std::process::id()) - cpu0) as f64 / sys::clk_tck();
                lat.sort_unstable();
                eprintln!("starts: {store_label} + {db_label}: {:.0}/s", lat.len() as f64 / secs);
                rows.push(vec![
                    store_label.to_string(),
                    db_label.to_string(),
                    lat.len().to_string(),
                    format!("{:.0}", lat.len() as f64 / secs),
                    ms(quantile(&lat, 0.5)),
                    ms(quantile(&lat, 0.99)),
                    ms(*lat.last().unwrap_or(&0)),
                    format!("{:.2}", cpu / lat.len() as f64 * 1000.0),
                    format!("{:.1}", sys::load_average()),
                ]);
                r.state.manager.shutdown(Duration::from_secs(10)).await;
                if redis {
                    drop_keys(&prefix).await;
                }
                if let Some(pg) = pg {
                    pg.drop().await;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "\n### starts\n\n`POST /api/chat` → 200 with the job running, one in-process replica, {} clients at once, each start a new conversation; the demo model answers one token, so jobs end (answer saved, usage spent) while later starts arrive; process CPU includes the clients\n",
            args.concurrency
        );
        table(
            &["store", "database", "starts", "starts/s", "p50 ms", "p99 ms", "max ms", "process CPU ms / start", "load avg"],
            &rows,
        );
        Ok(())
    })
}
