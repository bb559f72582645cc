//! Pricing usage into ledger lines (docs/protocol.md §7).
//!
//! A usage record becomes one line per token type — `input`, `output`, `reasoning`,
//! `cache_write`, `cache_read` — each priced at its model's rate. Amounts are exact
//! integers: a rate is kept in micro-USD per million tokens, so `tokens × rate` is an
//! amount in micro-credits (1 credit = 1e-6 USD, so 1 micro-credit = 1e-12 USD) with no
//! rounding anywhere, and sums over any number of lines, replicas and databases agree to
//! the unit. The API shows credits (micro-credits / 1e6).
//!
//! Cached tokens (LibreChat #12868): OpenAI's `prompt_tokens` already include cached
//! tokens, so billable input is `input − cache_read − cache_write`; Anthropic's
//! `input_tokens` exclude them, so the three add up. The record says which
//! (`inputIncludesCache`). Reasoning tokens (LibreChat #13014) are part of the output
//! and billed at the output rate, unless the model prices them separately
//! (`reasoning_per_mtok`), in which case they leave the output line for their own.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::EngineError;
use crate::ledger::{Line, TokenType};
use crate::persist::Persistence;
use crate::usage::UsageRecord;

/// Micro-credits per credit.
pub const MICRO: i64 = 1_000_000;

/// A model's prices, in USD per million tokens (config `[models.pricing]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    #[serde(default)]
    pub cache_write_per_mtok: f64,
    #[serde(default)]
    pub cache_read_per_mtok: f64,
    /// When set, reasoning tokens are billed at this rate instead of the output rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_per_mtok: Option<f64>,
}

/// A rate in micro-USD per million tokens (= micro-credits per token), rounded to
/// the nearest micro-USD; USD prices with more than six decimals are not a thing.
pub fn rate_micro(usd_per_mtok: f64) -> i64 {
    (usd_per_mtok * 1e6).round() as i64
}

/// The token counts of a record, by type, as billed.
pub fn billable(u: &UsageRecord, separate_reasoning: bool) -> Vec<(TokenType, u64)> {
    let input = if u.input_includes_cache {
        u.input_tokens
            .saturating_sub(u.cache_read_tokens)
            .saturating_sub(u.cache_write_tokens)
    } else {
        u.input_tokens
    };
    let reasoning = u.reasoning_tokens.min(u.output_tokens);
    let output = if separate_reasoning {
        u.output_tokens - reasoning
    } else {
        u.output_tokens
    };
    let mut v = vec![(TokenType::Input, input), (TokenType::Output, output)];
    if separate_reasoning {
        v.push((TokenType::Reasoning, reasoning));
    }
    v.push((TokenType::CacheWrite, u.cache_write_tokens));
    v.push((TokenType::CacheRead, u.cache_read_tokens));
    v
}

/// The ledger lines of one usage record under `pricing` (zero-token lines omitted; a
/// model without pricing yields lines at rate 0, so usage is still recorded).
pub fn price(u: &UsageRecord, pricing: Option<&Pricing>) -> Vec<Line> {
    let p = pricing.copied().unwrap_or_default();
    let separate = p.reasoning_per_mtok.is_some();
    billable(u, separate)
        .into_iter()
        .filter(|(_, tokens)| *tokens > 0)
        .map(|(t, tokens)| {
            let usd = match t {
                TokenType::Input => p.input_per_mtok,
                TokenType::Output => p.output_per_mtok,
                TokenType::Reasoning => p.reasoning_per_mtok.unwrap_or(p.output_per_mtok),
                TokenType::CacheWrite => p.cache_write_per_mtok,
                TokenType::CacheRead => p.cache_read_per_mtok,
            };
            let rate = rate_micro(usd);
            Line {
                call_index: u.call_index,
                token_type: t,
                tokens,
                rate_micro: rate,
                amount_micro: (tokens as i64).saturating_mul(rate),
                estimated: u.estimated,
            }
        })
        .collect()
}

/// Micro-credits as credits, for the API.
pub fn credits(micro: i64) -> f64 {
    micro as f64 / MICRO as f64
}

/// Balance rules (config `[balance]`): new users start with `start_micro`; every
/// `refill_interval` the balance gains `refill_micro`; a chat needs a positive balance
/// (else 402). Amounts in micro-credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalancePolicy {
    pub start_micro: i64,
    pub refill_micro: i64,
    /// `None`: no refill.
    pub refill_interval: Option<Duration>,
}

