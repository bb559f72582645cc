//! genstream's Redis function library (`append.lua`): its name and functions, loading
//! it, and calling a function with one reload if Redis lost the library.

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Value};

use crate::{RedisStore, StoreError, store_err};

/// The Redis function library; its name carries the version.
pub(crate) const LIBRARY: &str = include_str!("append.lua");

pub(crate) const LIBRARY_NAME: &str = "genstream_v4";

/// The kind in a job's channel name (`P:ch4:{sid}`). It carries the version of what is
/// published there: version 4 of the library publishes one message per batch, the
/// frames concatenated (version 3 published one per frame on `P:ch:{sid}`), so
/// replicas of the two versions, during a rolling deploy, never read each other's
/// messages (each mirror still fills from the log stream, which both write alike).
pub(crate) const CHANNEL_KIND: &str = "ch4";

pub(crate) const APPEND_BATCH_FN: &str = "genstream_append_batch_v4";

pub(crate) const CLAIM_FN: &str = "genstream_claim_v4";

pub(crate) const CLAIM_END_FN: &str = "genstream_claim_end_v4";

pub(crate) const REQUEST_ABORT_FN: &str = "genstream_request_abort_v4";

pub(crate) const ACQUIRE_SLOT_FN: &str = "genstream_acquire_slot_v4";

pub(crate) const RATE_WINDOW_FN: &str = "genstream_rate_window_v4";

impl RedisStore {
    /// Runs an `FCALL`; if Redis no longer has the function (it restarted without
    /// persistence, its functions were flushed, or it failed over to a node without
    /// them), loads the library again and retries once. One round trip when all is well.
    pub(crate) async fn fcall<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn();
        match cmd.query_async(&mut conn).await {
            Err(e) if is_missing_function(&e) => {
                tracing::warn!(
                    "Redis lost genstream's functions (restart without persistence, \
                     FUNCTION FLUSH or failover); loading them again"
                );
                load_library(&mut conn).await?;
                cmd.query_async(&mut conn).await.map_err(store_err)
            }
            r => r.map_err(store_err),
        }
    }

    /// Loads the function library unless Redis has it.
    pub(crate) async fn ensure_library(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let found: Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(LIBRARY_NAME)
            .query_async(&mut conn)
            .await
            .map_err(store_err)?;
        let loaded = match &found {
            Value::Array(libs) => !libs.is_empty(),
            Value::Set(libs) => !libs.is_empty(),
            _ => false,
        };
        if !loaded {
            tracing::warn!("Redis does not have genstream's functions; loading them");
            load_library(&mut conn).await?;
        }
        Ok(())
    }
}

/// True for the error Redis gives when a called function is not loaded.
pub(crate) fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// `FUNCTION LOAD REPLACE` of the library.
pub(crate) async fn load_library(conn: &mut ConnectionManager) -> Result<(), StoreError> {
    let _: Value = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async(conn)
        .await
        .map_err(|e| {
            StoreError::unavailable(
                "could not load genstream's Redis functions (Redis 7 or newer is needed)",
                e,
            )
        })?;
    Ok(())
}
