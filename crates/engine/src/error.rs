//! The engine's one error type. The server maps each variant to an HTTP status and a
//! JSON body in one place (`genstream-server::error`).

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
    /// A resume cursor past the log's head (400 `cursor_out_of_range`).
    #[error("cursor {cursor} is beyond the log's head ({head})")]
    CursorOutOfRange { cursor: u64, head: i64 },
    /// The job store (memory, Redis) failed (503 `store_unavailable`).
    #[error("job store: {0}")]
    Store(String),
    /// The database failed (503 `database_unavailable`).
    #[error("database: {0}")]
    Persistence(String),
    /// A bug or an impossible state (500 `internal`).
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Shorthand for [`EngineError::BadRequest`].
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        EngineError::BadRequest {
            field: field.to_string(),
            message: message.into(),
        }
    }
}
