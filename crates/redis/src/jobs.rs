//! [`EventLogStore`] for Redis: registering a job (its hash, the user's running slot,
//! the conversation's lock), reading its metadata, appending through
//! `genstream_append_batch_v6`, and opening its log (a mirror).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use genstream_engine::event::{EventBody, FinalStatus, Frame};
use genstream_engine::log::{AppendError, EventLog};
use genstream_engine::store::{
    Appended, EventLogStore, JobMeta, JobStatus, MAX_APPEND_BATCH, RangePage,
};
use redis::{AsyncCommands, Value};

use crate::functions::{ACQUIRE_SLOT_FN, APPEND_BATCH_FN, CLAIM_FN};
use crate::mirror::{Mirror, stream_frames, xrange};
use crate::{RedisStore, StoreError, store_err};

impl RedisStore {
    /// One `FCALL` of `genstream_append_batch_v6` for the whole batch, each event sent
    /// as the SSE frame [`Frame::encode`] builds for the seq it is expected to get; the
    /// frames that landed go to this replica's mirror right away from this side (local
    /// subscribers need not wait for the publish to come back, and the reply carries
    /// no frames back; a mirror of a job this replica owns is not even subscribed).
    async fn append_frames(
        &self,
        stream_id: &str,
        bodies: &[EventBody],
        expected_first_seq: Option<u64>,
    ) -> Result<Appended, StoreError> {
        if bodies.is_empty() {
            return Ok(Appended {
                first_seq: expected_first_seq.unwrap_or_default(),
                count: 0,
            });
        }
        let cfg = &self.inner.cfg;
        // The seq the frames are built for: the expected one, else 0 (the function
        // rebuilds a frame that lands at another seq).
        let built = expected_first_seq.unwrap_or_default();
        let frames = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| Frame::encode(built + i as u64, body))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AppendError::Encode)?;
        let terminal_at = bodies.iter().position(EventBody::is_terminal);
        let status = match terminal_at.map(|i| &bodies[i]) {
            Some(EventBody::Final(f)) => match f.status {
                FinalStatus::Complete => "complete",
                FinalStatus::Aborted => "aborted",
            },
            Some(_) => "error",
            None => "",
        };
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(APPEND_BATCH_FN)
            .arg(2)
            .arg(self.key("job", stream_id))
            .arg(self.key("log", stream_id))
            .arg(cfg.limits.max_events)
            .arg(cfg.limits.max_bytes)
            .arg(cfg.running_ttl.as_millis() as u64)
            .arg(cfg.retention.as_millis() as u64)
            .arg(self.channel(stream_id))
            .arg(now_ms())
            .arg(
                expected_first_seq
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            )
            .arg(&self.inner.replica_id)
            .arg(terminal_at.map_or(0, |i| i + 1))
            .arg(status);
        for f in &frames {
            cmd.arg(&f.bytes[..]);
        }
        let terminal = terminal_at.is_some();
        let reply: Vec<Value> = self.fcall(&cmd).await?;
        match text_of(reply.first()).as_str() {
            "ok" => {
                let bad = || store_err("bad append reply");
                let first_seq = int_of(reply.get(1)).ok_or_else(bad)?;
                let count = (int_of(reply.get(2)).ok_or_else(bad)? as usize).min(bodies.len());
                let abort = int_of(reply.get(3)) == Some(1);
                // The mirror takes the landed events with their frames (built here, or
                // again for the seq they got): the owner never decodes its own JSON. Those
                // an earlier try landed are in the mirror or reach it as any other frame.
                let has_frames = count > 0;
                let mirror = if has_frames {
                    self.inner.mirrors.lock().get(stream_id).cloned()
                } else {
                    None
                };
                if let Some(m) = mirror {
                    for (i, (f, body)) in frames.into_iter().zip(bodies).take(count).enumerate() {
                        let seq = first_seq + i as u64;
                        let f = if f.seq == seq {
                            f
                        } else {
                            Frame::encode(seq, body).map_err(AppendError::Encode)?
                        };
                        self.deliver(stream_id, &m, f, Some(body));
                    }
                }
                let landed_terminal = terminal && count == bodies.len();
                if landed_terminal {
                    // Nobody appends after the terminal event: the mirror is whole.
                    self.disown(stream_id);
                }
                if abort && !landed_terminal {
                    // Someone asked to abort; the publish may not have reached us.
                    self.call_abort_handler(stream_id);
                }
                if landed_terminal
                    && has_frames
                    && let Some((meta, _)) = self.meta(stream_id).await?
                {
                    let freed: Result<Vec<redis::Value>, StoreError> = self
                        .query_each(vec![
                            srem(&self.user_running_key(&meta.user_id), stream_id),
                            srem(&self.running_key(), stream_id),
                        ])
                        .await;
                    // Not an error of the append (it landed): both sets heal themselves,
                    // dropping ids of ended jobs when they are next read.
                    if let Err(e) = freed {
                        tracing::debug!(stream_id, error = %e, "could not free the running slots");
                    }
                }
                Ok(Appended { first_seq, count })
            }
            "ended" => Err(AppendError::Ended.into()),
            "full" => Err(AppendError::Full.into()),
            "missing" => Err(StoreError::UnknownJob(stream_id.to_string())),
            "lost" => Err(StoreError::Inconsistent(format!(
                "the job store lost events of job {stream_id} (its log is shorter than \
                 what was appended)"
            ))),
            "conflict" => Err(StoreError::Inconsistent(format!(
                "another writer appended to job {stream_id}"
            ))),
            "bad frame" => Err(store_err(format!(
                "the append function could not read a frame of job {stream_id}"
            ))),
            other => Err(store_err(format!("unexpected append reply {other:?}"))),
        }
    }

    /// Registers `steps` of a new job: the job hash, the running slot, the
    /// conversation. Each can fail; the caller undoes them all.
    pub(crate) async fn create_steps(&self, meta: &JobMeta) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let conv_key = self.key("conv", &meta.conversation_id);
        let user_key = self.user_running_key(&meta.user_id);
        let ttl_ms = self.inner.cfg.running_ttl.as_millis() as u64;
        if let Some(max) = self.inner.cfg.max_running_per_user {
            // Self-healing first: ids of jobs that ended (or expired) do not count.
            self.running_jobs(&meta.user_id).await?;
            let ok: i64 = self
                .fcall(
                    redis::cmd("FCALL")
                        .arg(ACQUIRE_SLOT_FN)
                        .arg(1)
                        .arg(&user_key)
                        .arg(&meta.stream_id)
                        .arg(max),
                )
                .await?;
            if ok == 0 {
                return Err(StoreError::TooManyConcurrent(max));
            }
        } else {
            let _: () = conn
                .sadd(&user_key, &meta.stream_id)
                .await
                .map_err(store_err)?;
        }
        for _ in 0..3 {
            let holder: Option<String> = conn.get(&conv_key).await.map_err(store_err)?;
            if let Some(h) = &holder {
                let running: (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(self.key("job", h))
                    .arg("ended")
                    .arg("status")
                    .query_async(&mut conn)
                    .await
                    .map_err(store_err)?;
                if let (ended, Some(status)) = running
                    && ended.as_deref() != Some("1")
                    && status == "running"
                {
                    return Err(StoreError::ConversationBusy(meta.conversation_id.clone()));
                }
            }
            let ok: i64 = self
                .fcall(
                    redis::cmd("FCALL")
                        .arg(CLAIM_FN)
                        .arg(1)
                        .arg(&conv_key)
                        .arg(&meta.stream_id)
                        .arg(holder.unwrap_or_default())
                        .arg(ttl_ms),
                )
                .await?;
            if ok == 1 {
                return Ok(());
            }
        }
        Err(StoreError::ConversationBusy(meta.conversation_id.clone()))
    }

    pub(crate) async fn meta(
        &self,
        sid: &str,
    ) -> Result<Option<(JobMeta, HashMap<String, String>)>, StoreError> {
        let h: HashMap<String, String> = self
            .conn()
            .hgetall(self.key("job", sid))
            .await
            .map_err(store_err)?;
        Ok(meta_of(&h).map(|m| (m, h)))
    }
}

