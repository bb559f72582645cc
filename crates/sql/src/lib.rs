//! SQLite and PostgreSQL storage for genstream's conversations, messages, billing ledger
//! and balances.
//!
//! The engine talks to its database only through
//! [`genstream_engine::persist::Persistence`]; this crate provides the two real
//! implementations, [`SqlitePersistence`] and [`PostgresPersistence`]. Most callers
//! need neither by name: [`connect`] reads the URL's scheme, opens a pool, brings the
//! schema up to date and hands back an `Arc<dyn Persistence>`, which is all the server
//! keeps.
//!
//! A few choices shape the code:
//!
//! - **One SQL text for both dialects.** Every statement is written in the subset that
//!   SQLite and PostgreSQL share (`$1` placeholders, `INSERT … ON CONFLICT … DO
//!   UPDATE`/`DO NOTHING`, `excluded.`), so both implementations are generated from a
//!   single body and cannot drift apart. Only the migrations, which need each dialect's
//!   types, are written twice (`migrations/sqlite`, `migrations/postgres`).
//! - **Runtime-bound queries.** `sqlx::query` rather than the `query!` macros, so the
//!   crate builds without a database or a `DATABASE_URL`.
//! - **Text in, the same text out.** Timestamps are stored as the RFC 3339 strings the
//!   engine gives and `content` as serde_json's text, so what is read back compares
//!   equal to what was written, byte for byte, in both databases.
//! - **One contract, one test suite.** [`suite`] holds the behaviour every
//!   `Persistence` must have; the crate's tests run it against the in-memory
//!   reference, SQLite (file and memory) and a real PostgreSQL.
//! - **Errors that say what failed.** Database failures become
//!   [`EngineError::Persistence`] with the operation named; a failure to connect names
//!   the database, with any password removed from the URL ([`redact_url`]).

use std::sync::Arc;
use std::time::Duration;

use genstream_engine::EngineError;
use genstream_engine::persist::Persistence;

mod imp;
mod postgres;
mod sqlite;
#[doc(hidden)]
pub mod suite;

pub use postgres::PostgresPersistence;
pub use sqlite::SqlitePersistence;

/// Size and patience of a connection pool.
///
/// `PoolOptions::default()` suits a server: the backend's default pool size and a
/// 5 s acquire timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    /// Most connections the pool opens; `None` for the backend's default
    /// ([`SQLITE_DEFAULT_MAX_CONNECTIONS`], [`POSTGRES_DEFAULT_MAX_CONNECTIONS`]).
    /// An in-memory SQLite database always uses exactly one connection.
    pub max_connections: Option<u32>,
    /// How long a query waits for a free connection, and how long [`connect`] keeps
    /// retrying a server that refuses connections (one that is still starting up).
    pub acquire_timeout: Duration,
}

/// Default pool size for SQLite: writers serialize on the file anyway, so a few
/// connections serve concurrent readers (WAL) without contention.
pub const SQLITE_DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// Default pool size for PostgreSQL, per replica.
pub const POSTGRES_DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// Default [`PoolOptions::acquire_timeout`].
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_connections: None,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
        }
    }
}

/// Opens the database named by `url` and migrates it to the current schema.
///
/// - `sqlite://PATH` (or `sqlite:PATH`): a file, created if missing, in WAL mode with a
///   5 s busy timeout and foreign keys on.
/// - `sqlite::memory:`: a private in-memory database, gone when the returned value is
///   dropped (for tests).
/// - `postgres://…` or `postgresql://…`: a PostgreSQL server.
///
/// Errors: [`EngineError::Persistence`] with one line naming the database (password
/// removed) and why it could not be opened or migrated, e.g. `could not connect to
/// postgres://app@db:5432/genstream: Connection refused (os error 111)`.
pub async fn connect(url: &str, pool: PoolOptions) -> Result<Arc<dyn Persistence>, EngineError> {
    match Backend::of(url)? {
        Backend::Sqlite => Ok(Arc::new(SqlitePersistence::connect(url, &pool).await?)),
        Backend::Postgres => Ok(Arc::new(
            PostgresPersistence::connect(url, None, &pool).await?,
        )),
    }
}

/// Like [`connect`], but for PostgreSQL keeps every table in the schema `schema`
/// (created if missing) by setting the connections' `search_path` to it.
///
/// For tests, which give each run a fresh schema so that parallel runs never see each
/// other's rows, and for deployments that keep several tenants in one database.
/// `schema` must be a lowercase SQL identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes).
///
/// Errors: as [`connect`]; also when `url` is not a PostgreSQL URL (SQLite has no
/// schemas) or `schema` is not a valid name.
pub async fn connect_with_schema(
    url: &str,
    schema: &str,
    pool: PoolOptions,
) -> Result<Arc<dyn Persistence>, EngineError> {
    match Backend::of(url)? {
        Backend::Sqlite => Err(EngineError::Persistence(
            format!(
                "a schema ({schema}) can only be chosen for PostgreSQL, not for {}",
                redact_url(url)
            )
            .into(),
        )),
        Backend::Postgres => Ok(Arc::new(
            PostgresPersistence::connect(url, Some(schema), &pool).await?,
        )),
    }
}

/// Which implementation a URL selects.
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn of(url: &str) -> Result<Backend, EngineError> {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(EngineError::Persistence(format!(
                "unsupported database URL {} (expected sqlite://PATH, sqlite::memory: or postgres://…)",
                redact_url(url)
            ).into())),
        }
    }
}

/// `url` with any password removed, fit for logs and error messages:
/// `postgres://app:secret@db/x?password=y` becomes `postgres://app@db/x`.
///
/// Total over any input: a string that is not a URL comes back unchanged, except that
/// a `user:password@` part is still stripped.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The query string, if any, starts at the first `?`; the user info ends at the
    // last `@` before it (a password may itself contain `/` or `@`).
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}://");
    match before_query.rsplit_once('@') {
        Some((userinfo, host_and_path)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if !user.is_empty() {
                out.push_str(user);
                out.push('@');
            }
            out.push_str(host_and_path);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| {
                let key = kv.split_once('=').map_or(*kv, |(k, _)| k);
                !key.eq_ignore_ascii_case("password")
            })
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_strips_passwords() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/genstream",
                "postgres://app@db:5432/genstream",
            ),
            (
                "postgres://app:p@ss/w@rd@db/x?sslmode=require&password=y",
                "postgres://app@db/x?sslmode=require",
            ),
            ("postgresql://db/x?password=y", "postgresql://db/x"),
            ("postgres://:pw@db/x", "postgres://db/x"),
            (
                "postgres://postgres@127.0.0.1:5432/test",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            ("sqlite://./genstream.db", "sqlite://./genstream.db"),
            ("sqlite::memory:", "sqlite::memory:"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_url(input), want, "{input}");
        }
    }

    #[test]
    fn backend_is_chosen_by_scheme() {
        assert!(matches!(
            Backend::of("sqlite::memory:"),
            Ok(Backend::Sqlite)
        ));
        assert!(matches!(Backend::of("sqlite://x.db"), Ok(Backend::Sqlite)));
        assert!(matches!(
            Backend::of("postgres://h/d"),
            Ok(Backend::Postgres)
        ));
        assert!(matches!(
            Backend::of("postgresql://h/d"),
            Ok(Backend::Postgres)
        ));
        let Err(err) = Backend::of("mysql://u:pw@h/d") else {
            unreachable!("mysql is not supported")
        };
        let msg = err.to_string();
        assert!(
            msg.contains("unsupported database URL mysql://u@h/d"),
            "{msg}"
        );
    }
}
