//! The built-in `demo` provider: no network, deterministic, scripted (docs/protocol.md §6).
//!
//! It lets genstream run and be tested with no upstream, in the manner of TensorZero's
//! dummy provider: a model's [`DemoOptions`] choose the answer length, the token rate
//! and a [`DemoBehavior`] (plain text, reasoning, failure before or in the middle of
//! the stream, a stall).
//!
//! The answer is a pure function of the request's messages: an FNV-1a hash of their
//! roles and texts seeds a SplitMix64 generator that picks words from a fixed list, so
//! the same request gives the same bytes on every replica and in every run (no
//! `RandomState`, no clock). All waiting goes through `tokio::time`, so tests with
//! paused time run instantly, and every wait also watches the cancellation token.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use genstream_engine::provider::{
    ModelRequest, Provider, ProviderError, ProviderErrorKind, ProviderEvent, ProviderStream, Role,
};
use genstream_engine::usage::UsageRecord;
use tokio_util::sync::CancellationToken;

use crate::config::{DemoBehavior, DemoOptions};

/// How many tokens a [`DemoBehavior::Stall`] stream sends before it stalls.
pub const STALL_AFTER_TOKENS: u32 = 3;

/// The words an answer is made of.
const WORDS: &[&str] = &[
    "the",
    "stream",
    "keeps",
    "running",
    "while",
    "the",
    "browser",
    "sleeps",
    "every",
    "token",
    "lands",
    "in",
    "a",
    "durable",
    "log",
    "and",
    "each",
    "reader",
    "resumes",
    "from",
    "its",
    "cursor",
    "without",
    "gaps",
    "or",
    "duplicates",
    "replicas",
    "share",
    "one",
    "ordered",
    "history",
    "so",
    "an",
    "abort",
    "from",
    "anywhere",
    "saves",
    "the",
    "partial",
    "answer",
    "usage",
    "is",
    "spent",
    "exactly",
    "once",
    "tools",
    "run",
    "between",
    "model",
    "calls",
    "retries",
    "back",
    "off",
    "with",
    "jitter",
    "quiet",
    "rivers",
    "carry",
    "bright",
    "small",
    "lanterns",
    "toward",
    "morning",
    "light",
];

/// The `demo` provider. Cheap to build; one per demo model.
#[derive(Clone, Debug)]
pub struct DemoProvider {
    options: DemoOptions,
}

impl DemoProvider {
    /// A demo provider answering as `options` say.
    pub fn new(options: DemoOptions) -> Self {
        DemoProvider { options }
    }

    /// Its options.
    pub fn options(&self) -> &DemoOptions {
        &self.options
    }
}

#[async_trait]
impl Provider for DemoProvider {
    fn kind(&self) -> &str {
        "demo"
    }

    /// Streams `tokens` words (each `"<word> "`), then `Usage` and `Finish("stop")`.
    ///
    /// Waits `first_token_delay` before the first token and `token_delay` between
    /// tokens. When `cancel` fires, or the stream is dropped, it stops at once: the
    /// stream just ends, without usage or finish.
    ///
    /// # Errors
    /// With [`DemoBehavior::FailBeforeStream`]: kind `Http`, status 500,
    /// "demo: failure before stream". [`DemoBehavior::FailMidStream`] yields an `Upstream`
    /// error "demo: failure mid-stream" after half of the tokens, then ends.
    async fn stream(
        &self,
        request: ModelRequest,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let o = &self.options;
        if o.behavior == DemoBehavior::FailBeforeStream {
            return Err(ProviderError {
                kind: ProviderErrorKind::Http,
                status: Some(500),
                message: "demo: failure before stream".to_owned(),
                ..Default::default()
            });
        }
        let chars: usize = request
            .messages
            .iter()
            .map(|m| m.text.chars().count())
            .sum();
        if o.behavior == DemoBehavior::Tools {
            return Ok(self.tools_turn(&request, chars, cancel));
        }
        let reasoning_tokens = if o.behavior == DemoBehavior::Reasoning {
            o.tokens / 4
        } else {
            0
        };
        let run = Run {
            rng: seed(&request),
            emitted: 0,
            tokens: o.tokens,
            reasoning_tokens,
            behavior: o.behavior,
            first_delay: o.first_token_delay,
            token_delay: o.token_delay,
            pace: None,
            cancel,
            phase: Phase::Tokens,
            usage: UsageRecord {
                call_index: request.call_index,
                model: request.model,
                provider: "demo".to_owned(),
                input_tokens: chars.div_ceil(4) as u64,
                output_tokens: u64::from(o.tokens),
                reasoning_tokens: u64::from(reasoning_tokens),
                ..UsageRecord::default()
            },
        };
        Ok(futures::stream::unfold(run, Run::next).boxed())
    }
}

