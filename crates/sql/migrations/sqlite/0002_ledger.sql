-- The billing ledger and balances in integer micro-credits (SPEC §7), SQLite dialect.
-- Keep in step with ../postgres/0002_ledger.sql.
--
-- Replaces 0001's placeholder tables, which priced in floating point and were never
-- written to. Money is 64-bit INTEGER micro-credits only: sums over any number of
-- lines and replicas agree to the unit. SQLite turns an integer overflow in arithmetic
-- into a REAL; the CHECKs make that an error instead, as it is in PostgreSQL.

DROP TABLE transactions;
DROP TABLE balances;

-- One row per job, model call and token type. The UNIQUE key is what makes "every
-- usage record is spent exactly once" hold across completion, abort, error and
-- replicas: a second insert of the same line conflicts and is skipped (ON CONFLICT DO
-- NOTHING), so it is neither recorded nor charged again.
CREATE TABLE transactions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    stream_id       TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    model           TEXT NOT NULL,
    call_index      INTEGER NOT NULL,
    -- 'input', 'output', 'reasoning', 'cache_write', 'cache_read'
    token_type      TEXT NOT NULL,
    tokens          INTEGER NOT NULL CHECK (typeof(tokens) = 'integer'),
    -- Micro-credits per token (= micro-USD per million tokens).
    rate_micro      INTEGER NOT NULL CHECK (typeof(rate_micro) = 'integer'),
    -- tokens × rate_micro, in micro-credits; what the line charged.
    amount_micro    INTEGER NOT NULL CHECK (typeof(amount_micro) = 'integer'),
    -- 0 or 1.
    estimated       INTEGER NOT NULL,
    -- Why the line was spent: 'message', 'abort', 'error', 'replica_lost'.
    context         TEXT NOT NULL,
    -- RFC 3339 UTC; usage reports group by its first 10 (day) or 7 (month) characters.
    created_at      TEXT NOT NULL,
    UNIQUE (stream_id, call_index, token_type)
);
CREATE INDEX transactions_user_created ON transactions (user_id, created_at);

CREATE TABLE balances (
    user_id       TEXT NOT NULL PRIMARY KEY,
    -- Micro-credits; negative when a job's usage exceeded what was left.
    balance_micro INTEGER NOT NULL CHECK (typeof(balance_micro) = 'integer'),
    -- RFC 3339 UTC of the last refill (compared as text); NULL if never refilled.
    refilled_at   TEXT,
    updated_at    TEXT NOT NULL
);
