//! The events of a job's log (docs/protocol.md §2) and their SSE frames (docs/protocol.md §3).
//!
//! An event is `{"seq": u64, "event": "<type>", "data": {...}}`. [`EventBody`] is the
//! `event`/`data` pair as one adjacently tagged enum, so serde writes the wire shape
//! directly. [`Frame::encode`] serializes an event exactly once into the complete SSE
//! frame (`id:`/`event:`/`data:` lines and the blank line); the resulting [`Bytes`] are
//! what every subscriber writes to its socket, shared by reference count, never copied.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::usage::{UsageRecord, UsageTotals};

/// One entry of a job's event log: `{"seq", "event", "data"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log: 0, 1, 2, … with no holes.
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The `event` name and its `data`, one variant per row of docs/protocol.md §2's table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data")]
pub enum EventBody {
    /// Always seq 0: who asked what, and the ids the response will have.
    #[serde(rename = "created")]
    Created(Created),
    /// A new content part begins at `index` of the response's content array.
    #[serde(rename = "on_run_step")]
    RunStep(RunStep),
    /// Text tokens for a `message_creation` step.
    #[serde(rename = "on_message_delta")]
    MessageDelta(Delta),
    /// Reasoning ("thinking") tokens for a `message_creation` step.
    #[serde(rename = "on_reasoning_delta")]
    ReasoningDelta(Delta),
    /// Tool-call arguments as they stream.
    #[serde(rename = "on_run_step_delta")]
    RunStepDelta(RunStepDelta),
    /// A tool finished; carries its output.
    #[serde(rename = "on_run_step_completed")]
    RunStepCompleted(RunStepCompleted),
    /// The upstream failed and the call will be retried; `discardStepIds` are dropped.
    #[serde(rename = "retry")]
    Retry(Retry),
    /// One normalized usage record, after each model call (docs/protocol.md §7).
    #[serde(rename = "usage")]
    Usage(UsageRecord),
    /// Terminal: the job completed or was aborted.
    #[serde(rename = "final")]
    Final(Final),
    /// Terminal: the job failed.
    #[serde(rename = "error")]
    Error(ErrorEvent),
}

impl EventBody {
    /// The SSE `event:` name, identical to the serde tag.
    pub fn name(&self) -> &'static str {
        match self {
            EventBody::Created(_) => "created",
            EventBody::RunStep(_) => "on_run_step",
            EventBody::MessageDelta(_) => "on_message_delta",
            EventBody::ReasoningDelta(_) => "on_reasoning_delta",
            EventBody::RunStepDelta(_) => "on_run_step_delta",
            EventBody::RunStepCompleted(_) => "on_run_step_completed",
            EventBody::Retry(_) => "retry",
            EventBody::Usage(_) => "usage",
            EventBody::Final(_) => "final",
            EventBody::Error(_) => "error",
        }
    }

    /// `final` and `error` end a log; exactly one of them is its last event.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventBody::Final(_) | EventBody::Error(_))
    }
}

/// Data of `created`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    pub stream_id: String,
    pub conversation_id: String,
    pub user_message: Message,
    pub response_message_id: String,
    pub model: String,
    pub sender: String,
    pub created_at: String,
    /// The names of the request's client tools (see `manager::StartRequest`), whose
    /// calls the job hands to the client instead of running them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_tools: Vec<String>,
    /// A client protocol's own options for projecting this job (opaque to the engine;
    /// the OpenAI Responses route keeps the request's echoed parameters here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_options: Option<serde_json::Value>,
}

/// Data of `on_run_step`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunStep {
    /// The step id; deltas name their step by it.
    pub id: String,
    /// The model call this step belongs to (`<streamId>:<call index>`).
    pub run_id: String,
    /// Position of the step's content part in the response's content array.
    pub index: u32,
    #[serde(rename = "type")]
    pub step_type: StepType,
    pub step_details: StepDetails,
}

/// Kind of a run step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    MessageCreation,
    ToolCalls,
}

/// `stepDetails` of a run step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepDetails {
    MessageCreation { message_creation: MessageCreation },
    ToolCalls { tool_calls: Vec<ToolCall> },
}

/// `stepDetails.message_creation`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageCreation {
    pub message_id: String,
}

/// Data of `on_message_delta` and `on_reasoning_delta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The step id.
    pub id: String,
    pub delta: DeltaContent,
}

/// `delta` of a message or reasoning delta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaContent {
    pub content: Vec<ContentPart>,
}

