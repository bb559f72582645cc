//! [`Client`]: the HTTP API (docs/protocol.md §4) and the resumable SSE stream (docs/protocol.md §3).

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sse_stream::SseStream;

use crate::error::{ClientError, chain};
use crate::event::StreamEvent;

/// How long a connection may take to be established.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a plain JSON request (start, abort) may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a non-JSON error body is quoted in an error.
const BODY_QUOTE_CHARS: usize = 200;

/// The body of `POST /api/chat`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatRequest {
    /// The user's message.
    pub text: String,
    /// The conversation to continue; absent (or `"new"`) starts a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// The message this one answers (e.g. the previous response's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_message_id: Option<String>,
    /// The model to use; absent means the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl ChatRequest {
    /// A request that starts a new conversation with `text` on the default model.
    pub fn new(text: impl Into<String>) -> ChatRequest {
        ChatRequest {
            text: text.into(),
            ..ChatRequest::default()
        }
    }
}

/// The answer of `POST /api/chat`: the job has started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    /// The job's id: follow it with [`Client::follow`], stop it with [`Client::abort`].
    pub stream_id: String,
    /// The conversation the turn belongs to (new or continued).
    pub conversation_id: String,
    /// The id under which the user's message was saved.
    pub user_message_id: String,
    /// The id the response message will have.
    pub response_message_id: String,
    /// `"started"`.
    pub status: String,
}

/// Reconnection policy of [`Client::follow`]: exponential backoff with jitter.
///
/// The base delay doubles from `min` up to `max / 2` and each sleep is the base plus a
/// random jitter of up to 100 %, capped at `max`; so sleeps stay within `[min, max]`.
/// After `give_up_after` of consecutive failures (no new event received in between)
/// `follow` gives up with [`ClientError::GaveUp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Give up after failing this long without receiving an event.
    pub give_up_after: Duration,
}

impl Default for Backoff {
    /// 250 ms → 5 s, giving up after 2 minutes.
    fn default() -> Backoff {
        Backoff {
            min: Duration::from_millis(250),
            max: Duration::from_secs(5),
            give_up_after: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let max = self.max.max(self.min);
        ExponentialBuilder::new()
            .with_min_delay(self.min)
            .with_max_delay((max / 2).max(self.min))
            .with_jitter()
            .without_max_times()
            .build()
            .map(move |d| d.min(max))
    }
}

/// A reconnection about to happen, reported by [`Client::follow_with_updates`].
#[derive(Debug)]
pub struct Reconnect<'a> {
    /// The last seq received: the reconnection resumes after it (`None`: from seq 0).
    pub cursor: Option<u64>,
    /// Consecutive failed attempts so far, 1 for the first.
    pub attempt: u32,
    /// How long the client waits before reconnecting.
    pub delay: Duration,
    /// Why the previous connection failed.
    pub reason: &'a ClientError,
}

/// What [`Client::follow_with_updates`] reports while it follows a stream.
#[derive(Debug)]
pub enum FollowUpdate<'a> {
    /// An event of the log, in seq order, each exactly once.
    Event(&'a StreamEvent),
    /// The connection failed and the client will reconnect from its cursor.
    Reconnecting(Reconnect<'a>),
}

/// A client of one genstream server, authenticated by one token.
///
/// Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
    backoff: Backoff,
    idle_timeout: Duration,
}

/// One attempt's failure: worth retrying (network trouble, 5xx) or not.
enum Failure {
    Transient(ClientError),
    Fatal(ClientError),
    /// 204: the cursor already is the terminal event.
    Ended,
}

