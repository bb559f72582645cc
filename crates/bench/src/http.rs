//! Light HTTP clients: `POST /api/chat` through reqwest, and SSE subscribers on raw
//! tokio `TcpStream`s, so that thousands of them cost the client side little.
//!
//! A raw subscriber writes `GET /api/chat/stream/ID HTTP/1.1`, reads the response
//! head, checks the status, and then either idles or reads the chunked body, noting the
//! instant each `id: N` line arrives. The body is scanned for `\nid: ` directly in the
//! chunked bytes: hyper writes every SSE frame as one chunk, so a frame never straddles
//! chunk boundaries, and event JSON is compact (`"id":"…"`), so it never contains
//! `\nid: ` itself.

use std::net::SocketAddr;
use std::time::Duration;

use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts a chat; returns its stream id.
pub async fn start_chat(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    model: &str,
    text: &str,
) -> Result<String, String> {
    let resp = http
        .post(format!("{base}/api/chat"))
        .bearer_auth(token)
        .json(&serde_json::json!({"text": text, "model": model}))
        .send()
        .await
        .map_err(|e| format!("POST /api/chat: {e}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("POST /api/chat: {e}"))?;
    if !status.is_success() {
        return Err(format!("POST /api/chat: {status} {body}"));
    }
    body["streamId"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("POST /api/chat: no streamId in {body}"))
}

/// An SSE connection whose response head has been read.
pub struct Stream {
    pub tcp: TcpStream,
    /// Body bytes that arrived with the head.
    pub rest: Vec<u8>,
}

/// Opens `GET /api/chat/stream/{id}` and reads the response head (at most 10 s).
/// `close` asks the server to close the connection after the response, so the end of
/// the SSE stream is the end of the socket.
pub async fn open_stream(
    addr: SocketAddr,
    stream_id: &str,
    token: &str,
    close: bool,
) -> Result<Stream, String> {
    let fut = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!(
            "GET /api/chat/stream/{stream_id} HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            let n = tcp
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read head: {e}"))?;
            if n == 0 {
                return Err("connection closed before the response head".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(format!(
                        "stream {stream_id}: {}",
                        head.lines().next().unwrap_or("")
                    ));
                }
                let rest = buf.split_off(end + 4);
                return Ok(Stream { tcp, rest });
            }
            if buf.len() > 64 * 1024 {
                return Err("response head too large".into());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| format!("stream {stream_id}: no response head within 10 s"))?
}

/// Finds `\nid: N\n` lines in a byte stream fed in arbitrary pieces.
#[derive(Default)]
pub struct IdScanner {
    matched: usize,
    in_num: bool,
    num: u64,
}

const PATTERN: &[u8] = b"\nid: ";

impl IdScanner {
    /// Scans `buf`, calling `f` with each complete id.
    pub fn feed(&mut self, buf: &[u8], mut f: impl FnMut(u64)) {
        for &b in buf {
            if self.in_num {
                if b.is_ascii_digit() {
                    self.num = self.num * 10 + u64::from(b - b'0');
                    continue;
                }
                f(self.num);
                self.in_num = false;
                self.matched = 0;
            }
            if b == PATTERN[self.matched] {
                self.matched += 1;
                if self.matched == PATTERN.len() {
                    self.in_num = true;
                    self.num = 0;
                }
            } else {
                self.matched = usize::from(b == b'\n');
            }
        }
    }
}

/// What one subscriber saw: `(seq, receipt instant)` in order, and the body bytes.
pub struct Receipts {
    pub connected: Instant,
    pub seen: Vec<(u32, Instant)>,
    pub bytes: u64,
}

/// Reads an SSE stream to its end (the server closes it after the terminal event),
/// noting when each id arrived. The instant is taken once per `read`, right after it
/// returns, and applies to every id in those bytes. Gives up after `limit`.
pub async fn read_ids(stream: Stream, connected: Instant, limit: Duration) -> Receipts {
    let Stream { mut tcp, rest } = stream;
    let mut scan = IdScanner::default();
    let mut r = Receipts {
        connected,
        seen: Vec::with_capacity(1024),
        bytes: rest.len() as u64,
    };
    // The head's `\r\n\r\n` is gone; the first chunk line ends with `\r\n`, so the
    // first frame's `id:` still follows a `\n`.
    let now = Instant::now();
    scan.feed(&rest, |id| r.seen.push((id as u32, now)));
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        let now = Instant::now();
        r.bytes += n as u64;
        scan.feed(&buf[..n], |id| r.seen.push((id as u32, now)));
    }
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::IdScanner;

    #[test]
    fn scanner_finds_ids_across_pieces() {
        let body = b"9f\r\nid: 0\nevent: created\ndata: {\"id\":\"x\"}\n\n\r\n10\r\nid: 17\nevent: x\ndata: {}\n\n\r\n";
        for split in 0..body.len() {
            let mut s = IdScanner::default();
            let mut ids = Vec::new();
            s.feed(&body[..split], |i| ids.push(i));
            s.feed(&body[split..], |i| ids.push(i));
            assert_eq!(ids, vec![0, 17], "split at {split}");
        }
    }
}
