//! [`JobCoordination`] for Redis: the end claims (`genstream_claim_end_v6`), orphans
//! (jobs whose owner's lease lapsed, or that no task of ours runs), and abort requests
//! (a flag in the job hash plus a publish, repeated while the job runs).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use genstream_engine::store::{AbortHandler, JobCoordination, JobStatus, Orphan, OrphanReason};
use redis::AsyncCommands;

use crate::functions::{CLAIM_END_FN, REQUEST_ABORT_FN};
use crate::jobs::meta_of;
use crate::{RedisStore, StoreError, store_err};

/// How often, and how long, an abort request is published again while its job runs,
/// so an owner whose pub/sub connection was down at the first publish still gets it.
pub(crate) const ABORT_REPUBLISH_EVERY: Duration = Duration::from_millis(500);

pub(crate) const ABORT_REPUBLISH_FOR: Duration = Duration::from_secs(30);

impl RedisStore {
    /// Claims the job's end for this replica (see `claim_end` in `append.lua`),
    /// taking it over from `takeover` (a replica whose lease the caller saw lapse);
    /// reaper claims older than `stale` may be taken over too (zero: never).
    pub(crate) async fn claim_end_as(
        &self,
        sid: &str,
        takeover: &str,
        stale: Duration,
    ) -> Result<String, StoreError> {
        self.fcall(
            redis::cmd("FCALL")
                .arg(CLAIM_END_FN)
                .arg(1)
                .arg(self.key("job", sid))
                .arg(&self.inner.replica_id)
                .arg(takeover)
                .arg(stale.as_millis() as u64),
        )
        .await
    }

    /// Sets `abortRequested` and publishes the request; false if the job ended.
    pub(crate) async fn publish_abort(&self, sid: &str) -> Result<bool, StoreError> {
        let asked: i64 = self
            .fcall(
                redis::cmd("FCALL")
                    .arg(REQUEST_ABORT_FN)
                    .arg(1)
                    .arg(self.key("job", sid))
                    .arg(self.ctl_channel())
                    .arg(sid),
            )
            .await?;
        Ok(asked == 1)
    }
}

