//! Usage, billing, balances and limits end to end (SPEC §7, issue 4/4): credits in
//! `final` and the abort answer; exactly-once spending under randomized races of
//! completion vs abort vs repeated abort across two Redis replicas, on SQLite and on
//! PostgreSQL; 402 at a non-positive balance and refill; the balance and usage routes;
//! the per-user concurrency limit under a burst over three replicas, with slots coming
//! back after completion, abort and replica_lost; rate limits with a right Retry-After;
//! X-Forwarded-For only from trusted proxies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::infra::{Prefix, TestDb, redis_url};
use common::{SECRET, token};
use futures::StreamExt;
use genstream_engine::billing::{Pricing, price};
use genstream_engine::event::{Event, EventBody};
use genstream_server::config::{
    AuthConfig, BalanceConfig, Config, LimitsConfig, ModelConfig, RedisSection,
};
use genstream_server::serve::build_state;
use genstream_server::{AppState, app};
use serde_json::{Value, json};

const PRICING: Pricing = Pricing {
    input_per_mtok: 3.0,
    output_per_mtok: 15.0,
    cache_write_per_mtok: 3.75,
    cache_read_per_mtok: 0.3,
    reasoning_per_mtok: None,
};

fn model(name: &str, options: Value, pricing: Option<Pricing>) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        provider: "demo".into(),
        tools: Vec::new(),
        pricing,
        options,
    }
}

fn base_config(database: &str, store: &str, prefix: &str) -> Config {
    Config {
        bind: "127.0.0.1:0".into(),
        store: store.into(),
        database: database.into(),
        // A generous command timeout: these tests load a 2-core machine on purpose.
        redis: RedisSection {
            key_prefix: prefix.into(),
            timeout_ms: 10_000,
            ..RedisSection::default()
        },
        auth: AuthConfig {
            jwt_secret: Some(SECRET.into()),
        },
        limits: LimitsConfig::off(),
        models: vec![
            model(
                "priced",
                json!({"tokens": 12, "token_delay_ms": 1}),
                Some(PRICING),
            ),
            model(
                "slow",
                json!({"tokens": 100000, "token_delay_ms": 5}),
                Some(PRICING),
            ),
        ],
        ..Config::default()
    }
}

struct Server {
    state: AppState,
    url: String,
}

async fn serve(config: &Config) -> Server {
    let (state, _) = build_state(config).await.unwrap();
    state.manager.spawn_reaper();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = app(state.clone(), 1 << 20);
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    Server { state, url }
}

async fn post(
    s: &Server,
    user: &str,
    path: &str,
    body: Value,
    xff: Option<&str>,
) -> (u16, Value, Option<String>) {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .bearer_auth(token(user))
        .json(&body);
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ra = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap_or(Value::Null), ra)
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

/// The whole log of a stream, read from `s` until its terminal event.
async fn events(s: &Server, user: &str, sid: &str) -> Vec<Event> {
    let text = reqwest::Client::new()
        .get(format!("{}/api/chat/stream/{sid}", s.url))
        .bearer_auth(token(user))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.split("\n\n")
        .filter_map(|f| f.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str::<Event>(d).ok())
        .collect()
}

