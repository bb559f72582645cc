//! `GET /api/chat/stream/{streamId}` (docs/protocol.md §3).
//!
//! Everything that can fail is checked before the first byte, so those failures are
//! plain JSON 4xx answers: authentication, the job's existence and owner, and the
//! cursor. After that the response is a loop over the job's log: read the frames past
//! the cursor (cloning `Bytes` handles, never the bytes; a subscriber that is behind
//! takes a run of consecutive whole frames, up to `http.sse_chunk_bytes`, as one
//! chunk: [`EventLog::frames_after`]), write them, and sleep on the
//! log's watch until it grows, sending `: ping` while idle. The subscriber keeps no
//! queue of its own; the log is the only buffer. The response ends right after the
//! terminal event; a client whose cursor already is the terminal event gets 204.
//!
//! On a replica with no copy of the log yet (Redis mode, no subscriber of this job
//! here before) the first frames come from the store's own log instead, in pages from
//! the cursor ([`EventLogStore::read_range`](genstream_engine::store::EventLogStore::read_range)),
//! while the copy fills; the reader moves to the copy at the seq it reached, so the
//! first byte does not wait for the whole log to be read.
//!
//! Every stream opens with `retry: N` (`http.sse_retry`, 1000 ms by default) on a line
//! of its own, so a browser's EventSource reconnects after N ms instead of its own
//! default of about three seconds (docs/protocol.md §3).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use genstream_engine::EngineError;
use genstream_engine::event::{Frame, sse_frame};
use genstream_engine::log::EventLog;
use genstream_engine::store::JobStore;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant, Interval};

use crate::AppState;
use crate::auth::StreamUser;
use crate::error::ApiError;

/// Query of the stream route.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Start after this seq (a non-negative integer); wins over `Last-Event-ID`.
    #[serde(default)]
    #[param(pattern = "^[0-9]+$")]
    cursor: Option<String>,
    /// `true`: open with a `sync` event holding the answer so far, then follow.
    #[serde(default)]
    resume: Option<String>,
}

/// `GET /api/chat/stream/{stream_id}`: the job's events as SSE.
#[utoipa::path(get, path = "/api/chat/stream/{stream_id}", tag = "chat",
    security(("bearer" = []), ("access_token" = [])),
    params(("stream_id" = String, Path), StreamQuery,
        ("Last-Event-ID" = Option<String>, Header,
            description = "The last seq the client has (an EventSource's reconnect)")),
    responses(
        (status = 200, description = crate::openapi::NATIVE_STREAM,
            content_type = "text/event-stream", body = crate::openapi::NativeEvent),
        (status = 204, description = "The cursor already is the terminal event: nothing follows"),
        crate::openapi::ApiErrors))]
