//! `projection-fanout`: the server-level cost of the client protocol projections.
//! The same in-process server and clients as `fanout-one-job` / `fanout-many-jobs`
//! (`fanout.rs`: the real router, memory store, the demo model at a fixed token rate),
//! once per stream a subscriber reads:
//!
//! - native: `GET /api/chat/stream/{streamId}` (jobs from `POST /api/chat`);
//! - Responses: `GET /v1/responses/{id}?stream=true` (jobs from `POST /v1/responses`
//!   with `background: true`);
//! - Chat Completions: the `POST /v1/chat/completions` (`stream: true`) answer itself,
//!   which nobody else can attach to, so 1 job × N has no Chat Completions row;
//! - AI SDK: the `POST /api/ai/chat` answer, and `GET /api/ai/chat/{chatId}/stream`
//!   for the job's other subscribers.
//!
//! A projected frame's delay counts from the append of the native event that produced
//! it (the frame's position is mapped to its native seq by projecting the finished
//! log again, as the server did). Rows alternate native and projected runs, so each
//! projection is compared with native runs under the same machine load.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use genstream_engine::event::Event;
use genstream_engine::store::{EventLogStore, MemoryStore};
use genstream_protocols::ai_sdk::{AiSdkOptions, AiSdkProjector};
use genstream_protocols::chat::{ChatOptions, ChatProjector};
use genstream_protocols::responses::{ResponsesOptions, ResponsesProjector};
use genstream_protocols::{ProjectedLog, Projector};
use serde_json::json;

use crate::fanout::{CaseResult, FanoutArgs, client_runtime, run_case};
use crate::http::{self, Receipts, Stream};
use crate::report::{ms, table, thousands};
use crate::sys;

#[derive(Args)]
pub struct ProjectionFanoutArgs {
    /// Subscribers of the one job in the 1 × N shape.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Jobs of the N × 1 shape.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// The demo model's delay between tokens, in ms.
    #[arg(long, default_value_t = 10)]
    delay_ms: u64,
    /// The projected streams to run next to native: a comma-separated list of
    /// `responses`, `chat`, `ai-sdk`.
    #[arg(long, value_delimiter = ',', default_value = "responses,chat,ai-sdk")]
    protocols: Vec<String>,
    #[command(flatten)]
    fanout: FanoutArgs,
}

/// The stream a subscriber reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Native,
    Responses,
    Chat,
    AiSdk,
}