/// What the log's usage records cost, in micro-credits.
fn priced_micro(events: &[Event]) -> i64 {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Usage(u) => Some(
                price(u, Some(&PRICING))
                    .iter()
                    .map(|l| l.amount_micro)
                    .sum::<i64>(),
            ),
            _ => None,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_balance_usage_402_and_refill() {
    let mut config = base_config("sqlite::memory:", "memory", "unused");
    config.balance = BalanceConfig {
        enabled: true,
        start_balance: 2000.0,
        refill_amount: 5000.0,
        refill_interval_secs: 4,
    };
    let s = serve(&config).await;
    assert_eq!(get(&s, "ann", "/api/balance").await["balance"], 2000.0);
    let models = get(&s, "ann", "/api/models").await;
    assert_eq!(models["models"][0]["pricing"]["input_per_mtok"], 3.0);
    assert_eq!(models["models"][0]["free"], false);

    let (st, started, _) = post(
        &s,
        "ann",
        "/api/chat",
        json!({"text": "price me please", "model": "priced"}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{started}");
    let sid = started["streamId"].as_str().unwrap();
    let evs = events(&s, "ann", sid).await;
    let EventBody::Final(f) = &evs.last().unwrap().body else {
        panic!()
    };
    let micro = priced_micro(&evs);
    assert!(micro > 0);
    assert!(
        (f.usage.credits - micro as f64 / 1e6).abs() < 1e-9,
        "{} vs {micro}",
        f.usage.credits
    );
    // 12 output tokens at $15/M = 180 credits, plus the input.
    assert!(f.usage.credits >= 180.0);
    let balance = get(&s, "ann", "/api/balance").await["balance"]
        .as_f64()
        .unwrap();
    assert!(
        (balance - (2000.0 - f.usage.credits)).abs() < 1e-6,
        "{balance}"
    );
    let usage = get(&s, "ann", "/api/usage").await;
    assert_eq!(usage["usage"][0]["key"], started["conversationId"]);
    assert!((usage["usage"][0]["credits"].as_f64().unwrap() - f.usage.credits).abs() < 1e-9);
    assert_eq!(usage["usage"][0]["outputTokens"], 12);
    let by_day = get(&s, "ann", "/api/usage?by=day").await;
    assert_eq!(by_day["usage"].as_array().unwrap().len(), 1);
    assert_eq!(
        get(&s, "bob", "/api/usage").await["usage"],
        json!([]),
        "per user"
    );

    // Spend the rest: an aborted slow answer is charged too (its estimate included).
    let (_, slow, _) = post(
        &s,
        "ann",
        "/api/chat",
        json!({"text": "long", "model": "slow"}),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (st, ab, _) = post(
        &s,
        "ann",
        "/api/chat/abort",
        json!({"streamId": slow["streamId"]}),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert!(ab["usage"]["credits"].as_f64().unwrap() > 0.0, "{ab}");
    let b = get(&s, "ann", "/api/balance").await["balance"]
        .as_f64()
        .unwrap();
    if b > 0.0 {
        genstream_engine::persist::Persistence::add_credits(
            &**s.state.manager.db(),
            "ann",
            -((b * 1e6) as i64) - 1,
            0,
            &genstream_engine::now_rfc3339(),
        )
        .await
        .unwrap();
    }
    let (st, v, _) = post(
        &s,
        "ann",
        "/api/chat",
        json!({"text": "broke", "model": "priced"}),
        None,
    )
    .await;
    assert_eq!(st, 402, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_balance");
    // The refill comes every 4 s (counted from the balance's creation).
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let (st, v, _) = post(
        &s,
        "ann",
        "/api/chat",
        json!({"text": "refilled", "model": "priced"}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_a_right_retry_after() {
    let mut config = base_config("sqlite::memory:", "memory", "unused");
    config.limits.messages_per_user_per_minute = 3;
    config.limits.messages_per_ip_per_minute = 5;
    config.limits.trusted_proxies = vec!["127.0.0.1".into()];
    let s = serve(&config).await;
    for i in 0..3 {
        let (st, v, _) = post(
            &s,
            "cat",
            "/api/chat",
            json!({"text": format!("m{i}"), "model": "priced"}),
            Some("198.51.100.1"),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v, ra) = post(
        &s,
        "cat",
        "/api/chat",
        json!({"text": "m3", "model": "priced"}),
        Some("198.51.100.1"),
    )
    .await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited");
    // 3 per minute: the next hit is allowed 20 s after the first.
    let ra: u64 = ra.expect("Retry-After").parse().unwrap();
    assert!((19..=20).contains(&ra), "Retry-After {ra}");
    // Per IP, through the trusted proxy: another user from the same client IP shares
    // its budget of 5. Four hits are spent above (the IP is checked before the user,
    // so the refused fourth counted too): one more passes, the next does not.
    let (st, _, _) = post(
        &s,
        "dan",
        "/api/chat",
        json!({"text": "x", "model": "priced"}),
        Some("198.51.100.1"),
    )
    .await;
    assert_eq!(st, 200, "the IP's fifth hit");
    let (st, v, _) = post(
        &s,
        "dan",
        "/api/chat",
        json!({"text": "x2", "model": "priced"}),
        Some("198.51.100.1"),
    )
    .await;
    assert_eq!(st, 429, "the IP's budget of 5 is spent: {v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("IP"));
    // Another client IP behind the same proxy has its own budget.
    let (st, v, _) = post(
        &s,
        "dan",
        "/api/chat",
        json!({"text": "y", "model": "priced"}),
        Some("198.51.100.2"),
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // Without trusted proxies the header is ignored: every request is 127.0.0.1's.
    let mut config = base_config("sqlite::memory:", "memory", "unused");
    config.limits.messages_per_ip_per_minute = 2;
    let s = serve(&config).await;
    for (i, ip) in ["203.0.113.1", "203.0.113.2"].iter().enumerate() {
        let (st, _, _) = post(
            &s,
            &format!("u{i}"),
            "/api/chat",
            json!({"text": "z", "model": "priced"}),
            Some(ip),
        )
        .await;
        assert_eq!(st, 200);
    }
    let (st, _, _) = post(
        &s,
        "u9",
        "/api/chat",
        json!({"text": "z", "model": "priced"}),
        Some("203.0.113.3"),
    )
    .await;
    assert_eq!(
        st, 429,
        "a spoofed X-Forwarded-For does not buy a new budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds_across_three_replicas_and_slots_come_back() {
    let db = TestDb::create().await;
    let prefix = Prefix(format!("gstest-{}", uuid::Uuid::now_v7()));
    let mut config = base_config(&db.url, &redis_url(), &prefix.0);
    config.limits.concurrent_per_user = 2;
    config.redis.lease_ttl_ms = 600;
    config.jobs.reap_interval_ms = 200;
    let replicas = [
        serve(&config).await,
        serve(&config).await,
        serve(&config).await,
    ];
    let burst = futures::future::join_all((0..50).map(|i| {
        let s = &replicas[i % 3];
        async move {
            post(
                s,
                "eve",
                "/api/chat",
                json!({"text": format!("burst {i}"), "model": "slow"}),
                None,
            )
            .await
        }
    }))
    .await;
    let ok: Vec<&Value> = burst
        .iter()
        .filter(|(st, _, _)| *st == 200)
        .map(|(_, v, _)| v)
        .collect();
    assert_eq!(ok.len(), 2, "exactly the limit got through");
    for (st, v, _) in &burst {
        if *st != 200 {
            assert_eq!(*st, 429);
            assert_eq!(v["error"]["code"], "too_many_concurrent");
            assert_eq!(v["error"]["limit"], 2);
        }
    }
    // Abort one: its slot comes back.
    let (st, _, _) = post(
        &replicas[1],
        "eve",
        "/api/chat/abort",
        json!({"streamId": ok[0]["streamId"]}),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let (st, third, _) = post(
        &replicas[2],
        "eve",
        "/api/chat",
        json!({"text": "after abort", "model": "priced"}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{third}");
    // Completion gives it back too.
    let _ = events(&replicas[2], "eve", third["streamId"].as_str().unwrap()).await;
    let (st, fourth, _) = post(
        &replicas[0],
        "eve",
        "/api/chat",
        json!({"text": "after completion", "model": "slow"}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{fourth}");
    assert_eq!(
        post(
            &replicas[0],
            "eve",
            "/api/chat",
            json!({"text": "full", "model": "priced"}),
            None
        )
        .await
        .0,
        429
    );
    // replica_lost: a replica that dies holding one of eve's slots. It is played by a
    // store of its own (same prefix) whose lease lapses once it is closed; the other
    // replicas' reapers end its job with replica_lost, and the slot comes back.
    for sid in [fourth["streamId"].clone(), ok[1]["streamId"].clone()] {
        let (st, _, _) = post(
            &replicas[1],
            "eve",
            "/api/chat/abort",
            json!({ "streamId": sid }),
            None,
        )
        .await;
        assert_eq!(st, 200);
    }
    let mut rc = genstream_redis::RedisConfig::new(&redis_url());
    rc.key_prefix = prefix.0.clone();
    rc.lease_ttl = Duration::from_millis(300);
    rc.max_running_per_user = Some(2);
    let dead = genstream_redis::RedisStore::connect(rc).await.unwrap();
    use genstream_engine::store::JobStore;
    let lost = genstream_engine::suite::meta("eve", &genstream_engine::new_id());
    dead.create_job(&lost).await.unwrap();
    let (st, _, _) = post(
        &replicas[0],
        "eve",
        "/api/chat",
        json!({"text": "one more", "model": "slow"}),
        None,
    )
    .await;
    assert_eq!(st, 200, "eve holds 2 slots now");
    assert_eq!(
        post(
            &replicas[0],
            "eve",
            "/api/chat",
            json!({"text": "full", "model": "priced"}),
            None
        )
        .await
        .0,
        429
    );
    dead.close();
    let t0 = std::time::Instant::now();
    loop {
        let m = dead.get_job(&lost.stream_id).await.unwrap().unwrap();
        if m.status != genstream_engine::store::JobStatus::Running {
            assert_eq!(m.status, genstream_engine::store::JobStatus::Error);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "not reaped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let evs = events(&replicas[2], "eve", &lost.stream_id).await;
    let Some(EventBody::Error(e)) = evs.last().map(|e| &e.body) else {
        panic!("{evs:?}")
    };
    assert_eq!(e.code, "replica_lost");
    let (st, v, _) = post(
        &replicas[1],
        "eve",
        "/api/chat",
        json!({"text": "after replica_lost", "model": "priced"}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

/// Randomized races of completion vs abort vs repeated abort across two replicas:
/// whatever wins, the ledger holds each call's usage exactly once.
async fn exactly_once(database: &str, cases: usize) {
    let prefix = Prefix(format!("gstest-{}", uuid::Uuid::now_v7()));
    let mut config = base_config(database, &redis_url(), &prefix.0);
    config.models = vec![model(
        "priced",
        json!({"tokens": 8, "token_delay_ms": 2}),
        Some(PRICING),
    )];
    let a = serve(&config).await;
    let b = serve(&config).await;
    let seeds: Vec<u64> = (0..cases as u64).collect();
    let results = futures::stream::iter(seeds.into_iter().map(|seed| {
        let (a, b) = (&a, &b);
        async move {
            let mut rng = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let user = format!("race-{}", seed % 7);
            let (st, started, _) = post(
                a,
                &user,
                "/api/chat",
                json!({"text": format!("case {seed}"), "model": "priced"}),
                None,
            )
            .await;
            assert_eq!(st, 200, "{started}");
            let sid = started["streamId"].as_str().unwrap().to_string();
            let aborts = next(4);
            let mut tasks = Vec::new();
            for _ in 0..aborts {
                let delay = Duration::from_millis(next(30));
                let on_b = next(2) == 1;
                let sid = sid.clone();
                let user = user.clone();
                tasks.push(async move {
                    tokio::time::sleep(delay).await;
                    let s = if on_b { b } else { a };
                    let (code, body, _) =
                        post(s, &user, "/api/chat/abort", json!({"streamId": sid}), None).await;
                    (code, body)
                });
            }
            let codes = futures::future::join_all(tasks).await;
            assert!(
                codes.iter().all(|(c, _)| *c == 200 || *c == 409),
                "{codes:?}"
            );
            let evs = events(if next(2) == 1 { b } else { a }, &user, &sid).await;
            assert_eq!(evs.iter().filter(|e| e.body.is_terminal()).count(), 1);
            (sid, priced_micro(&evs))
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    let db = a.state.manager.db();
    let mut total_expected = 0i64;
    let mut total_spent = 0i64;
    for (sid, expected) in &results {
        let spent = db.spent_on_stream(sid).await.unwrap();
        assert_eq!(
            spent, *expected,
            "stream {sid}: spent {spent}, priced {expected}"
        );
        total_expected += expected;
        total_spent += spent;
    }
    assert_eq!(total_spent, total_expected);
    assert!(total_spent > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_on_sqlite_500_races() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    exactly_once(&url, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_on_postgres_500_races() {
    let db = TestDb::create().await;
    exactly_once(&db.url, 500).await;
}
