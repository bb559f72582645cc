//! The behaviours every HTTP provider shares, written once and run against each wire
//! (as TensorZero's `generate_provider_tests!`): [`provider_suite!`] instantiates every
//! function here as a test in a `suite` module of the provider's own file, with the
//! provider's [`Wire`] — its recordings and the answers they must give.

use std::time::Duration;

use futures::StreamExt;
use genstream_engine::provider::{ProviderErrorKind, ProviderEvent};
use genstream_engine::usage::UsageRecord;
use genstream_mock_upstream::fixture;
use genstream_test_support::unused_addr;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{Item, ToolCase, Wire, request};

/// One `#[tokio::test]` per shared behaviour, for the wire `$wire` (an expression
/// giving a `Wire`), in a module `suite`.
macro_rules! provider_suite {
    ($wire:expr) => {
        mod suite {
            $crate::suite::provider_suite!(@tests $wire;
                text_and_usage,
                reasoning_then_text,
                tool_call_split_across_fragments,
                parallel_tool_calls,
                reasoning_then_tool_call,
                in_stream_error_is_an_upstream_error,
                statuses_with_retry_after,
                status_400_quotes_the_message,
                unknown_model_is_a_404,
                malformed_chunk,
                truncated_stream,
                connect_error,
                cancel_ends_a_stalled_stream,
                missing_key_variable_is_a_config_error,
                keepalives_are_not_timeouts_but_silence_is,
            );

            /// `std::env::set_var` is `unsafe` in edition 2024 and the workspace
            /// forbids unsafe code, so the check runs in a child process of this test
            /// binary that is started with the variable set.
            #[test]
            fn sends_key_from_env() {
                $crate::suite::sends_key_from_env(&$wire, module_path!());
            }

            #[tokio::test]
            #[ignore = "run by sends_key_from_env, in a child process with the key variable set"]
            async fn key_child() {
                $crate::suite::key_child(&$wire).await;
            }
        }
    };
    (@tests $wire:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                $crate::suite::$name(&$wire).await;
            }
        )*
    };
}
pub(crate) use provider_suite;

fn usage_record(w: &Wire, input: u64, output: u64, input_includes_cache: bool) -> UsageRecord {
    UsageRecord {
        call_index: 0,
        model: "configured-name".into(),
        // The `[providers]` key, not the kind (an OpenAI-compatible upstream is often
        // not OpenAI).
        provider: w.name.into(),
        input_tokens: input,
        output_tokens: output,
        cache_write_tokens: 0,
        cache_read_tokens: 0,
        reasoning_tokens: 0,
        input_includes_cache,
        estimated: false,
    }
}

pub async fn text_and_usage(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let case = &w.text;
    for holds in case.fixture_holds {
        assert!(fixture(case.path).unwrap().contains(holds), "{holds}");
    }
    let s = w.fixture_run(&mock, case.path).await;
    assert_eq!(s.text, (w.fixture_deltas)(case.path, w.text_field));
    assert!(s.text.starts_with(case.starts_with), "{}", s.text);
    assert_eq!(s.order, "tuf");
    assert_eq!(s.finish.as_deref(), Some(case.finish));
    assert_eq!(
        s.usage.unwrap(),
        usage_record(
            w,
            case.input_tokens,
            case.output_tokens,
            case.input_includes_cache
        )
    );
}

pub async fn reasoning_then_text(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    for case in w.reasoning {
        let path = case.path;
        let s = w.fixture_run(&mock, path).await;
        assert!(s.error.is_none(), "{path}: {:?}", s.error);
        assert_eq!(s.order, "rtuf", "{path}");
        assert_eq!(
            s.reasoning,
            (w.fixture_deltas)(path, case.reasoning_field),
            "{path}"
        );
        assert_eq!(s.text, (w.fixture_deltas)(path, w.text_field), "{path}");
        assert!(!s.reasoning.is_empty() && !s.text.is_empty(), "{path}");
        (case.check_usage)(&s.usage.unwrap());
    }
}

