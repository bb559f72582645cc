//! The retry layer and the tool loop, on paused tokio time with a scripted provider
//! whose every attempt is spelled out: retryable and non-retryable failures, the
//! delays (including Retry-After above the cap and past the ceiling), first-byte and
//! idle timeouts, `discardStepIds` so a retried answer never repeats text, abort
//! during a retry wait and during a slow tool, parallel tool calls, the iteration cap,
//! and a history where every tool call has its result.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::event::{ContentPart, Event, EventBody, FinalStatus};
use genstream_engine::log::{EventLog, LogLimits};
use genstream_engine::manager::{JobManager, ManagerConfig, ModelEntry, StartRequest};
use genstream_engine::persist::{MemoryPersistence, Persistence};
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream,
    ReasoningBlock, Role,
};
use genstream_engine::retry::RetryPolicy;
use genstream_engine::store::{JobStore, MemoryStore};
use genstream_engine::tools::{Tool, ToolRegistry};
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
enum Step {
    Emit(ProviderEvent),
    Sleep(Duration),
    Fail(ProviderError),
    Hang,
}

/// Each `stream()` call plays the next script; the last one repeats.
struct Scripted {
    scripts: Mutex<VecDeque<Vec<Step>>>,
    requests: Mutex<Vec<ModelRequest>>,
    started: Mutex<Vec<Instant>>,
}

impl Scripted {
    fn new(scripts: Vec<Vec<Step>>) -> Arc<Self> {
        Arc::new(Scripted {
            scripts: Mutex::new(scripts.into()),
            requests: Mutex::new(Vec::new()),
            started: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl Provider for Scripted {
    fn kind(&self) -> &str {
        "scripted"
    }
    async fn stream(
        &self,
        req: ModelRequest,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        self.requests.lock().push(req);
        self.started.lock().push(Instant::now());
        let script = {
            let mut q = self.scripts.lock();
            if q.len() > 1 {
                q.pop_front().unwrap()
            } else {
                q.front().cloned().unwrap()
            }
        };
        if let Some(Step::Fail(e)) = script.first() {
            return Err(e.clone());
        }
        let s = futures::stream::unfold(script.into_iter(), |mut it| async move {
            loop {
                match it.next()? {
                    Step::Emit(e) => return Some((Ok(e), it)),
                    Step::Sleep(d) => tokio::time::sleep(d).await,
                    Step::Fail(e) => return Some((Err(e), it)),
                    Step::Hang => futures::future::pending::<()>().await,
                }
            }
        });
        Ok(s.boxed())
    }
}

fn text(t: &str) -> Step {
    Step::Emit(ProviderEvent::Text(t.into()))
}
fn http(status: u16, retry_after: Option<Duration>) -> ProviderError {
    ProviderError {
        kind: ProviderErrorKind::Http,
        status: Some(status),
        message: format!("upstream says {status}"),
        retry_after,
        ..Default::default()
    }
}
fn tool_chunk(index: u32, id: Option<&str>, name: Option<&str>, args: &str) -> Step {
    Step::Emit(ProviderEvent::ToolCall {
        index,
        id: id.map(Into::into),
        name: name.map(Into::into),
        args: args.into(),
    })
}
fn finish(r: &str) -> Step {
    Step::Emit(ProviderEvent::Finish(r.into()))
}

/// Adds two numbers after `delay`; counts its runs.
struct Add {
    name: &'static str,
    delay: Duration,
    runs: Arc<AtomicUsize>,
}

#[async_trait]
impl Tool for Add {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        "adds a and b"
    }
    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}})
    }
    async fn execute(
        &self,
        args: serde_json::Value,
        _cancel: CancellationToken,
    ) -> Result<String, String> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        match (args["a"].as_f64(), args["b"].as_f64()) {
            (Some(a), Some(b)) => Ok((a + b).to_string()),
            _ => Err("a and b must be numbers".into()),
        }
    }
}

