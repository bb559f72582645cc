//! genstream's upstream model providers (docs/protocol.md §6).
//!
//! Each provider implements the engine's [`Provider`] trait: one call of
//! [`Provider::stream`] is one attempt, turned into a stream of
//! [`ProviderEvent`](genstream_engine::provider::ProviderEvent)s. None of them retries:
//! the engine's one retry layer does, using the [`ProviderError`] kind, status and
//! `retry_after` they report (docs/lessons.md, "Upstream retries": SDK-internal retries
//! multiplied the attempts).
//!
//! - [`demo`]: built in, no network, deterministic; scripted behaviours for tests.
//! - [`openai`]: Chat Completions streaming against any OpenAI-compatible base URL.
//! - [`anthropic`]: Anthropic Messages API streaming.
//!
//! [`build`] turns the config of one model (its provider's name, the `[providers]`
//! sections and its typed options) into a provider. The shapes of those sections and
//! options, and the checks of their values, are in [`config`].
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
    AnthropicModelOptions, DemoBehavior, DemoOptions, HttpProviderConfig, InvalidValue,
    ModelOptions, OpenAiModelOptions, ProviderConfig, ProviderKind,
};
pub use demo::DemoProvider;
pub use openai::OpenAiProvider;

/// The provider name of the built-in demo provider; it needs no `[providers]` entry.
pub const DEMO: &str = "demo";

