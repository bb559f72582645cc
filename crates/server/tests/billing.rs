//! Usage, billing, balances and limits end to end (docs/protocol.md §7): credits in
//! `final` and the abort answer; exactly-once spending under randomized races of
//! completion vs abort vs repeated abort vs the reaper (the owner presumed dead
//! mid-stream) across two Redis replicas, on SQLite and on PostgreSQL, with balances
//! on; 402 at a non-positive balance and refill, also across replicas; the balance and
//! usage routes; the per-user concurrency limit under a burst over three replicas,
//! with slots coming back after completion, abort and replica_lost; the sliding-window
//! rate limits with a right Retry-After, in memory and over three Redis replicas;
//! X-Forwarded-For only from trusted proxies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{SECRET, token};
use futures::StreamExt;
use genstream_engine::billing::{Pricing, price};
use genstream_engine::event::{Event, EventBody};
use genstream_providers::{ModelOptions, ProviderKind};
use genstream_server::config::{
    AuthConfig, BalanceConfig, Config, LimitsConfig, ModelConfig, RedisSection,
};
use genstream_server::serve::build_state;
use genstream_server::{AppState, app};
use genstream_test_support::{
    KeyPrefix, Served, TestDb, redis_url, wait_for, wait_for_text, wait_until,
};
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
        options: ModelOptions::deserialize_for(ProviderKind::Demo, options).unwrap(),
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
            timeout: Duration::from_secs(10),
            ..RedisSection::default()
        },
        auth: AuthConfig {
            jwt_secret: Some(SECRET.into()),
        },
        limits: LimitsConfig::off(),
        models: vec![
            model(
                "priced",
                json!({"tokens": 12, "token_delay": "1ms"}),
                Some(PRICING),
            ),
            model(
                "slow",
                json!({"tokens": 100000, "token_delay": "5ms"}),
                Some(PRICING),
            ),
        ],
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

/// Waits until `user`'s balance refill is due — a whole `interval` after its last
/// refill, by the clock and the comparison `settle_balance` uses — without applying
/// it: the row is read from the database, not through a route, so the next look
/// through a route is one that refills.
async fn wait_until_refill_is_due(s: &Server, user: &str, interval: Duration) {
    let row = s.state.manager.db().balance(user).await.unwrap();
    let last = row
        .and_then(|b| b.refilled_at)
        .expect("a balance, refilled at creation");
    wait_until(interval * 5, &format!("{user}'s refill to be due"), || {
        let due_before = genstream_engine::rfc3339(time::OffsetDateTime::now_utc() - interval);
        let due = last <= due_before;
        async move { due }
    })
    .await;
}

