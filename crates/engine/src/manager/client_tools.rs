//! Client tools and history a request brings with it (the OpenAI-compatible routes,
//! `docs/protocol.md` and ARCHITECTURE.md "Client tools").
//!
//! A *client tool* is a function tool the request declares and the client runs itself
//! (OpenAI's `tools` on `/v1`). It is offered to the model with the model's server
//! tools. When a model call asks for one or more client tools, the server tools of the
//! same call run first (their results are recorded as usual), and then the job ends
//! `final` `complete` with the client calls saved *without output*: they are the
//! client's to run. The next request answers them with [`ToolResult`]s, which are saved
//! as a message of the user's side (`isCreatedByUser`, no text, one `tool_call` part per
//! result carrying its `output`) whose parent is the answer that made the calls, so the
//! conversation tree stays one chain of messages and the history sent upstream is built
//! from it like any other ([`super::history`]: such a message becomes one `tool` turn
//! per result).
//!
//! A request may also carry earlier turns of its own ([`PriorTurn`], Chat Completions
//! sends the whole conversation every time): they are saved before the new input, as a
//! chain under the parent, and the new input answers the last of them.

use crate::event::{ContentPart, Message, ToolCall};
use crate::provider::ToolSpec;
use crate::{EngineError, new_id};

/// The result of one client tool call: the call's id (as the model gave it) and the
/// output the client produced (any text; JSON by convention).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolResult {
    pub call_id: String,
    pub output: String,
}

/// A turn a request carries before its new input, saved into the conversation.
#[derive(Clone, Debug, PartialEq)]
pub enum PriorTurn {
    /// A user message.
    User(String),
    /// An assistant answer: its text and the tool calls it made (outputs, if any, are
    /// kept; a call answered by a following [`PriorTurn::ToolResults`] has none).
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    /// Results of the previous assistant turn's client tool calls.
    ToolResults(Vec<ToolResult>),
}

/// Checks the request's client tools against the server tools the job gets.
///
/// Errors: `BadRequest` (`tools`) for an empty or repeated name, or a name one of the
/// model's server tools already has (the model could not tell them apart).
pub(super) fn check_client_tools(
    client: &[ToolSpec],
    server: &[String],
) -> Result<(), EngineError> {
    let mut seen = std::collections::HashSet::new();
    for t in client {
        if t.name.is_empty() {
            return Err(EngineError::bad_request("tools", "a tool needs a name"));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(EngineError::bad_request(
                "tools",
                format!("tool {:?} is declared twice", t.name),
            ));
        }
        if server.contains(&t.name) {
            return Err(EngineError::bad_request(
                "tools",
                format!(
                    "tool {:?} is one of the server's own tools; rename yours",
                    t.name
                ),
            ));
        }
    }
    Ok(())
}

/// The user-side message holding `results` (no text; one `tool_call` part per result).
pub(super) fn results_content(results: &[ToolResult]) -> Vec<ContentPart> {
    results
        .iter()
        .map(|r| ContentPart::ToolCall {
            tool_call: ToolCall {
                id: r.call_id.clone(),
                name: String::new(),
                args: String::new(),
                output: Some(r.output.clone()),
            },
        })
        .collect()
}

/// `prior` as messages of `conversation_id`, chained from `parent`, the model's answers
/// under `model`; all created at `created_at`.
pub(super) fn prior_messages(
    prior: &[PriorTurn],
    conversation_id: &str,
    mut parent: Option<String>,
    model: &str,
    created_at: &str,
) -> Vec<Message> {
    let mut out = Vec::with_capacity(prior.len());
    for turn in prior {
        let (by_user, text, content) = match turn {
            PriorTurn::User(text) => (true, text.clone(), Vec::new()),
            PriorTurn::Assistant { text, tool_calls } => {
                let mut content = Vec::new();
                if !text.is_empty() {
                    content.push(ContentPart::Text { text: text.clone() });
                }
                content.extend(tool_calls.iter().map(|c| ContentPart::ToolCall {
                    tool_call: c.clone(),
                }));
                (false, text.clone(), content)
            }
            PriorTurn::ToolResults(results) => (true, String::new(), results_content(results)),
        };
        let m = Message {
            message_id: new_id(),
            conversation_id: conversation_id.to_string(),
            parent_message_id: parent.take(),
            sender: if by_user { "User".into() } else { model.into() },
            text,
            content,
            is_created_by_user: by_user,
            model: (!by_user).then(|| model.to_string()),
            unfinished: false,
            error: false,
            created_at: created_at.to_string(),
        };
        parent = Some(m.message_id.clone());
        out.push(m);
    }
    out
}
