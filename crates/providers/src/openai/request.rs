//! The Chat Completions request body (OpenAI API reference, "Create chat completion").
//!
//! `{model, messages, stream: true, stream_options: {include_usage: true}, tools?}`.
//! History maps onto OpenAI's message roles: the system prompt becomes a first
//! `system` message; an assistant message with tool calls carries them as
//! `tool_calls: [{id, type: "function", function: {name, arguments}}]` and is followed by
//! one `tool` message (`tool_call_id`, `content`) for *each* call, as the API answers
//! 400 to any call without a result right after it (docs/lessons.md: grimoire's 400s). The
//! content is the call's output, else the `Tool` message for that id, else
//! [`MISSING_RESULT`]: a call never goes unanswered, even one saved without output. A
//! `Tool` message already sent that way is not sent again. `arguments` is the call's
//! text when it is a JSON object, else `{}` (a call cut off mid-arguments, or one with
//! no parameters, which streams none): the API wants an object's JSON text there.
//! Reasoning is not sent back (DeepSeek rejects its own `reasoning_content` in input).

use std::collections::{HashMap, HashSet};

use genstream_engine::provider::{ModelRequest, Role};
use serde_json::{Map, Value, json};

/// The `tool` message content for a call that has no result in the history.
pub(crate) const MISSING_RESULT: &str = r#"{"error":"no result: the tool call did not complete"}"#;

/// The JSON body of one streaming request for upstream model `model`.
pub(crate) fn request_body(model: &str, request: &ModelRequest) -> Value {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = request.system_prompt.as_deref().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    // Tool results by call id, from `Tool` messages (the first one for an id wins).
    let mut tool_messages: HashMap<&str, &str> = HashMap::new();
    for message in &request.messages {
        if message.role == Role::Tool {
            let id = message.tool_call_id.as_deref().unwrap_or_default();
            tool_messages.entry(id).or_insert(message.text.as_str());
        }
    }
    // Tool results already sent after their assistant message; a later `Tool` message
    // for the same call would be a duplicate the API rejects.
    let mut answered: HashSet<&str> = HashSet::new();
    for message in &request.messages {
        match message.role {
            Role::User => messages.push(json!({"role": "user", "content": message.text})),
            Role::Assistant if message.tool_calls.is_empty() => {
                messages.push(json!({"role": "assistant", "content": message.text}));
            }
            Role::Assistant => {
                let calls: Vec<Value> = message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        json!({
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": arguments(&call.args)},
                        })
                    })
                    .collect();
                let content = if message.text.is_empty() {
                    Value::Null
                } else {
                    Value::String(message.text.clone())
                };
                messages
                    .push(json!({"role": "assistant", "content": content, "tool_calls": calls}));
                for call in &message.tool_calls {
                    let output = call
                        .output
                        .as_deref()
                        .or_else(|| tool_messages.get(call.id.as_str()).copied())
                        .unwrap_or(MISSING_RESULT);
                    messages
                        .push(json!({"role": "tool", "tool_call_id": call.id, "content": output}));
                    answered.insert(call.id.as_str());
                }
            }
            Role::Tool => {
                let id = message.tool_call_id.as_deref().unwrap_or_default();
                if !answered.contains(id) {
                    messages
                        .push(json!({"role": "tool", "tool_call_id": id, "content": message.text}));
                }
            }
        }
    }

    let mut body = Map::new();
    body.insert("model".into(), Value::String(model.to_owned()));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("stream".into(), Value::Bool(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    if !request.tools.is_empty() {
        let tools = request
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters,
                    },
                })
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    Value::Object(body)
}

/// A call's `arguments` as sent: its text when that is a JSON object, else `{}`.
fn arguments(args: &str) -> &str {
    match serde_json::from_str::<Value>(args) {
        Ok(Value::Object(_)) => args,
        _ => "{}",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use genstream_engine::event::ToolCall;
    use genstream_engine::provider::{ChatMessage, ToolSpec};

    fn msg(role: Role, text: &str) -> ChatMessage {
        ChatMessage {
            role,
            text: text.into(),
            tool_calls: vec![],
            tool_call_id: None,
            reasoning: vec![],
        }
    }

    #[test]
    fn maps_history_tools_and_options() {
        let mut assistant = msg(Role::Assistant, "");
        assistant.tool_calls = vec![
            ToolCall {
                id: "call_1".into(),
                name: "add".into(),
                args: r#"{"a":1}"#.into(),
                output: Some("2".into()),
            },
            ToolCall {
                id: "call_2".into(),
                name: "now".into(),
                args: String::new(),
                output: None,
            },
            // Cut off inside its arguments, and saved without output.
            ToolCall {
                id: "call_3".into(),
                name: "add".into(),
                args: r#"{"a": "#.into(),
                output: None,
            },
            // Arguments that are JSON, but not an object.
            ToolCall {
                id: "call_4".into(),
                name: "add".into(),
                args: "[1, 2]".into(),
                output: Some(r#"{"error":"arguments must be a JSON object"}"#.into()),
            },
        ];
        let mut dup = msg(Role::Tool, "2");
        dup.tool_call_id = Some("call_1".into());
        let mut second = msg(Role::Tool, "noon");
        second.tool_call_id = Some("call_2".into());
        let request = ModelRequest {
            model: "configured".into(),
            system_prompt: Some("be brief".into()),
            messages: vec![msg(Role::User, "hi"), assistant, dup, second],
            tools: vec![ToolSpec {
                name: "add".into(),
                description: "adds".into(),
                parameters: json!({"type": "object"}),
            }],
            call_index: 1,
        };
        let body = request_body("gpt-4o", &request);
        assert_eq!(
            body,
            json!({
                "model": "gpt-4o",
                "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":1}"}},
                        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
                        {"id": "call_3", "type": "function", "function": {"name": "add", "arguments": "{}"}},
                        {"id": "call_4", "type": "function", "function": {"name": "add", "arguments": "{}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "2"},
                    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
                    {"role": "tool", "tool_call_id": "call_3", "content": MISSING_RESULT},
                    {"role": "tool", "tool_call_id": "call_4", "content": "{\"error\":\"arguments must be a JSON object\"}"},
                ],
                "tools": [{"type": "function", "function": {
                    "name": "add", "description": "adds", "parameters": {"type": "object"}}}],
            })
        );
    }

    #[test]
    fn no_tools_key_without_tools() {
        let request = ModelRequest {
            messages: vec![msg(Role::User, "hi")],
            ..ModelRequest::default()
        };
        let body = request_body("m", &request);
        assert!(body.get("tools").is_none());
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
    }
}
