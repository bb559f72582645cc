//! The Vercel AI SDK routes over HTTP, on demo models: `POST /api/ai/chat` answers a
//! UI message stream (`start` … `finish`, `data: [DONE]`) whose text is the saved
//! answer; regenerate makes a sibling answer of the same user message; chat ids are
//! validated and owned; `GET /api/ai/chat/{id}/stream` is 204 when idle and the whole
//! running stream otherwise; an abort ends a resumed stream with `abort`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{default_models, demo, test_app, token};
use genstream_test_support::{Served, wait_for};
use serde_json::{Value, json};

struct Ai {
    url: String,
    http: reqwest::Client,
    _served: Served,
}

async fn ai() -> Ai {
    let mut models = default_models();
    // Long enough to be running when a test resumes or stops it, short enough to end.
    models.push(demo("mid", json!({"tokens": 300, "token_delay": "10ms"})));
    let app = test_app(models);
    let served = Served::start(app.router).await;
    Ai {
        url: served.url.clone(),
        http: reqwest::Client::new(),
        _served: served,
    }
}

/// The chunks (`data:` JSON payloads) of a UI message stream, `[DONE]` as a string.
fn chunks(raw: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(raw)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_string())))
        .collect()
}

fn types(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .map(|c| c["type"].as_str().unwrap_or("[DONE]").to_string())
        .collect()
}

fn text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter(|c| c["type"] == "text-delta")
        .map(|c| c["delta"].as_str().unwrap())
        .collect()
}

fn submit(id: &str, text: &str, model: &str) -> Value {
    json!({
        "id": id,
        "trigger": "submit-message",
        "messageId": null,
        "model": model,
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
    })
}

impl Ai {
    fn post(&self, user: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/api/ai/chat", self.url))
            .bearer_auth(token(user))
            .json(body)
    }

