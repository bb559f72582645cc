//! Building a server from a [`Config`] and running it until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use genstream_engine::manager::{JobManager, ModelEntry};
use genstream_engine::persist::Persistence;
use genstream_engine::store::{JobStore, MemoryStore};
use tokio::net::TcpListener;

use crate::AppState;
use crate::auth::{JwtKeys, random_secret};
use crate::config::Config;

/// Start-up failures; each is one line naming what could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Database(String),
    #[error("{0}")]
    Store(String),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Name of the database row that holds a generated JWT secret.
const SECRET_NAME: &str = "jwt_secret";

/// The database named by the config.
pub async fn open_database(config: &Config) -> Result<Arc<dyn Persistence>, ServeError> {
    let pool = genstream_sql::PoolOptions {
        max_connections: Some(config.pool.max_connections).filter(|n| *n > 0),
        acquire_timeout: config.pool.acquire_timeout,
    };
    genstream_sql::connect(&config.database, pool)
        .await
        .map_err(|e| ServeError::Database(e.to_string()))
}

/// The job store named by the config: `memory`, `redis://…` (one Redis) or
/// `redis+cluster://host:port,…` (a Redis Cluster; the same `[redis]` settings).
pub async fn open_store(config: &Config) -> Result<Arc<dyn JobStore>, ServeError> {
    match config.store.as_str() {
        "memory" => Ok(Arc::new(
            MemoryStore::new(config.log_limits()).with_max_running_per_user(
                Some(config.limits.concurrent_per_user).filter(|n| *n > 0),
            ),
        )),
        url if url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with(genstream_redis::CLUSTER_SCHEME) =>
        {
            let mut rc = genstream_redis::RedisConfig::new(url);
            rc.key_prefix.clone_from(&config.redis.key_prefix);
            rc.lease_ttl = config.redis.lease_ttl;
            rc.running_ttl = config.redis.running_ttl;
            rc.retention = config.jobs.retention;
            rc.limits = config.log_limits();
            rc.timeout = config.redis.timeout;
            rc.max_running_per_user = Some(config.limits.concurrent_per_user).filter(|n| *n > 0);
            let store = genstream_redis::RedisStore::connect(rc)
                .await
                .map_err(|e| ServeError::Store(e.to_string()))?;
            Ok(Arc::new(store))
        }
        other => Err(ServeError::Config(format!(
            "unsupported store {other:?}: use \"memory\", a redis:// URL or a \
             redis+cluster://host:port,host:port,... URL"
        ))),
    }
}

/// The JWT secret: the configured one, else the one kept in the database (created on
/// first use, so tokens survive restarts and every replica agrees).
pub async fn resolve_secret(
    config: &Config,
    db: &Arc<dyn Persistence>,
) -> Result<(String, bool), ServeError> {
    match &config.auth.jwt_secret {
        Some(s) if !s.is_empty() => Ok((s.clone(), false)),
        _ => db
            .get_or_init_secret(SECRET_NAME, &random_secret())
            .await
            .map(|s| (s, true))
            .map_err(|e| ServeError::Database(e.to_string())),
    }
}

