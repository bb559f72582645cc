//! The `tools` and `tools-forever` scenarios: a tool-calling turn that calls every
//! tool the request declares with deterministic arguments, or, once the request ends
//! with tool results, the text answer quoting them (see the crate docs for ids,
//! arguments and fragments).
//!
//! What the turn calls is decided here once for both dialects; the dialect modules
//! only put the calls on the wire.

use serde_json::{Map, Value, json};

use crate::Dialect;
use crate::chat_completions::{chat_text_frames, tool_call_frames};
use crate::messages::{
    anthropic_text_frames, redacted_data, thinking_enabled, thinking_text, tool_use_frames,
};
use crate::pieces::pieces_of;
use crate::request::{blocks, content_text, messages_of};

/// A tool the request declares: its name and the JSON Schema of its arguments.
struct DeclaredTool {
    name: String,
    schema: Value,
}

/// The tools a request declares, in its order.
fn declared_tools(dialect: Dialect, body: &Value) -> Vec<DeclaredTool> {
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let (name, schema) = match dialect {
                Dialect::ChatCompletions => {
                    let f = t.get("function")?;
                    (f.get("name")?, f.get("parameters"))
                }
                Dialect::Messages => (t.get("name")?, t.get("input_schema")),
            };
            Some(DeclaredTool {
                name: name.as_str()?.to_owned(),
                schema: schema.cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

/// The texts of the tool results the request ends with, in order; `None` when its
/// last message holds none.
fn trailing_tool_results(dialect: Dialect, body: &Value) -> Option<Vec<String>> {
    let messages = messages_of(body);
    let results: Vec<String> = match dialect {
        Dialect::ChatCompletions => {
            let mut out: Vec<String> = messages
                .iter()
                .rev()
                .take_while(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
                .map(|m| content_text(m.get("content")))
                .collect();
            out.reverse();
            out
        }
        Dialect::Messages => {
            let last = messages.last()?;
            // A user message with results *and* text is a new question (the API wants
            // the results of the last tool turn and the next question in one message).
            if last.get("role").and_then(Value::as_str) != Some("user")
                || blocks(last, "text").next().is_some()
            {
                return None;
            }
            last.get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                .map(|b| content_text(b.get("content")))
                .collect()
        }
    };
    (!results.is_empty()).then_some(results)
}

/// Assistant messages with tool calls already in the history.
fn tool_turns(dialect: Dialect, body: &Value) -> usize {
    messages_of(body)
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .filter(|m| match dialect {
            Dialect::ChatCompletions => m
                .get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty()),
            Dialect::Messages => blocks(m, "tool_use").next().is_some(),
        })
        .count()
}

/// The arguments of call `j` of turn `t` to a tool with `schema`.
fn tool_arguments(schema: &Value, turn: usize, j: usize) -> Value {
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if properties.contains_key("expression") {
        return json!({"expression": format!("{} * {}", 6 + j, 7 + turn)});
    }
    let mut args = Map::new();
    for (name, prop) in properties {
        let value = match prop.get("type").and_then(Value::as_str) {
            Some("integer" | "number") => json!(j),
            Some("boolean") => json!(true),
            _ => json!(format!("{name}-{turn}-{j}")),
        };
        args.insert(name, value);
    }
    Value::Object(args)
}

/// One call of a tool turn: its id, the tool's name, and its arguments' compact JSON
/// in the fragments it is streamed in.
pub(crate) struct PlannedCall {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) fragments: Vec<String>,
}

/// The `tools` / `tools-forever` answer.
pub(crate) fn tools_frames(
    dialect: Dialect,
    model: &str,
    body: &Value,
    forever: bool,
    calls_per_tool: u32,
    undeclared: Option<&str>,
) -> Vec<String> {
    let tools = declared_tools(dialect, body);
    if !forever && let Some(results) = trailing_tool_results(dialect, body) {
        let text = format!("The tools said: {}.", results.join("; "));
        return match dialect {
            Dialect::ChatCompletions => chat_text_frames(model, body, &text),
            Dialect::Messages => anthropic_text_frames(model, body, &text),
        };
    }
    if tools.is_empty() {
        return match dialect {
            Dialect::ChatCompletions => chat_text_frames(model, body, "No tools to call."),
            Dialect::Messages => anthropic_text_frames(model, body, "No tools to call."),
        };
    }
    let turn = tool_turns(dialect, body);
    let id = |j: usize| match dialect {
        Dialect::ChatCompletions => format!("call_mock_{turn}_{j}"),
        Dialect::Messages => format!("toolu_mock_{turn}_{j}"),
    };
    let mut calls: Vec<PlannedCall> = Vec::new();
    for tool in &tools {
        for _ in 0..calls_per_tool {
            let j = calls.len();
            let args = tool_arguments(&tool.schema, turn, j).to_string();
            calls.push(PlannedCall {
                id: id(j),
                name: tool.name.clone(),
                fragments: pieces_of(&args, 4),
            });
        }
    }
    if let Some(name) = undeclared {
        calls.push(PlannedCall {
            id: id(calls.len()),
            name: name.to_owned(),
            fragments: pieces_of("{}", 4),
        });
    }
    let usage = TurnUsage {
        prompt_tokens: body.to_string().chars().count().div_ceil(4),
        output_tokens: calls.iter().map(|c| c.fragments.len()).sum(),
    };
    match dialect {
        Dialect::ChatCompletions => tool_call_frames(model, &calls, usage),
        Dialect::Messages => {
            // With extended thinking on, the turn starts as Claude's do: a signed
            // thinking block, here followed by a redacted one.
            let thinking =
                thinking_enabled(body).then(|| (thinking_text(turn), redacted_data(turn)));
            tool_use_frames(model, &calls, thinking, usage)
        }
    }
}

/// The token counts a tool turn reports: the request's JSON length over 4, and one
/// token per argument fragment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TurnUsage {
    pub(crate) prompt_tokens: usize,
    pub(crate) output_tokens: usize,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::history::validate_messages_history;
    use crate::messages::signature_of;

    /// The tool calls a Chat Completions stream makes: (id, name, arguments).
    fn chat_calls(frames: &[String]) -> Vec<(String, String, String)> {
        let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
        for f in frames {
            let Some(data) = f.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            for call in v
                .pointer("/choices/0/delta/tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let e = calls.entry(call["index"].as_u64().unwrap()).or_default();
                if let Some(id) = call["id"].as_str() {
                    e.0 = id.into();
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    e.1 = name.into();
                }
                e.2.push_str(
                    call.pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                );
            }
        }
        calls.into_values().collect()
    }

    #[test]
    fn tools_turns_call_every_declared_tool_then_answer() {
        let tools = json!([
            {"type": "function", "function": {"name": "calculator",
                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "lookup",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                    "days": {"type": "integer"}}}}},
        ]);
        let body = json!({"model": "tools", "tools": tools,
            "messages": [{"role": "user", "content": "go"}]});
        let frames = tools_frames(Dialect::ChatCompletions, "tools", &body, false, 2, None);
        assert_eq!(
            chat_calls(&frames),
            vec![
                (
                    "call_mock_0_0".into(),
                    "calculator".into(),
                    r#"{"expression":"6 * 7"}"#.into()
                ),
                (
                    "call_mock_0_1".into(),
                    "calculator".into(),
                    r#"{"expression":"7 * 7"}"#.into()
                ),
                (
                    "call_mock_0_2".into(),
                    "lookup".into(),
                    r#"{"city":"city-0-2","days":2}"#.into()
                ),
                (
                    "call_mock_0_3".into(),
                    "lookup".into(),
                    r#"{"city":"city-0-3","days":3}"#.into()
                ),
            ]
        );
        assert!(
            frames
                .iter()
                .any(|f| f.contains("\"finish_reason\":\"tool_calls\""))
        );
        // Fragments of the calls are interleaved.
        let first_args: Vec<usize> = frames
            .iter()
            .enumerate()
            .filter(|(_, f)| f.contains("\"index\":1"))
            .map(|(i, _)| i)
            .collect();
        assert!(
            first_args[0]
                < frames
                    .iter()
                    .rposition(|f| f.contains("\"index\":0,"))
                    .unwrap()
        );
        // With the results: the answer.
        let mut answered = body.clone();
        answered["messages"] = json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_mock_0_0", "type": "function", "function": {"name": "calculator", "arguments": "{}"}},
                {"id": "call_mock_0_1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_mock_0_0", "content": "42"},
            {"role": "tool", "tool_call_id": "call_mock_0_1", "content": "49"},
        ]);
        let text: String =
            tools_frames(Dialect::ChatCompletions, "tools", &answered, false, 2, None)
                .iter()
                .filter_map(|f| f.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
                .filter_map(|v| {
                    v.pointer("/choices/0/delta/content")?
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
        assert_eq!(text, "The tools said: 42; 49.");
        // Forever: a second turn of calls, with new ids and arguments.
        let again = tools_frames(
            Dialect::ChatCompletions,
            "tools-forever",
            &answered,
            true,
            1,
            None,
        );
        assert_eq!(
            chat_calls(&again),
            vec![
                (
                    "call_mock_1_0".into(),
                    "calculator".into(),
                    r#"{"expression":"6 * 8"}"#.into()
                ),
                (
                    "call_mock_1_1".into(),
                    "lookup".into(),
                    r#"{"city":"city-1-1","days":1}"#.into()
                ),
            ]
        );
    }

    #[test]
    fn anthropic_tools_turns() {
        let body = json!({"model": "tools", "tools": [{"name": "calculator",
            "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "go"}]});
        let frames = tools_frames(Dialect::Messages, "tools", &body, false, 2, None);
        let payloads: Vec<Value> = frames
            .iter()
            .filter_map(|f| f.split_once("data: "))
            .filter_map(|(_, d)| serde_json::from_str(d.trim()).ok())
            .collect();
        let starts: Vec<&Value> = payloads
            .iter()
            .filter(|p| p["type"] == "content_block_start")
            .collect();
        assert_eq!(starts.len(), 2);
        assert_eq!(starts[1]["content_block"]["id"], "toolu_mock_0_1");
        let args: String = payloads
            .iter()
            .filter(|p| p["index"] == 1)
            .filter_map(|p| p.pointer("/delta/partial_json")?.as_str())
            .collect();
        assert_eq!(args, r#"{"expression":"7 * 7"}"#);
        assert!(
            payloads
                .iter()
                .any(|p| p.pointer("/delta/stop_reason") == Some(&json!("tool_use")))
        );
        let answered = json!({"model": "tools", "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_mock_0_0", "name": "calculator", "input": {}},
                {"type": "tool_use", "id": "toolu_mock_0_1", "name": "calculator", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_mock_0_0", "content": "42"},
                {"type": "tool_result", "tool_use_id": "toolu_mock_0_1", "content": [{"type": "text", "text": "49"}]}]},
        ]});
        assert_eq!(validate_messages_history(&answered), Ok(()));
        let text: String = tools_frames(Dialect::Messages, "tools", &answered, false, 2, None)
            .iter()
            .filter_map(|f| f.split_once("data: "))
            .filter_map(|(_, d)| serde_json::from_str::<Value>(d.trim()).ok())
            .filter_map(|v| v.pointer("/delta/text")?.as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, "The tools said: 42; 49.");
        // Results followed by the next question (how a later turn is sent): a new
        // tool turn, the second of the conversation.
        let mut next = answered.clone();
        next["tools"] = body["tools"].clone();
        next["messages"][2]["content"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "text", "text": "and again"}));
        assert_eq!(validate_messages_history(&next), Ok(()));
        let frames = tools_frames(Dialect::Messages, "tools", &next, false, 1, None);
        assert!(
            frames.concat().contains("\"id\":\"toolu_mock_1_0\""),
            "{frames:?}"
        );
    }

    /// With thinking on, the tool turn starts with a signed thinking block and a
    /// redacted one; its results are accepted only after that turn sent back as it
    /// came, with Anthropic's words otherwise.
    #[test]
    fn thinking_tool_turns_need_their_signed_blocks_back() {
        let body = json!({"model": "tools", "thinking": {"type": "enabled", "budget_tokens": 1024},
            "tools": [{"name": "calculator",
            "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "go"}]});
        let payloads: Vec<Value> = tools_frames(Dialect::Messages, "tools", &body, false, 1, None)
            .iter()
            .filter_map(|f| f.split_once("data: "))
            .filter_map(|(_, d)| serde_json::from_str(d.trim()).ok())
            .collect();
        let starts: Vec<&str> = payloads
            .iter()
            .filter(|p| p["type"] == "content_block_start")
            .filter_map(|p| p.pointer("/content_block/type")?.as_str())
            .collect();
        assert_eq!(starts, ["thinking", "redacted_thinking", "tool_use"]);
        let thinking: String = payloads
            .iter()
            .filter_map(|p| p.pointer("/delta/thinking")?.as_str())
            .collect();
        assert_eq!(thinking, thinking_text(0));
        let signature = payloads
            .iter()
            .find_map(|p| p.pointer("/delta/signature")?.as_str())
            .unwrap();
        assert_eq!(signature, signature_of(&thinking));
        assert_eq!(
            payloads[1..]
                .iter()
                .filter(|p| p["index"] == 2 && p["type"] == "content_block_start")
                .count(),
            1
        );

        let turn = |assistant: Value| {
            json!({"model": "tools", "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": assistant},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_mock_0_0", "content": "42"}]},
            ]})
        };
        let use_ =
            json!({"type": "tool_use", "id": "toolu_mock_0_0", "name": "calculator", "input": {}});
        let signed = json!({"type": "thinking", "thinking": thinking, "signature": signature});
        let redacted = json!({"type": "redacted_thinking", "data": redacted_data(0)});
        assert_eq!(
            validate_messages_history(&turn(json!([signed, redacted, use_]))),
            Ok(())
        );
        assert_eq!(
            validate_messages_history(&turn(json!([redacted, use_]))),
            Ok(())
        );
        let e = validate_messages_history(&turn(json!([use_]))).unwrap_err();
        assert!(
            e.starts_with(
                "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but \
                 found `tool_use`. When `thinking` is enabled, a final `assistant` message must \
                 start with a thinking block"
            ),
            "{e}"
        );
        let tampered = json!({"type": "thinking", "thinking": "other", "signature": signature});
        let e = validate_messages_history(&turn(json!([tampered, use_]))).unwrap_err();
        assert!(e.contains("Invalid `signature`"), "{e}");
        let unsigned = json!({"type": "thinking", "thinking": thinking});
        assert!(validate_messages_history(&turn(json!([unsigned, use_]))).is_err());
        // Without thinking, nothing of the kind is asked for.
        let mut off = turn(json!([use_]));
        off.as_object_mut().unwrap().remove("thinking");
        assert_eq!(validate_messages_history(&off), Ok(()));
    }
}
