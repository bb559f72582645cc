//! `saturation`: how far one machine goes, and how the cost grows.
//!
//! - reference: a minimal tokio fan-out (no HTTP, no genstream) of 120-byte frames
//!   from one shared buffer to 1,000 loopback sockets, each subscriber writing
//!   everything it is behind by in one write (up to 64 KiB), and once more one frame
//!   per write: the physical ceiling of this machine, measured in the same run.
//! - saturation: 1 job × 1,000 subscribers and 1,000 jobs × 1 subscriber, memory and
//!   Redis (1 replica), with the offered load raised step by step (the demo model's
//!   `token_delay` down to 0) until the delivered events/s stop growing (a step that
//!   adds less than 5% to the best so far ends the shape's sweep).
//! - growth: server CPU seconds per million events delivered (and Redis's in Redis
//!   mode) at a fixed 20 appends/s per job, for 100 to 10,000 subscribers of one job
//!   and 10 to 5,000 jobs of one subscriber each.
//! - chunks: the 1 × 1,000 saturation step and the 200k ev/s step (5 ms × 1,000) with
//!   `http.sse_chunk_bytes` 0 (one frame per chunk) and its default (runs of frames up
//!   to 16 KiB as one chunk), alternating, in the same run.
//!
//! Memory mode runs [`fanout::run_case`] (server in this process on its own `server-N`
//! runtime); Redis mode runs [`cluster::fanout_run`] with its replica on a `server-N`
//! runtime too, so both count the server's CPU the same way. Redis's CPU comes from
//! its `INFO cpu`, which counts all its clients (a shared Redis inflates it). Every
//! table notes the machine's 1-minute load average before each row.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::cluster::{self, RunOptions};
use crate::fanout::{self, FanoutArgs};
use crate::projection_fanout::Protocol;
use crate::report::{ms, table, thousands};
use crate::sys;

/// Parts of the sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Reference,
    Saturation,
    Growth,
    Chunks,
}

/// `saturation`'s options; the defaults are the full sweep (about 15 minutes).
#[derive(Clone, Debug, clap::Args)]
pub struct SaturationArgs {
    /// A short sweep (two load steps per shape, the small ends of the growth sweeps,
    /// fewer tokens): a few minutes, for a smoke run.
    #[arg(long)]
    pub quick: bool,
    /// Memory mode only (no Redis rows).
    #[arg(long)]
    pub memory_only: bool,
    /// The parts to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "reference,saturation,growth,chunks"
    )]
    pub parts: Vec<Part>,
}

/// Frame size of the reference fan-out, in bytes (a short native token frame).
const REF_FRAME: usize = 120;
/// Frames the reference producer publishes at a time.
const REF_STEP: usize = 64;
/// Subscribers of the reference fan-out.
const REF_SUBSCRIBERS: usize = 1000;
/// Token delay of the growth sweeps: 20 appends/s per job.
const GROWTH_DELAY_MS: u64 = 50;

/// Where the job's log lives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Memory,
    Redis,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Memory => "memory",
            Mode::Redis => "redis, 1 replica",
        }
    }
}

/// One measured step.
struct Row {
    mode: Mode,
    jobs: usize,
    subs: usize,
    delay_ms: u64,
    tokens: u64,
    per_job_rate: f64,
    delivered: u64,
    rate_all_running: Option<f64>,
    rate_overall: f64,
    p50_us: u64,
    p99_us: u64,
    server_cpu: f64,
    server_sys: f64,
    redis_cpu: Option<f64>,
    wall: Duration,
    /// "late/incomplete" subscribers (memory mode only).
    checks: String,
    load: f64,
    chunk_bytes: Option<usize>,
}

impl Row {
    /// The best delivered rate: while every job ran, else over the whole run.
    fn rate(&self) -> f64 {
        self.rate_all_running.unwrap_or(self.rate_overall)
    }

    fn per_m(&self, cpu: f64) -> String {
        if self.delivered == 0 {
            return "—".into();
        }
        format!("{:.2}", cpu / (self.delivered as f64 / 1e6))
    }

