//! genstream-client: talks to a genstream server (docs/protocol.md §3, §4) and implements the
//! CLI's `chat`, `attach` and `abort` subcommands.
//!
//! - [`Client`] wraps the HTTP API: [`Client::start_chat`], [`Client::abort`], and
//!   [`Client::follow`], which reads a job's SSE stream to its terminal event,
//!   reconnecting with its cursor (`Last-Event-ID`) after exponential backoff when the
//!   connection drops, so the events it delivers are exactly the log: no gaps, no
//!   duplicates, in order.
//! - [`run_chat`], [`run_attach`], [`run_abort`] are the whole CLI behaviour, writing
//!   the answer to one writer and progress to another.
//!
//! ```no_run
//! # async fn demo() -> Result<(), genstream_client::ClientError> {
//! use genstream_client::{ChatRequest, Client};
//! let client = Client::new("http://127.0.0.1:3080", "<jwt>")?;
//! let started = client.start_chat(&ChatRequest::new("hello")).await?;
//! let terminal = client
//!     .follow(&started.stream_id, None, |ev| print!("{}", ev.text()))
//!     .await?;
//! println!("\n{:?}", terminal.outcome());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod cli;
mod client;
mod error;
mod event;

pub use cli::{run_abort, run_attach, run_chat};
pub use client::{Backoff, ChatRequest, Client, FollowUpdate, Reconnect, Started};
pub use error::ClientError;
pub use event::{Outcome, StreamEvent};
