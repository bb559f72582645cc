//! The CLI's behaviour: `genstream chat`, `genstream attach`, `genstream abort`.
//!
//! Answer text goes to `out` as it streams; everything else (ids, reasoning, tool
//! results, reconnections, the terminal message) goes to `err`, so `out` can be piped.

use std::io::{self, Write};

use serde_json::Value;

use crate::client::{ChatRequest, Client, FollowUpdate};
use crate::error::ClientError;
use crate::event::{Outcome, StreamEvent};

/// `genstream chat "text"`: starts a chat turn, prints
/// `streamId=… conversationId=… responseMessageId=…` to `err` (so another terminal can
/// attach or abort), then streams it like [`run_attach`].
pub async fn run_chat(
    client: &Client,
    req: &ChatRequest,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<(), ClientError> {
    let started = client.start_chat(req).await?;
    writeln!(
        err,
        "streamId={} conversationId={} responseMessageId={}",
        started.stream_id, started.conversation_id, started.response_message_id
    )?;
    err.flush()?;
    stream(client, &started.stream_id, None, out, err).await
}

/// `genstream attach STREAM_ID`: replays the stream from its start and follows it live
/// to its end, reconnecting with its cursor when the connection drops.
///
/// Prints answer text to `out` as it arrives (flushing each delta), reasoning and
/// other progress to `err`, a final newline to `out`. A job that ends with `final`
/// `status: "aborted"` or with `error` gets a one-line message on `err` and returns
/// [`ClientError::Aborted`] / [`ClientError::Generation`] (whose
/// [`ClientError::is_reported`] is true), so the binary exits non-zero.
pub async fn run_attach(
    client: &Client,
    stream_id: &str,
    cursor: Option<u64>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<(), ClientError> {
    stream(client, stream_id, cursor, out, err).await
}

/// `genstream abort STREAM_ID`: stops the generation (on whichever replica runs it);
/// prints `aborted STREAM_ID` and how much partial answer was saved to `out`.
pub async fn run_abort(
    client: &Client,
    stream_id: &str,
    out: &mut impl Write,
    _err: &mut impl Write,
) -> Result<(), ClientError> {
    let answer = client.abort(stream_id).await?;
    let aborted = answer
        .get("aborted")
        .and_then(Value::as_str)
        .unwrap_or(stream_id);
    let saved = answer
        .pointer("/responseMessage/text")
        .and_then(Value::as_str)
        .map(|t| t.chars().count());
    match saved {
        Some(chars) => writeln!(
            out,
            "aborted {aborted}; partial answer saved ({chars} chars)"
        )?,
        None => writeln!(out, "aborted {aborted}")?,
    }
    out.flush()?;
    Ok(())
}

async fn stream(
    client: &Client,
    stream_id: &str,
    cursor: Option<u64>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<(), ClientError> {
    let mut r = Renderer {
        out,
        err,
        out_open: false,
        mid_line: false,
        last_on_out: false,
        failed: None,
    };
    let terminal = client
        .follow_with_updates(stream_id, cursor, |update| {
            let result = match update {
                FollowUpdate::Event(ev) => r.event(ev),
                FollowUpdate::Reconnecting(rc) => {
                    let from = match rc.cursor {
                        Some(seq) => format!("seq {seq}"),
                        None => "the start".to_owned(),
                    };
                    r.err_line(&format!(
                        "reconnecting from {from}… ({}; retry in {} ms)",
                        rc.reason,
                        rc.delay.as_millis()
                    ))
                }
            };
            if let Err(e) = result {
                r.failed.get_or_insert(e);
            }
        })
        .await;
    if let Some(e) = r.failed.take() {
        return Err(e.into());
    }
    let terminal = match terminal {
        Ok(t) => t,
        Err(e) => {
            r.finish_answer()?;
            return Err(e);
        }
    };
    r.finish_answer()?;
    match terminal.outcome() {
        Some(Outcome::Complete { reason }) => {
            if let Some(reason) = reason {
                r.err_line(&format!("(stopped: {reason})"))?;
            }
            Ok(())
        }
        Some(Outcome::Aborted) => {
            let e = ClientError::Aborted {
                stream_id: stream_id.to_owned(),
            };
            r.err_line(&e.to_string())?;
            Err(e)
        }
        Some(Outcome::Failed { code, message }) => {
            let e = ClientError::Generation {
                stream_id: stream_id.to_owned(),
                code,
                message,
            };
            r.err_line(&format!("error: {e}"))?;
            Err(e)
        }
        None => Err(ClientError::Protocol(format!(
            "stream ended on a non-terminal {} event",
            terminal.event
        ))),
    }
}

/// Writes a stream to a terminal-like pair of writers.
struct Renderer<'a, O, E> {
    out: &'a mut O,
    err: &'a mut E,
    /// `out` has text not ended by a newline.
    out_open: bool,
    /// The last byte written to either writer was not a newline (as a terminal
    /// showing both would see it).
    mid_line: bool,
    /// The last text went to `out` (answer) rather than `err` (reasoning).
    last_on_out: bool,
    /// The first write error; writing stops counting after it.
    failed: Option<io::Error>,
}

impl<O: Write, E: Write> Renderer<'_, O, E> {
    fn event(&mut self, ev: &StreamEvent) -> io::Result<()> {
        match ev.event.as_str() {
            "on_message_delta" => {
                let text = ev.text();
                if !text.is_empty() {
                    self.switch(true)?;
                    self.out.write_all(text.as_bytes())?;
                    self.out.flush()?;
                    self.out_open = !text.ends_with('\n');
                    self.mid_line = self.out_open;
                }
            }
            "on_reasoning_delta" => {
                let think = ev.reasoning();
                if !think.is_empty() {
                    self.switch(false)?;
                    self.err.write_all(think.as_bytes())?;
                    self.err.flush()?;
                    self.mid_line = !think.ends_with('\n');
                }
            }
            "retry" => {
                let d = &ev.data;
                self.err_line(&format!(
                    "model call failed ({}); retry {}/{} in {} ms",
                    d.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error"),
                    d.get("attempt").and_then(Value::as_u64).unwrap_or(0),
                    d.get("maxAttempts").and_then(Value::as_u64).unwrap_or(0),
                    d.get("delayMs").and_then(Value::as_u64).unwrap_or(0),
                ))?;
            }
            "on_run_step_completed" => {
                let call = ev.data.pointer("/result/tool_call");
                let field = |k: &str| {
                    call.and_then(|c| c.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                };
                self.err_line(&format!(
                    "[tool {}({}) → {}]",
                    field("name"),
                    shorten(field("args")),
                    shorten(field("output"))
                ))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Before writing to `out` (`to_out`) or to `err`: a change of writer in mid-line
    /// starts a new line, so reasoning and answer do not run together.
    fn switch(&mut self, to_out: bool) -> io::Result<()> {
        if self.mid_line && self.last_on_out != to_out {
            self.err.write_all(b"\n")?;
            self.mid_line = false;
        }
        self.last_on_out = to_out;
        Ok(())
    }

    /// A whole line on `err`, on a line of its own.
    fn err_line(&mut self, line: &str) -> io::Result<()> {
        if self.mid_line {
            self.err.write_all(b"\n")?;
        }
        writeln!(self.err, "{line}")?;
        self.err.flush()?;
        self.mid_line = false;
        self.last_on_out = false;
        Ok(())
    }

    /// Ends the answer with a newline.
    fn finish_answer(&mut self) -> io::Result<()> {
        if self.out_open {
            self.out.write_all(b"\n")?;
            self.out.flush()?;
            self.out_open = false;
        }
        if self.mid_line {
            self.mid_line = false;
            if !self.last_on_out {
                self.err.write_all(b"\n")?;
                self.err.flush()?;
            }
        }
        Ok(())
    }
}

/// A tool's arguments or output on one short line.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}
