//! Properties of every projection over random logs written the way the engine writes
//! them (`testing::LogBuilder`): model calls with random text, reasoning, signatures,
//! redacted blocks and tool-call fragments (server tool `add`, client tool
//! `get_weather`, names that come late or never), failed attempts that are retried,
//! and every ending.
//!
//! - each protocol's client invariants hold (`common::check_*`);
//! - determinism: the frames of a prefix are exactly the whole projection's frames of
//!   those seqs, byte for byte, whoever projects it;
//! - resume: for every position N, re-projecting on a fresh projector from
//!   `resume_point(N)` gives exactly the frames after N (what another replica sends);
//! - the final objects hold exactly the saved answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use genstream_engine::event::Event;
use genstream_protocols::ai_sdk::{AiSdkOptions, AiSdkProjector};
use genstream_protocols::testing::LogBuilder;
use genstream_protocols::{ProjectedFrame, ProjectedLog, Projector};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Piece {
    Text(String),
    Think(String),
    Signature,
    Redacted,
    /// A fragment of tool call `index`: its id (first fragment), its name (from the
    /// pool, or none in this fragment), arguments text.
    Tool {
        index: u32,
        name: Option<usize>,
        args: String,
    },
}

#[derive(Clone, Debug)]
struct Call {
    pieces: Vec<Piece>,
    usage: bool,
    retried: bool,
}

#[derive(Clone, Copy, Debug)]
enum Ending {
    Complete,
    MaxToolIterations,
    Abort,
    Shutdown,
    Error,
    LogFull,
    /// The log is cut before its end: a job still running.
    Running,
}

const NAMES: [&str; 2] = ["add", "get_weather"];
const CLIENT: &[&str] = &["get_weather"];

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => "(?s).{1,12}".prop_map(Piece::Text),
        2 => "(?s).{1,12}".prop_map(Piece::Think),
        1 => Just(Piece::Signature),
        1 => Just(Piece::Redacted),
        3 => (0u32..3, proptest::option::weighted(0.7, 0usize..2), "[{}\":a-z0-9 ,]{0,8}")
            .prop_map(|(index, name, args)| Piece::Tool { index, name, args }),
    ]
}

fn call() -> impl Strategy<Value = Call> {
    (
        proptest::collection::vec(piece(), 0..8),
        proptest::bool::weighted(0.9),
        proptest::bool::weighted(0.25),
    )
        .prop_map(|(pieces, usage, retried)| Call {
            pieces,
            usage,
            retried,
        })
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        4 => Just(Ending::Complete),
        1 => Just(Ending::MaxToolIterations),
        1 => Just(Ending::Abort),
        1 => Just(Ending::Shutdown),
        1 => Just(Ending::Error),
        1 => Just(Ending::LogFull),
        1 => Just(Ending::Running),
    ]
}

/// A log as the engine would write it for this script.
fn build(calls: &[Call], ending: Ending) -> Vec<Event> {
    let mut b = LogBuilder::default();
    for (n, c) in calls.iter().enumerate() {
        b.call();
        let mut seen = std::collections::BTreeSet::new();
        // Upstreams name a call once (in its first fragment or a later one).
        let mut named = std::collections::BTreeSet::new();
        for p in &c.pieces {
            match p {
                Piece::Text(t) => b.text(t),
                Piece::Think(t) => b.think(t),
                Piece::Signature => b.signature("EqSig=="),
                Piece::Redacted => b.redacted("EmwK"),
                Piece::Tool { index, name, args } => {
                    let first = seen.insert(*index);
                    let id = format!("call_{n}_{index}");
                    let name = name.filter(|_| named.insert(*index)).map(|i| NAMES[i]);
                    b.tool(*index, first.then_some(id.as_str()), name, args)
                }
            };
        }
        if c.usage {
            b.usage(10 + n as u64, 5);
        }
        if c.retried {
            b.retry("upstream says 503");
        } else if n + 1 < calls.len() {
            b.results(&["3", "{\"temp\":21}"]);
        }
    }
    match ending {
        Ending::Complete => b.complete(None),
        Ending::MaxToolIterations => b
            .results(&["{\"error\":\"not run: max_tool_iterations reached\"}"])
            .complete(Some("max_tool_iterations")),
        Ending::Abort => b.abort("aborted"),
        Ending::Shutdown => b.abort("shutdown"),
        Ending::Error => b.error("upstream_error", "upstream says 400"),
        Ending::LogFull => b.error(
            "log_full",
            "the answer exceeded the server's per-job event log cap",
        ),
        Ending::Running => &mut b,
    };
    b.build()
}

fn frames_of<P: Projector>(p: P, events: &[Event]) -> Vec<ProjectedFrame> {
    project(p, events).frames().to_vec()
}

/// Determinism and exact resume for one projection.
fn check_determinism_and_resume<P: Projector + Clone>(fresh: P, events: &[Event], cut: usize) {
    let full: ProjectedLog<P> = project(fresh.clone(), events);
    // The same log twice: the same bytes.
    assert_eq!(frames_of(fresh.clone(), events), full.frames());
    check_prefix(fresh.clone(), &full, events, cut);
    check_resume(fresh, &full, events);
}

