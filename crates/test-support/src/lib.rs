//! What genstream's integration tests share, so that each helper exists once.
//!
//! - [`redis`]: the test Redis URL, a key prefix per test that deletes its keys when it
//!   goes, and a redis-server of a test's own on a free port ([`OwnRedis`]).
//! - [`postgres`]: a fresh PostgreSQL database per test ([`TestDb`]).
//! - [`server`]: a router served in-process on a free port ([`Served`]) and the real
//!   `genstream` binary as a child process whose address is read from its first line
//!   ([`ServerProcess`]).
//! - [`services`]: the check, once per process, that the shared Redis or PostgreSQL
//!   answers — else one line naming it and `scripts/test`, which starts it.
//! - [`stream`]: the signal that a running job has streamed text ([`wait_for_text`]).
//! - [`wait`]: waiting for a condition with a deadline ([`wait_until`], [`wait_for`])
//!   instead of sleeping for a guessed time.
//!
//! The shared services come from the environment, with the defaults of a developer
//! machine: `GENSTREAM_TEST_REDIS_URL` (`redis://127.0.0.1:6379`) and
//! `GENSTREAM_TEST_POSTGRES_ADMIN_URL` (`postgres://postgres@127.0.0.1:5432/postgres`).
//! Every test works under names of its own (a key prefix, a database), so test runs
//! in parallel, from several checkouts, do not collide.
//!
//! A test crate's helper, not a library: it panics where a test cannot go on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod postgres;
pub mod redis;
pub mod server;
pub mod services;
pub mod stream;
pub mod wait;

pub use postgres::TestDb;
pub use redis::{KeyPrefix, OwnRedis, OwnRedisCluster, redis_url, unique_prefix};
pub use server::{Served, ServerProcess, genstream_key, unused_addr};
pub use stream::wait_for_text;
pub use wait::{wait_for, wait_until};
