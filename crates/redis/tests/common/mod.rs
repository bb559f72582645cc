//! Helpers of the Redis store's integration tests: the shared Redis (127.0.0.1:6379,
//! or `GENSTREAM_TEST_REDIS_URL`) under a key prefix per test and a redis-server of the
//! test's own without persistence (both from `genstream-test-support`), events and
//! metadata to append, and a TCP proxy that can black-hole connections.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::sync::Arc;
use std::time::Duration;

use genstream_engine::event::{
    ContentPart, Created, Delta, DeltaContent, ErrorEvent, EventBody, Message, MessageCreation,
    RunStep, StepDetails, StepType,
};
use genstream_engine::store::{JobMeta, JobStatus};
use genstream_redis::{RedisConfig, RedisStore};

pub use genstream_test_support::unique_prefix as prefix;
pub use genstream_test_support::{OwnRedis, redis_url, wait_until};

/// A config on `url` under `prefix`, with test-friendly TTLs and no healer after its
/// first pass (unless a test sets one).
pub fn config(url: &str, prefix: &str) -> RedisConfig {
    let mut cfg = RedisConfig::new(url);
    cfg.key_prefix = prefix.to_string();
    cfg.running_ttl = Duration::from_secs(120);
    cfg.retention = Duration::from_secs(60);
    cfg.heal_interval = Duration::from_secs(3600);
    cfg
}

pub async fn store(url: &str, prefix: &str, lease: Duration) -> RedisStore {
    let mut cfg = config(url, prefix);
    cfg.lease_ttl = lease;
    RedisStore::connect(cfg).await.expect("redis")
}

pub async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub fn meta() -> JobMeta {
    JobMeta {
        stream_id: uuid::Uuid::now_v7().to_string(),
        user_id: format!("u-{}", uuid::Uuid::now_v7()),
        conversation_id: uuid::Uuid::now_v7().to_string(),
        user_message_id: uuid::Uuid::now_v7().to_string(),
        response_message_id: uuid::Uuid::now_v7().to_string(),
        model: "demo".into(),
        status: JobStatus::Running,
        created_at: "2026-01-01T00:00:00.000Z".into(),
        webhook_url: None,
    }
}

pub fn user_message(m: &JobMeta, text: &str) -> Message {
    Message {
        message_id: m.user_message_id.clone(),
        conversation_id: m.conversation_id.clone(),
        parent_message_id: None,
        sender: "User".into(),
        text: text.into(),
        content: Vec::new(),
        is_created_by_user: true,
        model: None,
        unfinished: false,
        error: false,
        created_at: m.created_at.clone(),
    }
}

pub fn created(m: &JobMeta, text: &str) -> EventBody {
    EventBody::Created(Created {
        stream_id: m.stream_id.clone(),
        conversation_id: m.conversation_id.clone(),
        user_message: user_message(m, text),
        response_message_id: m.response_message_id.clone(),
        model: m.model.clone(),
        sender: m.model.clone(),
        created_at: m.created_at.clone(),
        client_tools: Vec::new(),
        protocol_options: None,
    })
}

/// A `message_creation` step of model call `call`.
pub fn text_step(m: &JobMeta, id: &str, call: u32, index: u32) -> EventBody {
    EventBody::RunStep(RunStep {
        id: id.into(),
        run_id: format!("{}:{call}", m.stream_id),
        index,
        step_type: StepType::MessageCreation,
        step_details: StepDetails::MessageCreation {
            message_creation: MessageCreation {
                message_id: m.response_message_id.clone(),
            },
        },
    })
}

pub fn delta(step: &str, text: &str) -> EventBody {
    EventBody::MessageDelta(Delta {
        id: step.into(),
        delta: DeltaContent {
            content: vec![ContentPart::Text { text: text.into() }],
        },
    })
}

pub fn error_end(code: &str) -> EventBody {
    EventBody::Error(ErrorEvent {
        code: code.into(),
        message: "x".into(),
        response_message: None,
    })
}

/// A TCP proxy to `target` on a free port. `blackhole()` makes every connection open
/// at that moment silent (no byte forwarded either way, sockets kept open: a half-open
/// connection as a dead NAT entry or a frozen peer leaves it); later connections are
/// forwarded normally.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let epoch = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let e = epoch.clone();
        let task = tokio::spawn(async move {
            let parked = Arc::new(std::sync::Mutex::new(Vec::new()));
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = e.subscribe();
                let born = *rx.borrow_and_update();
                let parked = parked.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|now| *now > born) => {
                            // Keep both sockets open, forward nothing.
                            parked.lock().unwrap().push((client, server));
                        }
                    }
                });
            }
        });
        Proxy { addr, epoch, task }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn blackhole(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
