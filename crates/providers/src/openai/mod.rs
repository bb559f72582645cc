//! The `openai` provider: Chat Completions streaming against any OpenAI-compatible
//! base URL (docs/protocol.md §6).
//!
//! One attempt is `POST {base_url}/chat/completions` with `stream: true` and
//! `stream_options.include_usage` (OpenAI API reference, "Create chat completion"), the
//! response read as server-sent events. The same code serves OpenAI, Azure, DeepSeek,
//! OpenRouter, Groq, xAI, vLLM, Ollama…: see `stream` for how their variations of the
//! chunk shape are read and the crate's `http` module for error bodies and
//! `Retry-After`.
//!
//! Failures map onto
//! [`ProviderErrorKind`](genstream_engine::provider::ProviderErrorKind) so the engine's
//! retry layer can decide: a non-2xx answer is `Http` (with `status`, the upstream's
//! message and `retry_after`), no answer is `Connect` (or `Timeout`), a bad chunk is
//! `Malformed`, an error inside the stream is `Upstream`, a stream cut short is
//! `Truncated`, a missing API key is `Config`. The HTTP client is built once per provider, with a 10 s connect timeout
//! and reqwest's own retries turned off, so that an attempt is exactly one request.

mod request;
mod stream;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::provider::{ModelRequest, Provider, ProviderError, ProviderStream};
use reqwest::header::ACCEPT;
use tokio_util::sync::CancellationToken;

use crate::BuildError;
use crate::config::{HttpProviderConfig, OpenAiModelOptions};
use crate::http;

pub use crate::http::CONNECT_TIMEOUT;

/// A Chat Completions upstream serving one model.
#[derive(Clone, Debug)]
pub struct OpenAiProvider {
    name: String,
    endpoint: reqwest::Url,
    api_key_env: Option<String>,
    /// First-byte and idle-gap timeouts, applied to the upstream's bytes.
    timeouts: genstream_engine::retry::Timeouts,
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
        config: &HttpProviderConfig,
        options: OpenAiModelOptions,
    ) -> Result<Self, BuildError> {
        let endpoint = http::endpoint(name, &config.base_url, "chat/completions")?;
        let client = http::client(name, config.timeouts.connect)?;
        Ok(OpenAiProvider {
            name: name.to_owned(),
            endpoint,
            api_key_env: config.api_key_env.clone(),
            timeouts: config.timeouts,
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
}

#[async_trait]
impl Provider for OpenAiProvider {
    /// True: the first-byte and idle-gap timeouts are applied to the upstream's bytes
    /// (see the crate's `sse` module), so pings and SSE comments keep a slow but live
    /// upstream alive.
    fn applies_timeouts(&self) -> bool {
        true
    }

    fn kind(&self) -> &str {
        "openai"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn upstream_model(&self) -> Option<&str> {
        Some(&self.model)
    }

    /// Sends the request and returns the parsed event stream once the upstream answered
    /// 2xx. `Usage` reports `model` = `request.model` (the configured name),
    /// `provider` = this provider's configured name (not `openai`: the upstream may be
    /// DeepSeek, Groq… speaking the same protocol) and
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
        let deadlines =
            crate::deadline::Deadlines::new(tokio::time::Instant::now(), &self.timeouts);
        let key = http::api_key(&self.name, self.api_key_env.as_deref())?;
        let body = request::request_body(&self.model, &request);
        let mut builder = self
            .client
            .post(self.endpoint.clone())
            .header(ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = key {
            builder = builder.bearer_auth(key);
        }
        let Some(response) =
            http::open_stream(&self.name, builder, &cancel, deadlines, http::error_message).await?
        else {
            return Ok(futures::stream::empty().boxed());
        };
        let parser = stream::ChunkParser::new(&self.name, &request.model, request.call_index);
        Ok(crate::sse::event_stream(
            response.bytes_stream(),
            parser,
            cancel,
            deadlines,
        ))
    }
}