struct H {
    manager: JobManager,
    db: Arc<MemoryPersistence>,
    /// Runs of each tool of the registry, by name.
    runs: std::collections::HashMap<&'static str, Arc<AtomicUsize>>,
}

impl H {
    fn runs(&self, tool: &str) -> usize {
        self.runs[tool].load(Ordering::SeqCst)
    }
}

/// A manager over `provider` whose model `m` may use `add`, `slow_add` (a minute
/// slow) and `spy`; the registry also holds `secret`, which no model is given.
fn harness(provider: Arc<Scripted>, config: ManagerConfig) -> H {
    harness_with_limits(provider, config, LogLimits::default())
}

fn harness_with_limits(provider: Arc<Scripted>, config: ManagerConfig, limits: LogLimits) -> H {
    let db = Arc::new(MemoryPersistence::default());
    let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(limits));
    let mut model = ModelEntry::new("m", provider);
    model.retry = RetryPolicy {
        max_retries: 3,
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
        ceiling: Duration::from_secs(60),
    };
    model.timeouts.first_byte = Duration::from_secs(5);
    model.timeouts.idle = Duration::from_secs(2);
    model.tools = vec!["add".into(), "slow_add".into(), "spy".into()];
    let mut tools = ToolRegistry::new();
    let mut runs = std::collections::HashMap::new();
    for (name, delay) in [
        ("add", Duration::ZERO),
        ("slow_add", Duration::from_secs(60)),
        ("spy", Duration::ZERO),
        ("secret", Duration::ZERO),
    ] {
        let counter = Arc::new(AtomicUsize::new(0));
        runs.insert(name, counter.clone());
        tools.register(Arc::new(Add {
            name,
            delay,
            runs: counter,
        }));
    }
    let manager = JobManager::with_tools(
        store,
        db.clone() as Arc<dyn Persistence>,
        vec![model],
        tools,
        config,
    );
    H { manager, db, runs }
}

async fn run(h: &H) -> (Vec<Event>, String, Arc<EventLog>) {
    run_request(
        h,
        StartRequest {
            user_id: "u".into(),
            text: "hi".into(),
            ..Default::default()
        },
    )
    .await
}

async fn run_request(h: &H, request: StartRequest) -> (Vec<Event>, String, Arc<EventLog>) {
    let s = h.manager.start(request).await.unwrap();
    let log = h.manager.job_for("u", &s.stream_id).await.unwrap().1;
    let mut rx = log.watch();
    while log.terminal().is_none() {
        rx.changed().await.unwrap();
    }
    let events = log
        .read_after(None, usize::MAX)
        .frames
        .iter()
        .map(|f| serde_json::from_slice(f.data_json()).unwrap())
        .collect();
    (events, s.response_message_id, log)
}

