//! Layered configuration (docs/protocol.md §8): defaults, then `genstream.toml` (or `--config`),
//! then `GENSTREAM_*` environment variables, then command-line flags.
//!
//! Every problem is a start-up error that names the key, never a silent fallback:
//! - unknown keys are refused (`deny_unknown_fields` everywhere), so a typo never falls
//!   back to a default;
//! - durations are strings with their unit, in humantime's syntax (`"500ms"`, `"30s"`,
//!   `"1h"`), under keys that carry no unit (`jobs.retention`); the keys of earlier
//!   releases (`jobs.retention_secs`, `redis.lease_ttl_ms`, …) are refused with a
//!   message that names the new key;
//! - a value outside its allowed range is refused with the key and the range
//!   ([`Config::validate`]), never clamped;
//! - `[providers.NAME]` is tagged by `kind` (`openai` or `anthropic`), and a model's
//!   `[models.options]` are read as the shape its provider's kind chooses
//!   (`genstream_providers::config`). That choice needs the providers section while
//!   the models are read, which serde cannot give: so the config is first read as
//!   [`ConfigFile`] (options untyped) and then turned into a [`Config`] (options typed).
//!
//! Environment variables map to keys by lowercasing and turning `__` into a dot:
//! `GENSTREAM_JOBS__RETENTION=10m` is `jobs.retention`; `GENSTREAM_JWT_SECRET` is a
//! shorthand for `auth.jwt_secret`. `GENSTREAM_SERVER` and `GENSTREAM_TOKEN` are the CLI
//! client's, and variables starting with `GENSTREAM_TEST_` or `GENSTREAM_BENCH_` belong
//! to the test suite and the benchmarks; config ignores them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use genstream_engine::billing::Pricing;
use genstream_engine::log::LogLimits;
use genstream_engine::manager::ManagerConfig;
use genstream_providers::config::{DAY, HOUR, MINUTE, MS, check_count, check_duration};
use genstream_providers::{DEMO, InvalidValue, ModelOptions, ProviderConfig};
use serde::{Deserialize, Serialize};

/// Thirty days, the longest retention, TTL and refill interval.
const MONTH: Duration = Duration::from_secs(30 * 86_400);
/// One second.
const SECOND: Duration = Duration::from_secs(1);

/// The whole configuration. Field docs give the defaults; [`Config::validate`] the
/// allowed ranges.
///
/// Deserializing one goes through [`ConfigFile`], which reads each model's options as
/// the shape its provider's kind chooses and then validates the whole.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "ConfigFile")]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:3080`.
    pub bind: String,
    /// Job store: `memory` (default, one process), `redis://host:port[/db]` (any
    /// number of replicas sharing one Redis) or
    /// `redis+cluster://host:port,host:port,...` (replicas sharing a Redis Cluster, the
    /// listed nodes being seeds; `[redis]` applies the same).
    pub store: String,
    /// Database URL: `sqlite://genstream.db` (default), `sqlite::memory:`,
    /// `postgres://…`.
    pub database: String,
    /// Where `GET /metrics` is served: absent (default) = on `bind`, with the API;
    /// an address = there only, apart from the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_bind: Option<String>,
    pub log: crate::observe::LogConfig,
    pub redis: RedisSection,
    pub pool: PoolSection,
    pub auth: AuthConfig,
    pub jobs: JobsConfig,
    pub http: HttpConfig,
    pub limits: LimitsConfig,
    pub balance: BalanceConfig,
    /// `[webhooks]`: job-finished webhooks (`crate::webhooks`). Off by default.
    pub webhooks: crate::webhooks::WebhooksConfig,
    /// Named upstreams, `[providers.NAME] kind, base_url, api_key_env, retry,
    /// timeouts`.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[[models]] name, provider, tools, pricing, options`; the first is the default.
    pub models: Vec<ModelConfig>,
    /// HTTP tools, `[[tools]] name, description, parameters, url, timeout`. The
    /// built-in `calculator` and `current_time` need no declaration.
    pub tools: Vec<genstream_tools::HttpToolConfig>,
}