/// The user's balance now, in micro-credits: a new user's row is created with the start
/// balance, then a refill that is due is applied (a refill is due a whole
/// `refill_interval` after the last one, or after the row was made). Every path that
/// shows or judges a balance — `POST /api/chat`, `GET /api/balance`, `genstream
/// balance` — goes through here, so they agree. Both steps are atomic in the database:
/// replicas settling at once create one row and refill once.
///
/// Errors: database failures.
pub async fn settle_balance(
    db: &dyn Persistence,
    policy: &BalancePolicy,
    user_id: &str,
) -> Result<i64, EngineError> {
    let now = crate::now_rfc3339();
    let mut balance = db
        .ensure_balance(user_id, policy.start_micro, &now)
        .await?
        .balance_micro;
    if let Some(interval) = policy.refill_interval {
        let due_before = crate::rfc3339(time::OffsetDateTime::now_utc() - interval);
        if let Some(b) = db
            .refill_if_due(user_id, policy.refill_micro, &due_before, &now)
            .await?
        {
            balance = b;
        }
    }
    Ok(balance)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        input: u64,
        output: u64,
        cw: u64,
        cr: u64,
        reasoning: u64,
        includes: bool,
    ) -> UsageRecord {
        UsageRecord {
            input_tokens: input,
            output_tokens: output,
            cache_write_tokens: cw,
            cache_read_tokens: cr,
            reasoning_tokens: reasoning,
            input_includes_cache: includes,
            ..Default::default()
        }
    }

    fn sonnet() -> Pricing {
        Pricing {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
            cache_write_per_mtok: 3.75,
            cache_read_per_mtok: 0.3,
            reasoning_per_mtok: None,
        }
    }

    #[test]
    fn openai_style_input_includes_cache() {
        // 1000 prompt tokens of which 800 cached: 200 billed at input, 800 at cache read.
        let lines = price(&rec(1000, 50, 0, 800, 0, true), Some(&sonnet()));
        let by = |t| {
            lines
                .iter()
                .find(|l| l.token_type == t)
                .map(|l| (l.tokens, l.amount_micro))
        };
        assert_eq!(by(TokenType::Input), Some((200, 200 * 3_000_000)));
        assert_eq!(by(TokenType::CacheRead), Some((800, 800 * 300_000)));
        assert_eq!(by(TokenType::Output), Some((50, 50 * 15_000_000)));
    }

    #[test]
    fn anthropic_style_cache_is_additive() {
        let lines = price(&rec(1000, 50, 3068, 6289, 0, false), Some(&sonnet()));
        let total: i64 = lines.iter().map(|l| l.amount_micro).sum();
        assert_eq!(
            total,
            1000 * 3_000_000 + 50 * 15_000_000 + 3068 * 3_750_000 + 6289 * 300_000
        );
        // $0.003 + $0.00075 + $0.011505 + $0.0018867 = 17141.7 credits.
        assert!((credits(total) - 17_141.7).abs() < 1e-6);
    }

    #[test]
    fn reasoning_billed_as_output_unless_priced() {
        let u = rec(10, 100, 0, 0, 64, true);
        let lines = price(&u, Some(&sonnet()));
        assert_eq!(
            lines
                .iter()
                .find(|l| l.token_type == TokenType::Output)
                .unwrap()
                .tokens,
            100
        );
        assert!(lines.iter().all(|l| l.token_type != TokenType::Reasoning));
        let mut p = sonnet();
        p.reasoning_per_mtok = Some(10.0);
        let lines = price(&u, Some(&p));
        assert_eq!(
            lines
                .iter()
                .find(|l| l.token_type == TokenType::Output)
                .unwrap()
                .tokens,
            36
        );
        let r = lines
            .iter()
            .find(|l| l.token_type == TokenType::Reasoning)
            .unwrap();
        assert_eq!((r.tokens, r.amount_micro), (64, 64 * 10_000_000));
    }

    #[test]
    fn unpriced_models_cost_zero_but_record_usage() {
        let lines = price(&rec(10, 20, 0, 0, 0, false), None);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.amount_micro == 0));
    }

    #[test]
    fn fractional_prices_are_exact() {
        // gpt-4o-mini input: $0.15 per 1M tokens → 0.15 credits per token.
        let p = Pricing {
            input_per_mtok: 0.15,
            output_per_mtok: 0.6,
            ..Default::default()
        };
        let lines = price(&rec(7, 3, 0, 0, 0, true), Some(&p));
        assert_eq!(lines[0].amount_micro, 7 * 150_000);
        assert_eq!(lines[1].amount_micro, 3 * 600_000);
    }
}
