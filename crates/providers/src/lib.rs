//! genstream's upstream model providers (SPEC §6).
//!
//! Each provider implements the engine's [`Provider`] trait: one call of
//! [`Provider::stream`] is one attempt, turned into a stream of
//! [`ProviderEvent`](genstream_engine::provider::ProviderEvent)s. None of them retries:
//! the engine's one retry layer does, using the [`ProviderError`] kind, status and
//! `retry_after` they report (LESSONS "Upstream retries": SDK-internal retries
//! multiplied the attempts).
//!
//! - [`demo`]: built in, no network, deterministic; scripted behaviours for tests.
//! - [`openai`]: Chat Completions streaming against any OpenAI-compatible base URL.
//! - [`anthropic`]: Anthropic Messages API streaming.
//!
//! [`build`] turns the config of one model (its provider name and options) into a
//! provider, checking every key so that a typo fails at startup.
//!
//! [`ProviderError`]: genstream_engine::provider::ProviderError

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use genstream_engine::provider::Provider;

pub mod anthropic;
pub mod config;
mod deadline;
pub mod demo;
mod error_text;
mod http;
pub mod openai;
mod sse;

pub use anthropic::AnthropicProvider;
pub use config::{
    AnthropicModelOptions, DemoBehavior, DemoOptions, OpenAiModelOptions, ProviderConfig,
};
pub use demo::DemoProvider;
pub use openai::OpenAiProvider;

/// The provider name of the built-in demo provider; it needs no `[providers]` entry.
pub const DEMO: &str = "demo";

/// Why a model's provider could not be built from the config.
///
/// Messages name the offending key. [`build`] does not know the model's name, so the
/// caller adds it with [`BuildError::in_model`], giving e.g.
/// ``model `fast`: provider `demo`: invalid options: unknown field `tokenz`, expected one of …``.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The model names a provider that is neither `demo` nor in `[providers]`.
    #[error("unknown provider `{provider}` (configured: {known})")]
    UnknownProvider {
        /// The name the model gave.
        provider: String,
        /// The configured names, comma-separated, `demo` included.
        known: String,
    },
    /// A `[providers.<name>]` entry has a `kind` this build does not support.
    #[error("provider `{provider}`: unknown kind `{kind}` (supported: openai, anthropic)")]
    UnknownKind {
        /// The provider's name.
        provider: String,
        /// The unsupported kind.
        kind: String,
    },
    /// The model's options do not fit its provider's kind (unknown key, wrong type,
    /// missing `model`…); `source` names the key.
    #[error("provider `{provider}`: invalid options: {source}")]
    InvalidOptions {
        /// The provider's name.
        provider: String,
        /// serde's account, naming the key.
        source: serde_json::Error,
    },
    /// The provider's own section is unusable (e.g. `base_url` is not a URL).
    #[error("provider `{provider}`: {message}")]
    InvalidConfig {
        /// The provider's name.
        provider: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// Another error, in the config of model `model`.
    #[error("model `{model}`: {source}")]
    InModel {
        /// The model's configured name.
        model: String,
        /// The underlying error.
        source: Box<BuildError>,
    },
}

impl BuildError {
    /// Wraps this error with the name of the model whose config caused it.
    pub fn in_model(self, model: impl Into<String>) -> BuildError {
        BuildError::InModel {
            model: model.into(),
            source: Box::new(self),
        }
    }
}

