//! Configuration shapes of providers and of the models that use them.
//!
//! A *provider* section, `[providers.NAME]`, says where an upstream is and which wire
//! protocol it speaks. [`ProviderConfig`] is an enum tagged by `kind` (`"openai"` or
//! `"anthropic"`), so an unknown kind, a missing one or an unknown key in the section
//! is refused when the config is read, with the key named.
//!
//! A *model* names a provider (`demo`, the built-in one, or a section's NAME), and its
//! `[models.options]` have the shape its provider's kind chooses ([`ModelOptions`]:
//! [`DemoOptions`], [`OpenAiModelOptions`] or [`AnthropicModelOptions`]). serde cannot
//! make that choice while it reads a model, because the kind lives in another section;
//! so the config is read in two steps: the options as an untyped table first, then
//! [`ModelOptions::deserialize_for`] with the kind of the provider the model names.
//!
//! Durations are written with their unit, in humantime's syntax (`"20ms"`, `"30s"`,
//! `"1h"`), under keys whose names carry no unit. A value outside its allowed range is
//! refused by a `validate` function with an [`InvalidValue`] that names the key and the
//! range; nothing is silently clamped.

use std::fmt;
use std::time::Duration;

use genstream_engine::retry::{RetryPolicy, Timeouts};
use serde::{Deserialize, Deserializer, Serialize};

/// The wire protocol of a provider, which also chooses the shape of its models'
/// options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// The built-in `demo` provider (no section, no network).
    Demo,
    /// `kind = "openai"`: Chat Completions, OpenAI and compatible servers.
    OpenAi,
    /// `kind = "anthropic"`: Anthropic's Messages API.
    Anthropic,
}

impl ProviderKind {
    /// The name used in config and in `GET /api/models`: `demo`, `openai`,
    /// `anthropic`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Demo => "demo",
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One upstream: `[providers.NAME]` in the config, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum ProviderConfig {
    /// `kind = "openai"`: requests go to `{base_url}/chat/completions`, the key is sent
    /// as `Authorization: Bearer <key>`.
    #[serde(rename = "openai")]
    OpenAi(HttpProviderConfig),
    /// `kind = "anthropic"`: requests go to `{base_url}/messages`, the key is sent as
    /// `x-api-key: <key>`.
    #[serde(rename = "anthropic")]
    Anthropic(HttpProviderConfig),
}

impl ProviderConfig {
    /// Its kind.
    pub fn kind(&self) -> ProviderKind {
        match self {
            ProviderConfig::OpenAi(_) => ProviderKind::OpenAi,
            ProviderConfig::Anthropic(_) => ProviderKind::Anthropic,
        }
    }

    /// The settings every kind shares.
    pub fn http(&self) -> &HttpProviderConfig {
        match self {
            ProviderConfig::OpenAi(c) | ProviderConfig::Anthropic(c) => c,
        }
    }

    /// Checks the ranges of the retry and timeout settings.
    ///
    /// # Errors
    /// The first value out of range; its key is relative to the section
    /// (`timeouts.connect`), see [`InvalidValue::under`].
    pub fn validate(&self) -> Result<(), InvalidValue> {
        let c = self.http();
        check_count(
            "retry.max_retries",
            c.retry.max_retries.into(),
            0,
            Some(100),
        )?;
        for (key, value) in [
            ("retry.base", c.retry.base),
            ("retry.cap", c.retry.cap),
            ("retry.ceiling", c.retry.ceiling),
        ] {
            check_duration(key, value, Duration::ZERO, HOUR)?;
        }
        check_duration("timeouts.connect", c.timeouts.connect, MS, 10 * MINUTE)?;
        check_duration("timeouts.first_byte", c.timeouts.first_byte, MS, HOUR)?;
        check_duration("timeouts.idle", c.timeouts.idle, MS, HOUR)?;
        Ok(())
    }
}

/// The settings of an HTTP provider, whatever its kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderConfig {
    /// The API root, e.g. `https://api.openai.com/v1`, `https://api.anthropic.com/v1`
    /// or `http://127.0.0.1:8080/v1`. A trailing slash is ignored.
    pub base_url: String,
    /// Name of the environment variable that holds the API key, read at each request.
    /// `None` sends no auth header (local servers and proxies).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// `[providers.NAME.retry]`: the retry policy of every model of this provider
    /// (defaults: `max_retries = 3`, `base = "1s"`, `cap = "30s"`, `ceiling = "60s"`).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// `[providers.NAME.timeouts]`: connect, first-byte and idle-gap timeouts
    /// (defaults `"10s"`, `"60s"`, `"60s"`).
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// A model's `[models.options]`, of the shape its provider's kind chooses.
///
/// Serialized, it is the inner table (no tag): the kind comes from the provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ModelOptions {
    /// Options of a model of the built-in `demo` provider.
    Demo(DemoOptions),
    /// Options of a model of an `openai`-kind provider.
    OpenAi(OpenAiModelOptions),
    /// Options of a model of an `anthropic`-kind provider.
    Anthropic(AnthropicModelOptions),
}

