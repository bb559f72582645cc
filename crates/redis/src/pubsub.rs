//! The pub/sub connection: subscribing, dispatching published frames to mirrors and
//! abort requests to the abort handler, reconnecting, and its health check.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use crate::RedisStore;
use crate::conn::{PubSubFeed, Published};
use crate::mirror::{Catch, split_frames};

impl RedisStore {
    /// A fresh pub/sub connection subscribed to the control channel and to every
    /// mirror's channel.
    pub(crate) async fn open_pubsub(&self) -> redis::RedisResult<PubSubFeed> {
        let timeout = self.inner.cfg.timeout;
        let timed_out =
            || redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out"));
        let (mut sink, stream) = self.inner.target.pubsub(timeout).await?;
        // Holding the sink's lock while reading the mirror list: a mirror opened from
        // now on subscribes through the new sink, one opened before is in the list
        // (those of jobs this replica owns were never subscribed; see `Mirror`).
        let mut guard = self.inner.sink.lock().await;
        let channels: Vec<String> = self
            .inner
            .mirrors
            .lock()
            .iter()
            .filter(|(_, m)| m.subscribed.load(Ordering::SeqCst))
            .map(|(sid, _)| self.channel(sid))
            .collect();
        tokio::time::timeout(timeout, async {
            sink.subscribe_control(&self.ctl_channel()).await?;
            sink.subscribe_jobs(&channels).await
        })
        .await
        .map_err(|_| timed_out())??;
        *guard = Some(sink);
        self.inner.pubsub_up.store(true, Ordering::SeqCst);
        Ok(stream)
    }

    /// Applies published frames and abort requests; reconnects when the connection
    /// drops (or fails its health check), then re-reads every mirror from its head.
    pub(crate) async fn dispatch(self, mut stream: PubSubFeed) {
        let ctl = self.ctl_channel();
        loop {
            loop {
                let msg = tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    _ = self.inner.reconnect.notified() => break,
                    m = stream.next() => m,
                };
                let (channel, payload) = match msg {
                    None => break,
                    Some(Published::Message { channel, payload }) => (channel, payload),
                    Some(Published::NodeLost) => {
                        // One Cluster node's connection dropped; the cluster connection
                        // re-subscribes by itself. What was published meanwhile is read
                        // from the logs now rather than at the next heal pass.
                        tracing::info!("a Redis Cluster node's pub/sub connection dropped");
                        let this = self.clone();
                        tokio::spawn(async move {
                            let mirrors = this.mirror_list();
                            if let Err(e) = this.resync(mirrors, Catch::Behind).await {
                                tracing::debug!(error = %e, "could not re-read mirrors");
                            }
                        });
                        continue;
                    }
                    Some(Published::ShardUnsubscribed { channel }) => {
                        // A live mirror's channel, so not our own unsubscribe (a mirror
                        // leaves the map before it is unsubscribed): its slot moved to
                        // another primary. Subscribing again on this connection would
                        // go by its stale slot map, to the old primary, now a replica
                        // that takes the subscription but gets no frames. A new
                        // connection learns the topology afresh, subscribes every
                        // mirror's channel, and the mirrors are re-read.
                        let live = self
                            .channel_sid(&channel)
                            .is_some_and(|sid| self.inner.mirrors.lock().contains_key(sid));
                        if live {
                            tracing::info!(channel, "a job channel's slot moved; resubscribing");
                            break;
                        }
                        continue;
                    }
                };
                if channel == ctl {
                    if let Ok(sid) = std::str::from_utf8(&payload) {
                        self.call_abort_handler(sid);
                    }
                } else if let Some(sid) = self.channel_sid(&channel) {
                    self.on_frames(sid, payload);
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
                if let Err(e) = this.resync(mirrors, Catch::Behind).await {
                    // The healer compares them again within two heal intervals.
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
                    Some(s) => tokio::time::timeout(self.inner.cfg.timeout, s.ping())
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
    pub(crate) fn on_frames(&self, sid: &str, payload: Bytes) {
        let Some(m) = self.inner.mirrors.lock().get(sid).cloned() else {
            return;
        };
        for frame in split_frames(payload) {
            self.deliver(sid, &m, frame, None);
        }
    }
}
