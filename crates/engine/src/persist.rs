//! Persistence of conversations, messages, the billing ledger and balances, behind a
//! trait so SQLite and PostgreSQL (crate `genstream-sql`) and the in-memory test double
//! share one contract.
//!
//! The engine decides what to write and when (docs/protocol.md §4's ordering rules); an
//! implementation only stores what it is given. Every write is an upsert keyed by id,
//! so a repeated write (a retried abort, a reaper racing the owner) is harmless.
//!
//! Billing (docs/protocol.md §7): [`Persistence::spend`] records priced [`Line`]s (module [`ledger`](crate::ledger)) in a ledger whose
//! unique key is `(stream_id, call_index, token_type)` and takes the sum of the lines
//! it actually inserted off the user's balance, in one transaction. A line spent again
//! (by an abort racing the completion, a reaper on another replica, a retry) conflicts
//! and is neither recorded nor charged twice. Money is integer micro-credits throughout.

use std::collections::HashMap;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::EngineError;
use crate::event::Message;
use crate::ledger::{Line, TokenType};

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

/// Why a spend happened (the ledger's `context` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpendContext {
    /// The job completed and its message was saved.
    Message,
    /// The job was aborted; its partial usage is spent.
    Abort,
    /// The job ended with an error.
    Error,
    /// The owning replica died and another one finished the job.
    ReplicaLost,
}

impl SpendContext {
    /// The name stored in the ledger (`message`, `abort`, `error`, `replica_lost`).
    pub fn as_str(self) -> &'static str {
        match self {
            SpendContext::Message => "message",
            SpendContext::Abort => "abort",
            SpendContext::Error => "error",
            SpendContext::ReplicaLost => "replica_lost",
        }
    }
}

/// One job's usage to spend: every line is keyed by `(stream_id, call_index,
/// token_type)`.
#[derive(Clone, Debug)]
pub struct SpendRequest {
    /// Whose balance is charged.
    pub user_id: String,
    /// The job's conversation.
    pub conversation_id: String,
    /// The job; part of every line's unique key.
    pub stream_id: String,
    /// The job's response message.
    pub message_id: String,
    /// The model the lines were priced for.
    pub model: String,
    /// Why the spend happened.
    pub context: SpendContext,
    /// The priced lines (`crate::billing::price`).
    pub lines: Vec<Line>,
    /// RFC 3339 UTC (`crate::now_rfc3339`); the lines' `created_at`, and the balance's
    /// `updated_at` when it changes. Usage reports group by its date, so it must be UTC.
    pub created_at: String,
}

/// What a spend did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendOutcome {
    /// How many lines were new (the others were already recorded).
    pub inserted: usize,
    /// The sum of the inserted lines' amounts, in micro-credits: what was charged.
    pub amount_micro: i64,
    /// The balance after the spend, if the user has a balance row.
    pub balance_micro: Option<i64>,
}

/// A user's balance row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    /// The owner (JWT `sub`).
    pub user_id: String,
    /// Micro-credits; may be negative (a job's usage is spent in full even when it
    /// exceeds what was left).
    pub balance_micro: i64,
    /// RFC 3339 of the last refill; `None` if never refilled.
    pub refilled_at: Option<String>,
    /// RFC 3339 of the last change.
    pub updated_at: String,
}

/// One row of a usage report: the sums over a group of ledger lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    /// The group: a conversation id, or a period's start as RFC 3339 UTC
    /// (`2025-01-02T00:00:00.000Z`, `2025-01-01T00:00:00.000Z`).
    pub key: String,
    /// Billed input tokens (without cached ones).
    pub input_tokens: i64,
    /// Output tokens (including reasoning unless the model prices it separately).
    pub output_tokens: i64,
    /// Reasoning tokens billed on their own line.
    pub reasoning_tokens: i64,
    /// Cache-write tokens.
    pub cache_write_tokens: i64,
    /// Cache-read tokens.
    pub cache_read_tokens: i64,
    /// The sum of the lines' amounts, in micro-credits.
    pub amount_micro: i64,
    /// Distinct model calls (`(stream_id, call_index)` pairs).
    pub calls: i64,
}

