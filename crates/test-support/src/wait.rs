//! Waiting for something to happen, with a deadline.
//!
//! A test that sleeps "long enough" for another task or process to get somewhere is
//! slow when the guess is generous and flaky when the machine is loaded. These poll
//! the condition instead, every [`POLL`], and fail with a message naming what was
//! awaited once `timeout` passes. Within one process prefer an explicit signal (a
//! channel, a `watch`) or paused tokio time; a poll is for state that lives elsewhere:
//! another process, Redis, the database, a server's answers.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often the condition is checked.
pub const POLL: Duration = Duration::from_millis(10);

/// Waits until `check` gives `true`, checking at once and then every [`POLL`].
///
/// # Panics
/// When `timeout` passes first, naming `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await;
}

/// Waits until `check` gives `Some(value)` and returns the value, checking at once and
/// then every [`POLL`].
///
/// # Panics
/// When `timeout` passes first, naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("waited {timeout:?} for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
