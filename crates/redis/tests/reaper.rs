//! The lease reaper (`JobManager::reap_orphans`) over the Redis store: orphans are
//! jobs of a "dead" replica (a store that wrote a log and closed, so its lease lapsed),
//! reaped by a manager on another store with an in-memory database.
//!
//! - a reap that fails half-way (the database refuses the partial answer) is retried
//!   by the next sweep, and does not stop the sweep from ending the other orphans;
//! - the partial answer is folded from the log as it is after the claim, not from a
//!   mirror that missed a publish;
//! - the call the owner was in is billed: an estimated `usage` event in the log before
//!   the terminal `error`, the same numbers in the ledger, its output counted from that
//!   call's run steps and its input from the persisted history and earlier calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use genstream_engine::EngineError;
use genstream_engine::event::{
    Event, EventBody, Frame, Message, RunStep, RunStepCompleted, StepDetails, StepResult, StepType,
    ToolCall,
};
use genstream_engine::manager::{JobManager, ManagerConfig};
use genstream_engine::persist::{
    ApiKey, Balance, Conversation, MemoryPersistence, Persistence, SpendOutcome, SpendRequest,
    UsageRow,
};
use genstream_engine::store::{EventLogStore, JobCoordination, JobMeta, JobStore};
use genstream_engine::usage::{UsageRecord, count_tokens};
use genstream_redis::RedisStore;
use genstream_test_support::KeyPrefix;

const LEASE: Duration = Duration::from_millis(400);

/// The in-memory database, whose `save_message` fails for the message ids in `refuse`.
#[derive(Default)]
struct FlakyDb {
    db: MemoryPersistence,
    refuse: parking_lot::Mutex<HashSet<String>>,
    saves_refused: AtomicBool,
}

