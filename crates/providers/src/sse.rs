//! The event-stream reader shared by the HTTP providers.
//!
//! An HTTP body is cut into server-sent events by `sse-stream` (WHATWG HTML,
//! "Server-sent events") and each event handed to a provider's [`FrameParser`], which
//! knows the upstream's protocol. [`event_stream`] owns what is common: it stops after
//! the protocol's terminator, after the first error, at the end of the body, or as soon
//! as the job's cancellation token fires, and it maps a broken body onto
//! `Truncated`/`Timeout` and invalid SSE onto `Malformed`.
//!
//! It also applies the first-byte and idle-gap timeouts, to the body's *bytes*: the
//! first body byte must come by the attempt's first-byte deadline, and no gap between
//! two reads may exceed the idle timeout. A keep-alive is a sign of life although it
//! yields no event: Anthropic's `ping` events, the `: OPENROUTER PROCESSING` comments
//! OpenRouter sends while a model is slow to start (which `sse-stream` drops), empty
//! `data:` frames, or half a frame. Timing events instead would kill such a live
//! upstream and retry it. The clock is only read while waiting for the body, so a
//! reader that is slow to ask for the next read never times out on data that is
//! already there.
//!
//! One leniency beyond the SSE standard: an event whose last line is not followed by a
//! blank line when the body ends cleanly is still dispatched (the standard discards it).
//! Servers end every event with a blank line, but a body cut by a proxy, or a recording
//! trimmed of its final newline (the Anthropic Python SDK's own streaming fixture is),
//! would otherwise lose its terminator. Such a last event whose `data:` is not complete
//! JSON (nor `[DONE]`) is reported `Truncated`: the body ended inside it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use genstream_engine::provider::{ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream};
use sse_stream::{Sse, SseStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::deadline::{Deadlines, timeout_error};
use crate::error_text::{error_chain, truncate};

/// One item of a provider stream.
pub(crate) type Item = Result<ProviderEvent, ProviderError>;

/// How much of a bad `data:` line an error quotes.
pub(crate) const SNIPPET_CHARS: usize = 200;

/// A provider's reading of its upstream's events.
pub(crate) trait FrameParser: Send + 'static {
    /// The provider's config name, for error messages.
    fn provider(&self) -> &str;

    /// The items one event yields; an `Err` is the last item of the stream.
    fn on_frame(&mut self, sse: &Sse) -> Vec<Item>;

    /// The items for the end of the body: what was held back for the end, or a
    /// `Truncated` error when the terminator never came.
    fn on_end(&mut self) -> Vec<Item>;

    /// True once the protocol's terminator was seen; the body is then closed.
    fn is_done(&self) -> bool;
}

/// The state of [`event_stream`].
struct Run<S, P> {
    frames: Option<Pin<Box<S>>>,
    parser: P,
    pending: VecDeque<Item>,
    cancel: CancellationToken,
    /// Set when the body ended and [`FlushAtEnd`] sent its blank lines: the events
    /// read after that are the body's unterminated last one.
    flushed: Arc<AtomicBool>,
}

/// The provider stream over an HTTP body: SSE frames parsed by `sse-stream`, events by
/// `parser`, the body's bytes timed by `deadlines`. It ends after the parser's
/// terminator, after the first error, at the end of the body, or as soon as `cancel`
/// fires (then without further items); dropping it closes the body.
pub(crate) fn event_stream<B, E, P>(
    body: B,
    parser: P,
    cancel: CancellationToken,
    deadlines: Deadlines,
) -> ProviderStream
where
    B: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    P: FrameParser,
{
    let flushed = Arc::new(AtomicBool::new(false));
    let body = Watched {
        body: Box::pin(body),
        ended: false,
        flushed: flushed.clone(),
        timer: Box::pin(tokio::time::sleep_until(deadlines.first_byte_deadline)),
        got_bytes: false,
        deadlines,
    };
    let run = Run {
        frames: Some(Box::pin(SseStream::from_bytes_stream(body))),
        parser,
        pending: VecDeque::new(),
        cancel,
        flushed,
    };
    futures::stream::unfold(run, |mut run| async move {
        loop {
            if let Some(item) = run.pending.pop_front() {
                if item.is_err() {
                    run.pending.clear();
                    run.frames = None;
                }
                return Some((item, run));
            }
            let frames = run.frames.as_mut()?;
            let next = tokio::select! {
                biased;
                () = run.cancel.cancelled() => return None,
                next = frames.next() => next,
            };
            match next {
                Some(Ok(sse)) => {
                    let items = if run.flushed.load(Ordering::Acquire) {
                        unterminated_last_frame(&mut run.parser, &sse)
                    } else {
                        run.parser.on_frame(&sse)
                    };
                    run.pending.extend(items);
                    if run.parser.is_done() {
                        run.frames = None; // close the body now, not when dropped
                    }
                }
                Some(Err(e)) => {
                    run.pending
                        .push_back(Err(frame_error(run.parser.provider(), e)));
                    run.frames = None;
                }
                None => {
                    let items = run.parser.on_end();
                    run.pending.extend(items);
                    run.frames = None;
                }
            }
        }
    })
    .boxed()
}