/// [`Config`] as it is written: the same keys, with each model's options still an
/// untyped table, because their shape depends on the provider section the model
/// names. Every section but the models is already its final type.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    bind: String,
    store: String,
    database: String,
    #[serde(default)]
    metrics_bind: Option<String>,
    #[serde(default)]
    log: crate::observe::LogConfig,
    #[serde(default)]
    redis: RedisSection,
    #[serde(default)]
    pool: PoolSection,
    #[serde(default)]
    auth: AuthConfig,
    #[serde(default)]
    jobs: JobsConfig,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    balance: BalanceConfig,
    #[serde(default)]
    webhooks: crate::webhooks::WebhooksConfig,
    #[serde(default)]
    providers: BTreeMap<String, ProviderConfig>,
    #[serde(default = "default_model_files")]
    models: Vec<ModelFile>,
    #[serde(default)]
    tools: Vec<genstream_tools::HttpToolConfig>,
}

/// One `[[models]]` entry as written: [`ModelConfig`] with untyped options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    name: String,
    provider: String,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    pricing: Option<Pricing>,
    #[serde(default)]
    options: Option<Value>,
}

fn default_model_files() -> Vec<ModelFile> {
    vec![ModelFile {
        name: DEMO.into(),
        provider: DEMO.into(),
        tools: Vec::new(),
        pricing: None,
        options: None,
    }]
}

impl TryFrom<ConfigFile> for Config {
    type Error = String;

    /// Reads each model's options as its provider's kind says, then validates.
    fn try_from(file: ConfigFile) -> Result<Config, String> {
        let mut models = Vec::with_capacity(file.models.len());
        for (i, m) in file.models.into_iter().enumerate() {
            let in_model = |e: String| format!("model `{}` (models[{i}]): {e}", m.name);
            let kind = genstream_providers::kind_of(&m.provider, &file.providers)
                .map_err(|e| in_model(e.to_string()))?;
            let raw = m.options.unwrap_or_else(|| Value::from(Dict::new()));
            let options = ModelOptions::deserialize_for(kind, &raw).map_err(|e| {
                let key = format!("models[{i}].options");
                in_model(format!(
                    "provider `{}` (kind {kind}): {}",
                    m.provider,
                    explain(&e, &key, |path| walk(&raw, path))
                ))
            })?;
            models.push(ModelConfig {
                name: m.name,
                provider: m.provider,
                tools: m.tools,
                pricing: m.pricing,
                options,
            });
        }
        let config = Config {
            bind: file.bind,
            store: file.store,
            database: file.database,
            metrics_bind: file.metrics_bind,
            log: file.log,
            redis: file.redis,
            pool: file.pool,
            auth: file.auth,
            jobs: file.jobs,
            http: file.http,
            limits: file.limits,
            balance: file.balance,
            webhooks: file.webhooks,
            providers: file.providers,
            models,
            tools: file.tools,
        };
        config.check().map_err(|e| match e {
            ConfigError::Invalid(message) => message,
            other => other.to_string(),
        })?;
        Ok(config)
    }
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
    /// How long a finished job's log stays resumable. Default `"1h"`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// A running job with no new event for this long ends with `stalled`. Default
    /// `"10m"`.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Running jobs per replica; more → 503 `server_busy`. Default 1000.
    pub max_live_jobs: usize,
    /// Events per job log (the terminal event not counted). Default 10000.
    pub max_events_per_job: usize,
    /// Bytes per job log (the terminal event not counted). Default 8388608 (8 MiB).
    pub max_bytes_per_job: usize,
    /// On SIGTERM/SIGINT, how long running jobs may take to finish before they are
    /// aborted. Default `"30s"`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often the stall, orphan and retention reaper runs. Default `"5s"`.
    #[serde(with = "humantime_serde")]
    pub reap_interval: Duration,
    /// Model calls per job at most (the tool loop's cap); the job then ends with
    /// `final` `reason: "max_tool_iterations"`. Default 10.
    pub max_tool_iterations: u32,
    /// How long an `Idempotency-Key` answers with its first start's ids, counted from
    /// the start (keys are per user). Default `"24h"`, past the log's retention, so a
    /// client retrying a lost answer the next day is still not billed twice.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        let m = ManagerConfig::default();
        let l = LogLimits::default();
        JobsConfig {
            retention: m.retention,
            stall_timeout: m.stall_timeout,
            max_live_jobs: m.max_live_jobs,
            max_events_per_job: l.max_events,
            max_bytes_per_job: l.max_bytes,
            shutdown_grace: Duration::from_secs(30),
            reap_interval: m.reap_interval,
            max_tool_iterations: m.max_tool_iterations,
            idempotency_ttl: m.idempotency_ttl,
        }
    }
}

