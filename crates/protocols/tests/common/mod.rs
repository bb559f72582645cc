//! Shared by the projection tests: the recorded logs, projecting a whole log, and one
//! checker per protocol that states what a client of that protocol relies on (the
//! OpenAI SDKs' stream accumulators, the AI SDK's `processUIMessageStream`), so every
//! test — fixed logs and random ones alike — runs the same checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use genstream_engine::event::{ContentPart, Event, EventBody, FinalStatus, Message};
use genstream_protocols::ai_sdk::{AiSdkOptions, AiSdkProjector};
use genstream_protocols::chat::{ChatOptions, ChatProjector};
use genstream_protocols::responses::{ResponsesOptions, ResponsesProjector};
use genstream_protocols::{ProjectedFrame, ProjectedLog, Projector, testing};
use genstream_protocols::{chat as chat_mod, responses as responses_mod};
use serde_json::Value;

/// The recorded engine logs (`tests/logs/*.jsonl`), by name.
pub const LOGS: [&str; 10] = [
    "text",
    "reasoning",
    "parallel_tools",
    "retry_discard",
    "abort",
    "abort_in_tool_args",
    "error",
    "log_full",
    "max_tool_iterations",
    "thinking_signed_tools",
];

/// A recorded engine log.
pub fn log(name: &str) -> Vec<Event> {
    let path = format!("{}/tests/logs/{name}.jsonl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    testing::parse_jsonl(&text).unwrap()
}

/// A recorded OpenAI stream (`tests/fixtures/`).
pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Projects a whole log.
pub fn project<P: Projector>(projector: P, events: &[Event]) -> ProjectedLog<P> {
    let mut log = ProjectedLog::new(projector);
    for e in events {
        log.push(e.seq, &e.body).unwrap();
    }
    log
}

pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

pub fn chat(client: &[&str]) -> ChatProjector {
    ChatProjector::new(ChatOptions {
        include_usage: true,
        client_tools: set(client),
    })
}

pub fn responses(client: &[&str]) -> ResponsesProjector {
    ResponsesProjector::new(ResponsesOptions {
        client_tools: set(client),
        ..ResponsesOptions::default()
    })
}

pub fn ai_sdk(client: &[&str]) -> AiSdkProjector {
    AiSdkProjector::new(AiSdkOptions {
        client_tools: set(client),
        reset_step_on_retry: false,
    })
}

/// One SSE frame: its `event:` name, if any, and its `data:`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sse {
    pub event: Option<String>,
    pub data: String,
}

impl Sse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// Parses an SSE body (frames separated by a blank line).
pub fn parse_sse(text: &str) -> Vec<Sse> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let mut event = None;
            let mut data = Vec::new();
            for line in f.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v);
                } else if !line.starts_with(':') {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            Sse {
                event,
                data: data.join("\n"),
            }
        })
        .collect()
}

/// The frames, each checked to be exactly one SSE frame, parsed.
pub fn frames_sse(frames: &[ProjectedFrame]) -> Vec<Sse> {
    frames
        .iter()
        .map(|f| {
            let text = std::str::from_utf8(&f.bytes).unwrap();
            assert!(text.ends_with("\n\n"), "{text:?}");
            assert_eq!(
                text.matches("\n\n").count(),
                1,
                "one frame, one data line: {text:?}"
            );
            let mut v = parse_sse(text);
            assert_eq!(v.len(), 1);
            v.remove(0)
        })
        .collect()
}

/// Positions 0, 1, 2, …, native seqs non-decreasing, the terminal flag on the last
/// frame only (if the log ended).
pub fn check_positions(frames: &[ProjectedFrame], ended: bool) {
    for (n, f) in frames.iter().enumerate() {
        assert_eq!(f.position, n as u64);
        if n > 0 {
            assert!(f.seq >= frames[n - 1].seq);
        }
        assert_eq!(f.terminal, ended && n + 1 == frames.len(), "frame {n}");
    }
}

