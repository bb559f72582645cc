//! The tools genstream ships (docs/protocol.md §6): `calculator`, `current_time`, and HTTP tools
//! declared in config. Each implements the engine's [`Tool`] trait; [`registry`] builds
//! the [`ToolRegistry`] a server hands to its job manager.
//!
//! Failures are results, not job failures: a tool returns `Err(message)` and the job
//! task turns it into `{"error": message}` for the model.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use genstream_engine::tools::{Tool, ToolRegistry};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Longest expression the calculator accepts, in bytes.
const MAX_EXPRESSION: usize = 1000;
/// Longest HTTP tool response used as a result, in bytes.
const MAX_HTTP_RESULT: usize = 64 * 1024;

/// `calculator`: evaluates an arithmetic expression (`+ - * / ^ %`, parentheses,
/// `sqrt`, `sin`, `ln`, … — the operators of the `exmex` crate) to a number.
pub struct Calculator;

#[async_trait]
impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }
    fn description(&self) -> &str {
        "Evaluates an arithmetic expression, e.g. \"(2 + 3) * 4 / 7\" or \"sqrt(2) ^ 2\", and returns the number."
    }
    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression to evaluate."}},
            "required": ["expression"],
            "additionalProperties": false
        })
    }
    async fn execute(&self, args: Value, _cancel: CancellationToken) -> Result<String, String> {
        let expr = args["expression"]
            .as_str()
            .ok_or("`expression` must be a string")?;
        calculate(expr)
    }
}

/// Evaluates `expr` to its number as text (integers without a fraction).
pub fn calculate(expr: &str) -> Result<String, String> {
    if expr.len() > MAX_EXPRESSION {
        return Err(format!("expression longer than {MAX_EXPRESSION} bytes"));
    }
    let v: f64 = exmex::eval_str(expr).map_err(|e| format!("cannot evaluate {expr:?}: {e}"))?;
    if !v.is_finite() {
        return Err(format!("{expr:?} is not a finite number"));
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Ok(format!("{}", v as i64))
    } else {
        Ok(format!("{v}"))
    }
}

/// `current_time`: the current date and time in an IANA time zone (default UTC).
pub struct CurrentTime;

#[async_trait]
impl Tool for CurrentTime {
    fn name(&self) -> &str {
        "current_time"
    }
    fn description(&self) -> &str {
        "Returns the current date and time (RFC 3339) in the given IANA time zone, e.g. \"Europe/Paris\"; UTC by default."
    }
    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "IANA time zone name, e.g. America/New_York."}},
            "additionalProperties": false
        })
    }
    async fn execute(&self, args: Value, _cancel: CancellationToken) -> Result<String, String> {
        let name = args["timezone"].as_str().unwrap_or("UTC");
        let tz: chrono_tz::Tz = name.parse().map_err(|_| {
            format!("unknown time zone {name:?}; use an IANA name such as Europe/Paris")
        })?;
        let now = chrono::Utc::now().with_timezone(&tz);
        Ok(json!({
            "timezone": name,
            "datetime": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            "weekday": now.format("%A").to_string(),
        })
        .to_string())
    }
}

/// An HTTP tool declared in config (`[[tools]]`): genstream POSTs the arguments as
/// JSON to `url` and gives the response body to the model.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToolConfig {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
    pub url: String,
    /// Per-call timeout (`timeout = "10s"`, the default); the server's config refuses
    /// a value outside 1 ms to 1 h.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A tool backed by an HTTP endpoint.
pub struct HttpTool {
    config: HttpToolConfig,
    client: reqwest::Client,
}

/// Errors building tools from config.
#[derive(Debug, thiserror::Error)]
pub enum ToolConfigError {
    #[error("tool {0:?}: the name must be 1–64 characters of a-z, A-Z, 0-9, _ or -")]
    BadName(String),
    #[error("tool {0:?} is declared twice (or shadows a built-in tool)")]
    Duplicate(String),
    #[error("tool {name:?}: {message}")]
    Invalid { name: String, message: String },
}