/// Waits until the replicas under `prefix` judge other replicas' leases, which each
/// does only after a whole lease TTL of its own health: a probe job is created for an
/// owner that then stops renewing its lease, and the wait ends when a reaper ended it
/// (a job without a `created` event: its log is ended, nothing is saved or charged).
async fn wait_until_leases_are_judged(prefix: &KeyPrefix) {
    use genstream_engine::store::EventLogStore;
    let mut rc = genstream_redis::RedisConfig::new(&redis_url());
    rc.key_prefix = prefix.name().to_owned();
    rc.lease_ttl = Duration::from_millis(100);
    let owner = genstream_redis::RedisStore::connect(rc).await.unwrap();
    let probe = genstream_engine::suite::meta("lease-probe", &genstream_engine::new_id());
    owner.create_job(&probe).await.unwrap();
    owner.close();
    let sid = probe.stream_id.as_str();
    wait_until(
        Duration::from_secs(15),
        "a reaper to end the probe job",
        || async { prefix.job_field(sid, "ended").await.as_deref() == Some("1") },
    )
    .await;
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
        refill_amount: 0.0,
        refill_interval: Duration::ZERO,
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
    wait_for_text(&s.url, &token("ann"), slow["streamId"].as_str().unwrap()).await;
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
    // Take all but -1 micro-credit away.
    let db = s.state.manager.db();
    let micro = db.balance("ann").await.unwrap().unwrap().balance_micro;
    db.add_credits("ann", -micro - 1, 0, &genstream_engine::now_rfc3339())
        .await
        .unwrap();
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

    // Refill: every 2 s, counted from the balance's creation (here its first look).
    config.balance.refill_amount = 5000.0;
    config.balance.refill_interval = Duration::from_secs(2);
    let s = serve(&config).await;
    assert_eq!(get(&s, "ann", "/api/balance").await["balance"], 2000.0);
    let db = s.state.manager.db();
    db.add_credits(
        "ann",
        -2000 * 1_000_000 - 1,
        0,
        &genstream_engine::now_rfc3339(),
    )
    .await
    .unwrap();
    let (st, v, _) = post(
        &s,
        "ann",
        "/api/chat",
        json!({"text": "broke", "model": "priced"}),
        None,
    )
    .await;
    assert_eq!(st, 402, "{v}");
    // GET /api/balance applies a due refill as the chat route does: the two agree.
    wait_until_refill_is_due(&s, "ann", Duration::from_secs(2)).await;
    let b = get(&s, "ann", "/api/balance").await["balance"]
        .as_f64()
        .unwrap();
    assert!(
        (b - (5000.0 - 0.000_001)).abs() < 1e-9,
        "refilled once: {b}"
    );
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

/// `Retry-After` in whole seconds, rounded up, for a refusal answered in
/// `[asked, answered]` about a window whose oldest hit was made in
/// `[first_sent, first_answered]`: it is due `period` after that hit.
fn retry_after_bounds(
    period: Duration,
    (first_sent, first_answered): (std::time::Instant, std::time::Instant),
    (asked, answered): (std::time::Instant, std::time::Instant),
) -> std::ops::RangeInclusive<u64> {
    let secs = |d: Duration| d.as_micros().div_ceil(1_000_000) as u64;
    secs((first_sent + period).saturating_duration_since(answered))
        ..=secs((first_answered + period).saturating_duration_since(asked))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_a_right_retry_after() {
    let mut config = base_config("sqlite::memory:", "memory", "unused");
    config.limits.messages_per_user_per_minute = 3;
    config.limits.messages_per_ip_per_minute = 5;
    config.limits.trusted_proxies = vec!["127.0.0.1".into()];
    let s = serve(&config).await;
    let chat = |user: &'static str, body: Value, xff: &'static str| {
        let s = &s;
        async move { post(s, user, "/api/chat", body, Some(xff)).await }
    };
    // Refused requests cost no budget: an empty text, an unknown model.
    for body in [
        json!({"text": " ", "model": "priced"}),
        json!({"text": "x", "model": "nope"}),
        json!({"text": "x", "conversationId": "no-such-conversation"}),
    ] {
        let (st, v, _) = chat("cat", body, "198.51.100.1").await;
        assert!(st == 400 || st == 404, "{st} {v}");
    }
    let first_sent = std::time::Instant::now();
    let mut first_answered = first_sent;
    for i in 0..3 {
        let (st, v, _) = chat(
            "cat",
            json!({"text": format!("m{i}"), "model": "priced"}),
            "198.51.100.1",
        )
        .await;
        assert_eq!(st, 200, "{v}");
        if i == 0 {
            first_answered = std::time::Instant::now();
        }
    }
    let asked = std::time::Instant::now();
    let (st, v, ra) = chat(
        "cat",
        json!({"text": "m3", "model": "priced"}),
        "198.51.100.1",
    )
    .await;
    let answered = std::time::Instant::now();
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited");
    // 3 in any 60 s: the next passes once the first of the three is 60 s old.
    let ra: u64 = ra.expect("Retry-After").parse().unwrap();
    let want = retry_after_bounds(
        Duration::from_secs(60),
        (first_sent, first_answered),
        (asked, answered),
    );
    assert!(want.contains(&ra), "Retry-After {ra}, want {want:?}");
    // Per IP, through the trusted proxy: another user from the same client IP shares
    // its budget of 5. Four hits are spent above (the IP is checked before the user,
    // so the refused fourth counted for the IP): one more passes, the next does not —
    // also when the proxy wrote the hop with a port.
    let (st, _, _) = chat(
        "dan",
        json!({"text": "x", "model": "priced"}),
        "198.51.100.1",
    )
    .await;
    assert_eq!(st, 200, "the IP's fifth hit");
    let (st, v, _) = chat(
        "dan",
        json!({"text": "x2", "model": "priced"}),
        "198.51.100.1:4711",
    )
    .await;
    assert_eq!(st, 429, "the IP's budget of 5 is spent: {v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("IP"));
    // Left of an unparsable hop is what the client wrote: the walk stops at the last
    // trusted hop, so this counts for the proxy (127.0.0.1, a budget of its own), not
    // for the address the client put there.
    let (st, v, _) = chat(
        "dan",
        json!({"text": "y", "model": "priced"}),
        "198.51.100.1, unknown",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // Another client IP behind the same proxy has its own budget.
    let (st, v, _) = chat(
        "dan",
        json!({"text": "y", "model": "priced"}),
        "198.51.100.2",
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

/// A burst over three replicas sharing Redis: exactly the limit passes in the window,
/// whichever replicas the requests land on; each refusal's Retry-After is right for
/// the window's oldest hit, read from Redis with Redis's own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_burst_over_three_redis_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("rl.db").display());
    let prefix = KeyPrefix::new();
    let mut config = base_config(&database, &redis_url(), prefix.name());
    config.limits.messages_per_user_per_minute = 5;
    let replicas = [
        serve(&config).await,
        serve(&config).await,
        serve(&config).await,
    ];
    let burst = futures::future::join_all((0..24).map(|i| {
        let s = &replicas[i % 3];
        async move {
            post(
                s,
                "fay",
                "/api/chat",
                json!({"text": format!("burst {i}"), "model": "priced"}),
                None,
            )
            .await
        }
    }))
    .await;
    let passed = burst.iter().filter(|(st, _, _)| *st == 200).count();
    assert_eq!(passed, 5, "exactly the limit passes");
    for (st, v, ra) in &burst {
        if *st != 200 {
            assert_eq!(
                (*st, v["error"]["code"].as_str()),
                (429, Some("rate_limited")),
                "{v}"
            );
            let ra: u64 = ra.as_deref().expect("Retry-After").parse().unwrap();
            assert!((1..=60).contains(&ra), "{ra}");
        }
    }
    // The window holds the five that passed, nothing else (refusals do not count).
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:rlw:{{user:fay}}", prefix.name());
    let hits: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(hits.len(), 5, "{hits:?}");
    let oldest_us = hits[0].1 as u64;
    let redis_now_us = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
            s * 1_000_000 + us
        }
    };
    for (i, s) in replicas.iter().enumerate() {
        let before = redis_now_us(&mut conn).await;
        let (st, v, ra) = post(
            s,
            "fay",
            "/api/chat",
            json!({"text": "one more", "model": "priced"}),
            None,
        )
        .await;
        let after = redis_now_us(&mut conn).await;
        assert_eq!(st, 429, "replica {i}: {v}");
        let ra: u64 = ra.expect("Retry-After").parse().unwrap();
        // Due when the oldest hit is 60 s old, by Redis's clock.
        let secs = |now: u64| {
            (oldest_us + 60_000_000)
                .saturating_sub(now)
                .div_ceil(1_000_000)
        };
        assert!(
            (secs(after)..=secs(before)).contains(&ra),
            "replica {i}: Retry-After {ra}, want {}..={}",
            secs(after),
            secs(before)
        );
    }
}

/// A refill that is due is applied once however many replicas see it at once — by
/// GET /api/balance or by POST /api/chat — and every answer shows the refilled amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refill_across_replicas_happens_once_with_the_configured_amount() {
    let db = TestDb::create().await;
    let prefix = KeyPrefix::new();
    let mut config = base_config(&db.url, &redis_url(), prefix.name());
    config.balance = BalanceConfig {
        enabled: true,
        start_balance: 100.0,
        refill_amount: 1000.0,
        refill_interval: Duration::from_secs(2),
    };
    config.models.push(model(
        "free",
        json!({"tokens": 3, "token_delay": "1ms"}),
        None,
    ));
    let replicas = [
        serve(&config).await,
        serve(&config).await,
        serve(&config).await,
    ];
    // The first look creates the balance at the start amount, refilled "now".
    assert_eq!(
        get(&replicas[0], "gus", "/api/balance").await["balance"],
        100.0
    );
    assert_eq!(
        get(&replicas[1], "gus", "/api/balance").await["balance"],
        100.0
    );
    // Due, and not applied yet: the looks and chats below race to apply it.
    wait_until_refill_is_due(&replicas[0], "gus", Duration::from_secs(2)).await;
    let looks = futures::future::join_all((0..9).map(|i| {
        let s = &replicas[i % 3];
        async move { get(s, "gus", "/api/balance").await["balance"].clone() }
    }));
    let chats = futures::future::join_all((0..3).map(|i| {
        let s = &replicas[i];
        async move {
            post(
                s,
                "gus",
                "/api/chat",
                json!({"text": format!("free {i}"), "model": "free"}),
                None,
            )
            .await
            .0
        }
    }));
    let (looks, chats) = tokio::join!(looks, chats);
    assert_eq!(chats, vec![200, 200, 200]);
    assert!(looks.iter().all(|b| *b == 1100.0), "{looks:?}");
    for s in &replicas {
        assert_eq!(get(s, "gus", "/api/balance").await["balance"], 1100.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds_across_three_replicas_and_slots_come_back() {
    let db = TestDb::create().await;
    let prefix = KeyPrefix::new();
    let mut config = base_config(&db.url, &redis_url(), prefix.name());
    config.limits.concurrent_per_user = 2;
    config.redis.lease_ttl = Duration::from_millis(600);
    config.jobs.reap_interval = Duration::from_millis(200);
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
    rc.key_prefix = prefix.name().to_owned();
    rc.lease_ttl = Duration::from_millis(300);
    rc.max_running_per_user = Some(2);
    let dead = genstream_redis::RedisStore::connect(rc).await.unwrap();
    use genstream_engine::store::EventLogStore;
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
    let status = wait_for(
        Duration::from_secs(15),
        "the lost job to be reaped",
        || async {
            let m = dead.get_job(&lost.stream_id).await.unwrap().unwrap();
            (m.status != genstream_engine::store::JobStatus::Running).then_some(m.status)
        },
    )
    .await;
    assert_eq!(status, genstream_engine::store::JobStatus::Error);
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

/// How a raced job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    Complete,
    Aborted,
    ReplicaLost,
}

/// Randomized races of completion vs abort vs repeated abort vs the reaper, across two
/// replicas, with balances on. The reaper joins the race by the job's owner being
/// presumed dead mid-stream: its `owner` is pointed at a replica without a lease, as if
/// the owner's lease had lapsed, so the other replica's reaper claims it while the real
/// owner goes on generating (and is fenced off by the claim). Whatever wins, the ledger holds exactly the priced usage
/// of the `usage` events in the job's log — estimates included — and each user's
/// balance dropped by exactly what the ledger charged them.
async fn exactly_once(database: &str, cases: usize) {
    let prefix = KeyPrefix::new();
    let mut config = base_config(database, &redis_url(), prefix.name());
    // Long enough (about 100 ms) that the aborts and the lease lapse below, sent 0-30
    // ms after the start, land while the job streams, even on loaded cores: a job's
    // appends are pipelined, so its length is its token clock's, not its store round
    // trips' (at 50 ms, one CI run on PostgreSQL saw no abort win in 1,000 races).
    config.models = vec![model(
        "priced",
        json!({"tokens": 20, "token_delay": "5ms"}),
        Some(PRICING),
    )];
    const START_MICRO: i64 = 1_000_000 * 1_000_000;
    config.balance = BalanceConfig {
        enabled: true,
        start_balance: START_MICRO as f64 / 1e6,
        refill_amount: 0.0,
        refill_interval: Duration::ZERO,
    };
    config.redis.lease_ttl = Duration::from_secs(1);
    // Jobs run on a; b's reaper (every 20 ms) is the one that finds them orphaned. A
    // replica never judges its own jobs by a lease, so a must not reap them here
    // either: its sweep runs once at start only.
    config.jobs.reap_interval = Duration::from_secs(3600);
    let a = serve(&config).await;
    config.jobs.reap_interval = Duration::from_millis(20);
    let b = serve(&config).await;
    // A replica judges others' leases only after a whole lease TTL of its own health.
    wait_until_leases_are_judged(&prefix).await;
    let redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let seeds: Vec<u64> = (0..cases as u64).collect();
    let results = futures::stream::iter(seeds.into_iter().map(|seed| {
        let (a, b, redis, prefix) = (&a, &b, redis.clone(), prefix.name());
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
            let mut tasks: Vec<futures::future::BoxFuture<'_, Option<(u16, Value)>>> = Vec::new();
            for _ in 0..aborts {
                let delay = Duration::from_millis(next(30));
                let s = if next(2) == 1 { b } else { a };
                let (sid, user) = (sid.clone(), user.clone());
                tasks.push(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    let (code, body, _) =
                        post(s, &user, "/api/chat/abort", json!({"streamId": sid}), None).await;
                    Some((code, body))
                }));
            }
            if next(3) == 0 {
                // The owner's lease lapses mid-stream (as far as anyone can tell).
                let delay = Duration::from_millis(next(30));
                let (key, mut redis) = (format!("{prefix}:job:{{{sid}}}"), redis.clone());
                tasks.push(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    let _: () = redis::cmd("HSET")
                        .arg(&key)
                        .arg("owner")
                        .arg(format!("dead-{}", uuid::Uuid::now_v7()))
                        .query_async(&mut redis)
                        .await
                        .unwrap();
                    None
                }));
            }
            let codes: Vec<(u16, Value)> = futures::future::join_all(tasks)
                .await
                .into_iter()
                .flatten()
                .collect();
            assert!(
                codes.iter().all(|(c, _)| *c == 200 || *c == 409),
                "{codes:?}"
            );
            let evs = events(if next(2) == 1 { b } else { a }, &user, &sid).await;
            let terminals: Vec<&EventBody> = evs
                .iter()
                .map(|e| &e.body)
                .filter(|b| b.is_terminal())
                .collect();
            let ending = match terminals[..] {
                [EventBody::Final(f)]
                    if f.status == genstream_engine::event::FinalStatus::Complete =>
                {
                    Ending::Complete
                }
                [EventBody::Final(_)] => Ending::Aborted,
                [EventBody::Error(e)] if e.code == "replica_lost" => Ending::ReplicaLost,
                _ => panic!("stream {sid}: terminals {terminals:?}"),
            };
            // For the failure message: the log's usage records.
            let usage: Vec<String> = evs
                .iter()
                .filter_map(|e| match &e.body {
                    EventBody::Usage(u) => Some(format!(
                        "seq {}: call {} in {} out {}{}",
                        e.seq,
                        u.call_index,
                        u.input_tokens,
                        u.output_tokens,
                        if u.estimated { " (estimated)" } else { "" }
                    )),
                    _ => None,
                })
                .collect();
            (user, sid, priced_micro(&evs), ending, usage)
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    // Owners fenced off by a reaper may still be winding down: let every job task end.
    wait_until(Duration::from_secs(30), "every job task to end", || {
        let live = a.state.manager.live_jobs() + b.state.manager.live_jobs();
        async move { live == 0 }
    })
    .await;
    let db = a.state.manager.db();
    let mut spent_by_user: std::collections::BTreeMap<String, i64> = Default::default();
    let mut endings: std::collections::BTreeMap<Ending, usize> = Default::default();
    for (user, sid, expected, ending, usage) in &results {
        let spent = db.spent_on_stream(sid).await.unwrap();
        assert_eq!(
            spent, *expected,
            "stream {sid} ({ending:?}): spent {spent}, priced usage in the log {expected}: {usage:?}"
        );
        *spent_by_user.entry(user.clone()).or_default() += spent;
        *endings.entry(*ending).or_default() += 1;
    }
    for (user, spent) in &spent_by_user {
        let balance = db.balance(user).await.unwrap().unwrap().balance_micro;
        assert_eq!(START_MICRO - balance, *spent, "{user}'s balance");
    }
    assert!(spent_by_user.values().sum::<i64>() > 0);
    // Every contender won some races.
    assert_eq!(endings.len(), 3, "{endings:?}");
    eprintln!("endings over {cases} races: {endings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_on_sqlite_1000_races() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    exactly_once(&url, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_on_postgres_1000_races() {
    let db = TestDb::create().await;
    exactly_once(&db.url, 1000).await;
}