#[async_trait]
impl Persistence for FlakyDb {
    async fn save_conversation(&self, c: &Conversation) -> Result<(), EngineError> {
        self.db.save_conversation(c).await
    }
    async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, EngineError> {
        self.db.get_conversation(id).await
    }
    async fn list_conversations(&self, u: &str) -> Result<Vec<Conversation>, EngineError> {
        self.db.list_conversations(u).await
    }
    async fn delete_conversation(&self, id: &str) -> Result<bool, EngineError> {
        self.db.delete_conversation(id).await
    }
    async fn save_message(&self, m: &Message) -> Result<(), EngineError> {
        if self.refuse.lock().contains(&m.message_id) {
            self.saves_refused.store(true, Ordering::SeqCst);
            return Err(EngineError::Persistence("refused by the test".into()));
        }
        self.db.save_message(m).await
    }
    async fn add_message(&self, m: &Message) -> Result<bool, EngineError> {
        if self.refuse.lock().contains(&m.message_id) {
            self.saves_refused.store(true, Ordering::SeqCst);
            return Err(EngineError::Persistence("refused by the test".into()));
        }
        self.db.add_message(m).await
    }
    async fn get_message(&self, id: &str) -> Result<Option<Message>, EngineError> {
        self.db.get_message(id).await
    }
    async fn list_messages(&self, c: &str) -> Result<Vec<Message>, EngineError> {
        self.db.list_messages(c).await
    }
    async fn get_or_init_secret(&self, n: &str, c: &str) -> Result<String, EngineError> {
        self.db.get_or_init_secret(n, c).await
    }
    async fn ping(&self) -> Result<(), EngineError> {
        self.db.ping().await
    }
    async fn spend(&self, r: &SpendRequest) -> Result<SpendOutcome, EngineError> {
        self.db.spend(r).await
    }
    async fn balance(&self, u: &str) -> Result<Option<Balance>, EngineError> {
        self.db.balance(u).await
    }
    async fn ensure_balance(&self, u: &str, s: i64, n: &str) -> Result<Balance, EngineError> {
        self.db.ensure_balance(u, s, n).await
    }
    async fn add_credits(&self, u: &str, m: i64, s: i64, n: &str) -> Result<i64, EngineError> {
        self.db.add_credits(u, m, s, n).await
    }
    async fn refill_if_due(
        &self,
        u: &str,
        a: i64,
        d: &str,
        n: &str,
    ) -> Result<Option<i64>, EngineError> {
        self.db.refill_if_due(u, a, d, n).await
    }
    async fn usage_report(
        &self,
        u: &str,
        by: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRow>, EngineError> {
        self.db.usage_report(u, by, limit).await
    }
    async fn spent_on_stream(&self, s: &str) -> Result<i64, EngineError> {
        self.db.spent_on_stream(s).await
    }
    async fn create_api_key(&self, key: &ApiKey) -> Result<(), EngineError> {
        self.db.create_api_key(key).await
    }
    async fn list_api_keys(&self, user_id: &str) -> Result<Vec<ApiKey>, EngineError> {
        self.db.list_api_keys(user_id).await
    }
    async fn revoke_api_key(&self, id: &str, now: &str) -> Result<Option<ApiKey>, EngineError> {
        self.db.revoke_api_key(id, now).await
    }
    async fn authenticate_api_key(
        &self,
        hash: &str,
        now: &str,
    ) -> Result<Option<String>, EngineError> {
        self.db.authenticate_api_key(hash, now).await
    }
}

struct Setup {
    prefix: KeyPrefix,
    dead: RedisStore,
    store: RedisStore,
    db: Arc<FlakyDb>,
    manager: JobManager,
}

async fn setup() -> Setup {
    let prefix = KeyPrefix::new();
    let url = redis_url();
    let dead = store(&url, prefix.name(), Duration::from_millis(300)).await;
    let store = store(&url, prefix.name(), LEASE).await;
    let db = Arc::new(FlakyDb::default());
    let manager = JobManager::new(
        Arc::new(store.clone()) as Arc<dyn JobStore>,
        db.clone() as Arc<dyn Persistence>,
        Vec::new(),
        ManagerConfig::default(),
    );
    Setup {
        prefix,
        dead,
        store,
        db,
        manager,
    }
}

impl Setup {
    /// A job of the dead replica with `events` after `created` (its user message is in
    /// the database).
    async fn orphan(&self, question: &str, events: impl Fn(&JobMeta) -> Vec<EventBody>) -> JobMeta {
        let m = meta();
        self.db
            .save_conversation(&Conversation {
                conversation_id: m.conversation_id.clone(),
                user_id: m.user_id.clone(),
                title: "t".into(),
                created_at: m.created_at.clone(),
                updated_at: m.created_at.clone(),
            })
            .await
            .unwrap();
        self.db
            .save_message(&user_message(&m, question))
            .await
            .unwrap();
        self.dead.create_job(&m).await.unwrap();
        let all = std::iter::once(created(&m, question)).chain(events(&m));
        for (seq, e) in all.enumerate() {
            self.dead
                .append(&m.stream_id, &e, Some(seq as u64))
                .await
                .unwrap();
        }
        m
    }

    /// Closes the dead replica and waits until its lease lapsed and the reaper's store
    /// may judge leases: the store lists the dead replica's jobs as orphans.
    async fn kill_owner(&self) {
        self.dead.close();
        wait_until(
            LEASE * 10,
            "the dead replica's jobs listed as orphans",
            || async {
                let none = HashSet::new();
                !self.store.orphaned_jobs(&none).await.unwrap().is_empty()
            },
        )
        .await;
    }