#[async_trait]
impl JobCoordination for RedisStore {
    async fn claim_orphan(&self, stream_id: &str) -> Result<bool, StoreError> {
        // A claim held by another replica whose lease lapsed (a reaper that died, or an
        // owner that died while ending its job) is taken over; so is a reaper's claim
        // older than a lease TTL (its reaper is alive but stopped trying).
        let (holder, owner): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key("job", stream_id))
            .arg("reaper")
            .arg("owner")
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        if owner.is_none() {
            return Ok(false);
        }
        let takeover = match holder {
            Some(h) if h != self.inner.replica_id => {
                let alive = self.leases_alive(std::slice::from_ref(&h)).await?;
                if alive.get(&h).copied().unwrap_or(true) {
                    String::new()
                } else {
                    h
                }
            }
            _ => String::new(),
        };
        let won = self
            .claim_end_as(stream_id, &takeover, self.inner.cfg.lease_ttl)
            .await?;
        Ok(won == "ok")
    }

    async fn claim_end(&self, stream_id: &str) -> Result<bool, StoreError> {
        // The owner never takes a claim over: a reaper that holds it ends the job.
        let won = self.claim_end_as(stream_id, "", Duration::ZERO).await?;
        Ok(won == "ok" || won == "missing")
    }

    async fn orphaned_jobs(&self, live: &HashSet<String>) -> Result<Vec<Orphan>, StoreError> {
        let judge_leases = self.may_judge_leases();
        let me = self.inner.replica_id.as_str();
        let ids: Vec<String> = self
            .conn()
            .smembers(self.running_key())
            .await
            .map_err(|e| {
                self.mark_unhealthy();
                store_err(e)
            })?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = ids
            .iter()
            .map(|id| {
                let mut c = redis::cmd("HGETALL");
                c.arg(self.key("job", id));
                c
            })
            .collect();
        let hashes: Vec<HashMap<String, String>> = self.query_each(cmds).await?;
        // Whose claims and leases matter, then one round trip for the leases and one
        // for the Redis clock (claim ages are stamped with it).
        let mut running = Vec::new();
        let mut stale = Vec::new();
        let mut replicas = HashSet::new();
        for (id, h) in ids.into_iter().zip(hashes) {
            let Some(meta) = meta_of(&h) else {
                stale.push(id);
                continue;
            };
            if meta.status != JobStatus::Running || h.get("ended").map(String::as_str) == Some("1")
            {
                stale.push(id);
                continue;
            }
            let owner = h.get("owner").cloned().unwrap_or_default();
            let reaper = h.get("reaper").cloned();
            match &reaper {
                Some(r) if *r != owner && r != me => replicas.insert(r.clone()),
                _ if owner != me => replicas.insert(owner.clone()),
                _ => false,
            };
            running.push((meta, owner, reaper, h));
        }
        let replicas: Vec<String> = replicas.into_iter().collect();
        let leases = if judge_leases {
            self.leases_alive(&replicas).await?
        } else {
            HashMap::new()
        };
        let alive = |rid: &str| leases.get(rid).copied().unwrap_or(true);
        let redis_now = if judge_leases
            && running
                .iter()
                .any(|(_, o, r, _)| r.as_ref().is_some_and(|r| r != o && r != me))
        {
            let (secs, micros): (u64, u64) = redis::cmd("TIME")
                .query_async(&mut self.conn())
                .await
                .map_err(store_err)?;
            Some(secs * 1000 + micros / 1000)
        } else {
            None
        };
        let lease_ms = self.inner.cfg.lease_ttl.as_millis() as u64;
        let mut out = Vec::new();
        for (meta, owner, reaper, h) in running {
            let reason = if owner == me {
                OrphanReason::Abandoned
            } else {
                OrphanReason::ReplicaLost
            };
            let orphan = match reaper {
                // A reaper's claim: ours (an earlier try failed; retry it), or another
                // reaper's that died or stopped trying.
                Some(r) if r != owner => {
                    if r == me {
                        true
                    } else {
                        let at: u64 = h.get("reaperAt").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let old = redis_now
                            .is_some_and(|now| at > 0 && now.saturating_sub(at) > lease_ms);
                        judge_leases && (!alive(&r) || old)
                    }
                }
                // No claim, or the owner's own (it is ending the job): an orphan if the
                // owner is gone, or if it is us and no task of ours runs it.
                _ => {
                    if owner == me {
                        !live.contains(&meta.stream_id)
                    } else {
                        judge_leases && !alive(&owner)
                    }
                }
            };
            if orphan {
                out.push(Orphan { meta, reason });
            }
        }
        if !stale.is_empty() {
            let _: () = self
                .conn()
                .srem(self.running_key(), &stale)
                .await
                .map_err(store_err)?;
        }
        Ok(out)
    }

    async fn request_abort(&self, stream_id: &str) -> Result<(), StoreError> {
        // The flag in the job hash reaches the owner with its next append whatever
        // happens to the publish; the publish is the fast path, repeated while the job
        // runs in case the owner's pub/sub connection was down.
        if !self.publish_abort(stream_id).await? {
            return Ok(());
        }
        if !self.inner.republishing.lock().insert(stream_id.to_string()) {
            return Ok(());
        }
        let this = self.clone();
        let sid = stream_id.to_string();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + ABORT_REPUBLISH_FOR;
            while tokio::time::Instant::now() < until {
                tokio::select! {
                    _ = this.inner.stop.cancelled() => break,
                    _ = tokio::time::sleep(ABORT_REPUBLISH_EVERY) => {}
                }
                if let Ok(false) = this.publish_abort(&sid).await {
                    break; // it ended
                }
            }
            this.inner.republishing.lock().remove(&sid);
        });
        Ok(())
    }

    fn set_abort_handler(&self, handler: AbortHandler) {
        *self.inner.abort_handler.write() = Some(handler);
    }
}
