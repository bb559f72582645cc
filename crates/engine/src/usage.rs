//! Normalized usage records (docs/protocol.md §7).
//!
//! Providers report tokens in two shapes: OpenAI's, whose `prompt_tokens` already
//! include cached tokens, and Anthropic's, whose `input_tokens` do not. A
//! [`UsageRecord`] keeps the raw counts plus `inputIncludesCache`, so billing can tell
//! the two apart without knowing the provider.

use serde::{Deserialize, Serialize};
use tiktoken_rs::tokenizer::Tokenizer;

/// One model call's usage, as appended in a `usage` event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    /// Index of the model call within the job (0 for the first call).
    #[serde(default)]
    pub call_index: u32,
    pub model: String,
    pub provider: String,
    /// Input (prompt) tokens, as the provider counts them.
    pub input_tokens: u64,
    /// Output (completion) tokens, including reasoning tokens.
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Reasoning tokens (a subset of `output_tokens`).
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// True when `input_tokens` already counts the cache tokens (OpenAI), false when
    /// they are additive (Anthropic).
    #[serde(default)]
    pub input_includes_cache: bool,
    /// True when the upstream gave no usage and the counts are an estimate.
    #[serde(default)]
    pub estimated: bool,
}

/// Sums over all usage records of a job, in `final.usage` and the abort answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageTotals {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_write_tokens: u64,
    pub cache_read_tokens: u64,
    pub reasoning_tokens: u64,
    /// Number of model calls summed.
    pub calls: u32,
    /// Credits (1 credit = 1e-6 USD) the job's usage costs at the model's prices,
    /// spent exactly once whatever path the job ended by.
    #[serde(default)]
    pub credits: f64,
}

/// tiktoken's encoding for an upstream model id, by tiktoken's own model table
/// (`gpt-4o…` → `o200k_base`, `gpt-4…` and `gpt-3.5…` → `cl100k_base`, `gpt-oss-…` →
/// `o200k_harmony`, …); `o200k_base` for a model it does not know (Claude, Llama, the
/// demo provider, `None`), the closest to today's tokenizers.
pub fn encoding_for(upstream_model: Option<&str>) -> Tokenizer {
    upstream_model
        .and_then(tiktoken_rs::tokenizer::get_tokenizer)
        .unwrap_or(Tokenizer::O200kBase)
}

/// Builds the encodings of these upstream models in the background (about a second of
/// CPU each, on blocking threads), so that the first estimate need not wait for them.
/// Needs a tokio runtime (does nothing without one).
pub fn warm_token_counter<'a>(upstream_models: impl IntoIterator<Item = Option<&'a str>>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let wanted: std::collections::HashSet<Tokenizer> =
        upstream_models.into_iter().map(encoding_for).collect();
    for t in wanted {
        drop(rt.spawn_blocking(move || {
            let _ = tiktoken_rs::bpe_for_tokenizer(t);
        }));
    }
}

/// Builds the encodings of these upstream models (on blocking threads) and resolves
/// once they are all ready, so that no later count waits for one. The server awaits it
/// before it accepts requests.
pub async fn prepare_token_counter<'a>(upstream_models: impl IntoIterator<Item = Option<&'a str>>) {
    let wanted: std::collections::HashSet<Tokenizer> =
        upstream_models.into_iter().map(encoding_for).collect();
    futures::future::join_all(wanted.into_iter().map(|t| {
        tokio::task::spawn_blocking(move || {
            let _ = tiktoken_rs::bpe_for_tokenizer(t);
        })
    }))
    .await;
}

/// Counts the tokens of `text` as the encoding of `upstream_model` does (see
/// [`encoding_for`]), for estimates when an upstream reports no usage. It runs on a
/// blocking thread: the first count of an encoding waits there for tiktoken to build
/// it (once per process, shared with every other user of tiktoken's singletons), and a
/// long history takes a while to count. Only if tiktoken fails (its data ships inside
/// the crate, so that is a broken build) does it fall back to 4 characters a token.
pub async fn count_tokens(upstream_model: Option<&str>, text: String) -> u64 {
    let t = encoding_for(upstream_model);
    let fallback = text.chars().count().div_ceil(4) as u64;
    let counted = tokio::task::spawn_blocking(move || {
        tiktoken_rs::bpe_for_tokenizer(t).map(|bpe| bpe.encode_ordinary(&text).len() as u64)
    })
    .await;
    match counted {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            tracing::error!(encoding = ?t, error = %e, "no token encoding; guessing 4 characters a token");
            fallback
        }
        Err(e) => {
            tracing::error!(encoding = ?t, error = %e, "building a token encoding failed; guessing 4 characters a token");
            fallback
        }
    }
}

impl UsageTotals {
    /// Adds one record.
    pub fn add(&mut self, r: &UsageRecord) {
        self.input_tokens += r.input_tokens;
        self.output_tokens += r.output_tokens;
        self.cache_write_tokens += r.cache_write_tokens;
        self.cache_read_tokens += r.cache_read_tokens;
        self.reasoning_tokens += r.reasoning_tokens;
        self.calls += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_follow_the_upstream_model() {
        assert_eq!(encoding_for(Some("gpt-4o-mini")), Tokenizer::O200kBase);
        assert_eq!(encoding_for(Some("gpt-4-0613")), Tokenizer::Cl100kBase);
        assert_eq!(encoding_for(Some("gpt-3.5-turbo")), Tokenizer::Cl100kBase);
        assert_eq!(encoding_for(Some("gpt-oss-20b")), Tokenizer::O200kHarmony);
        assert_eq!(
            encoding_for(Some("claude-sonnet-4-5")),
            Tokenizer::O200kBase
        );
        assert_eq!(encoding_for(None), Tokenizer::O200kBase);
    }

    /// The very first count waits for the encoding instead of guessing 4 characters a
    /// token, and each model gets its own encoding.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_wait_for_the_models_encoding() {
        // "hello world" is 2 tokens in both encodings, 3 by the 4-characters guess.
        assert_eq!(count_tokens(None, "hello world".into()).await, 2);
        let text = "Counting 😀 emoji and ünïcödé in 2024-05-13 with tiktoken.";
        let o200k = tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(text)
            .len() as u64;
        let cl100k = tiktoken_rs::cl100k_base_singleton()
            .encode_ordinary(text)
            .len() as u64;
        assert_ne!(o200k, cl100k, "the text must tell the encodings apart");
        assert_eq!(count_tokens(Some("gpt-4o"), text.into()).await, o200k);
        assert_eq!(count_tokens(Some("gpt-4"), text.into()).await, cl100k);
        assert_eq!(
            count_tokens(Some("claude-3-haiku"), text.into()).await,
            o200k
        );
        assert_eq!(count_tokens(None, String::new()).await, 0);
    }
}
