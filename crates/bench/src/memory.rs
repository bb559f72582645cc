//! `memory-idle` and `memory-retained`: resident memory of a real server process.
//!
//! The server is a child process (`genstream serve --config FILE`, inheriting this
//! process's raised RLIMIT_NOFILE) with a SQLite *file* database in a temporary
//! directory, so saved messages live on disk and not in the measured RSS. RSS is
//! `VmRSS` of `/proc/PID/status`, read after a settle period before and after the
//! thing measured; the figure is the delta divided by its count.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

use crate::http::{IdScanner, open_stream, start_chat};
use crate::report::{table, thousands};
use crate::sys;

/// The JWT secret of every server the bench runs, in process or as a child process
/// (its config file gets it, and the bench mints its tokens with it).
pub(crate) const SECRET: &str = "genstream-bench-secret-0123456789abcdef";

/// The server config of every scenario: 127.0.0.1 on a free port, the memory job
/// store, `database`, a fixed JWT secret, every per-user and per-IP limit off (one
/// user starts all the jobs), and one demo model `bench` with `options_toml`.
pub fn config_toml(database: &str, max_live_jobs: usize, options_toml: &str) -> String {
    config_toml_with("memory", database, max_live_jobs, "", options_toml, "")
}

/// [`config_toml`] with the job store `store` (`memory` or a Redis URL), `jobs_toml`
/// (lines added to `[jobs]`, e.g. a retention) and `tail_toml` (tables added at the
/// end, e.g. `[redis]`).
pub fn config_toml_with(
    store: &str,
    database: &str,
    max_live_jobs: usize,
    jobs_toml: &str,
    options_toml: &str,
    tail_toml: &str,
) -> String {
    format!(
        "bind = \"127.0.0.1:0\"\nstore = \"{store}\"\ndatabase = \"{database}\"\n\n\
         [auth]\njwt_secret = \"{SECRET}\"\n\n\
         [jobs]\nmax_live_jobs = {max_live_jobs}\n{jobs_toml}\n\n\
         [limits]\nconcurrent_per_user = 0\nmessages_per_user_per_minute = 0\n\
         messages_per_ip_per_minute = 0\n\n\
         [[models]]\nname = \"bench\"\nprovider = \"demo\"\n[models.options]\n{options_toml}\n\n\
         {tail_toml}\n"
    )
}

/// Which program serves.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// The server binary, run as `BIN serve --config FILE`. Default: `genstream` next
    /// to this binary (target/release/genstream) when it exists, else this binary's
    /// own hidden `serve` (the same `genstream_server::serve::run`).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Wait after each phase before reading RSS, in ms.
    #[arg(long, default_value_t = 3000)]
    pub settle_ms: u64,
}

impl ServerArgs {
    pub(crate) fn binary(&self) -> PathBuf {
        if let Some(b) = &self.server_bin {
            return b.clone();
        }
        let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("genstream-bench"));
        let sibling = me.with_file_name("genstream");
        if sibling.exists() { sibling } else { me }
    }
}

/// A server child process; killed when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) addr: SocketAddr,
    /// A bearer token of user `bench`, valid for an hour.
    pub(crate) token: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the child process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `genstream serve` (or this binary's identical `serve`).
    Genstream,
    /// This binary's `baseline-serve`: axum and hyper alone.
    Baseline,
}

impl Server {
    fn start(args: &ServerArgs, name: &str, options_toml: &str) -> Result<Server, String> {
        Self::start_with(args, name, options_toml, Mode::Genstream)
    }

    fn start_with(
        args: &ServerArgs,
        name: &str,
        options_toml: &str,
        mode: Mode,
    ) -> Result<Server, String> {
        Self::spawn(args, name, mode, |db| config_toml(db, 1000, options_toml))
    }

