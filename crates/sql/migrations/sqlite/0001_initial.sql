-- genstream's schema, SQLite dialect. Keep in step with ../postgres/0001_initial.sql.
--
-- Timestamps are RFC 3339 TEXT exactly as the engine gives them, so they round-trip
-- byte for byte and sort chronologically as text. `content` and `context` are JSON
-- text written by serde_json.

CREATE TABLE conversations (
    conversation_id TEXT NOT NULL PRIMARY KEY,
    user_id         TEXT NOT NULL,
    title           TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at);

CREATE TABLE messages (
    message_id         TEXT NOT NULL PRIMARY KEY,
    conversation_id    TEXT NOT NULL,
    parent_message_id  TEXT,
    -- The conversation's owner, copied when the message is saved (for billing and
    -- per-user queries); NULL if the conversation row did not exist yet.
    user_id            TEXT,
    sender             TEXT NOT NULL,
    text               TEXT NOT NULL,
    content            TEXT NOT NULL DEFAULT '[]',
    is_created_by_user INTEGER NOT NULL,
    model              TEXT,
    unfinished         INTEGER NOT NULL DEFAULT 0,
    error              INTEGER NOT NULL DEFAULT 0,
    created_at         TEXT NOT NULL
);
CREATE INDEX messages_conversation_created ON messages (conversation_id, created_at);

CREATE TABLE secrets (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);

-- Billing ledger (SPEC §7): one row per job, model call and token type. The UNIQUE
-- key is what makes "every usage record is spent exactly once" hold across aborts,
-- errors and replicas: a second insert of the same record conflicts.
CREATE TABLE transactions (
    id              INTEGER PRIMARY KEY,
    user_id         TEXT NOT NULL,
    conversation_id TEXT,
    stream_id       TEXT NOT NULL,
    message_id      TEXT,
    call_index      INTEGER NOT NULL,
    -- 'input', 'output', 'cache_write', 'cache_read'
    token_type      TEXT NOT NULL,
    tokens          INTEGER NOT NULL,
    -- USD per 1M tokens, which is also credits per token (1 credit = 1e-6 USD).
    rate            REAL NOT NULL,
    -- Signed: spending is negative.
    credits         REAL NOT NULL,
    estimated       INTEGER NOT NULL DEFAULT 0,
    -- Why the record was spent ('complete', 'aborted', 'error', ...), free-form.
    context         TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL,
    UNIQUE (stream_id, call_index, token_type)
);
CREATE INDEX transactions_user_created ON transactions (user_id, created_at);

CREATE TABLE balances (
    user_id    TEXT NOT NULL PRIMARY KEY,
    credits    REAL NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
);
