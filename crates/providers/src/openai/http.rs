//! Failures before the stream: non-success statuses, `Retry-After`, send errors.
//!
//! An OpenAI error body is `{"error": {"message", "type", "param", "code"}}` (OpenAI API
//! reference, "Error codes"); OpenAI-compatible servers vary (`{"error": "text"}`,
//! `{"message": …}`, a one-element array), so the message is looked for in each shape
//! and the raw text used otherwise. The wait the upstream asks for comes from
//! `retry-after-ms` (milliseconds, sent by OpenAI and honoured first by its SDKs) or
//! `Retry-After` (RFC 9110 §10.2.3: delay-seconds or an HTTP-date).

use std::time::{Duration, SystemTime};

use genstream_engine::provider::{ProviderError, ProviderErrorKind};
use reqwest::header::HeaderMap;
use serde_json::Value;

/// The most of an error body read, and the most of it quoted when it is not JSON.
const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_QUOTED_CHARS: usize = 500;

/// The `Http` error for a non-success `response`, reading (a bounded part of) its body.
pub(crate) async fn status_error(provider: &str, mut response: reqwest::Response) -> ProviderError {
    let status = response.status();
    let retry_after = retry_after(response.headers(), SystemTime::now());
    let mut body = Vec::new();
    // A broken body still leaves the status to report.
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_BODY_BYTES {
            break;
        }
    }
    let detail = body_detail(&body);
    let message = if detail.is_empty() {
        format!("{provider}: upstream answered HTTP {status}")
    } else {
        format!("{provider}: upstream answered HTTP {status}: {detail}")
    };
    ProviderError {
        kind: ProviderErrorKind::Http,
        status: Some(status.as_u16()),
        message,
        retry_after,
    }
}

/// What to quote of an error body: its error message if it is JSON with one, else the
/// text, cut to [`MAX_QUOTED_CHARS`].
pub(crate) fn body_detail(body: &[u8]) -> String {
    if let Ok(json) = serde_json::from_slice::<Value>(body)
        && let Some(message) = error_message(&json)
    {
        return message;
    }
    truncate(String::from_utf8_lossy(body).trim(), MAX_QUOTED_CHARS)
}

/// The message of an error value in any of the shapes upstreams use:
/// `{"error": {"message"}}`, `{"error": "text"}`, `{"message"}`, `"text"`, `[{…}]`.
/// Adds `type`/`code` when given, for context.
pub(crate) fn error_message(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.first().and_then(error_message),
        Value::Object(map) => {
            if let Some(inner) = map.get("error").filter(|e| !e.is_null())
                && let Some(message) = error_message(inner)
            {
                return Some(message);
            }
            let message = map.get("message").and_then(Value::as_str)?;
            let tags: Vec<String> = ["type", "code"]
                .iter()
                .filter_map(|key| match map.get(*key) {
                    Some(Value::String(s)) if !s.is_empty() => Some(format!("{key} {s}")),
                    Some(Value::Number(n)) => Some(format!("{key} {n}")),
                    _ => None,
                })
                .collect();
            if tags.is_empty() {
                Some(message.to_owned())
            } else {
                Some(format!("{message} ({})", tags.join(", ")))
            }
        }
        _ => None,
    }
}

/// The wait asked for by `retry-after-ms` or `Retry-After`, relative to `now` for an
/// HTTP-date (a date in the past means no wait). `None` when absent or unparsable.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
        && let Ok(wait) = Duration::try_from_secs_f64(ms / 1000.0)
    {
        return Some(wait);
    }
    let value = header("retry-after")?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // Not allowed by the RFC, but sent by some servers.
    if let Ok(secs) = value.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The error for a request that got no response.
pub(crate) fn send_error(provider: &str, error: &reqwest::Error) -> ProviderError {
    let kind = if error.is_timeout() {
        ProviderErrorKind::Timeout
    } else {
        // Connect failures and resets before the response head: no answer either way,
        // and both are safe to retry.
        ProviderErrorKind::Connect
    };
    ProviderError::new(kind, format!("{provider}: {}", error_chain(error)))
}

/// An error and its sources, `outer: inner: …` (reqwest's own message alone is just
/// "error sending request for url (…)").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// At most `max` chars of `s`, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let at = |pairs| retry_after(&headers(pairs), now);
        assert_eq!(at(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            at(&[("retry-after", "1.5")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            at(&[("retry-after", "Wed, 21 Oct 2015 07:28:30 GMT")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            at(&[("retry-after", "Wed, 21 Oct 2015 07:27:00 GMT")]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            at(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            at(&[("retry-after-ms", "-1"), ("retry-after", "9")]),
            Some(Duration::from_secs(9))
        );
        assert_eq!(at(&[("retry-after", "soon")]), None);
        assert_eq!(at(&[("retry-after-ms", "1e300")]), None);
        assert_eq!(at(&[]), None);
    }

    #[test]
    fn finds_error_messages() {
        let detail = |v: Value| body_detail(v.to_string().as_bytes());
        assert_eq!(
            detail(json!({"error": {"message": "Rate limit", "type": "requests", "code": null}})),
            "Rate limit (type requests)"
        );
        assert_eq!(detail(json!({"error": "nope"})), "nope");
        assert_eq!(
            detail(json!({"message": "bad", "code": 400})),
            "bad (code 400)"
        );
        assert_eq!(detail(json!([{"error": {"message": "gemini"}}])), "gemini");
        assert_eq!(
            body_detail(b"<html>502 Bad Gateway</html>"),
            "<html>502 Bad Gateway</html>"
        );
        let long = "é".repeat(600);
        let cut = body_detail(long.as_bytes());
        assert_eq!(cut.chars().count(), 501);
        assert!(cut.ends_with('…'));
    }
}
