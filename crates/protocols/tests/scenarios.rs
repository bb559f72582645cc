//! The projections of real logs — recorded from the engine (`tests/logs/`) or built
//! the way it writes them — checked three ways: each protocol's client invariants
//! (`common::check_*`), the mapping decisions of the README one scenario at a time,
//! and `insta` snapshots of whole streams for review.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use genstream_engine::event::{Event, EventBody};
use genstream_protocols::ai_sdk::{AiSdkOptions, AiSdkProjector};
use genstream_protocols::chat::{self, ChatOptions, ChatProjector};
use genstream_protocols::responses::{self, ResponsesOptions, ResponsesProjector};
use genstream_protocols::testing::LogBuilder;
use genstream_protocols::{ProjectedFrame, Projector};
use serde_json::{Value, json};

fn all_checks(events: &[Event], client: &[&str]) {
    check_chat(project(chat(client), events).frames(), true);
    check_responses(project(responses(client), events).frames(), true);
    check_ai_sdk(project(ai_sdk(client), events).frames(), true, false);
    let reset = AiSdkProjector::new(AiSdkOptions {
        client_tools: set(client),
        reset_step_on_retry: true,
    });
    check_ai_sdk(project(reset, events).frames(), true, true);
    check_objects(events, client);
}

#[test]
fn every_recorded_log_passes_every_clients_checks() {
    for name in LOGS {
        let events = log(name);
        all_checks(&events, &[]);
        // The same logs with `add` as a client tool: the server ran it here, which a
        // real client tool never is, but nothing may break.
        all_checks(&events, &["add"]);
    }
}

fn text_of(frames: &[ProjectedFrame]) -> String {
    frames
        .iter()
        .map(|f| {
            format!(
                "#{}@{} {}",
                f.position,
                f.seq,
                String::from_utf8_lossy(&f.bytes)
            )
        })
        .collect()
}

