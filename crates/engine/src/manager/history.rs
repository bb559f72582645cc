//! Conversation history: the path from the root to a message, as upstream turns, and
//! the title of a new conversation.

use std::collections::HashMap;

use crate::event::{ContentPart, Message};
use crate::provider::{ChatMessage, ReasoningBlock, Role};

/// The first 50 characters of the first message, on one line.
pub fn title_of(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(50).collect()
}

/// The path from the root to `parent`, as upstream history.
pub(super) fn history_to(all: &[Message], parent: Option<&str>) -> Vec<ChatMessage> {
    let by_id: HashMap<&str, &Message> = all.iter().map(|m| (m.message_id.as_str(), m)).collect();
    let mut chain = Vec::new();
    let mut cur = parent;
    while let Some(id) = cur {
        let Some(m) = by_id.get(id) else { break };
        chain.push(*m);
        cur = m.parent_message_id.as_deref();
        if chain.len() > all.len() {
            break; // a cycle can only come from a corrupt database; do not spin
        }
    }
    chain.reverse();
    let mut out = Vec::new();
    for m in chain {
        if m.is_created_by_user {
            // Client tool results (see `client_tools.rs`): one `tool` turn each.
            for part in &m.content {
                if let ContentPart::ToolCall { tool_call } = part {
                    out.push(ChatMessage {
                        role: Role::Tool,
                        text: tool_call.output.clone().unwrap_or_default(),
                        tool_calls: Vec::new(),
                        tool_call_id: Some(tool_call.id.clone()),
                        reasoning: Vec::new(),
                    });
                }
            }
            if !m.text.is_empty() || m.content.is_empty() {
                out.push(ChatMessage {
                    role: Role::User,
                    text: m.text.clone(),
                    tool_calls: Vec::new(),
                    tool_call_id: None,
                    reasoning: Vec::new(),
                });
            }
        } else {
            // One assistant turn per model call, in order: text or thinking after tool
            // calls begins the next call's turn, so each round's calls are followed by
            // their results before what the model said next, and each turn starts with
            // its own thinking.
            let new_turn = || ChatMessage {
                role: Role::Assistant,
                text: String::new(),
                tool_calls: Vec::new(),
                tool_call_id: None,
                reasoning: Vec::new(),
            };
            let mut turn = new_turn();
            let turns_before = out.len();
            for part in &m.content {
                let starts_turn = matches!(
                    part,
                    ContentPart::Text { .. }
                        | ContentPart::Think { .. }
                        | ContentPart::RedactedThinking { .. }
                );
                if starts_turn && !turn.tool_calls.is_empty() {
                    out.push(std::mem::replace(&mut turn, new_turn()));
                }
                match part {
                    ContentPart::Text { text } => turn.text.push_str(text),
                    ContentPart::ToolCall { tool_call } => {
                        turn.tool_calls.push(tool_call.clone());
                    }
                    // Only signed thinking can go back upstream.
                    ContentPart::Think {
                        think,
                        signature: Some(signature),
                    } => turn.reasoning.push(ReasoningBlock::Thinking {
                        thinking: think.clone(),
                        signature: signature.clone(),
                    }),
                    ContentPart::Think {
                        signature: None, ..
                    } => {}
                    ContentPart::RedactedThinking { data } => {
                        turn.reasoning
                            .push(ReasoningBlock::Redacted { data: data.clone() });
                    }
                }
            }
            if m.content.is_empty() {
                turn.text.clone_from(&m.text);
            }
            // A last turn with nothing to send (cut off while thinking, unsigned) is
            // left out, unless it is the message's only one.
            let empty =
                turn.text.is_empty() && turn.tool_calls.is_empty() && turn.reasoning.is_empty();
            if !empty || out.len() == turns_before {
                out.push(turn);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ToolCall;

    fn message(id: &str, parent: Option<&str>, content: Vec<ContentPart>) -> Message {
        Message {
            message_id: id.into(),
            conversation_id: "c".into(),
            parent_message_id: parent.map(Into::into),
            sender: "m".into(),
            text: String::new(),
            content,
            is_created_by_user: false,
            model: None,
            unfinished: false,
            error: false,
            created_at: String::new(),
        }
    }

    /// Each model call's turn starts with its own signed and redacted thinking;
    /// unsigned reasoning is not sent back, and a trailing turn with nothing in it is
    /// left out.
    #[test]
    fn thinking_blocks_begin_their_turn() {
        let call = |id: &str| ContentPart::ToolCall {
            tool_call: ToolCall {
                id: id.into(),
                name: "add".into(),
                args: "{}".into(),
                output: Some("1".into()),
            },
        };
        let think = |t: &str, s: Option<&str>| ContentPart::Think {
            think: t.into(),
            signature: s.map(Into::into),
        };
        let mut user = message("u", None, Vec::new());
        user.is_created_by_user = true;
        user.text = "hi".into();
        let answer = message(
            "a",
            Some("u"),
            vec![
                think("first", Some("sig1")),
                ContentPart::RedactedThinking {
                    data: "opaque".into(),
                },
                ContentPart::Text {
                    text: "Let me add.".into(),
                },
                call("c1"),
                think("second", Some("sig2")),
                call("c2"),
                think("unsigned", None),
            ],
        );
        let history = history_to(&[user, answer], Some("a"));
        assert_eq!(history.len(), 3, "{history:#?}");
        assert_eq!(history[0].role, Role::User);
        assert_eq!(
            history[1].reasoning,
            [
                ReasoningBlock::Thinking {
                    thinking: "first".into(),
                    signature: "sig1".into()
                },
                ReasoningBlock::Redacted {
                    data: "opaque".into()
                },
            ]
        );
        assert_eq!(history[1].text, "Let me add.");
        assert_eq!(history[1].tool_calls[0].id, "c1");
        assert_eq!(
            history[2].reasoning,
            [ReasoningBlock::Thinking {
                thinking: "second".into(),
                signature: "sig2".into()
            }]
        );
        assert_eq!(history[2].tool_calls[0].id, "c2");
    }

    /// A user-side message of client tool results becomes one `tool` turn per result,
    /// right after the answer whose calls they answer.
    #[test]
    fn tool_results_become_tool_turns() {
        let mut user = message("u", None, Vec::new());
        user.is_created_by_user = true;
        user.text = "weather?".into();
        let answer = message(
            "a",
            Some("u"),
            vec![ContentPart::ToolCall {
                tool_call: ToolCall {
                    id: "c1".into(),
                    name: "get_weather".into(),
                    args: "{}".into(),
                    output: None,
                },
            }],
        );
        let mut results = message(
            "r",
            Some("a"),
            super::super::client_tools::results_content(&[
                super::super::client_tools::ToolResult {
                    call_id: "c1".into(),
                    output: "sunny".into(),
                },
            ]),
        );
        results.is_created_by_user = true;
        let history = history_to(&[user, answer, results], Some("r"));
        let roles: Vec<Role> = history.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::Tool]);
        assert_eq!(history[1].tool_calls[0].output, None);
        assert_eq!(history[2].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(history[2].text, "sunny");
    }
}
