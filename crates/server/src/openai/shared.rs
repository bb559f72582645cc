//! One [`ProjectedLog`] per (job, protocol) on this replica, shared by every reader of
//! that projection: each native event is decoded and projected once, and each frame
//! serialized once, whatever the number of subscribers (ARCHITECTURE.md
//! "OpenAI-compatible routes").
//!
//! The logs live while someone holds them (a streaming response, a request building
//! an object): the caches keep weak references, pruned when a new log is made. A
//! projection is a pure function of the job's log, so a log dropped and made again
//! later is the same, frame for frame.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use genstream_engine::EngineError;
use genstream_engine::event::Event;
use genstream_engine::log::EventLog;
use genstream_protocols::ai_sdk::{AiSdkOptions, AiSdkProjector};
use genstream_protocols::chat::{ChatOptions, ChatProjector};
use genstream_protocols::responses::ResponsesProjector;
use genstream_protocols::{ProjectedLog, Projector};
use tokio::sync::watch;
use tokio::time::Interval;

use crate::error::OpenAiError;

/// A projection shared by its readers.
pub(crate) type Shared<P> = Arc<Mutex<ProjectedLog<P>>>;

/// Shared projections of one protocol, by key (the stream id, and what else makes
/// the projection differ).
pub(crate) struct Cache<P> {
    map: Mutex<HashMap<String, Weak<Mutex<ProjectedLog<P>>>>>,
}

impl<P: Projector> Cache<P> {
    fn new() -> Self {
        Cache {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The shared projection under `key`, made with `make` if nobody holds one.
    pub(crate) fn get(&self, key: String, make: impl FnOnce() -> P) -> Shared<P> {
        let mut map = lock(&self.map);
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(Mutex::new(ProjectedLog::new(make())));
        map.insert(key, Arc::downgrade(&s));
        s
    }
}

/// Chat Completions projections, by stream id and `include_usage`.
pub(crate) static CHAT: LazyLock<Cache<ChatProjector>> = LazyLock::new(Cache::new);
/// Responses projections, by stream id.
pub(crate) static RESPONSES: LazyLock<Cache<ResponsesProjector>> = LazyLock::new(Cache::new);

/// AI SDK UI message stream projections, by stream id.
pub(crate) static AI_SDK: LazyLock<Cache<AiSdkProjector>> = LazyLock::new(Cache::new);

/// The shared AI SDK projection of `log` (`/api/ai/chat`).
pub(crate) fn ai_sdk(stream_id: &str, log: &EventLog) -> Shared<AiSdkProjector> {
    AI_SDK.get(stream_id.to_string(), || {
        AiSdkProjector::new(AiSdkOptions {
            client_tools: super::created_of(log)
                .map(|c| c.client_tools.into_iter().collect())
                .unwrap_or_default(),
            reset_step_on_retry: false,
        })
    })
}

/// The shared Chat Completions projection of `log`.
pub(crate) fn chat(stream_id: &str, log: &EventLog, include_usage: bool) -> Shared<ChatProjector> {
    CHAT.get(format!("{stream_id}:{include_usage}"), || {
        ChatProjector::new(ChatOptions {
            include_usage,
            client_tools: super::created_of(log)
                .map(|c| c.client_tools.into_iter().collect())
                .unwrap_or_default(),
        })
    })
}

/// The shared Responses projection of `log`.
pub(crate) fn responses(stream_id: &str, log: &EventLog) -> Shared<ResponsesProjector> {
    RESPONSES.get(stream_id.to_string(), || {
        ResponsesProjector::new(super::responses::options_of(log))
    })
}

/// A poisoned lock only means a reader panicked; the projection itself is whole
/// (a push that fails leaves it unchanged).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Projects every event of `log` the projection has not seen yet.
pub(crate) fn advance<P: Projector>(
    log: &EventLog,
    projected: &mut ProjectedLog<P>,
) -> Result<(), OpenAiError> {
    loop {
        let seq = projected.events();
        let Some(frame) = log.frame_after(seq.checked_sub(1)) else {
            return Ok(());
        };
        let event: Event = serde_json::from_slice(frame.data_json())
            .map_err(|e| EngineError::internal(format!("decoding event {seq}"), e))?;
        projected
            .push(event.seq, &event.body)
            .map_err(|e| EngineError::internal("projecting the log", e))?;
    }
}

/// One open projected stream: a position in the shared projection and a wake-up
/// handle on the native log. Like `sse.rs`'s subscriber it keeps no queue: each poll
/// takes the next frame (a `Bytes` handle) from the shared projection.
pub(crate) struct Subscriber<P> {
    pub(crate) log: Arc<EventLog>,
    pub(crate) rx: watch::Receiver<u64>,
    pub(crate) shared: Shared<P>,
    /// The position of the last frame sent (or the client's `starting_after`).
    pub(crate) position: Option<u64>,
    pub(crate) done: bool,
    pub(crate) ping: Interval,
    /// `retry: N\n`, sent in front of the first frame and in the same block, never as
    /// a block of its own: the OpenAI SDKs turn every block that has a field into an
    /// event and parse its (empty) `data` as JSON, which fails.
    pub(crate) retry: Option<Bytes>,
}

impl<P: Projector> Subscriber<P> {
    pub(crate) async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.done {
            return None;
        }
        loop {
            self.rx.borrow_and_update();
            // Asked before the projection reads the log, as in `sse.rs`: a log never
            // grows after its terminal event, so "ended, nothing new" is then final; asked
            // after, a terminal event landing in between would cut the stream short.
            let ended = self.log.terminal().is_some();
            let next = {
                let mut p = lock(&self.shared);
                if let Err(e) = advance(&self.log, &mut p) {
                    tracing::error!(error = ?e.error, "projected stream stopped");
                    return None;
                }
                let start = self.position.map_or(0, |n| n + 1);
                p.frames()
                    .get(usize::try_from(start).unwrap_or(usize::MAX))
                    .cloned()
            };
            if let Some(f) = next {
                self.position = Some(f.position);
                self.done = f.terminal;
                let bytes = match self.retry.take() {
                    // Once per connection: the first frame is copied behind the field.
                    Some(retry) => [retry, f.bytes].concat().into(),
                    None => f.bytes,
                };
                return Some((Ok(bytes), self));
            }
            if ended {
                return None;
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = self.ping.tick() => {
                    return Some((Ok(Bytes::from_static(b": ping\n\n")), self));
                }
            }
        }
    }
}