impl Default for ModelOptions {
    /// The demo provider's defaults (the built-in `demo` model).
    fn default() -> Self {
        ModelOptions::Demo(DemoOptions::default())
    }
}

impl ModelOptions {
    /// The kind of provider these options are for.
    pub fn kind(&self) -> ProviderKind {
        match self {
            ModelOptions::Demo(_) => ProviderKind::Demo,
            ModelOptions::OpenAi(_) => ProviderKind::OpenAi,
            ModelOptions::Anthropic(_) => ProviderKind::Anthropic,
        }
    }

    /// Reads a model's options table as the options of a provider of `kind`. Works
    /// with any deserializer (figment's value in the config, `serde_json::Value` in
    /// tests).
    ///
    /// # Errors
    /// The deserializer's error for an unknown or missing key or a wrong type; it
    /// names the key.
    pub fn deserialize_for<'de, D: Deserializer<'de>>(
        kind: ProviderKind,
        options: D,
    ) -> Result<Self, D::Error> {
        Ok(match kind {
            ProviderKind::Demo => ModelOptions::Demo(DemoOptions::deserialize(options)?),
            ProviderKind::OpenAi => ModelOptions::OpenAi(OpenAiModelOptions::deserialize(options)?),
            ProviderKind::Anthropic => {
                ModelOptions::Anthropic(AnthropicModelOptions::deserialize(options)?)
            }
        })
    }

    /// Checks the values serde cannot: ranges and the rules between keys.
    ///
    /// # Errors
    /// The first value not allowed; its key is relative to the options table.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        match self {
            ModelOptions::Demo(o) => o.validate(),
            ModelOptions::OpenAi(_) => Ok(()),
            ModelOptions::Anthropic(o) => o.validate(),
        }
    }
}

/// Options of a model served by the built-in `demo` provider (docs/protocol.md §6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoOptions {
    /// Number of tokens (words) in the answer, reasoning included.
    pub tokens: u32,
    /// Delay between two tokens (`token_delay = "20ms"`), 0 s to 1 h.
    #[serde(with = "humantime_serde")]
    pub token_delay: Duration,
    /// Delay before the first token, a slow start (`first_token_delay = "2s"`), 0 s to
    /// 1 h.
    #[serde(with = "humantime_serde")]
    pub first_token_delay: Duration,
    /// The scripted behaviour.
    pub behavior: DemoBehavior,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            tokens: 120,
            token_delay: Duration::from_millis(20),
            first_token_delay: Duration::ZERO,
            behavior: DemoBehavior::Text,
        }
    }
}

