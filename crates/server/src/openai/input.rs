//! What an OpenAI request's conversation becomes in genstream: the system prompt, the
//! turns saved before the new input ([`PriorTurn`]), and the new input itself — the
//! last user message's text, or the tool results that end the request.
//!
//! Chat Completions `messages` and Responses `input` items map the same way:
//! `system` and `developer` messages (anywhere) are joined into the system prompt, in
//! order; user and assistant messages become turns, an assistant's `tool_calls` (or
//! Responses `function_call` items) its calls; `tool` messages (`function_call_output`
//! items) become tool results. The request must end with a user message or with tool
//! results. Content is text: a string, or parts of type `text` / `input_text` /
//! `output_text` (joined); any other part (images, audio, files) is a 400 naming it.

use genstream_engine::event::ToolCall;
use genstream_engine::manager::{PriorTurn, ToolResult};
use genstream_engine::provider::ToolSpec;
use serde_json::{Map, Value};

use crate::error::OpenAiError;

/// A request's conversation, as genstream takes it.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Conversation {
    pub system_prompt: Option<String>,
    pub prior: Vec<PriorTurn>,
    /// The last user message (empty when the input is tool results).
    pub text: String,
    pub tool_results: Vec<ToolResult>,
}

/// One message of either API, normalised.
enum Msg {
    System(String),
    User(String),
    Assistant(String, Vec<ToolCall>),
    Tool(ToolResult),
}

