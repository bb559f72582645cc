//! What the two implementations share: the SQL, the `Persistence` body and error
//! mapping.
//!
//! The SQL below runs unchanged on SQLite (3.35+ for `RETURNING`; sqlx bundles a
//! newer one) and PostgreSQL, so [`impl_persistence!`] stamps out the same trait body
//! for `SqlitePool` and `PgPool`.
//! A macro rather than generic code over `sqlx::Database`: the generic version needs a
//! wall of `for<'r> T: Decode<'r, DB> + Type<DB>` bounds that hides the queries,
//! while the macro's expansion is ordinary code for one concrete pool.

use genstream_engine::EngineError;
use genstream_engine::error::Caused;

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

/// The first step of `add_message`: bumps the conversation's `updated_at` and, in
/// PostgreSQL, locks its row until the transaction ends; no row means it was deleted.
pub(crate) const TOUCH_CONVERSATION: &str =
    "UPDATE conversations SET updated_at = $2 WHERE conversation_id = $1";

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

/// Records one ledger line unless its `(stream_id, call_index, token_type)` is already
/// there; `rows_affected` says which. Under concurrency PostgreSQL makes a second
/// inserter of the same key wait for the first to commit, then skip.
pub(crate) const INSERT_LINE: &str = "\
INSERT INTO transactions (user_id, conversation_id, stream_id, message_id, model, call_index,
                          token_type, tokens, rate_micro, amount_micro, estimated, context,
                          created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (stream_id, call_index, token_type) DO NOTHING";

/// Takes `$2` off the balance (no row: nothing, and no row returned).
pub(crate) const CHARGE_BALANCE: &str = "\
UPDATE balances SET balance_micro = balance_micro - $2, updated_at = $3
WHERE user_id = $1
RETURNING balance_micro";

pub(crate) const GET_BALANCE_MICRO: &str = "SELECT balance_micro FROM balances WHERE user_id = $1";

pub(crate) const GET_BALANCE: &str = "\
SELECT user_id, balance_micro, refilled_at, updated_at FROM balances WHERE user_id = $1";

/// First writer wins; everyone then reads the row.
pub(crate) const ENSURE_BALANCE: &str = "\
INSERT INTO balances (user_id, balance_micro, refilled_at, updated_at)
VALUES ($1, $2, $3, $3)
ON CONFLICT (user_id) DO NOTHING";

/// One statement, so concurrent grants add up. `$3` is the start balance plus `$2`,
/// what a new user's row starts at (refilled now, as `ENSURE_BALANCE` makes it).
pub(crate) const ADD_CREDITS: &str = "\
INSERT INTO balances (user_id, balance_micro, refilled_at, updated_at)
VALUES ($1, $3, $4, $4)
ON CONFLICT (user_id) DO UPDATE SET
    balance_micro = balances.balance_micro + $2,
    updated_at = excluded.updated_at
RETURNING balance_micro";

/// Atomic test-and-set: of concurrent refills, the first sets `refilled_at` to `$3`;
/// the others then find the row no longer due (PostgreSQL re-checks the `WHERE` on the
/// row it waited for; SQLite runs one writer at a time) and update nothing.
pub(crate) const REFILL_IF_DUE: &str = "\
UPDATE balances SET balance_micro = balance_micro + $2, refilled_at = $3, updated_at = $3
WHERE user_id = $1 AND (refilled_at IS NULL OR refilled_at <= $4)
RETURNING balance_micro";

