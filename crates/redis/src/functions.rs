//! genstream's Redis function library (`append.lua`): its name and functions, loading
//! it, and calling a function with one reload if Redis lost the library.

use redis::{FromRedisValue, Value};

use crate::conn::Conn;
use crate::{RedisStore, StoreError, store_err};

/// The Redis function library; its name carries the version.
pub(crate) const LIBRARY: &str = include_str!("append.lua");

pub(crate) const LIBRARY_NAME: &str = "genstream_v6";

/// The kind in a job's channel name (`P:ch4:sid`; `P:ch4:{sid}` on a Cluster). It
/// carries the version of what is published there: versions 4 to 6 of the library
/// publish one message per batch, the frames concatenated (version 3 published one per
/// frame on `P:ch:sid`), so replicas of versions 3 and 4, during a rolling deploy,
/// never read each other's messages. (Version 6 also writes each batch as one log
/// stream entry, which version 5 cannot read; see `append.lua`.)
pub(crate) const CHANNEL_KIND: &str = "ch4";

pub(crate) const APPEND_BATCH_FN: &str = "genstream_append_batch_v6";

pub(crate) const CLAIM_FN: &str = "genstream_claim_v6";

pub(crate) const CLAIM_END_FN: &str = "genstream_claim_end_v6";

pub(crate) const REQUEST_ABORT_FN: &str = "genstream_request_abort_v6";

pub(crate) const ACQUIRE_SLOT_FN: &str = "genstream_acquire_slot_v6";

pub(crate) const RATE_WINDOW_FN: &str = "genstream_rate_window_v6";

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

    /// Loads the function library unless Redis (on a Cluster: every primary) has it.
    pub(crate) async fn ensure_library(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let found = conn
            .on_all_primaries(
                redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg(LIBRARY_NAME),
            )
            .await
            .map_err(store_err)?;
        let loaded = found.iter().all(|v| match v {
            Value::Array(libs) => !libs.is_empty(),
            Value::Set(libs) => !libs.is_empty(),
            _ => false,
        });
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

/// The library as a Cluster loads it: each job's frames go out with `SPUBLISH` on its
/// sharded channel `P:ch4:{sid}`, which lies in the job's slot (a function may only
/// publish to a shard channel of its keys' slot), instead of `PUBLISH`. Everything else
/// is the same text, so the two cannot drift apart; the abort request stays a plain
/// `PUBLISH` (it must reach every replica, whichever node it listens on).
pub(crate) fn cluster_library() -> String {
    LIBRARY.replace(
        FRAME_PUBLISH,
        &FRAME_PUBLISH.replace("'PUBLISH'", "'SPUBLISH'"),
    )
}

/// How `append.lua` publishes a frame to the job's channel (ARGV[5]).
pub(crate) const FRAME_PUBLISH: &str = "redis.call('PUBLISH', args[5]";

/// `FUNCTION LOAD REPLACE` of the library: on one Redis, [`LIBRARY`]; on a Cluster,
/// [`cluster_library`] on every primary (the cluster connection routes `FUNCTION LOAD`
/// to all of them). Replicas get the functions by replication.
pub(crate) async fn load_library(conn: &mut Conn) -> Result<(), StoreError> {
    let text = if conn.is_cluster() {
        cluster_library()
    } else {
        LIBRARY.to_string()
    };
    let _: Value = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(text)
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
