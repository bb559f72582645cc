//! Job-finished webhooks: when a job ends, a signed JSON POST to the URL its start
//! named (`webhookUrl` on `POST /api/chat` and `/api/ai/chat`, `webhook_url` on the
//! `/v1` create routes; [`Webhooks::requested`]), else its user's configured one
//! (`[webhooks.users]`), else the global `webhooks.url`.
//!
//! - Sent once per job, by the replica that ended it: this is the engine's
//!   [`EndHook`], which the engine calls only from the holder of the job's end claim
//!   (its owner, or the reaper that ended it), after the terminal event is in the log.
//! - Never delays the job's end: [`EndHook::job_ended`] spawns the delivery.
//! - Body `{streamId, conversationId, status, endReason, responseMessageId, usage}`
//!   (names of docs/protocol.md §2's `final` and `error`), signed with header
//!   `genstream-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
//!   under `webhooks.secret` (as Stripe signs; docs/operations.md "Webhooks").
//! - Retried with backoff on connection errors, 5xx and 429 for up to
//!   `webhooks.retry_for` (default 10 minutes).
//! - Only `http(s)` URLs; loopback, private and link-local addresses are refused at
//!   request time (literal hosts and `localhost`) and again on the resolved address at
//!   delivery, unless `webhooks.allow_private`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use genstream_engine::event::{EventBody, FinalStatus};
use genstream_engine::manager::EndHook;
use genstream_engine::store::JobMeta;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "genstream-signature";

/// `[webhooks]`. Off (nothing sent, `webhookUrl` refused) unless a secret is set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Default receiver of every job's webhook. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Per-user receivers, `alice = "https://…"`, over `url`.
    pub users: BTreeMap<String, String>,
    /// The HMAC-SHA256 signing secret. Or `secret_env`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Name of the environment variable holding the secret, read at each delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// How long a failing delivery is retried (connection errors, 5xx, 429). Default
    /// `"10m"`.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
    /// Timeout of one delivery attempt. Default `"10s"`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Allow loopback, private and link-local receivers. Default false.
    pub allow_private: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: None,
            users: BTreeMap::new(),
            secret: None,
            secret_env: None,
            retry_for: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            allow_private: false,
        }
    }
}

impl WebhooksConfig {
    /// Whether a secret is configured (webhooks are on).
    pub fn enabled(&self) -> bool {
        self.secret.is_some() || self.secret_env.is_some()
    }

