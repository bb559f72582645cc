//! Unit tests of the store's internals against the real Redis (127.0.0.1:6379, or
//! `GENSTREAM_TEST_REDIS_URL`), each under a key prefix of its own. They hold a
//! background task at a named [`RedisStore::pause_point`] to force the interleavings
//! that once lost events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use super::*;
use futures::StreamExt;
use genstream_engine::event::{
    ContentPart, Delta, DeltaContent, ErrorEvent, EventBody, Frame, ToolCallChunk, ToolCallsDelta,
};
use genstream_engine::log::EventLog;
use genstream_engine::store::{EventLogStore, JobCoordination, JobMeta, JobStatus};
use genstream_test_support::wait_until;
use redis::AsyncCommands;

/// A one-shot gate: the task reaching its point waits until released.
pub(crate) struct Gate {
    pub(crate) reached: Notify,
    pub(crate) release: tokio::sync::Semaphore,
}

use genstream_test_support::redis_url;

fn config(prefix: &str) -> RedisConfig {
    let mut cfg = RedisConfig::new(&redis_url());
    cfg.key_prefix = prefix.to_string();
    cfg.running_ttl = Duration::from_secs(120);
    cfg.retention = Duration::from_secs(60);
    // No healer pass after the first: it would repair what these tests check is
    // never broken in the first place.
    cfg.heal_interval = Duration::from_secs(3600);
    cfg
}

fn prefix() -> String {
    format!("gstest-{}", uuid::Uuid::now_v7())
}

/// A store under prefix `p` and a job created in it.
async fn store_with_job(p: &str) -> (RedisStore, JobMeta) {
    let store = RedisStore::connect(config(p)).await.unwrap();
    let m = meta();
    store.create_job(&m).await.unwrap();
    (store, m)
}

/// A store with a job holding one event (`delta("a")` at seq 0), and a second store
/// (another replica) under the same prefix that has not read it yet.
async fn owner_and_reader_with_one_event() -> (RedisStore, RedisStore, JobMeta) {
    let p = prefix();
    let (owner, m) = store_with_job(&p).await;
    let reader = RedisStore::connect(config(&p)).await.unwrap();
    owner
        .append(&m.stream_id, &delta("a"), Some(0))
        .await
        .unwrap();
    (owner, reader, m)
}

/// The `resume=true` snapshot of a log fed `bodies` one by one: what a mirror's fold
/// of the same events must equal.
fn folded(bodies: &[EventBody]) -> (Option<u64>, genstream_engine::aggregate::ResumeState) {
    let local = EventLog::new(genstream_engine::log::LogLimits::default());
    for b in bodies {
        local.append(b).unwrap();
    }
    local.snapshot()
}

/// `got` holds `want`'s frames byte for byte, seq by seq.
fn assert_same_frames(got: &[Frame], want: &[Frame]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.seq, &g.bytes), (w.seq, &w.bytes), "seq {}", w.seq);
    }
}

impl RedisStore {
    /// Holds the next task that reaches `point`; returns its gate.
    fn gate(&self, point: &'static str) -> Arc<Gate> {
        let g = Arc::new(Gate {
            reached: Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        });
        self.inner.gates.lock().insert(point, g.clone());
        g
    }
}

fn meta() -> JobMeta {
    JobMeta {
        stream_id: uuid::Uuid::now_v7().to_string(),
        user_id: format!("u-{}", uuid::Uuid::now_v7()),
        conversation_id: uuid::Uuid::now_v7().to_string(),
        user_message_id: uuid::Uuid::now_v7().to_string(),
        response_message_id: uuid::Uuid::now_v7().to_string(),
        model: "demo".into(),
        status: JobStatus::Running,
        created_at: "2026-01-01T00:00:00.000Z".into(),
        webhook_url: None,
    }
}

fn delta(text: &str) -> EventBody {
    EventBody::MessageDelta(Delta {
        id: "step_0".into(),
        delta: DeltaContent {
            content: vec![ContentPart::Text { text: text.into() }],
        },
    })
}

