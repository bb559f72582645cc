//! `soak`: thousands of SSE subscribers connecting and disconnecting continuously for
//! minutes while jobs stream, against a real server process (memory or Redis store).
//!
//! - **Jobs.** `--jobs` drivers each start a demo job, follow it live from seq 0 to its
//!   terminal event, then read the ended job once more from seq 0: that read is the
//!   job's *reference log*. Then the driver starts the next job. A job is offered to
//!   new readers from its start until `--ended-offer-secs` after its end.
//! - **Readers.** `--subscribers` readers, each with one connection open nearly all the
//!   time. A reader picks an offered job at random and a start: seq 0 half the time,
//!   else a random cursor below the head. It reads a random number of events (1 to
//!   `--max-read`), drops the connection abruptly (RST, `SO_LINGER` 0) and reconnects
//!   with `?cursor=` its last seq, until it has the terminal event; then it picks
//!   another job. The frames it got for one job over all its connections are a
//!   *reading*.
//! - **Exactness.** Every frame's seq must be the reader's next one (no gap, no
//!   duplicate, in order); a reading's joined frame bytes (SipHash of the exact bytes)
//!   must equal those of the reference log over the same seqs, and a reading that got
//!   the terminal event must end where the reference ends. Readings still open when
//!   the run stops are checked as prefixes. The drivers' own live reads are readings
//!   too.
//! - **Measures.** Server `VmRSS` and open fds every `--sample-secs`; in Redis mode
//!   also Redis `used_memory` and the number of keys under the run's key prefix. The
//!   RSS baseline is the first sample after `--warmup-minutes`. The fd baseline is
//!   taken before the load, after a priming round (a few jobs and readers, all ended)
//!   has opened whatever the server opens lazily; the end figure after every reader
//!   disconnected, every job ended and the settle time.
//!
//! The server's `jobs.retention` is short (`--retention-secs`), so ended jobs leave the
//! memory store and their Redis keys expire during the run: memory and Redis reach a
//! steady state instead of growing with the number of jobs run.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::cluster::{drop_keys, redis_url, runtime};
use crate::http::{open, start_chat};
use crate::memory::{Server, ServerArgs, config_toml_with, mib};
use crate::report::{table, thousands};
use crate::sys;

/// Which job store a soak run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// `store = "memory"`.
    Memory,
    /// `store = "redis://…"` (`GENSTREAM_BENCH_REDIS_URL`, default 127.0.0.1:6379),
    /// under a key prefix of the run's own.
    Redis,
}

/// `soak` options.
#[derive(Clone, Debug, clap::Args)]
pub struct SoakArgs {
    /// Job stores to soak, one run each, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "memory,redis"
    )]
    pub store: Vec<StoreKind>,
    /// Length of each run under load, warm-up included, in minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Minutes of load before the RSS baseline.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_minutes: f64,
    /// Readers, each holding one SSE connection nearly all the time.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Jobs streaming at once (each restarted as it ends).
    #[arg(long, default_value_t = 100)]
    pub jobs: usize,
    /// Tokens per job (its log holds tokens + 4 events).
    #[arg(long, default_value_t = 200)]
    pub tokens: u32,
    /// Delay between two tokens of a job, in ms.
    #[arg(long, default_value_t = 200)]
    pub token_delay_ms: u64,
    /// Most events a reader reads on one connection before it drops it (the number
    /// is drawn uniformly from 1 to this).
    #[arg(long, default_value_t = 100)]
    pub max_read: u32,
    /// Seconds between two samples of RSS, fds (and Redis memory).
    #[arg(long, default_value_t = 10)]
    pub sample_secs: u64,
    /// The server's `jobs.retention`, in seconds.
    #[arg(long, default_value_t = 60)]
    pub retention_secs: u64,
    /// Seconds after its end during which a job is still offered to new readers
    /// (must stay well under the retention).
    #[arg(long, default_value_t = 10)]
    pub ended_offer_secs: u64,
    /// Seconds over which the readers' first connections are spread.
    #[arg(long, default_value_t = 20)]
    pub ramp_secs: u64,
    /// Largest RSS growth over the post-warm-up baseline that passes, in percent.
    #[arg(long, default_value_t = 5.0)]
    pub max_growth_pct: f64,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Runs the soak once per store in `args.store`; `nofile` is the raised open-file
/// limit (the server child inherits it).
///
/// # Errors
/// A limit too low for the subscribers, a server that does not start, or a run whose
/// criteria fail (after printing its tables).
pub fn run(args: &SoakArgs, nofile: u64) -> Result<(), String> {
    // The reader sockets, the drivers' sockets and a margin for the runtime's own.
    let need = args.subscribers as u64 + 2 * args.jobs as u64 + 200;
    if nofile < need {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile} after raising the soft limit to the hard one; \
             {} subscribers need about {need} (raise the hard limit, e.g. `ulimit -Hn`, \
             or lower --subscribers)",
            args.subscribers
        ));
    }
    if args.ended_offer_secs >= args.retention_secs {
        return Err("--ended-offer-secs must be below --retention-secs".into());
    }
    let rt = runtime()?;
    let mut failed = Vec::new();
    for &store in &args.store {
        let report = rt.block_on(soak_once(args, store))?;
        report.print(args);
        if !report.passed(args) {
            failed.push(format!("{store:?}"));
        }
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed for {}", failed.join(", ")))
    }
}