#[async_trait]
impl EventLogStore for RedisStore {
    async fn create_job(&self, meta: &JobMeta) -> Result<(), StoreError> {
        // The job hash and the global running set first, in one MULTI: from then on the
        // job is visible to the lease reaper, so if this replica dies before the job's
        // first event, another replica ends it (which frees the conversation and the
        // user's slot) instead of both staying taken for the running TTL. Then a
        // running slot of the user (atomic count-and-add), then the conversation
        // (compare-and-set against the holder we saw ended). Any failure undoes all of
        // it; if even the undo fails, the reaper finds the job (owner: us, no task) and
        // ends it.
        let job_key = self.key("job", &meta.stream_id);
        let ttl_ms = self.inner.cfg.running_ttl.as_millis() as u64;
        // Owned before the hash exists, so that no mirror of the job can open here
        // (it needs the hash) before this replica knows it writes the job alone.
        self.inner.owned.lock().insert(meta.stream_id.clone());
        let mut hash = redis::pipe();
        hash.atomic()
            .hset_multiple(
                &job_key,
                &[
                    ("streamId", meta.stream_id.as_str()),
                    ("userId", meta.user_id.as_str()),
                    ("conversationId", meta.conversation_id.as_str()),
                    ("userMessageId", meta.user_message_id.as_str()),
                    ("responseMessageId", meta.response_message_id.as_str()),
                    ("model", meta.model.as_str()),
                    ("status", "running"),
                    ("createdAt", meta.created_at.as_str()),
                    ("webhookUrl", meta.webhook_url.as_deref().unwrap_or("")),
                    ("owner", self.inner.replica_id.as_str()),
                    ("len", "0"),
                    ("bytes", "0"),
                    ("ended", "0"),
                ],
            )
            .ignore()
            .pexpire(&job_key, ttl_ms as i64)
            .ignore();
        let registered: redis::RedisResult<()> = if self.is_cluster() {
            // The hash and the global set lie in different slots: the hash first, then
            // the set. A replica that dies between the two leaves a hash no set names,
            // no conversation nor user slot taken yet (those come after), and its
            // caller never got the job: nothing waits for it, and it expires.
            match hash.query_async::<()>(&mut self.conn()).await {
                Ok(()) => self.conn().sadd(self.running_key(), &meta.stream_id).await,
                Err(e) => Err(e),
            }
        } else {
            hash.sadd(self.running_key(), &meta.stream_id)
                .ignore()
                .query_async(&mut self.conn())
                .await
        };
        let result = match registered {
            Ok(()) => self.create_steps(meta).await,
            Err(e) => Err(store_err(e)),
        };
        if result.is_err() {
            self.inner.owned.lock().remove(&meta.stream_id);
            let undone: Result<Vec<redis::Value>, StoreError> = self
                .query_each(vec![
                    srem(&self.user_running_key(&meta.user_id), &meta.stream_id),
                    srem(&self.running_key(), &meta.stream_id),
                    redis::cmd("DEL").arg(&job_key).clone(),
                ])
                .await;
            if let Err(e) = undone {
                tracing::warn!(stream_id = %meta.stream_id, error = %e,
                    "could not undo a failed job creation; the reaper will end it");
            }
        }
        result
    }

