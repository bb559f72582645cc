//! [`ClientError`]: everything the client can fail with, each a one-line message.

use std::time::Duration;

use reqwest::StatusCode;

/// Everything that can go wrong talking to a genstream server. Its `Display` is one
/// line, fit to print after `error: `.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server URL is not an absolute `http`/`https` URL.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidServerUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The token cannot be sent in an HTTP header.
    #[error("invalid token: it contains characters that cannot go in an HTTP header")]
    InvalidToken,
    /// The HTTP client could not be set up (TLS backend initialisation).
    #[error("could not set up the HTTP client: {0}")]
    Setup(String),
    /// A request could not be sent or its answer not read: connection refused or reset,
    /// timeout, a stream that ended before its terminal event.
    #[error("{method} {path}: {detail}")]
    Network {
        /// HTTP method of the request.
        method: &'static str,
        /// URL path of the request (never the query, which could hold a token).
        path: String,
        /// What happened, with the underlying causes.
        detail: String,
    },
    /// The server answered an error status; `code` and `message` are its JSON
    /// `{"error": {"code", "message"}}` (docs/protocol.md §4).
    #[error("{method} {path} failed with {status}: {code}: {message}")]
    Api {
        /// HTTP method of the request.
        method: &'static str,
        /// URL path of the request.
        path: String,
        /// The HTTP status.
        status: StatusCode,
        /// The server's machine-readable `error.code`, or `unexpected_response` when
        /// the body was not the documented JSON.
        code: String,
        /// The server's `error.message`, or the start of the body.
        message: String,
    },
    /// The server broke the protocol: a `seq` that is not cursor + 1, a malformed SSE
    /// frame, a body that is not the documented JSON.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reconnecting to a stream kept failing for longer than the give-up limit.
    #[error(
        "gave up on stream {stream_id} after {attempts} failed attempts in {:.1}s \
         (the generation may still be running: genstream attach {stream_id}); last error: {last}",
        elapsed.as_secs_f64()
    )]
    GaveUp {
        /// The stream being followed.
        stream_id: String,
        /// The last seq received, if any.
        cursor: Option<u64>,
        /// Consecutive failed connection attempts.
        attempts: u32,
        /// Time since the first of those failures.
        elapsed: Duration,
        /// The last failure.
        last: String,
    },
    /// The server answered 204: the stream's terminal event is at or before the
    /// cursor, so nothing follows it (docs/protocol.md §3; `genstream attach --cursor N` with N
    /// the last seq).
    #[error("stream {stream_id} has already ended; nothing follows seq {}", cursor.map_or("-".into(), |c| c.to_string()))]
    AlreadyEnded {
        /// The stream.
        stream_id: String,
        /// The cursor sent.
        cursor: Option<u64>,
    },
    /// The generation ended with an `error` event.
    #[error("generation failed: {code}: {message}")]
    Generation {
        /// The stream that failed.
        stream_id: String,
        /// The event's `code` (`upstream_error`, `stalled`, `replica_lost`, …).
        code: String,
        /// The event's `message`.
        message: String,
    },
    /// The generation ended with `final` and `status: "aborted"`.
    #[error("generation {stream_id} was aborted; the partial answer was saved")]
    Aborted {
        /// The aborted stream.
        stream_id: String,
    },
    /// Writing to the output or error stream failed.
    #[error("could not write output: {0}")]
    Output(#[from] std::io::Error),
}

impl ClientError {
    /// True when a `run_*` function has already written this error's one-line message
    /// to its `err` writer ([`ClientError::Generation`], [`ClientError::Aborted`]):
    /// the binary should exit non-zero without printing it again.
    pub fn is_reported(&self) -> bool {
        matches!(
            self,
            ClientError::Generation { .. } | ClientError::Aborted { .. }
        )
    }

    /// The HTTP status when the server answered with an error status.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// `err` and its chain of sources, joined by `": "`, so reqwest's terse top-level
/// message ("error sending request") comes with its cause ("connection refused").
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}
