//! The `Idempotency-Key` request header of the four start routes (`POST /api/chat`,
//! `POST /api/ai/chat`, `POST /v1/responses`, `POST /v1/chat/completions`): read here
//! and handed to the engine as [`Idempotency`], which does the rest (`JobManager::start`).
//!
//! The request hash is a SHA-256 of the route and the canonical JSON of the body as
//! the route read it (object keys sorted, no whitespace), so a repeat that differs
//! only in key order or spacing is the same request, and the same key on another
//! route is a different one.

use axum::http::HeaderMap;
use genstream_engine::EngineError;
use genstream_engine::manager::Idempotency;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Longest key accepted, in bytes (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;

/// The request's [`Idempotency`] if it sent an `Idempotency-Key`; `route` names the
/// route in the hash (`/api/chat`, …).
///
/// Errors: `BadRequest` naming `Idempotency-Key` for an empty key, one longer than
/// [`MAX_KEY_LEN`] bytes or one that is not visible ASCII, and for a repeated header.
pub fn from_headers(
    headers: &HeaderMap,
    route: &str,
    body: &impl Serialize,
) -> Result<Option<Idempotency>, EngineError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |m: &str| EngineError::bad_request("Idempotency-Key", m);
    if values.next().is_some() {
        return Err(bad("must be sent once"));
    }
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| bad("must be 1-255 visible ASCII characters"))?;
    let canonical = serde_json::to_vec(body)
        .map_err(|e| EngineError::internal("canonicalize the request body", e))?;
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update(b"\n");
    h.update(&canonical);
    Ok(Some(Idempotency {
        key: key.to_string(),
        request_hash: format!("{:x}", h.finalize()),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn headers(keys: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for k in keys {
            h.append(IDEMPOTENCY_KEY_HEADER, k.parse().unwrap());
        }
        h
    }

    #[test]
    fn same_body_in_any_key_order_is_the_same_request() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":[1,2]}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{ "b": [1,2], "a": 1 }"#).unwrap();
        let ia = from_headers(&headers(&["k"]), "/api/chat", &a)
            .unwrap()
            .unwrap();
        let ib = from_headers(&headers(&["k"]), "/api/chat", &b)
            .unwrap()
            .unwrap();
        assert_eq!(ia, ib);
        let other_route = from_headers(&headers(&["k"]), "/v1/responses", &a)
            .unwrap()
            .unwrap();
        assert_ne!(ia.request_hash, other_route.request_hash);
        let other_body = from_headers(&headers(&["k"]), "/api/chat", &json!({"a": 2}))
            .unwrap()
            .unwrap();
        assert_ne!(ia.request_hash, other_body.request_hash);
    }

    #[test]
    fn no_header_is_none_and_bad_keys_are_400s() {
        assert_eq!(
            from_headers(&HeaderMap::new(), "/r", &json!({})).unwrap(),
            None
        );
        for bad in [
            headers(&[""]),
            headers(&[&"x".repeat(256)]),
            headers(&["a", "b"]),
            headers(&["a b"]),
        ] {
            let e = from_headers(&bad, "/r", &json!({})).unwrap_err();
            assert!(
                matches!(&e, EngineError::BadRequest { field, .. } if field == "Idempotency-Key"),
                "{e:?}"
            );
        }
    }
}
