//! [`Persistence`](genstream_engine::persist::Persistence) on SQLite: the default,
//! single-replica database (`./genstream.db`).
//!
//! A file database runs in WAL mode, so readers (the conversation list, message
//! history) never wait for the writer, and with a 5 s busy timeout, so concurrent
//! writers queue instead of failing with `SQLITE_BUSY`. `sqlite::memory:` is for tests:
//! every connection to it would otherwise open a separate database (or share one that
//! disappears when the pool briefly has no connection), so its pool holds exactly one
//! connection for its whole life.

use std::str::FromStr;
use std::time::Duration;

use genstream_engine::EngineError;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};

use crate::imp::{describe, impl_persistence};
use crate::{PoolOptions, SQLITE_DEFAULT_MAX_CONNECTIONS, redact_url};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Conversations and messages in a SQLite database.
#[derive(Clone, Debug)]
pub struct SqlitePersistence {
    pool: SqlitePool,
}

impl SqlitePersistence {
    /// Opens (creating if missing) the SQLite database at `url` (`sqlite://PATH`,
    /// `sqlite:PATH` or `sqlite::memory:`) and migrates it.
    ///
    /// Errors: [`EngineError::Persistence`] naming the database and the cause.
    pub async fn connect(url: &str, pool: &PoolOptions) -> Result<Self, EngineError> {
        let fail = |what: &str, cause: String| {
            EngineError::Persistence(format!("{what} {}: {cause}", redact_url(url)).into())
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| fail("invalid SQLite URL", describe(&e)))?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let in_memory = is_memory_url(url);
        let pool_options = if in_memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(
                pool.max_connections
                    .unwrap_or(SQLITE_DEFAULT_MAX_CONNECTIONS),
            )
        }
        .acquire_timeout(pool.acquire_timeout);
        let options = if in_memory {
            options
        } else {
            options.journal_mode(SqliteJournalMode::Wal)
        };
        let pool = pool_options
            .connect_with(options)
            .await
            .map_err(|e| fail("could not open", describe(&e)))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| fail("could not migrate", e.to_string()))?;
        Ok(SqlitePersistence { pool })
    }
}

/// Whether `url` names an in-memory database (`sqlite::memory:`,
/// `sqlite://:memory:`, or a `mode=memory` URI).
fn is_memory_url(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

impl_persistence!(SqlitePersistence, SqliteRow, "BEGIN IMMEDIATE");
