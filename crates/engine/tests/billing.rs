//! Billing in the job manager against the in-memory store: a spend that fails when the
//! database hiccups is retried until it lands (and given up after the grace); a refused
//! request spends no rate budget; usage estimates count with the upstream model's
//! encoding and carry the configured provider name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::EngineError;
use genstream_engine::billing::{Pricing, price};
use genstream_engine::event::{EventBody, FinalStatus, Message};
use genstream_engine::log::{EventLog, LogLimits};
use genstream_engine::manager::{JobManager, ManagerConfig, ModelEntry, RateLimits, StartRequest};
use genstream_engine::persist::{
    ApiKey, Balance, Conversation, MemoryPersistence, Persistence, SpendOutcome, SpendRequest,
    UsageRow,
};
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderEvent, ProviderStream,
};
use genstream_engine::store::{JobStore, MemoryStore};
use genstream_engine::usage::UsageRecord;
use tokio_util::sync::CancellationToken;

const PRICING: Pricing = Pricing {
    input_per_mtok: 3.0,
    output_per_mtok: 15.0,
    cache_write_per_mtok: 0.0,
    cache_read_per_mtok: 0.0,
    reasoning_per_mtok: None,
};

/// Streams `tokens` words, then its usage — or, with `hang`, nothing more until it
/// is cancelled (so the call ends without usage and gets an estimate).
struct Words {
    tokens: usize,
    hang: bool,
    name: &'static str,
    upstream: Option<&'static str>,
}

#[async_trait]
impl Provider for Words {
    fn kind(&self) -> &str {
        "words"
    }
    fn name(&self) -> &str {
        self.name
    }
    fn upstream_model(&self) -> Option<&str> {
        self.upstream
    }
    async fn stream(
        &self,
        _req: ModelRequest,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let (tokens, hang) = (self.tokens, self.hang);
        let s = futures::stream::unfold(0usize, move |i| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if i < tokens {
                return Some((Ok(ProviderEvent::Text(format!("wörd{i} 😀 "))), i + 1));
            }
            if hang {
                futures::future::pending::<()>().await;
            }
            (i == tokens).then(|| {
                (
                    Ok(ProviderEvent::Usage(UsageRecord {
                        input_tokens: 7,
                        output_tokens: tokens as u64,
                        ..Default::default()
                    })),
                    i + 1,
                )
            })
        });
        Ok(s.boxed())
    }
}

/// The in-memory database, but the first `fail_spends` spends fail as a database
/// outage would.
#[derive(Default)]
struct FlakyDb {
    inner: MemoryPersistence,
    fail_spends: AtomicUsize,
    spends: AtomicUsize,
}

#[async_trait]
impl Persistence for FlakyDb {
    async fn save_conversation(&self, c: &Conversation) -> Result<(), EngineError> {
        self.inner.save_conversation(c).await
    }
    async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, EngineError> {
        self.inner.get_conversation(id).await
    }
    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>, EngineError> {
        self.inner.list_conversations(user_id).await
    }
    async fn delete_conversation(&self, id: &str) -> Result<bool, EngineError> {
        self.inner.delete_conversation(id).await
    }
    async fn save_message(&self, m: &Message) -> Result<(), EngineError> {
        self.inner.save_message(m).await
    }
    async fn add_message(&self, m: &Message) -> Result<bool, EngineError> {
        self.inner.add_message(m).await
    }
    async fn get_message(&self, id: &str) -> Result<Option<Message>, EngineError> {
        self.inner.get_message(id).await
    }
    async fn list_messages(&self, conversation_id: &str) -> Result<Vec<Message>, EngineError> {
        self.inner.list_messages(conversation_id).await
    }
    async fn get_or_init_secret(&self, name: &str, candidate: &str) -> Result<String, EngineError> {
        self.inner.get_or_init_secret(name, candidate).await
    }
    async fn ping(&self) -> Result<(), EngineError> {
        self.inner.ping().await
    }
    async fn spend(&self, req: &SpendRequest) -> Result<SpendOutcome, EngineError> {
        self.spends.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .fail_spends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(EngineError::Persistence("connection reset by peer".into()));
        }
        self.inner.spend(req).await
    }
    async fn balance(&self, user_id: &str) -> Result<Option<Balance>, EngineError> {
        self.inner.balance(user_id).await
    }
    async fn ensure_balance(
        &self,
        user_id: &str,
        start_micro: i64,
        now: &str,
    ) -> Result<Balance, EngineError> {
        self.inner.ensure_balance(user_id, start_micro, now).await
    }
    async fn add_credits(
        &self,
        user_id: &str,
        micro: i64,
        start_micro: i64,
        now: &str,
    ) -> Result<i64, EngineError> {
        self.inner
            .add_credits(user_id, micro, start_micro, now)
            .await
    }
    async fn refill_if_due(
        &self,
        user_id: &str,
        amount_micro: i64,
        due_before: &str,
        now: &str,
    ) -> Result<Option<i64>, EngineError> {
        self.inner
            .refill_if_due(user_id, amount_micro, due_before, now)
            .await
    }
    async fn usage_report(
        &self,
        user_id: &str,
        by_period: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRow>, EngineError> {
        self.inner.usage_report(user_id, by_period, limit).await
    }
    async fn spent_on_stream(&self, stream_id: &str) -> Result<i64, EngineError> {
        self.inner.spent_on_stream(stream_id).await
    }
    async fn create_api_key(&self, key: &ApiKey) -> Result<(), EngineError> {
        self.inner.create_api_key(key).await
    }
    async fn list_api_keys(&self, user_id: &str) -> Result<Vec<ApiKey>, EngineError> {
        self.inner.list_api_keys(user_id).await
    }
    async fn revoke_api_key(&self, id: &str, now: &str) -> Result<Option<ApiKey>, EngineError> {
        self.inner.revoke_api_key(id, now).await
    }
    async fn authenticate_api_key(
        &self,
        hash: &str,
        now: &str,
    ) -> Result<Option<String>, EngineError> {
        self.inner.authenticate_api_key(hash, now).await
    }
}

