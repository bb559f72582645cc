//! The engine's errors: [`EngineError`], what every engine call can refuse or fail
//! with (the server maps each variant to an HTTP status and a JSON body in one place,
//! `genstream-server::error`), and [`StoreError`], what the job store's traits fail
//! with, turned into an [`EngineError`] by `?` where the engine handles it. Each
//! failure keeps the error that caused it as its `source()`.

use crate::log::AppendError;

/// Any error, boxed: the cause a failure keeps.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the engine can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Bad input; `field` names the offending field (400 `invalid_request`).
    #[error("invalid `{field}`: {message}")]
    BadRequest { field: String, message: String },
    /// No such job, conversation or message (404 `not_found`).
    #[error("{0} not found")]
    NotFound(String),
    /// It exists but belongs to another user (403 `forbidden`).
    #[error("{0} belongs to another user")]
    Forbidden(String),
    /// The conversation already has a running job (409 `conversation_busy`).
    #[error("conversation {0} already has a running generation")]
    ConversationBusy(String),
    /// The job already finished, so it cannot be aborted (409 `job_finished`).
    #[error("job {0} already finished")]
    JobFinished(String),
    /// The user already runs as many generations as allowed (429
    /// `too_many_concurrent`).
    #[error("you already have {0} generations running; wait for one to finish")]
    TooManyConcurrent(usize),
    /// Over a rate limit (429 `rate_limited`, with `Retry-After`).
    #[error("too many messages per {scope}; retry in {retry_after_ms} ms")]
    RateLimited { scope: String, retry_after_ms: u64 },
    /// The user's balance is not positive (402 `insufficient_balance`).
    #[error("insufficient balance: {balance} credits")]
    InsufficientBalance { balance: f64 },
    /// The replica holds as many live jobs as it may (503 `server_busy`).
    #[error("the server is running its maximum of {0} generations")]
    ServerBusy(usize),
    /// Graceful shutdown is under way (503 `shutting_down`).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The idempotency key (the named one) was used by this user for a different
    /// request within its TTL (422 `idempotency_key_reused`).
    #[error(
        "idempotency key {0:?} was already used for a different request; use a new key for a new request"
    )]
    IdempotencyConflict(String),
    /// A start with the same idempotency key (the named one) is still under way and did
    /// not finish within the wait (409 `idempotency_key_in_use`); retry later.
    #[error("a request with idempotency key {0:?} is still being processed; retry shortly")]
    IdempotencyInProgress(String),
    /// A resume cursor past the log's head (400 `cursor_out_of_range`).
    #[error("cursor {cursor} is beyond the log's head ({head})")]
    CursorOutOfRange { cursor: u64, head: i64 },
    /// The job store (memory, Redis) failed (503 `store_unavailable`).
    #[error("job store: {0}")]
    Store(#[source] StoreError),
    /// The database failed (503 `database_unavailable`). A plain message converts
    /// with `.into()`; a database error keeps its cause (see
    /// [`EngineError::persistence`]).
    #[error("database: {0}")]
    Persistence(#[source] BoxError),
    /// A bug or an impossible state (500 `internal`).
    #[error("internal error: {0}")]
    Internal(#[source] BoxError),
}

impl EngineError {
    /// Shorthand for [`EngineError::BadRequest`].
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        EngineError::BadRequest {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// [`EngineError::Persistence`] for `source`, failed while doing `context`; its
    /// message reads `context: source`.
    pub fn persistence(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        EngineError::Persistence(Box::new(Caused::new(context, source)))
    }

    /// [`EngineError::Internal`] for `source`, failed while doing `context`; its
    /// message reads `context: source`.
    pub fn internal(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        EngineError::Internal(Box::new(Caused::new(context, source)))
    }
}

/// An error in the words of what was being done, keeping the error that caused it as
/// its `source()`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Caused {
    message: String,
    #[source]
    source: BoxError,
}

impl Caused {
    /// `source`, met while doing `context`: displays as `context: source`.
    pub fn new(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let message = format!("{}: {source}", context.into());
        Caused::with_message(message, source)
    }

    /// `source`, described by `message` (which already says what `source` says, in
    /// fewer words).
    pub fn with_message(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Caused {
            message: message.into(),
            source: Box::new(source),
        }
    }
}

/// Why a store call failed. Every method of the store traits returns it; `?` turns it
/// into the matching [`EngineError`] (see the `From` impl) where the engine handles it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The append was refused: the log has its terminal event, is full, or the event
    /// could not be serialized. Not worth retrying.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// No such job: unknown, past retention, or lost by the store (a Redis restart
    /// without persistence).
    #[error("job {0} not found")]
    UnknownJob(String),
    /// The conversation already has a running job.
    #[error("conversation {0} already has a running generation")]
    ConversationBusy(String),
    /// The user already runs the store's per-user maximum of jobs (the number).
    #[error("you already have {0} generations running; wait for one to finish")]
    TooManyConcurrent(usize),
    /// The store's log contradicts what the writer knows: it lost events the writer
    /// appended, or another writer appended in its place. A bug or a lost store, not
    /// an outage; not worth retrying.
    #[error("{0}")]
    Inconsistent(String),
    /// The backing service failed or did not answer in time. Worth retrying: the
    /// job's owner rides out such failures for its store-outage grace.
    #[error("{context}: {source}")]
    Unavailable {
        /// What was being done, or which service failed (`redis`).
        context: String,
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// A failure of the backing service while doing `context`, keeping its cause.
    pub fn unavailable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable {
            context: context.into(),
            source: source.into(),
        }
    }

    /// True for a failure worth retrying (the store did not answer, or failed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownJob(id) => EngineError::NotFound(format!("job {id}")),
            StoreError::ConversationBusy(id) => EngineError::ConversationBusy(id),
            StoreError::TooManyConcurrent(n) => EngineError::TooManyConcurrent(n),
            e @ StoreError::Unavailable { .. } => EngineError::Store(e),
            e @ (StoreError::Append(_) | StoreError::Inconsistent(_)) => {
                EngineError::Internal(Box::new(e))
            }
        }
    }
}
