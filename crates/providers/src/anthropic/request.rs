//! The Messages API request body (Anthropic API docs, "Messages"; "Tool use with
//! Claude", "Handling tool use and tool results").
//!
//! `{model, max_tokens, stream: true, system?, messages, tools?, thinking?}`. The system
//! prompt is the top-level `system` string, not a message. History maps onto Anthropic's
//! two roles and content blocks:
//!
//! - a user message is `{"role": "user", "content": text}`;
//! - an assistant message is `{"role": "assistant", "content": [text?, tool_use…]}`,
//!   each tool call a `{"type": "tool_use", id, name, input}` block whose `input` is the
//!   call's arguments parsed as a JSON object (`{}` when they are empty, not JSON, or
//!   not an object: the API requires an object, and a call with no parameters streams
//!   none);
//! - tool results are `{"type": "tool_result", tool_use_id, content}` blocks of a
//!   *user* message. The API requires every `tool_use` to be answered by a
//!   `tool_result` in the very next message, so the results of an assistant message's
//!   calls (`ToolCall::output`, or else the `Tool` message for that call id) are all
//!   put in one user message right after it; a call with neither gets an `is_error`
//!   result saying it did not complete, so no `tool_use` is ever sent unanswered. A
//!   result that is one of the job's error results (`{"error": …}`: the tool failed,
//!   was cancelled, not available or not run) carries `is_error: true` too. A
//!   `Tool` message already sent that way is not sent again; other `Tool` messages are
//!   grouped with the results before them. A user message that follows tool results
//!   joins their message, after them (the API wants `tool_result` blocks first).
//!
//! An assistant message with neither text nor tool calls (an answer cut off before its
//! first token) is left out: the API rejects empty content.
//!
//! Extended thinking (Anthropic docs, "Extended thinking", "Preserving thinking
//! blocks"): with `thinking` on, the assistant turn that the last tool results answer
//! must start with the thinking block(s) the model produced for it — `{"type":
//! "thinking", thinking, signature}` and `{"type": "redacted_thinking", data}`, sent
//! back verbatim — or the API answers 400 ("Expected `thinking` or
//! `redacted_thinking`, but found `tool_use`…"). So each assistant message starts with
//! its [`ReasoningBlock`]s when thinking is on (earlier turns' blocks are accepted and
//! ignored by the API). With thinking off none is sent: a thinking block is refused in
//! a request without thinking. When thinking is on but that last tool turn has no
//! signed block — it came from a model without thinking, or was saved before
//! signatures were kept — the request is sent with thinking off, as the API's own
//! message advises, rather than fail every later turn of the conversation.

use std::collections::{HashMap, HashSet};

use genstream_engine::provider::{ModelRequest, ReasoningBlock, Role};
use serde_json::{Map, Value, json};

use crate::config::AnthropicModelOptions;

/// The `tool_result` text for a call that has no result in the history.
pub(crate) const MISSING_RESULT: &str = "no result: the tool call did not complete";

