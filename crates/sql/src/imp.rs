//! What the two implementations share: the SQL, the `Persistence` body and error
//! mapping.
//!
//! The SQL below runs unchanged on SQLite (3.24+) and PostgreSQL, so
//! [`impl_persistence!`] stamps out the same trait body for `SqlitePool` and `PgPool`.
//! A macro rather than generic code over `sqlx::Database`: the generic version needs a
//! wall of `for<'r> T: Decode<'r, DB> + Type<DB>` bounds that hides the queries,
//! while the macro's expansion is ordinary code for one concrete pool.

use genstream_engine::EngineError;

pub(crate) const UPSERT_CONVERSATION: &str = "\
INSERT INTO conversations (conversation_id, user_id, title, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (conversation_id) DO UPDATE SET updated_at = excluded.updated_at";

pub(crate) const GET_CONVERSATION: &str = "\
SELECT conversation_id, user_id, title, created_at, updated_at
FROM conversations WHERE conversation_id = $1";

pub(crate) const LIST_CONVERSATIONS: &str = "\
SELECT conversation_id, user_id, title, created_at, updated_at
FROM conversations WHERE user_id = $1
ORDER BY updated_at DESC, conversation_id DESC";

pub(crate) const DELETE_MESSAGES_OF: &str = "DELETE FROM messages WHERE conversation_id = $1";

pub(crate) const DELETE_CONVERSATION: &str = "DELETE FROM conversations WHERE conversation_id = $1";

/// Replaces every column the `Message` carries. `user_id` is not part of a `Message`:
/// it is copied from the conversation when that row exists, and otherwise an earlier
/// copy is kept.
pub(crate) const UPSERT_MESSAGE: &str = "\
INSERT INTO messages (message_id, conversation_id, parent_message_id, user_id, sender, text,
                      content, is_created_by_user, model, unfinished, error, created_at)
VALUES ($1, $2, $3, (SELECT c.user_id FROM conversations c WHERE c.conversation_id = $2),
        $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (message_id) DO UPDATE SET
    conversation_id = excluded.conversation_id,
    parent_message_id = excluded.parent_message_id,
    user_id = COALESCE(excluded.user_id, messages.user_id),
    sender = excluded.sender,
    text = excluded.text,
    content = excluded.content,
    is_created_by_user = excluded.is_created_by_user,
    model = excluded.model,
    unfinished = excluded.unfinished,
    error = excluded.error,
    created_at = excluded.created_at";

pub(crate) const GET_MESSAGE: &str = "\
SELECT message_id, conversation_id, parent_message_id, sender, text, content,
       is_created_by_user, model, unfinished, error, created_at
FROM messages WHERE message_id = $1";

pub(crate) const LIST_MESSAGES: &str = "\
SELECT message_id, conversation_id, parent_message_id, sender, text, content,
       is_created_by_user, model, unfinished, error, created_at
FROM messages WHERE conversation_id = $1
ORDER BY created_at, message_id";

/// First writer wins; later candidates are dropped and everyone reads the winner.
pub(crate) const INSERT_SECRET: &str =
    "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";

pub(crate) const GET_SECRET: &str = "SELECT value FROM secrets WHERE name = $1";

/// Maps a database failure during `what` ("saving message m1") to the engine's error.
pub(crate) fn db_error(what: &str, err: sqlx::Error) -> EngineError {
    EngineError::Persistence(format!("{what}: {}", describe(&err)))
}

/// sqlx's message for `err`, shortened where sqlx adds only noise.
pub(crate) fn describe(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Io(e) => e.to_string(),
        sqlx::Error::Database(e) => e.message().to_string(),
        other => other.to_string(),
    }
}

/// Decodes a message's `content` column.
pub(crate) fn parse_content(
    message_id: &str,
    json: &str,
) -> Result<Vec<genstream_engine::event::ContentPart>, EngineError> {
    serde_json::from_str(json).map_err(|e| {
        EngineError::Persistence(format!(
            "message {message_id}: stored content is not a valid content array: {e}"
        ))
    })
}

/// Encodes a message's `content` column.
pub(crate) fn content_json(
    message: &genstream_engine::event::Message,
) -> Result<String, EngineError> {
    serde_json::to_string(&message.content).map_err(|e| {
        EngineError::Internal(format!(
            "message {}: content cannot be serialized: {e}",
            message.message_id
        ))
    })
}

