//! Client protocols as pure projections of a job's event log.
//!
//! genstream's native stream is the event log itself (`created`, `on_run_step`,
//! deltas, `usage`, `final`…). The clients people already have speak other protocols:
//! the official OpenAI SDKs speak Chat Completions and Responses, the Vercel AI SDK's
//! `useChat` speaks its UI message stream. This crate turns the log into each of them:
//!
//! - [`chat`]: `chat.completion.chunk` frames and the `chat.completion` object;
//! - [`responses`]: Responses stream events (with `sequence_number`) and the
//!   `response` object;
//! - [`ai_sdk`]: the AI SDK UI message stream (`x-vercel-ai-ui-message-stream: v1`).
//!
//! Each projection is a deterministic state machine fed the log's events in seq order
//! ([`Projector`]): the frames it makes for native seq k depend on events 0..=k and
//! nothing else (no clock, no randomness), so every replica makes the same frames,
//! byte for byte, with the same positions. The same job can be watched at once over the
//! native stream and any number of projections, and a projected resume point (a
//! Responses `starting_after=N`) is exact on any replica: [`ProjectedLog`] keeps one
//! projection's frames as shared bytes and maps a position back to the native seq that
//! produced it.
//!
//! What the native log only implies — when a part is over, when a tool call's
//! arguments are complete, what a `retry` takes back — is worked out once, in
//! [`fold::JobFold`], which all three share; the final objects are functions of that
//! fold. The mapping tables are in this crate's README.
//!
//! No HTTP and no async here: the server's routes use these types later.

pub mod ai_sdk;
pub mod chat;
pub mod fold;
mod frame;
pub mod responses;
#[doc(hidden)]
pub mod testing;

pub use frame::{ProjectedFrame, ProjectedLog, Projector, ResumePoint};

/// Why a projection refused an event or a position.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// Events must come in seq order from 0, without holes.
    #[error("event seq {got} is out of order: expected seq {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    /// A log starts with `created`.
    #[error("a log starts with `created`, not `{0}`")]
    NotCreated(&'static str),
    /// Nothing follows the terminal event.
    #[error("event seq {0} comes after the terminal event")]
    AfterTerminal(u64),
    /// A resume position the projection never produced.
    #[error("position {position} is out of range: the projection has {len} frames")]
    PositionOutOfRange { position: u64, len: u64 },
    /// A frame could not be serialized (the projections' own types never fail; this
    /// keeps such a failure from being dropped silently).
    #[error("could not serialize a frame: {0}")]
    Serialize(#[from] serde_json::Error),
}