/// Waits up to `within` for `log` to hold `n` events.
async fn has_len(log: &EventLog, n: u64, within: Duration) -> bool {
    let mut rx = log.watch();
    tokio::time::timeout(within, async {
        loop {
            rx.borrow_and_update();
            if log.len() >= n {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok()
        && log.len() >= n
}

#[test]
fn redacts_passwords() {
    assert_eq!(
        redact_url("redis://u:secret@h:6379/0"),
        "redis://u:***@h:6379/0"
    );
    assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
}

/// A frame published after the mirror's range read but before it is marked ready is
/// buffered and merged, not dropped until the next frame or the healer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_published_while_a_mirror_opens_is_not_dropped() {
    let (owner, reader, m) = owner_and_reader_with_one_event().await;

    let gate = reader.gate("open.after_range");
    let opening = {
        let reader = reader.clone();
        let sid = m.stream_id.clone();
        tokio::spawn(async move { reader.open_log(&sid).await })
    };
    gate.reached.notified().await;
    // The range read is done (one event); this one is only published.
    owner
        .append(&m.stream_id, &delta("b"), Some(1))
        .await
        .unwrap();
    // Wait until the publish is in the opening mirror's buffer, so the merge is what
    // must bring it in (not a later live delivery): the race under test, every run.
    let mirror = reader
        .inner
        .mirrors
        .lock()
        .get(&m.stream_id)
        .cloned()
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the publish reaches the opening mirror",
        || {
            let buffered = mirror.pending.lock().as_ref().map_or(0, Vec::len);
            async move { buffered == 1 }
        },
    )
    .await;
    assert_eq!(
        mirror.log.len(),
        1,
        "the published frame waits in the buffer"
    );
    gate.release.add_permits(1);
    let log = opening.await.unwrap().unwrap().unwrap();
    assert!(
        has_len(&log, 2, Duration::from_millis(300)).await,
        "the mirror holds {} of 2 events: the frame published during the open was lost",
        log.len()
    );
    owner.close();
    reader.close();
}

/// The healer drops an unused mirror; a subscriber opens the same job again before
/// the healer's UNSUBSCRIBE went out. The new mirror must still get live frames
/// (Redis subscriptions are not counted: a late UNSUBSCRIBE cancels the new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_a_dropped_mirror_does_not_cancel_a_new_one() {
    let (owner, reader, m) = owner_and_reader_with_one_event().await;
    let first = reader.open_log(&m.stream_id).await.unwrap().unwrap();
    drop(first); // nobody reads it: the healer's to drop

    let gate = reader.gate("heal.after_remove");
    let healer = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.heal_mirrors().await })
    };
    gate.reached.notified().await;
    assert!(
        reader.inner.mirrors.lock().is_empty(),
        "the mirror was dropped"
    );
    let opening = {
        let reader = reader.clone();
        let sid = m.stream_id.clone();
        tokio::spawn(async move { reader.open_log(&sid).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.release.add_permits(1);
    healer.await.unwrap();
    let log = opening.await.unwrap().unwrap().unwrap();
    assert_eq!(log.len(), 1);
    owner
        .append(&m.stream_id, &delta("b"), Some(1))
        .await
        .unwrap();
    assert!(
        has_len(&log, 2, Duration::from_secs(1)).await,
        "the reopened mirror gets no live frames: its subscription was cancelled"
    );
    owner.close();
    reader.close();
}

/// A heal pass that hangs must not delay the lease: peers would reap live jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_heal_pass_does_not_delay_the_lease() {
    let p = prefix();
    let mut cfg = config(&p);
    cfg.lease_ttl = Duration::from_millis(600);
    cfg.heal_interval = Duration::from_millis(50);
    cfg.timeout = Duration::from_secs(5); // the heal pass is cut after 5.05 s
    let store = RedisStore::connect(cfg).await.unwrap();
    let gate = store.gate("heal.pass");
    gate.reached.notified().await;
    let mut conn = store.conn();
    let key = store.lease_key(store.replica_id());
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        let alive: bool = conn.exists(&key).await.unwrap();
        assert!(
            alive,
            "the lease lapsed {:?} into a stuck heal pass",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gate.release.add_permits(1);
    store.close();
}

/// An abort request whose publish the owner missed (its pub/sub connection was
/// reconnecting) still reaches it: with its next append, and by the requester
/// publishing again while the job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_request_reaches_an_owner_that_missed_the_publish() {
    let p = prefix();
    let owner = RedisStore::connect(config(&p)).await.unwrap();
    let asker = RedisStore::connect(config(&p)).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    owner.set_abort_handler(Arc::new(move |sid: &str| {
        let _ = tx.send(sid.to_string());
    }));
    let m = meta();
    owner.create_job(&m).await.unwrap();
    owner
        .append(&m.stream_id, &delta("a"), Some(0))
        .await
        .unwrap();
    // The owner stops hearing the control channel.
    let ctl = owner.ctl_channel();
    owner
        .inner
        .sink
        .lock()
        .await
        .as_mut()
        .unwrap()
        .unsubscribe_control(&ctl)
        .await
        .unwrap();
    asker.request_abort(&m.stream_id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rx.try_recv().is_err(),
        "the publish did not reach the owner"
    );
    owner
        .append(&m.stream_id, &delta("b"), Some(1))
        .await
        .unwrap();
    assert_eq!(
        rx.try_recv().ok().as_deref(),
        Some(m.stream_id.as_str()),
        "the append reports the abort request"
    );
    // Back on the control channel (as after a reconnect): the request is published
    // again while the job runs.
    owner
        .inner
        .sink
        .lock()
        .await
        .as_mut()
        .unwrap()
        .subscribe_control(&ctl)
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("the request is published again")
        .unwrap();
    assert_eq!(again, m.stream_id);
    // Once the job ended, nothing more.
    owner
        .append(
            &m.stream_id,
            &EventBody::Error(ErrorEvent {
                code: "x".into(),
                message: "x".into(),
                response_message: None,
            }),
            Some(2),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    while rx.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        rx.try_recv().is_err(),
        "published again after the job ended"
    );
    owner.close();
    asker.close();
}

/// The Redis append function rewrites the seq of a frame that lands at another seq
/// than its writer built it for (`reseq` in Lua); its bytes must be exactly those
/// `Frame::encode` makes for the event at that seq, for JSON that is easy to get
/// wrong: escapes, control characters, quotes and backslashes, non-ASCII and
/// astral-plane text, U+2028/U+2029, JSON inside strings, and seqs of more than one
/// digit. Three logs: events appended one by one with no expected seq (each frame is
/// built for seq 0 and rewritten), one batch at its expected seq (taken as built),
/// and one batch with no expected seq behind a first event (every frame rewritten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_frames_equal_frame_encode() {
    let p = prefix();
    let (store, m) = store_with_job(&p).await;
    let texts = [
        "plain",
        "line\nbreak\r\ttab",
        "\"quoted\" and \\backslash\\ and /slash/",
        "ü é ß — “curly” 日本語 😀 𝄞",
        "\u{2028}\u{2029}\u{0}\u{1f}\u{7f}",
        "</script><!-- & %s %d ${x} {{y}}",
        "{\"json\": [1, \"two\", {\"three\": null}]}",
        "",
    ];
    let mut bodies: Vec<EventBody> = texts.iter().map(|t| delta(t)).collect();
    bodies.push(EventBody::RunStepDelta(
        genstream_engine::event::RunStepDelta {
            id: "step_1".into(),
            delta: ToolCallsDelta {
                kind: genstream_engine::event::StepType::ToolCalls,
                tool_calls: vec![ToolCallChunk {
                    id: Some("call_ü".into()),
                    name: Some("calc".into()),
                    args: "{\"expr\":\"1\\n+2\"}".into(),
                    index: 0,
                }],
            },
        },
    ));
    // Enough events for two-digit seqs.
    for i in 0..6 {
        bodies.push(delta(&format!("{i}\u{e9}")));
    }
    bodies.push(EventBody::Error(ErrorEvent {
        code: "upstream_error".into(),
        message: "bad \"gateway\"\n\u{2028}😀".into(),
        response_message: None,
    }));
    for (seq, body) in bodies.iter().enumerate() {
        assert_eq!(
            store.append(&m.stream_id, body, None).await.unwrap(),
            seq as u64
        );
    }
    let batched = meta();
    store.create_job(&batched).await.unwrap();
    store
        .append_batch(&batched.stream_id, &bodies, Some(0))
        .await
        .unwrap();
    let shifted = meta();
    store.create_job(&shifted).await.unwrap();
    let first = delta("first");
    store
        .append(&shifted.stream_id, &first, Some(0))
        .await
        .unwrap();
    let a = store
        .append_batch(&shifted.stream_id, &bodies, None)
        .await
        .unwrap();
    assert_eq!((a.first_seq, a.count), (1, bodies.len()));
    let shifted_bodies: Vec<EventBody> = std::iter::once(first).chain(bodies.clone()).collect();
    for (sid, bodies) in [
        (&m.stream_id, &bodies),
        (&batched.stream_id, &bodies),
        (&shifted.stream_id, &shifted_bodies),
    ] {
        let (stored, _) = mirror::stream_frames(
            mirror::xrange(&store.key("log", sid), 0, 1000)
                .query_async(&mut store.conn())
                .await
                .unwrap(),
            0,
        );
        assert_eq!(stored.len(), bodies.len());
        for (seq, (frame, body)) in stored.iter().zip(bodies).enumerate() {
            assert_eq!(frame.seq, seq as u64);
            let lua = &frame.bytes[..];
            let rust = Frame::encode(seq as u64, body).unwrap().bytes;
            assert_eq!(
                lua,
                &rust[..],
                "seq {seq}: Lua built {:?}, Frame::encode {:?}",
                String::from_utf8_lossy(lua),
                String::from_utf8_lossy(&rust)
            );
        }
    }
    store.close();
}

