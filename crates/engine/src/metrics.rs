//! What the engine counts and times, through the `metrics` facade: every name and
//! label is here, and every recording point is one call of a function of this module,
//! so the job code stays about jobs. With no recorder installed (the engine's own
//! tests, the CLI) each call is a no-op; `genstream serve` installs the Prometheus
//! recorder and serves it at `GET /metrics` (the server's `observe.rs`, the list in
//! docs/operations.md).
//!
//! Names follow Prometheus conventions: counters end in `_total`, durations are
//! histograms in seconds. Labels take a small, bounded set of values (model names
//! from config, statuses, event kinds); never an id.
//!
//! The hot path is [`appended`], once per event: one counter and one histogram
//! sample, a registry look-up and an atomic add each (BENCHMARKS.md, "Metrics").

use std::time::Duration;

use metrics::{counter, histogram};

use crate::event::EventBody;
use crate::provider::ProviderError;
use crate::usage::UsageTotals;

/// Counter, label `model`: jobs started on this replica.
pub const JOBS_STARTED: &str = "genstream_jobs_started_total";
/// Counter, labels `status` (`complete`, `aborted`, `error`) and `reason` (`final`'s
/// reason — `aborted`, `shutdown`, `max_tool_iterations` — or `error`'s code —
/// `upstream_error`, `stalled`, `replica_lost`, … — or `none` for a plain completion):
/// jobs whose terminal event this replica appended.
pub const JOBS_FINISHED: &str = "genstream_jobs_finished_total";
/// Gauge: jobs running on this replica (set by the server when scraped).
pub const JOBS_RUNNING: &str = "genstream_jobs_running";
/// Gauge: SSE connections open on this replica (the server's stream route).
pub const SUBSCRIBERS: &str = "genstream_subscribers_connected";
/// Counter: events appended to logs by the jobs this replica runs (`created` and
/// everything their tasks append; a reaper's `usage` and `error` for a job whose
/// replica died are not counted, only the job's end).
pub const EVENTS_APPENDED: &str = "genstream_events_appended_total";
/// Counter: SSE frames written to subscribers (the server's stream route).
pub const FRAMES_DELIVERED: &str = "genstream_frames_delivered_total";
/// Histogram, seconds: one event's append, from the job's emit to the store's
/// acknowledgement: the wait behind the call in flight (a job's appends are
/// pipelined, `manager/appender.rs`), the call itself and its outage retries.
pub const APPEND_SECONDS: &str = "genstream_append_duration_seconds";
/// Histogram, seconds, label `model`: from a model call's request to its first
/// streamed event (text, reasoning or a tool call).
pub const FIRST_TOKEN_SECONDS: &str = "genstream_time_to_first_token_seconds";
/// Counter, labels `provider`, `model`, `status` (the HTTP status, or `error` when
/// there was none: connect error, timeout): model calls sent upstream.
pub const UPSTREAM_REQUESTS: &str = "genstream_upstream_requests_total";
/// Counter, labels `model`, `reason` (`http`, `connect`, `timeout`, `truncated`,
/// `malformed`, `upstream`): model calls retried.
pub const RETRIES: &str = "genstream_upstream_retries_total";
/// Counter, labels `model`, `type` (`input`, `output`, `cache_write`, `cache_read`,
/// `reasoning`): tokens spent, as billed (reasoning tokens are part of output).
pub const TOKENS: &str = "genstream_tokens_total";
/// Counter, label `model`: micro-credits spent (1 credit = 1e-6 USD, so one unit is
/// 1e-12 USD), the ledger's own integer amounts.
pub const MICROCREDITS: &str = "genstream_spent_microcredits_total";
/// Counter: Redis commands that failed (connection, timeout, script), as the Redis
/// store reports them.
pub const REDIS_ERRORS: &str = "genstream_redis_errors_total";
/// Counter: database operations that failed.
pub const DATABASE_ERRORS: &str = "genstream_database_errors_total";
/// Counter: starts answered with an earlier start's ids (a repeated
/// `Idempotency-Key`), which started nothing.
pub const IDEMPOTENT_REPEATS: &str = "genstream_idempotent_repeats_total";
/// Counter, labels `method`, `route` (the matched route, `/api/chat/stream/{stream_id}`,
/// never the raw path), `status`: HTTP requests answered (the server's).
pub const HTTP_REQUESTS: &str = "genstream_http_requests_total";