impl Client {
    /// A client of the server at `server` (e.g. `http://127.0.0.1:3080`; a missing
    /// scheme means `http://`), sending `Authorization: Bearer <token>` on every
    /// request (none when `token` is empty).
    pub fn new(server: &str, token: &str) -> Result<Client, ClientError> {
        let given = server.trim();
        let with_scheme = if given.contains("://") {
            given.to_owned()
        } else {
            format!("http://{given}")
        };
        let invalid = |reason: String| ClientError::InvalidServerUrl {
            url: server.to_owned(),
            reason,
        };
        let mut base = Url::parse(&with_scheme).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https".into()));
        }
        if base.cannot_be_a_base() || base.host_str().is_none() {
            return Err(invalid("it has no host".into()));
        }
        base.set_query(None);
        base.set_fragment(None);

        let token = token.trim();
        let auth = if token.is_empty() {
            None
        } else {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::InvalidToken)?;
            value.set_sensitive(true);
            Some(value)
        };

        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("genstream-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Setup(chain(&e)))?;
        Ok(Client {
            http,
            base,
            auth,
            backoff: Backoff::default(),
            idle_timeout: Duration::from_secs(45),
        })
    }

    /// The same client with another reconnection policy (see [`Backoff`]); tests use
    /// short delays.
    pub fn with_backoff(self, min: Duration, max: Duration, give_up_after: Duration) -> Client {
        Client {
            backoff: Backoff {
                min,
                max,
                give_up_after,
            },
            ..self
        }
    }

    /// The same client with another idle timeout: a stream connection that receives no
    /// byte for this long (the server pings every 15 s by default) is dropped and
    /// resumed. Also bounds the wait for the stream's response headers. Default 45 s.
    pub fn with_idle_timeout(self, idle_timeout: Duration) -> Client {
        Client {
            idle_timeout,
            ..self
        }
    }

    /// The server's base URL.
    pub fn server(&self) -> &Url {
        &self.base
    }

    /// `POST /api/chat`: saves the user message and starts the generation; answers at
    /// once, before any token. A conversation that already has a running job answers
    /// 409 `conversation_busy` ([`ClientError::Api`]).
    pub async fn start_chat(&self, req: &ChatRequest) -> Result<Started, ClientError> {
        self.post_json(&["api", "chat"], req).await
    }

    /// `POST /api/chat/abort` with `{streamId}`: stops the generation and saves its
    /// partial answer; answers `{success, aborted, responseMessage, usage}`. Aborting a
    /// finished job is 409 `job_finished`, an unknown one 404.
    pub async fn abort(&self, stream_id: &str) -> Result<serde_json::Value, ClientError> {
        self.post_json(
            &["api", "chat", "abort"],
            &serde_json::json!({ "streamId": stream_id }),
        )
        .await
    }

    /// Follows the stream `stream_id` to its end: `GET /api/chat/stream/{id}`, resuming
    /// after `cursor` (`None`: from seq 0). Calls `on_event` for every event, in seq
    /// order, each exactly once across any number of reconnections, and returns the
    /// terminal event (`final` or `error`; a job that ended in error is still `Ok`
    /// here, see [`StreamEvent::outcome`]).
    ///
    /// A connection that drops or ends before the terminal event, or a 5xx/408/429
    /// answer, is retried with the cursor (`Last-Event-ID`) after a backoff (see
    /// [`Client::with_backoff`]). Other error statuses (400, 401, 403, 404, …) and
    /// protocol violations (a seq other than cursor + 1, a malformed frame) are fatal.
    pub async fn follow(
        &self,
        stream_id: &str,
        cursor: Option<u64>,
        mut on_event: impl FnMut(&StreamEvent),
    ) -> Result<StreamEvent, ClientError> {
        self.follow_with_updates(stream_id, cursor, |update| {
            if let FollowUpdate::Event(ev) = update {
                on_event(ev);
            }
        })
        .await
    }

    /// [`Client::follow`], also reporting each reconnection before its backoff sleep.
    pub async fn follow_with_updates(
        &self,
        stream_id: &str,
        mut cursor: Option<u64>,
        mut on_update: impl FnMut(FollowUpdate<'_>),
    ) -> Result<StreamEvent, ClientError> {
        let url = self.endpoint(&["api", "chat", "stream", stream_id]);
        let mut delays = self.backoff.delays();
        let mut failing_since: Option<Instant> = None;
        let mut attempts: u32 = 0;
        loop {
            let before = cursor;
            let failure = match self.follow_once(&url, &mut cursor, &mut on_update).await {
                Ok(terminal) => return Ok(terminal),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Ended) => {
                    return Err(ClientError::AlreadyEnded {
                        stream_id: stream_id.to_owned(),
                        cursor,
                    });
                }
                Err(Failure::Transient(e)) => e,
            };
            if cursor != before {
                // Progress: this is a fresh run of failures.
                delays = self.backoff.delays();
                failing_since = None;
                attempts = 0;
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            attempts += 1;
            let give_up = |last: &ClientError| ClientError::GaveUp {
                stream_id: stream_id.to_owned(),
                cursor,
                attempts,
                elapsed: since.elapsed(),
                last: last.to_string(),
            };
            let Some(delay) = delays.next() else {
                return Err(give_up(&failure));
            };
            if since.elapsed() + delay > self.backoff.give_up_after {
                return Err(give_up(&failure));
            }
            on_update(FollowUpdate::Reconnecting(Reconnect {
                cursor,
                attempt: attempts,
                delay,
                reason: &failure,
            }));
            tokio::time::sleep(delay).await;
        }
    }

    /// One connection: reads events until the terminal one, advancing `cursor`.
    async fn follow_once(
        &self,
        url: &Url,
        cursor: &mut Option<u64>,
        on_update: &mut impl FnMut(FollowUpdate<'_>),
    ) -> Result<StreamEvent, Failure> {
        let path = url.path().to_owned();
        let network = |detail: String| ClientError::Network {
            method: "GET",
            path: path.clone(),
            detail,
        };
        let mut req = self
            .request(Method::GET, url.clone())
            .header(ACCEPT, "text/event-stream");
        if let Some(c) = *cursor {
            req = req.header("Last-Event-ID", c.to_string());
        }
        let resp = match tokio::time::timeout(self.idle_timeout, req.send()).await {
            Err(_) => {
                return Err(Failure::Transient(network(format!(
                    "no answer within {:?}",
                    self.idle_timeout
                ))));
            }
            Ok(Err(e)) => return Err(Failure::Transient(network(chain(&e)))),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if status == StatusCode::NO_CONTENT {
            return Err(Failure::Ended);
        }
        if !status.is_success() {
            let e = api_error("GET", &path, resp).await;
            return Err(if is_transient_status(status) {
                Failure::Transient(e)
            } else {
                Failure::Fatal(e)
            });
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if !content_type.starts_with("text/event-stream") {
            return Err(Failure::Fatal(ClientError::Protocol(format!(
                "GET {path} answered {status} with content type {content_type:?}, not text/event-stream"
            ))));
        }

        let body = idle_guard(Box::pin(resp.bytes_stream()), self.idle_timeout);
        let mut frames = std::pin::pin!(SseStream::from_bytes_stream(body));
        let protocol = |msg: String| Failure::Fatal(ClientError::Protocol(msg));
        while let Some(frame) = frames.next().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(sse_stream::Error::Body(e)) => {
                    return Err(Failure::Transient(network(chain(&*e))));
                }
                Err(e) => return Err(protocol(format!("malformed SSE frame: {e}"))),
            };
            // Frames without data (a lone `retry:`) carry no event; `: ping` comments
            // never become frames at all.
            let Some(data) = frame.data else { continue };
            let ev: StreamEvent = serde_json::from_str(&data)
                .map_err(|e| protocol(format!("frame data is not an event ({e}): {data:.120}")))?;
            let expected = cursor.map_or(0, |c| c.saturating_add(1));
            if ev.seq != expected {
                return Err(protocol(format!(
                    "expected seq {expected}, got seq {} ({})",
                    ev.seq, ev.event
                )));
            }
            if let Some(id) = &frame.id
                && *id != ev.seq.to_string()
            {
                return Err(protocol(format!("frame id {id} carries seq {}", ev.seq)));
            }
            if let Some(name) = &frame.event
                && *name != ev.event
            {
                return Err(protocol(format!(
                    "frame event {name} carries a {} event",
                    ev.event
                )));
            }
            *cursor = Some(ev.seq);
            on_update(FollowUpdate::Event(&ev));
            if ev.is_terminal() {
                return Ok(ev);
            }
        }
        Err(Failure::Transient(network(
            "the connection ended before the stream's final event".into(),
        )))
    }

    /// `base` + `/seg/seg/…`, each segment percent-encoded.
    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.auth {
            Some(auth) => req.header(AUTHORIZATION, auth.clone()),
            None => req,
        }
    }

    async fn post_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let url = self.endpoint(segments);
        let path = url.path().to_owned();
        let network = |e: reqwest::Error| ClientError::Network {
            method: "POST",
            path: path.clone(),
            detail: chain(&e),
        };
        let resp = self
            .request(Method::POST, url)
            .timeout(REQUEST_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(network)?;
        if !resp.status().is_success() {
            return Err(api_error("POST", &path, resp).await);
        }
        let bytes = resp.bytes().await.map_err(network)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!(
                "POST {path} answered unexpected JSON ({e}): {}",
                quote(&bytes)
            ))
        })
    }
}