fn manager(db: Arc<FlakyDb>, config: ManagerConfig) -> JobManager {
    let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(LogLimits::default()));
    let words = |name: &str, tokens, hang, upstream| {
        let mut m = ModelEntry::new(
            name,
            Arc::new(Words {
                tokens,
                hang,
                name: "my-gateway",
                upstream,
            }),
        );
        m.pricing = Some(PRICING);
        m
    };
    let models = vec![
        words("priced", 6, false, None),
        words("cut-off", 6, true, Some("gpt-4-0613")),
        words("cut-off-4o", 6, true, Some("gpt-4o")),
    ];
    JobManager::new(store, db as Arc<dyn Persistence>, models, config)
}

fn req(user: &str, model: &str) -> StartRequest {
    StartRequest {
        user_id: user.into(),
        text: "how many tokens is this?".into(),
        model: Some(model.into()),
        ..Default::default()
    }
}

async fn wait_end(log: &EventLog) -> EventBody {
    let mut rx = log.watch();
    loop {
        rx.borrow_and_update();
        if let Some(e) = log.terminal_event() {
            return e.body;
        }
        rx.changed().await.unwrap();
    }
}

fn usage_records(log: &EventLog) -> Vec<UsageRecord> {
    log.read_after(None, usize::MAX)
        .frames
        .iter()
        .map(|f| serde_json::from_slice::<genstream_engine::event::Event>(f.data_json()).unwrap())
        .filter_map(|e| match e.body {
            EventBody::Usage(u) => Some(u),
            _ => None,
        })
        .collect()
}

/// A database hiccup during the spend no longer loses it: the spend is retried (it is
/// idempotent by its unique key) and the job completes with its usage charged once.
#[tokio::test(start_paused = true)]
async fn a_spend_that_fails_is_retried_until_it_lands() {
    let db = Arc::new(FlakyDb::default());
    db.fail_spends.store(3, Ordering::SeqCst);
    let m = manager(db.clone(), ManagerConfig::default());
    let started = m.start(req("ann", "priced")).await.unwrap();
    let (_, log) = m.job_for("ann", &started.stream_id).await.unwrap();
    let EventBody::Final(f) = wait_end(&log).await else {
        panic!("the job did not complete")
    };
    assert_eq!(f.status, FinalStatus::Complete);
    assert_eq!(
        db.spends.load(Ordering::SeqCst),
        4,
        "three failures, one success"
    );
    let records = usage_records(&log);
    let priced: i64 = records
        .iter()
        .flat_map(|r| price(r, Some(&PRICING)))
        .map(|l| l.amount_micro)
        .sum();
    assert!(priced > 0);
    assert_eq!(
        db.spent_on_stream(&started.stream_id).await.unwrap(),
        priced
    );
    assert_eq!(f.usage.credits, priced as f64 / 1e6);
}

/// Retries are bounded by the store-outage grace: a database that stays down ends the
/// job with an error instead of holding it forever.
#[tokio::test(start_paused = true)]
async fn a_spend_that_keeps_failing_gives_up_after_the_grace() {
    let db = Arc::new(FlakyDb::default());
    db.fail_spends.store(usize::MAX, Ordering::SeqCst);
    let config = ManagerConfig {
        store_outage_grace: Duration::from_secs(5),
        ..ManagerConfig::default()
    };
    let m = manager(db.clone(), config);
    let t0 = tokio::time::Instant::now();
    let started = m.start(req("ann", "priced")).await.unwrap();
    let (_, log) = m.job_for("ann", &started.stream_id).await.unwrap();
    let EventBody::Error(e) = wait_end(&log).await else {
        panic!("the job should fail")
    };
    assert_eq!(e.code, "internal", "{e:?}");
    // The waits add up to at most the grace (backon stops before the next wait would
    // pass it), and with 50 ms doubling to 2 s they reach well past a second.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_millis(5100),
        "{took:?}"
    );
    let tries = db.spends.load(Ordering::SeqCst);
    assert!((3..30).contains(&tries), "{tries} tries");
}