impl HttpTool {
    /// Builds the tool; checks its name and URL.
    pub fn new(config: HttpToolConfig) -> Result<Self, ToolConfigError> {
        let invalid = |m: String| ToolConfigError::Invalid {
            name: config.name.clone(),
            message: m,
        };
        reqwest::Url::parse(&config.url).map_err(|e| invalid(format!("bad url: {e}")))?;
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .retry(reqwest::retry::never())
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(HttpTool { config, client })
    }
}

#[async_trait]
impl Tool for HttpTool {
    fn name(&self) -> &str {
        &self.config.name
    }
    fn description(&self) -> &str {
        &self.config.description
    }
    fn parameters(&self) -> Value {
        self.config.parameters.clone()
    }
    async fn execute(&self, args: Value, cancel: CancellationToken) -> Result<String, String> {
        let send = async {
            let resp = self
                .client
                .post(&self.config.url)
                .json(&args)
                .send()
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = resp.status();
            let mut body = resp
                .text()
                .await
                .map_err(|e| format!("reading the response failed: {e}"))?;
            if body.len() > MAX_HTTP_RESULT {
                let mut cut = MAX_HTTP_RESULT;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
            }
            if status.is_success() {
                Ok(body)
            } else {
                Err(format!("the tool's endpoint answered {status}: {body}"))
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => Err("cancelled".into()),
            r = send => r,
        }
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The built-in tools plus the configured HTTP tools.
///
/// Errors: a bad or duplicate name, a bad URL.
pub fn registry(http_tools: &[HttpToolConfig]) -> Result<ToolRegistry, ToolConfigError> {
    let mut r = ToolRegistry::new();
    r.register(Arc::new(Calculator));
    r.register(Arc::new(CurrentTime));
    for t in http_tools {
        if !valid_name(&t.name) {
            return Err(ToolConfigError::BadName(t.name.clone()));
        }
        if r.get(&t.name).is_some() {
            return Err(ToolConfigError::Duplicate(t.name.clone()));
        }
        r.register(Arc::new(HttpTool::new(t.clone())?));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calculator_evaluates_and_refuses() {
        assert_eq!(calculate("6*7").unwrap(), "42");
        assert_eq!(calculate("(2 + 3) * 4 / 8").unwrap(), "2.5");
        assert_eq!(calculate("2^10").unwrap(), "1024");
        assert!(calculate("1/0").is_err());
        assert!(calculate("x + 1").is_err());
        assert!(calculate("2 +").is_err());
        assert!(calculate(&"1+".repeat(600)).is_err());
    }

    #[tokio::test]
    async fn current_time_in_a_zone() {
        let out = CurrentTime
            .execute(json!({"timezone": "Asia/Tokyo"}), CancellationToken::new())
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["datetime"].as_str().unwrap().ends_with("+09:00"), "{out}");
        assert!(
            CurrentTime
                .execute(json!({"timezone": "Mars/Base"}), CancellationToken::new())
                .await
                .is_err()
        );
        let utc = CurrentTime
            .execute(json!({}), CancellationToken::new())
            .await
            .unwrap();
        assert!(utc.contains("+00:00"), "{utc}");
    }

    #[test]
    fn registry_rejects_bad_and_duplicate_names() {
        let t = |name: &str| HttpToolConfig {
            name: name.into(),
            description: "d".into(),
            parameters: empty_object_schema(),
            url: "http://127.0.0.1:9/x".into(),
            timeout: Duration::from_millis(100),
        };
        assert!(registry(&[t("weather")]).unwrap().get("weather").is_some());
        assert!(matches!(
            registry(&[t("calculator")]),
            Err(ToolConfigError::Duplicate(_))
        ));
        assert!(matches!(
            registry(&[t("has space")]),
            Err(ToolConfigError::BadName(_))
        ));
        let mut bad = t("x");
        bad.url = "not a url".into();
        assert!(registry(&[bad]).is_err());
    }
}
