//! The client against a tiny fake genstream server on loopback: SSE frames in the exact
//! docs/protocol.md §3 format (made by the engine's own encoder), dropped connections, error
//! statuses and error terminals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use genstream_client::{ChatRequest, Client, ClientError, run_abort, run_attach, run_chat};
use genstream_engine::event::{
    ContentPart, ConversationRef, Created, Delta, DeltaContent, ErrorEvent, EventBody, Final,
    FinalStatus, Frame, Message, MessageCreation, RunStep, StepDetails, StepType,
};
use genstream_engine::usage::UsageTotals;
use serde_json::{Value, json};

const STREAM: &str = "0197-stream";
const CONVO: &str = "0197-convo";

/// What the fake does on the n-th connection to the stream route.
#[derive(Clone, Debug)]
enum Plan {
    /// Serve this many frames after the cursor, then half of the next one, then reset
    /// the connection.
    Drop(usize),
    /// Serve this many frames and a ping, then end the response cleanly (no terminal).
    Close(usize),
    /// Serve this many frames, then go silent with the connection open.
    Stall(usize),
    /// Answer this status and JSON body.
    Status(u16, &'static str),
    /// Serve the first frame after the cursor, skip one, serve the rest.
    Gap,
    /// Serve everything after the cursor, split across chunks, with pings.
    Full,
}

struct Fake {
    frames: Vec<Bytes>,
    plans: Vec<Plan>,
    /// `Last-Event-ID` of each stream connection.
    cursors: Mutex<Vec<Option<String>>>,
    /// `Authorization` of every request.
    auths: Mutex<Vec<Option<String>>>,
    /// Bodies posted to `/api/chat` and `/api/chat/abort`.
    posts: Mutex<Vec<Value>>,
}

enum Step {
    Data(Bytes),
    Sleep(u64),
    Fail,
    Hang,
}

fn step_stream(
    steps: Vec<Step>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(VecDeque::from(steps), |mut steps| async move {
        loop {
            match steps.pop_front()? {
                Step::Data(b) => return Some((Ok(b), steps)),
                Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Step::Fail => {
                    return Some((Err(std::io::Error::other("fake connection drop")), steps));
                }
                Step::Hang => futures::future::pending::<()>().await,
            }
        }
    })
}

fn ping() -> Step {
    Step::Data(Bytes::from_static(b": ping\n\n"))
}

async fn stream_route(
    State(f): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    assert_eq!(id, STREAM);
    let auth = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned());
    f.auths.lock().unwrap().push(auth);
    let last = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let n = {
        let mut c = f.cursors.lock().unwrap();
        c.push(last.clone());
        c.len() - 1
    };
    let plan = f.plans.get(n).cloned().unwrap_or(Plan::Full);
    if let Plan::Status(code, body) = plan {
        return (
            StatusCode::from_u16(code).unwrap(),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
    }
    let start = last.map_or(0, |c| c.parse::<usize>().unwrap() + 1);
    let rest = &f.frames[start..];
    let mut steps = vec![ping()];
    let data = |b: &Bytes| Step::Data(b.clone());
    match plan {
        Plan::Drop(k) => {
            steps.extend(rest[..k].iter().map(data));
            let next = &rest[k];
            steps.push(Step::Data(next.slice(..next.len() / 2)));
            steps.push(Step::Sleep(30));
            steps.push(Step::Fail);
        }
        Plan::Close(k) => {
            steps.extend(rest[..k].iter().map(data));
            steps.push(ping());
        }
        Plan::Stall(k) => {
            steps.extend(rest[..k].iter().map(data));
            steps.push(Step::Hang);
        }
        Plan::Gap => {
            steps.push(data(&rest[0]));
            steps.extend(rest[2..].iter().map(data));
        }
        Plan::Full => {
            for (i, frame) in rest.iter().enumerate() {
                let mid = frame.len() / 3;
                steps.push(Step::Data(frame.slice(..mid)));
                steps.push(Step::Sleep(1));
                steps.push(Step::Data(frame.slice(mid..)));
                if i % 3 == 0 {
                    steps.push(ping());
                }
            }
        }
        Plan::Status(..) => unreachable!(),
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache, no-transform")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(step_stream(steps)))
        .unwrap()
}

async fn chat_route(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned());
    f.auths.lock().unwrap().push(auth);
    f.posts.lock().unwrap().push(body);
    axum::Json(json!({
        "streamId": STREAM,
        "conversationId": CONVO,
        "userMessageId": "u1",
        "responseMessageId": "r1",
        "status": "started",
    }))
}

async fn abort_route(
    State(f): State<Arc<Fake>>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    f.posts.lock().unwrap().push(body);
    axum::Json(json!({
        "success": true,
        "aborted": STREAM,
        "responseMessage": {"messageId": "r1", "text": "Hello"},
        "usage": {},
    }))
}

async fn serve(frames: Vec<Frame>, plans: Vec<Plan>) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake {
        frames: frames.into_iter().map(|f| f.bytes).collect(),
        plans,
        cursors: Mutex::default(),
        auths: Mutex::default(),
        posts: Mutex::default(),
    });
    let app = Router::new()
        .route("/api/chat/stream/{id}", get(stream_route))
        .route("/api/chat", post(chat_route))
        .route("/api/chat/abort", post(abort_route))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), fake)
}

