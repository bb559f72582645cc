//! `GET /api/chat/stream/{streamId}` (docs/protocol.md §3).
//!
//! Everything that can fail is checked before the first byte, so those failures are
//! plain JSON 4xx answers: authentication, the job's existence and owner, and the
//! cursor. After that the response is a loop over the job's log: read the frames past
//! the cursor (cloning `Bytes` handles, never the bytes), write them, and sleep on the
//! log's watch until it grows, sending `: ping` while idle. The subscriber keeps no
//! queue of its own; the log is the only buffer. The response ends right after the
//! terminal event; a client whose cursor already is the terminal event gets 204.
//!
//! Every stream opens with `retry: N` (`http.sse_retry`, 1000 ms by default) on a line
//! of its own, so a browser's EventSource reconnects after N ms instead of its own
//! default of about three seconds (docs/protocol.md §3).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use genstream_engine::EngineError;
use genstream_engine::event::sse_frame;
use genstream_engine::log::EventLog;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant, Interval};

use crate::AppState;
use crate::auth::StreamUser;
use crate::error::ApiError;

#[derive(Deserialize)]
pub struct StreamQuery {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    resume: Option<String>,
}

pub async fn stream(
    State(state): State<AppState>,
    StreamUser(user): StreamUser,
    Path(stream_id): Path<String>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| EngineError::bad_request("query", e.body_text()))?;
    let (_meta, log) = state.manager.job_for(&user, &stream_id).await?;

    let resume = matches!(query.resume.as_deref(), Some("true" | "1"));
    // The query's cursor wins over Last-Event-ID (docs/protocol.md §3).
    let cursor = match (&query.cursor, headers.get("last-event-id")) {
        (Some(c), _) => Some(parse_cursor("cursor", c)?),
        (None, Some(h)) => Some(parse_cursor(
            "Last-Event-ID",
            h.to_str()
                .map_err(|_| EngineError::bad_request("Last-Event-ID", "not ASCII"))?,
        )?),
        (None, None) => None,
    };

    let (cursor, sync) = if resume {
        // The snapshot carries the seq it folds, so replaying from there cannot
        // duplicate or skip anything (docs/lessons.md: LibreChat #12225).
        let (seq, resume_state) = log.snapshot();
        let first = match seq {
            Some(n) => {
                let data = json!({"sync": true, "seq": n, "resumeState": resume_state});
                let frame = sse_frame(n, "sync", &data)
                    .map_err(|e| EngineError::internal("encoding the sync frame", e))?;
                Some(frame)
            }
            None => None,
        };
        (seq, first)
    } else {
        if let Some(c) = cursor {
            let mut head = log.head();
            if head.is_none_or(|h| c > h) {
                // This replica's mirror may lag the replica the client read from.
                state.manager.catch_up(&stream_id).await?;
                head = log.head();
            }
            if head.is_none_or(|h| c > h) {
                return Err(EngineError::CursorOutOfRange {
                    cursor: c,
                    head: head.map_or(-1, |h| h as i64),
                }
                .into());
            }
            if log.terminal().is_some() && head == Some(c) {
                // The client already has the terminal event: nothing will ever follow.
                // 204 is what tells a browser's EventSource to stop reconnecting (WHATWG
                // HTML, server-sent events); an empty 200 would be re-requested forever.
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
        (cursor, None)
    };

    let first = match sync {
        Some(sync) => [retry_field(state.sse_retry), sync].concat().into(),
        None => retry_field(state.sse_retry),
    };
    let sub = Subscriber {
        rx: log.watch(),
        log,
        cursor,
        done: false,
        ping: tokio::time::interval_at(Instant::now() + state.keepalive, state.keepalive),
        first: Some(first),
        conn: crate::observe::Connected::new(),
    };
    let body = Body::from_stream(futures::stream::unfold(sub, Subscriber::next));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// The SSE `retry:` field, in whole milliseconds, as a block of its own: it sets the
/// reconnection time of an EventSource and dispatches no event (WHATWG HTML,
/// server-sent events: a block without `data` is no event).
pub fn retry_field(retry: std::time::Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", retry.as_millis()))
}

fn parse_cursor(field: &str, v: &str) -> Result<u64, EngineError> {
    v.trim().parse::<u64>().map_err(|_| {
        EngineError::bad_request(
            field,
            format!("{v:?} is not a seq (a non-negative integer)"),
        )
    })
}

/// One open SSE connection: a cursor into the log and a wake-up handle.
struct Subscriber {
    log: Arc<EventLog>,
    rx: watch::Receiver<u64>,
    /// Seq of the last frame handed to the socket.
    cursor: Option<u64>,
    done: bool,
    ping: Interval,
    first: Option<Bytes>,
    /// The subscribers gauge and this connection's count of frames delivered.
    conn: crate::observe::Connected,
}

impl Subscriber {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if let Some(b) = self.first.take() {
            return Some((Ok(b), self));
        }
        if self.done {
            return None;
        }
        loop {
            // Mark the current version seen *before* reading, so an append that lands
            // after the read still wakes us.
            self.rx.borrow_and_update();
            // One frame per poll, straight from the log: hyper takes one chunk at a
            // time anyway, and the subscriber keeps no batch of frames alive.
            if let Some(f) = self.log.frame_after(self.cursor) {
                self.cursor = Some(f.seq);
                self.done = f.terminal;
                self.conn.frame();
                return Some((Ok(f.bytes), self));
            }
            if self.log.terminal().is_some() {
                // Nothing after the cursor in an ended log: the terminal event is behind
                // us, so waiting could only ever send pings.
                return None;
            }
            // Caught up: the frames counted so far may go to the shared counter.
            self.conn.idle();
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        // The log is gone; whatever it held was read above.
                        return None;
                    }
                }
                _ = self.ping.tick() => {
                    return Some((Ok(Bytes::from_static(b": ping\n\n")), self));
                }
            }
        }
    }
}
