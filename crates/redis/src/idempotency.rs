//! [`IdempotencyStore`] for Redis: one hash per key, `P:idem:{key}` with fields `h`
//! (the request hash), `t` (the holder's token) and, once filled, `v` (the start's
//! result). Each operation is one Lua script on that one key (cluster-safe), so a
//! claim is atomic across replicas. A claim expires after its claim TTL until filled;
//! a fill sets the key's TTL to the idempotency TTL.
//!
//! The scripts are `EVALSHA`s with `redis::Script`, which loads a script Redis does
//! not know (after a restart or `SCRIPT FLUSH`) and retries, so they need nothing of
//! the function library (`append.lua`).

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use genstream_engine::store::{IdempotencyClaim, IdempotencyStore};

use crate::{RedisStore, StoreError, store_err};

/// ARGV: request hash, token, claim TTL (ms). Returns `{1}` when claimed, else
/// `{0, h, v}` (`v` nil until filled).
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'h', ARGV[1], 't', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, false, false}
end
return {0, redis.call('HGET', KEYS[1], 'h'), redis.call('HGET', KEYS[1], 'v')}
",
    )
});

/// ARGV: token, value, TTL (ms). Returns 1 if filled.
static FILL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('HGET', KEYS[1], 't') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'v') == 0 then
  redis.call('HSET', KEYS[1], 'v', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
",
    )
});

/// ARGV: token. Drops the key if that token holds it unfilled.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('HGET', KEYS[1], 't') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'v') == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// A TTL in whole milliseconds, at least 1 (`PEXPIRE 0` would delete the key).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    fn idem_key(&self, key: &str) -> String {
        self.key("idem", key)
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn claim_idempotency(
        &self,
        key: &str,
        request_hash: &str,
        token: &str,
        claim_ttl: Duration,
    ) -> Result<IdempotencyClaim, StoreError> {
        let (claimed, hash, value): (i64, Option<String>, Option<String>) = CLAIM
            .key(self.idem_key(key))
            .arg(request_hash)
            .arg(token)
            .arg(ms(claim_ttl))
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        let request_hash = hash.unwrap_or_default();
        Ok(match (claimed, value) {
            (1, _) => IdempotencyClaim::Claimed,
            (_, None) => IdempotencyClaim::Pending { request_hash },
            (_, Some(value)) => IdempotencyClaim::Filled {
                request_hash,
                value,
            },
        })
    }

    async fn fill_idempotency(
        &self,
        key: &str,
        token: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let filled: i64 = FILL
            .key(self.idem_key(key))
            .arg(token)
            .arg(value)
            .arg(ms(ttl))
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        Ok(filled == 1)
    }

    async fn release_idempotency(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let _: i64 = RELEASE
            .key(self.idem_key(key))
            .arg(token)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        Ok(())
    }
}