    async fn get_job(&self, stream_id: &str) -> Result<Option<JobMeta>, StoreError> {
        Ok(self.meta(stream_id).await?.map(|(m, _)| m))
    }

    async fn latest_job(&self, conversation_id: &str) -> Result<Option<JobMeta>, StoreError> {
        let holder: Option<String> = self
            .conn()
            .get(self.key("conv", conversation_id))
            .await
            .map_err(store_err)?;
        match holder {
            Some(sid) => self.get_job(&sid).await,
            None => Ok(None),
        }
    }

    async fn running_jobs(&self, user_id: &str) -> Result<Vec<JobMeta>, StoreError> {
        let set = self.user_running_key(user_id);
        let ids: Vec<String> = self.conn().smembers(&set).await.map_err(store_err)?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for id in ids {
            match self.get_job(&id).await? {
                Some(m) if m.status == JobStatus::Running => out.push(m),
                _ => stale.push(id),
            }
        }
        if !stale.is_empty() {
            let _: () = self.conn().srem(&set, &stale).await.map_err(store_err)?;
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    async fn append(
        &self,
        stream_id: &str,
        body: &EventBody,
        expected_seq: Option<u64>,
    ) -> Result<u64, StoreError> {
        let appended = self
            .append_batch(stream_id, std::slice::from_ref(body), expected_seq)
            .await?;
        Ok(appended.first_seq)
    }

    /// [`RedisStore::append_frames`]; a failed call ends this replica's sole ownership
    /// of the job's writes ([`RedisStore::disown`]).
    async fn append_batch(
        &self,
        stream_id: &str,
        bodies: &[EventBody],
        expected_first_seq: Option<u64>,
    ) -> Result<Appended, StoreError> {
        let appended = self
            .append_frames(stream_id, bodies, expected_first_seq)
            .await;
        if appended.is_err() {
            // Another writer may have ended the job, or the frames of a lost reply
            // may have landed: the mirror no longer relies on this replica's appends.
            self.disown(stream_id);
        }
        appended
    }

    async fn open_log(&self, stream_id: &str) -> Result<Option<Arc<EventLog>>, StoreError> {
        let existing = self.inner.mirrors.lock().get(stream_id).cloned();
        let m = match existing {
            Some(m) => m,
            None => {
                let exists: bool = self
                    .conn()
                    .exists(self.key("job", stream_id))
                    .await
                    .map_err(store_err)?;
                if !exists {
                    return Ok(None);
                }
                self.inner
                    .mirrors
                    .lock()
                    .entry(stream_id.to_string())
                    .or_insert_with(|| Arc::new(Mirror::new()))
                    .clone()
            }
        };
        m.ready
            .get_or_try_init(|| async {
                // Subscribe first (Redis confirms it), buffering what is published from
                // then on; then read the stream; then merge the buffer by seq. No event
                // can fall between the two (docs/lessons.md: Vercel resumable-stream #41), nor
                // between the read and the switch to live delivery. A job this replica
                // owns needs no subscription: its appends deliver to the mirror (into
                // the buffer until the merge), those before the mirror are in the read.
                self.subscribe_mirror(stream_id, &m).await?;
                self.catch_up(stream_id).await?;
                self.pause_point("open.after_range").await;
                self.settle(stream_id, &m);
                Ok::<(), StoreError>(())
            })
            .await?;
        Ok(Some(m.log.clone()))
    }

    async fn remove_expired(&self, _retention: Duration) -> Result<usize, StoreError> {
        // Redis expires finished jobs by TTL; unused mirrors are dropped by the healer.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Reachable, and able to run our functions (a Redis that restarted without
        // persistence answers PING but would fail every append).
        self.ensure_library().await?;
        if !self.inner.pubsub_up.load(Ordering::SeqCst) {
            return Err(store_err("pub/sub connection is down"));
        }
        Ok(())
    }

    async fn sync_log(&self, stream_id: &str) -> Result<(), StoreError> {
        self.catch_up(stream_id).await
    }

    /// The mirror once it is subscribed and filled (see the crate docs, "Fan-out").
    fn ready_log(&self, stream_id: &str) -> Option<Arc<EventLog>> {
        let m = self.inner.mirrors.lock().get(stream_id).cloned()?;
        m.ready.get().map(|_| m.log.clone())
    }

    /// The job's `len` and `ended` (one `HMGET`) with the first entries from the
    /// cursor on (`XRANGE`), in one pipelined round trip; then more entries only if
    /// those held fewer than `max` frames and the log has more. An entry holds a whole
    /// appended batch, so the first read asks for as many entries as `max` frames
    /// fill if every entry is a full batch ([`MAX_APPEND_BATCH`] events), and each
    /// next one for as many as the entries read so far say the missing frames fill
    /// (a log of one event per entry, a job slower than its store: `max` entries in
    /// two reads). A page is short only at the log's head as of that `len`. Nothing
    /// of this replica's mirror is touched, and no frame's JSON is parsed.
    async fn read_range(
        &self,
        stream_id: &str,
        cursor: Option<u64>,
        max: usize,
    ) -> Result<Option<RangePage>, StoreError> {
        let max = max.max(1);
        let from = cursor.map_or(0, |c| c.saturating_add(1));
        let key = self.key("log", stream_id);
        let mut count = max.div_ceil(MAX_APPEND_BATCH);
        let (head, reply): ((Option<u64>, Option<String>), Value) = redis::pipe()
            .cmd("HMGET")
            .arg(self.key("job", stream_id))
            .arg("len")
            .arg("ended")
            .add_command(xrange(&key, from, count))
            .query_async(&mut self.conn())
            .await
            .map_err(store_err)?;
        let (Some(len), ended) = head else {
            return Ok(None);
        };
        let want = max.min(len.saturating_sub(from) as usize);
        let (mut frames, mut entries) = stream_frames(reply, from);
        let mut whole = keep_consecutive(&mut frames, from);
        let mut reads = 1;
        while whole && frames.len() < want && entries == count {
            let missing = want - frames.len();
            // Entries of the size seen so far; after two guesses, one entry per frame
            // (each holds at least one), which always completes the page.
            count = if reads < 3 {
                (missing * entries)
                    .div_ceil(frames.len().max(1))
                    .clamp(1, missing)
            } else {
                missing
            };
            let next = from + frames.len() as u64;
            let reply: Value = xrange(&key, next, count)
                .query_async(&mut self.conn())
                .await
                .map_err(store_err)?;
            let (more, n) = stream_frames(reply, next);
            if more.is_empty() {
                break; // nothing readable there (defence: the log has no holes)
            }
            frames.extend(more);
            whole = keep_consecutive(&mut frames, from);
            entries = n;
            reads += 1;
        }
        frames.truncate(want);
        Ok(Some(RangePage {
            frames,
            len,
            ended: ended.as_deref() == Some("1"),
        }))
    }
}

/// Keeps `frames` consecutive from seq `from` on: cuts them at the first that is not
/// (the caller must never skip a seq; the log has no holes, so this is defence).
/// Returns whether nothing was cut.
fn keep_consecutive(frames: &mut Vec<Frame>, from: u64) -> bool {
    match frames
        .iter()
        .enumerate()
        .position(|(i, f)| f.seq != from + i as u64)
    {
        Some(bad) => {
            frames.truncate(bad);
            false
        }
        None => true,
    }
}

pub(crate) fn meta_of(h: &HashMap<String, String>) -> Option<JobMeta> {
    let g = |k: &str| h.get(k).cloned();
    Some(JobMeta {
        stream_id: g("streamId")?,
        user_id: g("userId")?,
        conversation_id: g("conversationId")?,
        user_message_id: g("userMessageId")?,
        response_message_id: g("responseMessageId")?,
        model: g("model")?,
        status: match g("status")?.as_str() {
            "complete" => JobStatus::Complete,
            "aborted" => JobStatus::Aborted,
            "error" => JobStatus::Error,
            _ => JobStatus::Running,
        },
        created_at: g("createdAt")?,
        webhook_url: g("webhookUrl").filter(|u| !u.is_empty()),
    })
}

/// `SREM set member`.
fn srem(set: &str, member: &str) -> redis::Cmd {
    let mut c = redis::cmd("SREM");
    c.arg(set).arg(member);
    c
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A bulk or simple string reply as text.
pub(crate) fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).to_string(),
        Some(Value::SimpleString(s)) => s.clone(),
        _ => String::new(),
    }
}

pub(crate) fn int_of(v: Option<&Value>) -> Option<u64> {
    match v {
        Some(Value::Int(i)) => u64::try_from(*i).ok(),
        _ => None,
    }
}