/// Why a model's provider could not be built.
///
/// Messages name the offending key. [`build`] does not know the model's name, so the
/// caller adds it with [`BuildError::in_model`], giving e.g.
/// ``model `fast`: unknown provider `opnai` (configured: demo, openai)``.
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
    /// The options are of another kind than the provider (only Rust code can build
    /// such a pair: the config reads options as the provider's kind says).
    #[error("provider `{provider}` is of kind {kind}, but the options are for {options}")]
    OptionsKind {
        /// The provider's name.
        provider: String,
        /// The provider's kind.
        kind: ProviderKind,
        /// The kind the options are for.
        options: ProviderKind,
    },
    /// A value of the model's options or of the provider's section is not allowed;
    /// `source` names the key.
    #[error("provider `{provider}`: {source}")]
    InvalidValue {
        /// The provider's name.
        provider: String,
        /// The key and what is wrong with it.
        source: InvalidValue,
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

/// The kind of the provider named `provider`: [`ProviderKind::Demo`] for `"demo"`,
/// else the kind of its `[providers.NAME]` section. The config uses it to choose the
/// shape of a model's options ([`ModelOptions::deserialize_for`]).
///
/// # Errors
/// [`BuildError::UnknownProvider`], listing the configured names.
pub fn kind_of(
    provider: &str,
    providers: &BTreeMap<String, ProviderConfig>,
) -> Result<ProviderKind, BuildError> {
    if provider == DEMO {
        return Ok(ProviderKind::Demo);
    }
    match providers.get(provider) {
        Some(config) => Ok(config.kind()),
        None => {
            let known: Vec<&str> = std::iter::once(DEMO)
                .chain(providers.keys().map(String::as_str))
                .collect();
            Err(BuildError::UnknownProvider {
                provider: provider.to_owned(),
                known: known.join(", "),
            })
        }
    }
}

/// Builds the provider of one model.
///
/// `provider` is the model's provider name: `"demo"` (built in) or a key of
/// `providers`. `options` must be of that provider's kind. The section and the options
/// are checked again here ([`ProviderConfig::validate`], [`ModelOptions::validate`]),
/// so a config built in code gets the same refusals as one read from a file. The
/// returned provider is meant to be built once and shared by all jobs of the model
/// (the HTTP ones own their connection pool).
///
/// # Errors
/// [`BuildError`] for an unknown provider, options of another kind, a value out of
/// range, or an unusable provider section.
pub fn build(
    provider: &str,
    providers: &BTreeMap<String, ProviderConfig>,
    options: &ModelOptions,
) -> Result<Arc<dyn Provider>, BuildError> {
    let kind = kind_of(provider, providers)?;
    let invalid = |source| BuildError::InvalidValue {
        provider: provider.to_owned(),
        source,
    };
    options
        .validate()
        .map_err(|e| invalid(e.under("options")))?;
    let section = providers
        .get(provider)
        .filter(|_| kind != ProviderKind::Demo);
    if let Some(section) = section {
        section.validate().map_err(invalid)?;
    }
    match (section, options) {
        (None, ModelOptions::Demo(o)) => Ok(Arc::new(DemoProvider::new(o.clone()))),
        (Some(ProviderConfig::OpenAi(c)), ModelOptions::OpenAi(o)) => {
            Ok(Arc::new(OpenAiProvider::new(provider, c, o.clone())?))
        }
        (Some(ProviderConfig::Anthropic(c)), ModelOptions::Anthropic(o)) => {
            Ok(Arc::new(AnthropicProvider::new(provider, c, o.clone())?))
        }
        _ => Err(BuildError::OptionsKind {
            provider: provider.to_owned(),
            kind,
            options: options.kind(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn section(kind: &str, base_url: &str) -> ProviderConfig {
        serde_json::from_value(json!({"kind": kind, "base_url": base_url})).unwrap()
    }

    fn providers() -> BTreeMap<String, ProviderConfig> {
        BTreeMap::from([(
            "local".to_owned(),
            section("openai", "http://127.0.0.1:9/v1/"),
        )])
    }

    fn openai(model: &str) -> ModelOptions {
        ModelOptions::OpenAi(OpenAiModelOptions {
            model: model.into(),
        })
    }

    fn err(provider: &str, ps: &BTreeMap<String, ProviderConfig>, o: &ModelOptions) -> String {
        match build(provider, ps, o) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.in_model("m1").to_string(),
        }
    }

    #[test]
    fn builds_demo_openai_and_anthropic() {
        let p = build("demo", &BTreeMap::new(), &ModelOptions::default()).unwrap();
        assert_eq!((p.kind(), p.name()), ("demo", "demo"));
        let p = build("local", &providers(), &openai("gpt-4o")).unwrap();
        assert_eq!(p.kind(), "openai");
        // Usage records name the configured provider; estimates use the upstream id.
        assert_eq!((p.name(), p.upstream_model()), ("local", Some("gpt-4o")));
        let mut ps = providers();
        ps.insert(
            "claude".into(),
            section("anthropic", "https://api.anthropic.com/v1"),
        );
        let o = ModelOptions::deserialize_for(
            kind_of("claude", &ps).unwrap(),
            json!({"model": "claude-sonnet-4-5"}),
        )
        .unwrap();
        assert_eq!(build("claude", &ps, &o).unwrap().kind(), "anthropic");
    }

    #[test]
    fn errors_name_the_key_and_the_model() {
        let ps = providers();
        let e = err("nope", &ps, &openai("x"));
        assert!(
            e.contains("model `m1`") && e.contains("`nope`") && e.contains("local"),
            "{e}"
        );
        let e = err("local", &ps, &ModelOptions::default());
        assert!(e.contains("kind openai") && e.contains("for demo"), "{e}");
        let e = err(
            "demo",
            &ps,
            &ModelOptions::Demo(DemoOptions {
                first_token_delay: std::time::Duration::from_secs(4000),
                ..DemoOptions::default()
            }),
        );
        assert!(e.contains("`options.first_token_delay`"), "{e}");
        let mut ps = providers();
        ps.insert(
            "claude".into(),
            section("anthropic", "https://api.anthropic.com/v1"),
        );
        let thinking = ModelOptions::Anthropic(AnthropicModelOptions {
            model: "x".into(),
            max_tokens: 2000,
            thinking_budget_tokens: Some(4000),
        });
        let e = err("claude", &ps, &thinking);
        assert!(e.contains("`options.thinking_budget_tokens`"), "{e}");
        ps.insert("bad".into(), section("openai", "not a url"));
        let e = err("bad", &ps, &openai("x"));
        assert!(e.contains("base_url"), "{e}");
    }
}
