//! Conversation history: the path from the root to a message, as upstream turns, and
//! the title of a new conversation.

use std::collections::HashMap;

use crate::event::Message;
use crate::provider::{ChatMessage, Role};

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
            out.push(ChatMessage {
                role: Role::User,
                text: m.text.clone(),
                tool_calls: Vec::new(),
                tool_call_id: None,
            });
        } else {
            // One assistant turn per model call, in order: a text part after tool
            // calls begins the next call's turn, so each round's calls are followed by
            // their results before the text that quotes them.
            let new_turn = || ChatMessage {
                role: Role::Assistant,
                text: String::new(),
                tool_calls: Vec::new(),
                tool_call_id: None,
            };
            let mut turn = new_turn();
            for part in &m.content {
                match part {
                    crate::event::ContentPart::Text { text } => {
                        if !turn.tool_calls.is_empty() {
                            out.push(std::mem::replace(&mut turn, new_turn()));
                        }
                        turn.text.push_str(text);
                    }
                    crate::event::ContentPart::ToolCall { tool_call } => {
                        turn.tool_calls.push(tool_call.clone());
                    }
                    crate::event::ContentPart::Think { .. } => {}
                }
            }
            if m.content.is_empty() {
                turn.text.clone_from(&m.text);
            }
            out.push(turn);
        }
    }
    out
}
