//! The `anthropic` provider: Anthropic Messages API streaming (docs/protocol.md §6).
//!
//! One attempt is `POST {base_url}/messages` with `stream: true` (Anthropic API docs,
//! "Messages" and "Streaming Messages"), authenticated by an `x-api-key` header and
//! pinned to API version [`ANTHROPIC_VERSION`] by the `anthropic-version` header. The
//! response is read as server-sent events: see `stream` for how the named events
//! (`message_start`, `content_block_*`, `message_delta`, `message_stop`, `ping`,
//! `error`) become provider events, and `request` for how genstream's history maps onto
//! Anthropic's content blocks (`tool_use` / `tool_result`).
//!
//! Failures map onto [`ProviderErrorKind`](genstream_engine::provider::ProviderErrorKind)
//! exactly as for the `openai` provider, so the engine's one retry layer decides: a
//! non-2xx answer is `Http` (with `status`, `retry_after`, and Anthropic's
//! `error.type: error.message` quoted — e.g. 529 `overloaded_error: Overloaded`), no
//! answer is `Connect` (or `Timeout`), a bad event is `Malformed`, an `error` event
//! inside the stream is `Upstream` (quoting its `error.type`, which the retry layer
//! reads), a stream without `message_stop` is `Truncated`, a missing API key is
//! `Config`. The HTTP client is built once per provider, with a 10 s connect timeout
//! and reqwest's own retries turned off, so that an attempt is exactly one request.

mod request;
mod stream;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::provider::{ModelRequest, Provider, ProviderError, ProviderStream};
use reqwest::header::ACCEPT;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::BuildError;
use crate::config::{AnthropicModelOptions, HttpProviderConfig};
use crate::http;

pub use crate::http::CONNECT_TIMEOUT;

/// The `anthropic-version` header sent with every request (Anthropic API docs,
/// "Versions": the current and only stable version of the Messages API).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// A Messages API upstream serving one model.
#[derive(Clone, Debug)]
pub struct AnthropicProvider {
    name: String,
    endpoint: reqwest::Url,
    api_key_env: Option<String>,
    /// First-byte and idle-gap timeouts, applied to the upstream's bytes.
    timeouts: genstream_engine::retry::Timeouts,
    options: AnthropicModelOptions,
    client: reqwest::Client,
}

impl AnthropicProvider {
    /// The provider named `name` (its `[providers]` key, used in error messages),
    /// configured by `config`, serving upstream model `options.model`.
    ///
    /// # Errors
    /// [`BuildError::InvalidValue`] when the options fail
    /// [`AnthropicModelOptions::validate`]; [`BuildError::InvalidConfig`] when
    /// `base_url` is not an `http(s)` URL or the HTTP client cannot be built.
    pub fn new(
        name: &str,
        config: &HttpProviderConfig,
        options: AnthropicModelOptions,
    ) -> Result<Self, BuildError> {
        options.validate().map_err(|e| BuildError::InvalidValue {
            provider: name.to_owned(),
            source: e.under("options"),
        })?;
        let endpoint = http::endpoint(name, &config.base_url, "messages")?;
        let client = http::client(name, config.timeouts.connect)?;
        Ok(AnthropicProvider {
            name: name.to_owned(),
            endpoint,
            api_key_env: config.api_key_env.clone(),
            timeouts: config.timeouts,
            options,
            client,
        })
    }

    /// The URL requests go to, `{base_url}/messages`.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The upstream model id sent as `model`.
    pub fn upstream_model(&self) -> &str {
        &self.options.model
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    /// True: the first-byte and idle-gap timeouts are applied to the upstream's bytes
    /// (see the crate's `sse` module), so pings and SSE comments keep a slow but live
    /// upstream alive.
    fn applies_timeouts(&self) -> bool {
        true
    }

    fn kind(&self) -> &str {
        "anthropic"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn upstream_model(&self) -> Option<&str> {
        Some(&self.options.model)
    }

    /// Sends the request and returns the parsed event stream once the upstream answered
    /// 2xx. `Usage` reports `model` = `request.model` (the configured name),
    /// `provider` = this provider's configured name and `input_includes_cache: false` (Anthropic's
    /// `input_tokens` exclude cache reads and writes). If `cancel` fires before the
    /// answer, an empty stream is returned; afterwards the stream ends at once (no
    /// further items).
    ///
    /// # Errors
    /// `Config` (API key variable unset), `Connect`/`Timeout` (no answer), `Http`
    /// (non-2xx, with status, message and `retry_after`), `Upstream` (a 2xx JSON error
    /// body), `Malformed` (a 2xx JSON body that is not an error).
    async fn stream(
        &self,
        request: ModelRequest,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let deadlines =
            crate::deadline::Deadlines::new(tokio::time::Instant::now(), &self.timeouts);
        let key = http::api_key(&self.name, self.api_key_env.as_deref())?;
        let body = request::request_body(&self.options, &request);
        let mut builder = self
            .client
            .post(self.endpoint.clone())
            .header(ACCEPT, "text/event-stream")
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body);
        if let Some(key) = key {
            builder = builder.header("x-api-key", key);
        }
        let Some(response) =
            http::open_stream(&self.name, builder, &cancel, deadlines, error_detail).await?
        else {
            return Ok(futures::stream::empty().boxed());
        };
        let parser = stream::EventParser::new(&self.name, &request.model, request.call_index);
        Ok(crate::sse::event_stream(
            response.bytes_stream(),
            parser,
            cancel,
            deadlines,
        ))
    }
}

/// The message of an Anthropic error value, `{"type": "error", "error": {"type",
/// "message"}, "request_id"}` (Anthropic API docs, "Errors"; the same shape as the
/// streaming `error` event), as `<error.type>: <error.message> (request_id <id>)`.
/// Other shapes are read as [`http::error_message`] reads them.
pub(crate) fn error_detail(value: &Value) -> Option<String> {
    let error = value.get("error");
    let kind = error
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let message = error.and_then(|e| e.get("message")).and_then(Value::as_str);
    let mut text = match (kind, message) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        (Some(kind), None) => kind.to_owned(),
        (None, _) => return http::error_message(value),
    };
    if let Some(id) = value
        .get("request_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        text.push_str(&format!(" (request_id {id})"));
    }
    Some(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quotes_anthropic_errors() {
        assert_eq!(
            error_detail(
                &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            ),
            Some("overloaded_error: Overloaded".into())
        );
        assert_eq!(
            error_detail(
                &json!({"type": "error", "error": {"details": null, "type": "overloaded_error",
                "message": "Overloaded"}, "request_id": "req_011"})
            ),
            Some("overloaded_error: Overloaded (request_id req_011)".into())
        );
        assert_eq!(
            error_detail(&json!({"error": {"type": "api_error"}})),
            Some("api_error".into())
        );
        // A proxy's OpenAI-style or plain body.
        assert_eq!(
            error_detail(&json!({"error": {"message": "nope"}})),
            Some("nope".into())
        );
        assert_eq!(error_detail(&json!({"message": "m"})), Some("m".into()));
        assert_eq!(error_detail(&json!({"type": "error"})), None);
    }
}
