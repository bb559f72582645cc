//! HS256 JWT bearer auth (SPEC §4): `sub` is the user id, `exp` is checked.
//!
//! Every `/api` route takes `Authorization: Bearer <JWT>`; the stream route also takes
//! `?access_token=` because a browser's EventSource cannot set headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;

/// The claims genstream signs and checks.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch. Optional on tokens we verify: SPEC §4
    /// asks only for `sub` and `exp`, and another issuer may leave it out.
    #[serde(default)]
    pub iat: u64,
}

/// The signing and verifying keys derived from one secret.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl JwtKeys {
    /// Keys for `secret` (any string; at least 32 bytes recommended).
    pub fn new(secret: &str) -> Self {
        JwtKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// A token for `user` valid for `ttl`.
    pub fn mint(&self, user: &str, ttl: Duration) -> Result<String, jsonwebtoken::errors::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            sub: user.to_string(),
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// The user id of a valid token.
    ///
    /// Errors: [`ApiError::Unauthorized`] for a bad signature, an expired token or an
    /// empty `sub`.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
        if data.claims.sub.is_empty() {
            return Err(ApiError::Unauthorized("invalid token: empty sub".into()));
        }
        Ok(data.claims.sub)
    }
}

/// A random 256-bit secret as hex, for servers started with none configured.
pub fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Parses a TTL such as `3600`, `90s`, `30m`, `1h`, `7d`.
pub fn parse_ttl(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(mult)?))
}

fn bearer(parts: &Parts) -> Option<Result<&str, ApiError>> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| ApiError::Unauthorized("Authorization must be `Bearer <token>`".into())),
    )
}

/// The authenticated user of an `/api` request (header only).
pub struct AuthUser(pub String);

impl<S> FromRequestParts<S> for AuthUser
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AppState::from_ref(state);
        match bearer(parts) {
            Some(token) => Ok(AuthUser(state.auth.verify(token?)?)),
            None => Err(ApiError::Unauthorized("missing bearer token".into())),
        }
    }
}

/// The authenticated user of the stream route: header, or `?access_token=`.
pub struct StreamUser(pub String);

impl<S> FromRequestParts<S> for StreamUser
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AppState::from_ref(state);
        if let Some(token) = bearer(parts) {
            return Ok(StreamUser(state.auth.verify(token?)?));
        }
        let query = parts.uri.query().unwrap_or("");
        let token = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "access_token")
            .map(|(_, v)| v)
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        Ok(StreamUser(state.auth.verify(token)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_verify_and_reject() {
        let keys = JwtKeys::new("secret-one");
        let t = keys.mint("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(keys.verify(&t).unwrap(), "alice");
        assert!(JwtKeys::new("secret-two").verify(&t).is_err());
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "alice".into(),
                exp: 1,
                iat: 0,
            },
            &EncodingKey::from_secret(b"secret-one"),
        )
        .unwrap();
        assert!(keys.verify(&expired).is_err());
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_ttl("x"), None);
    }
}