/// `[redis]`: used when `store` is a `redis://` or `redis+cluster://` URL.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// Prefix of every key and channel. Default `genstream`.
    pub key_prefix: String,
    /// Replica lease: a replica's running jobs are declared lost (`replica_lost`) this
    /// long after it stops renewing. Default `"8s"`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// TTL of a running job's keys, refreshed by every event. Default `"1day"`.
    #[serde(with = "humantime_serde")]
    pub running_ttl: Duration,
    /// Connect and command timeout. Default `"2s"`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            key_prefix: "genstream".into(),
            lease_ttl: Duration::from_secs(8),
            running_ttl: DAY,
            timeout: Duration::from_secs(2),
        }
    }
}

/// `[pool]`: the database connection pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    /// Connections; 0 means the database's default (8 for SQLite, 16 for PostgreSQL).
    pub max_connections: u32,
    /// How long a query waits for a free connection (and how long start-up waits for
    /// a database that is still starting). Default `"5s"`.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            max_connections: 0,
            acquire_timeout: genstream_sql::DEFAULT_ACQUIRE_TIMEOUT,
        }
    }
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
    /// Credits added every `refill_interval`. Default 0 (no refill).
    pub refill_amount: f64,
    /// Time between refills. Default `"0s"` (no refill).
    #[serde(with = "humantime_serde")]
    pub refill_interval: Duration,
}

/// `[http]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest accepted request body, in bytes; more → 413. Default 1048576 (1 MiB).
    pub max_body_bytes: usize,
    /// Interval of `: ping` comments on SSE streams. Default `"15s"`.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// The `retry:` field every SSE response opens with, the time a browser's
    /// EventSource waits before it reconnects (sent in ms). Default `"1s"`.
    #[serde(with = "humantime_serde")]
    pub sse_retry: Duration,
    /// Most bytes of consecutive frames one SSE subscriber hands the socket as one
    /// chunk when it is behind (a slice of the event log, never a copy); a frame is
    /// never split, so a larger frame still goes alone. 0: one frame per chunk.
    /// Default 16384.
    pub sse_chunk_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 1024 * 1024,
            keepalive: Duration::from_secs(15),
            sse_retry: SECOND,
            sse_chunk_bytes: 16 * 1024,
        }
    }
}

/// One `[[models]]` entry.
#[derive(Clone, Debug, Serialize)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    /// `demo`, or the name of a `[providers.NAME]` section.
    pub provider: String,
    /// Tools this model may call (built-in or `[[tools]]` names). A request's `tools`
    /// may narrow the list. Default none.
    pub tools: Vec<String>,
    /// `[models.pricing]`: USD per million tokens; absent = free (and said so in
    /// `GET /api/models`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// `[models.options]`, of the shape the provider's kind chooses (demo: `tokens`,
    /// `token_delay`, `behavior`, …; openai: `model`; anthropic: `model`,
    /// `max_tokens`, `thinking_budget_tokens`).
    pub options: ModelOptions,
}

