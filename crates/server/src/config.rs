//! Layered configuration (SPEC §8): defaults, then `genstream.toml` (or `--config`),
//! then `GENSTREAM_*` environment variables, then command-line flags.
//!
//! Unknown keys are an error that names the key (`deny_unknown_fields` everywhere), so
//! a typo never silently falls back to a default. Environment variables map to keys by
//! lowercasing and turning `__` into a dot: `GENSTREAM_JOBS__RETENTION_SECS` is
//! `jobs.retention_secs`; `GENSTREAM_JWT_SECRET` is a shorthand for `auth.jwt_secret`.
//! `GENSTREAM_SERVER` and `GENSTREAM_TOKEN` are the CLI client's, and variables starting
//! with `GENSTREAM_TEST_` belong to the test suite; config ignores them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use genstream_engine::log::LogLimits;
use genstream_engine::manager::ManagerConfig;
use genstream_providers::ProviderConfig;
use serde::{Deserialize, Serialize};

/// The whole configuration. Field docs give the defaults.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:3080`.
    pub bind: String,
    /// Job store: `memory` (default, one process) or `redis://host:port[/db]` (any
    /// number of replicas sharing one Redis).
    pub store: String,
    /// Database URL: `sqlite://genstream.db` (default), `sqlite::memory:`,
    /// `postgres://…`.
    pub database: String,
    #[serde(default)]
    pub redis: RedisSection,
    #[serde(default)]
    pub pool: PoolSection,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub balance: BalanceConfig,
    /// Named upstreams, `[providers.NAME] kind, base_url, api_key_env`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[[models]] name, provider, tools, [models.options]`; the first is the default.
    #[serde(default = "default_models")]
    pub models: Vec<ModelConfig>,
    /// HTTP tools, `[[tools]] name, description, parameters, url, timeout_ms`. The
    /// built-in `calculator` and `current_time` need no declaration.
    #[serde(default)]
    pub tools: Vec<genstream_tools::HttpToolConfig>,
}

/// `[auth]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret. When absent, `serve` creates one and keeps it in the database, so
    /// tokens survive restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
}

/// `[jobs]`: lifetimes and caps of generation jobs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// How long a finished job's log stays resumable, in seconds. Default 3600.
    pub retention_secs: u64,
    /// A running job with no new event for this long ends with `stalled`, in seconds.
    /// Default 600.
    pub stall_timeout_secs: u64,
    /// Running jobs per replica; more → 503 `server_busy`. Default 1000.
    pub max_live_jobs: usize,
    /// Events per job log (the terminal event not counted). Default 10000.
    pub max_events_per_job: usize,
    /// Bytes per job log (the terminal event not counted). Default 8388608 (8 MiB).
    pub max_bytes_per_job: usize,
    /// On SIGTERM/SIGINT, how long running jobs may take to finish before they are
    /// aborted, in seconds. Default 30.
    pub shutdown_grace_secs: u64,
    /// How often the stall, orphan and retention reaper runs, in milliseconds.
    /// Default 5000.
    pub reap_interval_ms: u64,
    /// Model calls per job at most (the tool loop's cap); the job then ends with
    /// `final` `reason: "max_tool_iterations"`. Default 10.
    pub max_tool_iterations: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        let m = ManagerConfig::default();
        let l = LogLimits::default();
        JobsConfig {
            retention_secs: m.retention.as_secs(),
            stall_timeout_secs: m.stall_timeout.as_secs(),
            max_live_jobs: m.max_live_jobs,
            max_events_per_job: l.max_events,
            max_bytes_per_job: l.max_bytes,
            shutdown_grace_secs: 30,
            reap_interval_ms: m.reap_interval.as_millis() as u64,
            max_tool_iterations: m.max_tool_iterations,
        }
    }
}

/// `[redis]`: used when `store` is a `redis://` URL.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// Prefix of every key and channel. Default `genstream`.
    pub key_prefix: String,
    /// Replica lease, in milliseconds: a replica's running jobs are declared lost
    /// (`replica_lost`) this long after it stops renewing. Default 8000.
    pub lease_ttl_ms: u64,
    /// TTL of a running job's keys, refreshed by every event, in seconds. Default 86400.
    pub running_ttl_secs: u64,
    /// Connect and command timeout, in milliseconds. Default 2000.
    pub timeout_ms: u64,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            key_prefix: "genstream".into(),
            lease_ttl_ms: 8000,
            running_ttl_secs: 86_400,
            timeout_ms: 2000,
        }
    }
}