impl DemoOptions {
    /// Checks the delays' ranges (0 s to 1 h).
    ///
    /// # Errors
    /// The first delay out of range.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_duration("token_delay", self.token_delay, Duration::ZERO, HOUR)?;
        check_duration(
            "first_token_delay",
            self.first_token_delay,
            Duration::ZERO,
            HOUR,
        )
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
    /// The offending key, relative to the options table.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_count("max_tokens", self.max_tokens.into(), 1, None)?;
        if let Some(budget) = self.thinking_budget_tokens {
            check_count(
                "thinking_budget_tokens",
                budget.into(),
                ANTHROPIC_MIN_THINKING_BUDGET.into(),
                None,
            )?;
            if budget >= self.max_tokens {
                return Err(InvalidValue::new(
                    "thinking_budget_tokens",
                    format!(
                        "{budget} must be less than max_tokens ({})",
                        self.max_tokens
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A configured value that is not allowed: names the key and says why (for a range,
/// the allowed range).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {problem}")]
pub struct InvalidValue {
    /// The key, dotted (`redis.lease_ttl`, `providers.openai.timeouts.idle`).
    pub key: String,
    /// What is wrong with its value.
    pub problem: String,
}

impl InvalidValue {
    /// `key`'s value is wrong as `problem` says.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidValue {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// The same error with its key inside `section` (`providers.openai` + `retry.cap`
    /// → `providers.openai.retry.cap`).
    pub fn under(self, section: &str) -> Self {
        InvalidValue {
            key: format!("{section}.{}", self.key),
            ..self
        }
    }
}

/// One millisecond.
pub const MS: Duration = Duration::from_millis(1);
/// One minute.
pub const MINUTE: Duration = Duration::from_secs(60);
/// One hour.
pub const HOUR: Duration = Duration::from_secs(3600);
/// One day.
pub const DAY: Duration = Duration::from_secs(86_400);

/// `value` of `key` must lie in `min..=max`.
///
/// # Errors
/// [`InvalidValue`] naming the key, the value and the range, durations in humantime's
/// syntax: ``redis.lease_ttl`: 100ms is out of range, allowed 300ms to 1day`.
pub fn check_duration(
    key: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), InvalidValue> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    let show = |d: Duration| humantime::format_duration(d).to_string();
    Err(InvalidValue::new(
        key,
        format!(
            "{} is out of range, allowed {} to {}",
            show(value),
            show(min),
            show(max)
        ),
    ))
}

/// `value` of `key` must be at least `min` and, when given, at most `max`.
///
/// # Errors
/// [`InvalidValue`] naming the key, the value and the range.
pub fn check_count(key: &str, value: u64, min: u64, max: Option<u64>) -> Result<(), InvalidValue> {
    if value >= min && max.is_none_or(|max| value <= max) {
        return Ok(());
    }
    let allowed = match max {
        Some(max) => format!("allowed {min} to {max}"),
        None => format!("allowed at least {min}"),
    };
    Err(InvalidValue::new(
        key,
        format!("{value} is out of range, {allowed}"),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(kind: ProviderKind, v: serde_json::Value) -> Result<ModelOptions, String> {
        ModelOptions::deserialize_for(kind, v).map_err(|e| e.to_string())
    }

    #[test]
    fn demo_defaults_and_names() {
        let o: DemoOptions = serde_json::from_value(json!({})).unwrap();
        assert_eq!(o, DemoOptions::default());
        assert_eq!(o.tokens, 120);
        assert_eq!(o.token_delay, Duration::from_millis(20));
        let o: DemoOptions = serde_json::from_value(
            json!({"behavior": "fail_mid_stream", "tokens": 4, "first_token_delay": "1s 500ms"}),
        )
        .unwrap();
        assert_eq!(o.behavior, DemoBehavior::FailMidStream);
        assert_eq!(o.tokens, 4);
        assert_eq!(o.first_token_delay, Duration::from_millis(1500));
        assert!(serde_json::from_value::<DemoOptions>(json!({"tokenz": 4})).is_err());
        assert!(serde_json::from_value::<DemoOptions>(json!({"behavior": "weird"})).is_err());
        // A duration needs its unit.
        assert!(serde_json::from_value::<DemoOptions>(json!({"token_delay": 20})).is_err());
    }

    #[test]
    fn options_take_the_shape_of_the_providers_kind() {
        let o = options(ProviderKind::OpenAi, json!({"model": "gpt-4o"})).unwrap();
        assert_eq!(o.kind(), ProviderKind::OpenAi);
        let o = options(ProviderKind::Anthropic, json!({"model": "claude"})).unwrap();
        assert_eq!(o.kind(), ProviderKind::Anthropic);
        assert_eq!(
            options(ProviderKind::Demo, json!({})).unwrap(),
            ModelOptions::default()
        );
        // Demo options on an openai provider, and the reverse: refused, naming the key.
        let e = options(ProviderKind::OpenAi, json!({"tokens": 3})).unwrap_err();
        assert!(e.contains("tokens"), "{e}");
        let e = options(ProviderKind::Demo, json!({"model": "gpt-4o"})).unwrap_err();
        assert!(e.contains("model"), "{e}");
        let e = options(ProviderKind::OpenAi, json!({"model": "x", "max_tokens": 5})).unwrap_err();
        assert!(e.contains("max_tokens"), "{e}");
        // Serialized, options are the bare table.
        assert_eq!(
            serde_json::to_value(ModelOptions::OpenAi(OpenAiModelOptions {
                model: "m".into()
            }))
            .unwrap(),
            json!({"model": "m"})
        );
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
                .to_string()
        };
        assert!(bad(json!({"model": "m", "max_tokens": 0})).contains("`max_tokens`"));
        assert!(
            bad(json!({"model": "m", "thinking_budget_tokens": 512})).contains("at least 1024")
        );
        assert!(
            bad(json!({"model": "m", "max_tokens": 2000, "thinking_budget_tokens": 2000}))
                .contains("less than max_tokens")
        );
    }

    #[test]
    fn provider_sections_are_tagged_by_kind_and_refuse_unknown_keys() {
        let c: ProviderConfig =
            serde_json::from_value(json!({"kind": "openai", "base_url": "http://x/v1"})).unwrap();
        assert_eq!(c.kind(), ProviderKind::OpenAi);
        assert_eq!(c.http().api_key_env, None);
        assert_eq!(c.http().timeouts, Timeouts::default());
        let c: ProviderConfig = serde_json::from_value(json!({
            "kind": "anthropic", "base_url": "http://x/v1",
            "retry": {"base": "50ms"}, "timeouts": {"idle": "2m"},
        }))
        .unwrap();
        assert_eq!(c.kind(), ProviderKind::Anthropic);
        assert_eq!(c.http().retry.base, Duration::from_millis(50));
        assert_eq!(c.http().retry.cap, RetryPolicy::default().cap);
        assert_eq!(c.http().timeouts.idle, Duration::from_secs(120));
        let err = |v| {
            serde_json::from_value::<ProviderConfig>(v)
                .unwrap_err()
                .to_string()
        };
        let e = err(json!({"kind": "openai", "base_url": "http://x/v1", "api_key": "sk"}));
        assert!(e.contains("api_key"), "{e}");
        let e = err(json!({"kind": "gemini", "base_url": "http://x/v1"}));
        assert!(e.contains("gemini") && e.contains("openai"), "{e}");
        let e = err(json!({"base_url": "http://x/v1"}));
        assert!(e.contains("kind"), "{e}");
        let e = err(json!({"kind": "openai", "base_url": "x", "timeouts": {"idle_ms": 5}}));
        assert!(e.contains("idle_ms"), "{e}");
    }

    #[test]
    fn values_out_of_range_name_the_key_and_the_range() {
        let mut c = HttpProviderConfig::default();
        c.timeouts.connect = Duration::ZERO;
        let e = ProviderConfig::OpenAi(c).validate().unwrap_err();
        assert_eq!(e.key, "timeouts.connect");
        assert_eq!(
            e.under("providers.x").to_string(),
            "`providers.x.timeouts.connect`: 0s is out of range, allowed 1ms to 10m"
        );
        let o = ModelOptions::Demo(DemoOptions {
            token_delay: Duration::from_secs(7200),
            ..DemoOptions::default()
        });
        assert_eq!(
            o.validate().unwrap_err().to_string(),
            "`token_delay`: 2h is out of range, allowed 0s to 1h"
        );
        assert_eq!(
            check_count("n", 0, 1, None).unwrap_err().to_string(),
            "`n`: 0 is out of range, allowed at least 1"
        );
        assert_eq!(check_count("n", 5, 1, Some(5)), Ok(()));
    }
}