impl DemoProvider {
    /// One turn of [`DemoBehavior::Tools`]: a `calculator` call split into three
    /// argument fragments, or, when the history ends with the call's result, the answer.
    fn tools_turn(
        &self,
        request: &ModelRequest,
        chars: usize,
        cancel: CancellationToken,
    ) -> ProviderStream {
        let result = request
            .messages
            .last()
            .filter(|m| m.role == Role::Assistant)
            .and_then(|m| m.tool_calls.iter().find(|c| c.name == "calculator"))
            .and_then(|c| c.output.clone());
        let mut rng = seed(request);
        let mut items: Vec<Item> = Vec::new();
        let finish = match result {
            Some(output) => {
                for word in format!("The answer is {output}.").split_inclusive(' ') {
                    items.push(Ok(ProviderEvent::Text(word.to_owned())));
                }
                "stop"
            }
            None => {
                let a = 2 + splitmix64(&mut rng) % 98;
                let b = 2 + splitmix64(&mut rng) % 98;
                let id = format!("call_demo_{:08x}", splitmix64(&mut rng) as u32);
                let fragments = [
                    "{\"expression\": \"".to_owned(),
                    format!("{a} * {b}"),
                    "\"}".to_owned(),
                ];
                for (i, args) in fragments.into_iter().enumerate() {
                    items.push(Ok(ProviderEvent::ToolCall {
                        index: 0,
                        id: (i == 0).then(|| id.clone()),
                        name: (i == 0).then(|| "calculator".to_owned()),
                        args,
                    }));
                }
                "tool_calls"
            }
        };
        let output_tokens = items.len() as u64;
        items.push(Ok(ProviderEvent::Usage(UsageRecord {
            call_index: request.call_index,
            model: request.model.clone(),
            provider: "demo".to_owned(),
            input_tokens: chars.div_ceil(4) as u64,
            output_tokens,
            ..UsageRecord::default()
        })));
        items.push(Ok(ProviderEvent::Finish(finish.to_owned())));
        let first = self.options.first_token_delay;
        let delay = self.options.token_delay;
        futures::stream::unfold((items.into_iter(), 0usize), move |(mut it, n)| {
            let cancel = cancel.clone();
            async move {
                let wait = if n == 0 { first } else { delay };
                if !wait.is_zero() {
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return None,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                if cancel.is_cancelled() {
                    return None;
                }
                it.next().map(|item| (item, (it, n + 1)))
            }
        })
        .boxed()
    }
}

/// FNV-1a (64-bit) offset basis and prime.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// A stable hash of the request's messages (role and text, with a separator so that
/// `["ab","c"]` and `["a","bc"]` differ).
fn seed(request: &ModelRequest) -> u64 {
    request.messages.iter().fold(FNV_OFFSET, |h, m| {
        let role: &[u8] = match m.role {
            Role::User => b"u",
            Role::Assistant => b"a",
            Role::Tool => b"t",
        };
        fnv1a(fnv1a(fnv1a(h, role), m.text.as_bytes()), &[0xff])
    })
}

/// SplitMix64: a tiny generator that is good from any seed, zero included.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Tokens,
    Usage,
    Finish,
    Done,
}

/// The state of one demo stream.
struct Run {
    rng: u64,
    emitted: u32,
    tokens: u32,
    reasoning_tokens: u32,
    behavior: DemoBehavior,
    first_delay: Duration,
    token_delay: Duration,
    /// The token clock, from the second token on: it ticks every `token_delay` whatever
    /// each token costs downstream, so the rate is fixed (a sleep per token would add
    /// that cost, and the timer's granularity, to every gap).
    pace: Option<tokio::time::Interval>,
    cancel: CancellationToken,
    phase: Phase,
    usage: UsageRecord,
}

type Item = Result<ProviderEvent, ProviderError>;

