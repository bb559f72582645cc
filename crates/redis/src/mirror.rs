//! Mirrors: this replica's local copy ([`EventLog`]) of each job log its subscribers
//! read, filled strictly by seq from published frames and stream reads, healed every
//! `heal_interval`, dropped once nobody reads it (see the crate docs, "Fan-out").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use genstream_engine::event::{ErrorEvent, EventBody, Frame};
use genstream_engine::log::{EventLog, LogLimits};
use parking_lot::Mutex;
use redis::Value;
use tokio::sync::OnceCell;

use crate::conn::PubSubSink;
use crate::{RedisStore, StoreError, store_err};

/// Stream entries read per XRANGE when catching a mirror up.
pub(crate) const RANGE_BATCH: usize = 1000;

/// Heal passes in a row that could not compare the mirrors with Redis before a
/// Cluster's command connection is replaced (see `heal_loop`).
const FAILED_PASSES: u32 = 3;

/// Frames a mirror buffers while it is being opened; past it the rest are left to the
/// range read that follows (it reads to the stream's head anyway).
pub(crate) const PENDING_CAP: usize = 10_000;

pub(crate) struct Mirror {
    pub(crate) log: Arc<EventLog>,
    /// Set once the channel is subscribed and the stream read up to its head.
    pub(crate) ready: OnceCell<()>,
    /// Frames published while the mirror is being opened (subscribed, stream not read
    /// yet), merged by seq once the read is done; `None` from then on.
    pub(crate) pending: Mutex<Option<Vec<Frame>>>,
    /// Whether this replica's pub/sub connection is subscribed to the job's channel.
    /// Not while this replica owns the job (`Inner::owned`): every frame then comes from
    /// its own appends, and its own publish would only come back to be dropped. Read
    /// and written under the sink's lock, so that a reconnect or an unsubscribe never
    /// misses a subscription nor sends an unsubscribe for one never made.
    pub(crate) subscribed: AtomicBool,
    /// The log's length in Redis at the last heal pass (0 before the first): a mirror
    /// still short of it a pass later missed what a publish or an append's reply was to
    /// bring, while one short only of what landed since is merely waiting for them.
    pub(crate) heard: AtomicU64,
}

impl Mirror {
    pub(crate) fn new() -> Mirror {
        Mirror {
            // The append function enforces the caps; a mirror takes whatever the log
            // holds.
            log: Arc::new(EventLog::new(LogLimits {
                max_events: usize::MAX,
                max_bytes: usize::MAX,
            })),
            ready: OnceCell::new(),
            pending: Mutex::new(Some(Vec::new())),
            subscribed: AtomicBool::new(false),
            heard: AtomicU64::new(0),
        }
    }
}

impl RedisStore {
    /// Puts a published (or just appended) frame into the mirror: buffered while the
    /// mirror is being opened, else inserted at its seq; a gap makes the replica read
    /// the missing range, never skip it. `body` is the event the frame encodes when
    /// the caller has it (the owner, with the frames it built for its append): its JSON
    /// is then not decoded again.
    pub(crate) fn deliver(
        &self,
        sid: &str,
        m: &Arc<Mirror>,
        frame: Frame,
        body: Option<&EventBody>,
    ) {
        {
            let mut pending = m.pending.lock();
            if let Some(buf) = pending.as_mut() {
                if buf.len() < PENDING_CAP {
                    buf.push(frame);
                }
                return;
            }
        }
        let gap = match body {
            Some(body) => self.insert_encoded(m, frame, body),
            // An unreadable frame has ended the mirror already: nothing to catch up.
            None => matches!(self.insert(sid, m, frame), Ok(true)),
        };
        if gap {
            self.spawn_catch_up(sid);
        }
    }

    /// [`RedisStore::insert`] of a frame whose event the caller has (`body`): no JSON
    /// decode, and so no error. True if the frame lies past the mirror's head (a gap).
    fn insert_encoded(&self, m: &Mirror, frame: Frame, body: &EventBody) -> bool {
        let seq = frame.seq;
        if seq < m.log.len() {
            return false;
        }
        !m.log.insert_encoded(frame, body) && seq > m.log.len()
    }

