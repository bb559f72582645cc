//! `Idempotency-Key` on the four start routes (`POST /api/chat`, `POST /api/ai/chat`,
//! `POST /v1/chat/completions`, `POST /v1/responses`): a repeat attaches to the first
//! start's job (same ids, same stream) and spends nothing more; the same key with
//! another body is a 422 in the route's error shape; keys are per user; a start that
//! failed frees its key; after the job's log expired the repeat still gets the same
//! ids; and 50 identical starts racing over three Redis + PostgreSQL replicas make one
//! job and one spend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{SECRET, token};
use genstream_engine::billing::Pricing;
use genstream_providers::{ModelOptions, ProviderKind};
use genstream_server::config::{
    AuthConfig, BalanceConfig, Config, LimitsConfig, ModelConfig, RedisSection,
};
use genstream_server::serve::build_state;
use genstream_server::{AppState, app};
use genstream_test_support::{KeyPrefix, Served, TestDb, redis_url, wait_until};
use serde_json::{Value, json};

const PRICING: Pricing = Pricing {
    input_per_mtok: 3.0,
    output_per_mtok: 15.0,
    cache_write_per_mtok: 3.75,
    cache_read_per_mtok: 0.3,
    reasoning_per_mtok: None,
};

const START_BALANCE: f64 = 2000.0;

fn config(database: &str, store: &str, prefix: &str) -> Config {
    Config {
        bind: "127.0.0.1:0".into(),
        store: store.into(),
        database: database.into(),
        redis: RedisSection {
            key_prefix: prefix.into(),
            timeout: Duration::from_secs(10),
            ..RedisSection::default()
        },
        auth: AuthConfig {
            jwt_secret: Some(SECRET.into()),
        },
        limits: LimitsConfig::off(),
        balance: BalanceConfig {
            enabled: true,
            start_balance: START_BALANCE,
            refill_amount: 0.0,
            refill_interval: Duration::ZERO,
        },
        models: vec![ModelConfig {
            name: "priced".into(),
            provider: "demo".into(),
            tools: Vec::new(),
            pricing: Some(PRICING),
            options: ModelOptions::deserialize_for(
                ProviderKind::Demo,
                json!({"tokens": 12, "token_delay": "1ms"}),
            )
            .unwrap(),
        }],
        ..Config::default()
    }
}

struct Server {
    state: AppState,
    url: String,
    _served: Served,
}

async fn serve(config: &Config) -> Server {
    let (state, _) = build_state(config).await.unwrap();
    state.manager.spawn_reaper();
    let served = Served::start_with_peer_addr(app(state.clone(), 1 << 20)).await;
    Server {
        state,
        url: served.url.clone(),
        _served: served,
    }
}

/// An answer: status, headers, body text (whole: streams are read to their end).
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

async fn post(s: &Server, user: &str, path: &str, key: Option<&str>, body: &Value) -> Answer {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .bearer_auth(token(user))
        .json(body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let r = req.send().await.unwrap();
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        text: r.text().await.unwrap(),
    }
}

async fn get(s: &Server, user: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}{path}", s.url))
        .bearer_auth(token(user))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Reads the native stream of `sid` to its end.
