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
//!
//! Frames are stored in sealed blocks: once the frames not yet sealed reach
//! [`SEAL_BYTES`] (or the terminal event arrives), they are copied once, back to back,
//! into one buffer (a block), and each frame's `Bytes` becomes a slice of it. That one
//! copy per event buys two things: a subscriber that is behind gets a run of
//! consecutive frames as a single `Bytes` ([`EventLog::frames_after`], a slice of the
//! block, no per-subscriber copy), so the HTTP layer writes one chunk instead of one per
//! frame; and a retained log holds one allocation per block instead of one per event.
//! Frames after the last block (the open tail) are handed out one at a time.

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

/// The unsealed frames are copied into one block once they hold this many bytes.
/// Small enough that a subscriber a few dozen frames behind already gets runs; large
/// enough that a run is far more bytes than a chunk's framing.
pub const SEAL_BYTES: usize = 4096;

struct State {
    frames: Vec<Frame>,
    bytes: usize,
    /// The sealed blocks, by the seq of their first frame: frames `first..next.first`
    /// are consecutive slices of `bytes`, in seq order. Frames from `sealed` on are in
    /// no block yet.
    blocks: Vec<Block>,
    /// Number of frames in blocks (the seq of the first unsealed frame).
    sealed: usize,
    /// Bytes of the unsealed frames.
    open_bytes: usize,
    /// The fold of every non-terminal event: the snapshot for `resume=true` and the
    /// partial answer. The terminal event is kept out of it on purpose (docs/protocol.md §3: the
    /// snapshot never folds in the terminal event).
    aggregate: Aggregate,
    terminal: Option<TerminalKind>,
    finished_at: Option<Instant>,
}

/// Consecutive frames copied back to back into one buffer.
struct Block {
    first: usize,
    bytes: bytes::Bytes,
}