/// Builds the state the router serves: store, database, models, manager, keys. The
/// flag is true when the secret was not configured (it lives in the database).
///
/// The config is validated first ([`Config::validate`]), so one built in code is
/// refused as one read from a file would be.
pub async fn build_state(config: &Config) -> Result<(AppState, bool), ServeError> {
    config
        .validate()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let store = open_store(config).await?;
    let db = open_database(config).await?;
    let tools =
        genstream_tools::registry(&config.tools).map_err(|e| ServeError::Config(e.to_string()))?;
    let mut models = Vec::new();
    for m in &config.models {
        let provider = genstream_providers::build(&m.provider, &config.providers, &m.options)
            .map_err(|e| ServeError::Config(e.in_model(&m.name).to_string()))?;
        let mut entry = ModelEntry::new(&m.name, provider);
        entry.pricing = m.pricing;
        for t in &m.tools {
            if tools.get(t).is_none() {
                return Err(ServeError::Config(format!(
                    "model {:?}: unknown tool {t:?}; known: {}",
                    m.name,
                    tools.names().join(", ")
                )));
            }
        }
        entry.tools.clone_from(&m.tools);
        if let Some(p) = config.providers.get(&m.provider) {
            entry.retry = p.http().retry;
            entry.timeouts = p.http().timeouts;
        }
        models.push(entry);
    }
    let (secret, generated) = resolve_secret(config, &db).await?;
    let manager = JobManager::with_tools(store, db, models, tools, config.manager_config());
    // Usage estimates count with tiktoken, whose encodings take a second to build: do
    // it before serving, so that no abort waits for one.
    manager.prepare_estimates().await;
    let webhooks = Arc::new(crate::webhooks::Webhooks::new(config.webhooks.clone()));
    manager.set_end_hook(webhooks.clone());
    Ok((
        AppState {
            manager,
            auth: Arc::new(JwtKeys::new(&secret)),
            keepalive: config.http.keepalive,
            sse_retry: config.http.sse_retry,
            sse_chunk_bytes: config.http.sse_chunk_bytes,
            trusted_proxies: Arc::new(
                crate::client_ip::parse_proxies(&config.limits.trusted_proxies)
                    .map_err(ServeError::Config)?,
            ),
            webhooks,
        },
        generated,
    ))
}

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully: new chats are
/// refused, running jobs get `jobs.shutdown_grace` to finish, the rest are
/// aborted with their partial answers saved, and the process returns.
///
/// Prints `genstream listening on http://ADDR` on stdout once it accepts connections
/// (tests read the port from it), and before it, when no secret is configured, a token
/// for user `dev` and the web app's sign-in link with that token in its fragment, and
/// `genstream metrics on http://ADDR/metrics` when `metrics_bind` is set.
pub async fn run(config: Config) -> Result<(), ServeError> {
    // The recorder first, so nothing recorded during start-up is lost.
    let prometheus = crate::observe::prometheus();
    let (state, generated) = build_state(&config).await?;
    let listener = TcpListener::bind(&config.bind)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.bind.clone(),
            source,
        })?;
    let addr = listener.local_addr()?;
    state.manager.spawn_reaper();
    let manager = state.manager.clone();
    // GET /metrics: with the API, or on a listener of its own.
    let metrics = prometheus.map(|handle| crate::observe::metrics_router(handle, manager.clone()));
    let extra = match (&config.metrics_bind, metrics) {
        (Some(bind), Some(metrics)) => {
            let listener = TcpListener::bind(bind)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: bind.clone(),
                    source,
                })?;
            let at = listener.local_addr()?;
            println!("genstream metrics on http://{at}/metrics");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, crate::observe::layers(metrics)).await {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
            axum::Router::new()
        }
        (None, Some(metrics)) => metrics,
        (_, None) => axum::Router::new(),
    };
    // With no configured secret this is a local set-up: hand the user a token at
    // every start, so the walkthrough needs no extra step.
    if generated && let Ok(token) = state.auth.mint("dev", Duration::from_secs(30 * 86_400)) {
        println!("dev token (user `dev`, 30 days): {token}");
        // The web app reads the token from the fragment, which browsers never send.
        println!("sign in: {}/#token={token}", page_url(addr));
    }
    println!("genstream listening on http://{addr}");
    tracing::info!(%addr, store = %config.store, "listening");

    let router = crate::app_with(state, config.http.max_body_bytes, extra);
    let grace = config.jobs.shutdown_grace;
    let stopped = manager.clone();
    axum::serve(
        no_delay(listener),
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new chats; waiting for running jobs");
        // Every job ends with a terminal event, which also ends its SSE streams,
        // so the HTTP server can then drain.
        stopped.shutdown(grace).await;
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}

/// The URL a browser on this machine opens the web app at: the listening address,
/// with a wildcard address (`0.0.0.0`, `::`) replaced by loopback.
fn page_url(addr: std::net::SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

/// `listener` with `TCP_NODELAY` set on every accepted socket. An SSE stream is a run
/// of small writes, one per event; with Nagle's algorithm a write that follows another
/// unacknowledged one waits for the peer's (possibly delayed) ACK. In the fan-out
/// benchmark at 200,000 events/s that put the p99 at 26–34 ms against 12–21 ms with
/// `TCP_NODELAY`; at 100,000 events/s the two were within noise (BENCHMARKS.md).
pub fn no_delay(
    listener: TcpListener,
) -> axum::serve::TapIo<TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn set(s: &mut tokio::net::TcpStream) {
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    }
    listener.tap_io(set as fn(&mut tokio::net::TcpStream))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
