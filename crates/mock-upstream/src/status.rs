//! Non-stream answers: an HTTP error status with the dialect's error body and the wait
//! header a `flaky` wrapper asks for (`Retry-After` in seconds or as an HTTP-date,
//! `retry-after-ms`), as OpenAI and Anthropic send them.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::Dialect;
use crate::chat_completions::error_response;
use crate::messages::anthropic_error;
use crate::model::RetryAfter;

/// A `status:<code>` or `flaky` answer in `dialect`. `retry_after`: `None` for
/// `status:<code>`'s default (`Retry-After: 1` on 429 and 503, and 529 on Messages),
/// else exactly the wait header asked for.
pub(crate) fn status_answer(
    dialect: Dialect,
    code: u16,
    retry_after: Option<RetryAfter>,
) -> Response {
    let Ok(status) = StatusCode::from_u16(code) else {
        return dialect_error(
            dialect,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("mock upstream: `{code}` is not an HTTP status code"),
        );
    };
    let kind = match dialect {
        Dialect::ChatCompletions => match code {
            400 | 404 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            408 => "timeout",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ if status.is_server_error() => "server_error",
            _ => "mock_error",
        },
        // Anthropic API docs, "Errors": the error type of each status.
        Dialect::Messages => match code {
            400 | 422 => "invalid_request_error",
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            408 | 504 => "timeout_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        },
    };
    let mut response = dialect_error(dialect, status, kind, &format!("mock upstream says {code}"));
    let default_wait = match dialect {
        Dialect::ChatCompletions => matches!(code, 429 | 503),
        Dialect::Messages => matches!(code, 429 | 503 | 529),
    };
    let retry_after = retry_after.unwrap_or(if default_wait {
        RetryAfter::Secs(1)
    } else {
        RetryAfter::None
    });
    let headers = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).ok();
    match retry_after {
        RetryAfter::None => {}
        RetryAfter::Secs(s) => {
            if let Some(v) = value(s.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        RetryAfter::Millis(ms) => {
            if let Some(v) = value(ms.to_string()) {
                headers.insert("retry-after-ms", v);
            }
        }
        RetryAfter::DateIn(s) => {
            // The response's own `Date` is sent too (the second it was made, as
            // servers send it), so the date is exactly `s` seconds after it.
            let since = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            if let (Some(date), Some(at)) = (
                value(http_date(now)),
                value(http_date(now + Duration::from_secs(s))),
            ) {
                headers.insert(header::DATE, date);
                headers.insert(header::RETRY_AFTER, at);
            }
        }
    }
    response
}

/// An IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`, rounded up
/// to the next whole second.
fn http_date(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize]
    )
}

/// An error body in `dialect`'s shape.
pub(crate) fn dialect_error(
    dialect: Dialect,
    status: StatusCode,
    kind: &str,
    message: &str,
) -> Response {
    match dialect {
        Dialect::ChatCompletions => error_response(status, kind, message),
        Dialect::Messages => anthropic_error(status, kind, message),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)),
            "Wed, 21 Oct 2015 07:28:00 GMT"
        );
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_001)),
            "Tue, 29 Feb 2000 00:00:01 GMT"
        );
    }
}