/// A usage report's SQL, grouped by `$key` and ordered by `$order`; `$1` the user,
/// `$2` the limit. `SUM` of BIGINT is NUMERIC in PostgreSQL, hence the casts back.
macro_rules! usage_sql {
    ($key:literal, $order:literal) => {
        concat!(
            "SELECT ",
            $key,
            " AS grp,
    CAST(SUM(CASE WHEN token_type = 'input' THEN tokens ELSE 0 END) AS BIGINT)
        AS input_tokens,
    CAST(SUM(CASE WHEN token_type = 'output' THEN tokens ELSE 0 END) AS BIGINT)
        AS output_tokens,
    CAST(SUM(CASE WHEN token_type = 'reasoning' THEN tokens ELSE 0 END) AS BIGINT)
        AS reasoning_tokens,
    CAST(SUM(CASE WHEN token_type = 'cache_write' THEN tokens ELSE 0 END) AS BIGINT)
        AS cache_write_tokens,
    CAST(SUM(CASE WHEN token_type = 'cache_read' THEN tokens ELSE 0 END) AS BIGINT)
        AS cache_read_tokens,
    CAST(SUM(amount_micro) AS BIGINT) AS amount_micro,
    COUNT(DISTINCT stream_id || '#' || CAST(call_index AS TEXT)) AS calls
FROM transactions WHERE user_id = $1
GROUP BY grp
ORDER BY ",
            $order,
            "
LIMIT $2"
        )
    };
}

/// Usage by conversation, the most recently charged first.
pub(crate) const USAGE_BY_CONVERSATION: &str =
    usage_sql!("conversation_id", "MAX(created_at) DESC, grp DESC");
/// Usage by UTC day (`created_at` is UTC RFC 3339), the latest first.
pub(crate) const USAGE_BY_DAY: &str =
    usage_sql!("substr(created_at, 1, 10) || 'T00:00:00.000Z'", "grp DESC");
/// Usage by UTC month, the latest first.
pub(crate) const USAGE_BY_MONTH: &str = usage_sql!(
    "substr(created_at, 1, 7) || '-01T00:00:00.000Z'",
    "grp DESC"
);

pub(crate) const SPENT_ON_STREAM: &str = "\
SELECT CAST(COALESCE(SUM(amount_micro), 0) AS BIGINT) AS total
FROM transactions WHERE stream_id = $1";

pub(crate) const INSERT_API_KEY: &str = "\
INSERT INTO api_keys (id, user_id, name, prefix, hash, created_at, last_used_at, revoked_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

pub(crate) const LIST_API_KEYS: &str = "\
SELECT id, user_id, name, prefix, hash, created_at, last_used_at, revoked_at
FROM api_keys WHERE user_id = $1
ORDER BY created_at DESC, id DESC";

/// A key revoked already keeps its first revocation time.
pub(crate) const REVOKE_API_KEY: &str = "\
UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1
RETURNING id, user_id, name, prefix, hash, created_at, last_used_at, revoked_at";

pub(crate) const FIND_API_KEY: &str = "\
SELECT user_id, last_used_at FROM api_keys WHERE hash = $1 AND revoked_at IS NULL";

/// Stamps the use, unless a concurrent request already did in this minute.
pub(crate) const TOUCH_API_KEY: &str = "\
UPDATE api_keys SET last_used_at = $2
WHERE hash = $1 AND (last_used_at IS NULL OR substr(last_used_at, 1, 16) < substr($2, 1, 16))";

/// The report query for `usage_report`'s `by_period`.
pub(crate) fn usage_sql(by_period: Option<&str>) -> Result<&'static str, EngineError> {
    match by_period {
        None => Ok(USAGE_BY_CONVERSATION),
        Some("day") => Ok(USAGE_BY_DAY),
        Some("month") => Ok(USAGE_BY_MONTH),
        Some(other) => Err(EngineError::bad_request(
            "by",
            format!("unknown period {other:?} (expected \"day\" or \"month\")"),
        )),
    }
}

/// How many times `spend` runs its transaction when the database reports a transient
/// conflict (see [`is_transient`]).
pub(crate) const SPEND_ATTEMPTS: u32 = 4;

/// A failure inside a transaction: the database's (perhaps worth a retry) or ours.
pub(crate) enum TxError {
    Db(sqlx::Error),
    Engine(EngineError),
}