fn client(server: &str) -> Client {
    Client::new(server, "test-token").unwrap().with_backoff(
        Duration::from_millis(5),
        Duration::from_millis(20),
        Duration::from_secs(10),
    )
}

fn message(id: &str, text: &str, user: bool) -> Message {
    Message {
        message_id: id.into(),
        conversation_id: CONVO.into(),
        parent_message_id: None,
        sender: if user { "User" } else { "demo" }.into(),
        text: text.into(),
        content: vec![],
        is_created_by_user: user,
        model: None,
        unfinished: false,
        error: false,
        created_at: "2025-01-01T00:00:00.000Z".into(),
    }
}

/// A log: created, a reasoning delta, a run step, one text delta per piece, terminal.
fn log(pieces: &[&str], terminal: EventBody) -> Vec<Frame> {
    let delta = |part: ContentPart| Delta {
        id: "step1".into(),
        delta: DeltaContent {
            content: vec![part],
        },
    };
    let mut bodies = vec![
        EventBody::Created(Created {
            stream_id: STREAM.into(),
            conversation_id: CONVO.into(),
            user_message: message("u1", "hi", true),
            response_message_id: "r1".into(),
            model: "demo".into(),
            sender: "demo".into(),
            created_at: "2025-01-01T00:00:00.000Z".into(),
            client_tools: Vec::new(),
            protocol_options: None,
        }),
        EventBody::ReasoningDelta(delta(ContentPart::Think {
            think: "pondering".into(),
            signature: None,
        })),
        EventBody::RunStep(RunStep {
            id: "step1".into(),
            run_id: format!("{STREAM}:0"),
            index: 0,
            step_type: StepType::MessageCreation,
            step_details: StepDetails::MessageCreation {
                message_creation: MessageCreation {
                    message_id: "r1".into(),
                },
            },
        }),
    ];
    bodies.extend(pieces.iter().map(|p| {
        EventBody::MessageDelta(delta(ContentPart::Text {
            text: (*p).to_owned(),
        }))
    }));
    bodies.push(terminal);
    bodies
        .iter()
        .enumerate()
        .map(|(seq, b)| Frame::encode(seq as u64, b).unwrap())
        .collect()
}

fn final_event(status: FinalStatus, text: &str) -> EventBody {
    EventBody::Final(Final {
        status,
        response_message: message("r1", text, false),
        conversation: ConversationRef {
            conversation_id: CONVO.into(),
            title: "t".into(),
        },
        usage: UsageTotals::default(),
        reason: None,
    })
}

const PIECES: &[&str] = &[
    "Hel", "lo, ", "wör", "ld", "! ", "Mul", "ti\nline", " ✓", " an", "swer.",
];

fn full_text() -> String {
    PIECES.concat()
}

#[tokio::test]
async fn follow_resumes_after_drops_without_gaps_or_duplicates() {
    let frames = log(PIECES, final_event(FinalStatus::Complete, &full_text()));
    let n = frames.len() as u64;
    let (server, fake) = serve(
        frames,
        vec![Plan::Drop(3), Plan::Close(3), Plan::Drop(0), Plan::Full],
    )
    .await;
    let mut events = Vec::new();
    let terminal = client(&server)
        .follow(STREAM, None, |ev| events.push(ev.clone()))
        .await
        .unwrap();

    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..n).collect::<Vec<_>>());
    assert_eq!(terminal, *events.last().unwrap());
    assert_eq!(terminal.event, "final");
    let text: String = events.iter().map(|e| e.text()).collect();
    assert_eq!(text, full_text());
    // The client's events are the engine's wire type, field for field.
    for ev in &events {
        let typed = ev.typed().unwrap();
        assert_eq!(typed.seq, ev.seq);
        assert_eq!(typed.body.name(), ev.event);
    }
    // Each reconnection resumed from the last complete frame it had.
    assert_eq!(
        *fake.cursors.lock().unwrap(),
        vec![None, Some("2".into()), Some("5".into()), Some("5".into())]
    );
    assert!(
        fake.auths
            .lock()
            .unwrap()
            .iter()
            .all(|a| a.as_deref() == Some("Bearer test-token"))
    );
}