/// The Cluster's library differs from the single Redis's only in how frames are
/// published: `SPUBLISH` to the job's sharded channel. A change to `append.lua` that
/// moves the frame publish away from the text the replacement looks for fails here,
/// not on a Cluster where frames would silently go out unsharded.
#[test]
fn cluster_library_publishes_frames_sharded() {
    use crate::functions::{FRAME_PUBLISH, LIBRARY, cluster_library};
    let cluster = cluster_library();
    assert_eq!(
        LIBRARY.matches(FRAME_PUBLISH).count(),
        1,
        "one frame publish"
    );
    assert!(!cluster.contains(FRAME_PUBLISH));
    assert_eq!(cluster.matches("redis.call('SPUBLISH', args[5]").count(), 1);
    // The abort request stays a plain PUBLISH (it reaches every node's subscribers).
    assert_eq!(
        LIBRARY.matches("'PUBLISH'").count() - 1,
        cluster.matches("'PUBLISH'").count()
    );
}

/// A `redis+cluster://` URL names each seed node; credentials before the hosts apply
/// to every node; a URL without a node is refused at once.
#[test]
fn cluster_urls_name_every_seed_node() {
    use crate::conn::Target;
    let Ok(Target::Cluster(nodes)) = Target::open("redis+cluster://u:pw@a:7000, b:7001,c:7002/")
    else {
        panic!("a cluster target");
    };
    assert_eq!(
        nodes,
        [
            "redis://u:pw@a:7000",
            "redis://u:pw@b:7001",
            "redis://u:pw@c:7002"
        ]
    );
    assert!(Target::open("redis+cluster://").is_err());
    assert!(matches!(
        Target::open("redis://127.0.0.1:6379"),
        Ok(Target::Single(_))
    ));
    assert_eq!(
        redact_url("redis+cluster://u:secret@a:7000,b:7001"),
        "redis+cluster://u:***@a:7000,b:7001"
    );
}

