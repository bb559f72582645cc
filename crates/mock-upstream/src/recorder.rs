//! The mock's memory of what it was asked: every request (path, headers, JSON body)
//! recorded before it is answered, the requests refused for an invalid history, and
//! how many requests each model string got (the count the failure wrappers go by).
//!
//! One log behind a mutex, shared by every clone of [`Recorder`], so a test holds a
//! handle while the server's handlers write to it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::http::{HeaderMap, Uri};
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;

/// One request the mock received.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// The request path, e.g. `/v1/chat/completions` or `/v1/messages`.
    pub path: String,
    /// Headers, names lower-cased; a repeated header keeps its last value. Values that
    /// are not visible ASCII are dropped.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON, or a JSON string holding the raw text when it was not
    /// JSON.
    pub body: Value,
}

/// A request the mock answered 400 because its history is invalid.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// Its position in [`Recorder::recorded`].
    pub request: usize,
    /// The request's `model`.
    pub model: String,
    /// The error message sent back (the API's wording).
    pub message: String,
}

#[derive(Debug, Default)]
struct Log {
    requests: Vec<RecordedRequest>,
    rejections: Vec<Rejection>,
    /// Requests per full model string that reached their scenario.
    counts: HashMap<String, u32>,
}

/// The shared log of received requests, history rejections and per-model request
/// counts. Cheap to clone; clones share the log.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    log: Arc<Mutex<Log>>,
}

impl Recorder {
    /// A new, empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// All requests received so far, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.log.lock().requests.clone()
    }

    /// The JSON bodies of all requests received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.log
            .lock()
            .requests
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// The requests answered 400 for an invalid history, oldest first.
    pub fn rejected(&self) -> Vec<Rejection> {
        self.log.lock().rejections.clone()
    }

    /// How many requests with exactly this `model` string reached their scenario (a
    /// request rejected for its history is not counted).
    pub fn count(&self, model: &str) -> u32 {
        self.log.lock().counts.get(model).copied().unwrap_or(0)
    }

    /// Records a request; returns its index.
    pub(crate) fn push(&self, request: RecordedRequest) -> usize {
        let mut log = self.log.lock();
        log.requests.push(request);
        log.requests.len() - 1
    }

    pub(crate) fn reject(&self, rejection: Rejection) {
        self.log.lock().rejections.push(rejection);
    }

    /// Counts one more request for `model`; returns how many came before it.
    pub(crate) fn next_index(&self, model: &str) -> u32 {
        let mut log = self.log.lock();
        let n = log.counts.entry(model.to_owned()).or_default();
        *n += 1;
        *n - 1
    }
}

/// Records one request; returns its index and its body parsed as JSON, if it is.
pub(crate) fn record(
    recorder: &Recorder,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> (usize, Option<Value>) {
    let text = String::from_utf8_lossy(body).into_owned();
    let parsed = serde_json::from_str::<Value>(&text).ok();
    let index = recorder.push(RecordedRequest {
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
        body: parsed.clone().unwrap_or(Value::String(text)),
    });
    (index, parsed)
}