/// `[pool]`: the database connection pool.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    /// Connections; 0 means the default (8 for SQLite, 16 for PostgreSQL).
    pub max_connections: u32,
    /// How long a query waits for a free connection, in milliseconds; 0 means the
    /// default (5000).
    pub acquire_timeout_ms: u64,
}

/// `[limits]`: each limit holds across replicas (atomic in Redis when Redis is the
/// store); 0 turns a limit off.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Running generations per user; more → 429 `too_many_concurrent`. Default 2.
    pub concurrent_per_user: usize,
    /// Chats a user may start in any 60 s (a sliding window); more → 429
    /// `rate_limited` with `Retry-After`. Default 40.
    pub messages_per_user_per_minute: u32,
    /// The same per client IP address. Default 40.
    pub messages_per_ip_per_minute: u32,
    /// Proxies whose `X-Forwarded-For` is believed (IP addresses or CIDR ranges);
    /// from anyone else the header is ignored and the peer address counts. Default
    /// none.
    pub trusted_proxies: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            concurrent_per_user: 2,
            messages_per_user_per_minute: 40,
            messages_per_ip_per_minute: 40,
            trusted_proxies: Vec::new(),
        }
    }
}

impl LimitsConfig {
    /// Every limit off (tests, trusted internal deployments).
    pub fn off() -> Self {
        LimitsConfig {
            concurrent_per_user: 0,
            messages_per_user_per_minute: 0,
            messages_per_ip_per_minute: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[balance]`: credit balances (1 credit = 1e-6 USD). Off by default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// Refuse chats (402 `insufficient_balance`) when a user's balance is not
    /// positive. Default false.
    pub enabled: bool,
    /// Credits a new user starts with. Default 0.
    pub start_balance: f64,
    /// Credits added every `refill_interval_secs`. Default 0 (no refill).
    pub refill_amount: f64,
    /// Seconds between refills. Default 0 (no refill).
    pub refill_interval_secs: u64,
}

/// `[http]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest accepted request body, in bytes; more → 413. Default 1048576 (1 MiB).
    pub max_body_bytes: usize,
    /// Interval of `: ping` comments on SSE streams, in seconds. Default 15.
    pub keepalive_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 1024 * 1024,
            keepalive_secs: 15,
        }
    }
}

/// One `[[models]]` entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    /// `demo`, or the name of a `[providers.NAME]` section.
    pub provider: String,
    /// Tools this model may call (built-in or `[[tools]]` names). A request's `tools`
    /// may narrow the list. Default none.
    #[serde(default)]
    pub tools: Vec<String>,
    /// `[models.pricing]`: USD per million tokens; absent = free (and said so in
    /// `GET /api/models`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<genstream_engine::billing::Pricing>,
    /// Provider-specific options (demo: `tokens`, `token_delay_ms`, `behavior`, …;
    /// openai: `model`).
    #[serde(default = "empty_object")]
    pub options: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn default_models() -> Vec<ModelConfig> {
    vec![ModelConfig {
        name: "demo".into(),
        provider: "demo".into(),
        tools: Vec::new(),
        pricing: None,
        options: empty_object(),
    }]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:3080".into(),
            store: "memory".into(),
            database: "sqlite://genstream.db".into(),
            redis: RedisSection::default(),
            pool: PoolSection::default(),
            auth: AuthConfig::default(),
            jobs: JobsConfig::default(),
            http: HttpConfig::default(),
            limits: LimitsConfig::default(),
            balance: BalanceConfig::default(),
            providers: BTreeMap::new(),
            models: default_models(),
            tools: Vec::new(),
        }
    }
}

/// Command-line overrides of top-level keys.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub bind: Option<String>,
    pub database: Option<String>,
    pub store: Option<String>,
}