/// The frames of `bodies` from seq `first` on, as `Frame::encode` (and so the append
/// function) builds them.
fn frames_of(first: u64, bodies: &[EventBody]) -> Vec<Frame> {
    bodies
        .iter()
        .enumerate()
        .map(|(i, b)| Frame::encode(first + i as u64, b).unwrap())
        .collect()
}

/// A batch goes out as one message on the job's channel, and `split_frames` cuts it
/// into exactly the batch's frames, byte for byte as the log stream holds them, even
/// where an event's text holds newlines, blank lines or `\n\n` escapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_published_once_and_split_into_exactly_its_frames() {
    let p = prefix();
    let (store, m) = store_with_job(&p).await;
    let mut listener = redis::Client::open(redis_url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    listener
        .subscribe(store.channel(&m.stream_id))
        .await
        .unwrap();
    let bodies: Vec<EventBody> = ["a", "two\n\nlines", "\\n\\n", "\n\n\n", "", "é😀", "z"]
        .iter()
        .map(|t| delta(t))
        .collect();
    let first = store
        .append_batch(&m.stream_id, &bodies, Some(0))
        .await
        .unwrap();
    assert_eq!((first.first_seq, first.count), (0, bodies.len()));
    // Then one event alone: the next message must be it, so the batch was one message.
    let last = delta("after");
    store
        .append_batch(&m.stream_id, std::slice::from_ref(&last), Some(7))
        .await
        .unwrap();
    let mut messages = listener.on_message();
    let mut payloads = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a message within 5 s")
            .expect("the pub/sub stream is open");
        payloads.push(bytes::Bytes::copy_from_slice(msg.get_payload_bytes()));
    }
    let (batch, alone) = (payloads[0].clone(), payloads[1].clone());
    let want = frames_of(0, &bodies);
    let got = mirror::split_frames(batch.clone());
    assert_eq!(
        got.iter()
            .map(|f| (f.seq, f.bytes.clone()))
            .collect::<Vec<_>>(),
        want.iter()
            .map(|f| (f.seq, f.bytes.clone()))
            .collect::<Vec<_>>(),
        "split of {:?}",
        String::from_utf8_lossy(&batch)
    );
    let joined: Vec<u8> = want.iter().flat_map(|f| f.bytes.to_vec()).collect();
    assert_eq!(
        &batch[..],
        &joined[..],
        "the message is the frames concatenated"
    );
    let alone_frames = mirror::split_frames(alone);
    assert_eq!(alone_frames.len(), 1);
    assert_eq!(alone_frames[0].bytes, frames_of(7, &[last])[0].bytes);
    // And they are the very bytes of the log stream.
    let (stored, n) = mirror::stream_frames(
        mirror::xrange(&store.key("log", &m.stream_id), 0, 100)
            .query_async(&mut store.conn())
            .await
            .unwrap(),
        0,
    );
    assert_eq!(n, 2, "one stream entry per appended batch");
    assert_same_frames(&stored[..want.len()], &want);
    assert_eq!(stored.len(), 8);
    // A read from inside the batch gets its entry and leaves out the frames before.
    let (from_five, _) = mirror::stream_frames(
        mirror::xrange(&store.key("log", &m.stream_id), 5, 1)
            .query_async(&mut store.conn())
            .await
            .unwrap(),
        5,
    );
    assert_same_frames(&from_five, &want[5..]);
    store.close();
}