/// A prefix projects to exactly the full projection's frames of those seqs.
fn check_prefix<P: Projector + Clone>(
    fresh: P,
    full: &ProjectedLog<P>,
    events: &[Event],
    cut: usize,
) {
    let cut = cut.min(events.len());
    let prefix = frames_of(fresh.clone(), &events[..cut]);
    let expected: Vec<ProjectedFrame> = full
        .frames()
        .iter()
        .filter(|f| (f.seq as usize) < cut)
        .cloned()
        .collect();
    // Terminal flags agree: only the end of the whole log has one.
    assert_eq!(prefix, expected);
}

/// Every resume point, in this log and re-projected elsewhere, gives exactly the rest.
fn check_resume<P: Projector + Clone>(fresh: P, full: &ProjectedLog<P>, events: &[Event]) {
    // Every resume point, re-projected elsewhere, gives exactly the rest.
    // (Re-projections from the same native seq are shared: one per seq, then each
    // resume point drops its `skip`.)
    let mut from_seq: std::collections::BTreeMap<Option<u64>, Vec<ProjectedFrame>> =
        Default::default();
    for n in 0..full.frames().len() as u64 {
        let rest = full.after(Some(n)).unwrap();
        assert_eq!(rest, &full.frames()[n as usize + 1..]);
        let point = full.resume_point(n).unwrap();
        let all = from_seq.entry(point.after_seq).or_insert_with(|| {
            let whole = genstream_protocols::ResumePoint {
                after_seq: point.after_seq,
                skip: 0,
            };
            reproject(fresh.clone(), events, whole)
        });
        assert_eq!(
            &all[point.skip..],
            rest,
            "resume after position {n} ({point:?})"
        );
    }
    assert!(full.after(Some(full.frames().len() as u64)).is_err());
    assert!(full.resume_point(full.frames().len() as u64).is_none());
    assert_eq!(full.after(None).unwrap(), full.frames());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_logs_project_well(
        calls in proptest::collection::vec(call(), 1..5),
        end in ending(),
        cut in 0usize..64,
    ) {
        let events = build(&calls, end);
        let ended = !matches!(end, Ending::Running);
        check_chat(project(chat(CLIENT), &events).frames(), ended);
        check_responses(project(responses(CLIENT), &events).frames(), ended);
        check_ai_sdk(project(ai_sdk(CLIENT), &events).frames(), ended, false);
        let reset = AiSdkProjector::new(AiSdkOptions { client_tools: set(CLIENT), reset_step_on_retry: true });
        check_ai_sdk(project(reset.clone(), &events).frames(), ended, true);
        check_objects(&events, CLIENT);

        check_determinism_and_resume(chat(CLIENT), &events, cut);
        check_determinism_and_resume(responses(CLIENT), &events, cut);
        check_determinism_and_resume(ai_sdk(CLIENT), &events, cut);
        check_determinism_and_resume(reset, &events, cut);
    }
}

/// The recorded logs, at every cut: determinism and resume on real sequences.
#[test]
fn recorded_logs_resume_exactly_everywhere() {
    for name in LOGS {
        let events = log(name);
        check_determinism_and_resume(chat(&[]), &events, 0);
        check_determinism_and_resume(responses(&[]), &events, 0);
        check_determinism_and_resume(ai_sdk(&[]), &events, 0);
        let (c, r, a) = (
            project(chat(&[]), &events),
            project(responses(&[]), &events),
            project(ai_sdk(&[]), &events),
        );
        for cut in 0..=events.len() {
            check_prefix(chat(&[]), &c, &events, cut);
            check_prefix(responses(&[]), &r, &events, cut);
            check_prefix(ai_sdk(&[]), &a, &events, cut);
        }
    }
}

/// The checkers can fail: a duplicated frame, a hole, a frame out of place.
#[test]
fn the_checks_catch_a_broken_stream() {
    let events = log("parallel_tools");
    let frames = frames_of(responses(&[]), &events);
    let mut dup = frames.clone();
    dup.insert(5, dup[4].clone());
    for (n, f) in dup.iter_mut().enumerate() {
        f.position = n as u64;
    }
    assert!(std::panic::catch_unwind(|| check_responses(&dup, true)).is_err());
    let mut hole = frames.clone();
    hole.remove(6);
    for (n, f) in hole.iter_mut().enumerate() {
        f.position = n as u64;
    }
    assert!(std::panic::catch_unwind(|| check_responses(&hole, true)).is_err());
    let ai = frames_of(ai_sdk(&[]), &events);
    let mut swapped = ai.clone();
    swapped.swap(2, 3); // text-delta before text-start
    for (n, f) in swapped.iter_mut().enumerate() {
        f.position = n as u64;
    }
    assert!(std::panic::catch_unwind(|| check_ai_sdk(&swapped, true, false)).is_err());
    let chat_frames = frames_of(chat(&[]), &events);
    let mut no_done = chat_frames.clone();
    no_done.pop();
    assert!(std::panic::catch_unwind(|| check_chat(&no_done, true)).is_err());
}
