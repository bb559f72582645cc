//! The history checks the real APIs make before they answer: tool calls paired with
//! their results, and on Messages the rules for block order, empty content, `tool_use`
//! input and thinking blocks. A violation is answered 400 with the API's own wording,
//! so a client that builds a history the real upstream would refuse fails against the
//! mock too.

use serde_json::Value;

use crate::messages::{signature_of, thinking_enabled};
use crate::request::{blocks, messages_of};

/// Chat Completions' tool-call pairing (OpenAI answers 400 otherwise): an assistant
/// message with `tool_calls` is followed by `tool` messages answering each id, and a
/// `tool` message answers a call of the assistant message before it.
pub(crate) fn validate_chat_history(body: &Value) -> Result<(), String> {
    let messages = messages_of(body);
    // Ids of the last assistant message's calls not answered yet.
    let mut pending: Vec<String> = Vec::new();
    let unanswered = |pending: &[String]| {
        format!(
            "An assistant message with 'tool_calls' must be followed by tool messages \
             responding to each 'tool_call_id'. The following tool_call_ids did not have \
             response messages: {}",
            pending.join(", ")
        )
    };
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        if role == "tool" {
            let id = message
                .get("tool_call_id")
                .and_then(Value::as_str)
                .unwrap_or("");
            match pending.iter().position(|p| p == id) {
                Some(at) => {
                    pending.remove(at);
                }
                None => {
                    return Err(format!(
                        "Invalid parameter: messages.[{i}]: messages with role 'tool' must be \
                         a response to a preceeding message with 'tool_calls' (no pending call \
                         {id:?})."
                    ));
                }
            }
            continue;
        }
        if !pending.is_empty() {
            return Err(unanswered(&pending));
        }
        if role == "assistant" {
            for (k, call) in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let id = call.get("id").and_then(Value::as_str).unwrap_or("");
                let name = call.pointer("/function/name").and_then(Value::as_str);
                let args = call.pointer("/function/arguments").and_then(Value::as_str);
                if id.is_empty() || name.is_none_or(str::is_empty) || args.is_none() {
                    return Err(format!(
                        "Invalid parameter: messages.[{i}].tool_calls.[{k}]: a tool call needs \
                         an id, a function name and its arguments as a string."
                    ));
                }
                pending.push(id.to_owned());
            }
        }
    }
    if pending.is_empty() {
        Ok(())
    } else {
        Err(unanswered(&pending))
    }
}