/// Range reads cut each log entry into its frames from the requested seq on, whatever
/// the entries' sizes: entries of one frame (all that version 5 of the library wrote,
/// so a log it wrote reads the same) and of many, the read starting inside one. A
/// read through the store (`read_range`, `open_log`) serves the same frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_cut_entries_of_one_and_of_many_frames() {
    let p = prefix();
    let (store, m) = store_with_job(&p).await;
    let bodies: Vec<EventBody> = (0..9).map(|i| delta(&format!("e{i}"))).collect();
    let want = frames_of(0, &bodies);
    let log = store.key("log", &m.stream_id);
    let mut conn = store.conn();
    // Seqs 0..=2 one entry each (version 5's layout), 3..=7 as one, 8 alone.
    for (id, range) in [(1, 0..1), (2, 1..2), (3, 2..3), (8, 3..8), (9, 8..9)] {
        let bytes: Vec<u8> = want[range].iter().flat_map(|f| f.bytes.to_vec()).collect();
        let _: String = redis::cmd("XADD")
            .arg(&log)
            .arg(format!("0-{id}"))
            .arg("f")
            .arg(bytes)
            .arg("w")
            .arg("writer")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = conn
        .hset(store.key("job", &m.stream_id), "len", 9)
        .await
        .unwrap();
    for from in 0..=9u64 {
        for count in [1, 2, 100] {
            let (got, _) = mirror::stream_frames(
                mirror::xrange(&log, from, count)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
                from,
            );
            // `count` entries hold at least `count` frames when the log has them.
            let n = got.len().min(9 - from as usize);
            assert!(
                n >= count.min(9 - from as usize),
                "from {from} count {count}"
            );
            assert_same_frames(&got, &want[from as usize..from as usize + n]);
        }
        // Pages of every size, each read in as many requests as it takes.
        for max in [1, 2, 3, 5, 100] {
            let page = store
                .read_range(&m.stream_id, from.checked_sub(1), max)
                .await
                .unwrap()
                .unwrap();
            let end = (from as usize + max).min(9);
            assert_same_frames(&page.frames, &want[from as usize..end]);
        }
    }
    let opened = store.open_log(&m.stream_id).await.unwrap().unwrap();
    assert_same_frames(&opened.read_after(None, 100).frames, &want);
    store.close();
}

