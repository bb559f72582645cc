//! Failures before the stream, shared by the HTTP providers: sending one streaming
//! request, non-success statuses, `Retry-After`, send errors.
//!
//! An OpenAI error body is `{"error": {"message", "type", "param", "code"}}` (OpenAI API
//! reference, "Error codes"); OpenAI-compatible servers vary (`{"error": "text"}`,
//! `{"message": …}`, a one-element array), so [`error_message`] looks for the message
//! in each shape. Anthropic's is `{"type": "error", "error": {"type", "message"},
//! "request_id"}` (Anthropic API docs, "Errors"), which that also reads; a provider may
//! pass its own describer to quote it its way. The raw text is quoted when the body is
//! not JSON. The wait the upstream asks for comes from `retry-after-ms` (milliseconds,
//! sent by OpenAI and honoured first by its SDKs and Anthropic's) or `Retry-After`
//! (RFC 9110 §10.2.3: delay-seconds or an HTTP-date).

use std::time::{Duration, SystemTime};

use genstream_engine::provider::{ProviderError, ProviderErrorKind};

use crate::BuildError;
use crate::deadline::{Deadlines, timeout_error};
use crate::error_text::{error_chain, truncate};
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Time allowed to open a TCP (and TLS) connection to the upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL `{base_url}/{path}` of provider `provider` (a trailing slash on `base_url`
/// is ignored).
///
/// # Errors
/// [`BuildError::InvalidConfig`] when `base_url` is not an `http(s)` URL.
pub(crate) fn endpoint(
    provider: &str,
    base_url: &str,
    path: &str,
) -> Result<reqwest::Url, BuildError> {
    let invalid = |message: String| BuildError::InvalidConfig {
        provider: provider.to_owned(),
        message,
    };
    let base = base_url.trim_end_matches('/');
    let endpoint = reqwest::Url::parse(&format!("{base}/{path}"))
        .map_err(|e| invalid(format!("base_url `{base_url}` is not a URL: {e}")))?;
    if !matches!(endpoint.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "base_url `{base_url}` must be an http or https URL"
        )));
    }
    Ok(endpoint)
}

/// The HTTP client of one provider: its connect timeout (default [`CONNECT_TIMEOUT`],
/// `[providers.NAME.timeouts] connect`), and reqwest's own retries
/// turned off so that an attempt is exactly one request (docs/lessons.md, "Upstream retries":
/// SDK-internal retries multiplied the attempts; the engine's one retry layer decides).
///
/// # Errors
/// [`BuildError::InvalidConfig`] when the client cannot be built (no TLS backend).
pub(crate) fn client(
    provider: &str,
    connect_timeout: Duration,
) -> Result<reqwest::Client, BuildError> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .retry(reqwest::retry::never())
        .user_agent(concat!("genstream/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BuildError::InvalidConfig {
            provider: provider.to_owned(),
            message: format!("cannot build the HTTP client: {e}"),
        })
}

/// The API key, read now from the variable `var` (so a rotated key is picked up
/// without a restart); `None` when no variable is configured (local servers).
///
/// # Errors
/// `Config`, naming the variable, when it is unset or blank.
pub(crate) fn api_key(provider: &str, var: Option<&str>) -> Result<Option<String>, ProviderError> {
    let Some(var) = var else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_owned())),
        _ => Err(ProviderError::new(
            ProviderErrorKind::Config,
            format!("{provider}: environment variable `{var}` (api_key_env) is not set or empty"),
        )),
    }
}

/// Reads the message of an error JSON value (a body or an in-stream error), quoting
/// what the upstream said; `None` when the value holds no message.
pub(crate) type Describe = fn(&Value) -> Option<String>;

/// The most of an error body read, and the most of it quoted when it is not JSON.
const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_QUOTED_CHARS: usize = 500;

/// Sends one streaming request and waits for the head of the answer, until the
/// first-byte deadline of `deadlines`.
///
/// `Ok(Some(response))` for a 2xx answer that is not JSON (the event stream);
/// `Ok(None)` when `cancel` fired first (the request is dropped). `describe` reads the
/// upstream's error bodies.
///
/// # Errors
/// `Connect`/`Timeout` (no answer, or none by the deadline), `Http` (non-2xx, with status, message and
/// `retry_after`), `Upstream` (a 2xx JSON error body: some servers answer a streaming
/// request so), `Malformed` (a 2xx JSON body that is not an error).
pub(crate) async fn open_stream(
    provider: &str,
    request: reqwest::RequestBuilder,
    cancel: &CancellationToken,
    deadlines: Deadlines,
    describe: Describe,
) -> Result<Option<reqwest::Response>, ProviderError> {
    let answer = async {
        let response = request.send().await.map_err(|e| send_error(provider, &e))?;
        if !response.status().is_success() {
            return Err(status_error(provider, response, describe).await);
        }
        let is_json = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if is_json {
            return Err(json_instead_of_stream(provider, response, describe).await);
        }
        Ok(response)
    };
    // The answer's head (and an error body) count against the first-byte budget.
    let answer = tokio::time::timeout_at(deadlines.first_byte_deadline, answer);
    tokio::select! {
        biased;
        () = cancel.cancelled() => Ok(None),
        response = answer => match response {
            Ok(response) => response.map(Some),
            Err(_) => Err(timeout_error(provider, "first byte", deadlines.first_byte)),
        },
    }
}