/// Chat Completions `messages` (`param` is `messages`).
pub(crate) fn chat_messages(messages: &Value) -> Result<Conversation, OpenAiError> {
    let list = messages
        .as_array()
        .ok_or_else(|| OpenAiError::invalid("messages", "must be an array of messages"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let p = format!("messages[{i}]");
        let obj = m
            .as_object()
            .ok_or_else(|| OpenAiError::invalid(&p, "must be an object"))?;
        let role = str_field(obj, "role", &p)?;
        let content = || text_content(obj.get("content"), &format!("{p}.content"));
        out.push(match role {
            "system" | "developer" => Msg::System(content()?),
            "user" => Msg::User(content()?),
            "assistant" => {
                let mut calls = Vec::new();
                if let Some(tc) = obj.get("tool_calls").filter(|v| !v.is_null()) {
                    let tc = tc.as_array().ok_or_else(|| {
                        OpenAiError::invalid(&format!("{p}.tool_calls"), "must be an array")
                    })?;
                    for (j, c) in tc.iter().enumerate() {
                        let q = format!("{p}.tool_calls[{j}]");
                        let c = c
                            .as_object()
                            .ok_or_else(|| OpenAiError::invalid(&q, "must be an object"))?;
                        let f = c
                            .get("function")
                            .and_then(Value::as_object)
                            .ok_or_else(|| {
                                OpenAiError::invalid(&format!("{q}.function"), "is required")
                            })?;
                        calls.push(ToolCall {
                            id: str_field(c, "id", &q)?.to_string(),
                            name: str_field(f, "name", &format!("{q}.function"))?.to_string(),
                            args: f
                                .get("arguments")
                                .and_then(Value::as_str)
                                .unwrap_or("{}")
                                .to_string(),
                            output: None,
                        });
                    }
                }
                let text = match obj.get("content") {
                    None | Some(Value::Null) => String::new(),
                    c => text_content(c, &format!("{p}.content"))?,
                };
                Msg::Assistant(text, calls)
            }
            "tool" => Msg::Tool(ToolResult {
                call_id: str_field(obj, "tool_call_id", &p)?.to_string(),
                output: text_content(obj.get("content"), &format!("{p}.content"))?,
            }),
            other => {
                return Err(OpenAiError::invalid(
                    &format!("{p}.role"),
                    format!(
                        "unsupported role {other:?}: use system, developer, user, assistant or tool"
                    ),
                ));
            }
        });
    }
    conversation(out, "messages")
}

/// Responses `input`: a string (one user message) or a list of items (`param`
/// `input`). `instructions` come first in the system prompt.
pub(crate) fn response_input(
    input: &Value,
    instructions: Option<&str>,
) -> Result<Conversation, OpenAiError> {
    let mut out = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        out.push(Msg::System(i.to_string()));
    }
    match input {
        Value::String(s) => out.push(Msg::User(s.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("input[{i}]");
                let obj = item
                    .as_object()
                    .ok_or_else(|| OpenAiError::invalid(&p, "must be an object"))?;
                let kind = obj.get("type").and_then(Value::as_str).unwrap_or("message");
                match kind {
                    "message" => {
                        let role = str_field(obj, "role", &p)?;
                        let text = text_content(obj.get("content"), &format!("{p}.content"))?;
                        out.push(match role {
                            "system" | "developer" => Msg::System(text),
                            "user" => Msg::User(text),
                            "assistant" => Msg::Assistant(text, Vec::new()),
                            other => {
                                return Err(OpenAiError::invalid(
                                    &format!("{p}.role"),
                                    format!("unsupported role {other:?}"),
                                ));
                            }
                        });
                    }
                    "function_call" => {
                        let call = ToolCall {
                            id: str_field(obj, "call_id", &p)?.to_string(),
                            name: str_field(obj, "name", &p)?.to_string(),
                            args: obj
                                .get("arguments")
                                .and_then(Value::as_str)
                                .unwrap_or("{}")
                                .to_string(),
                            output: None,
                        };
                        // Calls join the assistant turn right before them.
                        match out.last_mut() {
                            Some(Msg::Assistant(_, calls)) => calls.push(call),
                            _ => out.push(Msg::Assistant(String::new(), vec![call])),
                        }
                    }
                    "function_call_output" => out.push(Msg::Tool(ToolResult {
                        call_id: str_field(obj, "call_id", &p)?.to_string(),
                        output: match obj.get("output") {
                            Some(Value::String(s)) => s.clone(),
                            o => text_content(o, &format!("{p}.output"))?,
                        },
                    })),
                    // Reasoning items a client echoes back carry nothing genstream
                    // can send upstream again.
                    "reasoning" => {}
                    other => {
                        return Err(OpenAiError::invalid(
                            &format!("{p}.type"),
                            format!(
                                "unsupported input item type {other:?}: use message, function_call or function_call_output"
                            ),
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(OpenAiError::invalid(
                "input",
                "must be a string or an array of input items",
            ));
        }
    }
    conversation(out, "input")
}

/// The normalised messages as genstream's conversation.
fn conversation(msgs: Vec<Msg>, param: &str) -> Result<Conversation, OpenAiError> {
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for m in msgs {
        match m {
            Msg::System(s) => system.push(s),
            m => turns.push(m),
        }
    }
    let mut conv = Conversation {
        system_prompt: (!system.is_empty()).then(|| system.join("\n\n")),
        ..Default::default()
    };
    // The new input: the trailing tool results, or the last user message.
    let trailing_tools = turns
        .iter()
        .rev()
        .take_while(|m| matches!(m, Msg::Tool(_)))
        .count();
    if trailing_tools > 0 {
        for m in turns.drain(turns.len() - trailing_tools..) {
            if let Msg::Tool(r) = m {
                conv.tool_results.push(r);
            }
        }
    } else {
        match turns.pop() {
            Some(Msg::User(text)) if !text.trim().is_empty() => conv.text = text,
            Some(Msg::User(_)) => {
                return Err(OpenAiError::invalid(
                    param,
                    "the last user message is empty",
                ));
            }
            _ => {
                return Err(OpenAiError::invalid(
                    param,
                    "must end with a user message or with tool results",
                ));
            }
        }
    }
    for m in turns {
        match m {
            Msg::User(t) => conv.prior.push(PriorTurn::User(t)),
            Msg::Assistant(text, tool_calls) => {
                conv.prior.push(PriorTurn::Assistant { text, tool_calls })
            }
            Msg::Tool(r) => match conv.prior.last_mut() {
                Some(PriorTurn::ToolResults(rs)) => rs.push(r),
                _ => conv.prior.push(PriorTurn::ToolResults(vec![r])),
            },
            Msg::System(_) => {}
        }
    }
    Ok(conv)
}

/// Function tools of a request: Chat Completions `{type: "function", function: {name,
/// description, parameters}}` or Responses `{type: "function", name, description,
/// parameters}` (`chat` says which). Any other type is a 400 naming it.
pub(crate) fn function_tools(
    tools: Option<&Value>,
    chat: bool,
) -> Result<Vec<ToolSpec>, OpenAiError> {
    let Some(tools) = tools.filter(|t| !t.is_null()) else {
        return Ok(Vec::new());
    };
    let list = tools
        .as_array()
        .ok_or_else(|| OpenAiError::invalid("tools", "must be an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let p = format!("tools[{i}]");
        let obj = t
            .as_object()
            .ok_or_else(|| OpenAiError::invalid(&p, "must be an object"))?;
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            return Err(OpenAiError::invalid(
                &format!("{p}.type"),
                format!("unsupported tool type {kind:?}: only function tools are supported"),
            ));
        }
        let (f, fp) = if chat {
            let f = obj
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| OpenAiError::invalid(&format!("{p}.function"), "is required"))?;
            (f, format!("{p}.function"))
        } else {
            (obj, p.clone())
        };
        out.push(ToolSpec {
            name: str_field(f, "name", &fp)?.to_string(),
            description: f
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            parameters: f
                .get("parameters")
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
        });
    }
    Ok(out)
}

/// A required string field `name` of `obj` (`parent` is the object's param path).
fn str_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    parent: &str,
) -> Result<&'a str, OpenAiError> {
    obj.get(name).and_then(Value::as_str).ok_or_else(|| {
        OpenAiError::invalid(
            &format!("{parent}.{name}"),
            "is required and must be a string",
        )
    })
}

/// The text of a `content`: a string, or text parts joined.
fn text_content(content: Option<&Value>, param: &str) -> Result<String, OpenAiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("text" | "input_text" | "output_text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(OpenAiError::invalid(
                            &format!("{param}[{j}]"),
                            format!("unsupported content part {kind:?}: only text is supported"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        None | Some(Value::Null) => Err(OpenAiError::invalid(param, "is required")),
        Some(_) => Err(OpenAiError::invalid(
            param,
            "must be a string or an array of parts",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_messages_map_onto_prior_turns_and_the_new_input() {
        let conv = chat_messages(&json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
            {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "tomorrow?"}]},
        ]))
        .unwrap();
        assert_eq!(
            conv.system_prompt.as_deref(),
            Some("Be brief.\n\nUse metric.")
        );
        assert_eq!(conv.text, "and tomorrow?");
        assert!(conv.tool_results.is_empty());
        assert_eq!(conv.prior.len(), 4);
        assert!(matches!(&conv.prior[2], PriorTurn::ToolResults(r) if r[0].output == "sunny"));

        let conv = chat_messages(&json!([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]))
        .unwrap();
        assert_eq!(conv.text, "");
        assert_eq!(conv.tool_results.len(), 1);
        assert_eq!(conv.prior.len(), 2);
    }

    #[test]
    fn bad_messages_name_their_param() {
        let param = |v: Value| chat_messages(&v).unwrap_err().error.to_string();
        assert!(
            param(json!([{"role": "user", "content": [{"type": "image_url"}]}]))
                .contains("messages[0].content[0]")
        );
        assert!(param(json!([{"role": "robot", "content": "x"}])).contains("messages[0].role"));
        assert!(param(json!([{"role": "assistant", "content": "x"}])).contains("messages"));
        assert!(param(json!("hi")).contains("messages"));
    }

    #[test]
    fn response_input_items() {
        let conv = response_input(
            &json!([
                {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ]),
            Some("Be brief."),
        )
        .unwrap();
        assert_eq!(conv.system_prompt.as_deref(), Some("Be brief."));
        assert_eq!(conv.tool_results[0].call_id, "c1");
        assert!(
            matches!(&conv.prior[1], PriorTurn::Assistant { tool_calls, .. } if tool_calls[0].id == "c1")
        );
        assert_eq!(response_input(&json!("hi"), None).unwrap().text, "hi");
    }
}
