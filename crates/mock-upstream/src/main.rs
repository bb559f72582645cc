//! `genstream-mock-upstream`: the mock upstream (OpenAI Chat Completions and Anthropic
//! Messages) as a process.
//!
//! `genstream-mock-upstream --bind 127.0.0.1:0` binds, prints
//! `listening on http://ADDR/v1` as its first line of stdout (so a test or script can
//! read the port), and serves until Ctrl-C. See the library docs for the models it
//! understands.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use genstream_mock_upstream::{Recorder, serve};

/// A mock OpenAI Chat Completions and Anthropic Messages server that replays recorded
/// streams.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.bind).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("genstream-mock-upstream: cannot bind {}: {e}", args.bind);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("genstream-mock-upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    // A reader waits for this line, so flush it now rather than at exit.
    if writeln!(stdout, "listening on http://{addr}/v1")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match serve(listener, Recorder::new(), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("genstream-mock-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}