/// The JSON body of one streaming request for the model of `options`.
pub(crate) fn request_body(options: &AnthropicModelOptions, request: &ModelRequest) -> Value {
    let mut thinking = options.thinking_budget_tokens.is_some();
    let mut messages = messages(request, thinking);
    if thinking && !last_tool_turn_starts_with_thinking(&messages) {
        thinking = false;
        messages = self::messages(request, false);
    }

    let mut body = Map::new();
    body.insert("model".into(), Value::String(options.model.clone()));
    body.insert("max_tokens".into(), Value::from(options.max_tokens));
    body.insert("stream".into(), Value::Bool(true));
    if let Some(system) = request.system_prompt.as_deref().filter(|s| !s.is_empty()) {
        body.insert("system".into(), Value::String(system.to_owned()));
    }
    body.insert("messages".into(), Value::Array(messages));
    if !request.tools.is_empty() {
        let tools = request
            .tools
            .iter()
            .map(|tool| {
                // The API requires an object schema; a tool declared without one takes
                // no arguments.
                let schema = if tool.parameters.is_object() {
                    tool.parameters.clone()
                } else {
                    json!({"type": "object", "properties": {}})
                };
                json!({
                    "name": tool.name,
                    "description": tool.description,
                    "input_schema": schema,
                })
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(budget) = options.thinking_budget_tokens.filter(|_| thinking) {
        body.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
    }
    Value::Object(body)
}

/// Whether the API's rule for thinking holds: when the last message holds tool
/// results, the assistant message before it starts with a thinking block.
fn last_tool_turn_starts_with_thinking(messages: &[Value]) -> bool {
    let [.., assistant, last] = messages else {
        return true;
    };
    let is_result = |b: &Value| b.get("type").and_then(Value::as_str) == Some("tool_result");
    let has_results = last
        .get("content")
        .and_then(Value::as_array)
        .is_some_and(|blocks| blocks.iter().any(is_result));
    if !has_results {
        return true;
    }
    let first = assistant
        .get("content")
        .and_then(Value::as_array)
        .and_then(|blocks| blocks.first())
        .and_then(|b| b.get("type"))
        .and_then(Value::as_str);
    matches!(first, Some("thinking" | "redacted_thinking"))
}

/// The `messages` array of `request`, assistant turns starting with their thinking
/// blocks when `thinking` is on.
fn messages(request: &ModelRequest, thinking: bool) -> Vec<Value> {
    // Tool results by call id, from `Tool` messages (the first one for an id wins).
    let mut tool_messages: HashMap<&str, &str> = HashMap::new();
    for message in &request.messages {
        if message.role == Role::Tool {
            let id = message.tool_call_id.as_deref().unwrap_or_default();
            tool_messages.entry(id).or_insert(message.text.as_str());
        }
    }
    let mut messages = Messages::default();
    // Calls whose result was sent right after their tool_use.
    let mut answered: HashSet<&str> = HashSet::new();
    for message in &request.messages {
        match message.role {
            Role::User => messages.user_text(&message.text),
            Role::Assistant => {
                if message.text.is_empty() && message.tool_calls.is_empty() {
                    continue;
                }
                let reasoning = if thinking {
                    message.reasoning.as_slice()
                } else {
                    &[]
                };
                let mut content =
                    Vec::with_capacity(reasoning.len() + message.tool_calls.len() + 1);
                for block in reasoning {
                    content.push(match block {
                        ReasoningBlock::Thinking {
                            thinking: text,
                            signature,
                        } => {
                            json!({"type": "thinking", "thinking": text, "signature": signature})
                        }
                        ReasoningBlock::Redacted { data } => {
                            json!({"type": "redacted_thinking", "data": data})
                        }
                    });
                }
                if !message.text.is_empty() {
                    content.push(json!({"type": "text", "text": message.text}));
                }
                for call in &message.tool_calls {
                    content.push(json!({
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": tool_input(&call.args),
                    }));
                }
                messages.assistant(content);
                for call in &message.tool_calls {
                    let result = call
                        .output
                        .as_deref()
                        .or_else(|| tool_messages.get(call.id.as_str()).copied());
                    messages.tool_result(&call.id, result);
                    answered.insert(call.id.as_str());
                }
            }
            Role::Tool => {
                let id = message.tool_call_id.as_deref().unwrap_or_default();
                if !answered.contains(id) {
                    messages.tool_result(id, Some(&message.text));
                }
            }
        }
    }

    messages.finish()
}

/// A tool call's arguments as the `input` object of a `tool_use` block.
fn tool_input(args: &str) -> Value {
    match serde_json::from_str::<Value>(args) {
        Ok(value @ Value::Object(_)) => value,
        _ => Value::Object(Map::new()),
    }
}

/// The `messages` array being built, with the tool results not yet placed.
#[derive(Default)]
struct Messages {
    out: Vec<Value>,
    /// `tool_result` blocks waiting to become (the start of) the next user message.
    results: Vec<Value>,
}

impl Messages {
    fn user_text(&mut self, text: &str) {
        if self.results.is_empty() {
            self.out.push(json!({"role": "user", "content": text}));
            return;
        }
        let mut content = std::mem::take(&mut self.results);
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        self.out.push(json!({"role": "user", "content": content}));
    }

    fn assistant(&mut self, content: Vec<Value>) {
        self.flush_results();
        self.out
            .push(json!({"role": "assistant", "content": content}));
    }

    /// Queues the result of call `id`; `None` when the call never completed.
    fn tool_result(&mut self, id: &str, result: Option<&str>) {
        let mut block = Map::new();
        block.insert("type".into(), "tool_result".into());
        block.insert("tool_use_id".into(), id.into());
        match result {
            // `content` is optional; an empty text block would be rejected.
            Some("") => {}
            Some(text) => {
                block.insert("content".into(), text.into());
                // A failed call (the tool's error, bad arguments, cancelled, not
                // available, not run) is flagged, as the API's docs ask, so the
                // model does not read the error as the tool's answer.
                if genstream_engine::tools::is_error_result(text) {
                    block.insert("is_error".into(), true.into());
                }
            }
            None => {
                block.insert("content".into(), MISSING_RESULT.into());
                block.insert("is_error".into(), true.into());
            }
        }
        self.results.push(Value::Object(block));
    }

    fn flush_results(&mut self) {
        if !self.results.is_empty() {
            let content = std::mem::take(&mut self.results);
            self.out.push(json!({"role": "user", "content": content}));
        }
    }

    fn finish(mut self) -> Vec<Value> {
        self.flush_results();
        self.out
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

    fn tool_msg(id: &str, text: &str) -> ChatMessage {
        ChatMessage {
            tool_call_id: Some(id.into()),
            ..msg(Role::Tool, text)
        }
    }

    fn call(id: &str, name: &str, args: &str, output: Option<&str>) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: name.into(),
            args: args.into(),
            output: output.map(str::to_owned),
        }
    }

    fn options() -> AnthropicModelOptions {
        AnthropicModelOptions {
            model: "claude-sonnet-4-5".into(),
            max_tokens: 4096,
            thinking_budget_tokens: None,
        }
    }

    #[test]
    fn maps_history_tools_and_options() {
        let mut assistant = msg(Role::Assistant, "Let me check.");
        assistant.tool_calls = vec![
            call("toolu_1", "add", r#"{"a":1,"b":2}"#, Some("3")),
            call("toolu_2", "now", "", None),
            call("toolu_3", "broken", "{\"x\":", None),
            call("toolu_4", "add", "{}", Some(r#"{"error":"cancelled"}"#)),
        ];
        let request = ModelRequest {
            model: "configured".into(),
            system_prompt: Some("be brief".into()),
            messages: vec![
                msg(Role::User, "hi"),
                assistant,
                // Already answered by its output: not sent twice.
                tool_msg("toolu_1", "3"),
                tool_msg("toolu_2", "noon"),
                msg(Role::Assistant, "It is noon; 1+2=3."),
                msg(Role::User, "thanks"),
            ],
            tools: vec![
                ToolSpec {
                    name: "add".into(),
                    description: "adds".into(),
                    parameters: json!({"type": "object", "properties": {"a": {"type": "number"}}}),
                },
                ToolSpec {
                    name: "now".into(),
                    description: "the time".into(),
                    parameters: Value::Null,
                },
            ],
            call_index: 1,
        };
        let options = AnthropicModelOptions {
            max_tokens: 8000,
            thinking_budget_tokens: Some(2048),
            ..options()
        };
        assert_eq!(
            request_body(&options, &request),
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 8000,
                "stream": true,
                "system": "be brief",
                "thinking": {"type": "enabled", "budget_tokens": 2048},
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1, "b": 2}},
                        {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
                        {"type": "tool_use", "id": "toolu_3", "name": "broken", "input": {}},
                        {"type": "tool_use", "id": "toolu_4", "name": "add", "input": {}},
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "3"},
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "noon"},
                        {"type": "tool_result", "tool_use_id": "toolu_3", "content": MISSING_RESULT, "is_error": true},
                        {"type": "tool_result", "tool_use_id": "toolu_4", "content": "{\"error\":\"cancelled\"}", "is_error": true},
                    ]},
                    {"role": "assistant", "content": [{"type": "text", "text": "It is noon; 1+2=3."}]},
                    {"role": "user", "content": "thanks"},
                ],
                "tools": [
                    {"name": "add", "description": "adds",
                     "input_schema": {"type": "object", "properties": {"a": {"type": "number"}}}},
                    {"name": "now", "description": "the time",
                     "input_schema": {"type": "object", "properties": {}}},
                ],
            })
        );
    }

    /// With thinking on, each assistant turn starts with its signed and redacted
    /// blocks, verbatim; with thinking off, none is sent; and when the tool turn the
    /// last results answer has none, thinking is turned off for the request.
    #[test]
    fn thinking_blocks_go_back_only_with_thinking_on() {
        let signed = ReasoningBlock::Thinking {
            thinking: "I should add.".into(),
            signature: "EqSig==".into(),
        };
        let redacted = ReasoningBlock::Redacted {
            data: "EmwKAhgB".into(),
        };
        let mut assistant = msg(Role::Assistant, "");
        assistant.tool_calls = vec![call("toolu_1", "add", "{}", Some("3"))];
        assistant.reasoning = vec![signed, redacted];
        let request = ModelRequest {
            messages: vec![msg(Role::User, "add"), assistant.clone()],
            ..ModelRequest::default()
        };
        let thinking = AnthropicModelOptions {
            max_tokens: 8000,
            thinking_budget_tokens: Some(2048),
            ..options()
        };
        let body = request_body(&thinking, &request);
        assert_eq!(
            body["thinking"],
            json!({"type": "enabled", "budget_tokens": 2048})
        );
        assert_eq!(
            body["messages"][1],
            json!({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should add.", "signature": "EqSig=="},
                {"type": "redacted_thinking", "data": "EmwKAhgB"},
                {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {}},
            ]})
        );
        let body = request_body(&options(), &request);
        assert!(body.get("thinking").is_none());
        assert_eq!(
            body["messages"][1]["content"],
            json!([{"type": "tool_use", "id": "toolu_1", "name": "add", "input": {}}])
        );
        // The last tool turn has no signed block (a model without thinking made it):
        // thinking off for this request, and no thinking block anywhere.
        let mut unsigned = assistant.clone();
        unsigned.reasoning.clear();
        unsigned.tool_calls[0].id = "toolu_2".into();
        let request = ModelRequest {
            messages: vec![
                msg(Role::User, "add"),
                assistant.clone(),
                msg(Role::User, "again"),
                unsigned,
                msg(Role::User, "and now?"),
            ],
            ..ModelRequest::default()
        };
        let body = request_body(&thinking, &request);
        assert!(body.get("thinking").is_none(), "{body}");
        assert!(!body.to_string().contains("\"thinking\""), "{body}");
        // An unsigned earlier turn does not matter when the last message is a question.
        let mut plain = msg(Role::Assistant, "3");
        plain.reasoning.clear();
        let request = ModelRequest {
            messages: vec![msg(Role::User, "add"), plain, msg(Role::User, "thanks")],
            ..ModelRequest::default()
        };
        assert!(request_body(&thinking, &request).get("thinking").is_some());
    }

    #[test]
    fn a_user_message_after_results_joins_them() {
        let mut assistant = msg(Role::Assistant, "");
        assistant.tool_calls = vec![call("toolu_1", "search", "{}", Some(""))];
        let request = ModelRequest {
            messages: vec![
                msg(Role::User, "find it"),
                assistant,
                msg(Role::User, "never mind"),
            ],
            ..ModelRequest::default()
        };
        let body = request_body(&options(), &request);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "find it"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1"},
                    {"type": "text", "text": "never mind"},
                ]},
            ])
        );
    }

    #[test]
    fn minimal_body_and_skipped_empty_answer() {
        let request = ModelRequest {
            messages: vec![
                msg(Role::User, "hi"),
                msg(Role::Assistant, ""),
                msg(Role::User, "hello?"),
            ],
            ..ModelRequest::default()
        };
        let body = request_body(&options(), &request);
        assert_eq!(
            body,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 4096,
                "stream": true,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "user", "content": "hello?"},
                ],
            })
        );
    }

    #[test]
    fn tool_messages_without_a_call_are_grouped() {
        let request = ModelRequest {
            messages: vec![
                msg(Role::User, "hi"),
                tool_msg("toolu_a", "1"),
                tool_msg("toolu_b", "2"),
            ],
            ..ModelRequest::default()
        };
        let body = request_body(&options(), &request);
        assert_eq!(
            body["messages"][1],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "1"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "2"},
            ]})
        );
    }
}