    /// Inserts `frame` at its seq; `Ok(true)` if it lies past the mirror's head (a gap:
    /// the caller reads the missing range), `Ok(false)` if it was inserted or is one
    /// the mirror holds already.
    ///
    /// Errors: [`StoreError::Inconsistent`] if this replica cannot read the frame (a
    /// corrupt entry, or one a newer release wrote). The mirror cannot serve it, nor
    /// anything after it, so this ends the mirror with `error` `store_unavailable` and
    /// logs it once, here, rather than leave its subscribers waiting forever.
    pub(crate) fn insert(&self, sid: &str, m: &Mirror, frame: Frame) -> Result<bool, StoreError> {
        let seq = frame.seq;
        // One the mirror holds already (the owner's own publish coming back after the
        // append's reply delivered it, a range read that overlapped): no JSON parse.
        if seq < m.log.len() {
            return Ok(false);
        }
        match m.log.insert_frame(frame) {
            Ok(inserted) => Ok(!inserted && seq > m.log.len()),
            Err(e) => {
                tracing::error!(stream_id = %sid, seq, error = %e,
                    "an event of this job's Redis log cannot be read; ending its mirror");
                self.end_lost_mirror(sid, m, &format!("event {seq} cannot be read"));
                Err(StoreError::Inconsistent(format!(
                    "event {seq} of job {sid} cannot be read: {e}"
                )))
            }
        }
    }

    /// Subscribes this replica's pub/sub connection to the channel of job `sid` for
    /// its mirror `m`, unless it is subscribed already or this replica owns the job
    /// (its own appends fill the mirror). Returns once Redis confirmed the subscription.
    ///
    /// Errors: unavailable if the pub/sub connection is reconnecting or does not
    /// confirm within `timeout` (the mirror's opening fails; the next reader retries).
    pub(crate) async fn subscribe_mirror(&self, sid: &str, m: &Mirror) -> Result<(), StoreError> {
        let mut sink = self.inner.sink.lock().await;
        if m.subscribed.load(Ordering::SeqCst) || self.inner.owned.lock().contains(sid) {
            return Ok(());
        }
        match sink.as_mut() {
            Some(s) => self.subscribe_channel(s, sid).await?,
            None => return Err(store_err("pub/sub is reconnecting")),
        }
        m.subscribed.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Subscribes `sink` to job `sid`'s channel, waiting up to `timeout` for Redis to
    /// confirm. The caller holds the sink's lock and sets the mirror's flag.
    async fn subscribe_channel(&self, sink: &mut PubSubSink, sid: &str) -> Result<(), StoreError> {
        tokio::time::timeout(
            self.inner.cfg.timeout,
            sink.subscribe_jobs(std::slice::from_ref(&self.channel(sid))),
        )
        .await
        .map_err(|_| store_err("pub/sub subscribe timed out"))?
        .map_err(store_err)
    }

    /// This replica no longer writes job `sid` alone: its terminal event landed, or
    /// one of its appends failed (another writer, a reaper that took the end, may have
    /// appended; a lost reply's frames may have landed). A mirror of the job that is
    /// not whole yet subscribes to the job's channel and reads what it may have missed;
    /// should the subscription fail, the pub/sub connection is being replaced, and the
    /// new one subscribes it (the flag is set either way). The healer repairs anything
    /// in between within two heal intervals.
    pub(crate) fn disown(&self, sid: &str) {
        if !self.inner.owned.lock().remove(sid) {
            return;
        }
        let Some(m) = self.inner.mirrors.lock().get(sid).cloned() else {
            return;
        };
        if m.log.terminal().is_some() {
            return;
        }
        let this = self.clone();
        let sid = sid.to_string();
        tokio::spawn(async move {
            {
                let mut sink = this.inner.sink.lock().await;
                if !m.subscribed.swap(true, Ordering::SeqCst)
                    && let Some(s) = sink.as_mut()
                    && let Err(e) = this.subscribe_channel(s, &sid).await
                {
                    tracing::debug!(stream_id = %sid, error = %e, "could not subscribe a disowned mirror");
                }
            }
            if let Err(e) = this.catch_up(&sid).await
                && e.is_unavailable()
            {
                tracing::warn!(stream_id = %sid, error = %e, "could not catch a mirror up");
            }
        });
    }

    pub(crate) fn spawn_catch_up(&self, sid: &str) {
        let this = self.clone();
        let sid = sid.to_string();
        tokio::spawn(async move {
            match this.catch_up(&sid).await {
                // The healer compares the mirror with Redis again within two seconds.
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(stream_id = %sid, error = %e, "could not catch a mirror up");
                }
                // Logged, and the mirror ended, where the frame was read.
                Err(_) | Ok(()) => {}
            }
        });
    }