/// A started job: its stream id, the id its protocol's routes name it by, and the
/// answer's own stream when the protocol answers with one.
pub struct Job {
    pub stream_id: String,
    pub key: String,
    pub first: Option<Stream>,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Native => "native SSE",
            Protocol::Responses => "/v1/responses",
            Protocol::Chat => "/v1/chat/completions",
            Protocol::AiSdk => "AI SDK",
        }
    }

    /// Starts job `j` (model `bench`).
    pub async fn start(
        self,
        http: &reqwest::Client,
        addr: SocketAddr,
        base: &str,
        token: &str,
        j: usize,
    ) -> Result<Job, String> {
        let text = format!("bench job {j}");
        let posted = |path: &'static str, body: serde_json::Value| async move {
            let (s, head) =
                http::open(addr, "POST", path, token, Some(&body.to_string()), true).await?;
            let stream_id = http::header(&head, "x-genstream-stream-id")
                .ok_or_else(|| format!("POST {path}: no stream id header"))?
                .to_owned();
            Ok::<_, String>((stream_id, s))
        };
        match self {
            Protocol::Native => {
                let id = http::start_chat(http, base, token, "bench", &text).await?;
                Ok(Job {
                    stream_id: id.clone(),
                    key: id,
                    first: None,
                })
            }
            Protocol::Responses => {
                let resp = http
                    .post(format!("{base}/v1/responses"))
                    .bearer_auth(token)
                    .json(&json!({"model": "bench", "input": text, "background": true}))
                    .send()
                    .await
                    .map_err(|e| format!("POST /v1/responses: {e}"))?;
                let stream_id = resp
                    .headers()
                    .get("x-genstream-stream-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .ok_or_else(|| format!("POST /v1/responses: {}", resp.status()))?;
                let body: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| format!("POST /v1/responses: {e}"))?;
                let key = body["id"]
                    .as_str()
                    .ok_or_else(|| format!("POST /v1/responses: no id in {body}"))?
                    .to_owned();
                Ok(Job {
                    stream_id,
                    key,
                    first: None,
                })
            }
            Protocol::Chat => {
                let body = json!({"model": "bench", "stream": true,
                    "messages": [{"role": "user", "content": text}]});
                let (stream_id, s) = posted("/v1/chat/completions", body).await?;
                Ok(Job {
                    key: stream_id.clone(),
                    stream_id,
                    first: Some(s),
                })
            }
            Protocol::AiSdk => {
                let chat = format!("bench-{j}");
                let body = json!({"id": chat, "model": "bench", "messages": [
                    {"id": "u", "role": "user", "parts": [{"type": "text", "text": text}]}
                ]});
                let (stream_id, s) = posted("/api/ai/chat", body).await?;
                Ok(Job {
                    stream_id,
                    key: chat,
                    first: Some(s),
                })
            }
        }
    }

    /// Opens another subscriber of the job named `key`.
    pub async fn open(self, addr: SocketAddr, key: &str, token: &str) -> Result<Stream, String> {
        let path = match self {
            Protocol::Native => return http::open_stream(addr, key, token, true).await,
            Protocol::Responses => format!("/v1/responses/{key}?stream=true"),
            Protocol::AiSdk => format!("/api/ai/chat/{key}/stream"),
            Protocol::Chat => {
                return Err("a Chat Completions stream has one reader, its request".into());
            }
        };
        http::open(addr, "GET", &path, token, None, true)
            .await
            .map(|(s, _)| s)
    }

    /// Reads a subscriber's stream to its end: native seqs for the native stream,
    /// frame positions for a projected one.
    pub async fn read(self, s: Stream, connected: Instant, limit: Duration) -> Receipts {
        match self {
            Protocol::Native => http::read_ids(s, connected, limit).await,
            _ => http::read_frames(s, connected, limit).await,
        }
    }

    /// For a projected stream, per job (in `ids` order), the native seq of each frame
    /// position; `None` for the native stream.
    pub async fn positions(
        self,
        store: &MemoryStore,
        ids: &[String],
    ) -> Result<Option<Vec<Vec<u32>>>, String> {
        if self == Protocol::Native {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let log = store
                .open_log(id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no log for {id}"))?;
            let mut events = Vec::new();
            let mut cursor = None;
            while let Some(f) = log.frame_after(cursor) {
                let e: Event = serde_json::from_slice(f.data_json()).map_err(|e| e.to_string())?;
                cursor = Some(e.seq);
                events.push(e);
            }
            out.push(match self {
                Protocol::Responses => seqs(
                    ResponsesProjector::new(ResponsesOptions {
                        background: true,
                        ..ResponsesOptions::default()
                    }),
                    &events,
                )?,
                Protocol::Chat => seqs(
                    ChatProjector::new(ChatOptions {
                        include_usage: false,
                        client_tools: Default::default(),
                    }),
                    &events,
                )?,
                Protocol::AiSdk | Protocol::Native => {
                    seqs(AiSdkProjector::new(AiSdkOptions::default()), &events)?
                }
            });
        }
        Ok(Some(out))
    }
}

/// The native seq behind each frame of `events`' projection.
fn seqs<P: Projector>(projector: P, events: &[Event]) -> Result<Vec<u32>, String> {
    let mut log = ProjectedLog::new(projector);
    for e in events {
        log.push(e.seq, &e.body).map_err(|e| e.to_string())?;
    }
    Ok(log.frames().iter().map(|f| f.seq as u32).collect())
}

