//! Tools the model may call (docs/protocol.md §6): the [`Tool`] trait and the [`ToolRegistry`]
//! the job task looks them up in. Built-in and HTTP tools live in `genstream-tools`.
//!
//! A tool's failure is not the job's failure: an error (or arguments that are not
//! valid JSON) becomes an error *result* handed back to the model, which can correct
//! itself. Cancellation (abort) makes the result `{"error":"cancelled"}`, so every tool
//! call in the history has a result and the next request stays valid (docs/lessons.md:
//! grimoire's 400s after an abort during a tool).
//!
//! The registry holds every tool the server knows; a job may only run the ones it was
//! given (its model's `tools`, narrowed by the request). A call of any other name —
//! a model may name a tool it was never shown — is answered with
//! [`unavailable_result`] and never run.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::provider::ToolSpec;

/// One callable tool.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// The name the model calls it by (`^[a-zA-Z0-9_-]{1,64}$`, as OpenAI and
    /// Anthropic require).
    fn name(&self) -> &str;
    /// What it does, for the model.
    fn description(&self) -> &str;
    /// JSON Schema of its arguments object.
    fn parameters(&self) -> serde_json::Value;
    /// Runs it. `Ok` is the result text given to the model; `Err` is an error message,
    /// also given to the model (as `{"error": …}`). Must return promptly once `cancel`
    /// fires.
    async fn execute(
        &self,
        args: serde_json::Value,
        cancel: CancellationToken,
    ) -> Result<String, String>;
}

/// The tools a server knows, by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `tool`, replacing one of the same name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.name().to_string(), tool);
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }

    /// Every tool's name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    /// The specs of the named tools, in the given order (unknown names skipped).
    pub fn specs(&self, names: &[String]) -> Vec<ToolSpec> {
        names
            .iter()
            .filter_map(|n| self.tools.get(n))
            .map(|t| ToolSpec {
                name: t.name().to_string(),
                description: t.description().to_string(),
                parameters: t.parameters(),
            })
            .collect()
    }
}

/// Runs `name` with the raw `args` text the model produced, turning every failure
/// into a result string: unknown tool, arguments that are not a JSON object, the
/// tool's own error, and cancellation. Empty arguments count as `{}`.
pub async fn run_tool(
    registry: &ToolRegistry,
    name: &str,
    args: &str,
    cancel: CancellationToken,
) -> String {
    let error = |m: String| serde_json::json!({ "error": m }).to_string();
    let Some(tool) = registry.get(name) else {
        return error(format!("unknown tool {name:?}"));
    };
    let parsed = if args.trim().is_empty() {
        Ok(serde_json::json!({}))
    } else {
        serde_json::from_str::<serde_json::Value>(args)
    };
    let value = match parsed {
        Ok(v) if v.is_object() => v,
        Ok(_) => return error("arguments must be a JSON object".into()),
        Err(e) => return error(format!("arguments are not valid JSON: {e}")),
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => cancelled_result(),
        r = tool.execute(value, cancel.clone()) => match r {
            Ok(out) => out,
            Err(m) => error(m),
        },
    }
}

/// The result recorded for a tool call cut off by an abort.
///
/// ```
/// use genstream_engine::tools::{cancelled_result, is_error_result};
/// assert_eq!(cancelled_result(), r#"{"error":"cancelled"}"#);
/// assert!(is_error_result(&cancelled_result()));
/// assert!(!is_error_result(r#"{"error":"x","data":1}"#) && !is_error_result("42"));
/// ```
pub fn cancelled_result() -> String {
    serde_json::json!({ "error": "cancelled" }).to_string()
}

/// The result given for a call of a tool the job was not given,
/// `{"error":"tool NAME is not available"}`: the tool is not run, whatever the
/// registry holds.
pub fn unavailable_result(name: &str) -> String {
    serde_json::json!({ "error": format!("tool {name} is not available") }).to_string()
}

/// Whether `output` is one of the error results the job task records
/// (`{"error": …}`: a tool's error, bad arguments, cancelled, not available, not run):
/// a JSON object whose only key is `error`. Providers whose API marks failed tool
/// results (Anthropic's `is_error`) use it.
pub fn is_error_result(output: &str) -> bool {
    let trimmed = output.trim_start();
    if !trimmed.starts_with('{') || !trimmed.contains("\"error\"") {
        return false; // the common case, decided without parsing
    }
    matches!(
        serde_json::from_str::<serde_json::Value>(output),
        Ok(serde_json::Value::Object(map)) if map.len() == 1 && map.contains_key("error")
    )
}

/// The result recorded for the calls of the last model call allowed
/// (`max_tool_iterations`): the model would never see their results, so they are not
/// run (no side effects), yet every call in the history has a result.
pub fn not_run_result() -> String {
    serde_json::json!({ "error": "not run: max_tool_iterations reached" }).to_string()
}
