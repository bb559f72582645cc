-- API keys (`genstream key create | list | revoke`), PostgreSQL dialect. Keep in
-- step with ../sqlite/0003_api_keys.sql.
--
-- Only a key's SHA-256 is stored; the key itself is printed once, when it is made.
-- Keys are 256 random bits, so a plain fast hash suffices (there is nothing to guess),
-- and a request's key is found by its hash through the unique index.
CREATE TABLE api_keys (
    -- A UUID: what `key list` shows and `key revoke` takes.
    id           TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    -- The owner: a request made with the key acts as this user.
    user_id      TEXT COLLATE "C" NOT NULL,
    -- A label given at creation, or NULL.
    name         TEXT,
    -- The key's first characters, to tell keys apart in a list.
    prefix       TEXT NOT NULL,
    -- SHA-256 of the whole key, lowercase hex.
    hash         TEXT COLLATE "C" NOT NULL UNIQUE,
    -- RFC 3339 UTC (compared as text).
    created_at   TEXT COLLATE "C" NOT NULL,
    -- The last request made with it, to the minute; NULL if never used.
    last_used_at TEXT COLLATE "C",
    -- NULL while the key is valid.
    revoked_at   TEXT COLLATE "C"
);
CREATE INDEX api_keys_user_created ON api_keys (user_id, created_at);
