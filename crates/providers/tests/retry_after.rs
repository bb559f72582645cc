//! The waits the retry layer chooses for real upstream answers: HTTP responses of the
//! mock upstream (429/503/500 with `Retry-After` in seconds or as an HTTP date, with
//! `retry-after-ms`, or with no header), read by the real `openai` and `anthropic`
//! providers' header parsing, then given to the engine's retry layer.
//!
//! Real sockets and paused tokio time do not mix (while a request waits for its
//! socket, paused time jumps ahead and fires the request's own timeouts), so each
//! test first collects the providers' errors in real time, then pauses the clock:
//! `Backoff` is asserted delay by delay, and a job whose provider replays those errors
//! is run through the job manager, whose `retry` events and waits are asserted on the
//! tokio clock. The real-time end-to-end check with small waits is
//! `server/tests/upstreams.rs::retryable_statuses_are_retried_until_the_answer_completes`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::event::{EventBody, FinalStatus};
use genstream_engine::log::LogLimits;
use genstream_engine::manager::{JobManager, ManagerConfig, ModelEntry, StartRequest};
use genstream_engine::persist::{MemoryPersistence, Persistence};
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream,
};
use genstream_engine::retry::{Backoff, GiveUp, RetryPolicy};
use genstream_engine::store::{JobStore, MemoryStore};
use genstream_mock_upstream::MockUpstream;
use genstream_providers::{ModelOptions, ProviderConfig, build, kind_of};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug)]
enum Kind {
    OpenAi,
    Anthropic,
}

/// The error a real provider of `kind` reports for one request to `model` on `mock`.
async fn error_for(mock: &MockUpstream, kind: Kind, model: &str) -> ProviderError {
    let name = match kind {
        Kind::OpenAi => "openai",
        Kind::Anthropic => "anthropic",
    };
    let providers = BTreeMap::from([(
        "mock".to_owned(),
        serde_json::from_value::<ProviderConfig>(
            json!({"kind": name, "base_url": mock.base_url()}),
        )
        .unwrap(),
    )]);
    // The mock counts requests per model string: each kind gets its own.
    let model = format!("{model}?delay_ms={}", kind as u8);
    let provider_kind = kind_of("mock", &providers).unwrap();
    let options = ModelOptions::deserialize_for(provider_kind, json!({"model": model})).unwrap();
    let provider = build("mock", &providers, &options).unwrap();
    match provider
        .stream(ModelRequest::default(), CancellationToken::new())
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("{kind:?} {model}: no error"),
    }
}

/// Every wait form, through both providers: what the retry layer does with each.
#[tokio::test]
async fn real_retry_after_headers_give_the_exact_waits() {
    let mock = genstream_mock_upstream::spawn().await;
    for kind in [Kind::OpenAi, Kind::Anthropic] {
        // Collected in real time; the rest needs no socket.
        let above_cap = error_for(&mock, kind, "flaky:1:429+ra45:echo").await;
        let date = error_for(&mock, kind, "flaky:1:503+radate20:echo").await;
        let millis = error_for(&mock, kind, "flaky:1:429+ram1500:echo").await;
        let past_ceiling = error_for(&mock, kind, "flaky:1:429+ra61:echo").await;
        let plain = error_for(&mock, kind, "flaky:1:500:echo").await;
        for (e, status) in [
            (&above_cap, 429),
            (&date, 503),
            (&millis, 429),
            (&past_ceiling, 429),
            (&plain, 500),
        ] {
            assert_eq!((e.kind, e.status), (ProviderErrorKind::Http, Some(status)));
        }
        // The defaults: 3 retries, base 1 s, cap 30 s, ceiling 60 s.
        let mut backoff = Backoff::new(RetryPolicy::default(), Some(1));
        assert_eq!(
            backoff.next_delay(&above_cap),
            Ok(Duration::from_secs(45)),
            "{kind:?}: above the cap, below the ceiling: honoured"
        );
        assert_eq!(
            backoff.next_delay(&date),
            Ok(Duration::from_secs(20)),
            "{kind:?}: the date is read against the response's Date"
        );
        assert_eq!(backoff.next_delay(&millis), Ok(Duration::from_millis(1500)));
        assert_eq!(backoff.next_delay(&plain), Err(GiveUp::Exhausted));
        let mut backoff = Backoff::new(RetryPolicy::default(), Some(1));
        assert_eq!(
            backoff.next_delay(&past_ceiling),
            Err(GiveUp::RetryAfterTooLong(Duration::from_secs(61)))
        );
        // No header: the computed waits, capped at 30 s and jittered below it.
        let policy = RetryPolicy {
            max_retries: 8,
            ..RetryPolicy::default()
        };
        let mut backoff = Backoff::new(policy, Some(7));
        let waits: Vec<u64> = (0..8)
            .map(|_| backoff.next_delay(&plain).unwrap().as_millis() as u64)
            .collect();
        for (n, wait) in waits.iter().enumerate() {
            let full = (1000u64 << n).min(30_000);
            assert!(
                (full / 2..=full).contains(wait),
                "{kind:?}: retry {}: {wait} ms not in [{}, {full}]",
                n + 1,
                full / 2
            );
        }
        assert!(waits[5..].iter().all(|w| (15_000..=30_000).contains(w)));
        assert_eq!(backoff.next_delay(&plain), Err(GiveUp::Exhausted));
    }
}