/// A start repeated an idempotency key and got the first start's ids.
pub fn idempotent_repeat() {
    counter!(IDEMPOTENT_REPEATS).increment(1);
    tracing::info!("repeated idempotency key: answered the first start's ids");
}

/// A job was started: its `created` event (seq 0) is in the log and its task is
/// being spawned.
pub fn job_started(model: &str) {
    counter!(JOBS_STARTED, "model" => model.to_owned()).increment(1);
    counter!(EVENTS_APPENDED).increment(1);
    tracing::info!(model, "job started");
}

/// An event this replica's job task appended, and how long the append took. A
/// terminal event also counts the job as finished ([`finished`]).
pub fn appended(body: &EventBody, took: Duration) {
    counter!(EVENTS_APPENDED).increment(1);
    histogram!(APPEND_SECONDS).record(took);
    if body.is_terminal() {
        finished(body);
    }
}

/// A terminal event this replica appended: the job is over.
pub fn finished(body: &EventBody) {
    let (status, reason) = match body {
        EventBody::Final(f) => (
            match f.status {
                crate::event::FinalStatus::Complete => "complete",
                crate::event::FinalStatus::Aborted => "aborted",
            },
            f.reason.clone().unwrap_or_else(|| "none".into()),
        ),
        EventBody::Error(e) => ("error", e.code.clone()),
        _ => return,
    };
    tracing::info!(status, reason, "job finished");
    counter!(JOBS_FINISHED, "status" => status, "reason" => reason).increment(1);
}

/// A model call was sent upstream: `Ok` once its answer began streaming, else the
/// error it failed with.
pub fn upstream_request(provider: &str, model: &str, result: Result<(), &ProviderError>) {
    let status = match result {
        Ok(()) => "200".to_owned(),
        Err(e) => e
            .status
            .map_or_else(|| "error".to_owned(), |s| s.to_string()),
    };
    counter!(UPSTREAM_REQUESTS, "provider" => provider.to_owned(), "model" => model.to_owned(), "status" => status)
        .increment(1);
}

/// The first event of a model call arrived `after` its request.
pub fn first_token(model: &str, after: Duration) {
    histogram!(FIRST_TOKEN_SECONDS, "model" => model.to_owned()).record(after);
}

/// A failed model call will be retried.
pub fn retry(model: &str, error: &ProviderError) {
    let reason = match error.kind {
        crate::provider::ProviderErrorKind::Http => "http",
        crate::provider::ProviderErrorKind::Connect => "connect",
        crate::provider::ProviderErrorKind::Timeout => "timeout",
        crate::provider::ProviderErrorKind::Truncated => "truncated",
        crate::provider::ProviderErrorKind::Malformed => "malformed",
        crate::provider::ProviderErrorKind::Upstream => "upstream",
        crate::provider::ProviderErrorKind::Config => "config",
    };
    counter!(RETRIES, "model" => model.to_owned(), "reason" => reason).increment(1);
}

/// A job's usage was spent: its tokens and `micro` micro-credits.
pub fn spent(model: &str, usage: &UsageTotals, micro: i64) {
    for (kind, n) in [
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_write", usage.cache_write_tokens),
        ("cache_read", usage.cache_read_tokens),
        ("reasoning", usage.reasoning_tokens),
    ] {
        if n > 0 {
            counter!(TOKENS, "model" => model.to_owned(), "type" => kind).increment(n);
        }
    }
    if micro > 0 {
        counter!(MICROCREDITS, "model" => model.to_owned()).increment(micro as u64);
    }
}

/// A Redis command failed.
pub fn redis_error() {
    counter!(REDIS_ERRORS).increment(1);
}

/// A database operation failed.
pub fn database_error() {
    counter!(DATABASE_ERRORS).increment(1);
}