    /// A `genstream serve` child whose config file is `config(database URL)`: the
    /// database is a SQLite file in the server's temporary directory.
    pub(crate) fn start_config(
        args: &ServerArgs,
        name: &str,
        config: impl FnOnce(&str) -> String,
    ) -> Result<Server, String> {
        Self::spawn(args, name, Mode::Genstream, config)
    }

    fn spawn(
        args: &ServerArgs,
        name: &str,
        mode: Mode,
        config_text: impl FnOnce(&str) -> String,
    ) -> Result<Server, String> {
        let dir = std::env::temp_dir().join(format!(
            "genstream-bench-{}-{name}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = dir.join("genstream.toml");
        let db = dir.join("bench.db");
        std::fs::write(&config, config_text(&format!("sqlite://{}", db.display())))
            .map_err(|e| e.to_string())?;
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let (bin, sub): (PathBuf, &[&str]) = match mode {
            Mode::Genstream => (args.binary(), &["serve"]),
            Mode::Baseline => (me, &["baseline-serve"]),
        };
        eprintln!(
            "{name}: server {} {} --config {}",
            bin.display(),
            sub.join(" "),
            config.display()
        );
        let mut child = Command::new(&bin)
            .args(sub)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("could not run {}: {e}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stdout so the server never blocks on it.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("genstream listening on http://") {
                    let _ = tx.send(a.to_owned());
                }
            }
        });
        let mut server = Server {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: genstream_server::auth::JwtKeys::new(SECRET)
                .mint("bench", Duration::from_secs(3600))
                .map_err(|e| e.to_string())?,
            dir,
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the server did not print its address within 30 s".to_owned())?;
        server.addr = addr
            .parse()
            .map_err(|e| format!("bad address {addr:?}: {e}"))?;
        Ok(server)
    }

    pub(crate) fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn rss(&self) -> u64 {
        sys::rss_bytes(self.pid).unwrap_or(0)
    }
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / 1024.0 / 1024.0)
}

fn runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

