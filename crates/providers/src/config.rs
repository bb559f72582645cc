//! Configuration shapes of providers and of the models that use them.
//!
//! A *provider* section says where an upstream is (`[providers.<name>]`: `kind`,
//! `base_url`, `api_key_env`); a *model* names a provider and carries options whose
//! shape depends on the provider's kind ([`DemoOptions`] for the built-in `demo`,
//! [`OpenAiModelOptions`] for `openai`). Every shape rejects unknown keys, so a typo in
//! the config fails at startup rather than being silently ignored.

use serde::{Deserialize, Serialize};

/// One upstream: `[providers.<name>]` in the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The wire protocol: `"openai"` (Chat Completions) for now; `"anthropic"` later.
    pub kind: String,
    /// The API root, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8080/v1`;
    /// requests go to `{base_url}/chat/completions`. A trailing slash is ignored.
    pub base_url: String,
    /// Name of the environment variable that holds the API key, read at each request
    /// and sent as `Authorization: Bearer <key>`. `None` sends no auth header (local
    /// servers).
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// Options of a model served by the built-in `demo` provider (SPEC §6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoOptions {
    /// Number of tokens (words) in the answer, reasoning included.
    pub tokens: u32,
    /// Delay between two tokens, in milliseconds.
    pub token_delay_ms: u64,
    /// Delay before the first token, in milliseconds (a slow start).
    pub first_token_delay_ms: u64,
    /// The scripted behaviour.
    pub behavior: DemoBehavior,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            tokens: 120,
            token_delay_ms: 20,
            first_token_delay_ms: 0,
            behavior: DemoBehavior::Text,
        }
    }
}

/// What a demo model does, for tests of the engine and the clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DemoBehavior {
    /// Text tokens, then usage and `Finish("stop")`.
    #[default]
    Text,
    /// The first quarter of the tokens (rounded down) as reasoning, the rest as text.
    Reasoning,
    /// `stream()` itself fails: HTTP 500, "demo: failure before stream".
    FailBeforeStream,
    /// Half of the tokens (rounded down), then an `Upstream` error
    /// "demo: failure mid-stream".
    FailMidStream,
    /// A few tokens (at most 3), then nothing until cancelled or dropped.
    Stall,
}

/// Options of a model served by an `openai`-kind provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiModelOptions {
    /// The upstream's model id, sent as `model` (e.g. `gpt-4o-mini`,
    /// `deepseek/deepseek-r1`).
    pub model: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn demo_defaults_and_names() {
        let o: DemoOptions = serde_json::from_value(json!({})).unwrap();
        assert_eq!(o, DemoOptions::default());
        assert_eq!(o.tokens, 120);
        assert_eq!(o.token_delay_ms, 20);
        let o: DemoOptions =
            serde_json::from_value(json!({"behavior": "fail_mid_stream", "tokens": 4})).unwrap();
        assert_eq!(o.behavior, DemoBehavior::FailMidStream);
        assert_eq!(o.tokens, 4);
        assert!(serde_json::from_value::<DemoOptions>(json!({"tokenz": 4})).is_err());
        assert!(serde_json::from_value::<DemoOptions>(json!({"behavior": "weird"})).is_err());
    }

    #[test]
    fn provider_config_rejects_unknown_keys() {
        let c: ProviderConfig =
            serde_json::from_value(json!({"kind": "openai", "base_url": "http://x/v1"})).unwrap();
        assert_eq!(c.api_key_env, None);
        assert!(
            serde_json::from_value::<ProviderConfig>(
                json!({"kind": "openai", "base_url": "http://x/v1", "api_key": "sk"})
            )
            .is_err()
        );
    }
}