    /// The job's events as Redis's log holds them.
    async fn events(&self, sid: &str) -> Vec<Event> {
        self.prefix
            .log(sid)
            .await
            .into_iter()
            .map(|f| {
                let frame = genstream_engine::event::Frame::parse(f.into()).unwrap();
                serde_json::from_slice(frame.data_json()).unwrap()
            })
            .collect()
    }
}

fn tool_step(m: &JobMeta, id: &str, call: u32, index: u32, name: &str) -> EventBody {
    EventBody::RunStep(RunStep {
        id: id.into(),
        run_id: format!("{}:{call}", m.stream_id),
        index,
        step_type: StepType::ToolCalls,
        step_details: StepDetails::ToolCalls {
            tool_calls: vec![ToolCall {
                id: format!("call_{id}"),
                name: name.into(),
                args: String::new(),
                output: None,
            }],
        },
    })
}

fn tool_done(id: &str, index: u32, name: &str, args: &str, output: &str) -> EventBody {
    EventBody::RunStepCompleted(RunStepCompleted {
        result: StepResult {
            id: id.into(),
            index,
            tool_call: ToolCall {
                id: format!("call_{id}"),
                name: name.into(),
                args: args.into(),
                output: Some(output.into()),
            },
        },
    })
}

fn args_delta(id: &str, args: &str) -> EventBody {
    EventBody::RunStepDelta(genstream_engine::event::RunStepDelta {
        id: id.into(),
        delta: genstream_engine::event::ToolCallsDelta {
            kind: StepType::ToolCalls,
            tool_calls: vec![genstream_engine::event::ToolCallChunk {
                id: None,
                name: None,
                args: args.into(),
                index: 0,
            }],
        },
    })
}

fn real_usage(call: u32, input: u64, output: u64) -> EventBody {
    EventBody::Usage(UsageRecord {
        call_index: call,
        model: "demo".into(),
        provider: "demo".into(),
        input_tokens: input,
        output_tokens: output,
        ..Default::default()
    })
}

fn terminal_code(events: &[Event]) -> Option<String> {
    match &events.last()?.body {
        EventBody::Error(e) => Some(e.code.clone()),
        _ => None,
    }
}

/// A reap that fails after its claim (the database refuses the partial answer) is
/// logged and retried on the next sweep; the sweep goes on to the other orphans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reap_is_retried_and_does_not_stop_the_sweep() {
    let s = setup().await;
    let steps = |m: &JobMeta| vec![text_step(m, "s0", 0, 0), delta("s0", "partial")];
    let a = s.orphan("first", steps).await;
    let b = s.orphan("second", steps).await;
    let c = s.orphan("third", steps).await;
    s.db.refuse.lock().insert(b.response_message_id.clone());
    s.kill_owner().await;

    let ended = s
        .manager
        .reap_orphans()
        .await
        .expect("the sweep itself succeeds");
    assert!(s.db.saves_refused.load(Ordering::SeqCst));
    assert_eq!(ended, 2, "the other orphans were ended in the same sweep");
    for m in [&a, &c] {
        assert_eq!(
            terminal_code(&s.events(&m.stream_id).await).as_deref(),
            Some("replica_lost")
        );
    }
    assert_eq!(
        terminal_code(&s.events(&b.stream_id).await),
        None,
        "b is still running"
    );

