//! Three replicas in one process, sharing the real Redis (127.0.0.1:6379, or
//! `GENSTREAM_TEST_REDIS_URL`) and a fresh PostgreSQL database (created through
//! `postgres://postgres@127.0.0.1:5432/postgres`, or `GENSTREAM_TEST_POSTGRES_ADMIN_URL`,
//! and dropped at the end). Each replica is what `genstream serve` builds
//! (`serve::build_state`: its own Redis connections and its own `JobManager`) behind its
//! own loopback listener; the cluster uses a Redis key prefix of its own. Included by
//! `replicas.rs` and `projection_replicas.rs` (`#[path]`), next to `mod common;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use genstream_providers::{ModelOptions, ProviderKind};
use genstream_server::config::{
    AuthConfig, Config, JobsConfig, LimitsConfig, ModelConfig, PoolSection, RedisSection,
};
use genstream_server::serve::build_state;
use genstream_server::{AppState, app};
use genstream_test_support::{KeyPrefix, Served, TestDb, redis_url};
use serde_json::{Value, json};

use crate::common::{SECRET, token};

// ---------------------------------------------------------------------------------
// The database, the key prefix, the replicas.

pub fn demo_model(name: &str, options: Value) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        provider: "demo".into(),
        tools: Vec::new(),
        pricing: None,
        options: ModelOptions::deserialize_for(ProviderKind::Demo, options).unwrap(),
    }
}

pub fn replica_config(prefix: &str, db_url: &str, models: Vec<ModelConfig>) -> Config {
    replica_config_on(&redis_url(), prefix, db_url, models)
}

/// A replica's config with `store` (a `redis://` or `redis+cluster://` URL).
pub fn replica_config_on(
    store: &str,
    prefix: &str,
    db_url: &str,
    models: Vec<ModelConfig>,
) -> Config {
    Config {
        bind: "127.0.0.1:0".into(),
        store: store.into(),
        database: db_url.into(),
        redis: RedisSection {
            key_prefix: prefix.into(),
            ..RedisSection::default()
        },
        pool: PoolSection {
            max_connections: 4,
            ..PoolSection::default()
        },
        auth: AuthConfig {
            jwt_secret: Some(SECRET.into()),
        },
        jobs: JobsConfig {
            retention: Duration::from_secs(600),
            ..JobsConfig::default()
        },
        limits: LimitsConfig::off(),
        models,
        ..Config::default()
    }
}

pub struct Replica {
    pub state: AppState,
    pub addr: SocketAddr,
    pub _served: Served,
}

/// Three replicas, A = 0, B = 1, C = 2. Field order is drop order: the database and
/// the keys go last.
pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub http: reqwest::Client,
    pub prefix: KeyPrefix,
    pub _db: TestDb,
}

pub const A: usize = 0;
pub const B: usize = 1;
pub const C: usize = 2;
pub const USER: &str = "alice";

pub async fn cluster(models: Vec<ModelConfig>) -> Cluster {
    cluster_with(models, |_| {}).await
}

pub async fn cluster_with(models: Vec<ModelConfig>, tweak: impl Fn(&mut Config)) -> Cluster {
    cluster_on(&redis_url(), models, tweak).await
}

/// Three replicas on the store at `store`: the shared Redis, a Redis of the test's
/// own, or a Redis Cluster (`redis+cluster://…`, e.g. an `OwnRedisCluster`'s).
pub async fn cluster_on(
    store: &str,
    models: Vec<ModelConfig>,
    tweak: impl Fn(&mut Config),
) -> Cluster {
    let db = TestDb::create().await;
    let prefix = KeyPrefix::on(store);
    let mut config = replica_config_on(store, prefix.name(), &db.url, models);
    tweak(&mut config);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let (state, generated) = build_state(&config).await.expect("replica starts");
        assert!(!generated, "the configured secret is used");
        state.manager.spawn_reaper();
        let served = Served::start(app(state.clone(), config.http.max_body_bytes)).await;
        replicas.push(Replica {
            state,
            addr: served.addr,
            _served: served,
        });
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    Cluster {
        replicas,
        http,
        prefix,
        _db: db,
    }
}

impl Cluster {
    pub fn url(&self, r: usize, path: &str) -> String {
        format!("http://{}{path}", self.replicas[r].addr)
    }

    pub async fn post(&self, r: usize, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(r, path))
            .bearer_auth(token(USER))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, r: usize, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(r, path))
            .bearer_auth(token(USER))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST /api/chat` on replica `r`; the answer's JSON.
    pub async fn start(&self, r: usize, text: &str, model: &str) -> Value {
        let (s, v) = self
            .post(r, "/api/chat", json!({"text": text, "model": model}))
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Drives reader plans, `per_job` readers to a job. The jobs of the second half of
/// `plans` are started (`start(i, true)`, which gives the id readers use) and read to
/// their end (`finish`) before their readers join; those of the first half are started
/// (`start(i, false)`) as their readers are scheduled, so they are read while they
/// run. `read(id, plan, finished_group)` follows one plan; at most 64 readers at once,
/// all done within `timeout`. The results (in no order) and the instant (ms since the
/// epoch) by which the finished group's jobs had ended.
pub async fn drive_plans<P: Clone, R>(
    plans: &[P],
    per_job: usize,
    timeout: Duration,
    start: impl AsyncFn(usize, bool) -> String,
    finish: impl AsyncFn(&str),
    read: impl AsyncFn(String, P, bool) -> R,
) -> (Vec<R>, u64) {
    use futures::StreamExt;
    let (running_plans, finished_plans) = plans.split_at(plans.len() / 2);
    let mut finished_jobs = Vec::new();
    for (i, chunk) in finished_plans.chunks(per_job).enumerate() {
        finished_jobs.push((start(i, true).await, chunk));
    }
    futures::future::join_all(finished_jobs.iter().map(|(id, _)| finish(id))).await;
    let finished_by_ms = now_ms();
    let (start, read) = (&start, &read);
    let running = futures::stream::iter(running_plans.chunks(per_job).enumerate())
        .then(|(i, chunk)| async move {
            let id = start(i, false).await;
            futures::stream::iter(
                chunk
                    .iter()
                    .cloned()
                    .map(move |p| read(id.clone(), p, false)),
            )
        })
        .flatten();
    let finished = futures::stream::iter(
        finished_jobs
            .iter()
            .flat_map(|(id, chunk)| chunk.iter().map(|p| read(id.clone(), p.clone(), true))),
    );
    let runs = tokio::time::timeout(
        timeout,
        futures::stream::select(running, finished)
            .buffer_unordered(64)
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap_or_else(|_| panic!("every reader reaches the end within {timeout:?}"));
    assert_eq!(runs.len(), plans.len());
    (runs, finished_by_ms)
}

/// `n` values drawn from `strategy` (proptest's default runner: a new seed each run).
pub fn samples<S: proptest::strategy::Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::default();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).expect("a sample").current())
        .collect()
}

/// Up to `limit` frames of `resp`'s body, split off by `take` as bytes arrive; the
/// connection is dropped after them. A disconnect may fall in the middle of a chunk:
/// only the frames before it "arrived".
pub async fn frames_of<F>(
    resp: reqwest::Response,
    limit: usize,
    mut take: impl FnMut(&mut Vec<u8>) -> Vec<F>,
) -> Vec<F> {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    while got.len() < limit {
        let Some(chunk) = body.next().await else {
            break;
        };
        buf.extend_from_slice(&chunk.unwrap());
        got.extend(take(&mut buf));
    }
    got.truncate(limit);
    got
}