/// An API key's row: everything about the key except the key, of which only the
/// hash is kept (a stolen database yields no usable key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// The key's id (a UUID): what `genstream key list` shows and `key revoke` takes.
    pub id: String,
    /// The owner: a request made with the key acts as this user.
    pub user_id: String,
    /// A label, e.g. the machine or the app the key is for.
    pub name: Option<String>,
    /// The key's first characters (`gsk_` and a few more), to tell keys apart in a
    /// list; not enough to use it.
    pub prefix: String,
    /// SHA-256 of the whole key, lowercase hex: what a request's key is looked up by.
    pub hash: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC of the last request made with it, to the minute; `None` if unused.
    pub last_used_at: Option<String>,
    /// RFC 3339 UTC of its revocation; `None` while the key is valid.
    pub revoked_at: Option<String>,
}

/// Storage of conversations, message trees, the billing ledger and balances.
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
    /// Saves a message into its conversation — inserts or replaces it, and sets the
    /// conversation's `updated_at` to the message's `created_at` — in one transaction,
    /// and only if the conversation exists: `Ok(false)`, with nothing written, when it
    /// does not (it was deleted). This is how the engine saves every message of a
    /// running job, so that a job can never write into a conversation deleted under it
    /// (another replica's delete included): the delete and this save serialize on the
    /// conversation's row.
    async fn add_message(&self, message: &Message) -> Result<bool, EngineError>;
    /// The message, if it exists.
    async fn get_message(&self, id: &str) -> Result<Option<Message>, EngineError>;
    /// The conversation's messages, oldest first (by `createdAt`, then id).
    async fn list_messages(&self, conversation_id: &str) -> Result<Vec<Message>, EngineError>;
    /// Stores `candidate` under `name` unless a value is already there, and returns the
    /// value that is (so concurrent replicas agree on one). Used for the JWT secret.
    async fn get_or_init_secret(&self, name: &str, candidate: &str) -> Result<String, EngineError>;
    /// Succeeds when the database answers (for `/readyz`).
    async fn ping(&self) -> Result<(), EngineError>;

    /// Records the lines and takes their sum off the user's balance (if a balance row
    /// exists), in ONE database transaction. A line whose `(stream_id, call_index,
    /// token_type)` is already recorded is skipped (`INSERT … ON CONFLICT DO NOTHING`)
    /// and not charged again — on any replica, in any order, however many times:
    /// exactly-once is enforced by the database's unique key, never by memory.
    ///
    /// Errors: [`EngineError::Internal`] for a line whose `tokens` exceed `i64::MAX` or
    /// whose `call_index` exceeds `i32::MAX` (nothing is recorded then).
    async fn spend(&self, req: &SpendRequest) -> Result<SpendOutcome, EngineError>;
    /// The user's balance row.
    async fn balance(&self, user_id: &str) -> Result<Option<Balance>, EngineError>;
    /// Creates the user's balance row with `start_micro` if it does not exist
    /// (`refilled_at` = `updated_at` = `now`); returns the row, which an earlier call
    /// may have created with another start (that one is kept).
    async fn ensure_balance(
        &self,
        user_id: &str,
        start_micro: i64,
        now: &str,
    ) -> Result<Balance, EngineError>;
    /// Adds `micro` (may be negative) to the balance and returns the new balance. A user
    /// without a row first gets the one [`Persistence::ensure_balance`] would make
    /// (`start_micro`, refilled at `now`), so an operator's grant to a new user comes on
    /// top of the start balance, never instead of it. One atomic step, so concurrent
    /// grants add up.
    ///
    /// Errors: [`EngineError::Persistence`] if the sum overflows `i64` (nothing changes).
    async fn add_credits(
        &self,
        user_id: &str,
        micro: i64,
        start_micro: i64,
        now: &str,
    ) -> Result<i64, EngineError>;
    /// Adds `amount_micro` if the last refill is at or before `due_before` (an RFC 3339
    /// string: now − interval; a row never refilled is due), setting `refilled_at` =
    /// `now`, atomically (two replicas refilling at once refill once). Returns the
    /// balance after the call, refilled or not; `None` if the user has no balance row
    /// (none is created).
    ///
    /// Timestamps are compared as text, so `due_before` and `now` must have the fixed
    /// width of [`crate::now_rfc3339`].
    async fn refill_if_due(
        &self,
        user_id: &str,
        amount_micro: i64,
        due_before: &str,
        now: &str,
    ) -> Result<Option<i64>, EngineError>;
    /// The user's usage grouped by conversation (`by_period = None`) or by period start
    /// (`Some("day" | "month")`, UTC), newest first, at most `limit` rows. Conversations
    /// are ordered by their latest line's `created_at`, then id, descending; periods by
    /// start, descending.
    ///
    /// Errors: [`EngineError::BadRequest`] (`field` = `"by"`) for another period.
    async fn usage_report(
        &self,
        user_id: &str,
        by_period: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRow>, EngineError>;
    /// The sum of `amount_micro` over all of a stream's lines (for tests and
    /// reconciliation); 0 for a stream without lines.
    async fn spent_on_stream(&self, stream_id: &str) -> Result<i64, EngineError>;

    // API keys. Keys are looked up in the database on every request, never cached,
    // so a revocation holds at once on every replica that shares the database. No
    // default bodies: a backend that forgot them would refuse every key in silence.

    /// Stores a new API key's row.
    ///
    /// Errors: [`EngineError::Persistence`], also when the id or the hash exists.
    async fn create_api_key(&self, key: &ApiKey) -> Result<(), EngineError>;
    /// The user's API keys, newest first (by `created_at`, then id), revoked ones
    /// included.
    async fn list_api_keys(&self, user_id: &str) -> Result<Vec<ApiKey>, EngineError>;
    /// Revokes key `id` at `now` and returns its row; `None` for an unknown id. A key
    /// revoked already keeps its first revocation time.
    async fn revoke_api_key(&self, id: &str, now: &str) -> Result<Option<ApiKey>, EngineError>;
    /// The user of the valid (not revoked) key whose hash is `hash`, or `None`. Sets
    /// the key's `last_used_at` to `now` when `now` is in a later minute than the one
    /// recorded, so a busy key costs at most one write a minute.
    ///
    /// Timestamps are compared as text: `now` must have the fixed width of
    /// [`crate::now_rfc3339`].
    async fn authenticate_api_key(
        &self,
        hash: &str,
        now: &str,
    ) -> Result<Option<String>, EngineError>;
}