async fn tool_case(w: &Wire, case: &ToolCase) {
    let mock = genstream_mock_upstream::spawn().await;
    let path = case.path;
    if let Some(end) = case.fixture_ends_with {
        assert!(fixture(path).unwrap().ends_with(end), "{path}");
    }
    let s = w.fixture_run(&mock, path).await;
    assert!(s.error.is_none(), "{path}: {:?}", s.error);
    assert_eq!(s.order, case.order, "{path}");
    assert_eq!(s.text, case.text, "{path}");
    assert_eq!(s.finish.as_deref(), Some(case.finish), "{path}");
    let calls: Vec<(u32, &str, &str, Value)> = s
        .tools
        .iter()
        .map(|(index, (id, name, args))| {
            let args: Value = serde_json::from_str(args)
                .unwrap_or_else(|e| panic!("{path}: arguments {args:?}: {e}"));
            assert!(args.is_object(), "{path}: {args}");
            (*index, id.as_str(), name.as_str(), args)
        })
        .collect();
    let expected: Vec<(u32, &str, &str, Value)> = case
        .calls
        .iter()
        .map(|(index, id, name, args)| (*index, *id, *name, serde_json::from_str(args).unwrap()))
        .collect();
    assert_eq!(calls, expected, "{path}");
    if let Some(tokens) = case.tokens {
        let u = s.usage.unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), tokens, "{path}");
    }
}

pub async fn tool_call_split_across_fragments(w: &Wire) {
    tool_case(w, &w.split_call).await;
}

pub async fn parallel_tool_calls(w: &Wire) {
    assert!(w.parallel_calls.calls.len() > 1);
    tool_case(w, &w.parallel_calls).await;
}

pub async fn reasoning_then_tool_call(w: &Wire) {
    assert!(w.reasoning_then_call.order.starts_with('r'));
    tool_case(w, &w.reasoning_then_call).await;
}

pub async fn in_stream_error_is_an_upstream_error(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let case = &w.in_stream_error;
    let s = w.summarize(w.run(&mock, case.model).await.unwrap());
    assert_eq!(s.text, case.text);
    assert_eq!(s.order, "te");
    let e = s.error.unwrap();
    assert_eq!(
        (e.kind, e.status),
        (ProviderErrorKind::Upstream, case.status)
    );
    assert!(e.message.contains(case.says), "{}", e.message);
}

pub async fn statuses_with_retry_after(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    for &(code, says) in w.retry_after_statuses {
        let e = w.run(&mock, &format!("status:{code}")).await.unwrap_err();
        assert_eq!(e.kind, ProviderErrorKind::Http);
        assert_eq!(e.status, Some(code));
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        assert!(e.message.contains(says), "{}", e.message);
    }
}

pub async fn status_400_quotes_the_message(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let e = w.run(&mock, "status:400").await.unwrap_err();
    assert_eq!(
        (e.kind, e.status, e.retry_after),
        (ProviderErrorKind::Http, Some(400), None)
    );
    assert!(e.message.contains(w.status_400_says), "{}", e.message);
}

pub async fn unknown_model_is_a_404(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let e = w.run(&mock, "claude-nope").await.unwrap_err();
    assert_eq!(e.status, Some(404));
    assert!(e.message.contains(w.unknown_model_says), "{}", e.message);
}

pub async fn malformed_chunk(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let s = w.summarize(w.run(&mock, "malformed").await.unwrap());
    assert_eq!(s.order, "te");
    assert_eq!(s.text, "Hello");
    let e = s.error.unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Malformed);
    assert!(e.message.contains("{not json"), "{}", e.message);
}

pub async fn truncated_stream(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let s = w.summarize(w.run(&mock, "truncated").await.unwrap());
    assert_eq!(s.text, "This stream stops here");
    assert_eq!(s.order, "te");
    let e = s.error.unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Truncated);
    assert!(e.message.contains(w.truncated_names), "{}", e.message);
}