    // The database is back: the next sweep finishes b (its claim is still ours).
    s.db.refuse.lock().clear();
    let ended = s.manager.reap_orphans().await.unwrap();
    assert_eq!(ended, 1);
    let events = s.events(&b.stream_id).await;
    assert_eq!(terminal_code(&events).as_deref(), Some("replica_lost"));
    assert_eq!(events.iter().filter(|e| e.body.is_terminal()).count(), 1);
    assert!(
        s.db.get_message(&b.response_message_id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        !s.store
            .orphaned_jobs(&HashSet::new())
            .await
            .unwrap()
            .iter()
            .any(|o| o.meta.stream_id == b.stream_id || o.meta.stream_id == a.stream_id)
    );
}

/// Appends `body` to the job's log the way the owner's append does, but publishes it
/// on a channel nobody hears: Redis has the event, no mirror got it.
async fn append_unpublished(s: &Setup, m: &JobMeta, body: &EventBody, seq: u64) {
    let reply: redis::Value = redis::cmd("FCALL")
        .arg("genstream_append_batch_v6")
        .arg(2)
        .arg(format!("{}:job:{{{}}}", s.prefix.name(), m.stream_id))
        .arg(format!("{}:log:{{{}}}", s.prefix.name(), m.stream_id))
        .arg(10_000)
        .arg(1 << 20)
        .arg(120_000)
        .arg(60_000)
        .arg(format!("{}:nowhere", s.prefix.name()))
        .arg(0)
        .arg(seq)
        .arg(s.dead.replica_id())
        .arg(0)
        .arg("")
        .arg(&Frame::encode(seq, body).unwrap().bytes[..])
        .query_async(&mut conn(&redis_url()).await)
        .await
        .unwrap();
    assert!(format!("{reply:?}").contains("ok"), "{reply:?}");
}

/// The reaper folds the partial answer from the log as it is once its claim is in,
/// not from a mirror of its replica that missed the owner's last publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_folds_the_log_as_it_is_after_its_claim() {
    let s = setup().await;
    let m = s
        .orphan("q", |m| {
            vec![text_step(m, "s0", 0, 0), delta("s0", "seen ")]
        })
        .await;
    // A subscriber on the reaper's replica: its mirror has what was published.
    let mirror = s.store.open_log(&m.stream_id).await.unwrap().unwrap();
    assert_eq!(mirror.len(), 3);
    append_unpublished(&s, &m, &delta("s0", "unseen"), 3).await;
    s.kill_owner().await;
    assert_eq!(mirror.len(), 3, "the mirror missed the last event");
    assert_eq!(s.manager.reap_orphans().await.unwrap(), 1);
    let events = s.events(&m.stream_id).await;
    let EventBody::Error(end) = &events.last().unwrap().body else {
        panic!("{events:?}")
    };
    assert_eq!(end.code, "replica_lost");
    let partial = end.response_message.as_ref().unwrap();
    assert_eq!(
        partial.text, "seen unseen",
        "the partial answer lacks the last delta"
    );
    let saved =
        s.db.get_message(&m.response_message_id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(&saved, partial);
    // The estimate counted it too: what call 0 streamed.
    let EventBody::Usage(u) = &events[events.len() - 2].body else {
        panic!("{events:?}")
    };
    assert_eq!(
        u.output_tokens,
        count_tokens(None, "seen unseen".to_string()).await
    );
}

fn estimate_of(events: &[Event]) -> Option<UsageRecord> {
    events.iter().rev().skip(1).find_map(|e| match &e.body {
        EventBody::Usage(u) if u.estimated => Some(u.clone()),
        _ => None,
    })
}

/// The call the owner died in is billed once, through the claim: an estimated
/// `usage` event right before the terminal `error`, and the same numbers in the
/// ledger. Its output is what that call streamed (not the whole answer); its input is
/// the prompt it was sent: the persisted history plus the earlier calls' turns and
/// tool results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_bills_the_call_the_owner_died_in() {
    let s = setup().await;
    let args = r#"{"q":"meaning of life"}"#;
    let m = s
        .orphan("What is the answer?", |m| {
            vec![
                text_step(m, "s0", 0, 0),
                delta("s0", "Let me look."),
                tool_step(m, "s1", 0, 1, "search"),
                args_delta("s1", args),
                real_usage(0, 100, 20),
                tool_done("s1", 1, "search", args, "found: 42"),
                text_step(m, "s2", 1, 2),
                delta("s2", "The answer is "),
                delta("s2", "forty-two."),
            ]
        })
        .await;
    s.kill_owner().await;
    assert_eq!(s.manager.reap_orphans().await.unwrap(), 1);
    let events = s.events(&m.stream_id).await;
    let n = events.len();
    assert_eq!(terminal_code(&events).as_deref(), Some("replica_lost"));
    let EventBody::Usage(u) = &events[n - 2].body else {
        panic!(
            "no usage event before the terminal one: {:?}",
            events[n - 2]
        )
    };
    let input = count_tokens(
        None,
        format!("What is the answer?Let me look.{args}found: 42"),
    )
    .await;
    let output = count_tokens(None, "The answer is forty-two.".to_string()).await;
    assert_eq!(
        (u.call_index, u.estimated, u.input_tokens, u.output_tokens),
        (1, true, input, output),
        "{u:?}"
    );
    assert!(output < count_tokens(None, "Let me look.The answer is forty-two.".to_string()).await);
    let report = s.db.usage_report(&m.user_id, None, 10).await.unwrap();
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!(report[0].input_tokens, 100 + input as i64, "{report:?}");
    assert_eq!(report[0].output_tokens, 20 + output as i64, "{report:?}");
    assert_eq!(report[0].calls, 2);
}

