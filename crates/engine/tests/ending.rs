//! One way to end a job: the reaper's partial message for a log is the owner's for
//! the same log (tool calls paired with the cancelled result, the conversation saved),
//! because both go through the same ending (`manager/ending.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::event::{ContentPart, EventBody, Message};
use genstream_engine::log::LogLimits;
use genstream_engine::manager::{JobManager, ManagerConfig, ModelEntry, StartRequest};
use genstream_engine::persist::{MemoryPersistence, Persistence};
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream,
};
use genstream_engine::store::{JobStore, MemoryStore};
use tokio_util::sync::CancellationToken;

/// Streams some text and the first fragment of a tool call, then fails for good
/// (an in-stream error with no status: not retryable).
struct CutInATool;

#[async_trait]
impl Provider for CutInATool {
    fn kind(&self) -> &str {
        "script"
    }
    async fn stream(
        &self,
        _req: ModelRequest,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let events = vec![
            Ok(ProviderEvent::Text("Let me compute ".into())),
            Ok(ProviderEvent::ToolCall {
                index: 0,
                id: Some("call_1".into()),
                name: Some("calculator".into()),
                args: "{\"expression\":\"2+".into(),
            }),
            Err(ProviderError::new(ProviderErrorKind::Upstream, "gone")),
        ];
        Ok(futures::stream::iter(events).boxed())
    }
}

struct Replica {
    manager: JobManager,
    store: Arc<dyn JobStore>,
    db: Arc<MemoryPersistence>,
}

fn replica() -> Replica {
    let db = Arc::new(MemoryPersistence::default());
    let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(LogLimits::default()));
    let manager = JobManager::new(
        store.clone(),
        db.clone() as Arc<dyn Persistence>,
        vec![ModelEntry::new("cut", Arc::new(CutInATool))],
        ManagerConfig::default(),
    );
    Replica { manager, store, db }
}

async fn terminal(store: &Arc<dyn JobStore>, stream_id: &str) -> EventBody {
    let log = store.open_log(stream_id).await.unwrap().unwrap();
    let mut rx = log.watch();
    loop {
        rx.borrow_and_update();
        if let Some(e) = log.terminal_event() {
            return e.body;
        }
        rx.changed().await.unwrap();
    }
}

/// The message without its save time.
fn comparable(m: &Message) -> Message {
    Message {
        created_at: String::new(),
        ..m.clone()
    }
}

#[tokio::test]
async fn the_reapers_partial_message_is_the_owners_for_the_same_log() {
    // The owner: its call is cut off in a tool call; it saves the partial answer.
    let owner = replica();
    let started = owner
        .manager
        .start(StartRequest {
            user_id: "alice".into(),
            text: "what is 2+2?".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let EventBody::Error(owner_end) = terminal(&owner.store, &started.stream_id).await else {
        panic!("the owner ends with an error")
    };
    assert_eq!(owner_end.code, "upstream_error");
    let owners = owner
        .db
        .get_message(&started.response_message_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(&owners), owner_end.response_message.as_ref());

    // The same log up to where the owner stopped generating (its `usage` event,
    // before it closed the open call), in a store whose job nobody runs: the reaper
    // ends it.
    let log = owner
        .store
        .open_log(&started.stream_id)
        .await
        .unwrap()
        .unwrap();
    let events: Vec<genstream_engine::event::Event> = log
        .read_after(None, usize::MAX)
        .frames
        .iter()
        .map(|f| serde_json::from_slice(f.data_json()).unwrap())
        .collect();
    let cut = events
        .iter()
        .position(|e| matches!(e.body, EventBody::RunStepCompleted(_)))
        .expect("the owner closed the open tool call");
    assert!(matches!(events[cut - 1].body, EventBody::Usage(_)));

    let reaper = replica();
    let meta = owner
        .store
        .get_job(&started.stream_id)
        .await
        .unwrap()
        .unwrap();
    let conversation = owner
        .db
        .get_conversation(&started.conversation_id)
        .await
        .unwrap()
        .unwrap();
    let user_message = owner
        .db
        .get_message(&started.user_message_id)
        .await
        .unwrap()
        .unwrap();
    reaper.db.save_conversation(&conversation).await.unwrap();
    reaper.db.save_message(&user_message).await.unwrap();
    reaper
        .store
        .create_job(&genstream_engine::store::JobMeta {
            status: genstream_engine::store::JobStatus::Running,
            ..meta
        })
        .await
        .unwrap();
    for e in &events[..cut] {
        reaper
            .store
            .append(&started.stream_id, &e.body, None)
            .await
            .unwrap();
    }
    assert_eq!(reaper.manager.reap_orphans().await.unwrap(), 1);
    let EventBody::Error(reaper_end) = terminal(&reaper.store, &started.stream_id).await else {
        panic!("the reaper ends with an error")
    };
    assert_eq!(reaper_end.code, "store_unavailable");
    let reapers = reaper
        .db
        .get_message(&started.response_message_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(&reapers), reaper_end.response_message.as_ref());

    // The same message: text, the tool call paired with the cancelled result, flags.
    assert_eq!(comparable(&reapers), comparable(&owners));
    let calls: Vec<_> = reapers
        .content
        .iter()
        .filter_map(|p| match p {
            ContentPart::ToolCall { tool_call } => Some(tool_call),
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].args, "{\"expression\":\"2+");
    assert_eq!(
        calls[0].output.as_deref(),
        Some(genstream_engine::tools::cancelled_result().as_str())
    );
    assert!(reapers.unfinished && reapers.error);
    // The conversation was saved with it, as the owner saves it.
    for (db, msg) in [(&owner.db, &owners), (&reaper.db, &reapers)] {
        let c = db
            .get_conversation(&started.conversation_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.updated_at, msg.created_at);
    }
}

/// Ends its stream at once, without a finish, after stopping the job from outside
/// (the stall reaper, with a zero stall timeout) in the very poll: as a provider does
/// when the job's token is cancelled between the job's check of its token and its
/// poll of the stream.
struct StopsTheJob {
    manager: Arc<std::sync::OnceLock<JobManager>>,
}

#[async_trait]
impl Provider for StopsTheJob {
    fn kind(&self) -> &str {
        "script"
    }
    async fn stream(
        &self,
        _req: ModelRequest,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let manager = self.manager.clone();
        Ok(futures::stream::poll_fn(move |_| {
            assert_eq!(manager.get().unwrap().reap_stalled(), 1);
            std::task::Poll::Ready(None)
        })
        .boxed())
    }
}

/// A stream that ends because the job was stopped is the stop, not a complete answer,
/// even when the stop lands between the job's check of its token and its read of the
/// stream.
#[tokio::test]
async fn a_stream_ended_by_a_stop_is_the_stop_not_an_answer() {
    let cell = Arc::new(std::sync::OnceLock::new());
    let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(LogLimits::default()));
    let manager = JobManager::new(
        store.clone(),
        Arc::new(MemoryPersistence::default()),
        vec![ModelEntry::new(
            "stops",
            Arc::new(StopsTheJob {
                manager: cell.clone(),
            }),
        )],
        ManagerConfig {
            stall_timeout: std::time::Duration::ZERO,
            ..ManagerConfig::default()
        },
    );
    assert!(cell.set(manager.clone()).is_ok());
    let started = manager
        .start(StartRequest {
            user_id: "alice".into(),
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    match terminal(&store, &started.stream_id).await {
        EventBody::Error(e) => assert_eq!(e.code, "stalled"),
        other => panic!("ended as {other:?}"),
    }
}