async fn start_jobs(server: &Server, n: usize, concurrency: usize) -> Result<Vec<String>, String> {
    let http = reqwest::Client::new();
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (http, base, token, permits) = (
            http.clone(),
            server.base(),
            server.token.clone(),
            permits.clone(),
        );
        handles.push(tokio::spawn(async move {
            let _p = permits.acquire().await;
            start_chat(&http, &base, &token, "bench", &format!("bench job {i}")).await
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for h in handles {
        ids.push(h.await.map_err(|e| e.to_string())??);
    }
    Ok(ids)
}

/// `memory-idle` options.
#[derive(Clone, Debug, clap::Args)]
pub struct IdleArgs {
    /// Idle SSE subscribers.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// How the subscribers are spread, one run each: JOBS, the subscribers split
    /// evenly over that many stalled jobs.
    #[arg(long, value_delimiter = ',', default_value = "100,1")]
    pub jobs: Vec<usize>,
    /// Skip the reference run on axum + hyper alone (`baseline-serve`: the same
    /// `axum::serve`, a route that answers a never-ending empty SSE body).
    #[arg(long)]
    pub skip_baseline: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

struct IdleResult {
    mode: Mode,
    jobs: usize,
    subscribers: usize,
    fds: usize,
    before: u64,
    after: u64,
    connect: Duration,
}

fn idle_once(args: &IdleArgs, rt: &Runtime, jobs: usize, mode: Mode) -> Result<IdleResult, String> {
    // `stall`: three tokens, then nothing until cancelled; the stall reaper's 600 s
    // and the 15 s keep-alive are far beyond this run.
    let server = Server::start_with(
        &args.server,
        "memory-idle",
        "behavior = \"stall\"\ntokens = 100\ntoken_delay = \"0s\"",
        mode,
    )?;
    let n = args.subscribers;
    let settle = Duration::from_millis(args.server.settle_ms);
    rt.block_on(async {
        let ids = start_jobs(&server, jobs, 8).await?;
        tokio::time::sleep(settle).await;
        let before = server.rss();
        let fds_before = sys::open_fds(server.pid);
        let t = Instant::now();
        let permits = Arc::new(Semaphore::new(256));
        let mut opens = Vec::with_capacity(n);
        for i in 0..n {
            let (id, token, permits, addr) = (
                ids[i % ids.len()].clone(),
                server.token.clone(),
                permits.clone(),
                server.addr,
            );
            opens.push(tokio::spawn(async move {
                let _p = permits.acquire().await;
                open_stream(addr, &id, &token, false).await
            }));
        }
        let mut idlers = Vec::with_capacity(n);
        for h in opens {
            let s = h.await.map_err(|e| e.to_string())??;
            // An idle client: drain whatever comes (the backlog, pings), bounded by
            // the run; the task is aborted at the end.
            idlers.push(tokio::spawn(async move {
                let mut tcp = s.tcp;
                let mut buf = [0u8; 512];
                while let Ok(Ok(k)) =
                    tokio::time::timeout(Duration::from_secs(120), tcp.read(&mut buf)).await
                {
                    if k == 0 {
                        break;
                    }
                }
            }));
        }
        let connect = t.elapsed();
        tokio::time::sleep(settle).await;
        let after = server.rss();
        let fds = sys::open_fds(server.pid).saturating_sub(fds_before);
        for h in &idlers {
            h.abort();
        }
        Ok(IdleResult {
            mode,
            jobs,
            subscribers: n,
            fds,
            before,
            after,
            connect,
        })
    })
}

/// Resident memory per idle SSE subscriber.
pub fn idle(args: &IdleArgs) -> Result<(), String> {
    let rt = runtime()?;
    let mut results = Vec::new();
    for &jobs in &args.jobs {
        let jobs = jobs.clamp(1, 1000);
        eprintln!(
            "memory-idle: {} subscribers over {jobs} stalled job(s) …",
            args.subscribers
        );
        results.push(idle_once(args, &rt, jobs, Mode::Genstream)?);
    }
    if !args.skip_baseline {
        eprintln!(
            "memory-idle: {} idle streams on axum + hyper alone …",
            args.subscribers
        );
        results.push(idle_once(args, &rt, 1, Mode::Baseline)?);
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    println!(
        "### memory-idle\n\nserver: `{} serve`, separate process; subscribers: raw TCP, response head read, then idle\n",
        args.server.binary().display()
    );
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let delta = r.after.saturating_sub(r.before);
            vec![
                match r.mode {
                    Mode::Baseline => "axum + hyper alone (no genstream)".to_owned(),
                    Mode::Genstream => format!(
                        "genstream: {} jobs × {}",
                        r.jobs,
                        r.subscribers.div_ceil(r.jobs)
                    ),
                },
                thousands(r.subscribers as u64),
                thousands(r.fds as u64),
                format!("{:.1}", r.connect.as_secs_f64()),
                mib(r.before),
                mib(r.after),
                mib(delta),
                thousands(delta / r.subscribers.max(1) as u64),
                format!("{:.1}", delta as f64 / r.subscribers.max(1) as f64 / 1024.0),
            ]
        })
        .collect();
    table(
        &[
            "server: jobs × subscribers/job",
            "subscribers",
            "new server fds",
            "connect s",
            "RSS before MiB",
            "RSS after MiB",
            "delta MiB",
            "bytes / subscriber",
            "KiB / subscriber",
        ],
        &rows,
    );
    Ok(())
}

/// `memory-retained` options.
#[derive(Clone, Debug, clap::Args)]
pub struct RetainedArgs {
    /// Finished jobs to keep.
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Tokens per job (the log holds tokens + 4 events: created, on_run_step, usage,
    /// final).
    #[arg(long, default_value_t = 1000)]
    pub tokens: u32,
    /// Jobs run before the baseline, to warm the allocator, the pools and SQLite.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Runs `ids`' streams to their end; returns (events, body bytes) summed.
async fn follow_all(
    server: &Server,
    ids: &[String],
    concurrency: usize,
) -> Result<(u64, u64), String> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut handles = Vec::new();
    for id in ids {
        let (id, token, permits, addr) = (
            id.clone(),
            server.token.clone(),
            permits.clone(),
            server.addr,
        );
        handles.push(tokio::spawn(async move {
            let _p = permits.acquire().await;
            let s = open_stream(addr, &id, &token, true).await?;
            let mut tcp = s.tcp;
            let mut scan = IdScanner::default();
            let (mut events, mut bytes) = (0u64, s.rest.len() as u64);
            scan.feed(&s.rest, |_| events += 1);
            let mut buf = vec![0u8; 64 * 1024];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(k)) => {
                        bytes += k as u64;
                        scan.feed(&buf[..k], |_| events += 1);
                    }
                    Ok(Err(e)) => return Err(format!("stream {id}: {e}")),
                    Err(_) => return Err(format!("stream {id}: not ended within 60 s")),
                }
            }
            Ok::<_, String>((events, bytes))
        }));
    }
    let (mut events, mut bytes) = (0, 0);
    for h in handles {
        let (e, b) = h.await.map_err(|e| e.to_string())??;
        events += e;
        bytes += b;
    }
    Ok((events, bytes))
}

/// Resident memory per retained event of finished jobs.
pub fn retained(args: &RetainedArgs) -> Result<(), String> {
    let rt = runtime()?;
    eprintln!(
        "memory-retained: {} jobs × {} tokens …",
        args.jobs, args.tokens
    );
    let server = Server::start(
        &args.server,
        "memory-retained",
        &format!("tokens = {}\ntoken_delay = \"0s\"", args.tokens),
    )?;
    let settle = Duration::from_millis(args.server.settle_ms);
    let r = rt.block_on(async {
        // Jobs are run a few at a time (start, then follow to the end), so the live
        // set stays small and only the finished logs accumulate.
        for chunk in 0..args.warmup.div_ceil(10) {
            let n = (args.warmup - chunk * 10).min(10);
            let ids = start_jobs(&server, n, 4).await?;
            follow_all(&server, &ids, 4).await?;
        }
        // One more, whose events the log-alone runs below replay.
        let ids = start_jobs(&server, 1, 1).await?;
        let captured = capture_data_lines(&server, &ids[0]).await?;
        tokio::time::sleep(settle).await;
        let before = server.rss();
        let t = Instant::now();
        let (mut events, mut bytes) = (0, 0);
        let mut done = 0;
        while done < args.jobs {
            let n = (args.jobs - done).min(50);
            let ids = start_jobs(&server, n, 4).await?;
            let (e, b) = follow_all(&server, &ids, 4).await?;
            events += e;
            bytes += b;
            done += n;
        }
        let took = t.elapsed();
        tokio::time::sleep(settle).await;
        let after = server.rss();
        Ok::<_, String>((before, after, events, bytes, took, captured))
    });
    let hwm = sys::status_kib(server.pid, "VmHWM:").unwrap_or(0) * 1024;
    drop(server);
    rt.shutdown_timeout(Duration::from_secs(2));
    let (before, after, events, bytes, took, captured) = r?;
    let delta = after.saturating_sub(before);
    println!(
        "### memory-retained\n\nserver: `{} serve`, separate process; demo `tokens = {}, token_delay = \"0s\"`; {} warm-up jobs before the baseline\n",
        args.server.binary().display(),
        args.tokens,
        args.warmup
    );
    table(
        &[
            "jobs",
            "events retained",
            "events/job",
            "run s",
            "wire bytes/event",
            "RSS before MiB",
            "RSS after MiB",
            "delta MiB",
            "peak RSS MiB",
            "bytes / event",
            "KiB / job",
        ],
        &[vec![
            thousands(args.jobs as u64),
            thousands(events),
            format!("{:.0}", events as f64 / args.jobs.max(1) as f64),
            format!("{:.1}", took.as_secs_f64()),
            format!("{:.0}", bytes as f64 / events.max(1) as f64),
            mib(before),
            mib(after),
            mib(delta),
            mib(hwm),
            format!("{:.0}", delta as f64 / events.max(1) as f64),
            format!("{:.0}", delta as f64 / args.jobs.max(1) as f64 / 1024.0),
        ]],
    );

    // The event log alone, in fresh processes.
    let file = std::env::temp_dir().join(format!(
        "genstream-bench-{}-events.jsonl",
        std::process::id()
    ));
    std::fs::write(&file, captured.join("\n")).map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for (variant, what) in [
        ("encode", "`EventLog::append` (as the server does)"),
        (
            "exact",
            "`insert_frame` of the same frames in exactly sized buffers",
        ),
    ] {
        eprintln!("memory-retained: the log alone, {variant} …");
        let out = Command::new(&me)
            .args(["log-memory", "--variant", variant, "--logs"])
            .arg(args.jobs.to_string())
            .arg("--events")
            .arg(&file)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if !out.status.success() {
            return Err(format!("log-memory {variant} failed: {text}"));
        }
        rows.push(vec![
            what.to_owned(),
            thousands(field("events=")),
            mib(field("rss_delta=")),
            thousands(field("bytes_per_event=")),
        ]);
    }
    let _ = std::fs::remove_file(&file);
    println!(
        "The event log alone: {} logs of the {} events of one captured job, built in a fresh process through the engine's public API\n",
        args.jobs,
        captured.len()
    );
    table(
        &[
            "frames stored via",
            "events",
            "RSS delta MiB",
            "bytes / event",
        ],
        &rows,
    );
    Ok(())
}

/// Reads a job's stream to its end and returns its `data:` lines (one `Event` JSON
/// each).
async fn capture_data_lines(server: &Server, id: &str) -> Result<Vec<String>, String> {
    let s = open_stream(server.addr, id, &server.token, true).await?;
    let mut body = s.rest;
    let mut tcp = s.tcp;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(k)) => body.extend_from_slice(&buf[..k]),
            Ok(Err(e)) => return Err(format!("stream {id}: {e}")),
            Err(_) => return Err(format!("stream {id}: not ended within 60 s")),
        }
    }
    // Chunk framing sits between frames, never inside a line of one.
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .split('\n')
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect())
}