    /// Merges the frames buffered while the mirror was opened (by seq; those the range
    /// read already covered are ignored) and switches the mirror to live delivery.
    pub(crate) fn settle(&self, sid: &str, m: &Mirror) {
        let gap = {
            let mut pending = m.pending.lock();
            let mut buf = pending.take().unwrap_or_default();
            buf.sort_by_key(|f| f.seq);
            let mut gap = false;
            for f in buf {
                match self.insert(sid, m, f) {
                    Ok(g) => gap |= g,
                    // The mirror ended: nothing after the unreadable frame is served.
                    Err(_) => return,
                }
            }
            gap
        };
        if gap {
            self.spawn_catch_up(sid);
        }
    }

    /// Reads the stream from the mirror's head into the mirror.
    pub(crate) async fn catch_up(&self, sid: &str) -> Result<(), StoreError> {
        let Some(m) = self.inner.mirrors.lock().get(sid).cloned() else {
            return Ok(());
        };
        let key = self.key("log", sid);
        let mut conn = self.conn();
        loop {
            let reply: Value = xrange(&key, m.log.len(), RANGE_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(store_err)?;
            let (frames, n) = stream_frames(reply, m.log.len());
            for f in frames {
                self.insert(sid, &m, f)?;
            }
            if n < RANGE_BATCH {
                return Ok(());
            }
        }
    }

    /// Heals mirrors every `heal_interval`; a pass is cut short after
    /// `timeout + heal_interval`, so one slow pass never stalls the next.
    ///
    /// On a Cluster, [`FAILED_PASSES`] passes in a row that could not compare the
    /// mirrors replace the command connection: after a failover the cluster connection
    /// may keep a slot map that sends one slot's commands to the wrong node (its
    /// `MOVED` answers reaching us instead of being followed) while other slots, the
    /// lease's among them, still answer; a fresh connection learns the topology anew.
    pub(crate) async fn heal_loop(self) {
        let every = self.inner.cfg.heal_interval.max(Duration::from_millis(10));
        let bound = self.inner.cfg.timeout + every;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed = 0;
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match tokio::time::timeout(bound, self.heal_mirrors()).await {
                Ok(true) => failed = 0,
                Ok(false) => failed += 1,
                Err(_) => {
                    tracing::warn!("a mirror heal pass took longer than {bound:?}; cut short");
                    failed += 1;
                }
            }
            if failed >= FAILED_PASSES
                && self.is_cluster()
                && self
                    .replace_conn("mirror heal passes kept failing on the Cluster")
                    .await
            {
                failed = 0;
            }
        }
    }

