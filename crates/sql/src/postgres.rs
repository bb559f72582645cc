//! [`Persistence`](genstream_engine::persist::Persistence) on PostgreSQL: the database
//! shared by any number of replicas.
//!
//! Connecting happens in two steps. First one plain connection, retried while the
//! server refuses (it may be starting next to us), so that a failure reports its real
//! cause rather than sqlx's "pool timed out"; on it the schema is created if one was
//! asked for and the migrations run (sqlx serializes concurrent migrators with an
//! advisory lock, so replicas starting together are safe). Then the pool.
//!
//! An optional schema isolates one user of the database from another: every pooled
//! connection starts with `search_path` set to it, so the unqualified table names of
//! the shared SQL, and sqlx's own `_sqlx_migrations`, all resolve inside it.

use std::str::FromStr;
use std::time::Duration;

use genstream_engine::EngineError;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::imp::{describe, impl_persistence};
use crate::{POSTGRES_DEFAULT_MAX_CONNECTIONS, PoolOptions, redact_url};

/// Conversations and messages in a PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PostgresPersistence {
    pool: PgPool,
}

impl PostgresPersistence {
    /// Connects to the PostgreSQL server at `url` (`postgres://…` or
    /// `postgresql://…`) and migrates the database; with `schema`, inside that schema
    /// (created if missing; see [`crate::connect_with_schema`]).
    ///
    /// Errors: [`EngineError::Persistence`] naming the database (password removed) and
    /// the cause, e.g. `could not connect to postgres://app@db/x: Connection refused
    /// (os error 111)`.
    pub async fn connect(
        url: &str,
        schema: Option<&str>,
        pool: &PoolOptions,
    ) -> Result<Self, EngineError> {
        let fail = |what: &str, cause: String| {
            EngineError::Persistence(format!("{what} {}: {cause}", redact_url(url)).into())
        };
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|e| fail("invalid PostgreSQL URL", describe(&e)))?;
        if let Some(schema) = schema {
            check_schema_name(schema)?;
            options = options.options([("search_path", schema)]);
        }

        let mut conn = first_connection(&options, pool.acquire_timeout)
            .await
            .map_err(|cause| fail("could not connect to", cause))?;
        if let Some(schema) = schema {
            create_schema(&mut conn, schema).await.map_err(|e| {
                fail(
                    &format!("could not create schema {schema} in"),
                    describe(&e),
                )
            })?;
        }
        sqlx::migrate!("./migrations/postgres")
            .run(&mut conn)
            .await
            .map_err(|e| fail("could not migrate", e.to_string()))?;
        // Best effort: the server drops the session anyway when the socket closes.
        let _ = conn.close().await;

        let pool = PgPoolOptions::new()
            .max_connections(
                pool.max_connections
                    .unwrap_or(POSTGRES_DEFAULT_MAX_CONNECTIONS),
            )
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| fail("could not connect to", describe(&e)))?;
        Ok(PostgresPersistence { pool })
    }
}

/// `CREATE SCHEMA IF NOT EXISTS`, tolerating the race in which a concurrent caller
/// creates it between the check and the insert (PostgreSQL then reports a duplicate).
async fn create_schema(conn: &mut sqlx::PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    // `schema` passed `check_schema_name`, so it is a plain identifier, safe to splice.
    let sql = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    match sqlx::query(&sql).execute(&mut *conn).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("23505") | Some("42P06")) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Accepts `[a-z_][a-z0-9_]*` up to 63 bytes: a name that needs no quoting and means
/// the same in `CREATE SCHEMA` and in `search_path`.
fn check_schema_name(schema: &str) -> Result<(), EngineError> {
    let mut chars = schema.chars();
    let valid = schema.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(EngineError::Persistence(
            format!(
                "invalid schema name {schema:?}: use lowercase letters, digits and _ \
             (at most 63, not starting with a digit)"
            )
            .into(),
        ))
    }
}

/// Opens one connection, retrying for up to `patience` while the server refuses
/// connections (it may still be starting, e.g. next to us in a compose file).
///
/// sqlx's pool does the same retrying but then reports only "pool timed out"; doing the
/// first connection here keeps the real cause for the error message.
async fn first_connection(
    options: &PgConnectOptions,
    patience: Duration,
) -> Result<PgConnection, String> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(20);
    let mut refused: Option<String> = None;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining, options.connect()).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(sqlx::Error::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                if remaining.is_zero() {
                    return Err(e.to_string());
                }
                refused = Some(e.to_string());
                tokio::time::sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Ok(Err(e)) => return Err(describe(&e)),
            // Out of time: the last refusal says more than the timeout does.
            Err(_) => {
                return Err(refused.unwrap_or_else(|| format!("no answer within {patience:?}")));
            }
        }
    }
}

impl_persistence!(PostgresPersistence, PgRow, "BEGIN");

#[cfg(test)]
mod tests {
    use super::check_schema_name;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["gs_test_0123abcd", "_x", "tenant1"] {
            assert!(check_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Tenant",
            "a-b",
            "a b",
            "x;drop",
            &"a".repeat(64),
        ] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }
}