/// What a Chat Completions client relies on.
pub fn check_chat(frames: &[ProjectedFrame], ended: bool) {
    check_positions(frames, ended);
    let sse = frames_sse(frames);
    assert!(sse.iter().all(|s| s.event.is_none()));
    let done = sse.last().is_some_and(|s| s.data == "[DONE]");
    assert_eq!(done, ended);
    let chunks: Vec<Value> = sse
        .iter()
        .filter(|s| s.data != "[DONE]")
        .map(Sse::json)
        .collect();
    assert!(!chunks.is_empty());
    let first = &chunks[0];
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let mut finished = false;
    let mut usage_seen = false;
    let mut error_seen = false;
    let mut tool_index = 0;
    for c in &chunks {
        assert!(!error_seen, "nothing after an error frame");
        if c.get("error").is_some() {
            let keys: BTreeSet<&str> = c["error"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            assert_eq!(keys, BTreeSet::from(["message", "type", "param", "code"]));
            error_seen = true;
            continue;
        }
        assert!(!usage_seen, "the usage chunk is the last chunk");
        assert_eq!(c["id"], first["id"]);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["created"], first["created"]);
        assert_eq!(c["model"], first["model"]);
        let choices = c["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert!(c["usage"].is_object(), "{c}");
            usage_seen = true;
            continue;
        }
        assert_eq!(c["usage"], Value::Null);
        assert_eq!(choices.len(), 1);
        let choice = &choices[0];
        assert_eq!(choice["index"], 0);
        assert!(!finished, "nothing after finish_reason but usage");
        if !choice["finish_reason"].is_null() {
            finished = true;
            assert_eq!(choice["delta"], serde_json::json!({}));
        }
        if let Some(calls) = choice["delta"].get("tool_calls") {
            for call in calls.as_array().unwrap() {
                assert_eq!(
                    call["index"], tool_index,
                    "indexes 0, 1, 2, … without holes"
                );
                tool_index += 1;
                assert_eq!(call["type"], "function");
                assert!(call["id"].as_str().is_some_and(|s| !s.is_empty()));
                assert!(
                    call["function"]["name"]
                        .as_str()
                        .is_some_and(|s| !s.is_empty())
                );
                assert!(call["function"]["arguments"].is_string());
            }
        }
    }
    if ended {
        assert!(
            finished || error_seen,
            "a finish_reason or an error ends the stream"
        );
        assert!(usage_seen, "include_usage: a usage chunk");
    }
}