    /// The mirrors held now, each with its stream id: a copy of the map's entries, so
    /// that nothing awaits under its lock.
    pub(crate) fn mirror_list(&self) -> Vec<(String, Arc<Mirror>)> {
        self.inner
            .mirrors
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// One heal pass: mirrors that fell behind (a lost publish) read the missing
    /// range, mirrors whose job vanished end, mirrors nobody reads any more go.
    /// False if the mirrors could not be compared with Redis.
    pub(crate) async fn heal_mirrors(&self) -> bool {
        self.pause_point("heal.pass").await;
        let mirrors = self.mirror_list();
        let mut unused = Vec::new();
        let mut live = Vec::new();
        for (sid, m) in mirrors {
            // The map and this loop hold the only references: no subscriber.
            if Arc::strong_count(&m) <= 2 && Arc::strong_count(&m.log) == 1 {
                unused.push(sid);
            } else {
                live.push((sid, m));
            }
        }
        let compared = match self.resync(live, Catch::Missed).await {
            Ok(_) => true,
            Err(e) => {
                // The next pass, within `heal_interval`, tries again.
                tracing::warn!(error = %e, "could not compare mirrors with Redis");
                false
            }
        };
        if !unused.is_empty() {
            self.drop_unused(&unused).await;
        }
        compared
    }

    /// Compares the mirrors with their jobs' hashes (one pipelined round trip) and
    /// catches up those behind (as `catch` says); ends those whose log Redis no longer
    /// has. Returns how many mirrors it started catching up.
    pub(crate) async fn resync(
        &self,
        mirrors: Vec<(String, Arc<Mirror>)>,
        catch: Catch,
    ) -> Result<usize, StoreError> {
        // Each mirror's length before Redis is asked: a mirror only ever holds a prefix
        // of the log, so Redis answering less than that (read later) means it lost
        // events, while the mirror growing meanwhile means nothing.
        let mirrors: Vec<(String, Arc<Mirror>, u64)> = mirrors
            .into_iter()
            .filter(|(_, m)| m.ready.get().is_some() && m.log.terminal().is_none())
            .map(|(sid, m)| {
                let have = m.log.len();
                (sid, m, have)
            })
            .collect();
        if mirrors.is_empty() {
            return Ok(0);
        }
        let mut caught = 0;
        let cmds = mirrors
            .iter()
            .map(|(sid, _, _)| {
                let mut c = redis::cmd("HMGET");
                c.arg(self.key("job", sid)).arg("len").arg("ended");
                c
            })
            .collect();
        let heads: Vec<(Option<u64>, Option<String>)> = self.query_each(cmds).await?;
        for ((sid, m, have), (len, ended)) in mirrors.into_iter().zip(heads) {
            let ended = ended.as_deref() == Some("1");
            match len {
                None => self.end_lost_mirror(&sid, &m, "Redis no longer has this job"),
                // Redis holds fewer events than we served, or ended where we hold
                // something else: its log is not the one our subscribers read.
                Some(l) if l < have || (ended && l == have) => {
                    self.end_lost_mirror(&sid, &m, "Redis lost part of this job's log")
                }
                Some(l) if l > have => {
                    let heard = m.heard.swap(l, Ordering::SeqCst);
                    if catch == Catch::Behind || have < heard {
                        self.spawn_catch_up(&sid);
                        caught += 1;
                    }
                }
                Some(_) => {}
            }
        }
        Ok(caught)
    }

    /// Ends a mirror whose log Redis lost (a restart without persistence, a failover to
    /// a node that lagged): its subscribers get a terminal `error` `store_unavailable`
    /// with the next seq, made here, since no log is left to hold one. The owner saves
    /// the partial answer when its next append finds the job gone; clients that come
    /// back get 404 and read the persisted messages.
    pub(crate) fn end_lost_mirror(&self, sid: &str, m: &Mirror, why: &str) {
        let body = EventBody::Error(ErrorEvent {
            code: "store_unavailable".into(),
            message: format!(
                "the job store lost this generation's event log ({why}); \
                 the partial answer is kept in the conversation"
            ),
            response_message: None,
        });
        let frame = match Frame::encode(m.log.len(), &body) {
            Ok(f) => f,
            Err(e) => {
                // A fixed error event of strings: serde_json cannot refuse it.
                tracing::error!(stream_id = %sid, error = %e, "could not encode the end of a lost mirror");
                return;
            }
        };
        if let Ok(true) = m.log.insert_frame(frame) {
            tracing::warn!(stream_id = %sid, "{why}; ended its subscribers' streams");
        }
    }

    /// Drops mirrors nobody reads and unsubscribes their channels. The sink's lock is
    /// held from before the mirrors leave the map until Redis confirmed the
    /// unsubscribe: a mirror opened for the same job meanwhile subscribes only after
    /// that (Redis subscriptions are not counted, so an unsubscribe sent after its
    /// subscribe would silently cancel it).
    pub(crate) async fn drop_unused(&self, candidates: &[String]) {
        let mut sink = self.inner.sink.lock().await;
        let channels: Vec<String> = {
            let mut map = self.inner.mirrors.lock();
            let mut gone = Vec::new();
            for sid in candidates {
                let still_unused = map
                    .get(sid)
                    .is_some_and(|m| Arc::strong_count(m) == 1 && Arc::strong_count(&m.log) == 1);
                // A mirror of a job this replica owns was never subscribed.
                if still_unused
                    && let Some(m) = map.remove(sid)
                    && m.subscribed.load(Ordering::SeqCst)
                {
                    gone.push(self.channel(sid));
                }
            }
            gone
        };
        self.pause_point("heal.after_remove").await;
        if let Some(s) = sink.as_mut()
            && !channels.is_empty()
        {
            // Best effort: a subscription left behind only brings frames that
            // `on_frames` drops (no mirror), and goes with the next reconnect.
            let unsubscribed =
                tokio::time::timeout(self.inner.cfg.timeout, s.unsubscribe_jobs(&channels)).await;
            if !matches!(unsubscribed, Ok(Ok(()))) {
                tracing::debug!(
                    count = channels.len(),
                    "could not unsubscribe unused mirrors"
                );
            }
        }
    }
}

/// Which mirrors [`RedisStore::resync`] reads the missing range of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Catch {
    /// Every mirror behind Redis: after a pub/sub reconnect, when publishes were lost.
    Behind,
    /// Only a mirror still short of the length Redis had at the previous pass (what
    /// landed a whole heal interval ago never reached it: a lost publish). One short
    /// only of what landed since is waiting for a publish or an append's reply in
    /// flight; reading the range for it would be a wasted `XRANGE` (with 1,000 busy
    /// jobs, about 1,000 a second per replica, most of them wasted). A lost event is
    /// thus repaired within two heal intervals.
    Missed,
}

