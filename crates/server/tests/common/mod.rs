//! Shared helpers for the server tests: an app over the memory store and memory
//! persistence with demo models, tokens, and a tiny SSE frame parser.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use genstream_engine::log::LogLimits;
use genstream_engine::manager::{JobManager, ManagerConfig, ModelEntry};
use genstream_engine::persist::{MemoryPersistence, Persistence};
use genstream_engine::store::{JobStore, MemoryStore};
use genstream_server::auth::JwtKeys;
use genstream_server::{AppState, app};
use serde_json::{Value, json};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";
pub const MAX_BODY: usize = 64 * 1024;

pub fn demo(name: &str, options: Value) -> ModelEntry {
    let options = genstream_providers::ModelOptions::deserialize_for(
        genstream_providers::ProviderKind::Demo,
        options,
    )
    .expect("demo options");
    let provider =
        genstream_providers::build("demo", &BTreeMap::new(), &options).expect("demo provider");
    ModelEntry::new(name, provider)
}

pub struct TestApp {
    pub state: AppState,
    pub router: Router,
    pub db: Arc<MemoryPersistence>,
}

pub fn test_app(models: Vec<ModelEntry>) -> TestApp {
    let db = Arc::new(MemoryPersistence::default());
    let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(LogLimits::default()));
    let manager = JobManager::new(
        store,
        db.clone() as Arc<dyn Persistence>,
        models,
        ManagerConfig::default(),
    );
    let state = AppState {
        manager,
        auth: Arc::new(JwtKeys::new(SECRET)),
        keepalive: Duration::from_secs(15),
        sse_retry: Duration::from_secs(1),
        sse_chunk_bytes: 16 * 1024,
        trusted_proxies: Arc::new(Vec::new()),
        webhooks: Default::default(),
    };
    let router = app(state.clone(), MAX_BODY);
    TestApp { state, router, db }
}

pub fn default_models() -> Vec<ModelEntry> {
    vec![
        demo("demo", json!({"tokens": 30, "token_delay": "1ms"})),
        demo("slow", json!({"tokens": 2000, "token_delay": "20ms"})),
        demo(
            "reasoning",
            json!({"tokens": 40, "token_delay": "1ms", "behavior": "reasoning"}),
        ),
    ]
}

pub fn token(user: &str) -> String {
    JwtKeys::new(SECRET)
        .mint(user, Duration::from_secs(600))
        .expect("mint")
}

/// One parsed SSE frame.
#[derive(Debug, Clone, PartialEq)]
pub struct SseFrame {
    pub id: Option<u64>,
    pub event: Option<String>,
    pub data: Option<Value>,
    pub comment: bool,
}

/// Splits complete frames off the front of `buf` (frames end with a blank line),
/// leaving out a block that holds only the `retry:` field, which carries no event.
pub fn take_frames(buf: &mut Vec<u8>) -> Vec<SseFrame> {
    let mut out = Vec::new();
    while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
        let raw: Vec<u8> = buf.drain(..pos + 2).collect();
        let text = String::from_utf8_lossy(&raw[..pos]).to_string();
        // A block of only `retry:` (the native stream's opening) is no event; on the
        // `/v1` streams the field rides in the first event's block instead.
        if text.lines().all(|l| l.starts_with("retry:")) {
            continue;
        }
        let mut f = SseFrame {
            id: None,
            event: None,
            data: None,
            comment: false,
        };
        for line in text.lines() {
            if line.starts_with(':') {
                f.comment = true;
            } else if let Some(v) = line.strip_prefix("id: ") {
                f.id = v.parse().ok();
            } else if let Some(v) = line.strip_prefix("event: ") {
                f.event = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                f.data = serde_json::from_str(v).ok();
            }
        }
        out.push(f);
    }
    out
}

pub fn is_terminal(f: &SseFrame) -> bool {
    matches!(f.event.as_deref(), Some("final" | "error"))
}