/// A run of consecutive whole frames, from [`EventLog::frames_after`].
#[derive(Clone, Debug)]
pub struct Run {
    /// The frames' bytes back to back (a slice of the log's shared buffer).
    pub bytes: bytes::Bytes,
    /// Seq of the run's last frame: the subscriber's cursor once it is sent.
    pub last_seq: u64,
    /// Number of frames in the run (at least 1).
    pub frames: usize,
    /// True when the run ends with the terminal event.
    pub ended: bool,
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
                blocks: Vec::new(),
                sealed: 0,
                open_bytes: 0,
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
    /// it built for its append), and the frame's JSON is not read again. True if inserted;
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
        st.open_bytes += frame.bytes.len();
        let terminal = frame.terminal;
        st.frames.push(frame);
        if terminal || st.open_bytes >= SEAL_BYTES {
            Self::seal(st);
        }
    }

    /// Copies the unsealed frames into one new block and points each at its slice.
    fn seal(st: &mut State) {
        let first = st.sealed;
        let open = &mut st.frames[first..];
        let bytes = match open {
            [] => return,
            // One frame is its own block: nothing to copy.
            [only] => only.bytes.clone(),
            _ => {
                let mut buf = bytes::BytesMut::with_capacity(st.open_bytes);
                for f in open.iter() {
                    buf.extend_from_slice(&f.bytes);
                }
                let block = buf.freeze();
                let mut at = 0;
                for f in open.iter_mut() {
                    let len = f.bytes.len();
                    f.bytes = block.slice(at..at + len);
                    at += len;
                }
                block
            }
        };
        st.blocks.push(Block { first, bytes });
        st.sealed = st.frames.len();
        st.open_bytes = 0;
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

    /// The frames right after `cursor` (from the first frame when `cursor` is `None`)
    /// as one run of whole frames, if there is any frame yet: as many consecutive
    /// frames of one sealed block as fit in `max_bytes`, and always at least one frame
    /// (a frame larger than `max_bytes`, or a frame not sealed yet, comes alone).
    /// `max_bytes` 0 therefore reads one frame at a time, as [`Self::frame_after`].
    /// A slice of the log's buffer: no copy and one allocation-free handle, whatever
    /// the number of subscribers reading it.
    pub fn frames_after(&self, cursor: Option<u64>, max_bytes: usize) -> Option<Run> {
        let next = usize::try_from(cursor.map_or(Some(0), |c| c.checked_add(1))?).ok()?;
        let st = self.state.read();
        let first = st.frames.get(next)?;
        let single = |f: &Frame| Run {
            bytes: f.bytes.clone(),
            last_seq: f.seq,
            frames: 1,
            ended: f.terminal,
        };
        if next >= st.sealed || first.bytes.len() >= max_bytes {
            return Some(single(first));
        }
        // The block holding `next`: the last one starting at or before it.
        let b = st
            .blocks
            .partition_point(|b| b.first <= next)
            .checked_sub(1)?;
        let block = &st.blocks[b];
        let block_end = st.blocks.get(b + 1).map_or(st.sealed, |n| n.first);
        let mut len = first.bytes.len();
        let mut last = next;
        for f in &st.frames[next + 1..block_end] {
            if len + f.bytes.len() > max_bytes {
                break;
            }
            len += f.bytes.len();
            last += 1;
        }
        if last == next {
            return Some(single(first));
        }
        // Frames of a block are its consecutive slices, so the run starts where the
        // first frame's slice starts.
        let start = (first.bytes.as_ptr() as usize).checked_sub(block.bytes.as_ptr() as usize)?;
        let end = start + len;
        if end > block.bytes.len() {
            return Some(single(first));
        }
        let tail = &st.frames[last];
        Some(Run {
            bytes: block.bytes.slice(start..end),
            last_seq: tail.seq,
            frames: last - next + 1,
            ended: tail.terminal,
        })
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

    fn retry(error_len: usize) -> EventBody {
        EventBody::Retry(crate::event::Retry {
            attempt: 1,
            max_attempts: 2,
            delay_ms: 5,
            error: "x".repeat(error_len),
            discard_step_ids: Vec::new(),
        })
    }

    fn error_event() -> EventBody {
        EventBody::Error(crate::event::ErrorEvent {
            code: "internal".into(),
            message: "m".into(),
            response_message: None,
        })
    }

    /// A log of events whose error texts have the given lengths, ended by an error
    /// event when `ended`.
    fn log_of(lens: &[usize], ended: bool) -> EventLog {
        let log = EventLog::new(LogLimits {
            max_events: 100_000,
            max_bytes: usize::MAX,
        });
        for &n in lens {
            log.append(&retry(n)).unwrap();
        }
        if ended {
            log.append(&error_event()).unwrap();
        }
        log
    }

    /// Frames behind the open tail come as runs of whole frames (several per run),
    /// frames of the open tail one at a time, and the terminal event seals the rest.
    #[test]
    fn frames_after_gives_runs_of_sealed_frames_and_single_open_frames() {
        let log = log_of(&[100; 100], false);
        let frames = log.read_after(None, usize::MAX).frames;
        let run = log.frames_after(None, 64 * 1024).unwrap();
        assert!(
            run.frames > 10,
            "a sealed block is read as one run: {run:?}"
        );
        let whole: Vec<u8> = frames[..run.frames]
            .iter()
            .flat_map(|f| f.bytes.to_vec())
            .collect();
        assert_eq!(run.bytes, whole);
        assert_eq!(run.last_seq, run.frames as u64 - 1);
        let st_sealed = log.state.read().sealed;
        assert!(
            st_sealed < frames.len(),
            "the last frames are not sealed yet"
        );
        let open = log.frames_after(Some(st_sealed as u64), 64 * 1024).unwrap();
        assert_eq!(open.frames, 1);
        assert_eq!(open.last_seq, st_sealed as u64 + 1);
        // max_bytes 0: one frame, as frame_after.
        let one = log.frames_after(Some(3), 0).unwrap();
        assert_eq!((one.frames, one.last_seq), (1, 4));
        assert_eq!(one.bytes, frames[4].bytes);
        assert!(log.frames_after(Some(99), 64 * 1024).is_none());
        assert!(log.frames_after(Some(u64::MAX), 64 * 1024).is_none());

        log.append(&error_event()).unwrap();
        let tail = log.frames_after(Some(st_sealed as u64), 64 * 1024).unwrap();
        assert!(
            tail.ended,
            "the terminal event seals the open tail: {tail:?}"
        );
        assert_eq!(tail.last_seq, 100);
        assert_eq!(tail.frames, 100 - st_sealed);
    }

    /// A frame longer than `max_bytes`, or than a block, still comes whole and alone.
    #[test]
    fn a_frame_larger_than_max_bytes_comes_alone_and_whole() {
        let log = log_of(&[10, 10, SEAL_BYTES * 2, 10, 10], true);
        let frames = log.read_after(None, usize::MAX).frames;
        let big = log.frames_after(Some(1), 1000).unwrap();
        assert_eq!((big.frames, big.last_seq), (1, 2));
        assert_eq!(big.bytes, frames[2].bytes);
        let small = log.frames_after(None, 1000).unwrap();
        assert_eq!(small.frames, 2, "stops before the frame that does not fit");
    }

    /// Reading a whole log run by run with any `max_bytes` yields every frame once, in
    /// order, and ends exactly at the terminal event.
    #[test]
    fn reading_run_by_run_yields_the_log_byte_for_byte() {
        let lens: Vec<usize> = (0..500).map(|i| (i * 37) % 300).collect();
        let log = log_of(&lens, true);
        let all: Vec<u8> = log
            .read_after(None, usize::MAX)
            .frames
            .iter()
            .flat_map(|f| f.bytes.to_vec())
            .collect();
        for max in [0, 1, 200, 1000, SEAL_BYTES, 1 << 20] {
            let (mut cursor, mut got, mut ended) = (None, Vec::new(), false);
            while let Some(run) = log.frames_after(cursor, max) {
                assert!(!ended, "nothing after the terminal event");
                assert!(run.frames == 1 || run.bytes.len() <= max);
                got.extend_from_slice(&run.bytes);
                cursor = Some(run.last_seq);
                ended = run.ended;
            }
            assert!(ended, "max {max}");
            assert_eq!(got, all, "max {max}");
        }
    }

    proptest::proptest! {
        /// Any log, any cursor, any `max_bytes`: the run is the concatenation of the
        /// frames from cursor + 1 to its last seq, at least one frame, within
        /// `max_bytes` unless it is one frame, and `ended` exactly when it ends with
        /// the terminal event.
        #[test]
        fn a_run_is_the_concatenation_of_its_frames(
            lens in proptest::collection::vec(0usize..2000, 0..200),
            ended in proptest::bool::ANY,
            cursor in proptest::option::of(0u64..210),
            max in 0usize..20_000,
        ) {
            let log = log_of(&lens, ended);
            let frames = log.read_after(None, usize::MAX).frames;
            let next = cursor.map_or(0, |c| c as usize + 1);
            let Some(run) = log.frames_after(cursor, max) else {
                proptest::prop_assert!(next >= frames.len());
                return Ok(());
            };
            proptest::prop_assert!(run.frames >= 1);
            proptest::prop_assert_eq!(run.last_seq as usize, next + run.frames - 1);
            let expected: Vec<u8> = frames[next..next + run.frames]
                .iter()
                .flat_map(|f| f.bytes.to_vec())
                .collect();
            proptest::prop_assert_eq!(&run.bytes[..], &expected[..]);
            proptest::prop_assert!(run.frames == 1 || run.bytes.len() <= max);
            proptest::prop_assert_eq!(run.ended, frames[run.last_seq as usize].terminal);
            // Each frame still reads as itself.
            for f in &frames[next..=run.last_seq as usize] {
                let one = log.frame_after(f.seq.checked_sub(1)).unwrap();
                proptest::prop_assert_eq!(&one.bytes, &f.bytes);
            }
        }
    }
}
