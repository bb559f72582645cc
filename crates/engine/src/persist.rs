//! Persistence of conversations and messages, behind a trait so SQLite and PostgreSQL
//! (crate `genstream-sql`) and the in-memory test double share one contract.
//!
//! The engine decides what to write and when (SPEC §4's ordering rules); an
//! implementation only stores what it is given. Every write is an upsert keyed by id,
//! so a repeated write (a retried abort, a reaper racing the owner) is harmless.

use std::collections::HashMap;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::EngineError;
use crate::event::Message;

/// A conversation's row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    pub conversation_id: String,
    /// The owner (JWT `sub`).
    pub user_id: String,
    /// The first 50 characters of the first message.
    pub title: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; bumped by every saved message.
    pub updated_at: String,
}

/// Storage of conversations and message trees.
///
/// Errors: [`EngineError::Persistence`] when the database fails.
#[async_trait]
pub trait Persistence: Send + Sync + 'static {
    /// Inserts the conversation, or, if it exists, sets only `updated_at` (the owner,
    /// title and creation time of a conversation never change).
    async fn save_conversation(&self, conversation: &Conversation) -> Result<(), EngineError>;
    /// The conversation, if it exists.
    async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, EngineError>;
    /// The user's conversations, most recently updated first.
    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>, EngineError>;
    /// Deletes the conversation and its messages; false if it did not exist.
    async fn delete_conversation(&self, id: &str) -> Result<bool, EngineError>;
    /// Inserts or replaces the message with this `messageId`.
    async fn save_message(&self, message: &Message) -> Result<(), EngineError>;
    /// The message, if it exists.
    async fn get_message(&self, id: &str) -> Result<Option<Message>, EngineError>;
    /// The conversation's messages, oldest first (by `createdAt`, then id).
    async fn list_messages(&self, conversation_id: &str) -> Result<Vec<Message>, EngineError>;
    /// Stores `candidate` under `name` unless a value is already there, and returns the
    /// value that is (so concurrent replicas agree on one). Used for the JWT secret.
    async fn get_or_init_secret(&self, name: &str, candidate: &str) -> Result<String, EngineError>;
    /// Succeeds when the database answers (for `/readyz`).
    async fn ping(&self) -> Result<(), EngineError>;
}

/// An in-memory [`Persistence`], for tests and for the shared test suite's reference.
#[derive(Default)]
pub struct MemoryPersistence {
    inner: Mutex<MemInner>,
}

#[derive(Default)]
struct MemInner {
    conversations: HashMap<String, Conversation>,
    messages: HashMap<String, Message>,
    secrets: HashMap<String, String>,
}

#[async_trait]
impl Persistence for MemoryPersistence {
    async fn save_conversation(&self, c: &Conversation) -> Result<(), EngineError> {
        let mut g = self.inner.lock();
        g.conversations
            .entry(c.conversation_id.clone())
            .and_modify(|e| e.updated_at.clone_from(&c.updated_at))
            .or_insert_with(|| c.clone());
        Ok(())
    }
    async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, EngineError> {
        Ok(self.inner.lock().conversations.get(id).cloned())
    }
    async fn list_conversations(&self, user_id: &str) -> Result<Vec<Conversation>, EngineError> {
        let g = self.inner.lock();
        let mut v: Vec<Conversation> = g
            .conversations
            .values()
            .filter(|c| c.user_id == user_id)
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            b.updated_at
                .cmp(&a.updated_at)
                .then(b.conversation_id.cmp(&a.conversation_id))
        });
        Ok(v)
    }
    async fn delete_conversation(&self, id: &str) -> Result<bool, EngineError> {
        let mut g = self.inner.lock();
        g.messages.retain(|_, m| m.conversation_id != id);
        Ok(g.conversations.remove(id).is_some())
    }
    async fn save_message(&self, m: &Message) -> Result<(), EngineError> {
        self.inner
            .lock()
            .messages
            .insert(m.message_id.clone(), m.clone());
        Ok(())
    }
    async fn get_message(&self, id: &str) -> Result<Option<Message>, EngineError> {
        Ok(self.inner.lock().messages.get(id).cloned())
    }
    async fn list_messages(&self, conversation_id: &str) -> Result<Vec<Message>, EngineError> {
        let g = self.inner.lock();
        let mut v: Vec<Message> = g
            .messages
            .values()
            .filter(|m| m.conversation_id == conversation_id)
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.message_id.cmp(&b.message_id))
        });
        Ok(v)
    }
    async fn get_or_init_secret(&self, name: &str, candidate: &str) -> Result<String, EngineError> {
        Ok(self
            .inner
            .lock()
            .secrets
            .entry(name.to_string())
            .or_insert_with(|| candidate.to_string())
            .clone())
    }
    async fn ping(&self) -> Result<(), EngineError> {
        Ok(())
    }
}