/// The Messages API's rules for tool use and content (Anthropic answers 400 otherwise).
pub(crate) fn validate_messages_history(body: &Value) -> Result<(), String> {
    let messages = messages_of(body);
    let ids = |m: &Value, kind: &str, key: &str| -> Vec<String> {
        blocks(m, kind)
            .map(|b| {
                b.get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let empty = match message.get("content") {
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            _ => true,
        };
        let final_assistant = i + 1 == messages.len() && role == "assistant";
        if empty && !final_assistant {
            return Err(format!(
                "messages.{i}: all messages must have non-empty content except for the optional \
                 final assistant message"
            ));
        }
        for (k, block) in message
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if block.get("type").and_then(Value::as_str) == Some("tool_use")
                && !block.get("input").is_some_and(Value::is_object)
            {
                return Err(format!(
                    "messages.{i}.content.{k}.tool_use.input: Input should be a valid dictionary"
                ));
            }
        }
        let results = ids(message, "tool_result", "tool_use_id");
        if !results.is_empty() {
            let asked = if i > 0
                && messages[i - 1].get("role").and_then(Value::as_str) == Some("assistant")
            {
                ids(&messages[i - 1], "tool_use", "id")
            } else {
                Vec::new()
            };
            if let Some(stray) = results.iter().find(|r| !asked.contains(r)) {
                return Err(format!(
                    "messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: \
                     {stray}. Each `tool_result` block must have a corresponding `tool_use` block \
                     in the previous message."
                ));
            }
            let kinds: Vec<&str> = message
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|b| b.get("type").and_then(Value::as_str))
                .collect();
            if let Some(first_other) = kinds.iter().position(|k| *k != "tool_result")
                && kinds[first_other..].contains(&"tool_result")
            {
                return Err(format!(
                    "messages.{i}.content: `tool_result` blocks must come before any other \
                     content in their message"
                ));
            }
        }
        for (k, block) in blocks(message, "thinking").enumerate() {
            let text = block.get("thinking").and_then(Value::as_str).unwrap_or("");
            let signature = block.get("signature").and_then(Value::as_str).unwrap_or("");
            if signature != signature_of(text) {
                return Err(format!(
                    "messages.{i}.content.{k}: Invalid `signature` in `thinking` block"
                ));
            }
        }
        if blocks(message, "redacted_thinking").any(|b| {
            b.get("data")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        }) {
            return Err(format!(
                "messages.{i}.content: Invalid `data` in `redacted_thinking` block"
            ));
        }
        if role == "assistant" {
            let uses = ids(message, "tool_use", "id");
            if uses.is_empty() {
                continue;
            }
            let next = messages.get(i + 1);
            let answered = match next {
                Some(n) if n.get("role").and_then(Value::as_str) == Some("user") => {
                    ids(n, "tool_result", "tool_use_id")
                }
                _ => Vec::new(),
            };
            let missing: Vec<&str> = uses
                .iter()
                .filter(|u| !answered.contains(u))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "messages.{}: `tool_use` ids were found without `tool_result` blocks \
                     immediately after: {}. Each `tool_use` block must have a corresponding \
                     `tool_result` block in the next message.",
                    i + 1,
                    missing.join(", ")
                ));
            }
        }
    }
    // With thinking on, the assistant turn the last tool results answer must start
    // with its thinking (Anthropic docs, "Extended thinking with tool use": the signed
    // block is sent back as it came).
    let last = messages.len().wrapping_sub(1);
    if thinking_enabled(body)
        && let Some(results) = messages.get(last)
        && blocks(results, "tool_result").next().is_some()
        && last > 0
    {
        let first = messages[last - 1]
            .get("content")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .and_then(|b| b.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("text");
        if first != "thinking" && first != "redacted_thinking" {
            return Err(format!(
                "messages.{}.content.0.type: Expected `thinking` or `redacted_thinking`, but \
                 found `{first}`. When `thinking` is enabled, a final `assistant` message must \
                 start with a thinking block (preceeding the lastmost set of `tool_use` and \
                 `tool_result` blocks). We recommend you include thinking blocks from previous \
                 turns. To avoid this requirement, disable `thinking`. Please consult our \
                 documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking",
                last - 1
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_history_pairs_every_call_with_its_result() {
        let call = |id: &str| {
            json!({"id": id, "type": "function",
            "function": {"name": "f", "arguments": "{}"}})
        };
        let check = |messages: Value| validate_chat_history(&json!({"messages": messages}));
        assert_eq!(check(json!([{"role": "user", "content": "hi"}])), Ok(()));
        assert_eq!(
            check(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [call("a"), call("b")]},
                {"role": "tool", "tool_call_id": "b", "content": "1"},
                {"role": "tool", "tool_call_id": "a", "content": "2"},
                {"role": "user", "content": "more"},
            ])),
            Ok(())
        );
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [call("a"), call("b")]},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
            {"role": "user", "content": "more"},
        ]))
        .unwrap_err();
        assert!(e.contains("did not have response messages: b"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [call("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains(": a"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
        ]))
        .unwrap_err();
        assert!(e.contains("role 'tool'"), "{e}");
        let e = check(json!([
            {"role": "assistant", "content": null, "tool_calls": [call("a")]},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
        ]))
        .unwrap_err();
        assert!(e.contains("role 'tool'"), "{e}");
    }

    #[test]
    fn messages_history_pairs_every_tool_use_with_a_result() {
        let check = |messages: Value| validate_messages_history(&json!({"messages": messages}));
        let use_ = |id: &str| json!({"type": "tool_use", "id": id, "name": "f", "input": {}});
        let result = |id: &str| json!({"type": "tool_result", "tool_use_id": id, "content": "x"});
        assert_eq!(
            check(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}, use_("a"), use_("b")]},
                {"role": "user", "content": [result("a"), result("b"), {"type": "text", "text": "next"}]},
            ])),
            Ok(())
        );
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a"), use_("b")]},
            {"role": "user", "content": [result("a")]},
        ]))
        .unwrap_err();
        assert!(e.starts_with("messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: b"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a")]},
            {"role": "user", "content": "no results"},
        ]))
        .unwrap_err();
        assert!(e.contains("without `tool_result`"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains("without `tool_result`"), "{e}");
        let e = check(json!([
            {"role": "user", "content": [result("zz")]},
        ]))
        .unwrap_err();
        assert!(e.contains("unexpected `tool_use_id`"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use_("a")]},
            {"role": "user", "content": [{"type": "text", "text": "first"}, result("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains("must come before"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": []},
            {"role": "user", "content": "again"},
        ]))
        .unwrap_err();
        assert!(e.contains("non-empty content"), "{e}");
        let e = check(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": "{}"}]},
            {"role": "user", "content": [result("a")]},
        ]))
        .unwrap_err();
        assert!(e.contains("valid dictionary"), "{e}");
    }
}
