//! The in-memory event log of one job: the only buffer between a generation and its
//! subscribers.
//!
//! Appending assigns the next seq, folds the event into the running [`Aggregate`],
//! serializes it once into a [`Frame`] and bumps a `watch` counter. Subscribers do not
//! get a queue: each holds a cursor and a `watch::Receiver` (a pointer and a version
//! number), reads `frames[cursor+1..]` by cloning `Bytes` handles, and sleeps on the
//! watch when it has caught up. A slow subscriber therefore costs the log nothing.
//!
//! The log is bounded (events and bytes). The cap never applies to the terminal event,
//! so a job that hits it can still end with `error` `log_full`.
//!
//! In Redis mode the same structure is a replica's local mirror of the Redis Stream,
//! filled by [`EventLog::insert_frame`] in seq order.

use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::aggregate::{Aggregate, ResumeState, TerminalKind};
use crate::event::{Event, EventBody, Frame};

/// Per-job caps (docs/protocol.md §2; docs/lessons.md: "the log is the only buffer, bounded per job").
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    /// Events, not counting the terminal one. Default 10,000.
    pub max_events: usize,
    /// Total frame bytes, not counting the terminal one. Default 8 MiB.
    pub max_bytes: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_events: 10_000,
            max_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The log already holds its terminal event; nothing may follow it.
    #[error("the log already ended")]
    Ended,
    /// The event would exceed the per-job cap; only a terminal event fits now.
    #[error("the log is full")]
    Full,
    /// The event could not be serialized into its frame; nothing was appended.
    #[error("the event could not be serialized")]
    Encode(#[source] serde_json::Error),
}

struct State {
    frames: Vec<Frame>,
    bytes: usize,
    /// The fold of every non-terminal event: the snapshot for `resume=true` and the
    /// partial answer. The terminal event is kept out of it on purpose (docs/protocol.md §3: the
    /// snapshot never folds in the terminal event).
    aggregate: Aggregate,
    terminal: Option<TerminalKind>,
    finished_at: Option<Instant>,
}

/// One job's event log. Cheap to share behind an `Arc`.
pub struct EventLog {
    state: RwLock<State>,
    /// Number of frames in the log; bumped after every append.
    len_tx: watch::Sender<u64>,
    limits: LogLimits,
}

/// What a subscriber gets back from [`EventLog::read_after`].
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub frames: Vec<Frame>,
    /// True when the batch ends with the terminal event.
    pub ended: bool,
}

impl EventLog {
    /// An empty log with the given caps.
    pub fn new(limits: LogLimits) -> Self {
        EventLog {
            state: RwLock::new(State {
                frames: Vec::new(),
                bytes: 0,
                aggregate: Aggregate::default(),
                terminal: None,
                finished_at: None,
            }),
            len_tx: watch::Sender::new(0),
            limits,
        }
    }

    /// Appends `body` with the next seq and wakes every subscriber.
    ///
    /// Errors: [`AppendError::Ended`] after the terminal event (so two writers racing
    /// to end a job produce exactly one terminal event); [`AppendError::Full`] when a
    /// non-terminal event would pass the cap; [`AppendError::Encode`] when the event
    /// cannot be serialized.
    pub fn append(&self, body: &EventBody) -> Result<Frame, AppendError> {
        let frame;
        {
            let mut st = self.state.write();
            if st.terminal.is_some() {
                return Err(AppendError::Ended);
            }
            let seq = st.frames.len() as u64;
            frame = Frame::encode(seq, body).map_err(AppendError::Encode)?;
            if !frame.terminal
                && (st.frames.len() + 1 > self.limits.max_events
                    || st.bytes + frame.bytes.len() > self.limits.max_bytes)
            {
                return Err(AppendError::Full);
            }
            Self::push(&mut st, frame.clone(), body);
        }
        self.len_tx.send_replace(frame.seq + 1);
        Ok(frame)
    }

    /// Inserts an already-encoded frame at its own seq (the Redis mirror path). Frames
    /// must arrive in order: a frame whose seq is not the next one (or any frame after
    /// the terminal event) is ignored and `Ok(false)` returned, so the caller knows to
    /// read the missing range first.
    ///
    /// Errors: the frame's `data:` is not an event this engine can read (a corrupt
    /// entry, or one written by a newer release). Nothing is inserted, so the log
    /// stops before that seq; the caller decides what its subscribers get (the Redis
    /// store logs it and reports its log as inconsistent).
    pub fn insert_frame(&self, frame: Frame) -> Result<bool, serde_json::Error> {
        let event = serde_json::from_slice::<Event>(frame.data_json())?;
        Ok(self.insert_encoded(frame, &event.body))
    }

    /// [`EventLog::insert_frame`] for the writer of the event, which has it at hand:
    /// `body` must be the event `frame` encodes (the Redis owner inserting the frames
    /// its append returned), and the frame's JSON is not read again. True if inserted;
    /// false (nothing inserted) if `frame` is not the next seq or the log ended.
    pub fn insert_encoded(&self, frame: Frame, body: &EventBody) -> bool {
        let seq = frame.seq;
        {
            let mut st = self.state.write();
            if seq != st.frames.len() as u64 || st.terminal.is_some() {
                return false;
            }
            Self::push(&mut st, frame, body);
        }
        self.len_tx.send_replace(seq + 1);
        true
    }