/// A published batch whose first frames the mirror already holds (a range read got
/// them first) adds only the rest, each once and in order, and a batch past the
/// mirror's head is not inserted (the replica reads the gap instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_batch_the_mirror_partly_holds_adds_only_the_rest() {
    let p = prefix();
    let (owner, m) = store_with_job(&p).await;
    let reader = RedisStore::connect(config(&p)).await.unwrap();
    let bodies: Vec<EventBody> = (0..8).map(|i| delta(&format!("t{i}\n"))).collect();
    owner
        .append_batch(&m.stream_id, &bodies[..3], Some(0))
        .await
        .unwrap();
    let log = reader.open_log(&m.stream_id).await.unwrap().unwrap();
    assert_eq!(log.len(), 3);
    // Seqs 1..=5 as one message: 1 and 2 are held, 3..=5 are new.
    let frames = frames_of(1, &bodies[1..6]);
    let payload: Vec<u8> = frames.iter().flat_map(|f| f.bytes.to_vec()).collect();
    reader.on_frames(&m.stream_id, bytes::Bytes::from(payload));
    assert_same_frames(
        &log.read_after(None, 100).frames,
        &frames_of(0, &bodies[..6]),
    );
    // The fold took each new event once: it equals a log fed the same six events.
    assert_eq!(log.snapshot(), folded(&bodies[..6]));
    owner.close();
    reader.close();
}

/// The owner's mirror takes the frames it built for its own append with the events it
/// sent (no JSON decode): it holds them, folded, as soon as the append returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_mirror_holds_its_own_batch_when_the_append_returns() {
    let p = prefix();
    let (owner, m) = store_with_job(&p).await;
    let log = owner.open_log(&m.stream_id).await.unwrap().unwrap();
    // Only the append's reply may bring the frames in: the owner's mirror is not
    // subscribed to its own job's channel.
    assert_eq!(subscribers(&owner, &m).await, 0);
    let bodies: Vec<EventBody> = (0..5).map(|i| delta(&format!("o{i}"))).collect();
    // A retry whose first try landed two of them: only the other three come back.
    owner
        .append_batch(&m.stream_id, &bodies[..2], Some(0))
        .await
        .unwrap();
    let a = owner
        .append_batch(&m.stream_id, &bodies, Some(0))
        .await
        .unwrap();
    assert_eq!((a.first_seq, a.count), (0, 5));
    assert_eq!(
        log.len(),
        5,
        "the mirror holds the batch when the call returns"
    );
    assert_eq!(log.snapshot(), folded(&bodies));
    assert_same_frames(&log.read_after(None, 100).frames, &frames_of(0, &bodies));
    owner.close();
}

