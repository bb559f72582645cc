//! The pub/sub connection: subscribing, dispatching published frames to mirrors and
//! abort requests to the abort handler, reconnecting, and its health check.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use genstream_engine::event::Frame;
use redis::Value;

use crate::RedisStore;
use crate::functions::CHANNEL_KIND;

impl RedisStore {
    /// A fresh pub/sub connection subscribed to the control channel and to every
    /// mirror's channel.
    pub(crate) async fn open_pubsub(&self) -> redis::RedisResult<redis::aio::PubSubStream> {
        let timeout = self.inner.cfg.timeout;
        let timed_out =
            || redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out"));
        let ps = tokio::time::timeout(timeout, self.inner.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out())??;
        let (mut sink, stream) = ps.split();
        // Holding the sink's lock while reading the mirror list: a mirror opened from
        // now on subscribes through the new sink, one opened before is in the list.
        let mut guard = self.inner.sink.lock().await;
        let mut channels = vec![self.ctl_channel()];
        channels.extend(
            self.inner
                .mirrors
                .lock()
                .keys()
                .map(|sid| self.channel(sid)),
        );
        tokio::time::timeout(timeout, sink.subscribe(&channels))
            .await
            .map_err(|_| timed_out())??;
        *guard = Some(sink);
        self.inner.pubsub_up.store(true, Ordering::SeqCst);
        Ok(stream)
    }

    /// Applies published frames and abort requests; reconnects when the connection
    /// drops (or fails its health check), then re-reads every mirror from its head.
    pub(crate) async fn dispatch(self, mut stream: redis::aio::PubSubStream) {
        let ch_prefix = format!("{}:{CHANNEL_KIND}:", self.inner.cfg.key_prefix);
        let ctl = self.ctl_channel();
        loop {
            loop {
                let msg = tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    _ = self.inner.reconnect.notified() => break,
                    m = stream.next() => m,
                };
                let Some(msg) = msg else { break };
                let channel = msg.get_channel_name();
                if channel == ctl {
                    if let Ok(sid) = std::str::from_utf8(msg.get_payload_bytes()) {
                        self.call_abort_handler(sid);
                    }
                } else if let Some(sid) = channel.strip_prefix(&ch_prefix) {
                    self.on_frames(sid, msg.get_payload_bytes());
                }
            }
            self.inner.pubsub_up.store(false, Ordering::SeqCst);
            *self.inner.sink.lock().await = None;
            drop(stream);
            self.mark_unhealthy();
            tracing::warn!("lost the Redis pub/sub connection; reconnecting");
            let mut delay = Duration::from_millis(100);
            stream = loop {
                tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match self.open_pubsub().await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::debug!(error = %e, "pub/sub reconnect failed");
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            };
            tracing::info!("Redis pub/sub reconnected; re-reading mirrors");
            let this = self.clone();
            tokio::spawn(async move {
                // Redis may have come back empty (no persistence): functions first.
                if let Err(e) = this.ensure_library().await {
                    tracing::warn!(error = %e, "could not check genstream's Redis functions");
                }
                let mirrors = this.mirror_list();
                if let Err(e) = this.resync(mirrors).await {
                    // The healer compares them again within `heal_interval`.
                    tracing::warn!(error = %e, "could not re-read mirrors after a reconnect");
                }
            });
        }
    }

    /// Sends the pub/sub connection a `PING` every `heal_interval`; one that does not
    /// answer within `timeout` (a half-open connection: no error, no frames either) is
    /// replaced.
    pub(crate) async fn pubsub_health_loop(self) {
        let every = self.inner.cfg.heal_interval.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.inner.pubsub_up.load(Ordering::SeqCst) {
                continue; // the dispatcher is reconnecting
            }
            let answered = {
                let mut sink = self.inner.sink.lock().await;
                match sink.as_mut() {
                    Some(s) => tokio::time::timeout(self.inner.cfg.timeout, s.ping::<Value>())
                        .await
                        .is_ok_and(|r| r.is_ok()),
                    None => true,
                }
            };
            // Once per dead connection: the flag is set again by the next one.
            if !answered && self.inner.pubsub_up.swap(false, Ordering::SeqCst) {
                tracing::warn!("the Redis pub/sub connection did not answer PING");
                self.inner.reconnect.notify_one();
            }
        }
    }

    pub(crate) fn call_abort_handler(&self, sid: &str) {
        let handler = self.inner.abort_handler.read().clone();
        if let Some(h) = handler {
            h(sid);
        }
    }

    /// Applies one message of a job's channel: the frames of one appended batch,
    /// concatenated in seq order (see [`split_frames`]). Nothing is copied or parsed
    /// for a job this replica does not mirror.
    pub(crate) fn on_frames(&self, sid: &str, payload: &[u8]) {
        let Some(m) = self.inner.mirrors.lock().get(sid).cloned() else {
            return;
        };
        for frame in split_frames(Bytes::copy_from_slice(payload)) {
            self.deliver(sid, &m, frame, None);
        }
    }
}

/// The frames of one message of a job's channel: `genstream_append_batch_v4` publishes
/// a batch's frames concatenated, in seq order. Each frame ends with a blank line
/// (`\n\n`) and none holds one before its end (its JSON is compact, newlines escaped),
/// so the message is cut after each `\n\n`. The frames share the message's buffer. A
/// piece that is not a frame is left out: the mirror then sees a gap at the next
/// frame and reads the missing range from the stream.
pub(crate) fn split_frames(payload: Bytes) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut start = 0;
    while let Some(at) = payload[start..].windows(2).position(|w| w == b"\n\n") {
        let end = start + at + 2;
        if let Some(f) = Frame::parse(payload.slice(start..end)) {
            frames.push(f);
        }
        start = end;
    }
    frames
}
