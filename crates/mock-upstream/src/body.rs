//! The streamed body of an answer: its frames on the wire with the delays, the
//! keep-alives or the silences the model string asks for, and how it ends — cleanly,
//! never (a stalled upstream), or with a dropped connection.
//!
//! The body is a list of [`Piece`]s (bytes, or a wait) made up front and played by a
//! stream, so every timing a test scripts is visible in one place.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;

use crate::Dialect;
use crate::model::Quiet;

/// How a streamed body ends after its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Cleanly (the last chunk of a chunked body).
    End,
    /// Never: the body stays open until the client goes away.
    Hang,
    /// The body fails, so the server drops the connection without ending the body.
    Abort,
}

/// What a streamed body sends, in order.
enum Piece {
    Bytes(String),
    Wait(Duration),
}

/// The keep-alive an upstream sends while it has nothing to say: Anthropic's `ping`
/// event on Messages; on Chat Completions the SSE comment OpenRouter sends while a
/// model is slow to start.
fn keepalive(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Messages => "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        Dialect::ChatCompletions => ": OPENROUTER PROCESSING\n\n",
    }
}

/// `length` of keep-alives every `quiet.every` (the first at once), or of silence.
fn quiet_pieces(out: &mut Vec<Piece>, length: Duration, quiet: Quiet, dialect: Dialect) {
    if length.is_zero() {
        return;
    }
    if quiet.every.is_zero() {
        out.push(Piece::Wait(length));
        return;
    }
    let mut left = length;
    while !left.is_zero() {
        out.push(Piece::Bytes(keepalive(dialect).to_owned()));
        let step = quiet.every.min(left);
        out.push(Piece::Wait(step));
        left -= step;
    }
}

/// A streaming `text/event-stream` response sending `frames` with `delay` between
/// them (and the `quiet` stretches before the first and after the first), then ending
/// as `tail` says.
pub(crate) fn stream_response(
    frames: Vec<String>,
    delay: Duration,
    quiet: Quiet,
    dialect: Dialect,
    tail: Tail,
) -> Response {
    let mut pieces = Vec::with_capacity(frames.len() * 2 + 2);
    if frames.is_empty() {
        quiet_pieces(&mut pieces, quiet.lead, quiet, dialect);
    }
    for (i, frame) in frames.into_iter().enumerate() {
        match i {
            0 => quiet_pieces(&mut pieces, quiet.lead, quiet, dialect),
            1 => quiet_pieces(&mut pieces, quiet.gap, quiet, dialect),
            _ => {}
        }
        if i > 0 && !delay.is_zero() {
            pieces.push(Piece::Wait(delay));
        }
        pieces.push(Piece::Bytes(frame));
    }
    let frames = futures::stream::iter(pieces)
        .then(|piece| async move {
            match piece {
                Piece::Wait(d) => {
                    tokio::time::sleep(d).await;
                    None
                }
                Piece::Bytes(b) => Some(Ok::<_, std::io::Error>(Bytes::from(b))),
            }
        })
        .filter_map(std::future::ready);
    let body = match tail {
        Tail::End => Body::from_stream(frames),
        Tail::Hang => Body::from_stream(frames.chain(futures::stream::pending())),
        Tail::Abort => Body::from_stream(frames.chain(futures::stream::once(async {
            // Let the frames before reach the socket first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "mock upstream: connection dropped mid-stream",
            ))
        }))),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::answer::is_terminator;
    use crate::model::{Fault, parse_model};

    #[test]
    fn quiet_stretches_send_keepalives_or_nothing() {
        let quiet = Quiet {
            lead: Duration::from_millis(250),
            gap: Duration::ZERO,
            every: Duration::from_millis(100),
        };
        let mut pieces = Vec::new();
        quiet_pieces(&mut pieces, quiet.lead, quiet, Dialect::ChatCompletions);
        let shape: Vec<String> = pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.clone(),
                Piece::Wait(d) => d.as_millis().to_string(),
            })
            .collect();
        assert_eq!(
            shape,
            [
                ": OPENROUTER PROCESSING\n\n",
                "100",
                ": OPENROUTER PROCESSING\n\n",
                "100",
                ": OPENROUTER PROCESSING\n\n",
                "50"
            ]
        );
        let mut pieces = Vec::new();
        let silent = Quiet {
            every: Duration::ZERO,
            ..quiet
        };
        quiet_pieces(&mut pieces, silent.lead, silent, Dialect::Messages);
        assert!(matches!(pieces.as_slice(), [Piece::Wait(d)] if d.as_millis() == 250));
        assert_eq!(
            keepalive(Dialect::Messages),
            "event: ping\ndata: {\"type\": \"ping\"}\n\n"
        );
        let plan =
            parse_model("noend:1:echo?lead_ms=5&gap_ms=7&keepalive_ms=0&call=lookup").unwrap();
        assert_eq!(plan.wrappers, vec![(1, Fault::NoTerminator)]);
        assert_eq!(
            plan.quiet,
            Quiet {
                lead: Duration::from_millis(5),
                gap: Duration::from_millis(7),
                every: Duration::ZERO
            }
        );
        assert_eq!(plan.undeclared.as_deref(), Some("lookup"));
        assert!(is_terminator("data: [DONE]\n\n"));
        assert!(is_terminator(
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        ));
        assert!(!is_terminator("data: {\"choices\":[]}\n\n"));
    }
}