/// What the `openai` SDK's Responses accumulator relies on (it raises otherwise), plus
/// `sequence_number` = position.
pub fn check_responses(frames: &[ProjectedFrame], ended: bool) -> Vec<Value> {
    check_positions(frames, ended);
    let sse = frames_sse(frames);
    let events: Vec<Value> = sse
        .iter()
        .map(|s| {
            let v = s.json();
            assert_eq!(Some(v["type"].as_str().unwrap()), s.event.as_deref());
            v
        })
        .collect();
    for (n, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], n as u64, "{e}");
    }
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types[0], "response.created");
    let id = events[0]["response"]["id"].clone();
    // item output_index → (id, added event, done?)
    let mut items: BTreeMap<u64, (String, Value, bool)> = BTreeMap::new();
    let mut text: BTreeMap<u64, String> = BTreeMap::new();
    let mut args: BTreeMap<u64, String> = BTreeMap::new();
    let mut terminal = None;
    for (n, e) in events.iter().enumerate() {
        let t = types[n];
        assert!(terminal.is_none(), "nothing after the terminal event");
        if let Some(r) = e.get("response") {
            assert_eq!(r["id"], id, "lifecycle response identity");
        }
        match t {
            "response.created" | "response.queued" | "response.in_progress" => {
                assert!(n <= 2);
            }
            "response.output_item.added" => {
                let oi = e["output_index"].as_u64().unwrap();
                assert_eq!(
                    oi,
                    items.len() as u64,
                    "output indexes in order, never reused"
                );
                let item_id = e["item"]["id"].as_str().unwrap().to_string();
                assert!(
                    items.values().all(|(i, _, _)| *i != item_id),
                    "item ids unique"
                );
                items.insert(oi, (item_id, e["item"].clone(), false));
            }
            "response.output_item.done" => {
                let oi = e["output_index"].as_u64().unwrap();
                let (item_id, added, done) = items.get_mut(&oi).expect("done for an added item");
                assert!(!*done, "one output_item.done per item");
                assert_eq!(e["item"]["id"].as_str(), Some(item_id.as_str()));
                assert_eq!(e["item"]["type"], added["type"]);
                assert_eq!(e["item"].get("call_id"), added.get("call_id"));
                if let Some(t) = text.get(&oi) {
                    assert_eq!(&e["item"]["content"][0]["text"], t);
                }
                if let Some(a) = args.get(&oi) {
                    assert_eq!(&e["item"]["arguments"], a);
                }
                *done = true;
            }
            "error" => {
                assert_eq!(types.get(n + 1), Some(&"response.failed"));
                assert!(e["message"].is_string() && e["code"].is_string());
            }
            "response.completed" | "response.failed" | "response.incomplete" => {
                terminal = Some(e.clone());
            }
            _ => {
                let oi = e["output_index"]
                    .as_u64()
                    .expect("item events carry output_index");
                let (item_id, added, done) = items.get(&oi).expect("an event for an added item");
                assert!(!done, "{t} after the item's done");
                assert_eq!(e["item_id"].as_str(), Some(item_id.as_str()));
                match t {
                    "response.content_part.added" => {
                        text.insert(oi, String::new());
                    }
                    "response.output_text.delta" | "response.reasoning_text.delta" => {
                        text.get_mut(&oi)
                            .expect("content_part.added first")
                            .push_str(e["delta"].as_str().unwrap());
                    }
                    "response.output_text.done" | "response.reasoning_text.done" => {
                        assert_eq!(&e["text"], &text[&oi]);
                    }
                    "response.content_part.done" => {
                        assert_eq!(&e["part"]["text"], &text[&oi]);
                    }
                    "response.function_call_arguments.delta"
                    | "response.mcp_call_arguments.delta" => {
                        args.entry(oi)
                            .or_default()
                            .push_str(e["delta"].as_str().unwrap());
                    }
                    "response.function_call_arguments.done"
                    | "response.mcp_call_arguments.done" => {
                        assert_eq!(
                            e["arguments"].as_str().unwrap(),
                            args.get(&oi).map_or("", |s| s.as_str())
                        );
                        args.insert(oi, e["arguments"].as_str().unwrap().to_string());
                    }
                    "response.mcp_call.in_progress"
                    | "response.mcp_call.completed"
                    | "response.mcp_call.failed" => {
                        assert_eq!(added["type"], "mcp_call");
                    }
                    other => panic!("unexpected event type {other}"),
                }
                let _ = added;
            }
        }
    }
    if ended {
        let terminal = terminal.expect("a terminal event");
        assert!(
            items.values().all(|(_, _, done)| *done),
            "every item done before the end"
        );
        // The final output is the saved answer: a subset of the streamed items.
        for item in terminal["response"]["output"].as_array().unwrap() {
            assert!(
                items
                    .values()
                    .any(|(i, _, _)| Some(i.as_str()) == item["id"].as_str())
            );
        }
        assert!(terminal["response"]["usage"].is_object());
    } else {
        assert!(terminal.is_none());
    }
    events
}

/// The chunk types the projection may send, with their required and optional fields:
/// the intersection of `uiMessageChunkSchema` in `ai` 5.0.277 and 7.0.185.
fn ai_sdk_schema(kind: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match kind {
        "start" => (&[], &["messageId", "messageMetadata"]),
        "start-step" | "finish-step" | "reset-step" => (&[], &[]),
        "text-start" | "text-end" | "reasoning-start" | "reasoning-end" => {
            (&["id"], &["providerMetadata"])
        }
        "text-delta" | "reasoning-delta" => (&["id", "delta"], &["providerMetadata"]),
        "tool-input-start" => (
            &["toolCallId", "toolName"],
            &["providerExecuted", "dynamic"],
        ),
        "tool-input-delta" => (&["toolCallId", "inputTextDelta"], &[]),
        "tool-input-available" => (
            &["toolCallId", "toolName", "input"],
            &["providerExecuted", "providerMetadata", "dynamic"],
        ),
        "tool-input-error" => (
            &["toolCallId", "toolName", "input", "errorText"],
            &["providerExecuted", "providerMetadata", "dynamic"],
        ),
        "tool-output-available" => (
            &["toolCallId", "output"],
            &["providerExecuted", "dynamic", "preliminary"],
        ),
        "tool-output-error" => (
            &["toolCallId", "errorText"],
            &["providerExecuted", "dynamic"],
        ),
        "finish" => (&[], &["finishReason", "messageMetadata"]),
        // `reason` is ai 7's; ai 5's loose object passes it through.
        "abort" => (&[], &["reason"]),
        "error" => (&["errorText"], &[]),
        _ => return None,
    })
}

