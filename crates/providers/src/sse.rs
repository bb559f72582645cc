//! The event-stream reader shared by the HTTP providers.
//!
//! An HTTP body is cut into server-sent events by `sse-stream` (WHATWG HTML,
//! "Server-sent events") and each event handed to a provider's [`FrameParser`], which
//! knows the upstream's protocol. [`event_stream`] owns what is common: it stops after
//! the protocol's terminator, after the first error, at the end of the body, or as soon
//! as the job's cancellation token fires, and it maps a broken body onto
//! `Truncated`/`Timeout` and invalid SSE onto `Malformed`.
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

use bytes::Bytes;
use futures::{Stream, StreamExt};
use genstream_engine::provider::{ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream};
use sse_stream::{Sse, SseStream};
use tokio_util::sync::CancellationToken;

use crate::http::{error_chain, truncate};

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
/// `parser`. It ends after the parser's terminator, after the first error, at the end
/// of the body, or as soon as `cancel` fires (then without further items); dropping it
/// closes the body.
pub(crate) fn event_stream<B, E, P>(body: B, parser: P, cancel: CancellationToken) -> ProviderStream
where
    B: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    P: FrameParser,
{
    let flushed = Arc::new(AtomicBool::new(false));
    let body = FlushAtEnd {
        body: Box::pin(body),
        ended: false,
        flushed: flushed.clone(),
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

/// The body, then — if it ended without error — two line feeds, so that `sse-stream`
/// dispatches a last event that had no blank line after it. Harmless after a complete
/// event: blank lines with no event pending dispatch nothing.
struct FlushAtEnd<B> {
    body: Pin<Box<B>>,
    ended: bool,
    flushed: Arc<AtomicBool>,
}

impl<B, E> Stream for FlushAtEnd<B>
where
    B: Stream<Item = Result<Bytes, E>>,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.body.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                self.ended = true;
                self.flushed.store(true, Ordering::Release);
                Poll::Ready(Some(Ok(Bytes::from_static(b"\n\n"))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }
}

/// The error for a body that broke off or could not be read as SSE.
fn frame_error(provider: &str, error: sse_stream::Error) -> ProviderError {
    match error {
        sse_stream::Error::Body(e) => {
            let timeout = e
                .downcast_ref::<reqwest::Error>()
                .is_some_and(reqwest::Error::is_timeout);
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
        event_stream(body, Echo { done: false }, CancellationToken::new())
            .map(|item| match item {
                Ok(ProviderEvent::Text(t)) => t,
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("{:?}: {}", e.kind, e.message),
            })
            .collect()
            .await
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