    fn cells(&self, note: &str) -> Vec<String> {
        vec![
            self.mode.label().into(),
            format!(
                "{} × {}",
                thousands(self.jobs as u64),
                thousands(self.subs as u64)
            ),
            format!("{} ms × {}", self.delay_ms, thousands(self.tokens)),
            match self.chunk_bytes {
                Some(0) => "0 (one frame)".into(),
                Some(n) => thousands(n as u64),
                None => "default".into(),
            },
            format!("{:.0}", self.per_job_rate),
            thousands((self.per_job_rate * (self.jobs * self.subs) as f64) as u64),
            self.rate_all_running
                .map_or("—".into(), |r| thousands(r as u64)),
            thousands(self.rate_overall as u64),
            ms(self.p50_us),
            ms(self.p99_us),
            format!("{:.2}", self.server_cpu / self.wall.as_secs_f64().max(1e-3)),
            format!(
                "{} ({:.0}% sys)",
                self.per_m(self.server_cpu),
                100.0 * self.server_sys / self.server_cpu.max(1e-9)
            ),
            self.redis_cpu.map_or("—".into(), |c| self.per_m(c)),
            self.checks.clone(),
            format!("{:.2}", self.load),
            note.into(),
        ]
    }
}

const HEADERS: &[&str] = &[
    "mode",
    "jobs × subs",
    "token delay × tokens",
    "sse_chunk_bytes",
    "appends/s/job",
    "offered ev/s",
    "delivered ev/s (all jobs running)",
    "delivered ev/s (whole run)",
    "p50 ms",
    "p99 ms",
    "server cores busy",
    "server CPU s / M ev",
    "Redis CPU s / M ev",
    "late/incomplete",
    "load (1 min) before",
    "",
];

/// Milliseconds before the first token: time for every subscriber to attach (memory
/// mode; Redis mode, whose subscribers of a job attach one after the other, waits
/// 2 s + 4 ms per job + 0.5 ms per subscriber).
fn first_token_ms(jobs: usize, subs: usize) -> u64 {
    2000 + 3 * jobs as u64 + subs as u64 / 4
}

/// One step of `jobs` × `subs` at `delay_ms` × `tokens`.
fn measure(
    mode: Mode,
    client_rt: &Runtime,
    (jobs, subs): (usize, usize),
    (delay_ms, tokens): (u64, u64),
    chunk_bytes: Option<usize>,
) -> Result<Row, String> {
    let load = sys::load_average();
    eprintln!(
        "saturation: {} {jobs} × {subs}, {delay_ms} ms × {tokens}, chunk {chunk_bytes:?} (load {load:.2}) …",
        mode.label()
    );
    match mode {
        Mode::Memory => {
            let args = FanoutArgs {
                delays_ms: vec![delay_ms],
                // run_case runs duration / delay tokens (delay 0 counts as 1 ms).
                duration_ms: tokens * delay_ms.max(1),
                first_token_delay_ms: Some(first_token_ms(jobs, subs)),
                server_threads: 2,
                client_threads: 2,
                nagle: false,
                no_metrics: false,
                sse_chunk_bytes: chunk_bytes,
            };
            let r = fanout::run_case(&args, client_rt, jobs, subs, delay_ms, Protocol::Native)?;
            Ok(Row {
                mode,
                jobs,
                subs,
                delay_ms,
                tokens: r.tokens,
                per_job_rate: r.per_job_rate,
                delivered: r.delivered,
                rate_all_running: (r.rate_all_running > 0.0).then_some(r.rate_all_running),
                rate_overall: r.rate_overall,
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                server_cpu: r.server_cpu,
                server_sys: r.server_sys,
                redis_cpu: None,
                wall: r.wall,
                checks: format!("{}/{}", r.late, r.incomplete),
                load,
                chunk_bytes,
            })
        }
        Mode::Redis => {
            let server_rt = server_runtime("server")?;
            let opts = RunOptions {
                server: Some(server_rt.handle().clone()),
                sse_chunk_bytes: chunk_bytes,
                // Subscribers attach one after the other: 10,000 of them take seconds.
                first_token_ms: Some(2000 + 4 * jobs as u64 + subs as u64 / 2),
            };
            let tokens32 = u32::try_from(tokens).map_err(|e| e.to_string())?;
            let r = client_rt.block_on(cluster::fanout_run(
                &cluster::redis_url(),
                1,
                jobs,
                subs,
                tokens32,
                delay_ms,
                &opts,
            ));
            server_rt.shutdown_timeout(Duration::from_secs(2));
            let r = r?;
            Ok(Row {
                mode,
                jobs,
                subs,
                delay_ms,
                tokens,
                per_job_rate: r.per_job_rate,
                delivered: r.delivered,
                rate_all_running: r.rate_all_running,
                rate_overall: r.rate_overall,
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                server_cpu: r.server_cpu,
                server_sys: r.server_sys,
                redis_cpu: Some(r.redis_cpu),
                wall: r.wall,
                checks: "—".into(),
                load,
                chunk_bytes,
            })
        }
    }
}