impl ModelConfig {
    /// A model of the built-in demo provider with these options.
    pub fn demo(name: impl Into<String>, options: genstream_providers::DemoOptions) -> Self {
        ModelConfig {
            name: name.into(),
            provider: DEMO.into(),
            tools: Vec::new(),
            pricing: None,
            options: ModelOptions::Demo(options),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:3080".into(),
            store: "memory".into(),
            database: "sqlite://genstream.db".into(),
            metrics_bind: None,
            log: Default::default(),
            redis: RedisSection::default(),
            pool: PoolSection::default(),
            auth: AuthConfig::default(),
            jobs: JobsConfig::default(),
            http: HttpConfig::default(),
            limits: LimitsConfig::default(),
            balance: BalanceConfig::default(),
            webhooks: Default::default(),
            providers: BTreeMap::new(),
            models: vec![ModelConfig::demo(DEMO, Default::default())],
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

impl From<InvalidValue> for ConfigError {
    fn from(e: InvalidValue) -> Self {
        ConfigError::Invalid(e.to_string())
    }
}

impl Config {
    /// Loads the layers. `file`: an explicit `--config` (must exist), else
    /// `genstream.toml` in the working directory if present.
    ///
    /// # Errors
    /// [`ConfigError::Missing`] for a `--config` that does not exist;
    /// [`ConfigError::Invalid`] for anything else, one `; `-separated message per
    /// problem, each naming the key (and, for a renamed key, its new name).
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
        // Deserializing a Config also types the models' options and validates.
        fig.extract().map_err(|e| {
            ConfigError::Invalid(explain(&e, "", |path| {
                let (top, rest) = path.split_once('.').unwrap_or((path, ""));
                walk(&fig.find_value(top).ok()?, rest)
            }))
        })
    }

    /// Checks every value serde cannot: ranges, unique model names, that each model's
    /// options are of its provider's kind. [`Config::load`] (and deserializing a
    /// `Config` any other way) runs it; `serve` runs it again, for configs built in
    /// code.
    ///
    /// Ranges: `jobs.retention`, `jobs.stall_timeout`, `jobs.idempotency_ttl` 1s to
    /// 30days;
    /// `jobs.shutdown_grace` 0s to 1day; `jobs.reap_interval` 10ms to 1h;
    /// `jobs.max_live_jobs`, `jobs.max_events_per_job`, `jobs.max_bytes_per_job` at
    /// least 1; `jobs.max_tool_iterations` 1 to 1000; `redis.lease_ttl` 300ms to 1day;
    /// `redis.running_ttl` 1s to 30days; `redis.timeout` 50ms to 10m;
    /// `pool.acquire_timeout` 1ms to 10m; `http.keepalive` 1s to 1h;
    /// `http.sse_retry` 100ms to 1h; `http.sse_chunk_bytes` at most 1048576;
    /// `http.max_body_bytes` at least 1; `balance.refill_interval` 0s to 30days;
    /// `[[tools]] timeout` 1ms to 1h; and those of `genstream_providers::config` for
    /// the provider sections and model options.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first key at fault and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check()
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.webhooks.validate().map_err(ConfigError::Invalid)?;
        let j = &self.jobs;
        check_duration("jobs.retention", j.retention, SECOND, MONTH)?;
        check_duration("jobs.stall_timeout", j.stall_timeout, SECOND, MONTH)?;
        check_duration("jobs.idempotency_ttl", j.idempotency_ttl, SECOND, MONTH)?;
        check_duration("jobs.shutdown_grace", j.shutdown_grace, Duration::ZERO, DAY)?;
        check_duration("jobs.reap_interval", j.reap_interval, 10 * MS, HOUR)?;
        check_count("jobs.max_live_jobs", j.max_live_jobs as u64, 1, None)?;
        check_count(
            "jobs.max_events_per_job",
            j.max_events_per_job as u64,
            1,
            None,
        )?;
        check_count(
            "jobs.max_bytes_per_job",
            j.max_bytes_per_job as u64,
            1,
            None,
        )?;
        check_count(
            "jobs.max_tool_iterations",
            j.max_tool_iterations.into(),
            1,
            Some(1000),
        )?;
        let r = &self.redis;
        check_duration("redis.lease_ttl", r.lease_ttl, 300 * MS, DAY)?;
        check_duration("redis.running_ttl", r.running_ttl, SECOND, MONTH)?;
        check_duration("redis.timeout", r.timeout, 50 * MS, 10 * MINUTE)?;
        check_duration(
            "pool.acquire_timeout",
            self.pool.acquire_timeout,
            MS,
            10 * MINUTE,
        )?;
        check_duration("http.keepalive", self.http.keepalive, SECOND, HOUR)?;
        check_duration("http.sse_retry", self.http.sse_retry, 100 * MS, HOUR)?;
        check_count(
            "http.sse_chunk_bytes",
            self.http.sse_chunk_bytes as u64,
            0,
            Some(1024 * 1024),
        )?;
        check_count(
            "http.max_body_bytes",
            self.http.max_body_bytes as u64,
            1,
            None,
        )?;
        check_duration(
            "balance.refill_interval",
            self.balance.refill_interval,
            Duration::ZERO,
            MONTH,
        )?;
        for (i, t) in self.tools.iter().enumerate() {
            check_duration(&format!("tools[{i}].timeout"), t.timeout, MS, HOUR)?;
        }
        if self.providers.contains_key(DEMO) {
            return Err(ConfigError::Invalid(format!(
                "[providers.{DEMO}]: `{DEMO}` is the built-in demo provider's name; give the section another name"
            )));
        }
        for (name, p) in &self.providers {
            p.validate()
                .map_err(|e| e.under(&format!("providers.{name}")))?;
        }
        if self.models.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one [[models]] is required".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let in_model =
                |e: String| ConfigError::Invalid(format!("model `{}` (models[{i}]): {e}", m.name));
            if !seen.insert(&m.name) {
                return Err(in_model("declared twice".into()));
            }
            let kind = genstream_providers::kind_of(&m.provider, &self.providers)
                .map_err(|e| in_model(e.to_string()))?;
            if m.options.kind() != kind {
                return Err(in_model(format!(
                    "provider `{}` is of kind {kind}, but the options are for {}",
                    m.provider,
                    m.options.kind()
                )));
            }
            m.options
                .validate()
                .map_err(|e| in_model(e.under(&format!("models[{i}].options")).to_string()))?;
        }
        Ok(())
    }