/// `XRANGE` of up to `count` entries of a log stream from the entry holding seq `from`
/// on (an entry's id is `0-(its last seq + 1)`, see the crate docs, "Layout"; each
/// holds at least one seq, so `count` entries hold at least `count` seqs when the log
/// has them).
pub(crate) fn xrange(key: &str, from: u64, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key)
        .arg(format!("0-{}", from.saturating_add(1)))
        .arg("+")
        .arg("COUNT")
        .arg(count.max(1));
    cmd
}

/// The frames from seq `from` on of an `XRANGE` reply ([`xrange`]), in stream order,
/// and the number of entries the reply held. Each entry's field `f` holds one appended
/// batch's frames concatenated ([`split_frames`]); the frames before `from` in the
/// first entry are left out. The frames share the reply's buffers (no copy) and only
/// each frame's header is read (no JSON).
pub(crate) fn stream_frames(reply: Value, from: u64) -> (Vec<Frame>, usize) {
    let Value::Array(entries) = reply else {
        return (Vec::new(), 0);
    };
    let n = entries.len();
    let mut frames = Vec::with_capacity(n);
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            continue;
        };
        let fields = match parts.pop() {
            Some(Value::Array(fields)) => fields,
            Some(Value::Map(pairs)) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => continue,
        };
        let mut it = fields.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            if matches!(&k, Value::BulkString(b) if b == b"f") {
                if let Value::BulkString(b) = v {
                    frames.extend(
                        split_frames(Bytes::from(b))
                            .into_iter()
                            .filter(|f| f.seq >= from),
                    );
                }
                break;
            }
        }
    }
    (frames, n)
}

/// The frames of one appended batch, as a log stream entry holds them and as one
/// message of the job's channel carries them (`genstream_append_batch_v6` writes and
/// publishes the same bytes): the frames concatenated, in seq order. Each frame ends
/// with a blank line (`\n\n`) and none holds one before its end (its JSON is compact,
/// newlines escaped), so the bytes are cut after each `\n\n`. The frames share the
/// buffer. A piece that is not a frame is left out: a mirror then sees a gap at the
/// next frame and reads the missing range from the stream.
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
