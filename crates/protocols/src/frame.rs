//! Projected frames, the [`Projector`] contract and the [`ProjectedLog`] a server keeps
//! per (job, protocol).
//!
//! A projection turns native events into wire frames of another protocol. Frames are
//! numbered 0, 1, 2, … in the projected stream (their *position*; the Responses API's
//! `sequence_number` is exactly this number) and each remembers the native seq whose
//! event produced it. Because a projector's frames for seq k depend only on events
//! 0..=k, positions are a pure function of the log: every replica numbers every frame
//! the same, and a resume point in the projected stream maps back to one native seq.
//!
//! [`ProjectedLog`] stores the frames as shared [`Bytes`], so any number of subscribers
//! of the same (job, protocol) write the same allocation to their sockets: a frame is
//! serialized once, when its native event is pushed, and never per subscriber.

use bytes::Bytes;
use genstream_engine::event::EventBody;

use crate::ProjectionError;

/// One frame of a projected stream: the complete SSE frame, ready to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectedFrame {
    /// Position in the projected stream: 0, 1, 2, … without holes. For the Responses
    /// API this is the event's `sequence_number`.
    pub position: u64,
    /// The native seq of the event that produced the frame.
    pub seq: u64,
    /// Whether this is the projected stream's last frame (after it, close the
    /// response): `data: [DONE]` for Chat Completions and the AI SDK, the
    /// `response.completed` / `.failed` / `.incomplete` event for Responses.
    pub terminal: bool,
    /// The whole SSE frame, `data:` line(s) and the blank line included.
    pub bytes: Bytes,
}

/// An incremental, deterministic projection of one job's event log.
///
/// Feed the log's events in seq order from 0 (`created`); each push appends the
/// event's frames (zero or more) to `out`. The frames of seq k are a pure function of
/// events 0..=k and of what the projector was constructed with: the same prefix gives
/// the same frames, byte for byte, on any replica and in any process.
pub trait Projector {
    /// Projects the event at `seq`.
    ///
    /// Errors: [`ProjectionError::OutOfOrder`] if `seq` is not the next one,
    /// [`ProjectionError::NotCreated`] if the log does not start with `created`,
    /// [`ProjectionError::AfterTerminal`] for an event after the terminal one. Nothing
    /// is appended and the projector is unchanged when it errs.
    fn push(
        &mut self,
        seq: u64,
        body: &EventBody,
        out: &mut Vec<ProjectedFrame>,
    ) -> Result<(), ProjectionError>;

    /// The position the next frame will have (= frames produced so far).
    fn next_position(&self) -> u64;
}

/// Where to start re-projecting so that the result is exactly the frames after a
/// position: project native events after `after_seq` (all of them if `None`) on a
/// projector that has folded events 0..=`after_seq`, and drop the first `skip` frames.
///
/// A server that keeps a [`ProjectedLog`] never needs this (it slices its frames); it
/// is for a subscriber that follows the native log and projects as it goes, and
/// must know which native seq a projected cursor stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// The last native seq whose frames are all at or before the position.
    pub after_seq: Option<u64>,
    /// Frames of native seq `after_seq + 1` (or 0) that are at or before the position.
    pub skip: usize,
}

/// A projector with every frame it produced: one per (job, protocol), shared by all
/// subscribers of that protocol.
#[derive(Debug)]
pub struct ProjectedLog<P> {
    projector: P,
    frames: Vec<ProjectedFrame>,
    /// `starts[k]`: position of the first frame of native seq k (= frames produced
    /// before it), one entry per pushed event.
    starts: Vec<u64>,
}

impl<P: Projector> ProjectedLog<P> {
    /// An empty log over `projector` (which must not have been fed yet).
    pub fn new(projector: P) -> Self {
        ProjectedLog {
            projector,
            frames: Vec::new(),
            starts: Vec::new(),
        }
    }

    /// Projects the next native event and returns its frames (possibly none).
    ///
    /// Errors: as [`Projector::push`]; the log is unchanged then.
    pub fn push(
        &mut self,
        seq: u64,
        body: &EventBody,
    ) -> Result<&[ProjectedFrame], ProjectionError> {
        let before = self.frames.len();
        self.projector.push(seq, body, &mut self.frames)?;
        self.starts.push(before as u64);
        Ok(&self.frames[before..])
    }

    /// Every frame so far, in position order (`frames()[n].position == n`).
    pub fn frames(&self) -> &[ProjectedFrame] {
        &self.frames
    }

    /// Native events pushed so far.
    pub fn events(&self) -> u64 {
        self.starts.len() as u64
    }

    /// Whether the terminal frame was produced.
    pub fn is_finished(&self) -> bool {
        self.frames.last().is_some_and(|f| f.terminal)
    }