    async fn read_all(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> (reqwest::header::HeaderMap, Vec<Value>) {
        let r = tokio::time::timeout(Duration::from_secs(30), rb.send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let headers = r.headers().clone();
        let body = tokio::time::timeout(Duration::from_secs(30), r.bytes())
            .await
            .unwrap()
            .unwrap();
        (headers, chunks(&body))
    }

    async fn messages(&self, user: &str, chat: &str) -> Vec<Value> {
        let r = self
            .http
            .get(format!("{}/api/conversations/{chat}/messages", self.url))
            .bearer_auth(token(user))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: Value = r.json().await.unwrap();
        v.as_array()
            .cloned()
            .or_else(|| v["messages"].as_array().cloned())
            .unwrap()
    }

    /// The saved answer once it is final (`unfinished` as given: an aborted answer is
    /// saved unfinished).
    async fn saved(&self, user: &str, chat: &str, message_id: &str, unfinished: bool) -> Value {
        wait_for(Duration::from_secs(10), "the answer saved", || {
            let fut = self.messages(user, chat);
            async move {
                fut.await.into_iter().find(|m| {
                    m["messageId"] == message_id && (m["unfinished"] == true) == unfinished
                })
            }
        })
        .await
    }
}

#[tokio::test]
async fn submit_streams_the_answer_and_regenerate_makes_a_sibling() {
    let a = ai().await;
    let (headers, c) = a
        .read_all(a.post("alice", &submit("chat-1", "hello", "demo")))
        .await;
    assert_eq!(headers["x-vercel-ai-ui-message-stream"], "v1");
    assert_eq!(headers["content-type"], "text/event-stream");
    let t = types(&c);
    assert_eq!(t[0], "start", "{t:?}");
    assert_eq!(t[1], "start-step", "{t:?}");
    assert_eq!(t[2], "text-start", "{t:?}");
    assert_eq!(
        &t[t.len() - 4..],
        ["text-end", "finish-step", "finish", "[DONE]"]
    );
    let stream_id = headers["x-genstream-stream-id"].to_str().unwrap();
    assert_eq!(c[0]["messageMetadata"]["streamId"], stream_id);
    assert_eq!(headers["x-genstream-conversation-id"], "chat-1");
    let answer_id = c[0]["messageId"].as_str().unwrap().to_string();
    let saved = a.saved("alice", "chat-1", &answer_id, false).await;
    assert!(!text(&c).is_empty());
    assert_eq!(saved["text"], text(&c));

    // Regenerate: a new answer to the same user message, no new user message.
    let regen = json!({"id": "chat-1", "trigger": "regenerate-message", "messageId": answer_id,
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hello"}]}]});
    let (_, c2) = a.read_all(a.post("alice", &regen)).await;
    assert_eq!(types(&c2).last().unwrap(), "[DONE]");
    let second_id = c2[0]["messageId"].as_str().unwrap().to_string();
    assert_ne!(second_id, answer_id);
    let second = a.saved("alice", "chat-1", &second_id, false).await;
    assert_eq!(second["parentMessageId"], saved["parentMessageId"]);
    let all = a.messages("alice", "chat-1").await;
    assert_eq!(
        all.iter().filter(|m| m["isCreatedByUser"] == true).count(),
        1
    );
    assert_eq!(all.len(), 3);
}

#[tokio::test]
async fn chat_ids_are_validated_and_owned() {
    let a = ai().await;
    a.read_all(a.post("alice", &submit("owned", "hi", "demo")))
        .await;
    let r = a
        .post("bob", &submit("owned", "hi", "demo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "forbidden"
    );
    let r = a
        .http
        .get(format!("{}/api/ai/chat/owned/stream", a.url))
        .bearer_auth(token("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    for bad in [
        json!("has space"),
        json!(""),
        json!("x".repeat(129)),
        json!(7),
    ] {
        let mut body = submit("x", "hi", "demo");
        body["id"] = bad;
        let r = a.post("alice", &body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let v: Value = r.json().await.unwrap();
        assert!(v.to_string().contains("id"), "{v}");
    }
    let mut body = submit("fine", "hi", "demo");
    body["messages"] = json!("nope");
    let r = a.post("alice", &body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("messages"));
    body = submit("fine", "hi", "demo");
    body["trigger"] = json!("other");
    let r = a.post("alice", &body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("trigger"));
    let r = a
        .http
        .post(format!("{}/api/ai/chat", a.url))
        .json(&submit("fine", "hi", "demo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

/// Reads `n` chunks of a stream, then drops the connection.
async fn prefix(r: reqwest::Response, n: usize) -> Vec<Value> {
    let mut r = r;
    let mut raw = Vec::new();
    loop {
        let c = chunks(&raw);
        if c.len() >= n {
            return c;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), r.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("the stream has that many chunks");
        raw.extend_from_slice(&chunk);
    }
}

#[tokio::test]
async fn resume_is_204_when_idle_and_the_whole_stream_while_running() {
    let a = ai().await;
    let get = |chat: &str| {
        a.http
            .get(format!("{}/api/ai/chat/{chat}/stream", a.url))
            .bearer_auth(token("alice"))
    };
    assert_eq!(
        get("nothing-yet").send().await.unwrap().status().as_u16(),
        204
    );

    // A model slow enough to be running when the stream is resumed.
    let r = a
        .post("alice", &submit("resumed", "hi", "mid"))
        .send()
        .await
        .unwrap();
    let first = prefix(r, 4).await;
    assert_eq!(first[0]["type"], "start");
    let (_, c) = a.read_all(get("resumed")).await;
    assert_eq!(c[0]["type"], "start");
    assert_eq!(c[0]["messageId"], first[0]["messageId"]);
    let t = types(&c);
    assert_eq!(&t[t.len() - 2..], ["finish", "[DONE]"]);
    let saved = a
        .saved(
            "alice",
            "resumed",
            c[0]["messageId"].as_str().unwrap(),
            false,
        )
        .await;
    assert_eq!(saved["text"], text(&c));
    assert_eq!(get("resumed").send().await.unwrap().status().as_u16(), 204);
}

#[tokio::test]
async fn abort_ends_the_resumed_stream_and_keeps_the_partial() {
    let a = ai().await;
    let r = a
        .post("alice", &submit("stopped", "hi", "mid"))
        .send()
        .await
        .unwrap();
    let first = prefix(r, 4).await;
    let answer_id = first[0]["messageId"].as_str().unwrap().to_string();
    let resumed = a
        .http
        .get(format!("{}/api/ai/chat/stopped/stream", a.url))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status().as_u16(), 200);
    let r = a
        .http
        .post(format!("{}/api/chat/abort", a.url))
        .bearer_auth(token("alice"))
        .json(&json!({"conversationId": "stopped"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = tokio::time::timeout(Duration::from_secs(30), resumed.bytes())
        .await
        .unwrap()
        .unwrap();
    let c = chunks(&body);
    let t = types(&c);
    assert_eq!(&t[t.len() - 2..], ["abort", "[DONE]"], "{t:?}");
    let saved = a.saved("alice", "stopped", &answer_id, true).await;
    assert_eq!(saved["text"], text(&c));
}