/// Data of `on_run_step_delta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStepDelta {
    pub id: String,
    pub delta: ToolCallsDelta,
}

/// `delta` of `on_run_step_delta`: always `type: "tool_calls"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallsDelta {
    #[serde(rename = "type")]
    pub kind: StepType,
    pub tool_calls: Vec<ToolCallChunk>,
}

/// A fragment of one tool call's arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallChunk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Partial JSON, to be concatenated in order.
    pub args: String,
    pub index: u32,
}

/// Data of `on_run_step_completed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStepCompleted {
    pub result: StepResult,
}

/// `result` of `on_run_step_completed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// The step id.
    pub id: String,
    pub index: u32,
    pub tool_call: ToolCall,
}

/// A tool call, as stored in a `tool_call` content part.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the model produced them (a JSON text).
    pub args: String,
    /// The tool's result; `None` while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// Data of `retry`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    pub attempt: u32,
    pub max_attempts: u32,
    pub delay_ms: u64,
    pub error: String,
    #[serde(default)]
    pub discard_step_ids: Vec<String>,
}

/// How a job ended, in `final.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    Complete,
    Aborted,
}

/// Data of `final`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Final {
    pub status: FinalStatus,
    pub response_message: Message,
    pub conversation: ConversationRef,
    pub usage: UsageTotals,
    /// Why the job ended when it was not a plain completion: `"aborted"`, `"shutdown"`,
    /// `"max_tool_iterations"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `final.conversation`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationRef {
    pub conversation_id: String,
    pub title: String,
}

/// Data of `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorEvent {
    /// Machine-readable: `upstream_error`, `stalled`, `log_full`, `shutdown`,
    /// `replica_lost`, `internal`.
    pub code: String,
    pub message: String,
    /// The partial answer, when one was saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_message: Option<Message>,
}

/// One content part of a message (LibreChat's shapes, and one of our own).
///
/// Beyond LibreChat's: a `think` part may carry the `signature` Anthropic gives a
/// thinking block, and `redacted_thinking` holds a thinking block Anthropic sent
/// encrypted (`data`, opaque). Both must go back to Anthropic verbatim at the start of
/// an assistant turn with tool calls when extended thinking is on, so they travel
/// through the log (in `on_reasoning_delta`), the snapshot and the saved message into
/// the next request's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    Think {
        think: String,
        /// The thinking block's signature (Anthropic's `signature_delta`): set on the
        /// part's last delta (`think: ""`), absent for unsigned reasoning (OpenAI-style
        /// upstreams, or a block cut off before its signature).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// A thinking block the upstream redacted: its encrypted `data`, as received.
    RedactedThinking {
        data: String,
    },
    ToolCall {
        tool_call: ToolCall,
    },
}

/// A persisted message, user's or assistant's; also the wire shape of `userMessage`
/// and `responseMessage`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub message_id: String,
    pub conversation_id: String,
    /// `None` for the first message of a conversation.
    pub parent_message_id: Option<String>,
    /// `"User"` for the user, the model's name for the assistant.
    pub sender: String,
    pub text: String,
    #[serde(default)]
    pub content: Vec<ContentPart>,
    pub is_created_by_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// True for a partial answer (aborted, stalled, failed mid-stream).
    #[serde(default)]
    pub unfinished: bool,
    /// True when the generation ended with an error.
    #[serde(default)]
    pub error: bool,
    pub created_at: String,
}

/// One event serialized once, ready to be written to any number of sockets.
#[derive(Clone, Debug)]
pub struct Frame {
    pub seq: u64,
    /// Whether this is the log's terminal event.
    pub terminal: bool,
    /// `id: N\nevent: NAME\ndata: {"seq":N,"event":NAME,"data":{…}}\n\n`.
    pub bytes: Bytes,
}