/// Whether a key last used at `last` should be stamped `now`: `now` is in a later
/// minute (RFC 3339 texts compared on their first 16 characters, `YYYY-MM-DDTHH:MM`).
pub fn api_key_use_is_news(last: Option<&str>, now: &str) -> bool {
    last.is_none_or(|last| prefix(last, 16) < prefix(now, 16))
}

/// How a usage report groups lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grouping {
    Conversation,
    Day,
    Month,
}

impl Grouping {
    /// Parses `usage_report`'s `by_period`.
    fn parse(by_period: Option<&str>) -> Result<Grouping, EngineError> {
        match by_period {
            None => Ok(Grouping::Conversation),
            Some("day") => Ok(Grouping::Day),
            Some("month") => Ok(Grouping::Month),
            Some(other) => Err(EngineError::bad_request(
                "by",
                format!("unknown period {other:?} (expected \"day\" or \"month\")"),
            )),
        }
    }
}

/// A line's `tokens` and `call_index` as the SQL ledger's column types (BIGINT,
/// INTEGER); the in-memory ledger refuses what they would refuse.
fn ledger_ints(stream_id: &str, line: &Line) -> Result<(i64, i32), EngineError> {
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
    /// The ledger, by its unique key.
    ledger: HashMap<(String, u32, TokenType), LedgerRow>,
    balances: HashMap<String, Balance>,
    api_keys: HashMap<String, ApiKey>,
}

/// What the in-memory ledger keeps of a line (the columns reports read).
struct LedgerRow {
    user_id: String,
    conversation_id: String,
    call_index: u32,
    stream_id: String,
    token_type: TokenType,
    tokens: i64,
    amount_micro: i64,
    created_at: String,
}