/// Statuses worth retrying: the server or a proxy in front of it is briefly unwell.
fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// The server's JSON error `{"error": {"code", "message"}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

/// Builds [`ClientError::Api`] from an error response, quoting the server's JSON.
async fn api_error(method: &'static str, path: &str, resp: Response) -> ClientError {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => ("unexpected_response".to_owned(), quote(&body)),
    };
    ClientError::Api {
        method,
        path: path.to_owned(),
        status,
        code,
        message,
    }
}

/// The start of a body, on one line, for an error message.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        return "(empty body)".to_owned();
    }
    match text.char_indices().nth(BODY_QUOTE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Why reading a stream's body failed.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("{0}")]
    Read(String),
    #[error("no data for {0:?} (not even a keep-alive ping)")]
    Idle(Duration),
}

/// The body's chunks, failing with [`BodyError::Idle`] when none arrives for `idle`;
/// `: ping` comments count, which is why this guards bytes rather than SSE frames.
fn idle_guard<S>(body: S, idle: Duration) -> impl Stream<Item = Result<Bytes, BodyError>>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    futures::stream::unfold(Some(body), move |state| async move {
        let mut body = state?;
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
            Ok(Some(Err(e))) => Some((Err(BodyError::Read(chain(&e))), None)),
            Ok(None) => None,
            Err(_) => Some((Err(BodyError::Idle(idle)), None)),
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keeps_base_path_and_encodes_segments() {
        let c = Client::new("https://example.com/gs/", "t").unwrap();
        assert_eq!(
            c.endpoint(&["api", "chat", "stream", "a/b c"]).as_str(),
            "https://example.com/gs/api/chat/stream/a%2Fb%20c"
        );
        let c = Client::new("localhost:3080", "").unwrap();
        assert_eq!(
            c.endpoint(&["api", "chat"]).as_str(),
            "http://localhost:3080/api/chat"
        );
        assert!(Client::new("ftp://x", "t").is_err());
        assert!(matches!(
            Client::new("http://x", "bad\ntoken"),
            Err(ClientError::InvalidToken)
        ));
    }

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let b = Backoff::default();
        let delays: Vec<_> = b.delays().take(20).collect();
        assert!(
            delays.iter().all(|d| *d >= b.min && *d <= b.max),
            "{delays:?}"
        );
        assert!(delays[0] < Duration::from_millis(500));
        assert!(delays[19] >= Duration::from_millis(2500));
    }

    #[test]
    fn chat_request_is_camel_case_without_absent_fields() {
        let mut r = ChatRequest::new("hi");
        r.parent_message_id = Some("p".into());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"text": "hi", "parentMessageId": "p"})
        );
    }
}