/// A running job's TTLs are refreshed once an eighth of the running TTL has passed
/// since the last refresh (`ttlAt`, or clocks that disagree by that much), not on every
/// append; the terminal event always sets the retention. Time is moved by rewriting
/// `ttlAt` and the keys' TTLs, so nothing here waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_ttls_are_refreshed_every_eighth_and_the_end_sets_the_retention() {
    /// PTTL of the job's hash and of its log stream, in ms.
    async fn ttls(store: &RedisStore, m: &JobMeta) -> (i64, i64) {
        let mut conn = store.conn();
        let a: i64 = conn.pttl(store.key("job", &m.stream_id)).await.unwrap();
        let b: i64 = conn.pttl(store.key("log", &m.stream_id)).await.unwrap();
        (a, b)
    }
    /// Makes the last refresh look `ago_ms` old (`ttlAt`) with `left` ms left on both
    /// keys.
    async fn pretend(store: &RedisStore, m: &JobMeta, ago_ms: i64, left: i64) {
        let mut conn = store.conn();
        let (job, log) = (
            store.key("job", &m.stream_id),
            store.key("log", &m.stream_id),
        );
        let at = crate::jobs::now_ms() as i64 - ago_ms;
        let _: () = conn.hset(&job, "ttlAt", at).await.unwrap();
        let _: () = conn.pexpire(&job, left).await.unwrap();
        let _: () = conn.pexpire(&log, left).await.unwrap();
    }
    let p = prefix();
    let (store, m) = store_with_job(&p).await;
    let sid = &m.stream_id;

    // The first append has no `ttlAt`: both keys get the full running TTL (120 s).
    store.append(sid, &delta("a"), Some(0)).await.unwrap();
    let (a, b) = ttls(&store, &m).await;
    assert!(
        a > 115_000 && b > 115_000,
        "first append: {a} / {b} ms left"
    );

    // 1 s after the last refresh: no refresh.
    pretend(&store, &m, 1_000, 110_000).await;
    store.append(sid, &delta("b"), Some(1)).await.unwrap();
    let (a, b) = ttls(&store, &m).await;
    assert!(
        a <= 110_000 && b <= 110_000,
        "refreshed too early: {a} / {b} ms left"
    );

    // More than an eighth (15 s) after it: refreshed.
    pretend(&store, &m, 16_000, 100_000).await;
    store.append(sid, &delta("c"), Some(2)).await.unwrap();
    let (a, b) = ttls(&store, &m).await;
    assert!(
        a > 110_000 && b > 110_000,
        "not refreshed after 16 s: {a} / {b} ms left"
    );

    // A writer whose clock is 16 s behind the last refresh's: refreshed too.
    pretend(&store, &m, -16_000, 100_000).await;
    store.append(sid, &delta("d"), Some(3)).await.unwrap();
    let (a, b) = ttls(&store, &m).await;
    assert!(
        a > 110_000 && b > 110_000,
        "not refreshed on a skewed clock: {a} / {b} ms left"
    );

    // The terminal event sets the retention (60 s), however recent the last refresh.
    pretend(&store, &m, 0, 110_000).await;
    let end = EventBody::Error(ErrorEvent {
        code: "upstream_error".into(),
        message: "end".into(),
        response_message: None,
    });
    store.append(sid, &end, Some(4)).await.unwrap();
    let (a, b) = ttls(&store, &m).await;
    assert!(
        a <= 60_000 && a > 55_000 && b <= 60_000 && b > 55_000,
        "retention: {a} / {b} ms left"
    );
    let _: i64 = store
        .conn()
        .del(&[store.key("job", sid), store.key("log", sid)])
        .await
        .unwrap();
    store.close();
}

/// How many connections are subscribed to the job's frame channel (`PUBSUB NUMSUB`).
async fn subscribers(store: &RedisStore, m: &JobMeta) -> u64 {
    let (_, n): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(store.channel(&m.stream_id))
        .query_async(&mut store.conn())
        .await
        .unwrap();
    n
}

