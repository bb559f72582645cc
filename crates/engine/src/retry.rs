//! The one retry layer (docs/protocol.md §6): which upstream failures are retried, how long to
//! wait, and the timeouts that turn a silent upstream into a retryable failure.
//!
//! Every provider goes through it, in the job task (`manager.rs`), because only the job
//! task knows which run steps a failed attempt created and can name them in the
//! `retry` event's `discardStepIds`. Nothing else retries: the HTTP clients' own
//! retries are off.
//!
//! Waits: exponential from `base` (doubling), capped at `cap`, with "equal jitter": retry
//! n waits a random time between half and all of `min(base × 2ⁿ⁻¹, cap)` — so with the
//! defaults 0.5–1 s, 1–2 s, 2–4 s, …, and 15–30 s once the cap is reached. The jitter
//! stays at the cap too, so many jobs failing together do not retry in lockstep (it
//! is backon's jitter, a random extra of up to the delay, applied to a sequence of
//! half-delays). An upstream's `Retry-After` (seconds or
//! an HTTP date) or `retry-after-ms` replaces the computed wait; a value above `cap` is
//! honoured up to `ceiling`, and beyond that the job fails with an error that says how
//! long the upstream asked to wait (docs/lessons.md: "a Retry-After longer than the cap cut
//! short").

use std::time::Duration;

use backon::BackoffBuilder;
use serde::{Deserialize, Serialize};

use crate::provider::{ProviderError, ProviderErrorKind};

/// Retry settings of one provider, config `[providers.NAME.retry]`; durations are
/// written with their unit (`base = "1s"`). Defaults: 3 retries, base 1 s, cap 30 s,
/// ceiling 60 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so `max_retries + 1` attempts in all).
    pub max_retries: u32,
    /// First computed wait.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Largest computed wait.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// Largest `Retry-After` honoured; a longer one fails the job.
    #[serde(with = "humantime_serde")]
    pub ceiling: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            ceiling: Duration::from_secs(60),
        }
    }
}

/// Timeouts of one provider, config `[providers.NAME.timeouts]` (`idle = "60s"`). Defaults: connect 10 s, first byte 60 s, idle gap 60 s.
/// The HTTP providers apply them to the upstream's bytes themselves
/// ([`Provider::applies_timeouts`](crate::provider::Provider::applies_timeouts)); the
/// engine applies them to the events of any other provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP/TLS connect (applied by the provider's HTTP client).
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// From the start of an attempt to the first byte of the answer's body (for
    /// providers that do not see bytes, to their first event).
    #[serde(with = "humantime_serde")]
    pub first_byte: Duration,
    /// Longest gap between two reads of the answer's body: pings, SSE comments and
    /// partial frames count (for providers that do not see bytes, the gap between two
    /// events).
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

/// Whether a failure is worth another attempt: 408, 409, 429, 5xx, 529, connect errors,
/// timeouts, truncated or malformed streams, and in-stream errors that say the upstream
/// is overloaded or failed on its side. Never other 4xx, never configuration errors.
///
/// An in-stream (`Upstream`) error is classified by what the upstream said in
/// structured form, in this order: its `status` (an HTTP status the upstream gave the
/// error); its `codes` (error types and codes: [`code_is_retryable`] — a code known
/// not to be worth a retry wins over one that is); and only when none of those is
/// known, words in the upstream's own `detail` text ("overloaded", "rate limit",
/// "server error", "timeout", …). genstream's own wording — the provider's name
/// included — is never read, so a provider called `rate-limited-proxy` does not make
/// every error retryable.
pub fn is_retryable(e: &ProviderError) -> bool {
    match e.kind {
        ProviderErrorKind::Http => e.status.is_some_and(status_is_retryable),
        ProviderErrorKind::Connect
        | ProviderErrorKind::Timeout
        | ProviderErrorKind::Truncated
        | ProviderErrorKind::Malformed => true,
        ProviderErrorKind::Upstream => {
            if let Some(s) = e.status {
                return status_is_retryable(s);
            }
            let verdicts: Vec<bool> = e
                .codes
                .iter()
                .filter_map(|c| code_is_retryable(c))
                .collect();
            if !verdicts.is_empty() {
                return verdicts.iter().all(|v| *v);
            }
            e.detail.as_deref().is_some_and(detail_sounds_transient)
        }
        ProviderErrorKind::Config => false,
    }
}

/// 408, 409, 429, 500–599 (529, Anthropic's overload, included).
pub fn status_is_retryable(status: u16) -> bool {
    matches!(status, 408 | 409 | 429 | 500..=599)
}

