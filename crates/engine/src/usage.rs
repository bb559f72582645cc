//! Normalized usage records (SPEC §7).
//!
//! Providers report tokens in two shapes: OpenAI's, whose `prompt_tokens` already
//! include cached tokens, and Anthropic's, whose `input_tokens` do not. A
//! [`UsageRecord`] keeps the raw counts plus `inputIncludesCache`, so billing can tell
//! the two apart without knowing the provider.

use serde::{Deserialize, Serialize};

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

static BPE: std::sync::OnceLock<Option<tiktoken_rs::CoreBPE>> = std::sync::OnceLock::new();

/// Builds the token counter's encoding (about a second of CPU). Call it on a blocking
/// thread at start-up ([`crate::manager::JobManager::new`] does): building it on a
/// runtime worker would stall every task on that runtime meanwhile.
pub fn warm_token_counter() {
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok());
}

/// Counts tokens with tiktoken's `o200k_base` encoding (GPT-4o and later), for
/// estimates when an upstream reports no usage. Never blocks: until the encoding is
/// built (see [`warm_token_counter`]), or if it cannot be, it counts 4 characters a
/// token.
pub fn count_tokens(text: &str) -> u64 {
    match BPE.get() {
        Some(Some(bpe)) => bpe.encode_ordinary(text).len() as u64,
        _ => text.chars().count().div_ceil(4) as u64,
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