/// Implements `Persistence` for `$ty`, a struct with a `pool` field (a sqlx pool) whose
/// rows are `$row`.
macro_rules! impl_persistence {
    ($ty:ty, $row:ty) => {
        impl $ty {
            fn conversation_from_row(
                row: &$row,
            ) -> Result<genstream_engine::persist::Conversation, sqlx::Error> {
                use sqlx::Row as _;
                Ok(genstream_engine::persist::Conversation {
                    conversation_id: row.try_get("conversation_id")?,
                    user_id: row.try_get("user_id")?,
                    title: row.try_get("title")?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                })
            }

            fn message_from_row(
                row: &$row,
            ) -> Result<genstream_engine::event::Message, genstream_engine::EngineError> {
                use sqlx::Row as _;
                let decode = |e| $crate::imp::db_error("reading message", e);
                let message_id: String = row.try_get("message_id").map_err(decode)?;
                let content: String = row.try_get("content").map_err(decode)?;
                Ok(genstream_engine::event::Message {
                    content: $crate::imp::parse_content(&message_id, &content)?,
                    message_id,
                    conversation_id: row.try_get("conversation_id").map_err(decode)?,
                    parent_message_id: row.try_get("parent_message_id").map_err(decode)?,
                    sender: row.try_get("sender").map_err(decode)?,
                    text: row.try_get("text").map_err(decode)?,
                    is_created_by_user: row.try_get("is_created_by_user").map_err(decode)?,
                    model: row.try_get("model").map_err(decode)?,
                    unfinished: row.try_get("unfinished").map_err(decode)?,
                    error: row.try_get("error").map_err(decode)?,
                    created_at: row.try_get("created_at").map_err(decode)?,
                })
            }
        }

        #[async_trait::async_trait]
        impl genstream_engine::persist::Persistence for $ty {
            async fn save_conversation(
                &self,
                c: &genstream_engine::persist::Conversation,
            ) -> Result<(), genstream_engine::EngineError> {
                sqlx::query($crate::imp::UPSERT_CONVERSATION)
                    .bind(&c.conversation_id)
                    .bind(&c.user_id)
                    .bind(&c.title)
                    .bind(&c.created_at)
                    .bind(&c.updated_at)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| {
                        $crate::imp::db_error(
                            &format!("saving conversation {}", c.conversation_id),
                            e,
                        )
                    })?;
                Ok(())
            }

            async fn get_conversation(
                &self,
                id: &str,
            ) -> Result<
                Option<genstream_engine::persist::Conversation>,
                genstream_engine::EngineError,
            > {
                let what = || format!("reading conversation {id}");
                let row = sqlx::query($crate::imp::GET_CONVERSATION)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                row.map(|r| Self::conversation_from_row(&r))
                    .transpose()
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn list_conversations(
                &self,
                user_id: &str,
            ) -> Result<Vec<genstream_engine::persist::Conversation>, genstream_engine::EngineError>
            {
                let what = || format!("listing conversations of {user_id}");
                let rows = sqlx::query($crate::imp::LIST_CONVERSATIONS)
                    .bind(user_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                rows.iter()
                    .map(Self::conversation_from_row)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn delete_conversation(
                &self,
                id: &str,
            ) -> Result<bool, genstream_engine::EngineError> {
                let what = || format!("deleting conversation {id}");
                let err = |e| $crate::imp::db_error(&what(), e);
                let mut tx = self.pool.begin().await.map_err(err)?;
                sqlx::query($crate::imp::DELETE_MESSAGES_OF)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                let deleted = sqlx::query($crate::imp::DELETE_CONVERSATION)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?
                    .rows_affected();
                tx.commit().await.map_err(err)?;
                Ok(deleted > 0)
            }

            async fn save_message(
                &self,
                m: &genstream_engine::event::Message,
            ) -> Result<(), genstream_engine::EngineError> {
                let content = $crate::imp::content_json(m)?;
                sqlx::query($crate::imp::UPSERT_MESSAGE)
                    .bind(&m.message_id)
                    .bind(&m.conversation_id)
                    .bind(&m.parent_message_id)
                    .bind(&m.sender)
                    .bind(&m.text)
                    .bind(content)
                    .bind(m.is_created_by_user)
                    .bind(&m.model)
                    .bind(m.unfinished)
                    .bind(m.error)
                    .bind(&m.created_at)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| {
                        $crate::imp::db_error(&format!("saving message {}", m.message_id), e)
                    })?;
                Ok(())
            }

            async fn get_message(
                &self,
                id: &str,
            ) -> Result<Option<genstream_engine::event::Message>, genstream_engine::EngineError>
            {
                let row = sqlx::query($crate::imp::GET_MESSAGE)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&format!("reading message {id}"), e))?;
                row.map(|r| Self::message_from_row(&r)).transpose()
            }

            async fn list_messages(
                &self,
                conversation_id: &str,
            ) -> Result<Vec<genstream_engine::event::Message>, genstream_engine::EngineError> {
                let rows = sqlx::query($crate::imp::LIST_MESSAGES)
                    .bind(conversation_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| {
                        $crate::imp::db_error(&format!("listing messages of {conversation_id}"), e)
                    })?;
                rows.iter().map(Self::message_from_row).collect()
            }

            async fn get_or_init_secret(
                &self,
                name: &str,
                candidate: &str,
            ) -> Result<String, genstream_engine::EngineError> {
                use sqlx::Row as _;
                let what = || format!("initializing secret {name}");
                sqlx::query($crate::imp::INSERT_SECRET)
                    .bind(name)
                    .bind(candidate)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                let row = sqlx::query($crate::imp::GET_SECRET)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                match row {
                    Some(row) => row
                        .try_get("value")
                        .map_err(|e| $crate::imp::db_error(&what(), e)),
                    // Only if someone deleted it between our two statements.
                    None => Err(genstream_engine::EngineError::Persistence(format!(
                        "{}: the row vanished after being written",
                        what()
                    ))),
                }
            }

            async fn ping(&self) -> Result<(), genstream_engine::EngineError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error("ping", e))?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_persistence;
