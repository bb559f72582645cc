//! Reading a request body in either dialect: its messages, the text of a message's
//! content, and the typed blocks of a Messages message. Lenient on purpose: a field of
//! the wrong shape reads as empty, and the history check says what is wrong.

use serde_json::Value;

/// The request's `messages`, or none.
pub(crate) fn messages_of(body: &Value) -> Vec<Value> {
    body.get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The text of a message's `content`: a string, or the `text` of its parts.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The blocks of type `kind` in a Messages message's content.
pub(crate) fn blocks<'a>(
    message: &'a Value,
    kind: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |b| b.get("type").and_then(Value::as_str) == Some(kind))
}

/// The text of a Messages `content`: a string, or its `text` blocks joined.
pub(crate) fn blocks_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}