fn chat_json(frames: &[ProjectedFrame]) -> Vec<Value> {
    frames_sse(frames)
        .into_iter()
        .filter(|s| s.data != "[DONE]")
        .map(|s| s.json())
        .collect()
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn snapshots_of_representative_streams() {
    for name in ["text", "parallel_tools", "retry_discard", "abort", "error"] {
        let events = log(name);
        insta::assert_snapshot!(
            format!("{name}_chat"),
            text_of(project(chat(&[]), &events).frames())
        );
        insta::assert_snapshot!(
            format!("{name}_responses"),
            text_of(project(responses(&[]), &events).frames())
        );
        insta::assert_snapshot!(
            format!("{name}_ai_sdk"),
            text_of(project(ai_sdk(&[]), &events).frames())
        );
    }
    let events = client_tools_log();
    for (proto, frames) in [
        (
            "chat",
            project(chat(&["get_weather"]), &events).frames().to_vec(),
        ),
        (
            "responses",
            project(responses(&["get_weather"]), &events)
                .frames()
                .to_vec(),
        ),
        (
            "ai_sdk",
            project(ai_sdk(&["get_weather"]), &events).frames().to_vec(),
        ),
    ] {
        insta::assert_snapshot!(format!("client_tools_{proto}"), text_of(&frames));
    }
}

/// Reasoning, text and two parallel calls of the client tool `get_weather` (names
/// and arguments split across fragments), after which the job completes: the calls
/// are the client's to run.
fn client_tools_log() -> Vec<Event> {
    let mut b = LogBuilder::default();
    b.call()
        .think("Two cities.")
        .text("Checking both.")
        .tool(0, Some("call_1"), Some("get_weather"), "{\"city\":")
        .tool(1, Some("call_2"), None, "")
        .tool(1, None, Some("get_weather"), "{\"city\":\"Oslo\"}")
        .tool(0, None, None, "\"Paris\"}")
        .usage(40, 20)
        .complete(None);
    b.build()
}

#[test]
fn client_tool_calls_reach_the_client_whole_and_only_when_the_job_completed() {
    let events = client_tools_log();
    all_checks(&events, &["get_weather"]);

    // Chat Completions: each call whole in one chunk, indexes 0 and 1, finish
    // `tool_calls`; no tool chunk before the terminal event's seq.
    let c = project(chat(&["get_weather"]), &events);
    let last_seq = events.last().unwrap().seq;
    let chunks: Vec<(u64, Value)> = c
        .frames()
        .iter()
        .zip(chat_json(c.frames()))
        .map(|(f, v)| (f.seq, v))
        .collect();
    let calls: Vec<&(u64, Value)> = chunks
        .iter()
        .filter(|(_, v)| v["choices"][0]["delta"].get("tool_calls").is_some())
        .collect();
    assert_eq!(calls.len(), 2);
    for (n, (seq, v)) in calls.iter().enumerate() {
        assert_eq!(*seq, last_seq, "sent when the job completed");
        let call = &v["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(call["index"], n);
    }
    assert_eq!(
        calls[0].1["choices"][0]["delta"]["tool_calls"][0],
        json!({"index": 0, "id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})
    );
    assert_eq!(
        calls[1].1["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Oslo\"}"
    );
    let completion = serde_json::to_value(chat::completion(c.projector().fold())).unwrap();
    assert_eq!(completion["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Checking both."
    );
    assert_eq!(
        completion["choices"][0]["message"]["reasoning_content"],
        "Two cities."
    );
    assert_eq!(
        completion["choices"][0]["message"]["tool_calls"][1],
        json!({"id": "call_2", "type": "function",
               "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}})
    );

    // Responses: `function_call` items, done (completed) only at the end.
    let r = project(responses(&["get_weather"]), &events);
    let ev = check_responses(r.frames(), true);
    let done: Vec<&Value> = ev
        .iter()
        .filter(|e| {
            e["type"] == "response.output_item.done" && e["item"]["type"] == "function_call"
        })
        .collect();
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|e| e["item"]["status"] == "completed"));
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "response.completed");
    let out: Vec<&str> = last["response"]["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        out,
        ["reasoning", "message", "function_call", "function_call"]
    );

    // AI SDK: client tools carry no providerExecuted; input available at the end;
    // finish `tool-calls`.
    let a = project(ai_sdk(&["get_weather"]), &events);
    let chunks = check_ai_sdk(a.frames(), true, false);
    let available: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["type"] == "tool-input-available")
        .collect();
    assert_eq!(available.len(), 2);
    assert_eq!(
        *available[0],
        json!({"type": "tool-input-available", "toolCallId": "call_1",
               "toolName": "get_weather", "input": {"city": "Paris"}})
    );
    assert_eq!(
        chunks.last().unwrap(),
        &json!({"type": "finish", "finishReason": "tool-calls"})
    );
}

/// A client tool call that a retry discards, or an abort cuts, never reaches a
/// client as something to run.
#[test]
fn discarded_and_cut_client_calls_are_never_handed_over() {
    let mut b = LogBuilder::default();
    b.call()
        .tool(0, Some("call_bad"), Some("get_weather"), "{\"city\":\"Par")
        .usage(10, 3)
        .retry("upstream says 503")
        .call()
        .tool(
            0,
            Some("call_good"),
            Some("get_weather"),
            "{\"city\":\"Paris\"}",
        )
        .usage(10, 5)
        .complete(None);
    let retried = b.build();
    let mut b = LogBuilder::default();
    b.call()
        .tool(0, Some("call_cut"), Some("get_weather"), "{\"ci")
        .usage(10, 2)
        .abort("aborted");
    let aborted = b.build();
    for events in [&retried, &aborted] {
        all_checks(events, &["get_weather"]);
    }

    let c = project(chat(&["get_weather"]), &retried);
    let calls: Vec<Value> = chat_json(c.frames())
        .into_iter()
        .filter_map(|v| v["choices"][0]["delta"].get("tool_calls").cloned())
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0][0]["id"], "call_good");
    assert_eq!(calls[0][0]["index"], 0);
    let c = project(chat(&["get_weather"]), &aborted);
    assert!(
        chat_json(c.frames())
            .iter()
            .all(|v| v["choices"][0]["delta"].get("tool_calls").is_none())
    );

    let ev = check_responses(
        project(responses(&["get_weather"]), &retried).frames(),
        true,
    );
    let done: Vec<(&str, &str)> = ev
        .iter()
        .filter(|e| e["type"] == "response.output_item.done")
        .map(|e| {
            (
                e["item"]["call_id"].as_str().unwrap(),
                e["item"]["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        done,
        [("call_bad", "incomplete"), ("call_good", "completed")]
    );
    let out = &ev.last().unwrap()["response"]["output"];
    assert_eq!(out.as_array().unwrap().len(), 1);
    assert_eq!(out[0]["call_id"], "call_good");

    let chunks = check_ai_sdk(
        project(ai_sdk(&["get_weather"]), &retried).frames(),
        true,
        false,
    );
    let tool: Vec<(&str, &str)> = chunks
        .iter()
        .filter(|c| c["toolCallId"].is_string() && c["type"] != "tool-input-delta")
        .map(|c| {
            (
                c["type"].as_str().unwrap(),
                c["toolCallId"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tool,
        [
            ("tool-input-start", "call_bad"),
            ("tool-input-error", "call_bad"),
            ("tool-input-start", "call_good"),
            ("tool-input-available", "call_good"),
        ]
    );
    let chunks = check_ai_sdk(
        project(ai_sdk(&["get_weather"]), &aborted).frames(),
        true,
        false,
    );
    assert!(chunks.iter().any(|c| c["type"] == "tool-input-error"));
    assert!(!chunks.iter().any(|c| c["type"] == "tool-input-available"));
}

#[test]
fn a_retry_keeps_what_was_sent_and_the_final_objects_hold_the_saved_answer() {
    let events = log("retry_discard");
    let c = project(chat(&[]), &events);
    let streamed: String = chat_json(c.frames())
        .iter()
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        streamed, "Hello worHello world",
        "deltas cannot be taken back"
    );
    let completion = serde_json::to_value(chat::completion(c.projector().fold())).unwrap();
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Hello world"
    );

    let ev = check_responses(project(responses(&[]), &events).frames(), true);
    let done: Vec<(&str, &str)> = ev
        .iter()
        .filter(|e| e["type"] == "response.output_item.done")
        .map(|e| {
            (
                e["item"]["status"].as_str().unwrap(),
                e["item"]["content"][0]["text"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        done,
        [("incomplete", "Hello wor"), ("completed", "Hello world")]
    );
    let last = ev.last().unwrap();
    assert_eq!(last["response"]["output"].as_array().unwrap().len(), 1);
    assert_eq!(
        last["response"]["output"][0]["content"][0]["text"],
        "Hello world"
    );

    // AI SDK: the discarded part is ended and its step finished; the next attempt is a
    // step of its own. With reset-step (AI SDK 7) the client drops the attempt instead.
    let chunks = check_ai_sdk(project(ai_sdk(&[]), &events).frames(), true, false);
    assert_eq!(
        types(&chunks),
        [
            "start",
            "start-step",
            "text-start",
            "text-delta",
            "text-delta",
            "text-end",
            "finish-step",
            "start-step",
            "text-start",
            "text-delta",
            "text-delta",
            "text-end",
            "finish-step",
            "finish",
        ]
    );
    let reset = AiSdkProjector::new(AiSdkOptions {
        client_tools: set(&[]),
        reset_step_on_retry: true,
    });
    let chunks = check_ai_sdk(project(reset, &events).frames(), true, true);
    assert_eq!(
        types(&chunks),
        [
            "start",
            "start-step",
            "text-start",
            "text-delta",
            "text-delta",
            "reset-step",
            "text-start",
            "text-delta",
            "text-delta",
            "text-end",
            "finish-step",
            "finish",
        ]
    );
}

fn terminal(events: &[Event]) -> (Value, Value, Vec<Value>) {
    let r = project(responses(&[]), events);
    let ev = check_responses(r.frames(), true);
    let c = project(chat(&[]), events);
    let chunks = chat_json(c.frames());
    let a = project(ai_sdk(&[]), events);
    let ai = check_ai_sdk(a.frames(), true, false);
    (ev.last().unwrap().clone(), json!(chunks), ai)
}

#[test]
fn how_each_ending_maps() {
    // A user's abort: Responses `cancelled` (in a response.incomplete event), Chat
    // `stop`, AI SDK `abort` with genstream's reason.
    let (r, c, a) = terminal(&log("abort"));
    assert_eq!(r["type"], "response.incomplete");
    assert_eq!(r["response"]["status"], "cancelled");
    assert_eq!(r["response"]["incomplete_details"], Value::Null);
    let items = r["response"]["output"].as_array().unwrap();
    assert_eq!(items[0]["status"], "incomplete");
    assert_eq!(items[0]["content"][0]["text"], "Once upon a time there");
    assert!(
        c.as_array()
            .unwrap()
            .iter()
            .any(|v| v["choices"][0]["finish_reason"] == "stop")
    );
    assert_eq!(
        a.last().unwrap(),
        &json!({"type": "abort", "reason": "aborted"})
    );

    // A shutdown's abort: incomplete without a reason OpenAI has a name for.
    let mut b = LogBuilder::default();
    b.call().text("Cut").usage(3, 1).abort("shutdown");
    let (r, _, a) = terminal(&b.build());
    assert_eq!(r["response"]["status"], "incomplete");
    assert_eq!(r["response"]["incomplete_details"], json!({"reason": null}));
    assert_eq!(
        a.last().unwrap(),
        &json!({"type": "abort", "reason": "shutdown"})
    );

    // A failure: `error` then `response.failed` with genstream's code; Chat sends
    // OpenAI's error frame (the SDKs raise it); AI SDK `error` then `finish`.
    let (r, c, a) = terminal(&log("error"));
    assert_eq!(r["type"], "response.failed");
    assert_eq!(
        r["response"]["error"],
        json!({"code": "upstream_error", "message": "upstream says 400"})
    );
    let c = c.as_array().unwrap();
    assert_eq!(
        c.last().unwrap(),
        &json!({"error": {"message": "upstream says 400", "type": "server_error", "param": null, "code": "upstream_error"}})
    );
    assert!(
        c[c.len() - 2]["usage"].is_object(),
        "the usage chunk comes first"
    );
    assert_eq!(
        a[a.len() - 2..],
        [
            json!({"type": "error", "errorText": "upstream says 400"}),
            json!({"type": "finish", "finishReason": "error"})
        ]
    );

    // A server limit: incomplete / `length`.
    for name in ["log_full", "max_tool_iterations"] {
        let (r, c, a) = terminal(&log(name));
        assert_eq!(r["type"], "response.incomplete", "{name}");
        assert_eq!(r["response"]["status"], "incomplete");
        assert_eq!(
            r["response"]["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert!(
            c.as_array()
                .unwrap()
                .iter()
                .any(|v| v["choices"][0]["finish_reason"] == "length")
        );
        assert_eq!(
            a.last().unwrap(),
            &json!({"type": "finish", "finishReason": "length"})
        );
    }

    // A completion.
    let (r, c, a) = terminal(&log("text"));
    assert_eq!(r["type"], "response.completed");
    assert_eq!(r["response"]["status"], "completed");
    assert!(
        r["response"]["completed_at"].as_i64().unwrap()
            >= r["response"]["created_at"].as_i64().unwrap()
    );
    assert!(
        c.as_array()
            .unwrap()
            .iter()
            .any(|v| v["choices"][0]["finish_reason"] == "stop")
    );
    assert_eq!(
        a.last().unwrap(),
        &json!({"type": "finish", "finishReason": "stop"})
    );
}

#[test]
fn ids_and_times_come_from_created() {
    let events = log("text");
    let EventBody::Created(created) = &events[0].body else {
        panic!()
    };
    let compact: String = created.stream_id.replace('-', "");
    let (r, c, a) = terminal(&events);
    assert_eq!(r["response"]["id"], format!("resp_{compact}"));
    assert_eq!(c[0]["id"], format!("chatcmpl-{compact}"));
    assert_eq!(r["response"]["model"], created.model);
    let created_at = time::OffsetDateTime::parse(
        &created.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    assert_eq!(r["response"]["created_at"], created_at);
    assert_eq!(c[0]["created"], created_at);
    assert_eq!(
        a[0],
        json!({"type": "start", "messageId": created.response_message_id,
               "messageMetadata": {"streamId": created.stream_id, "conversationId": created.conversation_id}})
    );
}

#[test]
fn usage_is_summed_in_each_protocols_shape() {
    // An OpenAI record (input includes the cache) and an Anthropic one (it does not).
    let mut b = LogBuilder::default();
    b.call()
        .text("a")
        .usage_record(genstream_engine::usage::UsageRecord {
            input_tokens: 100,
            output_tokens: 20,
            cache_read_tokens: 40,
            reasoning_tokens: 5,
            input_includes_cache: true,
            ..Default::default()
        });
    b.retry("x")
        .call()
        .text("b")
        .usage_record(genstream_engine::usage::UsageRecord {
            input_tokens: 10,
            output_tokens: 7,
            cache_read_tokens: 30,
            cache_write_tokens: 60,
            input_includes_cache: false,
            ..Default::default()
        });
    b.complete(None);
    let events = b.build();
    let (r, c, _) = terminal(&events);
    assert_eq!(
        r["response"]["usage"],
        json!({"input_tokens": 200, "input_tokens_details": {"cached_tokens": 70, "cache_write_tokens": 60},
               "output_tokens": 27, "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 227})
    );
    let c = c.as_array().unwrap();
    assert_eq!(
        c.last().unwrap()["usage"],
        json!({"prompt_tokens": 200, "completion_tokens": 27, "total_tokens": 227,
               "prompt_tokens_details": {"cached_tokens": 70},
               "completion_tokens_details": {"reasoning_tokens": 5}})
    );
}

#[test]
fn a_background_response_starts_queued() {
    let events = log("text");
    let p = ResponsesProjector::new(ResponsesOptions {
        background: true,
        ..ResponsesOptions::default()
    });
    let ev = check_responses(project(p, &events).frames(), true);
    assert_eq!(
        types(&ev)[..3],
        [
            "response.created",
            "response.queued",
            "response.in_progress"
        ]
    );
    assert_eq!(ev[0]["response"]["status"], "queued");
    assert_eq!(ev[1]["response"]["status"], "queued");
    assert_eq!(ev[2]["response"]["status"], "in_progress");
    assert_eq!(ev.last().unwrap()["response"]["background"], true);
}

/// While the job runs, the objects are the answer so far.
#[test]
fn objects_in_progress() {
    let events = log("parallel_tools");
    let prefix = &events[..10]; // text, two tool calls streaming
    let r = project(responses(&[]), prefix);
    let o = serde_json::to_value(responses::response(
        r.projector().fold(),
        r.projector().options(),
    ))
    .unwrap();
    assert_eq!(o["status"], "in_progress");
    assert_eq!(o["usage"], Value::Null);
    let statuses: Vec<&str> = o["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "in_progress", "in_progress"]);
    let c = project(chat(&[]), prefix);
    let o = serde_json::to_value(chat::completion(c.projector().fold())).unwrap();
    assert_eq!(o["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(o["choices"][0]["message"]["content"], "Let me add. ");
    check_chat(c.frames(), false);
    check_responses(r.frames(), false);
    check_ai_sdk(project(ai_sdk(&[]), prefix).frames(), false, false);
}

#[test]
fn bad_input_is_refused_without_changing_anything() {
    let events = log("text");
    let mut p = ChatProjector::new(ChatOptions::default());
    let mut out = Vec::new();
    let err = p.push(0, &events[1].body, &mut out).unwrap_err();
    assert!(err.to_string().contains("starts with `created`"), "{err}");
    p.push(0, &events[0].body, &mut out).unwrap();
    let err = p.push(2, &events[2].body, &mut out).unwrap_err();
    assert!(err.to_string().contains("expected seq 1"), "{err}");
    assert_eq!(out.len(), 1);
    for e in &events[1..] {
        p.push(e.seq, &e.body, &mut out).unwrap();
    }
    let n = out.len();
    let after = events.len() as u64;
    let err = p.push(after, &events[2].body, &mut out).unwrap_err();
    assert!(
        err.to_string().contains("after the terminal event"),
        "{err}"
    );
    assert_eq!(out.len(), n);
    assert_eq!(p.next_position(), n as u64);
}