pub async fn stream(
    State(state): State<AppState>,
    StreamUser(user): StreamUser,
    Path(stream_id): Path<String>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| EngineError::bad_request("query", e.body_text()))?;
    let resume = matches!(query.resume.as_deref(), Some("true" | "1"));
    let store = state.manager.store().clone();
    // `resume=true` folds the whole log, so it needs this replica's copy filled.
    let ready = if resume {
        Some(state.manager.job_for(&user, &stream_id).await?.1)
    } else {
        state.manager.job_meta_for(&user, &stream_id).await?;
        store.ready_log(&stream_id)
    };
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

    let (source, cursor, first) = match ready {
        // No copy of the log on this replica yet (a Redis replica that no subscriber
        // of this job used): answer from the store's own log while the copy fills.
        None => {
            let page = store
                .read_range(&stream_id, cursor, FIRST_PAGE)
                .await
                .map_err(EngineError::from)?
                .ok_or_else(|| EngineError::NotFound(format!("stream {stream_id}")))?;
            if let Some(c) = cursor {
                let head = page.len.checked_sub(1);
                if head.is_none_or(|h| c > h) {
                    return Err(EngineError::CursorOutOfRange {
                        cursor: c,
                        head: head.map_or(-1, |h| h as i64),
                    }
                    .into());
                }
                if page.ended && head == Some(c) {
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
            }
            if !page.ended {
                // Live delivery goes through the copy: start filling it now, so it is
                // there when the pages reach the head. A finished job gets no copy
                // here: its readers page Redis's log to its end (filling a copy of a
                // 10,000-event log takes tens of ms of this replica's CPU, measured to
                // delay the next readers more than a page read does).
                let (fill, sid) = (store.clone(), stream_id.clone());
                tokio::spawn(async move {
                    if let Err(e) = fill.open_log(&sid).await {
                        tracing::debug!(stream_id = %sid, error = %e, "could not open a log copy");
                    }
                });
            }
            let more = page.frames.len() >= FIRST_PAGE;
            let source = Source::Store {
                store,
                stream_id: stream_id.clone(),
                page: page.frames.into(),
                more,
            };
            (source, cursor, None)
        }
        Some(log) => {
            let (cursor, first) = warm_start(&state, &stream_id, &log, resume, cursor).await?;
            if first.is_none()
                && cursor.is_some_and(|c| log.terminal().is_some() && log.head() == Some(c))
            {
                // The client already has the terminal event: nothing will ever follow.
                // 204 is what tells a browser's EventSource to stop reconnecting (WHATWG
                // HTML, server-sent events); an empty 200 would be re-requested forever.
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            let rx = log.watch();
            (Source::Log { log, rx }, cursor, first)
        }
    };

    let first = match first {
        Some(sync) => [retry_field(state.sse_retry), sync].concat().into(),
        None => retry_field(state.sse_retry),
    };
    let sub = Subscriber {
        source,
        cursor,
        done: false,
        ping: tokio::time::interval_at(Instant::now() + state.keepalive, state.keepalive),
        first: Some(first),
        chunk_bytes: state.sse_chunk_bytes,
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

/// Frames a cold read asks the store for first: small, so the first byte does not
/// wait for a large reply.
const FIRST_PAGE: usize = 100;
/// Frames per store read after the first.
const PAGE: usize = 1000;

/// Where the cursor and the first frame of a read from this replica's copy of the log
/// come from: the `resume=true` snapshot (docs/protocol.md §3), or the client's cursor checked
/// against the head (this replica's copy may lag the replica the client read from).
async fn warm_start(
    state: &AppState,
    stream_id: &str,
    log: &EventLog,
    resume: bool,
    cursor: Option<u64>,
) -> Result<(Option<u64>, Option<Bytes>), ApiError> {
    if resume {
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
        return Ok((seq, first));
    }
    if let Some(c) = cursor {
        let mut head = log.head();
        if head.is_none_or(|h| c > h) {
            // This replica's mirror may lag the replica the client read from.
            state.manager.catch_up(stream_id).await?;
            head = log.head();
        }
        if head.is_none_or(|h| c > h) {
            return Err(EngineError::CursorOutOfRange {
                cursor: c,
                head: head.map_or(-1, |h| h as i64),
            }
            .into());
        }
    }
    Ok((cursor, None))
}

/// What a subscriber reads from.
enum Source {
    /// This replica's copy of the log, and a wake-up handle on it.
    Log {
        log: Arc<EventLog>,
        rx: watch::Receiver<u64>,
    },
    /// Pages of the store's own log, read while this replica's copy fills; the
    /// subscriber moves to the copy as soon as it holds the next seq, or once a page
    /// reached the head (only the copy gets what is appended next).
    Store {
        store: Arc<dyn JobStore>,
        stream_id: String,
        page: VecDeque<Frame>,
        /// The last page was full: the store may hold more.
        more: bool,
    },
}

/// One open SSE connection: a cursor into the log and where its frames come from.
struct Subscriber {
    source: Source,
    /// Seq of the last frame handed to the socket.
    cursor: Option<u64>,
    done: bool,
    ping: Interval,
    first: Option<Bytes>,
    /// Most bytes of consecutive frames handed over as one chunk (`http.sse_chunk_bytes`).
    chunk_bytes: usize,
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
            let next_seq = self.cursor.map_or(0, |c| c.saturating_add(1));
            let log = match &mut self.source {
                Source::Log { log, rx } => {
                    // Mark the current version seen *before* reading, so an append that
                    // lands after the read still wakes us.
                    rx.borrow_and_update();
                    // Whether the log had ended *before* the read below: a log never
                    // grows after its terminal event, so an ended log with nothing
                    // after the cursor has nothing more to give. (Asked after the read,
                    // a terminal event landing in between would end this response
                    // before the frames that came with it.)
                    let ended = log.terminal().is_some();
                    // Straight from the log: the frame after the cursor, or, when this
                    // subscriber is behind, a run of consecutive whole frames as one
                    // slice of the log's buffer (no copy), so hyper writes one chunk
                    // instead of one per frame. The subscriber keeps no batch of frames
                    // alive, and the cursor is always the seq of a whole frame sent.
                    if let Some(run) = log.frames_after(self.cursor, self.chunk_bytes) {
                        self.cursor = Some(run.last_seq);
                        self.done = run.ended;
                        self.conn.frames(run.frames);
                        return Some((Ok(run.bytes), self));
                    }
                    if ended {
                        // Nothing after the cursor in an ended log: the terminal event
                        // is behind us, so waiting could only ever send pings.
                        return None;
                    }
                    // Caught up: the frames counted so far may go to the shared counter.
                    self.conn.idle();
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                // The log is gone; whatever it held was read above.
                                return None;
                            }
                        }
                        _ = self.ping.tick() => {
                            return Some((Ok(Bytes::from_static(b": ping\n\n")), self));
                        }
                    }
                    continue;
                }
                Source::Store {
                    store,
                    stream_id,
                    page,
                    more,
                } => {
                    if let Some(f) = page.pop_front() {
                        if f.seq == next_seq {
                            self.cursor = Some(f.seq);
                            self.done = f.terminal;
                            self.conn.frame();
                            return Some((Ok(f.bytes), self));
                        }
                        // Never skip or repeat a seq: read again from the cursor.
                        page.clear();
                        continue;
                    }
                    match store.ready_log(stream_id) {
                        Some(log) if log.len() > next_seq => log,
                        _ if *more => {
                            match store.read_range(stream_id, self.cursor, PAGE).await {
                                Ok(Some(p)) => {
                                    *more = p.frames.len() >= PAGE;
                                    *page = p.frames.into();
                                    if page.is_empty() && !p.ended {
                                        *more = false;
                                    }
                                    if page.is_empty() && p.ended {
                                        return None;
                                    }
                                }
                                Ok(None) => return None,
                                Err(e) => {
                                    // The client reconnects with its cursor.
                                    tracing::warn!(stream_id = %stream_id, error = %e, "could not read the log from the store");
                                    return None;
                                }
                            }
                            continue;
                        }
                        // At the store's head when last read: what comes next is
                        // delivered to this replica's copy, so wait until it is filled.
                        _ => match store.open_log(stream_id).await {
                            Ok(Some(log)) => log,
                            Ok(None) => return None,
                            Err(e) => {
                                tracing::warn!(stream_id = %stream_id, error = %e, "could not open this replica's copy of the log");
                                return None;
                            }
                        },
                    }
                }
            };
            let rx = log.watch();
            self.source = Source::Log { log, rx };
        }
    }
}