    /// Checks the section: `timeout` 1ms – 1h, `retry_for` at most 1 day, every
    /// configured URL valid ([`check_url`]), a secret when any is set.
    pub fn validate(&self) -> Result<(), String> {
        if self.secret.is_some() && self.secret_env.is_some() {
            return Err("webhooks: set secret or secret_env, not both".into());
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err("webhooks.timeout must be between 1ms and 1h".into());
        }
        if self.retry_for > Duration::from_secs(86_400) {
            return Err("webhooks.retry_for must be at most 1day".into());
        }
        let urls = self.url.iter().chain(self.users.values());
        for u in urls {
            if !self.enabled() {
                return Err("webhooks: a url is set but no secret or secret_env".into());
            }
            check_url(u, self.allow_private).map_err(|e| format!("webhooks: {u:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Whether `ip` is one a webhook may not reach without `allow_private`: loopback,
/// private (RFC 1918, fc00::/7), link-local, CGNAT, unspecified, broadcast.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// Checks a receiver URL without resolving it: `http` or `https`, a host, and (unless
/// `allow_private`) not `localhost` nor a literal private address ([`is_private`]).
///
/// Errors: what is wrong, for a 400 naming `webhookUrl`.
pub fn check_url(url: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("only http and https URLs are allowed".into());
    }
    let refused = match parsed.host() {
        None => return Err("the URL has no host".into()),
        Some(url::Host::Ipv4(a)) => is_private(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => is_private(IpAddr::V6(a)),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
    };
    if refused && !allow_private {
        return Err("loopback, private and link-local addresses are not allowed".into());
    }
    Ok(parsed)
}

/// The webhook client: the engine's [`EndHook`].
pub struct Webhooks {
    config: WebhooksConfig,
    client: reqwest::Client,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("enabled", &self.config.enabled())
            .finish()
    }
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks::new(WebhooksConfig::default())
    }
}

impl Webhooks {
    /// A client for `config` (validated by [`WebhooksConfig::validate`]). Redirects are
    /// not followed (one could lead to a refused address); names resolve through
    /// [`PublicResolver`] unless `allow_private`.
    pub fn new(config: WebhooksConfig) -> Self {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if !config.allow_private {
            builder = builder.dns_resolver(Arc::new(PublicResolver));
        }
        let client = builder.build().unwrap_or_else(|e| {
            tracing::error!(error = %e, "webhook client; using the default one");
            reqwest::Client::new()
        });
        Webhooks { config, client }
    }

    /// Checks a request's `webhookUrl`: webhooks configured, and [`check_url`].
    ///
    /// Errors: the reason, for a 400 naming `webhookUrl`.
    pub fn check_request_url(&self, url: &str) -> Result<(), String> {
        if !self.config.enabled() {
            return Err("webhooks are not configured on this server".into());
        }
        check_url(url, self.config.allow_private).map(|_| ())
    }

    /// A request's webhook URL (the body field `field`: `webhookUrl` on `/api`,
    /// `webhook_url` on `/v1`), checked: `BadRequest` naming `field` when webhooks are
    /// off or the URL is not one genstream may call ([`Webhooks::check_request_url`]).
    pub fn requested(
        &self,
        field: &str,
        url: Option<String>,
    ) -> Result<Option<String>, genstream_engine::EngineError> {
        if let Some(u) = &url {
            self.check_request_url(u)
                .map_err(|e| genstream_engine::EngineError::bad_request(field, e))?;
        }
        Ok(url)
    }

    /// Where `meta`'s webhook goes, if anywhere.
    fn target(&self, meta: &JobMeta) -> Option<String> {
        if !self.config.enabled() {
            return None;
        }
        meta.webhook_url
            .clone()
            .or_else(|| self.config.users.get(&meta.user_id).cloned())
            .or_else(|| self.config.url.clone())
    }

    /// The secret, from `secret` or the `secret_env` variable (read now).
    fn secret(&self) -> Option<String> {
        if let Some(s) = &self.config.secret {
            return Some(s.clone());
        }
        let var = self.config.secret_env.as_deref()?;
        std::env::var(var)
            .inspect_err(|e| tracing::error!(var, error = %e, "webhook secret unset"))
            .ok()
    }

    /// Delivers `body` to `url`, retrying as the module docs say; logs the outcome.
    async fn deliver(&self, stream_id: String, url: String, body: Vec<u8>) {
        use backon::Retryable;
        let Some(secret) = self.secret() else { return };
        let attempt = || async {
            // Re-checked now (a config reload could not change it, but a literal host
            // bypasses the resolver).
            let parsed = check_url(&url, self.config.allow_private).map_err(Failure::Refused)?;
            let header = signature_header(&secret, unix_now(), &body);
            let resp = self
                .client
                .post(parsed)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, header)
                .body(body.clone())
                .send()
                .await
                .map_err(Failure::Connect)?;
            let status = resp.status();
            if status.is_success() {
                Ok(())
            } else if status.is_server_error() || status.as_u16() == 429 {
                Err(Failure::Retryable(status))
            } else {
                Err(Failure::Final(status))
            }
        };
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(60))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(self.config.retry_for));
        let sent = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(Failure::is_retryable)
            .notify(|e, wait| {
                tracing::warn!(stream_id, error = %e, ?wait, "webhook failed; retrying");
            })
            .await;
        match sent {
            Ok(()) => tracing::info!(stream_id, "webhook delivered"),
            Err(e) => tracing::error!(stream_id, error = %e, "webhook not delivered"),
        }
    }
}