/// The items of an event the body ended inside of (no blank line after it): parsed as
/// usual if its data is complete, else `Truncated`.
fn unterminated_last_frame<P: FrameParser>(parser: &mut P, sse: &Sse) -> Vec<Item> {
    let data = sse.data.as_deref().unwrap_or_default().trim();
    if data.is_empty()
        || data == "[DONE]"
        || serde_json::from_str::<serde_json::Value>(data).is_ok()
    {
        return parser.on_frame(sse);
    }
    vec![Err(ProviderError::new(
        ProviderErrorKind::Truncated,
        format!(
            "{}: upstream body ended inside an event: {}",
            parser.provider(),
            truncate(data, SNIPPET_CHARS)
        ),
    ))]
}

/// Why the body could not be read further.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// The HTTP body broke off.
    #[error(transparent)]
    Read(Box<dyn std::error::Error + Send + Sync>),
    /// No byte within the first-byte timeout, or a gap longer than the idle timeout.
    #[error("the upstream sent nothing within the {what} timeout of {} s", limit.as_secs_f64())]
    Timeout { what: &'static str, limit: Duration },
}

/// The body, timed: its reads under the first-byte and idle deadlines; then — if it
/// ended without error — two line feeds, so that `sse-stream` dispatches a last event
/// that had no blank line after it (harmless after a complete event: blank lines with
/// no event pending dispatch nothing).
struct Watched<B> {
    body: Pin<Box<B>>,
    ended: bool,
    flushed: Arc<AtomicBool>,
    /// Fires at the first-byte deadline, then `idle` after each read.
    timer: Pin<Box<Sleep>>,
    got_bytes: bool,
    deadlines: Deadlines,
}

