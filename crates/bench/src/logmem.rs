//! The hidden `log-memory` subcommand: resident memory per event of the event log
//! alone, in a fresh process, through the engine's public `EventLog` API.
//!
//! `memory-retained` captures the events of one real job and runs this twice: with
//! `encode`, every event goes through `EventLog::append` (as the job task's appends
//! do, `Frame::encode` included); with `exact`, each frame is encoded the same way and
//! then copied into an exactly sized buffer before `EventLog::insert_frame` stores it —
//! what `Frame::encode` would store if it shrank its buffer. The difference is what
//! that change would save per retained event.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use genstream_engine::event::{Event, Frame};
use genstream_engine::log::{EventLog, LogLimits};

use crate::sys;

/// Builds `logs` logs of the events in `events` (one `Event` JSON per line) and prints
/// `bytes_per_event=N rss_delta=N events=N`.
pub fn run(events: &Path, variant: &str, logs: usize) -> Result<(), String> {
    let text = std::fs::read_to_string(events).map_err(|e| e.to_string())?;
    let events: Vec<Event> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}")))
        .collect::<Result<_, _>>()?;
    let exact = match variant {
        "encode" => false,
        "exact" => true,
        other => return Err(format!("unknown variant {other:?}: encode | exact")),
    };
    let fill = |log: &EventLog| -> Result<(), String> {
        for ev in &events {
            if exact {
                let f = Frame::encode(ev.seq, &ev.body)
                    .map_err(|e| format!("encode seq {}: {e}", ev.seq))?;
                let bytes = Bytes::from(f.bytes.to_vec()); // capacity == length
                let frame = Frame {
                    seq: f.seq,
                    terminal: f.terminal,
                    bytes,
                };
                if !log
                    .insert_frame(frame)
                    .map_err(|e| format!("insert_frame seq {}: {e}", ev.seq))?
                {
                    return Err(format!("insert_frame refused seq {}", ev.seq));
                }
            } else {
                log.append(&ev.body)
                    .map_err(|e| format!("append seq {}: {e}", ev.seq))?;
            }
        }
        Ok(())
    };
    // One log first, so that one-time allocations are not counted.
    let warm = EventLog::new(LogLimits::default());
    fill(&warm)?;
    let pid = std::process::id();
    let before = sys::rss_bytes(pid).unwrap_or(0);
    let mut kept: Vec<Arc<EventLog>> = Vec::with_capacity(logs);
    for _ in 0..logs {
        let log = Arc::new(EventLog::new(LogLimits::default()));
        fill(&log)?;
        kept.push(log);
    }
    let after = sys::rss_bytes(pid).unwrap_or(0);
    let n = (logs * events.len()) as u64;
    let delta = after.saturating_sub(before);
    println!(
        "bytes_per_event={} rss_delta={delta} events={n}",
        delta / n.max(1)
    );
    drop(kept);
    drop(warm);
    Ok(())
}