#[tokio::test]
async fn run_chat_prints_the_full_text_across_reconnects() {
    let frames = log(PIECES, final_event(FinalStatus::Complete, &full_text()));
    let (server, fake) = serve(frames, vec![Plan::Drop(4), Plan::Close(5), Plan::Full]).await;
    let mut req = ChatRequest::new("hi");
    req.conversation_id = Some(CONVO.into());
    req.model = Some("demo".into());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    run_chat(&client(&server), &req, &mut out, &mut err)
        .await
        .unwrap();

    let out = String::from_utf8(out).unwrap();
    let err = String::from_utf8(err).unwrap();
    assert_eq!(out, format!("{}\n", full_text()));
    assert!(
        err.starts_with(&format!(
            "streamId={STREAM} conversationId={CONVO} responseMessageId=r1\n"
        )),
        "{err}"
    );
    assert!(err.contains("pondering"), "{err}");
    assert!(err.contains("reconnecting from seq 3…"), "{err}");
    assert!(err.contains("reconnecting from seq 8…"), "{err}");
    assert_eq!(
        fake.posts.lock().unwrap()[0],
        json!({"text": "hi", "conversationId": CONVO, "model": "demo"})
    );
}

#[tokio::test]
async fn not_found_is_fatal_and_quotes_the_server() {
    let (server, fake) = serve(
        vec![],
        vec![Plan::Status(
            404,
            r#"{"error":{"code":"not_found","message":"stream 0197-stream not found"}}"#,
        )],
    )
    .await;
    let e = client(&server)
        .follow(STREAM, None, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status, code, .. } if status.as_u16() == 404 && code == "not_found"),
        "{e:?}"
    );
    let line = e.to_string();
    assert!(
        line.contains("not_found: stream 0197-stream not found"),
        "{line}"
    );
    assert!(!line.contains('\n'));
    assert_eq!(
        fake.cursors.lock().unwrap().len(),
        1,
        "a 404 is not retried"
    );
}

#[tokio::test]
async fn forbidden_on_attach_is_fatal() {
    let (server, _) = serve(
        vec![],
        vec![Plan::Status(
            403,
            r#"{"error":{"code":"forbidden","message":"not your stream"}}"#,
        )],
    )
    .await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let e = run_attach(&client(&server), STREAM, None, &mut out, &mut err)
        .await
        .unwrap_err();
    assert_eq!(e.status().map(|s| s.as_u16()), Some(403));
    assert!(e.to_string().contains("forbidden: not your stream"), "{e}");
    assert!(!e.is_reported());
}

#[tokio::test]
async fn error_terminal_is_an_error_return() {
    let frames = log(
        &["Partial ", "answer"],
        EventBody::Error(ErrorEvent {
            code: "upstream_error".into(),
            message: "the model fell over".into(),
            response_message: None,
        }),
    );
    let (server, _) = serve(frames, vec![Plan::Drop(3)]).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let e = run_attach(&client(&server), STREAM, None, &mut out, &mut err)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Generation { code, .. } if code == "upstream_error"),
        "{e:?}"
    );
    assert!(e.is_reported());
    assert_eq!(String::from_utf8(out).unwrap(), "Partial answer\n");
    let err = String::from_utf8(err).unwrap();
    assert!(
        err.ends_with("error: generation failed: upstream_error: the model fell over\n"),
        "{err}"
    );
}

#[tokio::test]
async fn aborted_final_is_an_error_return() {
    let frames = log(&["Hel"], final_event(FinalStatus::Aborted, "Hel"));
    let (server, _) = serve(frames, vec![]).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let e = run_attach(&client(&server), STREAM, None, &mut out, &mut err)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Aborted { .. }), "{e:?}");
    assert_eq!(String::from_utf8(out).unwrap(), "Hel\n");
    assert!(String::from_utf8(err).unwrap().contains("was aborted"));
}