    fn push(st: &mut State, frame: Frame, body: &EventBody) {
        if let Some(kind) = terminal_kind(body) {
            st.terminal = Some(kind);
            st.finished_at = Some(Instant::now());
        } else {
            st.aggregate.apply(frame.seq, body);
        }
        st.bytes += frame.bytes.len();
        st.frames.push(frame);
    }

    /// Up to `max` frames with seq > `cursor` (all frames when `cursor` is `None`).
    pub fn read_after(&self, cursor: Option<u64>, max: usize) -> ReadBatch {
        let st = self.state.read();
        let start = cursor.map_or(0, |c| c.saturating_add(1)) as usize;
        if start >= st.frames.len() {
            return ReadBatch::default();
        }
        let end = st.frames.len().min(start + max.max(1));
        let frames: Vec<Frame> = st.frames[start..end].to_vec();
        let ended = frames.last().is_some_and(|f| f.terminal);
        ReadBatch { frames, ended }
    }

    /// The frame right after `cursor` (the first frame when `cursor` is `None`), if it
    /// is in the log yet: a clone of its `Bytes` handle, no copy and no allocation. The
    /// SSE subscriber reads one frame per poll this way, so an idle subscriber holds no
    /// buffer of frames it has already sent.
    pub fn frame_after(&self, cursor: Option<u64>) -> Option<Frame> {
        let next = cursor.map_or(Some(0), |c| c.checked_add(1))?;
        let st = self.state.read();
        st.frames.get(usize::try_from(next).ok()?).cloned()
    }

    /// A handle that wakes when the log grows. Call `borrow_and_update` before
    /// reading and `changed().await` after, and no append can slip between.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.len_tx.subscribe()
    }

    /// Number of events in the log (the head's seq + 1).
    pub fn len(&self) -> u64 {
        self.state.read().frames.len() as u64
    }

    /// True before the first append.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Seq of the last event, `None` while empty.
    pub fn head(&self) -> Option<u64> {
        self.len().checked_sub(1)
    }

    /// How the log ended, if it did.
    pub fn terminal(&self) -> Option<TerminalKind> {
        self.state.read().terminal
    }

    /// The terminal event, if the log has ended.
    pub fn terminal_event(&self) -> Option<Event> {
        let st = self.state.read();
        let f = st.frames.last().filter(|f| f.terminal)?;
        serde_json::from_slice(f.data_json()).ok()
    }

    /// The `resume=true` snapshot: `(N, state)` where N is the last seq folded in
    /// (never the terminal event), `None` for an empty log.
    pub fn snapshot(&self) -> (Option<u64>, ResumeState) {
        let st = self.state.read();
        let mut state = st.aggregate.resume_state();
        // The content stops before the terminal event, but the status is the job's: a
        // client resuming a finished job must not be told it is still running.
        if let Some(kind) = st.terminal {
            state.status = kind.as_str().to_string();
        }
        (st.aggregate.last_seq(), state)
    }

    /// Runs `f` on the aggregate of all non-terminal events (the partial answer and
    /// the usage collected so far).
    pub fn with_aggregate<R>(&self, f: impl FnOnce(&Aggregate) -> R) -> R {
        f(&self.state.read().aggregate)
    }

    /// Time since the terminal event, `None` while running.
    pub fn finished_for(&self) -> Option<Duration> {
        self.state.read().finished_at.map(|t| t.elapsed())
    }

    /// Total bytes of all frames.
    pub fn bytes(&self) -> usize {
        self.state.read().bytes
    }
}

fn terminal_kind(body: &EventBody) -> Option<TerminalKind> {
    match body {
        EventBody::Final(f) => Some(match f.status {
            crate::event::FinalStatus::Complete => TerminalKind::Complete,
            crate::event::FinalStatus::Aborted => TerminalKind::Aborted,
        }),
        EventBody::Error(_) => Some(TerminalKind::Error),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// An unparsable frame is refused with its parse error and leaves the log as it
    /// was (the next good frame still goes in at that seq); an out-of-order one is
    /// `Ok(false)`.
    #[test]
    fn insert_frame_refuses_an_unparsable_frame_with_its_error() {
        let log = EventLog::new(LogLimits::default());
        let bad = Frame::parse(Bytes::from_static(
            b"id: 0\nevent: on_message_delta\ndata: {\"seq\":0,\"event\":\"nope\"}\n\n",
        ))
        .unwrap();
        assert!(log.insert_frame(bad).is_err());
        assert_eq!(log.len(), 0);
        let body = EventBody::Retry(crate::event::Retry {
            attempt: 1,
            max_attempts: 2,
            delay_ms: 5,
            error: "x".into(),
            discard_step_ids: Vec::new(),
        });
        let later = Frame::encode(1, &body).unwrap();
        assert!(!log.insert_frame(later).unwrap(), "seq 1 before seq 0");
        assert!(log.insert_frame(Frame::encode(0, &body).unwrap()).unwrap());
        assert_eq!(log.len(), 1);
    }
}