impl Frame {
    /// Serializes `body` at `seq` into its SSE frame. This and [`sse_frame`] are the
    /// only places in Rust where an event becomes bytes (the Redis append function
    /// builds the same bytes in Lua, held equal by a test in `genstream-redis`); the
    /// JSON has no newlines (serde_json's compact form escapes them), so one `data:`
    /// line always suffices.
    ///
    /// Errors: the body could not be serialized (serde_json refused a value). The
    /// caller refuses the append; nothing is written under the event's name.
    pub fn encode(seq: u64, body: &EventBody) -> Result<Frame, serde_json::Error> {
        let bytes = write_frame(seq, body.name(), |out| {
            // `{"seq":N,` then the body's own `"event":…,"data":…}`: the same bytes
            // serde would write for `Event`, without cloning the body into one.
            out.extend_from_slice(b"{\"seq\":");
            out.extend_from_slice(seq.to_string().as_bytes());
            out.push(b',');
            let body_start = out.len();
            serde_json::to_writer(&mut *out, body)?;
            // An adjacently tagged enum is always a JSON object: drop its `{`.
            if out.get(body_start) != Some(&b'{') {
                return Err(serde::ser::Error::custom("an event is not a JSON object"));
            }
            out.remove(body_start);
            Ok(())
        })?;
        Ok(Frame {
            seq,
            terminal: body.is_terminal(),
            bytes,
        })
    }

    /// Recognizes a frame made by [`Frame::encode`] (or by the Redis append function,
    /// which builds the same bytes): reads the seq from its `id:` line and whether it
    /// is terminal from its `event:` line. `None` if the bytes are not such a frame.
    pub fn parse(bytes: Bytes) -> Option<Frame> {
        let text = std::str::from_utf8(&bytes[..bytes.len().min(64)]).ok()?;
        let rest = text.strip_prefix("id: ")?;
        let (seq, rest) = rest.split_once('\n')?;
        let seq = seq.parse().ok()?;
        let name = rest.strip_prefix("event: ")?.split('\n').next()?;
        let terminal = name == "final" || name == "error";
        Some(Frame {
            seq,
            terminal,
            bytes,
        })
    }

    /// The frame's `data:` JSON (the [`Event`]), for consumers that need structure.
    pub fn data_json(&self) -> &[u8] {
        let b = &self.bytes[..];
        let start = b
            .windows(6)
            .position(|w| w == b"data: ")
            .map(|p| p + 6)
            .unwrap_or(0);
        let end = b.len().saturating_sub(2).max(start);
        &b[start..end]
    }
}

/// An SSE frame that is not an event of the log (the `sync` frame of a resume):
/// `id: ID\nevent: NAME\ndata: JSON\n\n`, with `data` in serde_json's compact form.
///
/// Errors: `data` could not be serialized.
pub fn sse_frame(id: u64, name: &str, data: &impl Serialize) -> Result<Bytes, serde_json::Error> {
    write_frame(id, name, |out| serde_json::to_writer(out, data))
}

/// The frame's lines around the `data:` JSON that `data` writes.
fn write_frame(
    id: u64,
    name: &str,
    data: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
) -> Result<Bytes, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b"\nevent: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    data(&mut out)?;
    out.extend_from_slice(b"\n\n");
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_wire_shape_and_round_trips() {
        let body = EventBody::MessageDelta(Delta {
            id: "step".into(),
            delta: DeltaContent {
                content: vec![ContentPart::Text {
                    text: "a\nb".into(),
                }],
            },
        });
        let f = Frame::encode(17, &body).unwrap();
        let s = std::str::from_utf8(&f.bytes).unwrap();
        assert!(s.starts_with("id: 17\nevent: on_message_delta\ndata: {\"seq\":17,\"event\":\"on_message_delta\",\"data\":{"));
        assert!(s.ends_with("}\n\n"));
        assert_eq!(s.matches('\n').count(), 4, "one data line: {s}");
        let ev: Event = serde_json::from_slice(f.data_json()).unwrap();
        assert_eq!(ev, Event { seq: 17, body });
        let parsed = Frame::parse(f.bytes.clone()).unwrap();
        assert_eq!((parsed.seq, parsed.terminal), (17, false));
        assert!(Frame::parse(Bytes::from_static(b"garbage")).is_none());
    }

    /// A value serde_json refuses (a map with non-string keys) is an error the caller
    /// gets, not an empty `error` event written under the frame's name.
    #[test]
    fn a_value_that_cannot_be_serialized_is_an_error() {
        let mut bad = std::collections::BTreeMap::new();
        bad.insert(vec![1u8], "x");
        assert!(sse_frame(3, "sync", &bad).is_err());
    }

    #[test]
    fn sse_frame_is_the_sync_wire_shape() {
        let data = serde_json::json!({"sync": true, "seq": 4, "resumeState": {"text": "a\nb"}});
        let f = sse_frame(4, "sync", &data).unwrap();
        assert_eq!(
            &f[..],
            format!("id: 4\nevent: sync\ndata: {data}\n\n").as_bytes()
        );
    }
}