/// What `useChat` (`processUIMessageStream`) relies on, and the chunk schema.
pub fn check_ai_sdk(frames: &[ProjectedFrame], ended: bool, reset_steps: bool) -> Vec<Value> {
    check_positions(frames, ended);
    let sse = frames_sse(frames);
    assert!(sse.iter().all(|s| s.event.is_none()));
    assert_eq!(sse.last().is_some_and(|s| s.data == "[DONE]"), ended);
    let chunks: Vec<Value> = sse
        .iter()
        .filter(|s| s.data != "[DONE]")
        .map(Sse::json)
        .collect();
    assert_eq!(chunks[0]["type"], "start");
    let mut active_text = BTreeSet::new();
    let mut active_reasoning = BTreeSet::new();
    let mut tools: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut in_step = false;
    let mut step_tools: Vec<String> = Vec::new();
    let mut ended_with = None;
    for (n, c) in chunks.iter().enumerate() {
        let kind = c["type"].as_str().unwrap();
        let (required, optional) =
            ai_sdk_schema(kind).unwrap_or_else(|| panic!("chunk type {kind} not in the schema"));
        let keys: BTreeSet<&str> = c.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for r in required {
            assert!(keys.contains(r), "{kind} lacks {r}: {c}");
        }
        for k in &keys {
            assert!(
                *k == "type" || required.contains(k) || optional.contains(k),
                "{kind} has unknown field {k}"
            );
        }
        if kind == "reset-step" {
            assert!(reset_steps, "reset-step only when asked for");
        }
        if ended_with.is_some() {
            // After `error`, `finish` `error` may follow; nothing else.
            assert!(
                kind == "finish" && ended_with == Some("error"),
                "{kind} after the end"
            );
        }
        let id = c.get("id").and_then(Value::as_str).map(str::to_string);
        let call = c
            .get("toolCallId")
            .and_then(Value::as_str)
            .map(str::to_string);
        let content = !matches!(
            kind,
            "start" | "start-step" | "finish-step" | "reset-step" | "finish" | "abort" | "error"
        );
        if content {
            assert!(in_step, "{kind} outside a step");
        }
        match kind {
            "start" => assert_eq!(n, 0),
            "start-step" => {
                assert!(!in_step, "steps do not nest");
                in_step = true;
                step_tools.clear();
            }
            "finish-step" => {
                assert!(in_step);
                in_step = false;
                assert!(
                    active_text.is_empty() && active_reasoning.is_empty(),
                    "parts end in their step"
                );
            }
            "reset-step" => {
                assert!(in_step);
                // The client drops the step's parts, tool calls included.
                active_text.clear();
                active_reasoning.clear();
                for call in step_tools.drain(..) {
                    tools.remove(&call);
                }
            }
            "text-start" => assert!(active_text.insert(id.unwrap())),
            "text-delta" => assert!(
                active_text.contains(&id.unwrap()),
                "text-delta needs text-start"
            ),
            "text-end" => assert!(
                active_text.remove(&id.unwrap()),
                "text-end needs text-start"
            ),
            "reasoning-start" => assert!(active_reasoning.insert(id.unwrap())),
            "reasoning-delta" => assert!(active_reasoning.contains(&id.unwrap())),
            "reasoning-end" => assert!(active_reasoning.remove(&id.unwrap())),
            "tool-input-start" => {
                let call = call.unwrap();
                step_tools.push(call.clone());
                assert!(
                    tools.insert(call, "streaming").is_none(),
                    "tool call ids unique"
                );
            }
            "tool-input-delta" => assert_eq!(tools.get(&call.unwrap()), Some(&"streaming")),
            "tool-input-available" => {
                let call = call.unwrap();
                assert!(matches!(tools.get(&call), Some(&"streaming") | None));
                tools.insert(call, "available");
            }
            "tool-input-error" => {
                let s = tools.insert(call.unwrap(), "error");
                assert!(matches!(s, Some("streaming") | None));
            }
            "tool-output-available" | "tool-output-error" => {
                let s = tools.insert(call.unwrap(), "output");
                assert_eq!(s, Some("available"), "output after input");
                assert_eq!(
                    c["providerExecuted"], true,
                    "only server tools have outputs"
                );
            }
            "finish" => {
                let r = c["finishReason"].as_str().unwrap();
                assert!(
                    [
                        "stop",
                        "length",
                        "content-filter",
                        "tool-calls",
                        "error",
                        "other"
                    ]
                    .contains(&r)
                );
                assert!(!in_step);
                ended_with = Some("finish");
            }
            "abort" => {
                assert!(!in_step);
                ended_with = Some("abort");
            }
            "error" => {
                assert!(!in_step);
                ended_with = Some("error");
            }
            _ => {}
        }
    }
    if ended {
        assert!(ended_with.is_some());
        assert!(active_text.is_empty() && active_reasoning.is_empty());
        assert!(
            !tools.values().any(|s| *s == "streaming"),
            "every tool input ends"
        );
    }
    chunks
}