/// What an upstream error type or code says about a retry: `Some(true)` for transient
/// failures (Anthropic `overloaded_error`, `api_error`, `rate_limit_error`; OpenAI and
/// compatible `server_error`, `rate_limit_exceeded`, `timeout`, …; a numeric code read
/// as an HTTP status), `Some(false)` for errors a retry cannot fix
/// (`invalid_request_error`, `authentication_error`, `insufficient_quota`,
/// `context_length_exceeded`, …), `None` for a code not known here. Case is ignored.
pub fn code_is_retryable(code: &str) -> Option<bool> {
    let code = code.trim().to_ascii_lowercase();
    if let Ok(status) = code.parse::<u16>() {
        return Some(status_is_retryable(status));
    }
    match code.as_str() {
        "overloaded_error"
        | "overloaded"
        | "engine_overloaded"
        | "api_error"
        | "server_error"
        | "internal_error"
        | "internal_server_error"
        | "service_unavailable"
        | "unavailable"
        | "bad_gateway"
        | "gateway_timeout"
        | "timeout"
        | "timeout_error"
        | "rate_limit_error"
        | "rate_limit_exceeded"
        | "rate_limited"
        | "too_many_requests"
        | "resource_exhausted" => Some(true),
        "invalid_request_error"
        | "invalid_request"
        | "authentication_error"
        | "permission_error"
        | "permission_denied"
        | "not_found_error"
        | "not_found"
        | "model_not_found"
        | "request_too_large"
        | "billing_error"
        | "insufficient_quota"
        | "invalid_api_key"
        | "context_length_exceeded"
        | "content_filter"
        | "content_policy_violation"
        | "invalid_argument"
        | "tool_use_failed"
        | "unsupported_parameter"
        | "unsupported_value" => Some(false),
        _ => None,
    }
}

/// The last resort for an in-stream error with no known status or code: whether the
/// upstream's own text says it is overloaded, rate limited, failing or slow.
fn detail_sounds_transient(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "overloaded",
        "rate limit",
        "rate_limit",
        "too many requests",
        "server error",
        "server_error",
        "internal error",
        "temporarily unavailable",
        "service unavailable",
        "timeout",
        "timed out",
        "try again",
    ]
    .iter()
    .any(|k| d.contains(k))
}

/// The waits of one job's retries, in order.
pub struct Backoff {
    policy: RetryPolicy,
    inner: backon::ExponentialBackoff,
}

/// Why no retry follows a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// Not a retryable failure.
    NotRetryable,
    /// `max_retries` used up.
    Exhausted,
    /// The upstream asked to wait longer than the ceiling.
    RetryAfterTooLong(Duration),
}

impl Backoff {
    /// A fresh sequence of waits for `policy`. `seed` fixes the jitter (tests).
    pub fn new(policy: RetryPolicy, seed: Option<u64>) -> Self {
        // backon's jitter adds up to the delay again: over half-delays that gives
        // [d/2, d), with d = min(base × 2ⁿ, cap) — jittered below and at the cap.
        let mut b = backon::ExponentialBuilder::default()
            .with_min_delay(policy.base / 2)
            .with_max_delay(policy.cap / 2)
            .with_factor(2.0)
            .with_max_times(policy.max_retries as usize)
            .with_jitter();
        if let Some(s) = seed {
            b = b.with_jitter_seed(s);
        }
        Backoff {
            policy,
            inner: b.build(),
        }
    }

    /// The wait before the next attempt after `error`, or why there is none.
    pub fn next_delay(&mut self, error: &ProviderError) -> Result<Duration, GiveUp> {
        if !is_retryable(error) {
            return Err(GiveUp::NotRetryable);
        }
        // Always draw from the sequence, so the retry count holds even when the
        // upstream dictates the wait.
        let computed = self.inner.next().ok_or(GiveUp::Exhausted)?;
        let cap = self.policy.cap;
        match error.retry_after {
            Some(ra) if ra > self.policy.ceiling => Err(GiveUp::RetryAfterTooLong(ra)),
            Some(ra) => Ok(ra),
            // The guard only absorbs float rounding: `computed` is below `cap`.
            None => Ok(computed.min(cap)),
        }
    }

    /// Attempts in all: the first plus the retries.
    pub fn max_attempts(&self) -> u32 {
        self.policy.max_retries + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, retry_after: Option<Duration>) -> ProviderError {
        ProviderError {
            kind: ProviderErrorKind::Http,
            status: Some(status),
            message: format!("status {status}"),
            retry_after,
            ..Default::default()
        }
    }

