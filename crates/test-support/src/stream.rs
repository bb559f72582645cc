//! Watching a running job from outside: the explicit signal that it has streamed
//! text, for tests that must act on a job mid-answer (abort it, stop its server)
//! and then find a partial answer.

use std::time::Duration;

use futures::StreamExt;

/// How long a job may take to stream its first text.
pub const FIRST_TEXT_TIMEOUT: Duration = Duration::from_secs(20);

/// Reads `GET {base_url}/api/chat/stream/{stream_id}` (bearer `token`) until its first
/// `on_message_delta` frame, then lets the connection go: the job runs and has
/// streamed text.
///
/// # Panics
/// When the stream is not 200, ends first, or shows no text within
/// [`FIRST_TEXT_TIMEOUT`].
pub async fn wait_for_text(base_url: &str, token: &str, stream_id: &str) {
    let read = async {
        let response = reqwest::Client::new()
            .get(format!("{base_url}/api/chat/stream/{stream_id}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "stream {stream_id}");
        let mut body = response.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk.unwrap());
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buf.drain(..end + 2).collect();
                if String::from_utf8_lossy(&frame)
                    .lines()
                    .any(|l| l == "event: on_message_delta")
                {
                    return;
                }
            }
        }
        panic!("stream {stream_id} ended before any text");
    };
    tokio::time::timeout(FIRST_TEXT_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("no text on stream {stream_id} within {FIRST_TEXT_TIMEOUT:?}"));
}