/// Re-projects on a fresh projector from a resume point and returns the frames after
/// it: what a replica that has only the native log would send.
pub fn reproject<P: Projector>(
    mut fresh: P,
    events: &[Event],
    point: genstream_protocols::ResumePoint,
) -> Vec<ProjectedFrame> {
    let mut sink = Vec::new();
    let start = point.after_seq.map_or(0, |s| s as usize + 1);
    for e in &events[..start] {
        fresh.push(e.seq, &e.body, &mut sink).unwrap();
    }
    let mut out = Vec::new();
    for e in &events[start..] {
        fresh.push(e.seq, &e.body, &mut out).unwrap();
    }
    out.drain(..point.skip.min(out.len()));
    out
}

/// The saved answer: the terminal event's `responseMessage`.
pub fn saved(events: &[Event]) -> Option<Message> {
    match &events.last()?.body {
        EventBody::Final(f) => Some(f.response_message.clone()),
        EventBody::Error(e) => e.response_message.clone(),
        _ => None,
    }
}

/// The final objects hold exactly the saved answer: its text, its reasoning, its
/// tool calls (client ones as `function_call`, server ones as `mcp_call`), in order.
/// Only what the wire formats cannot carry is left out: signatures, redacted
/// thinking, and the cancelled result the engine gives a call cut before its output.
pub fn check_objects(events: &[Event], client: &[&str]) {
    let c = project(chat(client), events);
    let r = project(responses(client), events);
    let completion = serde_json::to_value(chat_mod::completion(c.projector().fold())).unwrap();
    let fold = r.projector().fold();
    let response =
        serde_json::to_value(responses_mod::response(fold, r.projector().options())).unwrap();
    let Some(message) = saved(events) else {
        return;
    };
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut expected = Vec::new();
    for part in &message.content {
        match part {
            ContentPart::Text { text: t } => {
                text.push_str(t);
                expected.push(("message", t.clone(), None));
            }
            ContentPart::Think { think, .. } if !think.is_empty() => {
                reasoning.push_str(think);
                expected.push(("reasoning", think.clone(), None));
            }
            ContentPart::ToolCall { tool_call } => {
                let kind = if client.contains(&tool_call.name.as_str()) {
                    "function_call"
                } else {
                    "mcp_call"
                };
                expected.push((kind, tool_call.args.clone(), tool_call.output.clone()));
            }
            _ => {}
        }
    }
    let msg = &completion["choices"][0]["message"];
    assert_eq!(msg["content"].as_str().unwrap_or(""), text);
    assert_eq!(msg["reasoning_content"].as_str().unwrap_or(""), reasoning);
    let output = response["output"].as_array().unwrap();
    // Client calls of a job that did not complete are never handed over.
    let completed = matches!(&events.last().unwrap().body, EventBody::Final(f) if f.status == FinalStatus::Complete);
    let expected: Vec<_> = expected
        .into_iter()
        .filter(|(k, _, _)| *k != "function_call" || completed)
        .collect();
    let output: Vec<&Value> = output
        .iter()
        .filter(|i| i["type"] != "function_call" || completed)
        .collect();
    assert_eq!(output.len(), expected.len(), "{response:#}");
    for (item, (kind, body, result)) in output.iter().zip(&expected) {
        assert_eq!(item["type"], *kind);
        match *kind {
            "message" | "reasoning" => assert_eq!(item["content"][0]["text"], *body),
            _ => {
                assert_eq!(item["arguments"], *body);
                if *kind == "mcp_call" {
                    match item["output"].as_str() {
                        Some(out) => assert_eq!(Some(out), result.as_deref()),
                        None => {
                            assert_eq!(item["status"], "incomplete");
                            assert_eq!(result.as_deref(), Some("{\"error\":\"cancelled\"}"));
                        }
                    }
                }
            }
        }
    }
}