/// Only a valid request spends rate budget: requests refused as invalid (400), for a
/// conversation that is missing (404) or another user's (403) count nothing.
#[tokio::test(start_paused = true)]
async fn refused_requests_spend_no_rate_budget() {
    let db = Arc::new(FlakyDb::default());
    let config = ManagerConfig {
        limits: RateLimits {
            per_user: Some(2),
            per_ip: Some(2),
            period: Duration::from_secs(60),
        },
        ..ManagerConfig::default()
    };
    let m = manager(db, config);
    let other = m.start(req("bob", "priced")).await.unwrap();
    let (_, log) = m.job_for("bob", &other.stream_id).await.unwrap();
    wait_end(&log).await;
    let ann = |f: &dyn Fn(&mut StartRequest)| {
        let mut r = req("ann", "priced");
        r.client_ip = Some("203.0.113.5".into());
        f(&mut r);
        r
    };
    let bad = [
        ann(&|r| r.text = "  ".into()),
        ann(&|r| r.model = Some("nope".into())),
        ann(&|r| r.tools = vec!["rm -rf".into()]),
        ann(&|r| r.conversation_id = Some("no-such-conversation".into())),
        ann(&|r| r.conversation_id = Some(other.conversation_id.clone())),
    ];
    for (i, r) in bad.into_iter().enumerate() {
        let err = m.start(r).await.unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::BadRequest { .. }
                    | EngineError::NotFound(_)
                    | EngineError::Forbidden(_)
            ),
            "case {i}: {err:?}"
        );
    }
    // A parent that is not in the conversation, in a conversation of ann's own.
    let first = m.start(ann(&|_| {})).await.unwrap();
    let (_, log) = m.job_for("ann", &first.stream_id).await.unwrap();
    wait_end(&log).await;
    let err = m
        .start(ann(&|r| {
            r.conversation_id = Some(first.conversation_id.clone());
            r.parent_message_id = Some("not-a-message".into());
        }))
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::BadRequest { .. }), "{err:?}");
    // The budget of 2 is all there: one spent above, one more passes, then 429.
    m.start(ann(&|_| {})).await.unwrap();
    let err = m.start(ann(&|_| {})).await.unwrap_err();
    assert!(matches!(err, EngineError::RateLimited { .. }), "{err:?}");
}

/// A call cut off before the upstream reported usage gets an estimate counted with the
/// upstream model's own encoding (cl100k_base for gpt-4, o200k_base for gpt-4o), not 4
/// characters a token, and the record names the configured provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimates_use_the_upstream_models_encoding() {
    let db = Arc::new(FlakyDb::default());
    let m = manager(db, ManagerConfig::default());
    let text = "how many tokens is this?";
    let streamed: String = (0..6).map(|i| format!("wörd{i} 😀 ")).collect();
    let (cl100k, o200k) = (
        tiktoken_rs::cl100k_base_singleton(),
        tiktoken_rs::o200k_base_singleton(),
    );
    // The texts tell the encodings (and the 4-characters guess) apart.
    let guess = streamed.chars().count().div_ceil(4);
    let counts = [
        cl100k.encode_ordinary(&streamed).len(),
        o200k.encode_ordinary(&streamed).len(),
    ];
    assert!(
        counts[0] != counts[1] && !counts.contains(&guess),
        "{counts:?} {guess}"
    );
    for (model, bpe) in [("cut-off", cl100k), ("cut-off-4o", o200k)] {
        let started = m.start(req("ann", model)).await.unwrap();
        let (_, log) = m.job_for("ann", &started.stream_id).await.unwrap();
        // Wait for all six words (woken by each append), then abort the hanging call.
        let mut appended = log.watch();
        while log.with_aggregate(|a| a.text()).len() < streamed.len() {
            tokio::time::timeout(Duration::from_secs(10), appended.changed())
                .await
                .expect("the words within 10 s")
                .unwrap();
        }
        m.abort("ann", &started.stream_id).await.unwrap();
        let records = usage_records(&log);
        assert_eq!(records.len(), 1, "{records:?}");
        let r = &records[0];
        assert!(r.estimated);
        assert_eq!(r.provider, "my-gateway");
        assert_eq!(
            r.input_tokens,
            bpe.encode_ordinary(text).len() as u64,
            "{model}"
        );
        assert_eq!(
            r.output_tokens,
            bpe.encode_ordinary(&streamed).len() as u64,
            "{model}"
        );
    }
}
