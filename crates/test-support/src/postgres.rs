//! A PostgreSQL database of a test's own, created through the admin URL
//! (`GENSTREAM_TEST_POSTGRES_ADMIN_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and dropped when the test ends, also
//! on panic.

use sqlx::Connection;

/// The URL of the database tests create their databases through, checked to accept
/// connections (once per process).
///
/// # Panics
/// With one line naming PostgreSQL and `scripts/test` when it does not
/// ([`crate::services::require`]).
pub fn pg_admin_url() -> String {
    let url = std::env::var("GENSTREAM_TEST_POSTGRES_ADMIN_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    crate::services::require(crate::services::Service::Postgres, &url);
    url
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("a database URL with a path");
    format!("{server}/{name}{query}")
}

/// A PostgreSQL database of this test's own (`gs_<uuid>`), dropped (best effort, with
/// `FORCE`) when it goes.
pub struct TestDb {
    /// The admin URL it was created through.
    pub admin: String,
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates the database.
    ///
    /// # Panics
    /// When PostgreSQL cannot be reached or refuses.
    pub async fn create() -> TestDb {
        let admin = pg_admin_url();
        let name = format!("gs_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        let url = with_database(&admin, &name);
        TestDb { admin, name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop may run on the test's runtime: use a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}
