//! The shared `Persistence` suite (`genstream_sql::suite`) against every
//! implementation, plus what only the SQL backends have: connecting, reopening,
//! schemas, and error messages.
//!
//! PostgreSQL tests use `postgres://postgres@127.0.0.1:5432/test`, or
//! `GENSTREAM_TEST_POSTGRES_URL` when set, and fail (not skip) when it is unreachable.
//! Each test works in a fresh schema `gs_test_<uuid>`, dropped at the end, so parallel
//! tests and concurrent CI runs never see each other's rows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use genstream_engine::EngineError;
use genstream_engine::persist::{MemoryPersistence, Persistence};
use genstream_sql::suite::{conversation, message};
use genstream_sql::{PoolOptions, connect, connect_with_schema};
use sqlx::Connection;

type Db = Arc<dyn Persistence>;

mod memory {
    use super::*;

    async fn run<F, Fut>(case: F) -> Result<(), EngineError>
    where
        F: FnOnce(Db) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        case(Arc::new(MemoryPersistence::default())).await
    }

    genstream_sql::persistence_suite!(run);
}

mod sqlite_file {
    use super::*;

    async fn run<F, Fut>(case: F) -> Result<(), EngineError>
    where
        F: FnOnce(Db) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("genstream.db").display());
        let db = connect(&url, PoolOptions::default()).await?;
        case(db).await
    }

    genstream_sql::persistence_suite!(run);
}

mod sqlite_memory {
    use super::*;

    async fn run<F, Fut>(case: F) -> Result<(), EngineError>
    where
        F: FnOnce(Db) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        case(connect("sqlite::memory:", PoolOptions::default()).await?).await
    }

    genstream_sql::persistence_suite!(run);
}

mod postgres {
    use super::*;

    async fn run<F, Fut>(case: F) -> Result<(), EngineError>
    where
        F: FnOnce(Db) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        let schema = PgSchema::new();
        let db = schema.connect().await?;
        // In a task, so that a failed assertion still reaches the cleanup below.
        let outcome = tokio::spawn(case(db)).await;
        schema.drop().await;
        match outcome {
            Ok(result) => result,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    genstream_sql::persistence_suite!(run);
}

/// The PostgreSQL server the tests use.
/// Checked to accept connections first (once per process): without PostgreSQL every
/// test fails at once with one line naming it and `scripts/test`.
fn postgres_url() -> String {
    let url = std::env::var("GENSTREAM_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string());
    genstream_test_support::services::require(
        genstream_test_support::services::Service::Postgres,
        &url,
    );
    url
}

/// A uniquely named schema for one test.
struct PgSchema {
    url: String,
    name: String,
}

impl PgSchema {
    fn new() -> Self {
        PgSchema {
            url: postgres_url(),
            name: format!("gs_test_{}", uuid::Uuid::new_v4().simple()),
        }
    }

    async fn connect(&self) -> Result<Db, EngineError> {
        let pool = PoolOptions {
            max_connections: Some(4),
            ..PoolOptions::default()
        };
        connect_with_schema(&self.url, &self.name, pool).await
    }

    /// Best effort: a leftover schema only costs disk space.
    async fn drop(&self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.url).await {
            let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
            let _ = sqlx::query(&sql).execute(&mut conn).await;
            let _ = conn.close().await;
        }
    }

    async fn exists(&self) -> bool {
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect");
        let row: Option<(String,)> =
            sqlx::query_as("SELECT nspname::text FROM pg_namespace WHERE nspname = $1")
                .bind(&self.name)
                .fetch_optional(&mut conn)
                .await
                .expect("query");
        row.is_some()
    }
}

#[tokio::test]
async fn sqlite_file_keeps_data_across_reopen() -> Result<(), EngineError> {
    let dir = tempfile::tempdir().expect("temp dir");
    // The file does not exist yet: connect creates it.
    let url = format!("sqlite://{}", dir.path().join("new.db").display());
    {
        let db = connect(&url, PoolOptions::default()).await?;
        db.save_conversation(&conversation("c1", "alice", "2025-01-01T00:00:00Z"))
            .await?;
        db.save_message(&message("m1", "c1", None, "2025-01-01T00:00:00Z"))
            .await?;
        assert_eq!(db.get_or_init_secret("s", "first").await?, "first");
    }
    // Reopening runs the migrations again, which must be a no-op.
    let db = connect(&url, PoolOptions::default()).await?;
    assert_eq!(db.list_conversations("alice").await?.len(), 1);
    assert_eq!(db.list_messages("c1").await?.len(), 1);
    assert_eq!(db.get_or_init_secret("s", "second").await?, "first");
    Ok(())
}

#[tokio::test]
async fn sqlite_memory_databases_are_separate() -> Result<(), EngineError> {
    let a = connect("sqlite::memory:", PoolOptions::default()).await?;
    let b = connect("sqlite::memory:", PoolOptions::default()).await?;
    a.save_conversation(&conversation("c1", "alice", "2025-01-01T00:00:00Z"))
        .await?;
    assert!(a.get_conversation("c1").await?.is_some());
    assert!(b.get_conversation("c1").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn postgres_schemas_are_isolated_and_reconnect_is_idempotent() -> Result<(), EngineError> {
    let (s1, s2) = (PgSchema::new(), PgSchema::new());
    let result = async {
        let a = s1.connect().await?;
        let b = s2.connect().await?;
        a.save_conversation(&conversation("c1", "alice", "2025-01-01T00:00:00Z"))
            .await?;
        assert!(b.get_conversation("c1").await?.is_none());
        assert!(s1.exists().await, "connect_with_schema creates the schema");
        // Connecting again to an existing, migrated schema sees the same data.
        let again = s1.connect().await?;
        assert!(again.get_conversation("c1").await?.is_some());
        Ok(())
    }
    .await;
    s1.drop().await;
    s2.drop().await;
    assert!(!s1.exists().await);
    result
}

#[tokio::test]
async fn postgres_unreachable_names_database_without_password() {
    // Port 1: nothing listens there, so the connection is refused.
    let url = "postgres://postgres:hunter2@127.0.0.1:1/test?password=hunter3";
    let pool = PoolOptions {
        max_connections: None,
        acquire_timeout: Duration::from_millis(300),
    };
    let started = std::time::Instant::now();
    let err = connect(url, pool).await.err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Persistence(_)), "{err:?}");
    assert!(
        msg.contains("could not connect to postgres://postgres@127.0.0.1:1/test"),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(!msg.contains("hunter"), "password leaked: {msg}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "retried too long"
    );
}

#[tokio::test]
async fn postgres_rejects_bad_schema_names() {
    let err = connect_with_schema(&postgres_url(), "x; DROP TABLE y", PoolOptions::default())
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("invalid schema name"), "{err}");
}

#[tokio::test]
async fn sqlite_errors_name_the_database() {
    let err = connect(
        "sqlite:///nonexistent-genstream-dir/sub/x.db",
        PoolOptions::default(),
    )
    .await
    .err()
    .expect("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("could not open sqlite:///nonexistent-genstream-dir/sub/x.db"),
        "{msg}"
    );

    let err = connect_with_schema("sqlite::memory:", "s", PoolOptions::default())
        .await
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("only be chosen for PostgreSQL"),
        "{err}"
    );

    let err = connect("mysql://u:pw@h/d", PoolOptions::default())
        .await
        .err()
        .expect("must fail");
    assert!(
        err.to_string()
            .contains("unsupported database URL mysql://u@h/d"),
        "{err}"
    );
}
