//! The caller's conversations, messages and usage, as the HTTP routes serve them:
//! ownership is checked here, once, and a delete is atomic against a chat starting in
//! the same conversation.
//!
//! Delete against start. On this replica both hold the conversation (a per-conversation
//! async lock, [`ConversationLocks`]): a start from its lookup of the conversation
//! until its job is in the store, a delete from its check for a running job until the
//! rows are gone. So a delete either finds the job running (`ConversationBusy`, 409)
//! or deletes first and the start finds no conversation (`NotFound`, 404). A start on
//! another replica is not held by this lock; there the database decides: every
//! message of a job is saved with [`Persistence::add_message`], which writes only into
//! a conversation that exists, serialized with the delete on the conversation's row.
//! Such a start fails when its user message is refused, and a job already running
//! ends with `error` `conversation_deleted` without saving anything.

use std::collections::hash_map::Entry;

use super::*;
use crate::persist::UsageRow;

/// Per-conversation locks of this replica; an entry lives while someone holds or
/// waits for it.
#[derive(Default)]
pub(super) struct ConversationLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held conversation; released when dropped.
pub(super) struct HeldConversation<'a> {
    locks: &'a ConversationLocks,
    id: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ConversationLocks {
    /// Waits until nobody else on this replica holds conversation `id`, and holds it.
    pub(super) async fn hold(&self, id: &str) -> HeldConversation<'_> {
        let lock = self.locks.lock().entry(id.to_string()).or_default().clone();
        HeldConversation {
            locks: self,
            id: id.to_string(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for HeldConversation<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.locks.lock();
        if let Entry::Occupied(e) = map.entry(std::mem::take(&mut self.id))
            // The map's handle and our guard's: nobody else holds or waits.
            && Arc::strong_count(e.get()) == 2
        {
            e.remove();
        }
        // Released under the map's lock, so a newcomer finds either this entry (and
        // waits for it) or none (and makes one nobody else holds).
        self.guard.take();
    }
}

impl JobManager {
    /// The caller's conversation.
    ///
    /// Errors: `NotFound`, `Forbidden` (another user's); database failures.
    pub async fn own_conversation(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Conversation, EngineError> {
        match self.inner.ctx.db.get_conversation(conversation_id).await? {
            None => Err(EngineError::NotFound(format!(
                "conversation {conversation_id}"
            ))),
            Some(c) if c.user_id != user_id => Err(EngineError::Forbidden(format!(
                "conversation {conversation_id}"
            ))),
            Some(c) => Ok(c),
        }
    }

    /// The caller's conversations, most recently updated first.
    ///
    /// Errors: database failures.
    pub async fn conversations(&self, user_id: &str) -> Result<Vec<Conversation>, EngineError> {
        self.inner.ctx.db.list_conversations(user_id).await
    }

    /// The messages of the caller's conversation, oldest first.
    ///
    /// Errors: as [`JobManager::own_conversation`].
    pub async fn messages(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Vec<Message>, EngineError> {
        self.own_conversation(user_id, conversation_id).await?;
        self.inner.ctx.db.list_messages(conversation_id).await
    }

    /// Deletes the caller's conversation and its messages; atomic against a chat
    /// starting in it (see the module's documentation). True if it existed.
    ///
    /// Errors: `ConversationBusy` while a job of it runs (abort first);
    /// `NotFound`, `Forbidden`; store and database failures.
    pub async fn delete_conversation(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<bool, EngineError> {
        let _held = self.inner.conversations.hold(conversation_id).await;
        self.own_conversation(user_id, conversation_id).await?;
        if let Some(meta) = self.inner.ctx.store.latest_job(conversation_id).await?
            && meta.status == JobStatus::Running
        {
            return Err(EngineError::ConversationBusy(conversation_id.to_string()));
        }
        self.inner.ctx.db.delete_conversation(conversation_id).await
    }

    /// The caller's tokens and credits, grouped by conversation (`period` `None`),
    /// `"day"` or `"month"`; at most `limit` rows.
    ///
    /// Errors: database failures.
    pub async fn usage_report(
        &self,
        user_id: &str,
        period: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRow>, EngineError> {
        self.inner.ctx.db.usage_report(user_id, period, limit).await
    }

    /// Brings this replica's copy of a job's log up to the store's head
    /// ([`EventLogStore::sync_log`](crate::store::EventLogStore::sync_log)): a cursor a client got from a faster replica may be
    /// past this one's mirror.
    ///
    /// Errors: store failures.
    pub async fn catch_up(&self, stream_id: &str) -> Result<(), EngineError> {
        Ok(self.inner.ctx.store.sync_log(stream_id).await?)
    }

    /// The user an API key (its SHA-256, lowercase hex) acts as, if it is valid;
    /// records the use at `now` (RFC 3339) — see [`Persistence::authenticate_api_key`].
    ///
    /// Errors: database failures.
    pub async fn authenticate_api_key(
        &self,
        hash: &str,
        now: &str,
    ) -> Result<Option<String>, EngineError> {
        self.inner.ctx.db.authenticate_api_key(hash, now).await
    }

    /// Whether the job store and the database answer (for `/readyz`): each one's
    /// error, if any.
    pub async fn readiness(&self) -> (Result<(), EngineError>, Result<(), EngineError>) {
        let (store, db) = tokio::join!(self.inner.ctx.store.ping(), self.inner.ctx.db.ping());
        (store.map_err(EngineError::from), db)
    }
}
