//! Configuration shapes of providers and of the models that use them.
//!
//! A *provider* section says where an upstream is (`[providers.<name>]`: `kind`,
//! `base_url`, `api_key_env`); a *model* names a provider and carries options whose
//! shape depends on the provider's kind ([`DemoOptions`] for the built-in `demo`,
//! [`OpenAiModelOptions`] for `openai`, [`AnthropicModelOptions`] for `anthropic`).
//! Every shape rejects unknown keys, so a typo in
//! the config fails at startup rather than being silently ignored.

use serde::{Deserialize, Serialize};

/// One upstream: `[providers.<name>]` in the config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The wire protocol: `"openai"` (Chat Completions) or `"anthropic"` (Messages).
    pub kind: String,
    /// The API root, e.g. `https://api.openai.com/v1`, `https://api.anthropic.com/v1`
    /// or `http://127.0.0.1:8080/v1`; requests go to `{base_url}/chat/completions`
    /// (`openai`) or `{base_url}/messages` (`anthropic`). A trailing slash is ignored.
    pub base_url: String,
    /// Name of the environment variable that holds the API key, read at each request
    /// and sent as `Authorization: Bearer <key>` (`openai`) or `x-api-key: <key>`
    /// (`anthropic`). `None` sends no auth header (local servers and proxies).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// `[providers.NAME.retry]`: the retry policy of every model of this provider
    /// (defaults: 3 retries, base 1 s, cap 30 s, Retry-After ceiling 60 s).
    #[serde(default)]
    pub retry: genstream_engine::retry::RetryPolicy,
    /// `[providers.NAME.timeouts]`: connect, first-byte and idle-gap timeouts
    /// (defaults 10 s, 60 s, 60 s).
    #[serde(default)]
    pub timeouts: genstream_engine::retry::Timeouts,
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
    /// Calls the `calculator` tool (`"A * B"`, from the request's hash), and once the
    /// request carries the result, answers "The answer is RESULT." — so the tool loop
    /// can be shown without an upstream.
    Tools,
}

/// Options of a model served by an `openai`-kind provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiModelOptions {
    /// The upstream's model id, sent as `model` (e.g. `gpt-4o-mini`,
    /// `deepseek/deepseek-r1`).
    pub model: String,
}

/// Options of a model served by an `anthropic`-kind provider (Anthropic API docs,
/// "Messages": `model`, `max_tokens`, `thinking`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicModelOptions {
    /// The upstream's model id, sent as `model` (e.g. `claude-sonnet-4-5`).
    pub model: String,
    /// The most tokens the model may generate, sent as `max_tokens` (required by the
    /// Messages API). Includes the thinking budget when thinking is on.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Turns on extended thinking with this budget, sent as
    /// `thinking: {type: "enabled", budget_tokens}` (Anthropic docs, "Building with
    /// extended thinking": at least 1024 and less than `max_tokens`). `None` leaves
    /// thinking off.
    #[serde(default)]
    pub thinking_budget_tokens: Option<u32>,
}

/// `max_tokens` when a model's options do not set it.
pub const ANTHROPIC_DEFAULT_MAX_TOKENS: u32 = 4096;

fn default_max_tokens() -> u32 {
    ANTHROPIC_DEFAULT_MAX_TOKENS
}

/// The smallest thinking budget the Messages API accepts.
pub const ANTHROPIC_MIN_THINKING_BUDGET: u32 = 1024;

impl AnthropicModelOptions {
    /// Checks what the API would reject on every request: `max_tokens` of 0, a
    /// thinking budget under [`ANTHROPIC_MIN_THINKING_BUDGET`] or not below
    /// `max_tokens`.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".to_owned());
        }
        if let Some(budget) = self.thinking_budget_tokens {
            if budget < ANTHROPIC_MIN_THINKING_BUDGET {
                return Err(format!(
                    "thinking_budget_tokens must be at least {ANTHROPIC_MIN_THINKING_BUDGET}, got {budget}"
                ));
            }
            if budget >= self.max_tokens {
                return Err(format!(
                    "thinking_budget_tokens ({budget}) must be less than max_tokens ({})",
                    self.max_tokens
                ));
            }
        }
        Ok(())
    }
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
    fn anthropic_options() {
        let o: AnthropicModelOptions =
            serde_json::from_value(json!({"model": "claude-sonnet-4-5"})).unwrap();
        assert_eq!(o.max_tokens, 4096);
        assert_eq!(o.thinking_budget_tokens, None);
        assert_eq!(o.validate(), Ok(()));
        let o: AnthropicModelOptions = serde_json::from_value(
            json!({"model": "m", "max_tokens": 8000, "thinking_budget_tokens": 2048}),
        )
        .unwrap();
        assert_eq!(o.validate(), Ok(()));
        assert!(
            serde_json::from_value::<AnthropicModelOptions>(json!({"model": "m", "thinking": 1}))
                .is_err()
        );
        assert!(serde_json::from_value::<AnthropicModelOptions>(json!({"max_tokens": 1})).is_err());
        let bad = |v| {
            serde_json::from_value::<AnthropicModelOptions>(v)
                .unwrap()
                .validate()
                .unwrap_err()
        };
        assert!(bad(json!({"model": "m", "max_tokens": 0})).contains("max_tokens"));
        assert!(
            bad(json!({"model": "m", "thinking_budget_tokens": 512})).contains("at least 1024")
        );
        assert!(
            bad(json!({"model": "m", "max_tokens": 2000, "thinking_budget_tokens": 2000}))
                .contains("less than max_tokens")
        );
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