fn retries(events: &[Event]) -> Vec<genstream_engine::event::Retry> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Retry(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn last(events: &[Event]) -> &EventBody {
    &events.last().unwrap().body
}

#[tokio::test(start_paused = true)]
async fn retryable_failures_wait_exponentially_and_the_answer_has_no_duplicate_text() {
    let p = Scripted::new(vec![
        vec![text("Hel"), text("lo wor"), Step::Fail(http(503, None))],
        vec![Step::Fail(http(500, None))],
        vec![text("Hello world"), finish("stop")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, response_id, _) = run(&h).await;
    let r = retries(&events);
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].attempt, r[0].max_attempts), (1, 4));
    // Equal jitter: retry n waits between half and all of base × 2ⁿ⁻¹.
    assert!((500..=1000).contains(&r[0].delay_ms), "{}", r[0].delay_ms);
    assert!((1000..=2000).contains(&r[1].delay_ms), "{}", r[1].delay_ms);
    assert_eq!(
        r[0].discard_step_ids.len(),
        1,
        "the first attempt's text step is dropped"
    );
    assert!(
        r[1].discard_step_ids.is_empty(),
        "the second attempt streamed nothing"
    );
    assert!(r[0].error.contains("503"));
    // The waits really happened, on tokio's clock.
    let started = p.started.lock().clone();
    assert!(started[1] - started[0] >= Duration::from_millis(r[0].delay_ms));
    assert!(started[2] - started[1] >= Duration::from_millis(r[1].delay_ms));
    let EventBody::Final(f) = last(&events) else {
        panic!()
    };
    assert_eq!(f.response_message.text, "Hello world");
    assert_eq!(
        f.response_message.content,
        vec![ContentPart::Text {
            text: "Hello world".into()
        }]
    );
    assert_eq!(
        h.db.get_message(&response_id).await.unwrap().unwrap().text,
        "Hello world"
    );
    // Every model call that streamed has a usage record (the failed one estimated).
    let usages: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Usage(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(usages.len(), 2);
    assert!(usages[0].estimated);
    assert_eq!(
        usages.iter().map(|u| u.call_index).collect::<Vec<_>>(),
        vec![0, 2]
    );
}

#[tokio::test(start_paused = true)]
async fn non_retryable_status_is_one_attempt_and_quotes_the_upstream() {
    let p = Scripted::new(vec![vec![Step::Fail(http(400, None))]]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, _, _) = run(&h).await;
    assert!(retries(&events).is_empty());
    assert_eq!(p.requests.lock().len(), 1);
    let EventBody::Error(e) = last(&events) else {
        panic!()
    };
    assert_eq!(e.code, "upstream_error");
    assert!(e.message.contains("upstream says 400"));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_above_the_cap_and_refused_past_the_ceiling() {
    let p = Scripted::new(vec![
        vec![Step::Fail(http(429, Some(Duration::from_secs(45))))],
        vec![Step::Fail(http(429, Some(Duration::from_millis(1500))))],
        vec![Step::Fail(http(429, Some(Duration::from_secs(120))))],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, _, _) = run(&h).await;
    let r = retries(&events);
    assert_eq!(
        r.iter().map(|r| r.delay_ms).collect::<Vec<_>>(),
        vec![45_000, 1500]
    );
    let started = p.started.lock().clone();
    assert!(started[1] - started[0] >= Duration::from_secs(45));
    let EventBody::Error(e) = last(&events) else {
        panic!()
    };
    assert!(e.message.contains("asked to wait 120 s"), "{}", e.message);
}

#[tokio::test(start_paused = true)]
async fn retries_are_bounded() {
    let p = Scripted::new(vec![vec![Step::Fail(http(502, None))]]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, _, _) = run(&h).await;
    assert_eq!(retries(&events).len(), 3);
    assert_eq!(p.requests.lock().len(), 4);
    assert!(matches!(last(&events), EventBody::Error(_)));
}

#[tokio::test(start_paused = true)]
async fn first_byte_and_idle_timeouts_are_retried() {
    let p = Scripted::new(vec![
        vec![Step::Hang],
        vec![text("par"), Step::Hang],
        vec![text("whole"), finish("stop")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, _, _) = run(&h).await;
    let r = retries(&events);
    assert_eq!(r.len(), 2);
    assert!(r[0].error.contains("first byte"), "{}", r[0].error);
    assert!(r[1].error.contains("idle gap"), "{}", r[1].error);
    let started = p.started.lock().clone();
    assert!(started[1] - started[0] >= Duration::from_millis(5_000 + r[0].delay_ms));
    let EventBody::Final(f) = last(&events) else {
        panic!()
    };
    assert_eq!(f.response_message.text, "whole");
}

#[tokio::test(start_paused = true)]
async fn abort_during_a_retry_wait_ends_the_job_within_100ms() {
    let p = Scripted::new(vec![
        vec![
            text("partial "),
            Step::Fail(http(429, Some(Duration::from_secs(50)))),
        ],
        vec![text("never")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let s = h
        .manager
        .start(StartRequest {
            user_id: "u".into(),
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // inside the 50 s wait
    let t0 = Instant::now();
    let out = h.manager.abort("u", &s.stream_id).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(p.requests.lock().len(), 1, "no second attempt");
    // The failed attempt's text was discarded by the retry event.
    assert_eq!(out.response_message.text, "");
}

#[tokio::test(start_paused = true)]
async fn tool_calls_split_across_chunks_run_in_parallel_and_feed_back() {
    let p = Scripted::new(vec![
        vec![
            text("Let me add. "),
            tool_chunk(0, Some("call_a"), Some("add"), "{\"a\": 1"),
            tool_chunk(1, Some("call_b"), None, ""),
            tool_chunk(1, None, Some("add"), "{\"a\":"),
            tool_chunk(0, None, None, ", \"b\": 2}"),
            tool_chunk(1, None, None, " 40, \"b\": 2}"),
            finish("tool_calls"),
        ],
        vec![text("3 and 42."), finish("stop")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, response_id, _) = run(&h).await;
    let EventBody::Final(f) = last(&events) else {
        panic!("{:?}", last(&events))
    };
    assert_eq!(f.status, FinalStatus::Complete);
    let calls: Vec<_> = f
        .response_message
        .content
        .iter()
        .filter_map(|c| match c {
            ContentPart::ToolCall { tool_call } => Some(tool_call.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (
            calls[0].id.as_str(),
            calls[0].args.as_str(),
            calls[0].output.as_deref()
        ),
        ("call_a", "{\"a\": 1, \"b\": 2}", Some("3"))
    );
    assert_eq!(
        (calls[1].id.as_str(), calls[1].output.as_deref()),
        ("call_b", Some("42"))
    );
    assert_eq!(f.response_message.text, "Let me add. 3 and 42.");
    // The second call got the assistant turn with both results.
    let reqs = p.requests.lock().clone();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].tools.len(), 3);
    let turn = reqs[1].messages.last().unwrap();
    assert_eq!(turn.role, Role::Assistant);
    assert_eq!(turn.text, "Let me add. ");
    assert!(turn.tool_calls.iter().all(|c| c.output.is_some()));
    let saved = h.db.get_message(&response_id).await.unwrap().unwrap();
    assert_eq!(saved.content, f.response_message.content);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e.body, EventBody::RunStepCompleted(_)))
            .count(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn tool_errors_and_bad_arguments_go_back_to_the_model() {
    let p = Scripted::new(vec![
        vec![
            tool_chunk(0, Some("c1"), Some("add"), "{not json"),
            tool_chunk(1, Some("c2"), Some("add"), "{\"a\":\"x\"}"),
            tool_chunk(2, Some("c3"), Some("nope"), "{}"),
            finish("tool_calls"),
        ],
        vec![text("sorry"), finish("stop")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, _, _) = run(&h).await;
    let EventBody::Final(f) = last(&events) else {
        panic!()
    };
    let outputs: Vec<String> = f
        .response_message
        .content
        .iter()
        .filter_map(|c| match c {
            ContentPart::ToolCall { tool_call } => tool_call.output.clone(),
            _ => None,
        })
        .collect();
    assert!(outputs[0].contains("not valid JSON"), "{}", outputs[0]);
    assert!(outputs[1].contains("must be numbers"));
    assert_eq!(outputs[2], r#"{"error":"tool nope is not available"}"#);
}

/// A model may name any tool, including ones it was never shown: only the tools the
/// job was given run (the model's list, narrowed by the request); any other call is
/// answered "not available" and never reaches the tool, although the server's registry
/// holds it.
#[tokio::test(start_paused = true)]
async fn a_tool_the_job_was_not_given_is_not_run() {
    let p = Scripted::new(vec![
        vec![
            tool_chunk(0, Some("c1"), Some("add"), "{\"a\":1,\"b\":2}"),
            // In the registry, but no model may use it.
            tool_chunk(1, Some("c2"), Some("secret"), "{\"a\":1,\"b\":2}"),
            // The model may use it, but this request narrowed the tools to `add`.
            tool_chunk(2, Some("c3"), Some("spy"), "{\"a\":1,\"b\":2}"),
            finish("tool_calls"),
        ],
        vec![text("done"), finish("stop")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, _, _) = run_request(
        &h,
        StartRequest {
            user_id: "u".into(),
            text: "hi".into(),
            tools: vec!["add".into()],
            ..Default::default()
        },
    )
    .await;
    let EventBody::Final(f) = last(&events) else {
        panic!("{:?}", last(&events))
    };
    assert_eq!(f.status, FinalStatus::Complete);
    let outputs: Vec<Option<String>> = f
        .response_message
        .content
        .iter()
        .filter_map(|c| match c {
            ContentPart::ToolCall { tool_call } => Some(tool_call.output.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        outputs,
        [
            Some("3".to_owned()),
            Some(r#"{"error":"tool secret is not available"}"#.to_owned()),
            Some(r#"{"error":"tool spy is not available"}"#.to_owned()),
        ]
    );
    assert_eq!((h.runs("add"), h.runs("secret"), h.runs("spy")), (1, 0, 0));
    // Only `add` was offered, and the results went back to the model.
    let reqs = p.requests.lock().clone();
    let offered: Vec<&str> = reqs[0].tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(offered, ["add"]);
    let turn = reqs[1].messages.last().unwrap();
    assert_eq!(turn.tool_calls.len(), 3);
    assert_eq!(
        turn.tool_calls[1].output.as_deref(),
        Some(r#"{"error":"tool secret is not available"}"#)
    );
}

#[tokio::test(start_paused = true)]
async fn the_iteration_cap_ends_the_job_with_a_terminal_event() {
    let p = Scripted::new(vec![vec![
        tool_chunk(0, Some("c"), Some("add"), "{\"a\":1,\"b\":1}"),
        finish("tool_calls"),
    ]]);
    let h = harness(
        p.clone(),
        ManagerConfig {
            max_tool_iterations: 3,
            ..Default::default()
        },
    );
    let (events, _, _) = run(&h).await;
    let EventBody::Final(f) = last(&events) else {
        panic!()
    };
    assert_eq!(f.reason.as_deref(), Some("max_tool_iterations"));
    assert_eq!(p.requests.lock().len(), 3);
    // Every stored tool call has its result; the last round's tools did not run, as
    // the model would never have seen their results.
    let outputs: Vec<Option<&str>> = f
        .response_message
        .content
        .iter()
        .filter_map(|c| match c {
            ContentPart::ToolCall { tool_call } => Some(tool_call.output.as_deref()),
            _ => None,
        })
        .collect();
    assert_eq!(
        outputs,
        [
            Some("2"),
            Some("2"),
            Some(r#"{"error":"not run: max_tool_iterations reached"}"#)
        ]
    );
    assert_eq!(h.runs("add"), 2, "the capped round's tool ran");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e.body, EventBody::RunStepCompleted(_)))
            .count(),
        3
    );
}

/// A job that ends while a tool call is still open — here the log fills up while its
/// arguments stream, so not even a "cancelled" `on_run_step_completed` fits — saves the
/// call with the cancelled result: a stored call without a result would make every
/// later turn fail upstream (docs/lessons.md: grimoire).
#[tokio::test(start_paused = true)]
async fn a_call_left_open_by_a_full_log_is_saved_with_a_result() {
    let mut script = vec![tool_chunk(0, Some("c"), Some("add"), "{\"a\":")];
    script.extend((0..40).map(|_| tool_chunk(0, None, None, " ")));
    script.push(tool_chunk(0, None, None, "1,\"b\":2}"));
    script.push(finish("tool_calls"));
    let p = Scripted::new(vec![script, vec![text("fine"), finish("stop")]]);
    let h = harness_with_limits(
        p.clone(),
        ManagerConfig::default(),
        LogLimits {
            max_events: 12,
            ..LogLimits::default()
        },
    );
    let (events, response_id, _) = run(&h).await;
    let EventBody::Error(e) = last(&events) else {
        panic!("{:?}", last(&events))
    };
    assert_eq!(e.code, "log_full");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.body, EventBody::RunStepCompleted(_))),
        "no room for a completion in the log"
    );
    let cancelled = Some(r#"{"error":"cancelled"}"#);
    let calls_of = |content: &[ContentPart]| -> Vec<Option<String>> {
        content
            .iter()
            .filter_map(|c| match c {
                ContentPart::ToolCall { tool_call } => Some(tool_call.output.clone()),
                _ => None,
            })
            .collect()
    };
    let sent = e.response_message.as_ref().unwrap();
    assert_eq!(calls_of(&sent.content), [cancelled.map(str::to_owned)]);
    let saved = h.db.get_message(&response_id).await.unwrap().unwrap();
    assert_eq!(saved.content, sent.content);
    assert_eq!(h.runs("add"), 0);
    // The next turn's history pairs the call with that result.
    let conversation_id = saved.conversation_id.clone();
    run_request(
        &h,
        StartRequest {
            user_id: "u".into(),
            text: "again".into(),
            conversation_id: Some(conversation_id),
            parent_message_id: Some(response_id),
            ..Default::default()
        },
    )
    .await;
    let reqs = p.requests.lock().clone();
    let assistant = reqs
        .last()
        .unwrap()
        .messages
        .iter()
        .find(|m| m.role == Role::Assistant)
        .unwrap();
    assert_eq!(assistant.tool_calls[0].output.as_deref(), cancelled);
}

#[tokio::test(start_paused = true)]
async fn abort_during_a_slow_tool_records_cancelled_and_keeps_history_valid() {
    let p = Scripted::new(vec![
        vec![
            tool_chunk(0, Some("fast"), Some("add"), "{\"a\":1,\"b\":2}"),
            tool_chunk(1, Some("slow"), Some("slow_add"), "{\"a\":1,\"b\":2}"),
            finish("tool_calls"),
        ],
        vec![text("never")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let s = h
        .manager
        .start(StartRequest {
            user_id: "u".into(),
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t0 = Instant::now();
    let out = h.manager.abort("u", &s.stream_id).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "the slow tool was cancelled, not awaited"
    );
    let calls: Vec<_> = out
        .response_message
        .content
        .iter()
        .filter_map(|c| match c {
            ContentPart::ToolCall { tool_call } => Some(tool_call.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].output.as_deref(), Some("3"));
    assert_eq!(
        calls[1].output.as_deref(),
        Some("{\"error\":\"cancelled\"}")
    );
    assert!(out.response_message.unfinished);
    // A follow-up request's history pairs every call with its result.
    let follow = h
        .manager
        .start(StartRequest {
            user_id: "u".into(),
            text: "go on".into(),
            conversation_id: Some(s.conversation_id.clone()),
            parent_message_id: Some(s.response_message_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    h.manager.wait_idle().await;
    let _ = follow;
    let reqs = p.requests.lock().clone();
    let history = &reqs.last().unwrap().messages;
    let assistant = history.iter().find(|m| m.role == Role::Assistant).unwrap();
    assert_eq!(assistant.tool_calls.len(), 2);
    assert!(assistant.tool_calls.iter().all(|c| c.output.is_some()));
}

#[tokio::test(start_paused = true)]
async fn abort_mid_stream_of_tool_arguments_closes_the_call_with_cancelled() {
    let p = Scripted::new(vec![vec![
        tool_chunk(0, Some("c"), Some("add"), "{\"a\":"),
        Step::Sleep(Duration::from_secs(1)),
        Step::Hang,
    ]]);
    let h = harness(p.clone(), ManagerConfig::default());
    let s = h
        .manager
        .start(StartRequest {
            user_id: "u".into(),
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = h.manager.abort("u", &s.stream_id).await.unwrap();
    let ContentPart::ToolCall { tool_call } = &out.response_message.content[0] else {
        panic!()
    };
    assert_eq!(
        tool_call.output.as_deref(),
        Some("{\"error\":\"cancelled\"}")
    );
}

/// Anthropic's signed and redacted thinking blocks travel from the provider's events
/// through the log into the content, the next model call of the tool loop and — via
/// the saved message — the next turn's history, verbatim and in order; a failed
/// attempt's blocks do not.
#[tokio::test(start_paused = true)]
async fn thinking_signatures_and_redacted_blocks_reach_the_next_calls() {
    let reasoning = |t: &str| Step::Emit(ProviderEvent::Reasoning(t.into()));
    let signature = |s: &str| Step::Emit(ProviderEvent::ReasoningSignature(s.into()));
    let redacted = |d: &str| Step::Emit(ProviderEvent::RedactedReasoning(d.into()));
    let p = Scripted::new(vec![
        // A failed attempt: its thinking and signature are discarded with it.
        vec![
            reasoning("wrong "),
            signature("EqStale"),
            Step::Fail(http(529, None)),
        ],
        vec![
            reasoning("I should "),
            reasoning("add."),
            signature("EqSig1"),
            redacted("EmwKAhgB"),
            tool_chunk(0, Some("c1"), Some("add"), "{\"a\":1,\"b\":2}"),
            finish("tool_use"),
        ],
        vec![signature("EqOmitted"), text("3."), finish("end_turn")],
    ]);
    let h = harness(p.clone(), ManagerConfig::default());
    let (events, response_id, _) = run(&h).await;
    let EventBody::Final(f) = last(&events) else {
        panic!("{:?}", last(&events))
    };
    let think = |t: &str, s: &str| ContentPart::Think {
        think: t.into(),
        signature: Some(s.into()),
    };
    let content = &f.response_message.content;
    assert_eq!(content[0], think("I should add.", "EqSig1"));
    assert_eq!(
        content[1],
        ContentPart::RedactedThinking {
            data: "EmwKAhgB".into()
        }
    );
    assert!(matches!(&content[2], ContentPart::ToolCall { .. }));
    // A block with no text (its thinking omitted) is a part of its own.
    assert_eq!(content[3], think("", "EqOmitted"));
    assert_eq!(content[4], ContentPart::Text { text: "3.".into() });
    assert_eq!(content.len(), 5);
    let blocks = vec![
        ReasoningBlock::Thinking {
            thinking: "I should add.".into(),
            signature: "EqSig1".into(),
        },
        ReasoningBlock::Redacted {
            data: "EmwKAhgB".into(),
        },
    ];
    let reqs = p.requests.lock().clone();
    assert_eq!(reqs.len(), 3);
    let turn = reqs[2].messages.last().unwrap();
    assert_eq!((turn.role, &turn.reasoning), (Role::Assistant, &blocks));
    // The next turn rebuilds the same blocks from the saved message.
    let saved = h.db.get_message(&response_id).await.unwrap().unwrap();
    assert_eq!(&saved.content, content);
    run_request(
        &h,
        StartRequest {
            user_id: "u".into(),
            text: "again".into(),
            conversation_id: Some(saved.conversation_id.clone()),
            parent_message_id: Some(response_id),
            ..Default::default()
        },
    )
    .await;
    let reqs = p.requests.lock().clone();
    let history = &reqs.last().unwrap().messages;
    let assistants: Vec<_> = history
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .collect();
    assert_eq!(assistants.len(), 2);
    assert_eq!(assistants[0].reasoning, blocks);
    assert_eq!(assistants[0].tool_calls.len(), 1);
    assert_eq!(
        assistants[1].reasoning,
        [ReasoningBlock::Thinking {
            thinking: String::new(),
            signature: "EqOmitted".into()
        }]
    );
    assert_eq!(assistants[1].text, "3.");
}