impl From<sqlx::Error> for TxError {
    fn from(e: sqlx::Error) -> Self {
        TxError::Db(e)
    }
}

/// Whether a failed transaction may succeed if simply run again: a PostgreSQL deadlock
/// or serialization failure, or SQLite still busy after its busy timeout.
pub(crate) fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(e) => matches!(
            e.code().as_deref(),
            // PostgreSQL: deadlock_detected, serialization_failure.
            Some("40P01") | Some("40001")
            // SQLite: SQLITE_BUSY, SQLITE_LOCKED, SQLITE_BUSY_SNAPSHOT.
            | Some("5") | Some("6") | Some("517")
        ),
        _ => false,
    }
}

/// A line's `tokens` and `call_index` as the ledger's column types (BIGINT, INTEGER).
pub(crate) fn ledger_ints(
    stream_id: &str,
    line: &genstream_engine::ledger::Line,
) -> Result<(i64, i32), EngineError> {
    let tokens = i64::try_from(line.tokens).map_err(|_| {
        EngineError::Internal(
            format!(
                "stream {stream_id}: {} tokens do not fit the ledger",
                line.tokens
            )
            .into(),
        )
    })?;
    let call_index = i32::try_from(line.call_index).map_err(|_| {
        EngineError::Internal(
            format!(
                "stream {stream_id}: call index {} does not fit the ledger",
                line.call_index
            )
            .into(),
        )
    })?;
    Ok((tokens, call_index))
}

/// Maps a database failure during `what` ("saving message m1") to the engine's error.
pub(crate) fn db_error(what: &str, err: sqlx::Error) -> EngineError {
    genstream_engine::metrics::database_error();
    let message = format!("{what}: {}", describe(&err));
    EngineError::Persistence(Box::new(Caused::with_message(message, err)))
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
        EngineError::persistence(
            format!("message {message_id}: stored content is not a valid content array"),
            e,
        )
    })
}

/// Encodes a message's `content` column.
pub(crate) fn content_json(
    message: &genstream_engine::event::Message,
) -> Result<String, EngineError> {
    serde_json::to_string(&message.content).map_err(|e| {
        EngineError::internal(
            format!(
                "message {}: content cannot be serialized",
                message.message_id
            ),
            e,
        )
    })
}

