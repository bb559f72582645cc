//! The billing ledger's line: what a priced usage record becomes, and what
//! [`Persistence::spend`](crate::persist::Persistence::spend) stores.
//!
//! It sits in a module of its own because two others need it and one of them needs
//! the other: [`billing`](crate::billing) makes lines (and settles balances through
//! [`Persistence`](crate::persist::Persistence)), [`persist`](crate::persist) stores
//! them. With the line here, both depend on this module and `billing` on `persist`,
//! never the other way round.
//!
//! A line's unique key in the ledger is `(stream_id, call_index, token_type)`, so each
//! model call's tokens of one type are spent exactly once (docs/protocol.md §7). Amounts are
//! integer micro-credits (1 credit = 1e-6 USD).

use serde::{Deserialize, Serialize};

/// The kind of tokens a ledger line counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenType {
    Input,
    Output,
    Reasoning,
    CacheWrite,
    CacheRead,
}

impl TokenType {
    /// The name stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::Input => "input",
            TokenType::Output => "output",
            TokenType::Reasoning => "reasoning",
            TokenType::CacheWrite => "cache_write",
            TokenType::CacheRead => "cache_read",
        }
    }
}

/// One priced line: `tokens × rate = amount`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    /// The model call (0, 1, … within the job) whose usage this is.
    pub call_index: u32,
    pub token_type: TokenType,
    pub tokens: u64,
    /// Micro-credits per token (= micro-USD per million tokens).
    pub rate_micro: i64,
    /// `tokens × rate_micro`, in micro-credits.
    pub amount_micro: i64,
    /// The tokens were estimated (tiktoken), not reported by the upstream.
    pub estimated: bool,
}
