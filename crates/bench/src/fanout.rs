//! `fanout-one-job` and `fanout-many-jobs`: events delivered per second, delay from
//! append to client receipt, and server CPU per million events delivered.
//!
//! The server runs in this process, on its own multi-thread tokio runtime (threads
//! `server-N`), serving the very router `genstream serve` serves (`genstream_server::
//! app`) on a 127.0.0.1 listener. Its state is built as `serve::build_state` builds it,
//! with one difference: the memory job store is wrapped in [`TimedStore`], which notes
//! the instant each append starts. The subscribers run on a second runtime (threads
//! `client-N`) over real loopback TCP and note the instant each `id: N` line arrives.
//! Both instants come from the same monotonic clock, so their difference is the
//! append-to-receipt delay, serialization and the socket included.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use genstream_engine::event::EventBody;
use genstream_engine::log::EventLog;
use genstream_engine::manager::JobManager;
use genstream_engine::store::{
    AbortHandler, Appended, EventLogStore, IdempotencyClaim, IdempotencyStore, JobCoordination,
    JobMeta, JobStore, MemoryStore, Orphan, RangePage, RateLimitStore, StoreError,
};
use genstream_server::app;
use genstream_server::config::{Config, Overrides};
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, mpsc};

use crate::http::Receipts;
use crate::projection_fanout::Protocol;
use crate::report::{ms, quantile, table, thousands};
use crate::sys;

/// The memory store, plus the instant each append began, per job and seq.
pub struct TimedStore {
    pub(crate) inner: MemoryStore,
    times: Mutex<HashMap<String, Vec<Instant>>>,
}