impl<B, E> Stream for Watched<B>
where
    B: Stream<Item = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // The body first: bytes already there count even if the timer ran out while
        // nobody was reading.
        match self.body.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                self.ended = true;
                self.flushed.store(true, Ordering::Release);
                Poll::Ready(Some(Ok(Bytes::from_static(b"\n\n"))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(BodyError::Read(Box::new(e)))))
            }
            Poll::Ready(Some(Ok(bytes))) => {
                if !bytes.is_empty() {
                    self.got_bytes = true;
                    let next = Instant::now() + self.deadlines.idle;
                    self.timer.as_mut().reset(next);
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.ended = true;
                    let (what, limit) = if self.got_bytes {
                        ("idle gap", self.deadlines.idle)
                    } else {
                        ("first byte", self.deadlines.first_byte)
                    };
                    Poll::Ready(Some(Err(BodyError::Timeout { what, limit })))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// The error for a body that broke off or could not be read as SSE.
fn frame_error(provider: &str, error: sse_stream::Error) -> ProviderError {
    match error {
        sse_stream::Error::Body(e) => {
            if let Some(BodyError::Timeout { what, limit }) = e.downcast_ref::<BodyError>() {
                return timeout_error(provider, what, *limit);
            }
            let timeout = match e.downcast_ref::<BodyError>() {
                Some(BodyError::Read(inner)) => inner
                    .downcast_ref::<reqwest::Error>()
                    .is_some_and(reqwest::Error::is_timeout),
                _ => false,
            };
            let kind = if timeout {
                ProviderErrorKind::Timeout
            } else {
                ProviderErrorKind::Truncated
            };
            ProviderError::new(
                kind,
                format!(
                    "{provider}: upstream body broke off: {}",
                    error_chain(e.as_ref())
                ),
            )
        }
        other => ProviderError::new(
            ProviderErrorKind::Malformed,
            format!("{provider}: upstream sent invalid SSE: {other}"),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use genstream_engine::retry::Timeouts;

    /// Echoes each event's data as text; done at `[DONE]`.
    struct Echo {
        done: bool,
    }

    impl FrameParser for Echo {
        fn provider(&self) -> &str {
            "echo"
        }
        fn on_frame(&mut self, sse: &Sse) -> Vec<Item> {
            let data = sse.data.clone().unwrap_or_default();
            if data == "[DONE]" {
                self.done = true;
                return Vec::new();
            }
            vec![Ok(ProviderEvent::Text(data))]
        }
        fn on_end(&mut self) -> Vec<Item> {
            if self.done {
                return Vec::new();
            }
            vec![Err(ProviderError::new(ProviderErrorKind::Truncated, "end"))]
        }
        fn is_done(&self) -> bool {
            self.done
        }
    }

    async fn replay(text: &'static str) -> Vec<String> {
        let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from_static(
            text.as_bytes(),
        ))]);
        event_stream(
            body,
            Echo { done: false },
            CancellationToken::new(),
            Deadlines::relaxed(),
        )
        .map(|item| match item {
            Ok(ProviderEvent::Text(t)) => t,
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("{:?}: {}", e.kind, e.message),
        })
        .collect()
        .await
    }

    /// A body that sends each `(wait, bytes)` after its wait, then ends — or hangs.
    fn timed_body(
        parts: Vec<(u64, &'static str)>,
        hang: bool,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let parts = futures::stream::iter(parts).then(|(ms, bytes)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Bytes::from_static(bytes.as_bytes()))
        });
        let tail = if hang {
            futures::stream::pending().boxed()
        } else {
            futures::stream::empty().boxed()
        };
        parts.chain(tail)
    }

    /// First byte within 3 s, gaps of at most 2 s.
    fn deadlines() -> Deadlines {
        Deadlines::new(
            Instant::now(),
            &Timeouts {
                connect: Duration::from_secs(1),
                first_byte: Duration::from_secs(3),
                idle: Duration::from_secs(2),
            },
        )
    }

    async fn timed(parts: Vec<(u64, &'static str)>, hang: bool) -> (Vec<String>, Duration) {
        let t0 = Instant::now();
        let items = event_stream(
            timed_body(parts, hang),
            Echo { done: false },
            CancellationToken::new(),
            deadlines(),
        )
        .map(|item| match item {
            Ok(ProviderEvent::Text(t)) => t,
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("{:?}: {}", e.kind, e.message),
        })
        .collect()
        .await;
        (items, t0.elapsed())
    }

    /// Keep-alives that make no event — SSE comments (OpenRouter's `: OPENROUTER
    /// PROCESSING`), empty frames, an event cut in pieces — keep a slow upstream alive
    /// past both timeouts, before the first event and between events.
    #[tokio::test(start_paused = true)]
    async fn bytes_that_make_no_event_are_signs_of_life() {
        let mut parts = vec![(1500, ": OPENROUTER PROCESSING\n\n")];
        parts.extend((0..8).map(|_| (1500, ": OPENROUTER PROCESSING\n\n")));
        parts.push((1500, "data: first\n\n"));
        parts.extend((0..8).map(|_| (1500, "\n")));
        parts.push((1500, "data: sec"));
        parts.push((1500, "ond\n"));
        parts.push((1500, "\ndata: [DONE]\n\n"));
        let (items, took) = timed(parts, false).await;
        assert_eq!(items, ["first", "second"]);
        assert_eq!(took, Duration::from_millis(1500 * 21));
    }

    /// Silence is a timeout, exactly when its budget runs out: the first byte's from the
    /// attempt's start, the idle gap's from the last byte.
    #[tokio::test(start_paused = true)]
    async fn silence_times_out_at_the_deadline() {
        let (items, took) = timed(vec![(10_000, "data: late\n\n")], false).await;
        assert_eq!(
            items,
            ["Timeout: echo: the upstream sent nothing within the first byte timeout of 3 s"]
        );
        assert_eq!(took, Duration::from_secs(3));
        let (items, took) = timed(
            vec![
                (2900, "data: a\n\n"),
                (1000, ": ping\n\n"),
                (1999, "data: b\n\n"),
            ],
            true,
        )
        .await;
        assert_eq!(
            items,
            [
                "a",
                "b",
                "Timeout: echo: the upstream sent nothing within the idle gap timeout of 2 s"
            ]
        );
        assert_eq!(took, Duration::from_millis(2900 + 1000 + 1999 + 2000));
    }

    /// The clock runs only while the body is awaited: data that arrived while the
    /// reader was busy is read, not timed out.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_does_not_time_out_buffered_data() {
        let mut s = event_stream(
            timed_body(vec![(0, "data: a\n\n"), (0, "data: b\n\n")], true),
            Echo { done: false },
            CancellationToken::new(),
            deadlines(),
        );
        assert!(matches!(s.next().await, Some(Ok(ProviderEvent::Text(t))) if t == "a"));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(matches!(s.next().await, Some(Ok(ProviderEvent::Text(t))) if t == "b"));
    }

    #[tokio::test]
    async fn a_last_event_without_blank_line_is_still_read() {
        assert_eq!(replay("data: 1\n\ndata: [DONE]").await, ["1"]);
        assert_eq!(replay("data: 1\n\ndata: [DONE]\n").await, ["1"]);
        assert_eq!(replay("data: 1\n\ndata: [DONE]\n\n").await, ["1"]);
        assert_eq!(
            replay("data: {\"a\":1}").await,
            ["{\"a\":1}", "Truncated: end"]
        );
        assert_eq!(
            replay("data: 1\n\ndata: {\"a\":").await,
            [
                "1",
                "Truncated: echo: upstream body ended inside an event: {\"a\":"
            ]
        );
    }
}