/// Builds the provider of one model.
///
/// `provider` is the model's provider name: `"demo"` (built in; `options` parsed as
/// [`DemoOptions`], `null` meaning all defaults) or a key of `providers`, whose `kind`
/// selects the implementation (`"openai"`: `options` parsed as [`OpenAiModelOptions`];
/// `"anthropic"`: as [`AnthropicModelOptions`]). The returned provider is meant to be
/// built once and shared by all jobs of the model (the HTTP ones own their connection
/// pool).
///
/// # Errors
/// [`BuildError`] for an unknown provider or kind, options with an unknown or missing
/// key, or an unusable provider section.
pub fn build(
    provider: &str,
    providers: &BTreeMap<String, ProviderConfig>,
    options: &serde_json::Value,
) -> Result<Arc<dyn Provider>, BuildError> {
    let invalid_options = |source| BuildError::InvalidOptions {
        provider: provider.to_owned(),
        source,
    };
    if provider == DEMO {
        let options: DemoOptions = if options.is_null() {
            DemoOptions::default()
        } else {
            serde_json::from_value(options.clone()).map_err(invalid_options)?
        };
        return Ok(Arc::new(DemoProvider::new(options)));
    }
    let Some(config) = providers.get(provider) else {
        let known: Vec<&str> = std::iter::once(DEMO)
            .chain(providers.keys().map(String::as_str))
            .collect();
        return Err(BuildError::UnknownProvider {
            provider: provider.to_owned(),
            known: known.join(", "),
        });
    };
    match config.kind.as_str() {
        "openai" => {
            let options: OpenAiModelOptions =
                serde_json::from_value(options.clone()).map_err(invalid_options)?;
            Ok(Arc::new(OpenAiProvider::new(provider, config, options)?))
        }
        "anthropic" => {
            let options: AnthropicModelOptions =
                serde_json::from_value(options.clone()).map_err(invalid_options)?;
            Ok(Arc::new(AnthropicProvider::new(provider, config, options)?))
        }
        kind => Err(BuildError::UnknownKind {
            provider: provider.to_owned(),
            kind: kind.to_owned(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn providers() -> BTreeMap<String, ProviderConfig> {
        BTreeMap::from([(
            "local".to_owned(),
            ProviderConfig {
                kind: "openai".into(),
                base_url: "http://127.0.0.1:9/v1/".into(),
                api_key_env: None,
                ..Default::default()
            },
        )])
    }

    fn err(provider: &str, options: serde_json::Value) -> String {
        match build(provider, &providers(), &options) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.in_model("m1").to_string(),
        }
    }

    #[test]
    fn builds_demo_and_openai() {
        assert_eq!(
            build("demo", &BTreeMap::new(), &json!(null))
                .unwrap()
                .kind(),
            "demo"
        );
        assert_eq!(
            build("demo", &BTreeMap::new(), &json!({"tokens": 3}))
                .unwrap()
                .kind(),
            "demo"
        );
        let p = build("local", &providers(), &json!({"model": "gpt-4o"})).unwrap();
        assert_eq!(p.kind(), "openai");
        // Usage records name the configured provider; estimates use the upstream id.
        assert_eq!((p.name(), p.upstream_model()), ("local", Some("gpt-4o")));
    }

    #[test]
    fn errors_name_the_key_and_the_model() {
        let e = err("demo", json!({"tokenz": 3}));
        assert!(e.contains("model `m1`") && e.contains("tokenz"), "{e}");
        let e = err("nope", json!({}));
        assert!(
            e.contains("model `m1`") && e.contains("`nope`") && e.contains("local"),
            "{e}"
        );
        let e = err("local", json!({"model": "x", "temperature": 1}));
        assert!(e.contains("temperature"), "{e}");
        let e = err("local", json!({}));
        assert!(e.contains("model"), "{e}");
        let mut ps = providers();
        ps.insert(
            "claude".into(),
            ProviderConfig {
                kind: "anthropic".into(),
                base_url: "https://api.anthropic.com/v1".into(),
                api_key_env: None,
                ..Default::default()
            },
        );
        assert_eq!(
            build("claude", &ps, &json!({"model": "claude-sonnet-4-5"}))
                .unwrap()
                .kind(),
            "anthropic"
        );
        let e = build("claude", &ps, &json!({"model": "x", "max_token": 5}))
            .err()
            .unwrap()
            .in_model("m2")
            .to_string();
        assert!(e.contains("m2") && e.contains("max_token"), "{e}");
        let e = build(
            "claude",
            &ps,
            &json!({"model": "x", "max_tokens": 2000, "thinking_budget_tokens": 4000}),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("thinking_budget_tokens"), "{e}");
        ps.insert(
            "gemini".into(),
            ProviderConfig {
                kind: "gemini".into(),
                base_url: "https://example.com/v1".into(),
                api_key_env: None,
                ..Default::default()
            },
        );
        let e = build("gemini", &ps, &json!({"model": "x"}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown kind `gemini`"), "{e}");
        ps.insert(
            "bad".into(),
            ProviderConfig {
                kind: "openai".into(),
                base_url: "not a url".into(),
                api_key_env: None,
                ..Default::default()
            },
        );
        let e = build("bad", &ps, &json!({"model": "x"}))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("base_url"), "{e}");
    }
}
