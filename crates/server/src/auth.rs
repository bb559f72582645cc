//! Bearer auth: HS256 JWTs (docs/protocol.md §4: `sub` is the user id, `exp` is checked) and API
//! keys.
//!
//! Every `/api` route takes `Authorization: Bearer <token>`; the stream route also
//! takes `?access_token=` because a browser's EventSource cannot set headers. A token
//! is a JWT or an API key (`gsk_` and 64 hex digits, what the OpenAI SDKs send as
//! their `api_key`). A key is 32 bytes from the operating system's random source; the
//! database keeps only its SHA-256 (the key has 256 bits of entropy, so a fast
//! unsalted hash leaves nothing to guess) and a short prefix to list it by. Every
//! request looks its key up in the database — no cache — so a revoked key is refused
//! at once by every replica that shares the database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use genstream_engine::EngineError;
use genstream_engine::persist::ApiKey;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;

/// What every API key starts with.
pub const API_KEY_PREFIX: &str = "gsk_";
/// Random bytes in a key (64 hex digits after the prefix).
const API_KEY_BYTES: usize = 32;
/// Characters of a key kept to list it by: the prefix and 8 hex digits (32 bits).
const VISIBLE_CHARS: usize = API_KEY_PREFIX.len() + 8;

/// A key just made: the key, to print once, and its row, to store.
pub struct NewApiKey {
    /// `gsk_` and 64 lowercase hex digits.
    pub key: String,
    /// The row: id, owner, label, visible prefix, hash, `created_at` = `now`.
    pub row: ApiKey,
}

/// Makes an API key for `user_id`, labelled `name`, created at `now` (RFC 3339).
///
/// Errors: [`ApiError`] (internal) if the operating system's random source fails.
pub fn new_api_key(user_id: &str, name: Option<&str>, now: &str) -> Result<NewApiKey, ApiError> {
    use rand::TryRngCore;
    let mut bytes = [0u8; API_KEY_BYTES];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| {
        ApiError::Engine(EngineError::Internal(
            format!("no randomness for an API key: {e}").into(),
        ))
    })?;
    let key = format!("{API_KEY_PREFIX}{}", hex(&bytes));
    let row = ApiKey {
        id: genstream_engine::new_id(),
        user_id: user_id.to_string(),
        name: name.map(str::to_string),
        prefix: key[..VISIBLE_CHARS].to_string(),
        hash: hash_api_key(&key),
        created_at: now.to_string(),
        last_used_at: None,
        revoked_at: None,
    };
    Ok(NewApiKey { key, row })
}

/// SHA-256 of a key, lowercase hex: what the database keeps and looks keys up by.
pub fn hash_api_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Whether `token` has the shape of an API key (`gsk_` and 64 lowercase hex digits).
fn is_api_key(token: &str) -> bool {
    token.strip_prefix(API_KEY_PREFIX).is_some_and(|rest| {
        rest.len() == API_KEY_BYTES * 2
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The user a bearer token authenticates: an API key (looked up in the database on
/// every call) or a JWT.
///
/// Errors: [`ApiError::Unauthorized`] for a malformed, unknown or revoked key and for
/// an invalid JWT; [`ApiError::Engine`] (503) when the database cannot be asked.
pub async fn authenticate(state: &AppState, token: &str) -> Result<String, ApiError> {
    if !token.starts_with(API_KEY_PREFIX) {
        return state.auth.verify(token);
    }
    if !is_api_key(token) {
        return Err(ApiError::Unauthorized("malformed API key".into()));
    }
    let user = state
        .manager
        .authenticate_api_key(&hash_api_key(token), &genstream_engine::now_rfc3339())
        .await?;
    user.ok_or_else(|| ApiError::Unauthorized("unknown or revoked API key".into()))
}

/// The claims genstream signs and checks.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch. Optional on tokens we verify: docs/protocol.md §4
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

pub(crate) fn bearer(parts: &Parts) -> Option<Result<&str, ApiError>> {
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
            Some(token) => Ok(AuthUser(authenticate(&state, token?).await?)),
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
            return Ok(StreamUser(authenticate(&state, token?).await?));
        }
        let query = parts.uri.query().unwrap_or("");
        let token = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "access_token")
            .map(|(_, v)| v)
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        Ok(StreamUser(authenticate(&state, token).await?))
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
    fn api_keys_are_random_hex_and_stored_as_their_hash() {
        let a = new_api_key("alice", Some("laptop"), "2025-01-01T00:00:00.000Z").unwrap();
        let b = new_api_key("alice", None, "2025-01-01T00:00:00.000Z").unwrap();
        assert_ne!(a.key, b.key);
        assert_ne!(a.row.id, b.row.id);
        for k in [&a, &b] {
            assert!(is_api_key(&k.key), "{}", k.key);
            assert_eq!(k.key.len(), 4 + 64);
            assert!(k.key.starts_with(&k.row.prefix));
            assert_eq!(k.row.prefix.len(), 12);
            assert_eq!(k.row.hash, hash_api_key(&k.key));
            assert!(!k.row.hash.contains(&k.key[4..]));
        }
        assert_eq!(a.row.name.as_deref(), Some("laptop"));
        // SHA-256 test vector (FIPS 180-2, "abc").
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!is_api_key("gsk_"));
        assert!(!is_api_key(&format!("gsk_{}", "A".repeat(64))));
        assert!(!is_api_key(&format!("gsk_{}", "a".repeat(63))));
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_ttl("x"), None);
    }
}