    /// The frames after `position` (all of them for `None`): what a client that saw
    /// up to `position` is missing. Empty when it has them all.
    ///
    /// Errors: [`ProjectionError::PositionOutOfRange`] for a position that was never
    /// produced (a client cannot have seen it).
    pub fn after(&self, position: Option<u64>) -> Result<&[ProjectedFrame], ProjectionError> {
        match position {
            None => Ok(&self.frames),
            Some(p) => {
                let len = self.frames.len() as u64;
                if p >= len {
                    return Err(ProjectionError::PositionOutOfRange { position: p, len });
                }
                Ok(&self.frames[(p + 1) as usize..])
            }
        }
    }

    /// The native seq that produced the frame at `position`, if there is one.
    pub fn seq_of(&self, position: u64) -> Option<u64> {
        self.frames.get(position as usize).map(|f| f.seq)
    }

    /// Where to resume re-projecting to get exactly the frames after `position`; see
    /// [`ResumePoint`]. `None` for a position that was never produced.
    pub fn resume_point(&self, position: u64) -> Option<ResumePoint> {
        let frame = self.frames.get(position as usize)?;
        let seq = frame.seq;
        let start = *self.starts.get(seq as usize)?;
        let end = self
            .starts
            .get(seq as usize + 1)
            .copied()
            .unwrap_or(self.frames.len() as u64);
        Some(if position + 1 == end {
            ResumePoint {
                after_seq: Some(seq),
                skip: 0,
            }
        } else {
            ResumePoint {
                after_seq: seq.checked_sub(1),
                skip: (position - start + 1) as usize,
            }
        })
    }

    /// The projector, e.g. to build the protocol's final object from its fold.
    pub fn projector(&self) -> &P {
        &self.projector
    }
}

/// Appends a frame `data: <json>\n\n` (Chat Completions, AI SDK).
pub(crate) fn data_frame<T: serde::Serialize>(value: &T) -> Result<Bytes, ProjectionError> {
    // Enough for a typical delta frame (Chat Completions chunks are ~240 bytes), so
    // the buffer is not regrown while it is written.
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, value)?;
    out.extend_from_slice(b"\n\n");
    Ok(Bytes::from(out))
}

/// `data: [DONE]\n\n`, the last frame of Chat Completions and AI SDK streams.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// Appends a frame `event: <name>\ndata: <json>\n\n` (Responses).
pub(crate) fn event_frame<T: serde::Serialize>(
    name: &str,
    value: &T,
) -> Result<Bytes, ProjectionError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut out, value)?;
    out.extend_from_slice(b"\n\n");
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits `seq % 3` frames for native seq `seq` (so some seqs emit none).
    struct Toy(u64);

    impl Projector for Toy {
        fn push(
            &mut self,
            seq: u64,
            _body: &EventBody,
            out: &mut Vec<ProjectedFrame>,
        ) -> Result<(), ProjectionError> {
            for _ in 0..seq % 3 {
                out.push(ProjectedFrame {
                    position: self.0,
                    seq,
                    terminal: false,
                    bytes: Bytes::from(format!("{}", self.0)),
                });
                self.0 += 1;
            }
            Ok(())
        }
        fn next_position(&self) -> u64 {
            self.0
        }
    }

    fn body() -> EventBody {
        crate::testing::LogBuilder::default().build().remove(0).body
    }

    #[test]
    fn positions_map_back_to_native_seqs() {
        let mut log = ProjectedLog::new(Toy(0));
        for seq in 0..6 {
            log.push(seq, &body()).unwrap_or_else(|_| unreachable!());
        }
        // seq: 0 → none, 1 → [0], 2 → [1, 2], 3 → none, 4 → [3], 5 → [4, 5]
        let seqs: Vec<u64> = log.frames().iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [1, 2, 2, 4, 5, 5]);
        let point = |p| log.resume_point(p).unwrap_or_else(|| unreachable!());
        let rp = |after_seq, skip| ResumePoint { after_seq, skip };
        assert_eq!(point(0), rp(Some(1), 0), "the last frame of seq 1");
        assert_eq!(point(1), rp(Some(1), 1), "seq 2's first frame: skip it");
        assert_eq!(point(2), rp(Some(2), 0));
        assert_eq!(point(3), rp(Some(4), 0));
        assert_eq!(point(4), rp(Some(4), 1));
        assert_eq!(point(5), rp(Some(5), 0));
        assert_eq!(log.resume_point(6), None);
        assert_eq!(log.seq_of(3), Some(4));
        assert_eq!(log.after(Some(3)).map(<[_]>::len).ok(), Some(2));
        assert!(matches!(
            log.after(Some(6)),
            Err(ProjectionError::PositionOutOfRange {
                position: 6,
                len: 6
            })
        ));
        assert_eq!(log.events(), 6);
    }
}