    #[test]
    fn retryable_statuses_and_kinds() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529] {
            assert!(is_retryable(&http(s, None)), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(!is_retryable(&http(s, None)), "{s}");
        }
        for k in [
            ProviderErrorKind::Connect,
            ProviderErrorKind::Timeout,
            ProviderErrorKind::Truncated,
            ProviderErrorKind::Malformed,
        ] {
            assert!(is_retryable(&ProviderError::new(k, "x")));
        }
        assert!(!is_retryable(&ProviderError::new(
            ProviderErrorKind::Config,
            "x"
        )));
    }

    fn upstream(status: Option<u16>, codes: &[&str], detail: Option<&str>) -> ProviderError {
        ProviderError {
            kind: ProviderErrorKind::Upstream,
            status,
            // genstream's wording, provider name included, is never read.
            message: "rate-limit-proxy: upstream reported an error: overloaded".into(),
            codes: codes.iter().map(|c| (*c).to_owned()).collect(),
            detail: detail.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn in_stream_errors_are_classified_by_status_then_code_then_detail() {
        let yes = |e: ProviderError| assert!(is_retryable(&e), "{e:?}");
        let no = |e: ProviderError| assert!(!is_retryable(&e), "{e:?}");
        // The status the upstream gave the error decides first.
        yes(upstream(Some(529), &["invalid_request_error"], None));
        no(upstream(Some(400), &["server_error"], Some("overloaded")));
        // Anthropic's error types.
        for t in ["overloaded_error", "api_error", "rate_limit_error"] {
            yes(upstream(None, &[t], Some("whatever")));
        }
        for t in [
            "invalid_request_error",
            "authentication_error",
            "not_found_error",
        ] {
            no(upstream(None, &[t], Some("Overloaded")));
        }
        // OpenAI / OpenRouter: string codes, numeric codes, and a client error that
        // wins over a transient-sounding type.
        yes(upstream(None, &["server_error"], None));
        yes(upstream(None, &["502"], None));
        no(upstream(None, &["400"], Some("rate limit")));
        no(upstream(
            None,
            &["rate_limit_exceeded", "insufficient_quota"],
            None,
        ));
        yes(upstream(None, &["Rate_Limit_Exceeded"], None));
        // Unknown codes: the upstream's own text decides.
        yes(upstream(
            None,
            &["brand_new_code"],
            Some("The server is overloaded"),
        ));
        no(upstream(
            None,
            &["brand_new_code"],
            Some("Token limit reached"),
        ));
        // Nothing structured and no text: not retried, whatever genstream's message
        // (and the provider's name) says.
        no(upstream(None, &[], None));
        yes(upstream(None, &[], Some("Request timed out, try again")));
        assert_eq!(code_is_retryable("never_heard_of_it"), None);
    }

    #[test]
    fn exponential_with_jitter_within_cap_and_bounded_count() {
        let policy = RetryPolicy {
            max_retries: 6,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            ceiling: Duration::from_secs(60),
        };
        let e = http(503, None);
        let mut at_cap = std::collections::BTreeSet::new();
        for seed in 0..50 {
            let mut b = Backoff::new(policy, Some(seed));
            for i in 0..6u32 {
                let d = b.next_delay(&e).unwrap().as_millis() as u64;
                let ceiling = (1000u64 << i).min(30_000);
                assert!(
                    d >= ceiling / 2 && d <= ceiling,
                    "seed {seed}, retry {i}: {d} ms not in [{}, {ceiling}]",
                    ceiling / 2
                );
                if ceiling == 30_000 {
                    at_cap.insert(d);
                }
            }
            assert_eq!(b.next_delay(&e), Err(GiveUp::Exhausted));
        }
        // At the cap the waits still differ (no lockstep), and none reaches past it.
        assert!(at_cap.len() >= 45, "{at_cap:?}");
        assert!(at_cap.iter().all(|d| (15_000..=30_000).contains(d)));
    }

    #[test]
    fn retry_after_replaces_the_wait_up_to_the_ceiling() {
        let mut b = Backoff::new(RetryPolicy::default(), Some(1));
        assert_eq!(
            b.next_delay(&http(429, Some(Duration::from_secs(45)))),
            Ok(Duration::from_secs(45)),
            "above the cap, below the ceiling: honoured"
        );
        assert_eq!(
            b.next_delay(&http(429, Some(Duration::from_millis(250)))),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            b.next_delay(&http(429, Some(Duration::from_secs(61)))),
            Err(GiveUp::RetryAfterTooLong(Duration::from_secs(61)))
        );
        assert_eq!(b.next_delay(&http(400, None)), Err(GiveUp::NotRetryable));
    }
}