impl TimedStore {
    fn new(inner: MemoryStore) -> Self {
        TimedStore {
            inner,
            times: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the append instants of a job (index = seq).
    fn take(&self, stream_id: &str) -> Vec<Instant> {
        self.times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(stream_id)
            .unwrap_or_default()
    }
}

#[async_trait]
impl EventLogStore for TimedStore {
    async fn create_job(&self, meta: &JobMeta) -> Result<(), StoreError> {
        self.times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(meta.stream_id.clone(), Vec::with_capacity(1024));
        self.inner.create_job(meta).await
    }
    async fn get_job(&self, stream_id: &str) -> Result<Option<JobMeta>, StoreError> {
        self.inner.get_job(stream_id).await
    }
    async fn latest_job(&self, conversation_id: &str) -> Result<Option<JobMeta>, StoreError> {
        self.inner.latest_job(conversation_id).await
    }
    async fn running_jobs(&self, user_id: &str) -> Result<Vec<JobMeta>, StoreError> {
        self.inner.running_jobs(user_id).await
    }
    async fn append(
        &self,
        stream_id: &str,
        body: &EventBody,
        expected_seq: Option<u64>,
    ) -> Result<u64, StoreError> {
        let start = Instant::now();
        let r = self.inner.append(stream_id, body, expected_seq).await;
        if let Ok(seq) = &r {
            let mut g = self.times.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = g.get_mut(stream_id)
                && v.len() as u64 == *seq
            {
                v.push(start);
            }
        }
        r
    }
    async fn append_batch(
        &self,
        stream_id: &str,
        bodies: &[EventBody],
        expected_first_seq: Option<u64>,
    ) -> Result<Appended, StoreError> {
        let start = Instant::now();
        let r = self
            .inner
            .append_batch(stream_id, bodies, expected_first_seq)
            .await;
        if let Ok(a) = &r {
            let mut g = self.times.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = g.get_mut(stream_id) {
                while (v.len() as u64) < a.first_seq + a.count as u64 {
                    v.push(start);
                }
            }
        }
        r
    }
    async fn open_log(&self, stream_id: &str) -> Result<Option<Arc<EventLog>>, StoreError> {
        self.inner.open_log(stream_id).await
    }
    fn appends_locally(&self) -> bool {
        self.inner.appends_locally()
    }
    fn ready_log(&self, stream_id: &str) -> Option<Arc<EventLog>> {
        self.inner.ready_log(stream_id)
    }
    async fn read_range(
        &self,
        stream_id: &str,
        cursor: Option<u64>,
        max: usize,
    ) -> Result<Option<RangePage>, StoreError> {
        self.inner.read_range(stream_id, cursor, max).await
    }
    async fn sync_log(&self, stream_id: &str) -> Result<(), StoreError> {
        self.inner.sync_log(stream_id).await
    }
    async fn remove_expired(&self, retention: Duration) -> Result<usize, StoreError> {
        self.inner.remove_expired(retention).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[async_trait]
impl RateLimitStore for TimedStore {
    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        self.inner.rate_limit(key, limit, period).await
    }
}

#[async_trait]
impl IdempotencyStore for TimedStore {
    async fn claim_idempotency(
        &self,
        key: &str,
        request_hash: &str,
        token: &str,
        claim_ttl: Duration,
    ) -> Result<IdempotencyClaim, StoreError> {
        self.inner
            .claim_idempotency(key, request_hash, token, claim_ttl)
            .await
    }
    async fn fill_idempotency(
        &self,
        key: &str,
        token: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.fill_idempotency(key, token, value, ttl).await
    }
    async fn release_idempotency(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.inner.release_idempotency(key, token).await
    }
}

#[async_trait]
impl JobCoordination for TimedStore {
    async fn claim_orphan(&self, stream_id: &str) -> Result<bool, StoreError> {
        self.inner.claim_orphan(stream_id).await
    }
    async fn claim_end(&self, stream_id: &str) -> Result<bool, StoreError> {
        self.inner.claim_end(stream_id).await
    }
    async fn orphaned_jobs(&self, live: &HashSet<String>) -> Result<Vec<Orphan>, StoreError> {
        self.inner.orphaned_jobs(live).await
    }
    async fn request_abort(&self, stream_id: &str) -> Result<(), StoreError> {
        self.inner.request_abort(stream_id).await
    }
    fn set_abort_handler(&self, handler: AbortHandler) {
        self.inner.set_abort_handler(handler);
    }
}

/// Options shared by both fan-out scenarios.
#[derive(Clone, Debug, clap::Args)]
pub struct FanoutArgs {
    /// Delays between tokens to run, in ms, one run each (the demo model's
    /// `token_delay`).
    #[arg(long, value_delimiter = ',', default_value = "50,10,8,5")]
    pub delays_ms: Vec<u64>,
    /// Target length of each job's token phase; tokens = this / delay.
    #[arg(long, default_value_t = 8000)]
    pub duration_ms: u64,
    /// The demo model's `first_token_delay`, in ms: time for every subscriber to attach
    /// before the first token. Default: 2000 ms + 3 ms per job.
    #[arg(long)]
    pub first_token_delay_ms: Option<u64>,
    /// Worker threads of the server's runtime.
    #[arg(long, default_value_t = 2)]
    pub server_threads: usize,
    /// Worker threads of the clients' runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Leave Nagle's algorithm on (no TCP_NODELAY) on accepted sockets, for
    /// comparison; `genstream serve` sets TCP_NODELAY.
    #[arg(long)]
    pub nagle: bool,
    /// Run without the Prometheus recorder (every metric a no-op), for the
    /// comparison; `genstream serve` installs it, and so does this by default.
    #[arg(long)]
    pub no_metrics: bool,
    /// The server's `http.sse_chunk_bytes` (most bytes of consecutive frames a
    /// subscriber that is behind writes as one chunk; 0: one frame per chunk).
    /// Default: the config's.
    #[arg(long)]
    pub sse_chunk_bytes: Option<usize>,
}

/// A server running in this process.
struct InProc {
    rt: Runtime,
    addr: SocketAddr,
    token: String,
    store: Arc<TimedStore>,
}

impl InProc {
    /// Serves `genstream_server::app` with the state `serve::build_state` builds from a
    /// config (limits off, one demo model with `options_toml`), except that the job
    /// manager is rebuilt over a [`TimedStore`].
    fn start(args: &FanoutArgs, options_toml: &str) -> Result<InProc, String> {
        let n = AtomicUsize::new(0);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.server_threads)
            .thread_name_fn(move || format!("server-{}", n.fetch_add(1, Ordering::Relaxed)))
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let file = std::env::temp_dir().join(format!(
            "genstream-bench-{}-fanout.toml",
            std::process::id()
        ));
        std::fs::write(
            &file,
            // Room for the 5,000 jobs of `saturation`'s growth sweep.
            crate::memory::config_toml("sqlite::memory:", 10_000, options_toml),
        )
        .map_err(|e| e.to_string())?;
        let config = Config::load(Some(&file), &Overrides::default());
        let _ = std::fs::remove_file(&file);
        let config = config.map_err(|e| e.to_string())?;
        let (nagle, chunk_bytes) = (args.nagle, args.sse_chunk_bytes);
        if !args.no_metrics {
            // As `serve::run`: the process's recorder, so every metric costs what it
            // costs in production.
            genstream_server::observe::prometheus();
        }
        let (addr, token, store) = rt.block_on(async move {
            let (mut state, _) = genstream_server::serve::build_state(&config)
                .await
                .map_err(|e| e.to_string())?;
            let store = Arc::new(TimedStore::new(MemoryStore::new(config.log_limits())));
            let dyn_store: Arc<dyn JobStore> = store.clone();
            let db = state.manager.db().clone();
            let models = state.manager.models().to_vec();
            state.manager = JobManager::new(dyn_store, db, models, config.manager_config());
            state.manager.spawn_reaper();
            if let Some(n) = chunk_bytes {
                state.sse_chunk_bytes = n;
            }
            let token = state
                .auth
                .mint("bench", Duration::from_secs(3600))
                .map_err(|e| e.to_string())?;
            let router = app(state, config.http.max_body_bytes);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            // As `serve::run` serves it (the peer address feeds the per-IP limit).
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            if nagle {
                tokio::spawn(async move { axum::serve(listener, service).await });
            } else {
                let l = genstream_server::serve::no_delay(listener);
                tokio::spawn(async move { axum::serve(l, service).await });
            }
            Ok::<_, String>((addr, token, store))
        })?;
        Ok(InProc {
            rt,
            addr,
            token,
            store,
        })
    }
}

/// One measured run.
pub(crate) struct CaseResult {
    pub(crate) delay_ms: u64,
    pub(crate) tokens: u64,
    pub(crate) jobs: usize,
    pub(crate) subs_per_job: usize,
    pub(crate) setup: Duration,
    pub(crate) delivered: u64,
    pub(crate) rate_all_running: f64,
    pub(crate) rate_overall: f64,
    pub(crate) per_job_rate: f64,
    pub(crate) slowest_p50_us: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) max_us: u64,
    pub(crate) late: u64,
    pub(crate) incomplete: usize,
    pub(crate) server_cpu: f64,
    pub(crate) server_sys: f64,
    pub(crate) client_cpu: f64,
    pub(crate) process_cpu: f64,
    pub(crate) other_cores: f64,
    pub(crate) softirq_cores: f64,
    pub(crate) steal_cores: f64,
    pub(crate) wall: Duration,
}

pub(crate) fn client_runtime(threads: usize) -> Result<Runtime, String> {
    let n = AtomicUsize::new(0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name_fn(move || format!("client-{}", n.fetch_add(1, Ordering::Relaxed)))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// One run: `jobs` jobs × `subs_per_job` subscribers, each reading `proto`'s stream
/// of its job (for a projected stream, each frame's delay counts from the append of
/// the native event that produced it).
pub(crate) fn run_case(
    args: &FanoutArgs,
    client_rt: &Runtime,
    jobs: usize,
    subs_per_job: usize,
    delay_ms: u64,
    proto: Protocol,
) -> Result<CaseResult, String> {
    let tokens = (args.duration_ms / delay_ms.max(1)).max(1);
    let first_token_delay = args.first_token_delay_ms.unwrap_or(2000 + 3 * jobs as u64);
    let srv = InProc::start(
        args,
        &format!(
            "tokens = {tokens}\ntoken_delay = \"{delay_ms}ms\"\n\
             first_token_delay = \"{first_token_delay}ms\"\nbehavior = \"text\""
        ),
    )?;
    let (addr, token) = (srv.addr, srv.token.clone());
    let limit = Duration::from_millis(first_token_delay + args.duration_ms * 4 + 30_000);
    let total = jobs * subs_per_job;

    let result = client_rt.block_on(async move {
        let setup_start = Instant::now();
        let http = reqwest::Client::new();
        let base = format!("http://{addr}");
        let post_permits = Arc::new(Semaphore::new(16));
        let open_permits = Arc::new(Semaphore::new(128));
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let (ids_tx, mut ids_rx) = mpsc::unbounded_channel::<(usize, String)>();
        let mut readers = Vec::with_capacity(total);
        let (reader_tx, mut reader_rx) = mpsc::unbounded_channel();
        for j in 0..jobs {
            let (http, base, token) = (http.clone(), base.clone(), token.clone());
            let (post_permits, open_permits) = (post_permits.clone(), open_permits.clone());
            let (ready_tx, ids_tx, reader_tx) =
                (ready_tx.clone(), ids_tx.clone(), reader_tx.clone());
            tokio::spawn(async move {
                let job = {
                    let _p = post_permits.acquire().await;
                    match proto.start(&http, addr, &base, &token, j).await {
                        Ok(job) => job,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                };
                let _ = ids_tx.send((j, job.stream_id.clone()));
                let mut first = job.first;
                for _ in 0..subs_per_job {
                    let (key, token, open_permits, ready_tx) = (
                        job.key.clone(),
                        token.clone(),
                        open_permits.clone(),
                        ready_tx.clone(),
                    );
                    // The job's own answer (Chat Completions, AI SDK) is the first
                    // subscriber.
                    let first = first.take();
                    let h = tokio::spawn(async move {
                        let stream = match first {
                            Some(s) => Ok(s),
                            None => {
                                let _p = open_permits.acquire().await;
                                proto.open(addr, &key, &token).await
                            }
                        };
                        match stream {
                            Ok(s) => {
                                let connected = Instant::now();
                                let _ = ready_tx.send(Ok(()));
                                Some((j, proto.read(s, connected, limit).await))
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                None
                            }
                        }
                    });
                    let _ = reader_tx.send(h);
                }
            });
        }
        drop((ready_tx, ids_tx, reader_tx));
        let mut ready = 0;
        let setup_deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while ready < total {
            match tokio::time::timeout_at(setup_deadline, ready_rx.recv()).await {
                Ok(Some(Ok(()))) => ready += 1,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err(format!("only {ready} of {total} subscribers attached")),
                Err(_) => {
                    return Err(format!(
                        "only {ready} of {total} subscribers attached in 90 s"
                    ));
                }
            }
        }
        let setup = setup_start.elapsed();
        let cpu0 = sys::thread_ticks();
        let proc0 = sys::process_ticks(std::process::id());
        let machine0 = sys::machine_ticks();
        let t0 = Instant::now();
        while let Some(h) = reader_rx.recv().await {
            readers.push(h);
        }
        let mut receipts: Vec<(usize, Receipts)> = Vec::with_capacity(total);
        for h in readers {
            if let Ok(Some(r)) = h.await {
                receipts.push(r);
            }
        }
        let wall = t0.elapsed();
        let cpu1 = sys::thread_ticks();
        let proc1 = sys::process_ticks(std::process::id());
        let machine1 = sys::machine_ticks();
        let mut ids = vec![String::new(); jobs];
        while let Some((j, id)) = ids_rx.recv().await {
            ids[j] = id;
        }
        let machine = (
            machine1.0.saturating_sub(machine0.0),
            machine1.1.saturating_sub(machine0.1),
            machine1.2.saturating_sub(machine0.2),
        );
        Ok((
            setup,
            receipts,
            ids,
            cpu0,
            cpu1,
            proc1 - proc0,
            machine,
            wall,
        ))
    });
    let (setup, receipts, ids, cpu0, cpu1, proc_ticks, machine, wall) = match result {
        Ok(r) => r,
        Err(e) => {
            srv.rt.shutdown_timeout(Duration::from_secs(1));
            return Err(e);
        }
    };
    let appended: Vec<Vec<Instant>> = ids.iter().map(|id| srv.store.take(id)).collect();
    // Projected streams: the native seq behind each frame position, per job.
    let positions = srv.rt.block_on(proto.positions(&srv.store.inner, &ids));
    srv.rt.shutdown_timeout(Duration::from_secs(2));
    let positions = positions?;

    let (server_user, server_sys) = sys::cpu_secs_between(&cpu0, &cpu1, |n| {
        n.starts_with("server-") || n.starts_with("sqlx")
    });
    let server_cpu = server_user + server_sys;
    let (cu, cs) = sys::cpu_secs_between(&cpu0, &cpu1, |n| n.starts_with("client-"));
    let client_cpu = cu + cs;
    let process_cpu = proc_ticks as f64 / sys::clk_tck();
    // What the rest of the machine used meanwhile (other processes, interrupts not
    // charged to this one), and what the hypervisor took (steal), in cores.
    let other_cores =
        ((machine.0 as f64 / sys::clk_tck()) - process_cpu).max(0.0) / wall.as_secs_f64();
    let softirq_cores = machine.1 as f64 / sys::clk_tck() / wall.as_secs_f64();
    let steal_cores = machine.2 as f64 / sys::clk_tck() / wall.as_secs_f64();

    let all_running = crate::report::AllRunning::of(&appended);
    let first_append = appended.iter().filter_map(|v| v.get(1)).min().copied();
    let mut delays = Vec::with_capacity(receipts.iter().map(|(_, r)| r.seen.len()).sum());
    let (mut late, mut incomplete, mut in_window) = (0u64, 0usize, 0u64);
    let mut last_receipt = None::<Instant>;
    // Per event, the delay of its slowest subscriber: how long one append takes to
    // reach everyone.
    let mut slowest: Vec<Vec<u64>> = appended.iter().map(|v| vec![0; v.len()]).collect();
    for (j, r) in &receipts {
        let times = &appended[*j];
        let expected = positions.as_ref().map_or(times.len(), |p| p[*j].len());
        let complete = r.seen.len() == expected
            && r.seen
                .iter()
                .enumerate()
                .all(|(i, (s, _))| *s as usize == i);
        if !complete {
            incomplete += 1;
        }
        for (pos, at) in &r.seen {
            let seq = match &positions {
                None => pos,
                Some(p) => match p[*j].get(*pos as usize) {
                    Some(seq) => seq,
                    None => continue,
                },
            };
            if *seq == 0 {
                continue; // `created` was in the log before anyone attached
            }
            let Some(appended_at) = times.get(*seq as usize) else {
                continue;
            };
            if r.connected > *appended_at {
                late += 1;
                continue;
            }
            let d = at.saturating_duration_since(*appended_at).as_micros() as u64;
            delays.push(d);
            let m = &mut slowest[*j][*seq as usize];
            *m = (*m).max(d);
            if all_running.is_some_and(|w| w.contains(*at)) {
                in_window += 1;
            }
            last_receipt = Some(last_receipt.map_or(*at, |l: Instant| l.max(*at)));
        }
    }
    delays.sort_unstable();
    let mut slowest: Vec<u64> = slowest
        .iter()
        .flat_map(|v| v.iter().skip(1).copied())
        .collect();
    slowest.sort_unstable();
    let delivered = delays.len() as u64;
    let rate_all_running = all_running.map_or(0.0, |w| w.rate(in_window));
    let rate_overall = match (first_append, last_receipt) {
        (Some(a), Some(b)) if b > a => delivered as f64 / (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let per_job_rate = {
        let rates: Vec<f64> = appended
            .iter()
            .filter(|v| v.len() > 2)
            .map(|v| (v.len() - 2) as f64 / (v[v.len() - 1] - v[1]).as_secs_f64())
            .collect();
        rates.iter().sum::<f64>() / rates.len().max(1) as f64
    };
    Ok(CaseResult {
        delay_ms,
        tokens,
        jobs,
        subs_per_job,
        setup,
        delivered,
        rate_all_running,
        rate_overall,
        per_job_rate,
        slowest_p50_us: quantile(&slowest, 0.50),
        p50_us: quantile(&delays, 0.50),
        p99_us: quantile(&delays, 0.99),
        p999_us: quantile(&delays, 0.999),
        max_us: delays.last().copied().unwrap_or(0),
        late,
        incomplete,
        server_cpu,
        server_sys,
        client_cpu,
        process_cpu,
        other_cores,
        softirq_cores,
        steal_cores,
        wall,
    })
}

fn print(title: &str, args: &FanoutArgs, results: &[CaseResult]) {
    println!(
        "### {title}\n\nserver runtime: {} worker threads (`server-N`); clients: {} (`client-N`); TCP_NODELAY on server sockets: {}\n",
        args.server_threads,
        args.client_threads,
        if args.nagle {
            "no (Nagle on, for comparison)"
        } else {
            "yes (as `genstream serve`)"
        }
    );
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let per_m = |cpu: f64| format!("{:.2}", cpu / (r.delivered as f64 / 1e6));
            vec![
                format!("{} ms × {}", r.delay_ms, r.tokens),
                format!("{} × {}", r.jobs, r.subs_per_job),
                format!("{:.0}", r.per_job_rate),
                thousands(r.delivered),
                thousands(r.rate_all_running as u64),
                thousands(r.rate_overall as u64),
                ms(r.p50_us),
                ms(r.p99_us),
                ms(r.p999_us),
                ms(r.max_us),
                ms(r.slowest_p50_us),
                format!(
                    "{:.2} ({:.0}% sys)",
                    r.server_cpu,
                    100.0 * r.server_sys / r.server_cpu.max(1e-9)
                ),
                per_m(r.server_cpu),
                per_m(r.process_cpu),
                format!("{:.2}", r.server_cpu / r.wall.as_secs_f64()),
                format!("{:.2}", r.client_cpu),
                format!("{:.2}", r.softirq_cores),
                format!("{:.2} / {:.2}", r.other_cores, r.steal_cores),
                format!("{}/{}", r.late, r.incomplete),
                format!("{:.1}", r.setup.as_secs_f64()),
            ]
        })
        .collect();
    table(
        &[
            "token delay × tokens",
            "jobs × subs",
            "appends/s/job",
            "events delivered",
            "delivered ev/s (all jobs running)",
            "delivered ev/s (whole run)",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "slowest sub p50 ms",
            "server CPU s",
            "server CPU s / M ev",
            "process CPU s / M ev",
            "server cores busy",
            "client CPU s",
            "softirq cores",
            "other load / steal (cores)",
            "late/incomplete",
            "setup s",
        ],
        &rows,
    );
}

fn run(title: &str, args: &FanoutArgs, jobs: usize, subs_per_job: usize) -> Result<(), String> {
    let client_rt = client_runtime(args.client_threads)?;
    let mut results = Vec::new();
    for &d in &args.delays_ms {
        let busy = sys::other_load(Duration::from_secs(2));
        if busy > 0.2 {
            eprintln!(
                "warning: other processes use {busy:.2} cores; the figures will be disturbed"
            );
        }
        eprintln!("{title}: {jobs} job(s) × {subs_per_job} subscriber(s), token delay {d} ms …");
        results.push(run_case(
            args,
            &client_rt,
            jobs,
            subs_per_job,
            d,
            Protocol::Native,
        )?);
    }
    client_rt.shutdown_timeout(Duration::from_secs(2));
    print(title, args, &results);
    Ok(())
}

/// 1 job × `subscribers` SSE subscribers.
pub fn one_job(args: &FanoutArgs, subscribers: usize) -> Result<(), String> {
    run("fanout-one-job", args, 1, subscribers)
}

/// `jobs` jobs × 1 SSE subscriber each.
pub fn many_jobs(args: &FanoutArgs, jobs: usize) -> Result<(), String> {
    run("fanout-many-jobs", args, jobs, 1)
}