/// Where the owner was decides what is estimated: a call before its first delta gets
/// its input alone; so does the call after a retry, and the one after a tool round's
/// results; between a call's usage and its tools' results no call was running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_estimates_a_call_that_streamed_nothing_yet() {
    let s = setup().await;
    let question = "How many moons has Mars?";
    let args = r#"{"planet":"mars"}"#;
    let first_call = s.orphan(question, |_| Vec::new()).await;
    let after_retry = s
        .orphan(question, |m| {
            vec![
                text_step(m, "s0", 0, 0),
                delta("s0", "Mars has"),
                EventBody::Usage(UsageRecord {
                    call_index: 0,
                    model: "demo".into(),
                    input_tokens: 9,
                    output_tokens: 2,
                    estimated: true,
                    ..Default::default()
                }),
                EventBody::Retry(genstream_engine::event::Retry {
                    attempt: 1,
                    max_attempts: 4,
                    delay_ms: 1000,
                    error: "upstream 503".into(),
                    discard_step_ids: vec!["s0".into()],
                }),
            ]
        })
        .await;
    let after_tools = s
        .orphan(question, |m| {
            vec![
                tool_step(m, "s0", 0, 0, "lookup"),
                args_delta("s0", args),
                real_usage(0, 50, 10),
                tool_done("s0", 0, "lookup", args, "two"),
            ]
        })
        .await;
    let tools_running = s
        .orphan(question, |m| {
            vec![
                tool_step(m, "s0", 0, 0, "lookup"),
                args_delta("s0", args),
                real_usage(0, 50, 10),
            ]
        })
        .await;
    s.kill_owner().await;
    assert_eq!(s.manager.reap_orphans().await.unwrap(), 4);
    let q = count_tokens(None, question.to_string()).await;
    let first = estimate_of(&s.events(&first_call.stream_id).await).expect("an estimate");
    assert_eq!(
        (first.call_index, first.input_tokens, first.output_tokens),
        (0, q, 0)
    );
    let retry = estimate_of(&s.events(&after_retry.stream_id).await).expect("an estimate");
    assert_eq!(
        (retry.call_index, retry.input_tokens, retry.output_tokens),
        (1, q, 0),
        "the retried attempt's discarded text is not in the prompt"
    );
    let tools = estimate_of(&s.events(&after_tools.stream_id).await).expect("an estimate");
    assert_eq!(
        (tools.call_index, tools.input_tokens, tools.output_tokens),
        (
            1,
            count_tokens(None, format!("{question}{args}two")).await,
            0
        )
    );
    let events = s.events(&tools_running.stream_id).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(&e.body, EventBody::Usage(u) if u.estimated)),
        "no call was running while its tools ran: {events:?}"
    );
    for m in [&first_call, &after_retry, &after_tools] {
        let report = s.db.usage_report(&m.user_id, None, 10).await.unwrap();
        assert!(report[0].input_tokens > 0, "spent: {report:?}");
    }
}
