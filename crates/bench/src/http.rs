//! Light HTTP clients: `POST /api/chat` through reqwest, and SSE subscribers on raw
//! tokio `TcpStream`s, so that thousands of them cost the client side little.
//!
//! A raw subscriber writes `GET /api/chat/stream/ID HTTP/1.1`, reads the response
//! head, checks the status, and then either idles or reads the chunked body, noting the
//! instant each `id: N` line arrives. The body is scanned for `\nid: ` directly in the
//! chunked bytes: hyper writes every chunk the server hands it (one SSE frame, or a
//! run of whole frames) as one HTTP chunk, so a frame never straddles
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
    let path = format!("/api/chat/stream/{stream_id}");
    open(addr, "GET", &path, token, None, close)
        .await
        .map(|(s, _)| s)
}

/// Sends `method path` (with `body` as JSON when given) and reads the response head
/// (at most 10 s); the stream and the head's text. Anything but 200 is an error.
pub async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
    close: bool,
) -> Result<(Stream, String), String> {
    let fut = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let body_head = body.map_or(String::new(), |b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        });
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n{}{body_head}\r\n{}",
            if close { "Connection: close\r\n" } else { "" },
            body.unwrap_or("")
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
                        "{method} {path}: {}",
                        head.lines().next().unwrap_or("")
                    ));
                }
                let rest = buf.split_off(end + 4);
                return Ok((Stream { tcp, rest }, head));
            }
            if buf.len() > 64 * 1024 {
                return Err("response head too large".into());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| format!("{method} {path}: no response head within 10 s"))?
}

/// The value of header `name` (lower case) in a response head.
pub fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim())
    })
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
    let mut scan = IdScanner::default();
    // The head's `\r\n\r\n` is gone; the first chunk line ends with `\r\n`, so the
    // first frame's `id:` still follows a `\n`.
    read_with(stream, connected, limit, |bytes, now, seen| {
        scan.feed(bytes, |id| seen.push((id as u32, now)));
    })
    .await
}

/// Reads `stream` to its end or `limit`, handing each piece of bytes to `scan` with
/// the instant right after it arrived.
async fn read_with(
    stream: Stream,
    connected: Instant,
    limit: Duration,
    mut scan: impl FnMut(&[u8], Instant, &mut Vec<(u32, Instant)>),
) -> Receipts {
    let Stream { mut tcp, rest } = stream;
    let mut r = Receipts {
        connected,
        seen: Vec::with_capacity(1024),
        bytes: rest.len() as u64,
    };
    scan(&rest, Instant::now(), &mut r.seen);
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        let now = Instant::now();
        r.bytes += n as u64;
        scan(&buf[..n], now, &mut r.seen);
    }
    r
}

/// Counts the SSE blocks (`\n\n`-terminated) of a projected stream fed in arbitrary
/// pieces, leaving out `: ping` comments. A projected stream's `retry:` line rides
/// in its first block, and JSON payloads hold no raw newline, so each `\n\n` ends
/// one frame; the chunked encoding's `\r\n` never makes one.
#[derive(Default)]
pub struct FrameScanner {
    /// The last 8 bytes fed, for a `: ping\n\n` split across pieces.
    tail: [u8; 8],
}

const PING: &[u8; 8] = b": ping\n\n";

impl FrameScanner {
    /// Scans `buf`, calling `f` once per complete frame. One comparison per byte (the
    /// client must not be what limits the figures).
    pub fn feed(&mut self, buf: &[u8], mut f: impl FnMut()) {
        let mut prev = self.tail[7];
        for (i, &b) in buf.iter().enumerate() {
            if b == b'\n' && prev == b'\n' {
                let ping = if i >= 7 {
                    buf[i - 7..=i] == PING[..]
                } else {
                    let mut w = [0u8; 8];
                    w[..7 - i].copy_from_slice(&self.tail[i + 1..]);
                    w[7 - i..].copy_from_slice(&buf[..=i]);
                    w == *PING
                };
                if !ping {
                    f();
                }
            }
            prev = b;
        }
        let n = buf.len().min(8);
        self.tail.rotate_left(n);
        self.tail[8 - n..].copy_from_slice(&buf[buf.len() - n..]);
    }
}

/// Reads a projected stream to its end, noting when each frame arrived: `seen` holds
/// `(position in the projected stream, instant)`. As [`read_ids`] otherwise.
pub async fn read_frames(stream: Stream, connected: Instant, limit: Duration) -> Receipts {
    let mut scan = FrameScanner::default();
    let mut position = 0u32;
    read_with(stream, connected, limit, |bytes, now, seen| {
        scan.feed(bytes, || {
            seen.push((position, now));
            position += 1;
        });
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{FrameScanner, IdScanner};

    #[test]
    fn frame_scanner_counts_frames_but_not_pings_across_pieces() {
        let body = b"2a\r\nretry: 1000\nevent: a\ndata: {}\n\n\r\n8\r\n: ping\n\n\r\nd\r\ndata: [DONE]\n\n\r\n";
        for split in 0..body.len() {
            let mut s = FrameScanner::default();
            let mut n = 0;
            s.feed(&body[..split], || n += 1);
            s.feed(&body[split..], || n += 1);
            assert_eq!(n, 2, "split at {split}");
        }
    }

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
