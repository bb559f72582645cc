//! The shared services a test needs, checked once per process before it uses them.
//!
//! Without Redis or PostgreSQL a test would otherwise fail deep inside, with a
//! connection error of its own (and hundreds of tests with hundreds of them), or —
//! worse — pass having tested nothing. [`require`] makes the first use of a service
//! panic with one line that names it, its address, and the script that starts it;
//! every later use in the process gives the same line without trying again. Under
//! nextest (`fail-fast`, the default) the run stops at the first such failure.
//!
//! [`crate::redis_url`] and [`crate::postgres::pg_admin_url`] call it, so every test
//! that reaches the shared services through them is covered.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

/// How long the check waits for the service to connect and answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// A shared service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Redis,
    Postgres,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Redis => "Redis",
            Service::Postgres => "PostgreSQL",
        }
    }

    fn env(self) -> &'static str {
        match self {
            Service::Redis => "GENSTREAM_TEST_REDIS_URL",
            Service::Postgres => "GENSTREAM_TEST_POSTGRES_ADMIN_URL",
        }
    }
}

/// Panics, with [`check`]'s line, unless `service` answers at `url`; checked once per
/// process and URL.
///
/// # Panics
/// When the service is not reachable.
pub fn require(service: Service, url: &str) {
    static CHECKED: Mutex<Option<HashMap<String, Result<(), String>>>> = Mutex::new(None);
    let result = {
        let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
        checked
            .get_or_insert_with(HashMap::new)
            .entry(url.to_owned())
            .or_insert_with(|| check(service, url))
            .clone()
    };
    if let Err(line) = result {
        panic!("{line}");
    }
}

/// Whether `service` answers at `url`: Redis must answer `PING` with `+PONG`;
/// PostgreSQL must accept a TCP connection. The error is one line, e.g. `Redis is not
/// reachable at 127.0.0.1:6379 (connection refused; GENSTREAM_TEST_REDIS_URL) — run
/// scripts/test, which starts it`.
pub fn check(service: Service, url: &str) -> Result<(), String> {
    let addr = host_port(service, url);
    let fail = |why: String| {
        format!(
            "{} is not reachable at {addr} ({why}; {}) — run scripts/test, which starts it",
            service.name(),
            service.env()
        )
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".into()))?;
    let mut conn =
        TcpStream::connect_timeout(&sock, CHECK_TIMEOUT).map_err(|e| fail(e.to_string()))?;
    if service == Service::Redis {
        let _ = conn.set_read_timeout(Some(CHECK_TIMEOUT));
        let mut answer = [0u8; 64];
        let n = conn
            .write_all(b"PING\r\n")
            .and_then(|()| conn.read(&mut answer))
            .map_err(|e| fail(e.to_string()))?;
        let answer = String::from_utf8_lossy(&answer[..n]);
        // `-NOAUTH` is a Redis too: the tests' own URL carries the password.
        if !answer.starts_with("+PONG") && !answer.starts_with("-NOAUTH") {
            return Err(fail(format!("it answered PING with {:?}", answer.trim())));
        }
    }
    Ok(())
}

/// `host:port` of a `redis://…` or `postgres://…` URL (default ports 6379, 5432).
fn host_port(service: Service, url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else {
        let port = match service {
            Service::Redis => 6379,
            Service::Postgres => 5432,
        };
        format!("{host}:{port}")
    }
}

/// An executable that `scripts/test` installs outside cargo (a Python venv's
/// `bin/python`, `bin/schemathesis`, …): `rel` under the directory named by the
/// environment variable `env`, or else under `default` (relative to the workspace's
/// `target/`, e.g. `openai-venv`).
///
/// # Panics
/// With one line naming `what` and `scripts/test` when the file is missing.
pub fn installed(env: &str, default: &str, rel: &str, what: &str) -> std::path::PathBuf {
    let dir = std::env::var_os(env)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target")
                .join(default)
        });
    let path = dir.join(rel);
    assert!(
        path.is_file(),
        "{what} is missing ({}): run scripts/test, which installs it",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_one_line_naming_the_service_and_the_script() {
        let addr = crate::unused_addr();
        let e = check(Service::Redis, &format!("redis://{addr}")).unwrap_err();
        assert!(
            e.starts_with(&format!("Redis is not reachable at {addr} (")),
            "{e}"
        );
        assert!(e.ends_with("— run scripts/test, which starts it"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = check(Service::Postgres, &format!("postgres://u:p@{addr}/db")).unwrap_err();
        assert!(
            e.starts_with(&format!("PostgreSQL is not reachable at {addr} (")),
            "{e}"
        );
        assert!(e.contains("GENSTREAM_TEST_POSTGRES_ADMIN_URL"), "{e}");
        // And `require` panics with that line.
        let url = format!("redis://{addr}/0");
        let panic = std::panic::catch_unwind(|| require(Service::Redis, &url)).unwrap_err();
        let msg = panic.downcast_ref::<String>().unwrap();
        assert!(msg.starts_with("Redis is not reachable"), "{msg}");
    }

    #[test]
    fn host_and_port_of_urls() {
        assert_eq!(
            host_port(Service::Redis, "redis://127.0.0.1:6379"),
            "127.0.0.1:6379"
        );
        assert_eq!(host_port(Service::Redis, "redis://:pw@h/2"), "h:6379");
        assert_eq!(
            host_port(
                Service::Postgres,
                "postgres://postgres@127.0.0.1:5432/postgres?x=1"
            ),
            "127.0.0.1:5432"
        );
    }
}