    /// The `[balance]` rules in micro-credits, whether or not balances are enabled
    /// (`genstream balance --add` gives a new user the start balance either way).
    pub fn balance_policy(&self) -> genstream_engine::billing::BalancePolicy {
        genstream_engine::billing::BalancePolicy {
            start_micro: credits_to_micro(self.balance.start_balance),
            refill_micro: credits_to_micro(self.balance.refill_amount),
            refill_interval: (!self.balance.refill_interval.is_zero()
                && self.balance.refill_amount > 0.0)
                .then_some(self.balance.refill_interval),
        }
    }

    /// The engine's settings.
    pub fn manager_config(&self) -> ManagerConfig {
        ManagerConfig {
            retention: self.jobs.retention,
            stall_timeout: self.jobs.stall_timeout,
            max_live_jobs: self.jobs.max_live_jobs,
            reap_interval: self.jobs.reap_interval,
            max_tool_iterations: self.jobs.max_tool_iterations,
            idempotency_ttl: self.jobs.idempotency_ttl,
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

/// The value at dotted `path` in `v`, where a number indexes an array
/// (`models.0.options`); `v` itself for an empty path.
fn walk(v: &Value, path: &str) -> Option<Value> {
    let mut v = v;
    for key in path.split('.').filter(|k| !k.is_empty()) {
        v = match v {
            Value::Dict(_, d) => d.get(key)?,
            Value::Array(_, a) => a.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v.clone())
}

/// figment's errors as one line, `; `-separated. `prefix` is the dotted path of the
/// table the errors' paths are relative to (`models[0].options`, or empty), and `find`
/// looks up a value by a path relative to it.
fn explain(e: &figment::Error, prefix: &str, find: impl Fn(&str) -> Option<Value>) -> String {
    e.clone()
        .into_iter()
        .map(|e| {
            // figment names the key only for errors it can place in a source; the
            // options table is deserialized apart, so its keys are named here.
            let mut message = match (&e.metadata, e.path.is_empty()) {
                (None, false) => format!("{e} for key `{}`", dotted(prefix, &e.path)),
                (None, true) if !prefix.is_empty() => format!("{e} in `{prefix}`"),
                _ => e.to_string(),
            };
            if let Some(hint) = renamed_key_hint(&e, prefix, &find) {
                message.push_str("; ");
                message.push_str(&hint);
            }
            message
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// For an unknown key of an earlier release that only lost its unit suffix
/// (`retention_secs` → `retention`, `lease_ttl_ms` → `lease_ttl`), its new name and its
/// value rewritten with the unit (and, when it came from the environment, the new
/// variable).
fn renamed_key_hint(
    e: &figment::Error,
    prefix: &str,
    find: impl Fn(&str) -> Option<Value>,
) -> Option<String> {
    let figment::error::Kind::UnknownField(field, expected) = &e.kind else {
        return None;
    };
    let (new, unit) = [("_secs", "s"), ("_ms", "ms")]
        .into_iter()
        .find_map(|(suffix, unit)| {
            let new = field.strip_suffix(suffix)?;
            expected.contains(&new).then_some((new, unit))
        })?;
    // The error's path ends with the field when figment knows where it is.
    let mut path = e.path.clone();
    if path.last() != Some(field) {
        path.push(field.clone());
    }
    let old = find(&path.join("."))
        .and_then(|v| v.to_num_lossy())
        .and_then(|n| n.to_u128().or_else(|| u128::try_from(n.to_i128()?).ok()));
    let value = format!("{}{unit}", old.unwrap_or(500));
    let mut hint = format!(
        "`{field}` was renamed `{new}`: a duration, written with its unit, e.g. {new} = \"{value}\""
    );
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    if from_env {
        path.pop();
        path.push(new.to_owned());
        let var = dotted(prefix, &path)
            .replace('.', "__")
            .to_ascii_uppercase();
        hint.push_str(&format!(" (GENSTREAM_{var}={value})"));
    }
    Some(hint)
}

/// `prefix.a.b` (or `a.b` for an empty prefix).
fn dotted(prefix: &str, path: &[String]) -> String {
    std::iter::once(prefix)
        .chain(path.iter().map(String::as_str))
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    /// The error of loading `toml` as the config file.
    fn load_err(jail: &mut Jail, toml: &str) -> figment::error::Result<String> {
        jail.create_file("c.toml", toml)?;
        match Config::load(Some(Path::new("c.toml")), &Overrides::default()) {
            Ok(_) => Err(format!("accepted:\n{toml}").into()),
            Err(e) => Ok(e.to_string()),
        }
    }

    fn has(e: &str, parts: &[&str]) -> figment::error::Result<()> {
        for p in parts {
            if !e.contains(p) {
                return Err(format!("{p:?} missing from: {e}").into());
            }
        }
        Ok(())
    }

    #[test]
    fn layers_file_then_env_then_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "genstream.toml",
                "bind = \"127.0.0.1:1\"\nstore = \"memory\"\n[jobs]\nretention = \"5s\"\n",
            )?;
            jail.set_env("GENSTREAM_BIND", "127.0.0.1:2");
            jail.set_env("GENSTREAM_JOBS__STALL_TIMEOUT", "7s");
            jail.set_env("GENSTREAM_HTTP__SSE_RETRY", "2500ms");
            jail.set_env("GENSTREAM_JWT_SECRET", "from-env");
            jail.set_env("GENSTREAM_TEST_SOMETHING", "ignored");
            jail.set_env("GENSTREAM_TOKEN", "the client's, ignored");
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.bind, "127.0.0.1:2", "env beats file");
            assert_eq!(
                c.jobs.retention,
                Duration::from_secs(5),
                "file beats defaults"
            );
            assert_eq!(c.jobs.stall_timeout, Duration::from_secs(7));
            assert_eq!(c.http.sse_retry, Duration::from_millis(2500));
            assert_eq!(Config::default().http.sse_retry, Duration::from_secs(1));
            assert_eq!(c.auth.jwt_secret.as_deref(), Some("from-env"));
            assert_eq!(c.database, "sqlite://genstream.db", "default");
            assert_eq!(c.models[0].name, "demo");
            assert_eq!(c.models[0].options, ModelOptions::default());
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
            let e = load_err(jail, "[http]\nmax_body = 5\n")?;
            has(&e, &["max_body"])?;
            let e = load_err(jail, "bnid = \"x\"\n")?;
            has(&e, &["bnid"])?;
            jail.set_env("GENSTREAM_STOER", "memory");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().to_lowercase().contains("stoer"), "{e}");
            let e =
                Config::load(Some(Path::new("missing.toml")), &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("missing.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn durations_are_strings_with_a_unit() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[redis]\nlease_ttl = \"1s 500ms\"\nrunning_ttl = \"2days\"\n\
                 [balance]\nrefill_interval = \"1h\"\n",
            )?;
            let c = Config::load(Some(Path::new("c.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(c.redis.lease_ttl, Duration::from_millis(1500));
            assert_eq!(c.redis.running_ttl, 2 * DAY);
            assert_eq!(c.balance.refill_interval, HOUR);
            // A bare number has no unit: refused, naming the key.
            let e = load_err(jail, "[jobs]\nretention = 600\n")?;
            has(&e, &["jobs.retention", "duration"])?;
            Ok(())
        });
    }

    #[test]
    fn a_value_out_of_range_names_the_key_and_the_range() {
        Jail::expect_with(|jail| {
            // Each of these was clamped before; now each is refused.
            for (toml, parts) in [
                (
                    "[redis]\nlease_ttl = \"100ms\"\n",
                    &["`redis.lease_ttl`: 100ms is out of range, allowed 300ms to 1day"][..],
                ),
                (
                    "[redis]\ntimeout = \"10ms\"\n",
                    &["`redis.timeout`", "50ms to 10m"],
                ),
                (
                    "[redis]\nrunning_ttl = \"0s\"\n",
                    &["`redis.running_ttl`", "1s to 30days"],
                ),
                (
                    "[jobs]\nretention = \"500ms\"\n",
                    &["`jobs.retention`", "1s to 30days"],
                ),
                (
                    "[jobs]\nidempotency_ttl = \"31days\"\n",
                    &["`jobs.idempotency_ttl`", "1s to 30days"],
                ),
                (
                    "[http]\nkeepalive = \"0s\"\n",
                    &["`http.keepalive`", "1s to 1h"],
                ),
                (
                    "[http]\nsse_retry = \"10ms\"\n",
                    &["`http.sse_retry`", "100ms to 1h"],
                ),
                (
                    "[jobs]\nreap_interval = \"1ms\"\n",
                    &["`jobs.reap_interval`", "10ms to 1h"],
                ),
                (
                    "[jobs]\nmax_tool_iterations = 0\n",
                    &["`jobs.max_tool_iterations`: 0 is out of range, allowed 1 to 1000"],
                ),
                (
                    "[jobs]\nmax_live_jobs = 0\n",
                    &["`jobs.max_live_jobs`", "at least 1"],
                ),
                (
                    "[providers.p]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n\
                     [providers.p.timeouts]\nidle = \"2h\"\n",
                    &["`providers.p.timeouts.idle`: 2h is out of range, allowed 1ms to 1h"],
                ),
                (
                    "[[models]]\nname = \"d\"\nprovider = \"demo\"\n\
                     [models.options]\ntoken_delay = \"2h\"\n",
                    &["model `d`", "`models[0].options.token_delay`", "0s to 1h"],
                ),
                (
                    "[[tools]]\nname = \"t\"\ndescription = \"d\"\nurl = \"http://x/\"\n\
                     timeout = \"0s\"\n",
                    &["`tools[0].timeout`", "1ms to 1h"],
                ),
            ] {
                let e = load_err(jail, toml)?;
                has(&e, parts)?;
            }
            // The same check guards a config built in code.
            let mut c = Config::default();
            c.redis.lease_ttl = Duration::from_millis(299);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("`redis.lease_ttl`: 299ms"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn provider_sections_with_an_unknown_key_or_kind_are_refused() {
        Jail::expect_with(|jail| {
            let section = "[providers.up]\nbase_url = \"http://x/v1\"\n";
            let e = load_err(jail, &format!("{section}kind = \"gemini\"\n"))?;
            has(&e, &["gemini", "openai", "anthropic", "providers.up"])?;
            let e = load_err(jail, section)?;
            has(&e, &["kind", "providers.up"])?;
            let e = load_err(
                jail,
                &format!("{section}kind = \"openai\"\napi_key = \"sk\"\n"),
            )?;
            has(&e, &["api_key", "providers.up"])?;
            let e = load_err(
                jail,
                &format!(
                    "{section}kind = \"anthropic\"\n[providers.up.retry]\nbase = \"1s\"\njitter = true\n"
                ),
            )?;
            has(&e, &["jitter"])?;
            let e = load_err(
                jail,
                "[providers.demo]\nkind = \"openai\"\nbase_url = \"http://x\"\n",
            )?;
            has(&e, &["[providers.demo]", "built-in"])?;
            Ok(())
        });
    }

    #[test]
    fn model_options_of_the_wrong_shape_for_the_kind_are_refused_naming_the_key() {
        Jail::expect_with(|jail| {
            let providers = "[providers.oa]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n\
                             [providers.an]\nkind = \"anthropic\"\nbase_url = \"http://x/v1\"\n";
            let model = |provider: &str, options: &str| {
                format!(
                    "{providers}[[models]]\nname = \"m\"\nprovider = \"{provider}\"\n\
                     [models.options]\n{options}\n"
                )
            };
            // Demo options on an openai provider.
            let e = load_err(jail, &model("oa", "model = \"x\"\ntokens = 5"))?;
            has(&e, &["model `m`", "openai", "tokens"])?;
            // OpenAI has no max_tokens option; Anthropic has.
            let e = load_err(jail, &model("oa", "model = \"x\"\nmax_tokens = 5"))?;
            has(&e, &["model `m`", "max_tokens"])?;
            jail.create_file("ok.toml", &model("an", "model = \"x\"\nmax_tokens = 5"))?;
            let c = Config::load(Some(Path::new("ok.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(
                c.models[0].options.kind(),
                genstream_providers::ProviderKind::Anthropic
            );
            // The model id is required upstream.
            let e = load_err(jail, &model("an", "max_tokens = 5"))?;
            has(&e, &["model `m`", "anthropic", "model"])?;
            // An OpenAI model on the demo provider.
            let e = load_err(jail, &model("demo", "model = \"gpt-4o\""))?;
            has(&e, &["model `m`", "demo", "`model`"])?;
            let e = load_err(
                jail,
                &model("an", "model = \"x\"\nthinking_budget_tokens = 10"),
            )?;
            has(
                &e,
                &[
                    "`models[0].options.thinking_budget_tokens`",
                    "at least 1024",
                ],
            )?;
            let e = load_err(jail, &model("nope", ""))?;
            has(
                &e,
                &["model `m`", "unknown provider `nope`", "demo, an, oa"],
            )?;
            Ok(())
        });
    }

    #[test]
    fn an_old_key_name_names_its_replacement() {
        Jail::expect_with(|jail| {
            for (toml, parts) in [
                (
                    "[jobs]\nretention_secs = 600\n",
                    &[
                        "retention_secs",
                        "renamed `retention`",
                        "retention = \"600s\"",
                    ][..],
                ),
                (
                    "[redis]\nlease_ttl_ms = 8000\n",
                    &[
                        "lease_ttl_ms",
                        "renamed `lease_ttl`",
                        "lease_ttl = \"8000ms\"",
                    ],
                ),
                (
                    "[balance]\nrefill_interval_secs = 60\n",
                    &["renamed `refill_interval`", "refill_interval = \"60s\""],
                ),
                (
                    "[providers.p]\nkind = \"openai\"\nbase_url = \"http://x\"\n\
                     [providers.p.timeouts]\nidle_ms = 100\n",
                    &["idle_ms", "renamed `idle`"],
                ),
                (
                    "[[models]]\nname = \"d\"\nprovider = \"demo\"\n\
                     [models.options]\ntoken_delay_ms = 5\n",
                    &[
                        "model `d`",
                        "token_delay_ms",
                        "renamed `token_delay`",
                        "token_delay = \"5ms\"",
                    ],
                ),
                (
                    "[[tools]]\nname = \"t\"\ndescription = \"d\"\nurl = \"http://x/\"\n\
                     timeout_ms = 100\n",
                    &["timeout_ms", "renamed `timeout`", "timeout = \"100ms\""],
                ),
            ] {
                let e = load_err(jail, toml)?;
                has(&e, parts)?;
            }
            jail.set_env("GENSTREAM_JOBS__STALL_TIMEOUT_SECS", "60");
            let e = Config::load(None, &Overrides::default())
                .unwrap_err()
                .to_string();
            has(
                &e,
                &[
                    "stall_timeout_secs",
                    "renamed `stall_timeout`",
                    "GENSTREAM_JOBS__STALL_TIMEOUT=60s",
                ],
            )?;
            Ok(())
        });
    }

    /// The committed genstream.toml lists every key, each with its default.
    #[test]
    fn committed_example_lists_every_key_with_its_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../genstream.toml");
        let written: serde_json::Value = Figment::from(Toml::file_exact(path))
            .extract()
            .unwrap_or_else(|e| panic!("{e}"));
        let loaded: Config = Figment::from(Toml::file_exact(path))
            .extract()
            .unwrap_or_else(|e| panic!("{e}"));
        let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
        assert_eq!(
            serde_json::to_value(&loaded).unwrap_or_default(),
            defaults,
            "a value in genstream.toml is not the default"
        );
        fn keys(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        keys(v, format!("{at}.{k}"), out);
                    }
                }
                serde_json::Value::Array(a) => {
                    for (i, v) in a.iter().enumerate() {
                        keys(v, format!("{at}[{i}]"), out);
                    }
                }
                _ => out.push(at),
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys(&defaults, String::new(), &mut want);
        keys(&written, String::new(), &mut have);
        let missing: Vec<_> = want.iter().filter(|k| !have.contains(k)).collect();
        assert!(missing.is_empty(), "genstream.toml lacks {missing:?}");
    }
}
