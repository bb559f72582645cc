//! The `openai` provider: Chat Completions streaming against any OpenAI-compatible
//! base URL (SPEC §6).
//!
//! One attempt is `POST {base_url}/chat/completions` with `stream: true` and
//! `stream_options.include_usage` (OpenAI API reference, "Create chat completion"), the
//! response read as server-sent events. The same code serves OpenAI, Azure, DeepSeek,
//! OpenRouter, Groq, xAI, vLLM, Ollama…: see [`stream`] for how their variations of the
//! chunk shape are read and [`http`] for error bodies and `Retry-After`.
//!
//! Failures map onto [`ProviderErrorKind`] so the engine's retry layer can decide:
//! a non-2xx answer is `Http` (with `status`, the upstream's message and `retry_after`),
//! no answer is `Connect` (or `Timeout`), a bad chunk is `Malformed`, an error inside the
//! stream is `Upstream`, a stream cut short is `Truncated`, a missing API key is
//! `Config`. The HTTP client is built once per provider, with a 10 s connect timeout
//! and reqwest's own retries turned off, so that an attempt is exactly one request.

mod http;
mod request;
mod stream;

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderErrorKind, ProviderStream,
};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use tokio_util::sync::CancellationToken;

use crate::BuildError;
use crate::config::{OpenAiModelOptions, ProviderConfig};

/// Time allowed to open a TCP (and TLS) connection to the upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A Chat Completions upstream serving one model.
#[derive(Clone, Debug)]
pub struct OpenAiProvider {
    name: String,
    endpoint: reqwest::Url,
    api_key_env: Option<String>,
    model: String,
    client: reqwest::Client,
}

impl OpenAiProvider {
    /// The provider named `name` (its `[providers]` key, used in error messages),
    /// configured by `config`, serving upstream model `options.model`.
    ///
    /// # Errors
    /// [`BuildError::InvalidConfig`] when `base_url` is not an `http(s)` URL or the HTTP
    /// client cannot be built.
    pub fn new(
        name: &str,
        config: &ProviderConfig,
        options: OpenAiModelOptions,
    ) -> Result<Self, BuildError> {
        let invalid = |message: String| BuildError::InvalidConfig {
            provider: name.to_owned(),
            message,
        };
        let base = config.base_url.trim_end_matches('/');
        let endpoint = reqwest::Url::parse(&format!("{base}/chat/completions"))
            .map_err(|e| invalid(format!("base_url `{}` is not a URL: {e}", config.base_url)))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "base_url `{}` must be an http or https URL",
                config.base_url
            )));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .retry(reqwest::retry::never())
            .user_agent(concat!("genstream/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(OpenAiProvider {
            name: name.to_owned(),
            endpoint,
            api_key_env: config.api_key_env.clone(),
            model: options.model,
            client,
        })
    }

    /// The URL requests go to, `{base_url}/chat/completions`.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The upstream model id sent as `model`.
    pub fn upstream_model(&self) -> &str {
        &self.model
    }

    /// The API key, read now from the variable named by `api_key_env` (so a rotated key
    /// is picked up without a restart); `None` when no variable is configured.
    fn api_key(&self) -> Result<Option<String>, ProviderError> {
        let Some(var) = &self.api_key_env else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_owned())),
            _ => Err(ProviderError::new(
                ProviderErrorKind::Config,
                format!(
                    "{}: environment variable `{var}` (api_key_env) is not set or empty",
                    self.name
                ),
            )),
        }
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> &str {
        "openai"
    }

    /// Sends the request and returns the parsed event stream once the upstream answered
    /// 2xx. `Usage` reports `model` = `request.model` (the configured name) and
    /// `input_includes_cache: true`. If `cancel` fires before the answer, an empty
    /// stream is returned; afterwards the stream ends at once (no further items).
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
        let key = self.api_key()?;
        let body = request::request_body(&self.model, &request);
        let mut builder = self
            .client
            .post(self.endpoint.clone())
            .header(ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = key {
            builder = builder.bearer_auth(key);
        }
        let answer = async {
            let response = builder
                .send()
                .await
                .map_err(|e| http::send_error(&self.name, &e))?;
            if !response.status().is_success() {
                return Err(http::status_error(&self.name, response).await);
            }
            let is_json = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim_start().starts_with("application/json"));
            if is_json {
                // Some servers answer a streaming request with a plain JSON error.
                return Err(self.json_instead_of_stream(response).await);
            }
            Ok(response)
        };
        let response = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(futures::stream::empty().boxed()),
            response = answer => response?,
        };
        let parser = stream::ChunkParser::new(&self.name, &request.model, request.call_index);
        Ok(stream::event_stream(
            response.bytes_stream(),
            parser,
            cancel,
        ))
    }
}

impl OpenAiProvider {
    /// The error for a 2xx answer with a JSON body where an event stream was expected.
    async fn json_instead_of_stream(&self, response: reqwest::Response) -> ProviderError {
        let body = response.bytes().await.unwrap_or_default();
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .filter(|v| v.get("error").is_some_and(|e| !e.is_null()))
            .and_then(|v| http::error_message(&v));
        match error {
            Some(message) => ProviderError::new(
                ProviderErrorKind::Upstream,
                format!("{}: upstream reported an error: {message}", self.name),
            ),
            None => ProviderError::new(
                ProviderErrorKind::Malformed,
                format!(
                    "{}: upstream answered JSON, not an event stream: {}",
                    self.name,
                    http::truncate(String::from_utf8_lossy(&body).trim(), 200)
                ),
            ),
        }
    }
}