async fn read_to_end(s: &Server, user: &str, sid: &str) -> String {
    reqwest::Client::new()
        .get(format!("{}/api/chat/stream/{sid}", s.url))
        .bearer_auth(token(user))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A start route under test: its path, a body, another body, and the ids an answer
/// names.
struct Route {
    path: &'static str,
    /// The body for a user (the AI SDK's chat id is the user's own) and a text.
    body: fn(&str, &str) -> Value,
    /// Whether errors are OpenAI's shape.
    openai: bool,
}

fn routes() -> [Route; 4] {
    [
        Route {
            path: "/api/chat",
            body: |_, text| json!({"text": text, "model": "priced"}),
            openai: false,
        },
        Route {
            path: "/api/ai/chat",
            body: |user, text| {
                json!({"id": format!("chat-{user}"), "model": "priced", "trigger": "submit-message",
                    "messages": [{"id": "m1", "role": "user",
                        "parts": [{"type": "text", "text": text}]}]})
            },
            openai: false,
        },
        Route {
            path: "/v1/chat/completions",
            body: |_, text| json!({"model": "priced", "messages": [{"role": "user", "content": text}]}),
            openai: true,
        },
        Route {
            path: "/v1/responses",
            body: |_, text| json!({"model": "priced", "input": text}),
            openai: true,
        },
    ]
}

/// The ids an answer names: stream id, conversation id, and the route's own
/// (message ids, completion or response id).
fn ids(route: &Route, a: &Answer) -> Vec<String> {
    assert_eq!(a.status, 200, "{}: {}", route.path, a.text);
    match route.path {
        "/api/chat" => {
            let v = a.json();
            [
                "streamId",
                "conversationId",
                "userMessageId",
                "responseMessageId",
            ]
            .iter()
            .map(|k| v[k].as_str().unwrap().to_string())
            .collect()
        }
        _ => {
            let mut ids = vec![
                a.header("x-genstream-stream-id"),
                a.header("x-genstream-conversation-id"),
            ];
            if route.openai {
                ids.push(a.json()["id"].as_str().unwrap().to_string());
            }
            ids
        }
    }
}

/// The user's balance, usage and conversations once their jobs ended: what a second
/// job or a second spend would change.
async fn books(s: &Server, user: &str) -> (f64, Value, usize) {
    let running = || async {
        get(s, user, "/api/chat/active").await["activeJobIds"]
            .as_array()
            .unwrap()
            .is_empty()
    };
    wait_until(Duration::from_secs(20), "the user's jobs to end", running).await;
    let balance = get(s, user, "/api/balance").await["balance"]
        .as_f64()
        .unwrap();
    let usage = get(s, user, "/api/usage").await["usage"].clone();
    let conversations = get(s, user, "/api/conversations").await["conversations"]
        .as_array()
        .unwrap()
        .len();
    (balance, usage, conversations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_repeat_attaches_to_the_first_job_and_spends_once() {
    let s = serve(&config("sqlite::memory:", "memory", "unused")).await;
    for route in routes() {
        let user = format!("idem{}", route.path.replace('/', "-"));
        let body = (route.body)(&user, "say something priced");
        let first = post(&s, &user, route.path, Some("key-1"), &body).await;
        let first_ids = ids(&route, &first);
        if route.path == "/api/chat" {
            read_to_end(&s, &user, &first_ids[0]).await;
        }
        let (balance, usage, conversations) = books(&s, &user).await;
        let spent = START_BALANCE - balance;
        assert!(spent > 0.0, "{}: nothing spent", route.path);
        assert_eq!(
            usage.as_array().unwrap().len(),
            1,
            "{}: {usage}",
            route.path
        );
        assert_eq!(usage[0]["calls"], 1, "{}: {usage}", route.path);
        assert_eq!(conversations, 1, "{}", route.path);

        // The repeat, in another key order: the same job, its same answer or stream.
        let mut reordered = serde_json::Map::new();
        for (k, v) in body.as_object().unwrap().iter().rev() {
            reordered.insert(k.clone(), v.clone());
        }
        let again = post(
            &s,
            &user,
            route.path,
            Some("key-1"),
            &Value::Object(reordered),
        )
        .await;
        assert_eq!(ids(&route, &again), first_ids, "{}", route.path);
        if route.path != "/api/chat" {
            assert_eq!(
                again.text, first.text,
                "{}: the same job's answer",
                route.path
            );
        }
        assert_eq!(
            books(&s, &user).await,
            (balance, usage.clone(), conversations),
            "{}: the repeat started and spent nothing",
            route.path
        );

        // The same key with another body: 422 in the route's shape, nothing started.
        let other = post(
            &s,
            &user,
            route.path,
            Some("key-1"),
            &(route.body)(&user, "another"),
        )
        .await;
        assert_eq!(other.status, 422, "{}: {}", route.path, other.text);
        let e = other.json();
        assert_eq!(e["error"]["code"], "idempotency_key_reused", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("key-1"),
            "{e}"
        );
        if route.openai {
            assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
            assert_eq!(e["error"]["param"], "Idempotency-Key", "{e}");
        } else {
            assert!(e["error"].get("type").is_none(), "native shape: {e}");
        }

        // Another user's same key is another start.
        let stranger = format!("{user}-other");
        let theirs = post(
            &s,
            &stranger,
            route.path,
            Some("key-1"),
            &(route.body)(&stranger, "say something priced"),
        )
        .await;
        let their_ids = ids(&route, &theirs);
        assert_ne!(their_ids[0], first_ids[0], "{}", route.path);
        assert_eq!(books(&s, &stranger).await.2, 1);

        // Without a key, the same body starts again (no key, no deduplication).
        if route.path == "/v1/chat/completions" {
            let fresh = post(&s, &user, route.path, None, &body).await;
            assert_ne!(ids(&route, &fresh)[0], first_ids[0]);
            assert_eq!(books(&s, &user).await.2, 2);
        }
    }
}

/// A streamed `/v1` start repeated: the same job's stream again, byte for byte (a
/// projection of the same log), and one spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_repeat_is_the_same_jobs_stream() {
    let s = serve(&config("sqlite::memory:", "memory", "unused")).await;
    for route in routes().into_iter().filter(|r| r.openai) {
        let user = format!("stream{}", route.path.replace('/', "-"));
        let mut body = (route.body)(&user, "stream it");
        body["stream"] = json!(true);
        let first = post(&s, &user, route.path, Some("k"), &body).await;
        let again = post(&s, &user, route.path, Some("k"), &body).await;
        assert_eq!(first.status, 200, "{}", first.text);
        assert_eq!(
            again.header("x-genstream-stream-id"),
            first.header("x-genstream-stream-id")
        );
        assert!(first.text.contains("data: "), "{}", first.text);
        assert_eq!(again.text, first.text, "{}", route.path);
        let (_, usage, conversations) = books(&s, &user).await;
        assert_eq!((usage[0]["calls"].clone(), conversations), (json!(1), 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_frees_its_key_and_bad_keys_are_400s() {
    let s = serve(&config("sqlite::memory:", "memory", "unused")).await;
    let body = json!({"text": "hello", "model": "priced"});
    // Refused for money: the key is released, so the retry after a top-up starts.
    get(&s, "pam", "/api/balance").await;
    let db = s.state.manager.db();
    let micro = db.balance("pam").await.unwrap().unwrap().balance_micro;
    let now = genstream_engine::now_rfc3339();
    db.add_credits("pam", -micro, 0, &now).await.unwrap();
    let refused = post(&s, "pam", "/api/chat", Some("k"), &body).await;
    assert_eq!(refused.status, 402, "{}", refused.text);
    db.add_credits("pam", micro, 0, &now).await.unwrap();
    let started = post(&s, "pam", "/api/chat", Some("k"), &body).await;
    assert_eq!(started.status, 200, "{}", started.text);
    let again = post(&s, "pam", "/api/chat", Some("k"), &body).await;
    assert_eq!(again.json()["streamId"], started.json()["streamId"]);

    let long = "x".repeat(256);
    for bad in ["", long.as_str(), "a b"] {
        let a = post(&s, "pam", "/api/chat", Some(bad), &body).await;
        assert_eq!(a.status, 400, "{bad:?}: {}", a.text);
        assert!(a.text.contains("Idempotency-Key"), "{}", a.text);
    }
    let a = post(
        &s,
        "pam",
        "/v1/responses",
        Some(""),
        &json!({"model": "priced", "input": "x"}),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.json()["error"]["param"], "Idempotency-Key");
}

/// After the job's log expired (`jobs.retention`), the key still answers the same ids
/// and starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_the_log_expired_gets_the_same_ids() {
    let mut c = config("sqlite::memory:", "memory", "unused");
    c.jobs.retention = Duration::from_secs(1);
    c.jobs.reap_interval = Duration::from_millis(50);
    let s = serve(&c).await;
    let mut first = Vec::new();
    for route in routes() {
        let body = (route.body)("ivy", "expire me");
        let a = post(&s, "ivy", route.path, Some(route.path), &body).await;
        let ids = ids(&route, &a);
        if route.path == "/api/chat" {
            read_to_end(&s, "ivy", &ids[0]).await;
        }
        first.push((route, body, ids, a.text));
    }
    let before = books(&s, "ivy").await;
    for (_, _, ids, _) in &first {
        let sid = ids[0].clone();
        wait_until(Duration::from_secs(20), "the log to expire", || {
            let (s, sid) = (&s, sid.clone());
            async move {
                reqwest::Client::new()
                    .get(format!("{}/api/chat/stream/{sid}", s.url))
                    .bearer_auth(token("ivy"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    == 404
            }
        })
        .await;
    }
    for (route, body, ids, text) in &first {
        let again = post(&s, "ivy", route.path, Some(route.path), body).await;
        assert_eq!(again.status, 200, "{}: {}", route.path, again.text);
        assert_eq!(&self::ids(route, &again), ids, "{}", route.path);
        if route.openai {
            // The saved answer: the same text as the first answer's.
            let text_of = |v: &Value| match route.path {
                "/v1/chat/completions" => v["choices"][0]["message"]["content"].clone(),
                _ => v["output_text"].clone(),
            };
            let first: Value = serde_json::from_str(text).unwrap();
            assert_eq!(text_of(&again.json()), text_of(&first), "{}", route.path);
        } else if route.path == "/api/ai/chat" {
            // The UI message stream of the saved answer: the same text, then `finish`.
            let deltas = |stream: &str| -> String {
                stream
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .filter(|v| v["type"] == "text-delta")
                    .map(|v| v["delta"].as_str().unwrap().to_string())
                    .collect()
            };
            assert!(!deltas(text).is_empty(), "{text}");
            assert_eq!(deltas(&again.text), deltas(text));
            assert!(again.text.contains(r#""type":"finish""#), "{}", again.text);
        }
    }
    assert_eq!(books(&s, "ivy").await, before, "nothing started or spent");
}

/// 50 identical starts with one key, spread over three replicas sharing Redis and
/// PostgreSQL: every answer names the same job, and it is spent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_racing_starts_over_three_replicas_make_one_job_and_one_spend() {
    let db = TestDb::create().await;
    let prefix = KeyPrefix::new();
    let c = config(&db.url, &redis_url(), prefix.name());
    let replicas = [serve(&c).await, serve(&c).await, serve(&c).await];
    for route in routes() {
        let user = format!("race{}", route.path.replace('/', "-"));
        let body = (route.body)(&user, "one job please");
        let answers = futures::future::join_all((0..50).map(|i| {
            let (s, body, route, user) = (&replicas[i % 3], &body, &route, &user);
            async move { post(s, user, route.path, Some("race-key"), body).await }
        }))
        .await;
        let all: Vec<Vec<String>> = answers.iter().map(|a| ids(&route, a)).collect();
        assert!(all.iter().all(|i| *i == all[0]), "{}: {all:?}", route.path);
        for s in &replicas {
            let (balance, usage, conversations) = books(s, &user).await;
            assert_eq!(conversations, 1, "{}", route.path);
            assert_eq!(
                usage.as_array().unwrap().len(),
                1,
                "{}: {usage}",
                route.path
            );
            assert_eq!(usage[0]["calls"], 1, "{}: {usage}", route.path);
            let spent = START_BALANCE - balance;
            assert!(
                (spent - usage[0]["credits"].as_f64().unwrap()).abs() < 1e-6 && spent > 0.0,
                "{}: spent {spent}, usage {usage}",
                route.path
            );
        }
    }
}