impl Run {
    /// The next item of the stream, for `futures::stream::unfold`.
    async fn next(mut self) -> Option<(Item, Run)> {
        if self.cancel.is_cancelled() {
            return None;
        }
        if self.phase == Phase::Tokens {
            if self.behavior == DemoBehavior::FailMidStream && self.emitted == self.tokens / 2 {
                self.phase = Phase::Done;
                let error =
                    ProviderError::new(ProviderErrorKind::Upstream, "demo: failure mid-stream");
                return Some((Err(error), self));
            }
            if self.behavior == DemoBehavior::Stall
                && self.emitted == self.tokens.min(STALL_AFTER_TOKENS)
            {
                self.cancel.cancelled().await;
                return None;
            }
            if self.emitted < self.tokens {
                let go = if self.emitted == 0 {
                    self.wait(self.first_delay).await
                } else {
                    self.tick().await
                };
                if !go {
                    return None;
                }
                let word = WORDS[(splitmix64(&mut self.rng) % WORDS.len() as u64) as usize];
                let token = format!("{word} ");
                self.emitted += 1;
                let event = if self.emitted <= self.reasoning_tokens {
                    ProviderEvent::Reasoning(token)
                } else {
                    ProviderEvent::Text(token)
                };
                return Some((Ok(event), self));
            }
            self.phase = Phase::Usage;
        }
        match self.phase {
            Phase::Usage => {
                self.phase = Phase::Finish;
                let usage = ProviderEvent::Usage(self.usage.clone());
                Some((Ok(usage), self))
            }
            Phase::Finish => {
                self.phase = Phase::Done;
                Some((Ok(ProviderEvent::Finish("stop".to_owned())), self))
            }
            Phase::Tokens | Phase::Done => None,
        }
    }

    /// Waits for the token clock's next tick; false when cancelled first.
    async fn tick(&mut self) -> bool {
        let delay = self.token_delay;
        if delay.is_zero() {
            return true;
        }
        let Run { pace, cancel, .. } = self;
        let pace = pace.get_or_insert_with(|| {
            tokio::time::interval_at(tokio::time::Instant::now() + delay, delay)
        });
        unless_cancelled(cancel, async {
            pace.tick().await;
        })
        .await
    }

    /// Sleeps `delay`; false when cancelled first.
    async fn wait(&self, delay: Duration) -> bool {
        delay.is_zero() || unless_cancelled(&self.cancel, tokio::time::sleep(delay)).await
    }
}