pub async fn connect_error(w: &Wire) {
    let p = w.provider(
        &format!("http://{}/v1", unused_addr()),
        json!({"model": "echo"}),
        None,
    );
    let e = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Connect, "{}", e.message);
}

pub async fn cancel_ends_a_stalled_stream(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let p = w.for_model(&mock, "stall");
    let cancel = CancellationToken::new();
    let mut stream = p.stream(request("hi"), cancel.clone()).await.unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        ProviderEvent::Text("Stalling".into())
    );
    cancel.cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
    assert!(matches!(next, Ok(None)), "{next:?}");
}

pub async fn missing_key_variable_is_a_config_error(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let var = w.unset_key_var;
    assert!(std::env::var_os(var).is_none());
    let p = w.provider(&mock.base_url(), json!({"model": "echo"}), Some(var));
    let e = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, ProviderErrorKind::Config);
    assert!(e.message.contains(var), "{}", e.message);
    assert!(mock.requests().is_empty());
}

/// Runs `key_child` of the suite at `module` (its `module_path!()`) in a child
/// process of this test binary, with the wire's key variable set.
pub fn sends_key_from_env(w: &Wire, module: &str) {
    // libtest names tests by their path without the crate's name.
    let (_, module) = module.split_once("::").unwrap();
    let exe = std::env::current_exe().unwrap();
    let (var, value) = w.key_var;
    let out = std::process::Command::new(exe)
        .args(["--exact", &format!("{module}::key_child"), "--ignored"])
        .arg("--nocapture")
        .env(var, value)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "child ran no test:\n{stdout}\n{stderr}"
    );
}

pub async fn key_child(w: &Wire) {
    let (var, value) = w.key_var;
    assert_eq!(std::env::var(var).as_deref(), Ok(value));
    let mock = genstream_mock_upstream::spawn().await;
    let p = w.provider(&mock.base_url(), json!({"model": "echo"}), Some(var));
    let items: Vec<Item> = p
        .stream(request("hi"), CancellationToken::new())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(w.summarize(items).text, "hi");
    (w.check_key_headers)(&mock.recorded()[0]);
}

/// The wire's keep-alives (OpenRouter's `: OPENROUTER PROCESSING` comments,
/// Anthropic's `ping` events), before the first frame or between frames, keep a live
/// upstream alive for three times the timeouts; the same stretch of silence is a
/// timeout.
pub async fn keepalives_are_not_timeouts_but_silence_is(w: &Wire) {
    let mock = genstream_mock_upstream::spawn().await;
    let cases = [
        ("echo?lead_ms=1200&keepalive_ms=50", None),
        ("echo?gap_ms=1200&keepalive_ms=50", None),
        (
            "echo?lead_ms=1200&keepalive_ms=0",
            Some("first byte timeout of 0.4 s"),
        ),
        (
            "echo?gap_ms=1200&keepalive_ms=0",
            Some("idle gap timeout of 0.4 s"),
        ),
    ];
    let runs = futures::future::join_all(cases.iter().map(|(model, _)| {
        let p = w.impatient(&mock, model);
        async move {
            let t0 = std::time::Instant::now();
            let stream = p.stream(request("alive and well"), CancellationToken::new());
            let items: Vec<Item> = stream.await.unwrap().collect().await;
            (w.summarize(items), t0.elapsed())
        }
    }))
    .await;
    for ((model, timeout), (s, took)) in cases.iter().zip(runs) {
        match timeout {
            None => {
                assert!(s.error.is_none(), "{model}: {:?}", s.error);
                assert_eq!(s.text, "alive and well", "{model}");
                assert!(took >= Duration::from_millis(1200), "{model}: {took:?}");
            }
            Some(says) => {
                let e = s.error.unwrap_or_else(|| panic!("{model}: no timeout"));
                assert_eq!(e.kind, ProviderErrorKind::Timeout, "{model}: {}", e.message);
                assert!(e.message.contains(says), "{model}: {}", e.message);
                assert!(took < Duration::from_millis(1200), "{model}: {took:?}");
            }
        }
    }
}
