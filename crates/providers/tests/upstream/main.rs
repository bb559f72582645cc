//! The HTTP providers against the mock upstream, over real HTTP: recorded streams of
//! OpenAI, OpenAI-compatible servers and Anthropic, scripted failures, and the
//! requests the providers send.
//!
//! What every wire must do is written once in `suite.rs` and run for each provider
//! (tests `openai::suite::*`, `anthropic::suite::*`); what belongs to one wire format
//! alone — OpenRouter's and Groq's error chunks, Anthropic's signatures, redacted
//! thinking and cache usage, each request body — is in that provider's file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;
mod suite;

mod anthropic;
mod openai;
