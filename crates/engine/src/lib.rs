//! genstream's job engine.
//!
//! A *job* is one generation: one user message in, one assistant response out. Its
//! output is an append-only *event log* (docs/protocol.md §2) whose events carry a `seq` 0, 1, 2, …
//! with no holes. Every event is serialized once, into the bytes of its SSE frame, and
//! those bytes are shared by every subscriber; a subscriber is nothing but a cursor into
//! the log plus a wake-up handle, so a slow reader costs only its socket.
//!
//! The engine knows nothing of HTTP or SQL. It talks to the outside through three
//! kinds of trait:
//! - [`store::JobStore`]: job metadata, the event logs, who may end a job, and rate
//!   limits (in memory here, in Redis in `genstream-redis`), itself three narrow
//!   traits ([`store::EventLogStore`], [`store::JobCoordination`], [`store::RateLimitStore`]);
//! - [`persist::Persistence`]: conversations and messages (SQLite, PostgreSQL);
//! - [`provider::Provider`]: an upstream model (demo, OpenAI, Anthropic).
//!
//! [`manager::JobManager`] ties them together: it starts jobs, runs them in tracked
//! background tasks, aborts them, reaps stalled ones and shuts down gracefully.

pub mod aggregate;
pub mod billing;
pub mod error;
pub mod event;
pub mod ledger;
pub mod log;
pub mod manager;
pub mod metrics;
pub mod persist;
pub mod provider;
pub mod retry;
pub mod store;
pub mod suite;
pub mod tools;
pub mod usage;

pub use error::EngineError;

/// A fresh time-ordered id (UUIDv7) as a string, used for stream, conversation and
/// message ids.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Now as an RFC 3339 UTC timestamp with exactly three fractional digits
/// (`2026-11-21T12:45:00.000Z`), the format of every `createdAt` on the wire and in the
/// database. The fixed width matters: timestamps are ordered as text.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// `t` (taken as UTC) in the fixed-width form of [`now_rfc3339`].
pub fn rfc3339(now: time::OffsetDateTime) -> String {
    let now = now.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}