impl EndHook for Webhooks {
    fn job_ended(&self, meta: &JobMeta, end: &EventBody) {
        let Some(url) = self.target(meta) else { return };
        let body = payload(meta, end).to_string().into_bytes();
        let this = Webhooks {
            config: self.config.clone(),
            client: self.client.clone(),
        };
        let stream_id = meta.stream_id.clone();
        tokio::spawn(async move { this.deliver(stream_id, url, body).await });
    }
}

/// The webhook's JSON body for a job `meta` that ended with `end`: `status` `complete`,
/// `aborted` or `error`; `endReason` = `final.reason` or `error.code` (null for a plain
/// completion); `usage` = `final.usage` (null for an `error`); `responseMessageId`
/// null when no answer was saved.
pub fn payload(meta: &JobMeta, end: &EventBody) -> Value {
    let (status, reason, usage, saved) = match end {
        EventBody::Final(f) => (
            match f.status {
                FinalStatus::Complete => "complete",
                FinalStatus::Aborted => "aborted",
            },
            f.reason.clone(),
            serde_json::to_value(&f.usage).unwrap_or(Value::Null),
            true,
        ),
        EventBody::Error(e) => (
            "error",
            Some(e.code.clone()),
            Value::Null,
            e.response_message.is_some(),
        ),
        _ => ("error", None, Value::Null, false),
    };
    json!({
        "streamId": meta.stream_id,
        "conversationId": meta.conversation_id,
        "status": status,
        "endReason": reason,
        "responseMessageId": saved.then(|| meta.response_message_id.clone()),
        "usage": usage,
    })
}

/// `t=<t>,v1=<hex HMAC-SHA256 of "<t>.<body>" under secret>`.
pub fn signature_header(secret: &str, t: u64, body: &[u8]) -> String {
    format!("t={t},v1={}", sign(secret, t, body))
}

/// Hex HMAC-SHA256 of `"<t>.<body>"` under `secret`.
pub fn sign(secret: &str, t: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("refused receiver: {0}")]
    Refused(String),
    #[error("request failed: {0}")]
    Connect(#[source] reqwest::Error),
    #[error("receiver answered {0}")]
    Retryable(reqwest::StatusCode),
    #[error("receiver answered {0}; not retried")]
    Final(reqwest::StatusCode),
}

impl Failure {
    fn is_retryable(&self) -> bool {
        match self {
            Failure::Connect(e) => !is_refused_address(e),
            Failure::Retryable(_) => true,
            Failure::Refused(_) | Failure::Final(_) => false,
        }
    }
}

/// Whether a request failed because [`PublicResolver`] refused the address.
fn is_refused_address(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.to_string().contains(REFUSED) {
            return true;
        }
        source = s.source();
    }
    false
}

const REFUSED: &str = "resolves to a loopback, private or link-local address";

/// Resolves names with the system resolver and refuses any that resolves to an
/// address [`is_private`] (so a public name cannot point a webhook inside).
pub struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.iter().any(|a| is_private(a.ip())) {
                return Err(format!("{host} {REFUSED}").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("https://example.com/hook", false).is_ok());
        for bad in [
            "ftp://example.com/",
            "http://127.0.0.1:9/",
            "http://localhost/",
            "http://10.1.2.3/",
            "http://169.254.169.254/",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "not a url",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_url("http://127.0.0.1:9/", true).is_ok());
    }

    #[test]
    fn config_needs_a_secret_and_public_urls() {
        let mut c = WebhooksConfig {
            url: Some("https://example.com/hook".into()),
            ..WebhooksConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("secret"));
        c.secret_env = Some("HOOK_SECRET".into());
        assert!(c.validate().is_ok());
        c.users
            .insert("alice".into(), "http://127.0.0.1/hook".into());
        assert!(c.validate().is_err());
        c.allow_private = true;
        assert!(c.validate().is_ok());
        c.secret = Some("s".into());
        assert!(c.validate().is_err(), "secret and secret_env both");
    }

    #[test]
    fn signature_is_stripe_style() {
        // echo -n '1700000000.{}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature_header("secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(sign("secret", 1, b"{}"), sign("secret", 2, b"{}"));
    }
}
