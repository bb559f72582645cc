//! [`StreamEvent`]: one event of a job's log as the client receives it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One event of a job's log, `{"seq": N, "event": "<type>", "data": {…}}` (docs/protocol.md §2),
/// as carried in an SSE frame's `data:` line.
///
/// `data` is kept as raw JSON so the client never fails on an event type or field it
/// does not know; [`StreamEvent::typed`] converts it to the engine's exact wire type
/// when structure is wanted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamEvent {
    /// Position in the log: 0, 1, 2, … with no holes.
    pub seq: u64,
    /// The event type: `created`, `on_message_delta`, …, `final`, `error`.
    pub event: String,
    /// The event's data, as sent.
    #[serde(default)]
    pub data: Value,
}

/// How a job ended, read from its terminal event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `final` with `status: "complete"` (or any status other than `aborted`).
    Complete {
        /// `final.reason`, when the job ended for a reason other than a plain
        /// completion (e.g. `max_tool_iterations`).
        reason: Option<String>,
    },
    /// `final` with `status: "aborted"`.
    Aborted,
    /// `error`.
    Failed {
        /// `error.code`.
        code: String,
        /// `error.message`.
        message: String,
    },
}

impl StreamEvent {
    /// `final` and `error` end a log: exactly one of them is its last event.
    pub fn is_terminal(&self) -> bool {
        self.event == "final" || self.event == "error"
    }

    /// How the job ended, when this is a terminal event; `None` otherwise.
    pub fn outcome(&self) -> Option<Outcome> {
        let str_field = |k: &str| self.data.get(k).and_then(Value::as_str);
        match self.event.as_str() {
            "final" if str_field("status") == Some("aborted") => Some(Outcome::Aborted),
            "final" => Some(Outcome::Complete {
                reason: str_field("reason").map(str::to_owned),
            }),
            "error" => Some(Outcome::Failed {
                code: str_field("code").unwrap_or("unknown").to_owned(),
                message: str_field("message").unwrap_or("").to_owned(),
            }),
            _ => None,
        }
    }

    /// The answer text an `on_message_delta` carries (its `delta.content[].text`,
    /// concatenated); empty for any other event.
    pub fn text(&self) -> String {
        self.delta_parts("on_message_delta", "text")
    }

    /// The reasoning an `on_reasoning_delta` carries (its `delta.content[].think`,
    /// concatenated); empty for any other event.
    pub fn reasoning(&self) -> String {
        self.delta_parts("on_reasoning_delta", "think")
    }

    fn delta_parts(&self, event: &str, kind: &str) -> String {
        if self.event != event {
            return String::new();
        }
        let Some(parts) = self
            .data
            .pointer("/delta/content")
            .and_then(Value::as_array)
        else {
            return String::new();
        };
        parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some(kind))
            .filter_map(|p| p.get(kind).and_then(Value::as_str))
            .collect()
    }

    /// This event as the engine's exact wire type. Fails if the server sent an event
    /// type or shape this build does not know.
    pub fn typed(&self) -> Result<genstream_engine::event::Event, serde_json::Error> {
        serde_json::from_value(serde_json::json!({
            "seq": self.seq,
            "event": self.event,
            "data": self.data,
        }))
    }
}
