//! `genstream-bench`: the benchmarks behind BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p genstream-bench -- all
//! cargo run --release -p genstream-bench -- fanout-one-job --delays-ms 10
//! cargo run --release -p genstream-bench -- projection
//! cargo run --release -p genstream-bench -- projection-fanout
//! cargo run --release -p genstream-bench -- starts
//! cargo run --release -p genstream-bench -- saturation --quick
//! cargo run --release -p genstream-bench -- soak --store memory,redis
//! ```
//!
//! Every scenario talks to a server on 127.0.0.1 only, every loop is bounded in count
//! and time, and each prints Markdown tables on stdout (progress goes to stderr).

mod cluster;
mod fanout;
mod http;
mod logmem;
mod memory;
mod processes;
mod projection;
mod projection_fanout;
mod report;
mod saturation;
mod soak;
mod starts;
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "genstream-bench",
    about = "genstream's benchmarks (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// 1 job × N SSE subscribers: delivered events/s, append→receipt delay, CPU.
    FanoutOneJob {
        /// SSE subscribers of the one job.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// N jobs × 1 SSE subscriber each: the same figures.
    FanoutManyJobs {
        /// Jobs, each with one subscriber.
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// Server RSS per idle SSE subscriber (10,000 of them).
    MemoryIdle(memory::IdleArgs),
    /// Server RSS per retained event of finished jobs (1,000 × ~1,000 events).
    MemoryRetained(memory::RetainedArgs),
    /// Redis mode: 1 job × N and N jobs × 1 over 1 and 3 replicas, next to memory.
    RedisFanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 500)]
        tokens: u32,
        #[arg(long, default_value_t = 10)]
        delay_ms: u64,
        /// Only the N jobs × 1 rows (skip 1 job × N).
        #[arg(long)]
        many_jobs_only: bool,
        /// Run the replicas on a 2-worker runtime of their own (threads `server-N`),
        /// apart from the subscribers' runtime, as a server process apart from its
        /// clients would be (default: one runtime for both).
        #[arg(long, conflicts_with = "processes")]
        server_runtime: bool,
        /// Run every replica as a `genstream serve` child process (see `--server-bin`),
        /// the bench process holding only the subscribers: server, Redis and clients
        /// in separate processes. Lateness is then taken at the subscriber.
        #[arg(long)]
        processes: bool,
        #[command(flatten)]
        server: memory::ServerArgs,
    },
    /// Reconnect → first byte for a job of 10,000 events, on the owner and another replica.
    ResumeLatency {
        /// Finished jobs of 10,000 events, each read once cold on every replica.
        #[arg(long, default_value_t = 30)]
        jobs: usize,
    },
    /// Abort round trip across replicas and on the owner.
    AbortLatency {
        #[arg(long, default_value_t = 100)]
        aborts: usize,
    },
    /// Projection cost per event into each client protocol, next to the native frame.
    Projection(projection::ProjectionArgs),
    /// 1 job × N and N jobs × 1 over the native stream and each projected one (Responses,
    /// Chat Completions, AI SDK), alternating: events/s, delay, server CPU.
    ProjectionFanout(projection_fanout::ProjectionFanoutArgs),
    /// How far one machine goes: delivered events/s at saturation (1 × 1,000 and
    /// 1,000 × 1, memory and Redis), CPU per M events from 100 to 10,000 subscribers
    /// and 10 to 5,000 jobs, a minimal tokio fan-out for reference, and runs of frames
    /// per chunk against one frame per chunk.
    Saturation(saturation::SaturationArgs),
    /// `POST /api/chat` → job running, per second, for each store × database pair.
    Starts(starts::StartsArgs),
    /// Ledger spend latency on SQLite and PostgreSQL.
    Ledger {
        #[arg(long, default_value_t = 1000)]
        spends: usize,
    },
    /// Subscribers connecting and disconnecting for minutes while jobs stream: RSS,
    /// fds (and Redis memory) flat, every reader's log exact.
    Soak(soak::SoakArgs),
    /// Every scenario with its defaults, one after the other.
    All,
    /// Print the machine description only.
    Machine,
    /// Run the server as `genstream serve --config FILE` does (used when no
    /// `genstream` binary sits next to this one).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// The event log alone: memory per event (run by memory-retained).
    #[command(hide = true)]
    LogMemory {
        #[arg(long)]
        events: PathBuf,
        #[arg(long)]
        variant: String,
        #[arg(long, default_value_t = 1000)]
        logs: usize,
    },
    /// axum + hyper alone, for the memory-idle reference row.
    #[command(hide = true)]
    BaselineServe {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn machine() {
    println!("## machine\n");
    let rows: Vec<Vec<String>> = sys::machine()
        .into_iter()
        .map(|(k, v)| vec![k.to_owned(), v])
        .collect();
    report::table(&["", "value"], &rows);
}

fn run(cmd: Cmd) -> Result<(), String> {
    let nofile = sys::raise_nofile();
    match &cmd {
        Cmd::Serve { config } => return memory::serve(config),
        Cmd::BaselineServe { .. } => return memory::baseline_serve(),
        Cmd::LogMemory {
            events,
            variant,
            logs,
        } => return logmem::run(events, variant, *logs),
        _ => {}
    }
    let start = Instant::now();
    machine();
    match cmd {
        Cmd::FanoutOneJob { subscribers, args } => fanout::one_job(&args, subscribers)?,
        Cmd::RedisFanout {
            subscribers,
            tokens,
            delay_ms,
            many_jobs_only,
            server_runtime,
            processes,
            server,
        } => cluster::redis_fanout(
            subscribers,
            tokens,
            delay_ms,
            many_jobs_only,
            server_runtime,
            processes.then_some(&server),
        )?,
        Cmd::ResumeLatency { jobs } => cluster::resume_latency(jobs)?,
        Cmd::AbortLatency { aborts } => cluster::abort_latency(aborts)?,
        Cmd::Ledger { spends } => cluster::ledger(spends)?,
        Cmd::Starts(args) => starts::run(&args)?,
        Cmd::Saturation(args) => saturation::run(&args)?,
        Cmd::Projection(args) => projection::run(&args)?,
        Cmd::ProjectionFanout(args) => projection_fanout::run(&args)?,
        Cmd::FanoutManyJobs { jobs, args } => fanout::many_jobs(&args, jobs)?,
        Cmd::MemoryIdle(args) => {
            if (nofile as usize) < args.subscribers + 100 {
                return Err(format!(
                    "RLIMIT_NOFILE is {nofile}, too low for {} subscribers",
                    args.subscribers
                ));
            }
            memory::idle(&args)?
        }
        Cmd::MemoryRetained(args) => memory::retained(&args)?,
        Cmd::Soak(args) => soak::run(&args, nofile)?,
        Cmd::All => {
            let parse = |argv: &[&str]| Cli::try_parse_from(argv).map_err(|e| e.to_string());
            for argv in [
                &["b", "fanout-one-job"][..],
                &["b", "fanout-many-jobs"],
                &["b", "memory-idle"],
                &["b", "memory-retained"],
            ] {
                let t = Instant::now();
                match parse(argv)?.command {
                    Cmd::FanoutOneJob { subscribers, args } => fanout::one_job(&args, subscribers)?,
                    Cmd::FanoutManyJobs { jobs, args } => fanout::many_jobs(&args, jobs)?,
                    Cmd::MemoryIdle(args) => memory::idle(&args)?,
                    Cmd::MemoryRetained(args) => memory::retained(&args)?,
                    _ => {}
                }
                eprintln!("{}: {:.1} s", argv[1], t.elapsed().as_secs_f64());
            }
        }
        Cmd::Machine | Cmd::Serve { .. } | Cmd::BaselineServe { .. } | Cmd::LogMemory { .. } => {}
    }
    eprintln!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("genstream-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