/// An `i64` overflow in money, as the SQL backends report it (they refuse too).
fn overflow(what: &str) -> EngineError {
    EngineError::Persistence(format!("{what}: amount out of range").into())
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
    async fn add_message(&self, m: &Message) -> Result<bool, EngineError> {
        let mut g = self.inner.lock();
        let Some(c) = g.conversations.get_mut(&m.conversation_id) else {
            return Ok(false);
        };
        c.updated_at.clone_from(&m.created_at);
        g.messages.insert(m.message_id.clone(), m.clone());
        Ok(true)
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

    async fn spend(&self, req: &SpendRequest) -> Result<SpendOutcome, EngineError> {
        let what = || format!("spending on stream {}", req.stream_id);
        // Validate everything first: like the SQL transaction, all or nothing.
        for line in &req.lines {
            ledger_ints(&req.stream_id, line)?;
        }
        let mut g = self.inner.lock();
        let mut new_rows = Vec::new();
        let mut amount: i64 = 0;
        for line in &req.lines {
            let key = (req.stream_id.clone(), line.call_index, line.token_type);
            if g.ledger.contains_key(&key) || new_rows.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let (tokens, _) = ledger_ints(&req.stream_id, line)?;
            amount = amount
                .checked_add(line.amount_micro)
                .ok_or_else(|| overflow(&what()))?;
            new_rows.push((
                key,
                LedgerRow {
                    user_id: req.user_id.clone(),
                    conversation_id: req.conversation_id.clone(),
                    call_index: line.call_index,
                    stream_id: req.stream_id.clone(),
                    token_type: line.token_type,
                    tokens,
                    amount_micro: line.amount_micro,
                    created_at: req.created_at.clone(),
                },
            ));
        }
        let balance_micro = match g.balances.get_mut(&req.user_id) {
            Some(b) if amount != 0 => {
                b.balance_micro = b
                    .balance_micro
                    .checked_sub(amount)
                    .ok_or_else(|| overflow(&what()))?;
                b.updated_at.clone_from(&req.created_at);
                Some(b.balance_micro)
            }
            Some(b) => Some(b.balance_micro),
            None => None,
        };
        let inserted = new_rows.len();
        g.ledger.extend(new_rows);
        Ok(SpendOutcome {
            inserted,
            amount_micro: amount,
            balance_micro,
        })
    }

    async fn balance(&self, user_id: &str) -> Result<Option<Balance>, EngineError> {
        Ok(self.inner.lock().balances.get(user_id).cloned())
    }

    async fn ensure_balance(
        &self,
        user_id: &str,
        start_micro: i64,
        now: &str,
    ) -> Result<Balance, EngineError> {
        Ok(self
            .inner
            .lock()
            .balances
            .entry(user_id.to_string())
            .or_insert_with(|| Balance {
                user_id: user_id.to_string(),
                balance_micro: start_micro,
                refilled_at: Some(now.to_string()),
                updated_at: now.to_string(),
            })
            .clone())
    }

    async fn add_credits(
        &self,
        user_id: &str,
        micro: i64,
        start_micro: i64,
        now: &str,
    ) -> Result<i64, EngineError> {
        let mut g = self.inner.lock();
        let current = g
            .balances
            .get(user_id)
            .map_or(start_micro, |b| b.balance_micro);
        let new = current
            .checked_add(micro)
            .ok_or_else(|| overflow(&format!("adding credits to {user_id}")))?;
        let b = g
            .balances
            .entry(user_id.to_string())
            .or_insert_with(|| Balance {
                user_id: user_id.to_string(),
                balance_micro: start_micro,
                refilled_at: Some(now.to_string()),
                updated_at: now.to_string(),
            });
        b.balance_micro = new;
        b.updated_at = now.to_string();
        Ok(new)
    }

    async fn refill_if_due(
        &self,
        user_id: &str,
        amount_micro: i64,
        due_before: &str,
        now: &str,
    ) -> Result<Option<i64>, EngineError> {
        let mut g = self.inner.lock();
        let Some(b) = g.balances.get_mut(user_id) else {
            return Ok(None);
        };
        let due = b.refilled_at.as_deref().is_none_or(|at| at <= due_before);
        if due {
            b.balance_micro = b
                .balance_micro
                .checked_add(amount_micro)
                .ok_or_else(|| overflow(&format!("refilling {user_id}")))?;
            b.refilled_at = Some(now.to_string());
            b.updated_at = now.to_string();
        }
        Ok(Some(b.balance_micro))
    }

    async fn usage_report(
        &self,
        user_id: &str,
        by_period: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRow>, EngineError> {
        let grouping = Grouping::parse(by_period)?;
        let g = self.inner.lock();
        // key → (row, latest created_at, distinct calls)
        type Group<'a> = (UsageRow, &'a str, std::collections::HashSet<(&'a str, u32)>);
        let mut groups: HashMap<String, Group<'_>> = HashMap::new();
        let overflowed = || overflow(&format!("usage report of {user_id}"));
        for row in g.ledger.values().filter(|r| r.user_id == user_id) {
            let key = match grouping {
                Grouping::Conversation => row.conversation_id.clone(),
                Grouping::Day => format!("{}T00:00:00.000Z", prefix(&row.created_at, 10)),
                Grouping::Month => format!("{}-01T00:00:00.000Z", prefix(&row.created_at, 7)),
            };
            let (sums, latest, calls) = groups.entry(key.clone()).or_insert_with(|| {
                (
                    UsageRow {
                        key,
                        input_tokens: 0,
                        output_tokens: 0,
                        reasoning_tokens: 0,
                        cache_write_tokens: 0,
                        cache_read_tokens: 0,
                        amount_micro: 0,
                        calls: 0,
                    },
                    row.created_at.as_str(),
                    std::collections::HashSet::new(),
                )
            });
            let tokens = match row.token_type {
                TokenType::Input => &mut sums.input_tokens,
                TokenType::Output => &mut sums.output_tokens,
                TokenType::Reasoning => &mut sums.reasoning_tokens,
                TokenType::CacheWrite => &mut sums.cache_write_tokens,
                TokenType::CacheRead => &mut sums.cache_read_tokens,
            };
            *tokens = tokens.checked_add(row.tokens).ok_or_else(overflowed)?;
            sums.amount_micro = sums
                .amount_micro
                .checked_add(row.amount_micro)
                .ok_or_else(overflowed)?;
            if row.created_at.as_str() > *latest {
                *latest = row.created_at.as_str();
            }
            calls.insert((row.stream_id.as_str(), row.call_index));
        }
        let mut rows: Vec<(UsageRow, &str)> = groups
            .into_values()
            .map(|(mut sums, latest, calls)| {
                sums.calls = calls.len() as i64;
                (sums, latest)
            })
            .collect();
        rows.sort_by(|(a, a_latest), (b, b_latest)| match grouping {
            Grouping::Conversation => b_latest.cmp(a_latest).then(b.key.cmp(&a.key)),
            Grouping::Day | Grouping::Month => b.key.cmp(&a.key),
        });
        rows.truncate(limit as usize);
        Ok(rows.into_iter().map(|(row, _)| row).collect())
    }

    async fn spent_on_stream(&self, stream_id: &str) -> Result<i64, EngineError> {
        self.inner
            .lock()
            .ledger
            .values()
            .filter(|r| r.stream_id == stream_id)
            .try_fold(0i64, |sum, r| sum.checked_add(r.amount_micro))
            .ok_or_else(|| overflow(&format!("sum of stream {stream_id}")))
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<(), EngineError> {
        let mut g = self.inner.lock();
        if g.api_keys.contains_key(&key.id) || g.api_keys.values().any(|k| k.hash == key.hash) {
            return Err(EngineError::Persistence(
                format!("creating API key {}: the id or the hash exists", key.id).into(),
            ));
        }
        g.api_keys.insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn list_api_keys(&self, user_id: &str) -> Result<Vec<ApiKey>, EngineError> {
        let g = self.inner.lock();
        let mut v: Vec<ApiKey> = g
            .api_keys
            .values()
            .filter(|k| k.user_id == user_id)
            .cloned()
            .collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(v)
    }

    async fn revoke_api_key(&self, id: &str, now: &str) -> Result<Option<ApiKey>, EngineError> {
        let mut g = self.inner.lock();
        Ok(g.api_keys.get_mut(id).map(|k| {
            k.revoked_at.get_or_insert_with(|| now.to_string());
            k.clone()
        }))
    }

    async fn authenticate_api_key(
        &self,
        hash: &str,
        now: &str,
    ) -> Result<Option<String>, EngineError> {
        let mut g = self.inner.lock();
        let Some(k) = g
            .api_keys
            .values_mut()
            .find(|k| k.hash == hash && k.revoked_at.is_none())
        else {
            return Ok(None);
        };
        if api_key_use_is_news(k.last_used_at.as_deref(), now) {
            k.last_used_at = Some(now.to_string());
        }
        Ok(Some(k.user_id.clone()))
    }
}

/// The first `n` bytes of `s` (all of it if shorter, or if `n` is not a character
/// boundary), like SQL's `substr(s, 1, n)` on an ASCII timestamp.
fn prefix(s: &str, n: usize) -> &str {
    s.get(..n).unwrap_or(s)
}