/// Runs both shapes, alternating native and projected rows, and prints the table.
pub fn run(args: &ProjectionFanoutArgs) -> Result<(), String> {
    let mut projected = Vec::new();
    for p in &args.protocols {
        projected.push(match p.as_str() {
            "responses" => Protocol::Responses,
            "chat" => Protocol::Chat,
            "ai-sdk" => Protocol::AiSdk,
            other => return Err(format!("unknown protocol {other:?}")),
        });
    }
    let client_rt = client_runtime(args.fanout.client_threads)?;
    let mut rows = Vec::new();
    for (jobs, subs) in [(1, args.subscribers), (args.jobs, 1)] {
        // native, p1, native, p2, native, p3, native: every projected row between two
        // native ones.
        let mut order = vec![Protocol::Native];
        for &p in &projected {
            if p == Protocol::Chat && subs > 1 {
                continue;
            }
            order.extend([p, Protocol::Native]);
        }
        let mut natives: Vec<f64> = Vec::new();
        let mut results: Vec<(Protocol, CaseResult, f64)> = Vec::new();
        for proto in order {
            let load = sys::load_average();
            eprintln!(
                "projection-fanout: {jobs} job(s) × {subs}, {}, load {load:.1} …",
                proto.name()
            );
            let r = run_case(&args.fanout, &client_rt, jobs, subs, args.delay_ms, proto)?;
            if proto == Protocol::Native {
                natives.push(r.rate_all_running);
            }
            results.push((proto, r, load));
        }
        let native_rate = natives.iter().sum::<f64>() / natives.len().max(1) as f64;
        let native_cpu = {
            let n: Vec<&CaseResult> = results
                .iter()
                .filter(|(p, _, _)| *p == Protocol::Native)
                .map(|(_, r, _)| r)
                .collect();
            n.iter().map(|r| cpu_per_m(r)).sum::<f64>() / n.len().max(1) as f64
        };
        for (proto, r, load) in results {
            rows.push(vec![
                format!("{} × {}", r.jobs, r.subs_per_job),
                proto.name().to_owned(),
                thousands(r.delivered),
                thousands(r.rate_all_running as u64),
                format!("{:.0}%", 100.0 * r.rate_all_running / native_rate.max(1e-9)),
                ms(r.p50_us),
                ms(r.p99_us),
                format!("{:.2}", cpu_per_m(&r)),
                format!("{:.0}%", 100.0 * cpu_per_m(&r) / native_cpu.max(1e-9)),
                format!(
                    "{:.2}",
                    r.client_cpu / (r.delivered as f64 / 1e6).max(1e-12)
                ),
                format!("{}/{}", r.late, r.incomplete),
                format!("{load:.1} / {:.2}", r.other_cores),
            ]);
        }
    }
    client_rt.shutdown_timeout(Duration::from_secs(2));
    println!(
        "### projection-fanout\n\ndemo model: {} ms × {} tokens; server runtime: {} worker \
         threads; clients: {}. \"events\" are frames of the stream read (a projected \
         frame's delay counts from its native event's append); \"of native\" compares \
         with the mean of this shape's native rows.\n",
        args.delay_ms,
        (args.fanout.duration_ms / args.delay_ms.max(1)).max(1),
        args.fanout.server_threads,
        args.fanout.client_threads
    );
    table(
        &[
            "jobs × subs",
            "stream",
            "events delivered",
            "delivered ev/s (all jobs running)",
            "of native",
            "p50 ms",
            "p99 ms",
            "server CPU s / M ev",
            "CPU of native",
            "client CPU s / M ev",
            "late/incomplete",
            "load avg 1 min / other processes (cores)",
        ],
        &rows,
    );
    Ok(())
}

fn cpu_per_m(r: &CaseResult) -> f64 {
    r.server_cpu / (r.delivered as f64 / 1e6).max(1e-12)
}