/// One job as the run knows it.
struct Slot {
    id: String,
    /// Frames the driver has read live so far (seqs `0..head`).
    head: AtomicU64,
    ended: OnceLock<Instant>,
    check: Mutex<Check>,
}

enum Check {
    /// No reference yet: the readings wait for it.
    Pending(Vec<Reading>),
    /// The reference log, frame by frame (`None`: it could not be read, the readings
    /// stay unchecked).
    Done(Option<Arc<Vec<Bytes>>>),
}

/// The frames one reader got for one job, over all its connections.
struct Reading {
    /// The seq of its first frame.
    first: u64,
    /// The seq it expects next.
    next: u64,
    /// SipHash of the joined bytes of frames `first..next`.
    hash: DefaultHasher,
    /// It got the terminal event.
    complete: bool,
    /// The first sequence error (a gap, a duplicate, a frame past the terminal one).
    error: Option<String>,
}

impl Reading {
    fn new(first: u64) -> Reading {
        Reading {
            first,
            next: first,
            hash: DefaultHasher::new(),
            complete: false,
            error: None,
        }
    }

    /// Takes one frame; false once the reading is over (terminal event or error).
    fn take(&mut self, frame: &Frame) -> bool {
        if self.complete {
            self.error
                .get_or_insert_with(|| format!("seq {} after the terminal event", frame.seq));
            return false;
        }
        if frame.seq != self.next {
            self.error.get_or_insert_with(|| {
                format!(
                    "seq {} where {} was due ({})",
                    frame.seq,
                    self.next,
                    if frame.seq < self.next {
                        "duplicate"
                    } else {
                        "gap"
                    }
                )
            });
            return false;
        }
        self.hash.write(&frame.bytes);
        self.next += 1;
        self.complete = frame.terminal;
        !frame.terminal
    }

    /// Compares the reading with the job's reference log.
    fn verify(&self, reference: &[Bytes]) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let (first, next) = (self.first as usize, self.next as usize);
        if next > reference.len() {
            return Err(format!(
                "read up to seq {} but the log has {} events",
                next - 1,
                reference.len()
            ));
        }
        if self.complete && next != reference.len() {
            return Err(format!(
                "terminal event at seq {} but the log has {} events",
                next - 1,
                reference.len()
            ));
        }
        let mut h = DefaultHasher::new();
        for f in &reference[first..next] {
            h.write(f);
        }
        if h.finish() != self.hash.finish() {
            return Err(format!(
                "the bytes of seqs {first}..{next} differ from the log's"
            ));
        }
        Ok(())
    }
}

/// The run's counters.
#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    /// Connections that continued a reading (`?cursor=` its last seq).
    reconnects: AtomicU64,
    connect_errors: AtomicU64,
    /// 404 before a reading was complete: the job expired first.
    expired: AtomicU64,
    /// Connections that ended (EOF, error, silence) before the terminal event without
    /// the reader dropping them.
    broken: AtomicU64,
    connected: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    readings: AtomicU64,
    complete: AtomicU64,
    mismatches: AtomicU64,
    /// Readings of jobs whose reference log could not be read.
    unchecked: AtomicU64,
    jobs_started: AtomicU64,
    jobs_checked: AtomicU64,
    start_errors: AtomicU64,
    /// The first job start error, as the server answered it.
    start_error: Mutex<Option<String>>,
    /// The first few mismatches, described.
    errors: Mutex<Vec<String>>,
    /// Why connections failed or ended early, and how often (a few kinds).
    notes: Mutex<BTreeMap<String, u64>>,
}

/// What the readers and drivers share.
struct Ctx {
    addr: SocketAddr,
    base: String,
    token: String,
    http: reqwest::Client,
    /// The jobs new readers may pick.
    offered: Mutex<Vec<Arc<Slot>>>,
    stats: Stats,
    stop: watch::Receiver<bool>,
    max_read: u32,
    ended_offer: Duration,
}

