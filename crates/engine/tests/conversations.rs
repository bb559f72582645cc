//! Deleting a conversation against a chat starting in it (`manager/conversations.rs`):
//! on one replica either the delete is refused (the job runs) or the start fails
//! cleanly (no conversation); across replicas the database refuses a job's writes into
//! a deleted conversation. Never a job writing into a deleted conversation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::EngineError;
use genstream_engine::event::{EventBody, Message};
use genstream_engine::log::LogLimits;
use genstream_engine::manager::{JobManager, ManagerConfig, ModelEntry, StartRequest};
use genstream_engine::persist::{Conversation, MemoryPersistence, Persistence};
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderEvent, ProviderStream,
};
use genstream_engine::store::{JobStore, MemoryStore};
use tokio_util::sync::CancellationToken;

/// Answers one word, or (`hang`) one word and then nothing until cancelled.
struct Word {
    hang: bool,
}

#[async_trait]
impl Provider for Word {
    fn kind(&self) -> &str {
        "script"
    }
    async fn stream(
        &self,
        _req: ModelRequest,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let word = futures::stream::iter([Ok(ProviderEvent::Text("word".into()))]);
        if self.hang {
            Ok(word.chain(futures::stream::pending()).boxed())
        } else {
            Ok(word.boxed())
        }
    }
}

fn manager(store: Arc<dyn JobStore>, db: Arc<MemoryPersistence>) -> JobManager {
    let models = vec![
        ModelEntry::new("hang", Arc::new(Word { hang: true })),
        ModelEntry::new("word", Arc::new(Word { hang: false })),
    ];
    JobManager::new(
        store,
        db as Arc<dyn Persistence>,
        models,
        ManagerConfig::default(),
    )
}

fn memory_store() -> Arc<dyn JobStore> {
    Arc::new(MemoryStore::new(LogLimits::default()))
}

/// A conversation of alice's with one earlier user message.
async fn seed(db: &MemoryPersistence, id: &str) {
    let at = genstream_engine::now_rfc3339();
    db.save_conversation(&Conversation {
        conversation_id: id.into(),
        user_id: "alice".into(),
        title: "t".into(),
        created_at: at.clone(),
        updated_at: at.clone(),
    })
    .await
    .unwrap();
    db.save_message(&Message {
        message_id: format!("{id}-first"),
        conversation_id: id.into(),
        parent_message_id: None,
        sender: "User".into(),
        text: "first".into(),
        content: Vec::new(),
        is_created_by_user: true,
        model: None,
        unfinished: false,
        error: false,
        created_at: at,
    })
    .await
    .unwrap();
}

fn chat(conversation_id: &str, model: &str) -> StartRequest {
    StartRequest {
        user_id: "alice".into(),
        text: "hello".into(),
        conversation_id: Some(conversation_id.into()),
        model: Some(model.into()),
        ..Default::default()
    }
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

/// One replica, 300 races of a delete against a start whose job keeps running: the
/// delete is refused (`ConversationBusy`, 409) and the conversation keeps both
/// messages, or the start fails (`NotFound`) and nothing of the conversation is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_racing_start_on_one_replica_is_refused_or_wins_cleanly() {
    let db = Arc::new(MemoryPersistence::default());
    let store = memory_store();
    let m = manager(store.clone(), db.clone());
    let (mut refused, mut deleted) = (0, 0);
    for round in 0..300 {
        let cid = format!("c{round}");
        seed(&db, &cid).await;
        let start = tokio::spawn({
            let m = m.clone();
            let cid = cid.clone();
            async move { m.start(chat(&cid, "hang")).await }
        });
        let delete = tokio::spawn({
            let m = m.clone();
            let cid = cid.clone();
            async move { m.delete_conversation("alice", &cid).await }
        });
        let (start, delete) = (start.await.unwrap(), delete.await.unwrap());
        match (start, delete) {
            (Ok(started), Err(EngineError::ConversationBusy(_))) => {
                refused += 1;
                let out = m.abort("alice", &started.stream_id).await.unwrap();
                assert!(out.response_message.unfinished);
                let texts: Vec<String> = db
                    .list_messages(&cid)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|m| m.text)
                    .collect();
                assert_eq!(texts.len(), 3, "round {round}: {texts:?}");
            }
            (Err(EngineError::NotFound(_)), Ok(true)) => {
                deleted += 1;
                assert_eq!(store.latest_job(&cid).await.unwrap(), None);
            }
            (s, d) => panic!("round {round}: start {s:?}, delete {d:?}"),
        }
    }
    m.wait_idle().await;
    // Nothing was written after a delete: a deleted conversation has no row and no
    // message, whatever ran.
    for round in 0..300 {
        let cid = format!("c{round}");
        if db.get_conversation(&cid).await.unwrap().is_none() {
            assert!(db.list_messages(&cid).await.unwrap().is_empty(), "{cid}");
        }
    }
    assert_eq!(refused + deleted, 300);
    println!("refused {refused}, deleted {deleted}");
}

/// Two replicas with separate job stores and one database (the delete's replica
/// cannot see the other's job): 200 races of a delete on one against a start on the
/// other. The delete always wins; the start fails, or its job ends with `error`
/// `conversation_deleted`; either way nothing of the conversation is left in the
/// database once the job is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_on_another_replica_never_writes_into_a_deleted_conversation() {
    let db = Arc::new(MemoryPersistence::default());
    let (store_a, store_b) = (memory_store(), memory_store());
    let a = manager(store_a.clone(), db.clone());
    let b = manager(store_b, db.clone());
    let mut refused_at_end = 0;
    for round in 0..200 {
        let cid = format!("x{round}");
        seed(&db, &cid).await;
        let start = tokio::spawn({
            let a = a.clone();
            let cid = cid.clone();
            async move { a.start(chat(&cid, "word")).await }
        });
        let delete = tokio::spawn({
            let b = b.clone();
            let cid = cid.clone();
            async move { b.delete_conversation("alice", &cid).await }
        });
        let (start, delete) = (start.await.unwrap(), delete.await.unwrap());
        assert!(delete.unwrap(), "round {round}");
        match start {
            Ok(started) => match terminal(&store_a, &started.stream_id).await {
                EventBody::Error(e) if e.code == "conversation_deleted" => {
                    assert!(e.response_message.is_none());
                    refused_at_end += 1;
                }
                // The job completed before the delete; the delete took it all.
                EventBody::Final(_) => {}
                other => panic!("round {round}: {other:?}"),
            },
            Err(EngineError::NotFound(_)) => {}
            Err(e) => panic!("round {round}: {e:?}"),
        }
        a.wait_idle().await;
        assert_eq!(db.get_conversation(&cid).await.unwrap(), None, "{cid}");
        assert!(db.list_messages(&cid).await.unwrap().is_empty(), "{cid}");
    }
    println!("{refused_at_end} jobs found their conversation deleted");
}