/// The owner's mirror is not subscribed to its job's channel (its appends fill it),
/// another replica's mirror is. When a reaper on a third replica takes the job's end
/// and appends the terminal event, the owner's next append fails, and its mirror then
/// subscribes and reads the terminal event at once (the healer is off here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_mirror_skips_its_channel_until_another_writer_ends_the_job() {
    let p = prefix();
    let (owner, m) = store_with_job(&p).await;
    let reader = RedisStore::connect(config(&p)).await.unwrap();
    let reaper = RedisStore::connect(config(&p)).await.unwrap();
    let bodies: Vec<EventBody> = (0..2).map(|i| delta(&format!("r{i}"))).collect();
    owner
        .append_batch(&m.stream_id, &bodies, Some(0))
        .await
        .unwrap();
    let own = owner.open_log(&m.stream_id).await.unwrap().unwrap();
    assert_eq!(
        subscribers(&owner, &m).await,
        0,
        "the owner is not subscribed"
    );
    let remote = reader.open_log(&m.stream_id).await.unwrap().unwrap();
    assert_eq!(subscribers(&owner, &m).await, 1, "the other replica is");

    assert!(reaper.claim_end(&m.stream_id).await.unwrap());
    let end = EventBody::Error(ErrorEvent {
        code: "owner_lost".into(),
        message: "reaped".into(),
        response_message: None,
    });
    reaper.append(&m.stream_id, &end, Some(2)).await.unwrap();
    assert!(
        has_len(&remote, 3, Duration::from_secs(2)).await,
        "the subscribed mirror gets the reaper's end"
    );
    assert_eq!(own.len(), 2, "the owner's mirror has no way to see it yet");
    let late = owner.append(&m.stream_id, &delta("late"), Some(2)).await;
    assert!(late.is_err(), "the owner lost the job: {late:?}");
    assert!(
        has_len(&own, 3, Duration::from_secs(2)).await,
        "the owner's mirror holds {} of 3 events after its append failed",
        own.len()
    );
    assert_same_frames(
        &own.read_after(None, 10).frames,
        &remote.read_after(None, 10).frames,
    );
    assert_eq!(subscribers(&owner, &m).await, 2, "and it subscribed");
    owner.close();
    reader.close();
    reaper.close();
}

/// A heal pass reads the missing range only of a mirror still short of what Redis had
/// at the previous pass: one short of what just landed is waiting for its publish,
/// and an `XRANGE` for it would be wasted. The second pass repairs a lost publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heal_pass_reads_only_what_a_mirror_missed_a_pass_ago() {
    let (owner, reader, m) = owner_and_reader_with_one_event().await;
    let log = reader.open_log(&m.stream_id).await.unwrap().unwrap();
    // The reader's publishes get lost from here on.
    reader
        .inner
        .sink
        .lock()
        .await
        .as_mut()
        .unwrap()
        .unsubscribe_jobs(&[reader.channel(&m.stream_id)])
        .await
        .unwrap();
    owner
        .append(&m.stream_id, &delta("b"), Some(1))
        .await
        .unwrap();
    let pass = || reader.resync(reader.mirror_list(), mirror::Catch::Missed);
    assert_eq!(pass().await.unwrap(), 0, "just landed: no read yet");
    assert_eq!(log.len(), 1);
    assert_eq!(pass().await.unwrap(), 1, "still missing a pass later: read");
    assert!(
        has_len(&log, 2, Duration::from_secs(2)).await,
        "the lost publish was not repaired"
    );
    assert_eq!(pass().await.unwrap(), 0, "nothing missing");
    // After a reconnect every mirror behind is read at once.
    owner
        .append(&m.stream_id, &delta("c"), Some(2))
        .await
        .unwrap();
    assert_eq!(
        reader
            .resync(reader.mirror_list(), mirror::Catch::Behind)
            .await
            .unwrap(),
        1
    );
    assert!(has_len(&log, 3, Duration::from_secs(2)).await);
    owner.close();
    reader.close();
}