/// A 2-worker runtime whose threads are named `{name}-N`.
pub(crate) fn server_runtime(name: &'static str) -> Result<Runtime, String> {
    let n = AtomicUsize::new(0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name_fn(move || format!("{name}-{}", n.fetch_add(1, Ordering::Relaxed)))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// `saturation`.
pub fn run(args: &SaturationArgs) -> Result<(), String> {
    let client_rt = fanout::client_runtime(2)?;
    let modes: &[Mode] = if args.memory_only {
        &[Mode::Memory]
    } else {
        &[Mode::Memory, Mode::Redis]
    };
    // Both ends of every subscriber's socket are in this process.
    let max_subs = (sys::raise_nofile() as usize).saturating_sub(1000) / 2;
    for part in &args.parts {
        let t = Instant::now();
        match part {
            Part::Reference => reference(args, &client_rt)?,
            Part::Saturation => saturation(args, modes, &client_rt)?,
            Part::Growth => growth(args, modes, &client_rt, max_subs)?,
            Part::Chunks => chunks(args, &client_rt)?,
        }
        eprintln!("saturation {part:?}: {:.1} s", t.elapsed().as_secs_f64());
    }
    client_rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

fn print(title: &str, intro: &str, rows: &[Vec<String>]) {
    println!(
        "### {title}\n\n{intro}; load (1 min) now {:.2}\n",
        sys::load_average()
    );
    table(HEADERS, rows);
}

fn saturation(args: &SaturationArgs, modes: &[Mode], client_rt: &Runtime) -> Result<(), String> {
    // (token delay ms, tokens): each step a few seconds of tokens.
    let one_job: &[(u64, u64)] = if args.quick {
        &[(5, 800), (0, 3000)]
    } else {
        &[(5, 1500), (2, 3000), (1, 5000), (0, 8000)]
    };
    let many_jobs: &[(u64, u64)] = if args.quick {
        &[(10, 300), (0, 600)]
    } else {
        &[(50, 150), (10, 600), (5, 1000), (2, 2000), (0, 2000)]
    };
    let mut rows = Vec::new();
    for &mode in modes {
        for (shape, steps) in [((1, 1000), one_job), ((1000, 1), many_jobs)] {
            let mut measured: Vec<Row> = Vec::new();
            for &step in steps {
                let r = measure(mode, client_rt, shape, step, None)?;
                let best = measured.iter().map(Row::rate).fold(0.0, f64::max);
                let grew = r.rate() >= best * 1.05;
                measured.push(r);
                if !grew {
                    break;
                }
            }
            let best = measured
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.rate().total_cmp(&b.1.rate()))
                .map_or(0, |(i, _)| i);
            for (i, r) in measured.iter().enumerate() {
                rows.push(r.cells(if i == best { "← saturation" } else { "" }));
            }
        }
    }
    print(
        "saturation",
        "offered load raised step by step (token delay down to 0) until the delivered events/s stop growing; \
         server on a 2-worker runtime, clients on another 2 in the same process",
        &rows,
    );
    Ok(())
}

fn growth(
    args: &SaturationArgs,
    modes: &[Mode],
    client_rt: &Runtime,
    max_subs: usize,
) -> Result<(), String> {
    let (subs, jobs, tokens): (&[usize], &[usize], u64) = if args.quick {
        (&[100, 1000], &[10, 100], 100)
    } else {
        (
            &[100, 300, 1000, 3000, 10_000],
            &[10, 100, 500, 1000, 5000],
            150,
        )
    };
    let mut rows = Vec::new();
    for &mode in modes {
        for &n in subs {
            let (n, note) = if n > max_subs {
                (max_subs, format!("{n} asked; RLIMIT_NOFILE caps it"))
            } else {
                (n, String::new())
            };
            let r = measure(mode, client_rt, (1, n), (GROWTH_DELAY_MS, tokens), None)?;
            rows.push(r.cells(&note));
        }
        for &n in jobs {
            let r = measure(mode, client_rt, (n, 1), (GROWTH_DELAY_MS, tokens), None)?;
            rows.push(r.cells(""));
        }
    }
    print(
        "growth",
        &format!(
            "CPU per million events delivered at a fixed {} appends/s per job ({GROWTH_DELAY_MS} ms × {tokens} tokens)",
            1000 / GROWTH_DELAY_MS
        ),
        &rows,
    );
    Ok(())
}

fn chunks(args: &SaturationArgs, client_rt: &Runtime) -> Result<(), String> {
    let steps: &[(u64, u64)] = if args.quick {
        &[(0, 3000), (5, 800)]
    } else {
        &[(0, 8000), (5, 1500)]
    };
    let mut rows = Vec::new();
    for &step in steps {
        for chunk in [Some(0), None, Some(0), None] {
            let r = measure(Mode::Memory, client_rt, (1, 1000), step, chunk)?;
            rows.push(r.cells(""));
        }
    }
    print(
        "chunks",
        "memory mode, 1 job × 1,000: one frame per chunk (`http.sse_chunk_bytes = 0`, as before) \
         against runs of whole frames up to the default 16 KiB per chunk, alternating",
        &rows,
    );
    Ok(())
}

/// The reference fan-out: one buffer of `frames` frames, published [`REF_STEP`] frames
/// at a time through a `watch` (as the event log publishes each append); each of [`REF_SUBSCRIBERS`] server-side
/// tasks writes everything it is behind by, up to `batch` frames per write, to its
/// loopback socket; client tasks read and count the bytes.
fn reference(args: &SaturationArgs, client_rt: &Runtime) -> Result<(), String> {
    let frames: usize = if args.quick { 5_000 } else { 20_000 };
    let mut rows = Vec::new();
    for (label, batch) in [
        ("batched writes (≤ 64 KiB)", 64 * 1024 / REF_FRAME),
        ("one frame per write", 1),
    ] {
        // One frame per write moves the same bytes in 546× more writes: fewer frames
        // keep it within seconds.
        let frames = if batch == 1 { frames / 10 } else { frames };
        let load = sys::load_average();
        eprintln!(
            "saturation reference: {label}, {frames} frames × {REF_SUBSCRIBERS} (load {load:.2}) …"
        );
        let server_rt = server_runtime("ref-server")?;
        let r = reference_run(&server_rt, client_rt, frames, batch);
        server_rt.shutdown_timeout(Duration::from_secs(2));
        let (delivered, wall, cpu, sys_cpu) = r?;
        rows.push(vec![
            label.into(),
            thousands(REF_SUBSCRIBERS as u64),
            thousands(frames as u64),
            thousands(delivered),
            thousands((delivered as f64 / wall.as_secs_f64()) as u64),
            format!("{:.2}", cpu / wall.as_secs_f64()),
            format!(
                "{:.2} ({:.0}% sys)",
                cpu / (delivered as f64 / 1e6),
                100.0 * sys_cpu / cpu.max(1e-9)
            ),
            format!("{load:.2}"),
        ]);
    }
    println!(
        "### reference fan-out\n\nminimal tokio fan-out (no HTTP) of {REF_FRAME}-byte frames to {REF_SUBSCRIBERS} loopback sockets: \
         server on a 2-worker runtime, clients on another 2 in the same process; load (1 min) now {:.2}\n",
        sys::load_average()
    );
    table(
        &[
            "writes",
            "subscribers",
            "frames",
            "frames delivered",
            "delivered frames/s",
            "server cores busy",
            "server CPU s / M frames",
            "load (1 min) before",
        ],
        &rows,
    );
    Ok(())
}

/// One reference run: (frames delivered, wall time, server CPU s, of it system).
fn reference_run(
    server_rt: &Runtime,
    client_rt: &Runtime,
    frames: usize,
    batch: usize,
) -> Result<(u64, Duration, f64, f64), String> {
    let mut buf = vec![b'x'; frames * REF_FRAME];
    for f in buf.chunks_mut(REF_FRAME) {
        f[REF_FRAME - 2..].copy_from_slice(b"\n\n");
    }
    let buf = Bytes::from(buf);
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (tx, _) = tokio::sync::watch::channel(0usize);
    let tx = Arc::new(tx);
    // Server: accept every subscriber, then each writes what it is behind by.
    let accept = {
        let (tx, buf) = (tx.clone(), buf.clone());
        server_rt.spawn(async move {
            let mut writers = Vec::with_capacity(REF_SUBSCRIBERS);
            for _ in 0..REF_SUBSCRIBERS {
                let (mut sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
                sock.set_nodelay(true).map_err(|e| e.to_string())?;
                let (mut rx, buf) = (tx.subscribe(), buf.clone());
                writers.push(tokio::spawn(async move {
                    let mut cursor = 0usize;
                    while cursor < frames {
                        let head = *rx.borrow_and_update();
                        if cursor < head {
                            let end = head.min(cursor + batch);
                            if sock
                                .write_all(&buf[cursor * REF_FRAME..end * REF_FRAME])
                                .await
                                .is_err()
                            {
                                return;
                            }
                            cursor = end;
                        } else if rx.changed().await.is_err() {
                            return;
                        }
                    }
                }));
            }
            Ok::<_, String>(writers)
        })
    };
    // Clients: connect all, then read to the end.
    let readers: Vec<_> = client_rt.block_on(async {
        let mut v = Vec::with_capacity(REF_SUBSCRIBERS);
        for _ in 0..REF_SUBSCRIBERS {
            let mut sock = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            v.push(tokio::spawn(async move {
                let mut got = 0u64;
                let mut b = vec![0u8; 64 * 1024];
                while let Ok(n) = sock.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    got += n as u64;
                }
                got
            }));
        }
        Ok::<_, String>(v)
    })?;
    let writers = server_rt.block_on(accept).map_err(|e| e.to_string())??;
    let cpu0 = sys::thread_ticks();
    let t0 = Instant::now();
    // The producer: REF_STEP frames per publish, then yield. One frame per publish
    // would let it add one frame per pass over the 1,000 writers (lockstep: every
    // write one frame whatever the batch); the reference is the ceiling, so the
    // producer keeps ahead of the writers.
    let producer = server_rt.spawn(async move {
        for i in (REF_STEP..frames + REF_STEP).step_by(REF_STEP) {
            tx.send_replace(i.min(frames));
            tokio::task::yield_now().await;
        }
    });
    let (delivered, wall) = client_rt.block_on(async {
        let deadline = Duration::from_secs(60);
        let mut bytes = 0u64;
        for r in readers {
            bytes += tokio::time::timeout(deadline, r)
                .await
                .map_err(|_| "reference fan-out: a reader took over 60 s".to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>((bytes / REF_FRAME as u64, t0.elapsed()))
    })?;
    let cpu1 = sys::thread_ticks();
    server_rt.block_on(async {
        let _ = producer.await;
        for w in writers {
            let _ = w.await;
        }
    });
    let (u, s) = sys::cpu_secs_between(&cpu0, &cpu1, |n| n.starts_with("ref-server-"));
    Ok((delivered, wall, u + s, s))
}