/// The hidden `serve` subcommand: what `genstream serve --config FILE` runs.
pub fn serve(config: &Path) -> Result<(), String> {
    let config = genstream_server::config::Config::load(
        Some(config),
        &genstream_server::config::Overrides::default(),
    )
    .map_err(|e| e.to_string())?;
    runtime()?
        .block_on(genstream_server::serve::run(config))
        .map_err(|e| e.to_string())
}

/// The hidden `baseline-serve` subcommand: `axum::serve` with a stream route whose SSE
/// body never yields, and a `POST /api/chat` that answers a fixed stream id. It shows
/// what one idle HTTP/1.1 streaming response costs before genstream adds anything.
pub fn baseline_serve() -> Result<(), String> {
    use axum::body::{Body, Bytes};
    use axum::routing::{get, post};
    runtime()?.block_on(async {
        let router = axum::Router::new()
            .route(
                "/api/chat",
                post(|| async { axum::Json(serde_json::json!({"streamId": "baseline"})) }),
            )
            .route(
                "/api/chat/stream/{id}",
                get(|| async {
                    let body = Body::from_stream(futures::stream::pending::<
                        Result<Bytes, std::convert::Infallible>,
                    >());
                    (
                        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                        body,
                    )
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("genstream listening on http://{addr}");
        // Served as `serve::run` serves genstream's router.
        axum::serve(
            genstream_server::serve::no_delay(listener),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .map_err(|e| e.to_string())
    })
}
