//! `projection`: the pure cost of projecting a log into each client protocol, next to
//! the native frame.
//!
//! One log of `--events` events (a long text answer: `created`, a step, text deltas,
//! `usage`, `final`, as `genstream_protocols::testing::long_text` writes it) is
//! encoded `--runs` times by `Frame::encode` (what the engine does once per event) and
//! projected `--runs` times by each projector into a `ProjectedLog` (what a server
//! would do once per event and protocol), the rows taking turns run by run. The table
//! gives the best run (the pure cost, least disturbed by the rest of the machine) and
//! the median: events per second, nanoseconds per event, and bytes made per event. No
//! I/O, no server: the server-level cost of serving the projections is measured
//! elsewhere.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clap::Args;
use genstream_engine::event::{Event, Frame};
use genstream_protocols::ai_sdk::{AiSdkOptions, AiSdkProjector};
use genstream_protocols::chat::{ChatOptions, ChatProjector};
use genstream_protocols::responses::{ResponsesOptions, ResponsesProjector};
use genstream_protocols::{ProjectedLog, Projector, testing};

use crate::report;

#[derive(Args)]
pub struct ProjectionArgs {
    /// Events in the log.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Runs per row; the median is reported.
    #[arg(long, default_value_t = 51)]
    runs: usize,
    /// The text of each delta.
    #[arg(long, default_value = " token")]
    token: String,
}

/// One row's runs: their durations and what one run made.
#[derive(Default)]
struct Measured {
    times: Vec<Duration>,
    frames: usize,
    bytes: usize,
}

impl Measured {
    fn best(&self) -> Duration {
        self.times.iter().min().copied().unwrap_or_default()
    }

    fn median(&self) -> Duration {
        let mut t = self.times.clone();
        t.sort();
        t.get(t.len() / 2).copied().unwrap_or_default()
    }
}

/// One run of `Frame::encode` over the log.
fn native(events: &[Event], m: &mut Measured) {
    let start = Instant::now();
    let encoded: Vec<Frame> = events
        .iter()
        // Recorded events always encode; one that did not would show in `frames`.
        .filter_map(|e| Frame::encode(e.seq, &e.body).ok())
        .collect();
    m.times.push(start.elapsed());
    m.frames = encoded.len();
    m.bytes = encoded.iter().map(|f| f.bytes.len()).sum();
}

/// One run of a projector over the log, into a `ProjectedLog`.
fn projected<P: Projector>(events: &[Event], projector: P, m: &mut Measured) -> Result<(), String> {
    let mut log = ProjectedLog::new(projector);
    let start = Instant::now();
    for e in events {
        log.push(e.seq, &e.body).map_err(|e| e.to_string())?;
    }
    m.times.push(start.elapsed());
    m.frames = log.frames().len();
    m.bytes = log.frames().iter().map(|f| f.bytes.len()).sum();
    Ok(())
}

/// One run of what the server does per event and (job, protocol), once for all that
/// projection's subscribers (`crates/server/src/openai/shared.rs`): decode the native
/// frame's JSON, then project it.
fn from_frames<P: Projector>(
    frames: &[Frame],
    mut projector: P,
    m: &mut Measured,
) -> Result<(), String> {
    let mut out = Vec::new();
    let start = Instant::now();
    for f in frames {
        let e: Event = serde_json::from_slice(f.data_json()).map_err(|e| e.to_string())?;
        projector
            .push(e.seq, &e.body, &mut out)
            .map_err(|e| e.to_string())?;
    }
    m.times.push(start.elapsed());
    m.frames = out.len();
    m.bytes = out.iter().map(|f| f.bytes.len()).sum();
    Ok(())
}

/// Prints the table.
pub fn run(args: &ProjectionArgs) -> Result<(), String> {
    let events = testing::long_text(args.events, &args.token);
    let n = events.len();
    let runs = args.runs.max(1);
    let names = [
        "native frame (`Frame::encode`)",
        "Chat Completions (`include_usage`)",
        "Responses",
        "AI SDK UI message stream",
        "Responses from native frames (decode + project, as the server does)",
    ];
    let frames: Vec<Frame> = events
        .iter()
        .map(|e| Frame::encode(e.seq, &e.body).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut rows: [Measured; 5] = Default::default();
    // Round robin, so that what else runs on the machine weighs on every row alike.
    for _ in 0..runs {
        native(&events, &mut rows[0]);
        let chat = ChatProjector::new(ChatOptions {
            include_usage: true,
            client_tools: BTreeSet::new(),
        });
        projected(&events, chat, &mut rows[1])?;
        let responses = ResponsesProjector::new(ResponsesOptions::default());
        projected(&events, responses, &mut rows[2])?;
        projected(
            &events,
            AiSdkProjector::new(AiSdkOptions::default()),
            &mut rows[3],
        )?;
        from_frames(
            &frames,
            ResponsesProjector::new(ResponsesOptions::default()),
            &mut rows[4],
        )?;
    }
    let per_event = |d: Duration| d.as_nanos() as f64 / n as f64;
    let native_ns = per_event(rows[0].best());
    println!(
        "## projection cost: one log of {} events ({} text deltas of {:?}), best and median of {runs} runs\n",
        report::thousands(n as u64),
        report::thousands(n.saturating_sub(4) as u64),
        args.token
    );
    let table: Vec<Vec<String>> = names
        .iter()
        .zip(&rows)
        .map(|(name, m)| {
            let best = m.best();
            vec![
                (*name).to_string(),
                report::thousands((n as f64 / best.as_secs_f64()) as u64),
                format!("{:.0}", per_event(best)),
                format!("{:.0}", per_event(m.median())),
                format!("{:.2}", per_event(best) / native_ns),
                report::thousands(m.frames as u64),
                format!("{:.0}", m.bytes as f64 / n as f64),
            ]
        })
        .collect();
    report::table(
        &[
            "projection",
            "events/s (best)",
            "ns/event (best)",
            "ns/event (median)",
            "× native",
            "frames",
            "bytes/event",
        ],
        &table,
    );
    Ok(())
}