/// The error for a 2xx answer with a JSON body where an event stream was expected.
async fn json_instead_of_stream(
    provider: &str,
    response: reqwest::Response,
    describe: Describe,
) -> ProviderError {
    let body = response.bytes().await.unwrap_or_default();
    let error = serde_json::from_slice::<Value>(&body)
        .ok()
        .filter(|v| v.get("error").is_some_and(|e| !e.is_null()));
    match error {
        Some(value) => reported_error(provider, Some(&value), "", describe),
        None => ProviderError::new(
            ProviderErrorKind::Malformed,
            format!(
                "{provider}: upstream answered JSON, not an event stream: {}",
                truncate(String::from_utf8_lossy(&body).trim(), 200)
            ),
        ),
    }
}

/// The `Http` error for a non-success `response`, reading (a bounded part of) its body.
pub(crate) async fn status_error(
    provider: &str,
    mut response: reqwest::Response,
    describe: Describe,
) -> ProviderError {
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
    let detail = body_detail(&body, describe);
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
        ..Default::default()
    }
}

/// What to quote of an error body: its error message (read by `describe`) if it is
/// JSON with one, else the text, cut to [`MAX_QUOTED_CHARS`].
pub(crate) fn body_detail(body: &[u8], describe: Describe) -> String {
    if let Ok(json) = serde_json::from_slice::<Value>(body)
        && let Some(message) = describe(&json)
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

/// The `Upstream` error for a failure the upstream reported inside a 2xx answer: an
/// error chunk or event, or a JSON error body. `value` is its JSON (`None` when it was
/// not JSON, then `raw` is quoted). The message quotes what `describe` reads; the
/// structured parts the retry layer classifies by come from the error object (the
/// value's `error` when that is an object, else the value itself; the first element
/// of an array):
/// - `status`: a numeric `code` (OpenRouter sends the HTTP status there), else a
///   numeric `status_code` or `status`;
/// - `codes`: the string `type`, `code` and `status` (`overloaded_error`,
///   `rate_limit_exceeded`, Gemini's `UNAVAILABLE`);
/// - `detail`: its `message` (or the error itself when it is a string; `raw` when the
///   data was not JSON).
pub(crate) fn reported_error(
    provider: &str,
    value: Option<&Value>,
    raw: &str,
    describe: Describe,
) -> ProviderError {
    let quoted = || truncate(raw.trim(), MAX_QUOTED_CHARS);
    let text = value.and_then(describe).unwrap_or_else(quoted);
    let mut error = ProviderError::new(
        ProviderErrorKind::Upstream,
        format!("{provider}: upstream reported an error: {text}"),
    );
    let Some(value) = value else {
        error.detail = Some(quoted());
        return error;
    };
    let mut object = value;
    while let Some(first) = object.as_array().and_then(|a| a.first()) {
        object = first;
    }
    match object.get("error") {
        Some(Value::String(s)) => {
            error.detail = Some(s.clone());
            return error;
        }
        Some(inner @ Value::Object(_)) => object = inner,
        _ => {}
    }
    let status_of = |v: &Value| {
        match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        }
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| (100..=999).contains(n))
    };
    error.status = ["code", "status_code", "status"]
        .iter()
        .find_map(|key| object.get(*key).and_then(status_of));
    error.codes = ["type", "code", "status"]
        .iter()
        .filter_map(|key| object.get(*key)?.as_str())
        .filter(|s| !s.is_empty() && s.trim().parse::<u64>().is_err())
        .map(str::to_owned)
        .collect();
    error.detail = object
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned);
    error
}

/// The wait asked for by `retry-after-ms` or `Retry-After`. An HTTP-date is taken
/// relative to the response's own `Date` header when it has one — the two come from
/// the same clock, so a skew between the upstream's clock and ours does not change the
/// wait — else to `now`; a date in the past means no wait. `None` when absent or
/// unparsable.
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
    let now = header("date")
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or(now);
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
        // Relative to the response's Date, whatever our clock says.
        assert_eq!(
            at(&[
                ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
                ("date", "Wed, 21 Oct 2015 07:27:40 GMT")
            ]),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            at(&[
                ("retry-after", "Wed, 21 Oct 2015 07:28:30 GMT"),
                ("date", "not a date")
            ]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(at(&[("retry-after", "soon")]), None);
        assert_eq!(at(&[("retry-after-ms", "1e300")]), None);
        assert_eq!(at(&[]), None);
    }

    #[test]
    fn finds_error_messages() {
        let detail = |v: Value| body_detail(v.to_string().as_bytes(), error_message);
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
            body_detail(b"<html>502 Bad Gateway</html>", error_message),
            "<html>502 Bad Gateway</html>"
        );
        let long = "é".repeat(600);
        let cut = body_detail(long.as_bytes(), error_message);
        assert_eq!(cut.chars().count(), 501);
        assert!(cut.ends_with('…'));
    }
}