/// Implements `Persistence` for `$ty`, a struct with a `pool` field (a sqlx pool) whose
/// rows are `$row`; `$begin` is the statement that opens a write transaction
/// (SQLite's `BEGIN IMMEDIATE` takes the write lock up front, so a transaction never
/// has to upgrade a read lock, which can fail with `SQLITE_BUSY` whatever the timeout).
macro_rules! impl_persistence {
    ($ty:ty, $row:ty, $begin:expr) => {
        impl $ty {
            /// One attempt at `spend`: one transaction over `lines` (sorted, so that
            /// concurrent spends of overlapping lines take their key locks in the same
            /// order and cannot deadlock in PostgreSQL).
            async fn spend_once(
                &self,
                req: &genstream_engine::persist::SpendRequest,
                lines: &[(&genstream_engine::ledger::Line, i64, i32)],
            ) -> Result<genstream_engine::persist::SpendOutcome, $crate::imp::TxError> {
                use sqlx::Row as _;
                let overflow = || {
                    $crate::imp::TxError::Engine(genstream_engine::EngineError::Persistence(
                        format!("spending on stream {}: amount out of range", req.stream_id).into(),
                    ))
                };
                let mut tx = self.pool.begin_with($begin).await?;
                let mut inserted = 0usize;
                let mut amount: i64 = 0;
                for (line, tokens, call_index) in lines {
                    let done = sqlx::query($crate::imp::INSERT_LINE)
                        .bind(&req.user_id)
                        .bind(&req.conversation_id)
                        .bind(&req.stream_id)
                        .bind(&req.message_id)
                        .bind(&req.model)
                        .bind(*call_index)
                        .bind(line.token_type.as_str())
                        .bind(*tokens)
                        .bind(line.rate_micro)
                        .bind(line.amount_micro)
                        .bind(line.estimated)
                        .bind(req.context.as_str())
                        .bind(&req.created_at)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if done > 0 {
                        inserted += 1;
                        amount = amount.checked_add(line.amount_micro).ok_or_else(overflow)?;
                    }
                }
                let row = if amount != 0 {
                    sqlx::query($crate::imp::CHARGE_BALANCE)
                        .bind(&req.user_id)
                        .bind(amount)
                        .bind(&req.created_at)
                        .fetch_optional(&mut *tx)
                        .await?
                } else {
                    sqlx::query($crate::imp::GET_BALANCE_MICRO)
                        .bind(&req.user_id)
                        .fetch_optional(&mut *tx)
                        .await?
                };
                let balance_micro: Option<i64> =
                    row.map(|r| r.try_get("balance_micro")).transpose()?;
                tx.commit().await?;
                Ok(genstream_engine::persist::SpendOutcome {
                    inserted,
                    amount_micro: amount,
                    balance_micro,
                })
            }

            fn balance_from_row(
                row: &$row,
            ) -> Result<genstream_engine::persist::Balance, sqlx::Error> {
                use sqlx::Row as _;
                Ok(genstream_engine::persist::Balance {
                    user_id: row.try_get("user_id")?,
                    balance_micro: row.try_get("balance_micro")?,
                    refilled_at: row.try_get("refilled_at")?,
                    updated_at: row.try_get("updated_at")?,
                })
            }

            fn api_key_from_row(
                row: &$row,
            ) -> Result<genstream_engine::persist::ApiKey, sqlx::Error> {
                use sqlx::Row as _;
                Ok(genstream_engine::persist::ApiKey {
                    id: row.try_get("id")?,
                    user_id: row.try_get("user_id")?,
                    name: row.try_get("name")?,
                    prefix: row.try_get("prefix")?,
                    hash: row.try_get("hash")?,
                    created_at: row.try_get("created_at")?,
                    last_used_at: row.try_get("last_used_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                })
            }

            fn usage_from_row(
                row: &$row,
            ) -> Result<genstream_engine::persist::UsageRow, sqlx::Error> {
                use sqlx::Row as _;
                Ok(genstream_engine::persist::UsageRow {
                    key: row.try_get("grp")?,
                    input_tokens: row.try_get("input_tokens")?,
                    output_tokens: row.try_get("output_tokens")?,
                    reasoning_tokens: row.try_get("reasoning_tokens")?,
                    cache_write_tokens: row.try_get("cache_write_tokens")?,
                    cache_read_tokens: row.try_get("cache_read_tokens")?,
                    amount_micro: row.try_get("amount_micro")?,
                    calls: row.try_get("calls")?,
                })
            }

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
                // The conversation's row first: it waits for an `add_message` that
                // holds the row, and then the messages, which include that one's.
                let deleted = sqlx::query($crate::imp::DELETE_CONVERSATION)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?
                    .rows_affected();
                sqlx::query($crate::imp::DELETE_MESSAGES_OF)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
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

            async fn add_message(
                &self,
                m: &genstream_engine::event::Message,
            ) -> Result<bool, genstream_engine::EngineError> {
                let what = || format!("saving message {}", m.message_id);
                let err = |e| $crate::imp::db_error(&what(), e);
                let content = $crate::imp::content_json(m)?;
                let mut tx = self.pool.begin().await.map_err(err)?;
                let touched = sqlx::query($crate::imp::TOUCH_CONVERSATION)
                    .bind(&m.conversation_id)
                    .bind(&m.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?
                    .rows_affected();
                if touched == 0 {
                    tx.rollback().await.map_err(err)?;
                    return Ok(false);
                }
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
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                tx.commit().await.map_err(err)?;
                Ok(true)
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
                    None => Err(genstream_engine::EngineError::Persistence(
                        format!("{}: the row vanished after being written", what()).into(),
                    )),
                }
            }

            async fn ping(&self) -> Result<(), genstream_engine::EngineError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error("ping", e))?;
                Ok(())
            }

            async fn spend(
                &self,
                req: &genstream_engine::persist::SpendRequest,
            ) -> Result<genstream_engine::persist::SpendOutcome, genstream_engine::EngineError>
            {
                let mut lines = Vec::with_capacity(req.lines.len());
                for line in &req.lines {
                    let (tokens, call_index) = $crate::imp::ledger_ints(&req.stream_id, line)?;
                    lines.push((line, tokens, call_index));
                }
                lines.sort_by_key(|(l, _, _)| (l.call_index, l.token_type.as_str()));
                let mut attempt = 1;
                loop {
                    match self.spend_once(req, &lines).await {
                        Ok(outcome) => return Ok(outcome),
                        Err($crate::imp::TxError::Engine(e)) => return Err(e),
                        Err($crate::imp::TxError::Db(e))
                            if attempt < $crate::imp::SPEND_ATTEMPTS
                                && $crate::imp::is_transient(&e) =>
                        {
                            // Rolled back: nothing was recorded, so running it again
                            // cannot charge twice.
                            tokio::time::sleep(std::time::Duration::from_millis(
                                10 * u64::from(attempt),
                            ))
                            .await;
                            attempt += 1;
                        }
                        Err($crate::imp::TxError::Db(e)) => {
                            return Err($crate::imp::db_error(
                                &format!("spending on stream {}", req.stream_id),
                                e,
                            ));
                        }
                    }
                }
            }

            async fn balance(
                &self,
                user_id: &str,
            ) -> Result<Option<genstream_engine::persist::Balance>, genstream_engine::EngineError>
            {
                let what = || format!("reading the balance of {user_id}");
                let row = sqlx::query($crate::imp::GET_BALANCE)
                    .bind(user_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                row.map(|r| Self::balance_from_row(&r))
                    .transpose()
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn ensure_balance(
                &self,
                user_id: &str,
                start_micro: i64,
                now: &str,
            ) -> Result<genstream_engine::persist::Balance, genstream_engine::EngineError> {
                let what = || format!("creating the balance of {user_id}");
                sqlx::query($crate::imp::ENSURE_BALANCE)
                    .bind(user_id)
                    .bind(start_micro)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                // Balance rows are never deleted, so the row is there.
                genstream_engine::persist::Persistence::balance(self, user_id)
                    .await?
                    .ok_or_else(|| {
                        genstream_engine::EngineError::Persistence(
                            format!("{}: the row vanished after being written", what()).into(),
                        )
                    })
            }

            async fn add_credits(
                &self,
                user_id: &str,
                micro: i64,
                start_micro: i64,
                now: &str,
            ) -> Result<i64, genstream_engine::EngineError> {
                use sqlx::Row as _;
                let what = || format!("adding credits to {user_id}");
                let first = start_micro.checked_add(micro).ok_or_else(|| {
                    genstream_engine::EngineError::Persistence(
                        format!("{}: the start balance plus the grant overflows", what()).into(),
                    )
                })?;
                let row = sqlx::query($crate::imp::ADD_CREDITS)
                    .bind(user_id)
                    .bind(micro)
                    .bind(first)
                    .bind(now)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                row.try_get("balance_micro")
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn refill_if_due(
                &self,
                user_id: &str,
                amount_micro: i64,
                due_before: &str,
                now: &str,
            ) -> Result<Option<i64>, genstream_engine::EngineError> {
                use sqlx::Row as _;
                let what = || format!("refilling {user_id}");
                let refilled = sqlx::query($crate::imp::REFILL_IF_DUE)
                    .bind(user_id)
                    .bind(amount_micro)
                    .bind(now)
                    .bind(due_before)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                let row = match refilled {
                    Some(row) => Some(row),
                    // Not due, or no row: the balance as it is.
                    None => sqlx::query($crate::imp::GET_BALANCE_MICRO)
                        .bind(user_id)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| $crate::imp::db_error(&what(), e))?,
                };
                row.map(|r| r.try_get("balance_micro"))
                    .transpose()
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn usage_report(
                &self,
                user_id: &str,
                by_period: Option<&str>,
                limit: u32,
            ) -> Result<Vec<genstream_engine::persist::UsageRow>, genstream_engine::EngineError>
            {
                let sql = $crate::imp::usage_sql(by_period)?;
                let what = || format!("reporting the usage of {user_id}");
                let rows = sqlx::query(sql)
                    .bind(user_id)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                rows.iter()
                    .map(Self::usage_from_row)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn spent_on_stream(
                &self,
                stream_id: &str,
            ) -> Result<i64, genstream_engine::EngineError> {
                use sqlx::Row as _;
                let what = || format!("summing the spend of stream {stream_id}");
                let row = sqlx::query($crate::imp::SPENT_ON_STREAM)
                    .bind(stream_id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                row.try_get("total")
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn create_api_key(
                &self,
                key: &genstream_engine::persist::ApiKey,
            ) -> Result<(), genstream_engine::EngineError> {
                sqlx::query($crate::imp::INSERT_API_KEY)
                    .bind(&key.id)
                    .bind(&key.user_id)
                    .bind(&key.name)
                    .bind(&key.prefix)
                    .bind(&key.hash)
                    .bind(&key.created_at)
                    .bind(&key.last_used_at)
                    .bind(&key.revoked_at)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| {
                        $crate::imp::db_error(&format!("creating API key {}", key.id), e)
                    })?;
                Ok(())
            }

            async fn list_api_keys(
                &self,
                user_id: &str,
            ) -> Result<Vec<genstream_engine::persist::ApiKey>, genstream_engine::EngineError> {
                let what = || format!("listing the API keys of {user_id}");
                let rows = sqlx::query($crate::imp::LIST_API_KEYS)
                    .bind(user_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                rows.iter()
                    .map(Self::api_key_from_row)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn revoke_api_key(
                &self,
                id: &str,
                now: &str,
            ) -> Result<Option<genstream_engine::persist::ApiKey>, genstream_engine::EngineError>
            {
                let what = || format!("revoking API key {id}");
                let row = sqlx::query($crate::imp::REVOKE_API_KEY)
                    .bind(id)
                    .bind(now)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                row.map(|r| Self::api_key_from_row(&r))
                    .transpose()
                    .map_err(|e| $crate::imp::db_error(&what(), e))
            }

            async fn authenticate_api_key(
                &self,
                hash: &str,
                now: &str,
            ) -> Result<Option<String>, genstream_engine::EngineError> {
                use sqlx::Row as _;
                let what = || "checking an API key".to_string();
                let Some(row) = sqlx::query($crate::imp::FIND_API_KEY)
                    .bind(hash)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::imp::db_error(&what(), e))?
                else {
                    return Ok(None);
                };
                let user_id: String = row
                    .try_get("user_id")
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                let last: Option<String> = row
                    .try_get("last_used_at")
                    .map_err(|e| $crate::imp::db_error(&what(), e))?;
                if genstream_engine::persist::api_key_use_is_news(last.as_deref(), now) {
                    // Bookkeeping only: a stamp that fails must not refuse a valid key.
                    let _ = sqlx::query($crate::imp::TOUCH_API_KEY)
                        .bind(hash)
                        .bind(now)
                        .execute(&self.pool)
                        .await;
                }
                Ok(Some(user_id))
            }
        }
    };
}

pub(crate) use impl_persistence;