#[tokio::test]
async fn server_errors_are_retried() {
    let frames = log(PIECES, final_event(FinalStatus::Complete, &full_text()));
    let (server, fake) = serve(
        frames,
        vec![
            Plan::Status(
                503,
                r#"{"error":{"code":"unavailable","message":"restarting"}}"#,
            ),
            Plan::Status(502, "<html>bad gateway</html>"),
            Plan::Full,
        ],
    )
    .await;
    let mut text = String::new();
    client(&server)
        .follow(STREAM, None, |ev| text.push_str(&ev.text()))
        .await
        .unwrap();
    assert_eq!(text, full_text());
    assert_eq!(fake.cursors.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_silent_connection_is_resumed_after_the_idle_timeout() {
    let frames = log(PIECES, final_event(FinalStatus::Complete, &full_text()));
    let (server, fake) = serve(frames, vec![Plan::Stall(2), Plan::Full]).await;
    let mut seqs = Vec::new();
    client(&server)
        .with_idle_timeout(Duration::from_millis(300))
        .follow(STREAM, None, |ev| seqs.push(ev.seq))
        .await
        .unwrap();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(*fake.cursors.lock().unwrap(), vec![None, Some("1".into())]);
}

#[tokio::test]
async fn a_seq_gap_is_a_protocol_error() {
    let frames = log(PIECES, final_event(FinalStatus::Complete, &full_text()));
    let (server, _) = serve(frames, vec![Plan::Gap]).await;
    let e = client(&server)
        .follow(STREAM, None, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
    assert!(e.to_string().contains("expected seq 1, got seq 2"), "{e}");
}

#[tokio::test]
async fn gives_up_after_the_limit() {
    let plans = vec![Plan::Status(503, r#"{"error":{"code":"down","message":"down"}}"#); 1000];
    let (server, _) = serve(vec![], plans).await;
    let started = std::time::Instant::now();
    let e = Client::new(&server, "t")
        .unwrap()
        .with_backoff(
            Duration::from_millis(5),
            Duration::from_millis(20),
            Duration::from_millis(300),
        )
        .follow(STREAM, None, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::GaveUp { attempts, .. } if attempts > 3),
        "{e:?}"
    );
    assert!(e.to_string().contains("down: down"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn abort_posts_the_stream_id() {
    let (server, fake) = serve(vec![], vec![]).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    run_abort(&client(&server), STREAM, &mut out, &mut err)
        .await
        .unwrap();
    assert_eq!(fake.posts.lock().unwrap()[0], json!({"streamId": STREAM}));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("aborted {STREAM}; partial answer saved (5 chars)\n")
    );
}

#[tokio::test]
async fn connection_refused_is_retried_then_gives_up() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = Client::new(&format!("127.0.0.1:{port}"), "t")
        .unwrap()
        .with_backoff(
            Duration::from_millis(5),
            Duration::from_millis(20),
            Duration::from_millis(200),
        )
        .follow(STREAM, None, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::GaveUp { .. }), "{e:?}");
}

#[test]
fn follow_and_run_futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let c = Client::new("http://127.0.0.1:1", "t").unwrap();
    is_send(&c.follow(STREAM, Some(3), |_| {}));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    is_send(&run_chat(&c, &ChatRequest::new("x"), &mut out, &mut err));
}

#[tokio::test]
async fn attach_from_a_cursor_prints_the_rest_and_reports_the_outcome() {
    let frames = log(&["Hel", "lo"], final_event(FinalStatus::Aborted, "Hello"));
    // Seq of the "Hel" delta: only "lo" comes after it.
    let hel = frames
        .iter()
        .position(|f| String::from_utf8_lossy(&f.bytes).contains("\"Hel\""))
        .unwrap() as u64;
    let (server, fake) = serve(frames, vec![]).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let e = run_attach(&client(&server), STREAM, Some(hel), &mut out, &mut err)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Aborted { .. }), "{e:?}");
    assert!(e.is_reported(), "the binary exits non-zero");
    assert_eq!(String::from_utf8(out).unwrap(), "lo\n");
    assert_eq!(
        fake.cursors.lock().unwrap()[0].as_deref(),
        Some(hel.to_string().as_str())
    );
}

#[tokio::test]
async fn a_204_means_the_stream_already_ended() {
    let (server, _) = serve(vec![], vec![Plan::Status(204, "")]).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let e = run_attach(&client(&server), STREAM, Some(9), &mut out, &mut err)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::AlreadyEnded { cursor: Some(9), stream_id } if stream_id == STREAM),
        "{e:?}"
    );
    assert!(e.to_string().contains("nothing follows seq 9"), "{e}");
}