/// A provider that fails with the given errors, in order, then answers "done".
struct Replay {
    errors: Mutex<VecDeque<ProviderError>>,
    started: Mutex<Vec<Instant>>,
}

#[async_trait]
impl Provider for Replay {
    fn kind(&self) -> &str {
        "replay"
    }

    async fn stream(
        &self,
        _request: ModelRequest,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        self.started.lock().unwrap().push(Instant::now());
        if let Some(e) = self.errors.lock().unwrap().pop_front() {
            return Err(e);
        }
        Ok(futures::stream::iter([
            Ok(ProviderEvent::Text("done".into())),
            Ok(ProviderEvent::Finish("stop".into())),
        ])
        .boxed())
    }
}

/// A job whose upstream answered 429 `Retry-After: 45`, 503 with a date 20 s ahead
/// and 429 `retry-after-ms: 1500` (as the real providers read them) waits exactly
/// that, on the tokio clock, announcing each wait in its `retry` event.
#[tokio::test]
async fn a_job_waits_what_the_real_headers_ask_on_paused_time() {
    let mock = genstream_mock_upstream::spawn().await;
    for kind in [Kind::OpenAi, Kind::Anthropic] {
        let errors = VecDeque::from([
            error_for(&mock, kind, "flaky:1:429+ra45:echo").await,
            error_for(&mock, kind, "flaky:1:503+radate20:echo").await,
            error_for(&mock, kind, "flaky:1:429+ram1500:echo").await,
        ]);
        tokio::time::pause();
        let replay = Arc::new(Replay {
            errors: Mutex::new(errors),
            started: Mutex::new(Vec::new()),
        });
        let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(LogLimits::default()));
        let db: Arc<dyn Persistence> = Arc::new(MemoryPersistence::default());
        let manager = JobManager::new(
            store,
            db,
            vec![ModelEntry::new("m", replay.clone())],
            ManagerConfig::default(),
        );
        let started = manager
            .start(StartRequest {
                user_id: "u".into(),
                text: "hi".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let log = manager.job_for("u", &started.stream_id).await.unwrap().1;
        let mut rx = log.watch();
        while log.terminal().is_none() {
            rx.changed().await.unwrap();
        }
        let events: Vec<genstream_engine::event::Event> = log
            .read_after(None, usize::MAX)
            .frames
            .iter()
            .map(|f| serde_json::from_slice(f.data_json()).unwrap())
            .collect();
        let waits: Vec<u64> = events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Retry(r) => Some(r.delay_ms),
                _ => None,
            })
            .collect();
        assert_eq!(waits, [45_000, 20_000, 1500], "{kind:?}");
        let at = replay.started.lock().unwrap().clone();
        assert_eq!(at.len(), 4);
        for (i, wait) in waits.iter().enumerate() {
            let gap = at[i + 1] - at[i];
            assert!(
                gap >= Duration::from_millis(*wait) && gap < Duration::from_millis(wait + 100),
                "{kind:?}: attempt {} came {gap:?} after the one before, not {wait} ms",
                i + 2
            );
        }
        match &events.last().unwrap().body {
            EventBody::Final(f) => {
                assert_eq!(f.status, FinalStatus::Complete);
                assert_eq!(f.response_message.text, "done");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        manager.wait_idle().await;
        tokio::time::resume();
    }
}