/// Config errors, each one line naming the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the layers. `file`: an explicit `--config` (must exist), else
    /// `genstream.toml` in the working directory if present.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(p) if !p.exists() => return Err(ConfigError::Missing(p.to_path_buf())),
            Some(p) => fig = fig.merge(Toml::file_exact(p)),
            None => {
                if Path::new("genstream.toml").exists() {
                    fig = fig.merge(Toml::file_exact("genstream.toml"));
                }
            }
        }
        fig = fig.merge(
            Env::prefixed("GENSTREAM_")
                .filter(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    // GENSTREAM_TEST_* are the test suite's, GENSTREAM_BENCH_* the
                    // benchmark's; GENSTREAM_SERVER and GENSTREAM_TOKEN are the CLI
                    // client's.
                    !(k.starts_with("test_")
                        || k.starts_with("bench_")
                        || k == "server"
                        || k == "token")
                })
                .map(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    if k == "jwt_secret" {
                        "auth.jwt_secret".into()
                    } else {
                        k.replace("__", ".").into()
                    }
                }),
        );
        if let Some(b) = &overrides.bind {
            fig = fig.merge(("bind", b));
        }
        if let Some(d) = &overrides.database {
            fig = fig.merge(("database", d));
        }
        if let Some(s) = &overrides.store {
            fig = fig.merge(("store", s));
        }
        let config: Config = fig
            .extract()
            .map_err(|e| ConfigError::Invalid(one_line(&e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one [[models]] is required".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !seen.insert(&m.name) {
                return Err(ConfigError::Invalid(format!(
                    "model {:?} is declared twice",
                    m.name
                )));
            }
        }
        if self.jobs.max_live_jobs == 0 {
            return Err(ConfigError::Invalid(
                "jobs.max_live_jobs must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The `[balance]` rules in micro-credits, whether or not balances are enabled
    /// (`genstream balance --add` gives a new user the start balance either way).
    pub fn balance_policy(&self) -> genstream_engine::billing::BalancePolicy {
        genstream_engine::billing::BalancePolicy {
            start_micro: credits_to_micro(self.balance.start_balance),
            refill_micro: credits_to_micro(self.balance.refill_amount),
            refill_interval: (self.balance.refill_interval_secs > 0
                && self.balance.refill_amount > 0.0)
                .then(|| Duration::from_secs(self.balance.refill_interval_secs)),
        }
    }

    /// The engine's settings.
    pub fn manager_config(&self) -> ManagerConfig {
        ManagerConfig {
            retention: Duration::from_secs(self.jobs.retention_secs),
            stall_timeout: Duration::from_secs(self.jobs.stall_timeout_secs),
            max_live_jobs: self.jobs.max_live_jobs,
            reap_interval: Duration::from_millis(self.jobs.reap_interval_ms.max(10)),
            max_tool_iterations: self.jobs.max_tool_iterations.max(1),
            limits: genstream_engine::manager::RateLimits {
                per_user: Some(self.limits.messages_per_user_per_minute).filter(|n| *n > 0),
                per_ip: Some(self.limits.messages_per_ip_per_minute).filter(|n| *n > 0),
                period: Duration::from_secs(60),
            },
            balance: self.balance.enabled.then(|| self.balance_policy()),
            ..ManagerConfig::default()
        }
    }

    /// The per-job log caps.
    pub fn log_limits(&self) -> LogLimits {
        LogLimits {
            max_events: self.jobs.max_events_per_job,
            max_bytes: self.jobs.max_bytes_per_job,
        }
    }
}

/// Credits (as configured, possibly fractional) in micro-credits.
pub fn credits_to_micro(credits: f64) -> i64 {
    (credits * genstream_engine::billing::MICRO as f64).round() as i64
}

fn one_line(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn layers_file_then_env_then_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "genstream.toml",
                "bind = \"127.0.0.1:1\"\nstore = \"memory\"\n[jobs]\nretention_secs = 5\n",
            )?;
            jail.set_env("GENSTREAM_BIND", "127.0.0.1:2");
            jail.set_env("GENSTREAM_JOBS__STALL_TIMEOUT_SECS", "7");
            jail.set_env("GENSTREAM_JWT_SECRET", "from-env");
            jail.set_env("GENSTREAM_TEST_SOMETHING", "ignored");
            jail.set_env("GENSTREAM_TOKEN", "the client's, ignored");
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.bind, "127.0.0.1:2", "env beats file");
            assert_eq!(c.jobs.retention_secs, 5, "file beats defaults");
            assert_eq!(c.jobs.stall_timeout_secs, 7);
            assert_eq!(c.auth.jwt_secret.as_deref(), Some("from-env"));
            assert_eq!(c.database, "sqlite://genstream.db", "default");
            assert_eq!(c.models[0].name, "demo");
            let o = Overrides {
                bind: Some("127.0.0.1:3".into()),
                ..Default::default()
            };
            let c = Config::load(None, &o).map_err(|e| e.to_string())?;
            assert_eq!(c.bind, "127.0.0.1:3", "flags beat env");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors_that_name_them() {
        Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[http]\nmax_body = 5\n")?;
            let e = Config::load(Some(Path::new("a.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("max_body"), "{e}");
            jail.create_file("b.toml", "bnid = \"x\"\n")?;
            let e = Config::load(Some(Path::new("b.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("bnid"), "{e}");
            jail.set_env("GENSTREAM_STOER", "memory");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().to_lowercase().contains("stoer"), "{e}");
            let e =
                Config::load(Some(Path::new("missing.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("missing.toml"), "{e}");
            Ok(())
        });
    }
}