impl Ctx {
    /// Counts one failure of kind `what` (stream ids and cursors left out, so that
    /// kinds group).
    fn note(&self, what: String) {
        let what = what
            .split('/')
            .map(|p| {
                let id = p.get(..36).filter(|id| id.matches('-').count() == 4);
                let rest = p.get(36..).unwrap_or("");
                match id {
                    // `ID?cursor=N: …` → `ID?cursor=N` without the N.
                    Some(_) => match rest.split_once(':') {
                        Some((query, tail)) if query.starts_with("?cursor=") => {
                            format!("ID?cursor=N:{tail}")
                        }
                        _ => format!("ID{rest}"),
                    },
                    None => p.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let mut notes = self.stats.notes.lock();
        if notes.len() < 20 || notes.contains_key(&what) {
            *notes.entry(what).or_insert(0) += 1;
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn pick(&self, rng: &mut SmallRng) -> Option<Arc<Slot>> {
        let offered = self.offered.lock();
        if offered.is_empty() {
            return None;
        }
        Some(offered[rng.random_range(0..offered.len())].clone())
    }

    /// Checks `reading` now, or once the job's reference is there.
    fn submit(&self, slot: &Slot, reading: Reading) {
        if reading.next == reading.first && reading.error.is_none() {
            return;
        }
        let mut check = slot.check.lock();
        match &mut *check {
            Check::Pending(v) => v.push(reading),
            Check::Done(reference) => {
                let reference = reference.clone();
                drop(check);
                self.tally(&slot.id, &reading, reference.as_deref().map(Vec::as_slice));
            }
        }
    }

    fn tally(&self, id: &str, reading: &Reading, reference: Option<&[Bytes]>) {
        let Some(reference) = reference else {
            self.stats.unchecked.fetch_add(1, Relaxed);
            return;
        };
        self.stats.readings.fetch_add(1, Relaxed);
        if reading.complete {
            self.stats.complete.fetch_add(1, Relaxed);
        }
        if let Err(e) = reading.verify(reference) {
            self.stats.mismatches.fetch_add(1, Relaxed);
            let mut errors = self.stats.errors.lock();
            if errors.len() < 10 {
                errors.push(format!("job {id}: {e}"));
            }
        }
    }

    /// Opens the job's stream after `cursor` (from seq 0 without one), reading the
    /// response head; `Ok(None)` when the job is gone (404).
    async fn connect(&self, id: &str, cursor: Option<u64>) -> Result<Option<Sse>, String> {
        let path = match cursor {
            Some(c) => format!("/api/chat/stream/{id}?cursor={c}"),
            None => format!("/api/chat/stream/{id}"),
        };
        match open(self.addr, "GET", &path, &self.token, None, true).await {
            Ok((s, _)) => {
                self.stats.connects.fetch_add(1, Relaxed);
                Ok(Some(Sse::new(s.tcp, &s.rest)))
            }
            Err(e) if e.contains(" 404 ") => Ok(None),
            Err(e) => {
                self.stats.connect_errors.fetch_add(1, Relaxed);
                self.note(e.clone());
                Err(e)
            }
        }
    }
}

/// One SSE frame: `id: N\nevent: NAME\ndata: …\n\n`, exactly as received.
struct Frame {
    seq: u64,
    terminal: bool,
    bytes: Bytes,
}

impl Frame {
    /// Parses a `\n\n`-terminated block; `None` for blocks that are not events
    /// (`retry:`, `: ping`).
    fn parse(bytes: Bytes) -> Result<Option<Frame>, String> {
        let Some(rest) = bytes.strip_prefix(b"id: ") else {
            return Ok(None);
        };
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let seq = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a frame without a numeric id")?;
        let rest = &rest[digits..];
        let name = rest
            .strip_prefix(b"\nevent: ")
            .and_then(|r| r.split(|b| *b == b'\n').next())
            .ok_or("a frame without an event line")?;
        let terminal = name == b"final" || name == b"error";
        Ok(Some(Frame {
            seq,
            terminal,
            bytes,
        }))
    }
}

/// Where the chunked-body decoder is.
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(usize),
    /// Expecting the `\r\n` after a chunk's data.
    DataEnd,
    /// Past the last chunk.
    Done,
}

/// A reader's connection: decodes the chunked body and splits it into SSE blocks.
struct Sse {
    tcp: TcpStream,
    /// Received bytes not decoded yet.
    raw: Vec<u8>,
    state: Chunk,
    /// Decoded body bytes not yet split into blocks.
    body: BytesMut,
    /// How far `body` has been searched for `\n\n`.
    scanned: usize,
}

impl Sse {
    fn new(tcp: TcpStream, rest: &[u8]) -> Sse {
        Sse {
            tcp,
            raw: rest.to_vec(),
            state: Chunk::Size,
            body: BytesMut::with_capacity(4096),
            scanned: 0,
        }
    }

    /// Moves whole chunk data from `raw` to `body`.
    fn decode(&mut self) -> Result<(), String> {
        let mut pos = 0;
        loop {
            let avail = &self.raw[pos..];
            match self.state {
                Chunk::Size => match httparse::parse_chunk_size(avail) {
                    Ok(httparse::Status::Complete((n, 0))) => {
                        pos += n;
                        self.state = Chunk::Done;
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        pos += n;
                        self.state = Chunk::Data(size as usize);
                    }
                    Ok(httparse::Status::Partial) => break,
                    Err(_) => return Err("bad chunk size".into()),
                },
                Chunk::Data(left) => {
                    if avail.is_empty() {
                        break;
                    }
                    let take = left.min(avail.len());
                    self.body.extend_from_slice(&avail[..take]);
                    pos += take;
                    self.state = if take == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::DataEnd => {
                    if avail.len() < 2 {
                        break;
                    }
                    if &avail[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    pos += 2;
                    self.state = Chunk::Size;
                }
                Chunk::Done => break,
            }
        }
        self.raw.drain(..pos);
        Ok(())
    }

    /// The next event frame; `None` at the end of the body (or of the connection).
    /// Gives up after `silence` without a byte.
    async fn next_frame(&mut self, silence: Duration) -> Result<Option<Frame>, String> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            while let Some(at) = self.body[self.scanned..]
                .windows(2)
                .position(|w| w == b"\n\n")
            {
                let block = self.body.split_to(self.scanned + at + 2).freeze();
                self.scanned = 0;
                if let Some(frame) = Frame::parse(block)? {
                    return Ok(Some(frame));
                }
            }
            self.scanned = self.body.len().saturating_sub(1);
            if matches!(self.state, Chunk::Done) {
                return Ok(None);
            }
            let n = tokio::time::timeout(silence, self.tcp.read(&mut buf))
                .await
                .map_err(|_| format!("no byte within {} s", silence.as_secs()))?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Ok(None);
            }
            self.raw.extend_from_slice(&buf[..n]);
            self.decode()?;
        }
    }

    /// Drops the connection with a reset, as a client that vanishes does.
    fn drop_abruptly(self) {
        let _ = self.tcp.set_zero_linger();
    }
}

/// Longest wait for a byte on a stream; the server pings every 15 s.
const SILENCE: Duration = Duration::from_secs(60);

/// How one connection of a reading ended.
enum Session {
    /// The terminal event arrived.
    Complete,
    /// The reader read its number of events and dropped the connection.
    Dropped,
    /// The run stopped.
    Stopped,
    /// A sequence error: the reading is over.
    Wrong,
    /// The connection ended early or failed.
    Broken,
}

/// Reads up to `budget` frames of `sse` into `reading`.
async fn session(ctx: &Ctx, sse: &mut Sse, reading: &mut Reading, budget: u32) -> Session {
    let mut stop = ctx.stop.clone();
    for _ in 0..budget {
        let frame = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Session::Stopped,
            f = sse.next_frame(SILENCE) => f,
        };
        match frame {
            Ok(Some(frame)) => {
                ctx.stats.frames.fetch_add(1, Relaxed);
                ctx.stats.bytes.fetch_add(frame.bytes.len() as u64, Relaxed);
                if !reading.take(&frame) {
                    return if reading.complete {
                        Session::Complete
                    } else {
                        Session::Wrong
                    };
                }
            }
            Ok(None) => {
                ctx.note(format!(
                    "connection ended before the terminal event ({})",
                    if matches!(sse.state, Chunk::Done) {
                        "the body ended"
                    } else {
                        "the socket closed mid-body"
                    }
                ));
                return Session::Broken;
            }
            Err(e) => {
                ctx.note(e);
                return Session::Broken;
            }
        }
    }
    Session::Dropped
}

/// One reader: picks jobs and reads each to its end over many connections.
async fn reader(ctx: Arc<Ctx>, index: usize, delay: Duration) {
    let mut rng = SmallRng::seed_from_u64(index as u64);
    tokio::time::sleep(delay).await;
    while !ctx.stopped() {
        let Some(slot) = ctx.pick(&mut rng) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // Half the readers start from seq 0, the others after a random cursor below
        // the head (never the terminal event, which would be answered 204).
        let head = slot.head.load(Relaxed);
        let first = if head < 2 || rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(1..head)
        };
        let mut reading = Reading::new(first);
        let mut backoff = Duration::from_millis(50);
        while !ctx.stopped() {
            let cursor = reading.next.checked_sub(1);
            let mut sse = match ctx.connect(&slot.id, cursor).await {
                Ok(Some(sse)) => sse,
                Ok(None) => {
                    ctx.stats.expired.fetch_add(1, Relaxed);
                    break;
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            if reading.next > first {
                ctx.stats.reconnects.fetch_add(1, Relaxed);
            }
            ctx.stats.connected.fetch_add(1, Relaxed);
            let budget = rng.random_range(1..=ctx.max_read.max(1));
            let outcome = session(&ctx, &mut sse, &mut reading, budget).await;
            ctx.stats.connected.fetch_sub(1, Relaxed);
            match outcome {
                Session::Complete => break,
                Session::Wrong => {
                    sse.drop_abruptly();
                    break;
                }
                Session::Dropped | Session::Stopped => sse.drop_abruptly(),
                Session::Broken => {
                    ctx.stats.broken.fetch_add(1, Relaxed);
                    sse.drop_abruptly();
                }
            }
        }
        ctx.submit(&slot, reading);
    }
}

/// Reads a job into `reading` up to its terminal event, reconnecting after its last
/// seq when a connection fails (a transient 503, a reset), for at most `FOLLOW_LIMIT`;
/// `each` sees every frame taken. An error when the job is gone (404), on a sequence
/// error, or past the limit.
async fn follow(
    ctx: &Ctx,
    slot: &Slot,
    reading: &mut Reading,
    mut each: impl FnMut(&Frame),
) -> Result<(), String> {
    let deadline = Instant::now() + FOLLOW_LIMIT;
    let mut backoff = Duration::from_millis(50);
    while Instant::now() < deadline {
        let mut sse = match ctx.connect(&slot.id, reading.next.checked_sub(1)).await {
            Ok(Some(sse)) => sse,
            Ok(None) => return Err("404 before the terminal event".into()),
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        loop {
            match sse.next_frame(SILENCE).await {
                Ok(Some(frame)) => {
                    if !reading.take(&frame) {
                        if reading.complete {
                            each(&frame);
                            return Ok(());
                        }
                        return Err(reading.error.clone().unwrap_or_default());
                    }
                    each(&frame);
                }
                Ok(None) => {
                    ctx.note("connection ended before the terminal event".into());
                    break;
                }
                Err(e) => {
                    ctx.note(e);
                    break;
                }
            }
        }
    }
    Err(format!("not ended within {} s", FOLLOW_LIMIT.as_secs()))
}

/// How long a driver keeps trying to read its job to the end.
const FOLLOW_LIMIT: Duration = Duration::from_secs(600);

/// One driver: starts a job, follows it live, takes its reference log, and again,
/// until the run stops (the job in progress is finished).
async fn driver(ctx: Arc<Ctx>, index: usize) {
    let mut n = 0u64;
    while !ctx.stopped() {
        n += 1;
        let id = match start_chat(
            &ctx.http,
            &ctx.base,
            &ctx.token,
            "bench",
            &format!("soak {index}.{n}"),
        )
        .await
        {
            Ok(id) => id,
            Err(e) => {
                ctx.stats.start_errors.fetch_add(1, Relaxed);
                eprintln!("soak: {e}");
                ctx.stats.start_error.lock().get_or_insert(e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        ctx.stats.jobs_started.fetch_add(1, Relaxed);
        let slot = Arc::new(Slot {
            id,
            head: AtomicU64::new(0),
            ended: OnceLock::new(),
            check: Mutex::new(Check::Pending(Vec::new())),
        });
        ctx.offered.lock().push(slot.clone());
        // The live read, itself a reading.
        let mut live = Reading::new(0);
        let followed = follow(&ctx, &slot, &mut live, |f| {
            slot.head.store(f.seq + 1, Relaxed);
        })
        .await;
        let _ = slot.ended.set(Instant::now());
        if let Err(e) = followed {
            live.error.get_or_insert(format!("live read: {e}"));
        }
        // The reference: the ended job read again from seq 0.
        let mut frames = Vec::new();
        let mut whole = Reading::new(0);
        let reference = follow(&ctx, &slot, &mut whole, |f| frames.push(f.bytes.clone())).await;
        let reference = match reference {
            Ok(()) => Some(Arc::new(frames)),
            Err(e) => {
                ctx.note(format!("no reference log: {e}"));
                None
            }
        };
        let pending =
            match std::mem::replace(&mut *slot.check.lock(), Check::Done(reference.clone())) {
                Check::Pending(v) => v,
                Check::Done(_) => Vec::new(),
            };
        let reference = reference.as_deref().map(Vec::as_slice);
        ctx.tally(&slot.id, &live, reference);
        for r in &pending {
            ctx.tally(&slot.id, r, reference);
        }
        ctx.stats.jobs_checked.fetch_add(1, Relaxed);
        // Still offered for a while after its end, then only readers that hold it
        // keep it.
        let (ctx2, slot2) = (ctx.clone(), slot.clone());
        tokio::spawn(async move {
            tokio::time::sleep(ctx2.ended_offer).await;
            ctx2.offered.lock().retain(|s| !Arc::ptr_eq(s, &slot2));
        });
    }
}

/// One sample of the server and the load.
#[derive(Clone)]
struct Sample {
    at: Duration,
    rss: u64,
    fds: usize,
    connected: u64,
    frames: u64,
    connects: u64,
    load: f64,
    /// Redis `used_memory` (the whole shared instance) and the run's keys.
    redis: Option<(u64, u64)>,
}

/// Redis `used_memory` and the number of keys under `prefix`.
async fn redis_figures(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> Option<(u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .ok()?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))?
        .trim()
        .parse()
        .ok()?;
    let mut keys = 0u64;
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .ok()?;
        keys += batch.len() as u64;
        if next == 0 {
            return Some((used, keys));
        }
        cursor = next;
    }
}

/// The fd kind of the SQLite database's files.
const DB_FILES: &str = "database file";

/// Most database fds the server's SQLite pool can hold: 8 connections (the default
/// size) with the database, its WAL and its shared-memory file each, and one more.
const DB_FDS_MAX: usize = 8 * 3 + 1;

/// The server's open fds by kind: sockets, the database's files, the rest (eventfd,
/// epoll, pipes, …).
fn fd_kinds(pid: u32) -> BTreeMap<&'static str, usize> {
    let mut kinds = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    for e in dir.flatten() {
        let target = std::fs::read_link(e.path())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = if target.starts_with("socket:") {
            "socket"
        } else if target.contains("bench.db") {
            DB_FILES
        } else if target.starts_with("anon_inode:") || target.starts_with("pipe:") {
            "eventfd / epoll / pipe"
        } else {
            "other"
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// Everything a run measured.
struct Report {
    store: StoreKind,
    server_bin: String,
    samples: Vec<Sample>,
    /// Index of the first sample after the warm-up.
    baseline: usize,
    fds_before: BTreeMap<&'static str, usize>,
    fds_after: BTreeMap<&'static str, usize>,
    rss_after: u64,
    redis_after: Option<(u64, u64)>,
    totals: Vec<(&'static str, u64)>,
    mismatches: u64,
    readings: u64,
    errors: Vec<String>,
    notes: BTreeMap<String, u64>,
    unchecked: u64,
    start_error: Option<String>,
    load_start: f64,
    load_end: f64,
}

fn total(kinds: &BTreeMap<&'static str, usize>) -> usize {
    kinds.values().sum()
}

impl Report {
    fn growth_pct(&self) -> (f64, f64, f64) {
        let base = self.samples.get(self.baseline).map_or(0, |s| s.rss).max(1) as f64;
        let after = &self.samples[self.baseline.min(self.samples.len())..];
        let max = after.iter().map(|s| s.rss).max().unwrap_or(0) as f64;
        let end = after.last().map_or(0, |s| s.rss) as f64;
        // Least-squares slope of RSS over the post-warm-up samples, MiB per minute.
        let n = after.len() as f64;
        let slope = if after.len() >= 2 {
            let xs: Vec<f64> = after.iter().map(|s| s.at.as_secs_f64() / 60.0).collect();
            let ys: Vec<f64> = after.iter().map(|s| s.rss as f64 / 1048576.0).collect();
            let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
            let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
            let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
            if sxx > 0.0 { sxy / sxx } else { 0.0 }
        } else {
            0.0
        };
        (
            (max / base - 1.0) * 100.0,
            (end / base - 1.0) * 100.0,
            slope,
        )
    }

    /// Fds gained over the run, the database's files left out: the server's SQLite
    /// pool opens connections lazily, up to its size, and keeps idle ones.
    fn fd_leak(&self) -> i64 {
        let rest = |k: &BTreeMap<&'static str, usize>| {
            total(k) as i64 - k.get(DB_FILES).copied().unwrap_or(0) as i64
        };
        rest(&self.fds_after) - rest(&self.fds_before)
    }

    fn db_fds_after(&self) -> usize {
        self.fds_after.get(DB_FILES).copied().unwrap_or(0)
    }

    fn criteria(&self, args: &SoakArgs) -> Vec<(String, String, bool)> {
        let (max, _, _) = self.growth_pct();
        let leak = self.fd_leak();
        vec![
            (
                format!("RSS growth after warm-up ≤ {}%", args.max_growth_pct),
                format!("max {max:+.1}%"),
                max <= args.max_growth_pct && self.samples.len() > self.baseline,
            ),
            (
                format!(
                    "no fd leak: the end ≤ before the load, database files ≤ {DB_FDS_MAX} (the pool's)"
                ),
                format!(
                    "{} → {} ({leak:+} besides database files; {} database files)",
                    total(&self.fds_before),
                    total(&self.fds_after),
                    self.db_fds_after()
                ),
                leak <= 0 && self.db_fds_after() <= DB_FDS_MAX,
            ),
            (
                "every reading exact".into(),
                format!(
                    "{} mismatches in {} readings ({} unchecked: no reference log)",
                    thousands(self.mismatches),
                    thousands(self.readings),
                    thousands(self.unchecked)
                ),
                self.mismatches == 0 && self.readings > 0,
            ),
        ]
    }

    fn passed(&self, args: &SoakArgs) -> bool {
        self.criteria(args).iter().all(|c| c.2)
    }

    fn print(&self, args: &SoakArgs) {
        let store = match self.store {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
        };
        println!(
            "### soak, {store} store\n\nserver: `{} serve`, separate process; {} readers; {} jobs at a time × {} tokens, {} ms apart; a reader reads 1–{} events per connection; `jobs.retention = \"{}s\"`; {} min with {} min warm-up; load average {:.2} at the start, {:.2} at the end\n",
            self.server_bin,
            thousands(args.subscribers as u64),
            args.jobs,
            args.tokens,
            args.token_delay_ms,
            args.max_read,
            args.retention_secs,
            args.minutes,
            args.warmup_minutes,
            self.load_start,
            self.load_end,
        );
        // One row a minute (and the baseline), so the table pastes into the doc.
        let per_min = (60 / args.sample_secs.max(1)).max(1) as usize;
        let mut rows = Vec::new();
        let mut prev: Option<&Sample> = None;
        for (i, s) in self.samples.iter().enumerate() {
            if i % per_min != 0 && i != self.baseline && i + 1 != self.samples.len() {
                continue;
            }
            let secs = prev
                .map_or(s.at.as_secs_f64(), |p| (s.at - p.at).as_secs_f64())
                .max(1e-3);
            let (frames0, connects0) = prev.map_or((0, 0), |p| (p.frames, p.connects));
            let mut row = vec![
                format!(
                    "{:.0}{}",
                    s.at.as_secs_f64(),
                    if i == self.baseline {
                        " (baseline)"
                    } else {
                        ""
                    }
                ),
                mib(s.rss),
                thousands(s.fds as u64),
                thousands(s.connected),
                thousands(((s.frames - frames0) as f64 / secs) as u64),
                thousands(((s.connects - connects0) as f64 / secs) as u64),
                format!("{:.2}", s.load),
            ];
            if let Some((used, keys)) = s.redis {
                row.push(mib(used));
                row.push(thousands(keys));
            }
            rows.push(row);
            prev = Some(s);
        }
        let mut headers = vec![
            "t s",
            "server RSS MiB",
            "server fds",
            "readers connected",
            "frames read/s",
            "connections/s",
            "load avg",
        ];
        if self.store == StoreKind::Redis {
            headers.push("Redis used_memory MiB");
            headers.push("keys of the run");
        }
        table(&headers, &rows);

        let (max, end, slope) = self.growth_pct();
        let base = self.samples.get(self.baseline).map_or(0, |s| s.rss);
        let mut rows = vec![
            vec!["RSS baseline (after warm-up) MiB".into(), mib(base)],
            vec!["RSS max after warm-up".into(), format!("{max:+.1}%")],
            vec!["RSS at the end of the load".into(), format!("{end:+.1}%")],
            vec![
                "RSS trend after warm-up, MiB/min".into(),
                format!("{slope:+.2}"),
            ],
            vec![
                "RSS after every reader left and a settle, MiB".into(),
                mib(self.rss_after),
            ],
        ];
        for (what, kinds) in [
            ("before the load", &self.fds_before),
            ("at the end", &self.fds_after),
        ] {
            let detail: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            rows.push(vec![
                format!("server fds {what}"),
                format!("{} ({})", total(kinds), detail.join(", ")),
            ]);
        }
        if let Some((used, keys)) = self.redis_after {
            rows.push(vec![
                "Redis used_memory / keys of the run, at the end".into(),
                format!("{} MiB / {}", mib(used), thousands(keys)),
            ]);
        }
        for (what, n) in &self.totals {
            rows.push(vec![(*what).to_owned(), thousands(*n)]);
        }
        table(&["", "value"], &rows);
        for e in &self.errors {
            println!("- mismatch: {e}");
        }
        if !self.notes.is_empty() {
            println!("Connection failures and early ends, by kind (retried or resumed):\n");
            for (what, n) in &self.notes {
                println!("- {n} × `{what}`");
            }
            println!();
        }
        if let Some(e) = &self.start_error {
            println!("First job start error: `{e}`\n");
        }
        let rows: Vec<Vec<String>> = self
            .criteria(args)
            .into_iter()
            .map(|(what, got, ok)| vec![what, got, if ok { "PASS".into() } else { "FAIL".into() }])
            .collect();
        table(&["criterion", "measured", "verdict"], &rows);
        for r in &rows {
            println!("{} {store}: {} ({})", r[2], r[0], r[1]);
        }
        println!();
    }
}

/// A priming round: a few jobs with a few readers each, read to the end, so that what
/// the server opens lazily (pool connections, Redis connections) is open before the
/// fd baseline.
async fn prime(ctx: &Arc<Ctx>) -> Result<(), String> {
    let mut tasks = Vec::new();
    for i in 0..4 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let id = start_chat(
                &ctx.http,
                &ctx.base,
                &ctx.token,
                "bench",
                &format!("prime {i}"),
            )
            .await?;
            let slot = Slot {
                id,
                head: AtomicU64::new(0),
                ended: OnceLock::new(),
                check: Mutex::new(Check::Pending(Vec::new())),
            };
            let readers: Vec<_> = (0..4)
                .map(|_| async {
                    let mut reading = Reading::new(0);
                    follow(&ctx, &slot, &mut reading, |_| {}).await
                })
                .collect();
            futures::future::try_join_all(readers).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

async fn soak_once(args: &SoakArgs, store: StoreKind) -> Result<Report, String> {
    let prefix = format!("gsbench-soak-{}", genstream_engine::new_id());
    let store_url = match store {
        StoreKind::Memory => "memory".to_owned(),
        StoreKind::Redis => redis_url(),
    };
    let tail = match store {
        StoreKind::Memory => String::new(),
        StoreKind::Redis => format!("[redis]\nkey_prefix = \"{prefix}\"\n"),
    };
    let options = format!(
        "tokens = {}\ntoken_delay = \"{}ms\"",
        args.tokens, args.token_delay_ms
    );
    let jobs_toml = format!("retention = \"{}s\"", args.retention_secs);
    let server = Server::start_config(&args.server, &format!("soak-{store:?}"), |db| {
        config_toml_with(
            &store_url,
            db,
            args.jobs * 4 + 100,
            &jobs_toml,
            &options,
            &tail,
        )
    })?;
    let (stop_tx, stop) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        addr: server.addr,
        base: server.base(),
        token: server.token.clone(),
        // No idle keep-alive connections: they would sit in the server's fd counts.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| e.to_string())?,
        offered: Mutex::new(Vec::new()),
        stats: Stats::default(),
        stop,
        max_read: args.max_read,
        ended_offer: Duration::from_secs(args.ended_offer_secs),
    });
    let settle = Duration::from_millis(args.server.settle_ms);
    let mut redis_conn = match store {
        StoreKind::Redis => Some(
            redis::Client::open(redis_url())
                .map_err(|e| e.to_string())?
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("Redis: {e}"))?,
        ),
        StoreKind::Memory => None,
    };
    eprintln!("soak {store:?}: priming …");
    prime(&ctx).await?;
    tokio::time::sleep(settle).await;
    let fds_before = fd_kinds(server.pid);
    let load_start = sys::load_average();

    eprintln!(
        "soak {store:?}: {} readers, {} jobs, {} min …",
        args.subscribers, args.jobs, args.minutes
    );
    let t0 = Instant::now();
    let mut drivers = Vec::new();
    for i in 0..args.jobs {
        drivers.push(tokio::spawn(driver(ctx.clone(), i)));
    }
    let ramp = Duration::from_secs(args.ramp_secs);
    let mut readers = Vec::new();
    for i in 0..args.subscribers {
        let delay = ramp.mul_f64(i as f64 / args.subscribers.max(1) as f64);
        readers.push(tokio::spawn(reader(ctx.clone(), i, delay)));
    }

    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let warmup = Duration::from_secs_f64(args.warmup_minutes * 60.0);
    let every = Duration::from_secs(args.sample_secs.max(1));
    let mut samples = Vec::new();
    let mut baseline = None;
    let mut next = t0 + every;
    loop {
        tokio::time::sleep_until(next.into()).await;
        let at = t0.elapsed();
        let redis = match &mut redis_conn {
            Some(c) => redis_figures(c, &prefix).await,
            None => None,
        };
        let s = Sample {
            at,
            rss: server.rss(),
            fds: sys::open_fds(server.pid),
            connected: ctx.stats.connected.load(Relaxed),
            frames: ctx.stats.frames.load(Relaxed),
            connects: ctx.stats.connects.load(Relaxed),
            load: sys::load_average(),
            redis,
        };
        eprintln!(
            "soak {store:?}: {:>4.0} s  RSS {} MiB  fds {}  connected {}  frames {}  readings {}  mismatches {}",
            at.as_secs_f64(),
            mib(s.rss),
            s.fds,
            s.connected,
            s.frames,
            ctx.stats.readings.load(Relaxed),
            ctx.stats.mismatches.load(Relaxed),
        );
        if baseline.is_none() && at >= warmup {
            baseline = Some(samples.len());
        }
        samples.push(s);
        if at + every / 2 >= run_for {
            break;
        }
        next += every;
    }
    let load_end = sys::load_average();
    eprintln!("soak {store:?}: stopping; readers leave, jobs in progress finish …");
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    for d in drivers {
        let _ = d.await;
    }
    // Every job has ended and every reading is checked; let the server close what the
    // readers' resets and the job ends leave behind.
    tokio::time::sleep(settle).await;
    let fds_after = fd_kinds(server.pid);
    let rss_after = server.rss();
    let redis_after = match &mut redis_conn {
        Some(c) => redis_figures(c, &prefix).await,
        None => None,
    };
    let st = &ctx.stats;
    let totals = vec![
        (
            "jobs run (each checked against its reference log)",
            st.jobs_checked.load(Relaxed),
        ),
        ("job start errors", st.start_errors.load(Relaxed)),
        ("connections made", st.connects.load(Relaxed)),
        (
            "of which reconnects with a cursor",
            st.reconnects.load(Relaxed),
        ),
        (
            "connection errors (retried)",
            st.connect_errors.load(Relaxed),
        ),
        (
            "connections ended early by the server",
            st.broken.load(Relaxed),
        ),
        (
            "readings ended by a 404 (job expired)",
            st.expired.load(Relaxed),
        ),
        ("frames read", st.frames.load(Relaxed)),
        ("bytes of frames read", st.bytes.load(Relaxed)),
        ("readings checked", st.readings.load(Relaxed)),
        ("of which to the terminal event", st.complete.load(Relaxed)),
    ];
    let report = Report {
        store,
        server_bin: args.server.binary().display().to_string(),
        baseline: baseline.unwrap_or(samples.len()),
        samples,
        fds_before,
        fds_after,
        rss_after,
        redis_after,
        totals,
        mismatches: st.mismatches.load(Relaxed),
        readings: st.readings.load(Relaxed),
        errors: st.errors.lock().clone(),
        start_error: st.start_error.lock().clone(),
        notes: st.notes.lock().clone(),
        unchecked: st.unchecked.load(Relaxed),
        load_start,
        load_end,
    };
    drop(server);
    if store == StoreKind::Redis {
        drop_keys(&prefix).await;
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frame(seq: u64, name: &str) -> Frame {
        Frame::parse(Bytes::from(format!(
            "id: {seq}\nevent: {name}\ndata: {{\"n\":{seq}}}\n\n"
        )))
        .unwrap()
        .unwrap()
    }

    #[test]
    fn readings_are_checked_against_the_reference() {
        let log: Vec<Bytes> = (0..5)
            .map(|s| frame(s, if s == 4 { "final" } else { "delta" }).bytes)
            .collect();
        // A whole reading over two connections, and a prefix from a cursor.
        let mut whole = Reading::new(0);
        for s in 0..5 {
            whole.take(&frame(s, if s == 4 { "final" } else { "delta" }));
        }
        assert!(whole.complete);
        assert_eq!(whole.verify(&log), Ok(()));
        let mut part = Reading::new(2);
        part.take(&frame(2, "delta"));
        assert_eq!(part.verify(&log), Ok(()));
        // A duplicate, a gap, and different bytes are caught.
        let mut dup = Reading::new(0);
        dup.take(&frame(0, "delta"));
        assert!(!dup.take(&frame(0, "delta")));
        assert!(dup.verify(&log).unwrap_err().contains("duplicate"));
        let mut gap = Reading::new(0);
        gap.take(&frame(0, "delta"));
        gap.take(&frame(2, "delta"));
        assert!(gap.verify(&log).unwrap_err().contains("gap"));
        let mut other = Reading::new(1);
        other.take(&frame(1, "other"));
        assert!(other.verify(&log).unwrap_err().contains("differ"));
        // A terminal event before the log's end.
        let mut short = Reading::new(3);
        short.take(&frame(3, "final"));
        assert!(short.verify(&log).unwrap_err().contains("terminal"));
    }

    #[tokio::test]
    async fn sse_splits_a_chunked_body_into_frames_across_pieces() {
        let body = b"d\r\nretry: 1000\n\n\r\n1f\r\nid: 0\nevent: created\ndata: {}\n\n\r\n8\r\n: ping\n\n\r\n1d\r\nid: 1\nevent: final\ndata: {}\n\n\r\n0\r\n\r\n";
        for split in [1, 7, 20, 40, body.len() - 3] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(&body[split..]).await.unwrap();
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut sse = Sse::new(tcp, &body[..split]);
            let a = sse.next_frame(SILENCE).await.unwrap().unwrap();
            let b = sse.next_frame(SILENCE).await.unwrap().unwrap();
            assert_eq!((a.seq, a.terminal), (0, false), "split at {split}");
            assert_eq!(&a.bytes[..], b"id: 0\nevent: created\ndata: {}\n\n");
            assert_eq!((b.seq, b.terminal), (1, true));
            assert!(sse.next_frame(SILENCE).await.unwrap().is_none());
            server.await.unwrap();
        }
    }
}