/// Awaits `wait` unless `cancel` fires first; false when it did.
async fn unless_cancelled(cancel: &CancellationToken, wait: impl Future<Output = ()>) -> bool {
    tokio::select! {
        biased;
        () = cancel.cancelled() => false,
        () = wait => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use genstream_engine::provider::ChatMessage;
    use tokio::time::Instant;

    fn request(text: &str) -> ModelRequest {
        ModelRequest {
            model: "demo-model".into(),
            system_prompt: None,
            messages: vec![ChatMessage {
                role: Role::User,
                text: text.into(),
                tool_calls: vec![],
                tool_call_id: None,
                reasoning: vec![],
            }],
            tools: vec![],
            call_index: 2,
        }
    }

    fn provider(tokens: u32, behavior: DemoBehavior) -> DemoProvider {
        DemoProvider::new(DemoOptions {
            tokens,
            token_delay: Duration::ZERO,
            first_token_delay: Duration::ZERO,
            behavior,
        })
    }

    async fn collect(p: &DemoProvider, text: &str) -> Vec<Item> {
        let stream = p
            .stream(request(text), CancellationToken::new())
            .await
            .unwrap();
        stream.collect().await
    }

    fn texts(items: &[Item]) -> String {
        items
            .iter()
            .filter_map(|i| match i {
                Ok(ProviderEvent::Text(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn same_request_same_bytes() {
        let p = provider(50, DemoBehavior::Text);
        let a = collect(&p, "hello").await;
        let b = collect(&p, "hello").await;
        assert_eq!(a.len(), 52);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let c = collect(&p, "hello!").await;
        assert_ne!(texts(&a), texts(&c));
    }

    #[test]
    fn seed_is_stable() {
        // Pinned, so that a change of the hash (which would change every demo answer
        // and the recorded expectations of other tests) is deliberate.
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(seed(&request("ab")), seed(&request("ba")));
    }

    #[tokio::test]
    async fn text_then_usage_then_finish() {
        let p = provider(8, DemoBehavior::Text);
        let items = collect(&p, "12345").await;
        assert_eq!(items.len(), 10);
        let text = texts(&items);
        assert_eq!(text.split(' ').filter(|w| !w.is_empty()).count(), 8);
        assert!(text.ends_with(' '));
        assert!(text.split_whitespace().all(|w| WORDS.contains(&w)));
        let Ok(ProviderEvent::Usage(u)) = &items[8] else {
            panic!("{:?}", items[8])
        };
        assert_eq!(
            u,
            &UsageRecord {
                call_index: 2,
                model: "demo-model".into(),
                provider: "demo".into(),
                input_tokens: 2,
                output_tokens: 8,
                ..UsageRecord::default()
            }
        );
        assert_eq!(
            items[9].as_ref().unwrap(),
            &ProviderEvent::Finish("stop".into())
        );
    }

    #[tokio::test]
    async fn reasoning_first_quarter() {
        let p = provider(10, DemoBehavior::Reasoning);
        let items = collect(&p, "x").await;
        let kinds: Vec<char> = items
            .iter()
            .map(|i| match i {
                Ok(ProviderEvent::Reasoning(_)) => 'r',
                Ok(ProviderEvent::Text(_)) => 't',
                Ok(ProviderEvent::Usage(u)) => {
                    assert_eq!((u.output_tokens, u.reasoning_tokens), (10, 2));
                    'u'
                }
                Ok(ProviderEvent::Finish(_)) => 'f',
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds.iter().collect::<String>(), "rrttttttttuf");
    }

    #[tokio::test]
    async fn fails_before_stream() {
        let p = provider(10, DemoBehavior::FailBeforeStream);
        let Err(e) = p.stream(request("x"), CancellationToken::new()).await else {
            panic!("expected an error")
        };
        assert_eq!((e.kind, e.status), (ProviderErrorKind::Http, Some(500)));
        assert_eq!(e.message, "demo: failure before stream");
    }

    #[tokio::test]
    async fn fails_mid_stream() {
        let p = provider(10, DemoBehavior::FailMidStream);
        let items = collect(&p, "x").await;
        assert_eq!(items.len(), 6);
        assert!(
            items[..5]
                .iter()
                .all(|i| matches!(i, Ok(ProviderEvent::Text(_))))
        );
        let Err(e) = &items[5] else { panic!() };
        assert_eq!(e.kind, ProviderErrorKind::Upstream);
        assert_eq!(e.message, "demo: failure mid-stream");
    }

    #[tokio::test(start_paused = true)]
    async fn delays_use_tokio_time() {
        let p = DemoProvider::new(DemoOptions {
            tokens: 5,
            token_delay: Duration::from_millis(20),
            first_token_delay: Duration::from_secs(1),
            behavior: DemoBehavior::Text,
        });
        let start = Instant::now();
        let mut s = p
            .stream(request("x"), CancellationToken::new())
            .await
            .unwrap();
        s.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        s.next().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1020));
        let rest: Vec<_> = s.collect().await;
        assert_eq!(rest.len(), 5);
        assert_eq!(start.elapsed(), Duration::from_millis(1080));
    }

    #[tokio::test(start_paused = true)]
    async fn stall_pends_until_cancelled() {
        let p = provider(100, DemoBehavior::Stall);
        let cancel = CancellationToken::new();
        let mut s = p.stream(request("x"), cancel.clone()).await.unwrap();
        for _ in 0..STALL_AFTER_TOKENS {
            assert!(matches!(s.next().await, Some(Ok(ProviderEvent::Text(_)))));
        }
        let waited = tokio::time::timeout(Duration::from_secs(3600), s.next()).await;
        assert!(waited.is_err(), "should still be pending: {waited:?}");
        cancel.cancel();
        assert!(s.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_cuts_a_wait_short() {
        let p = DemoProvider::new(DemoOptions {
            token_delay: Duration::from_secs(60),
            ..DemoOptions::default()
        });
        let cancel = CancellationToken::new();
        let mut s = p.stream(request("x"), cancel.clone()).await.unwrap();
        s.next().await.unwrap().unwrap();
        let start = Instant::now();
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            canceller.cancel();
        });
        assert!(s.next().await.is_none());
        assert_eq!(start.elapsed(), Duration::from_millis(5));
    }
}
