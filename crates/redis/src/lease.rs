//! This replica's lease (`P:replica:{rid}`), renewed every third of its TTL, and the
//! health record that decides when peers' lapsed leases may be judged.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::AsyncCommands;

use crate::{RedisStore, StoreError, store_err};

impl RedisStore {
    pub(crate) async fn renew_lease(&self) -> Result<(), StoreError> {
        self.try_renew_lease().await.map_err(store_err)
    }

    pub(crate) async fn try_renew_lease(&self) -> redis::RedisResult<()> {
        let ms = self.inner.cfg.lease_ttl.as_millis() as u64;
        self.conn()
            .set_options(
                self.lease_key(&self.inner.replica_id),
                1,
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ms)),
            )
            .await
    }

    /// Renews the lease every third of its TTL, in a task of its own so that nothing
    /// else (a slow heal pass) can delay it past the point where peers reap live jobs.
    /// Two renewals in a row that time out replace the command connection.
    pub(crate) async fn lease_loop(self) {
        let every = (self.inner.cfg.lease_ttl / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut timeouts = 0;
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.try_renew_lease().await {
                Err(e) => {
                    self.mark_unhealthy();
                    tracing::warn!(error = %e, "could not renew the replica lease");
                    timeouts = if e.is_timeout() { timeouts + 1 } else { 0 };
                    if timeouts >= 2
                        && self
                            .replace_conn("the Redis command connection stopped answering")
                            .await
                    {
                        timeouts = 0;
                    }
                }
                Ok(()) => {
                    timeouts = 0;
                    let mut h = self.inner.healthy_since.lock();
                    if h.is_none() && self.inner.pubsub_up.load(Ordering::SeqCst) {
                        *h = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }

    /// Replaces the command connection with a fresh one (`why` goes to the log);
    /// false if no new connection could be made (the old one stays).
    pub(crate) async fn replace_conn(&self, why: &str) -> bool {
        match self
            .inner
            .target
            .command_connection(self.inner.cfg.timeout)
            .await
        {
            Ok(c) => {
                tracing::warn!("{why}; replaced the Redis command connection");
                *self.inner.conn.write() = c;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not reconnect");
                false
            }
        }
    }

    pub(crate) fn mark_unhealthy(&self) {
        *self.inner.healthy_since.lock() = None;
    }

    /// True once this replica has been healthy for a whole lease TTL, so a missing
    /// lease really means a dead owner.
    pub(crate) fn may_judge_leases(&self) -> bool {
        self.inner
            .healthy_since
            .lock()
            .is_some_and(|t| t.elapsed() >= self.inner.cfg.lease_ttl)
    }

    /// Whether each replica's lease is alive, in one pipelined round trip.
    pub(crate) async fn leases_alive(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, bool>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        // Leases lie in different Cluster slots: `query_each`.
        let cmds = ids
            .iter()
            .map(|id| {
                let mut c = redis::cmd("EXISTS");
                c.arg(self.lease_key(id));
                c
            })
            .collect();
        let alive: Vec<bool> = self.query_each(cmds).await?;
        Ok(ids.iter().cloned().zip(alive).collect())
    }
}
