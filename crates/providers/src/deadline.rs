//! The deadlines of one upstream attempt, and the `Timeout` error when one passes.
//!
//! Both halves of an attempt run against the same deadlines: [`crate::http`] waits
//! for the answer's head until the first-byte deadline, and [`crate::sse`] times the
//! body's bytes (the first byte by the same deadline, then no gap longer than the idle
//! timeout). They live here, apart from both, so that neither of the two depends on
//! the other for them.

use std::time::Duration;

use genstream_engine::provider::{ProviderError, ProviderErrorKind};
use genstream_engine::retry::Timeouts;
use tokio::time::Instant;

/// The deadlines of one attempt's body: the first byte by `first_byte_deadline`, then
/// no gap longer than `idle`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadlines {
    /// When the first byte must have come: the attempt's start plus `first_byte`.
    pub(crate) first_byte_deadline: Instant,
    /// The first-byte timeout, for messages.
    pub(crate) first_byte: Duration,
    /// The longest gap between two reads of the body.
    pub(crate) idle: Duration,
}

impl Deadlines {
    /// The deadlines of an attempt that started at `started`, under `timeouts`.
    pub(crate) fn new(started: Instant, timeouts: &Timeouts) -> Self {
        Deadlines {
            first_byte_deadline: started + timeouts.first_byte,
            first_byte: timeouts.first_byte,
            idle: timeouts.idle,
        }
    }
}

#[cfg(test)]
impl Deadlines {
    /// The default deadlines from now, for replays that never wait.
    pub(crate) fn relaxed() -> Self {
        Deadlines::new(Instant::now(), &Timeouts::default())
    }
}

/// The `Timeout` error of provider `provider` whose `what` budget (`first byte`, `idle
/// gap`) of `limit` ran out.
pub(crate) fn timeout_error(provider: &str, what: &str, limit: Duration) -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::Timeout,
        format!(
            "{provider}: the upstream sent nothing within the {what} timeout of {} s",
            limit.as_secs_f64()
        ),
    )
}
