//! Suite cases for the usage ledger, balances and the usage report.

use super::*;

/// Every token type, in a fixed order.
pub const TOKEN_TYPES: [TokenType; 5] = [
    TokenType::Input,
    TokenType::Output,
    TokenType::Reasoning,
    TokenType::CacheWrite,
    TokenType::CacheRead,
];

/// The ledger line of model call `call_index` and token type `t`, with tokens and rate
/// that differ for every `(call_index, t)`, so any wrong sum shows.
pub fn line(call_index: u32, t: TokenType) -> Line {
    let ti = TOKEN_TYPES.iter().position(|x| *x == t).unwrap_or(0) as u64;
    let tokens = 100 * u64::from(call_index + 1) + ti;
    let rate_micro = 3 + 2 * ti as i64;
    Line {
        call_index,
        token_type: t,
        tokens,
        rate_micro,
        amount_micro: tokens as i64 * rate_micro,
        estimated: ti == 4,
    }
}

/// Every token type's [`line`] of each of `calls`.
pub fn lines_of(calls: std::ops::Range<u32>) -> Vec<Line> {
    calls
        .flat_map(|c| TOKEN_TYPES.iter().map(move |t| line(c, *t)))
        .collect()
}

/// The sum of the lines' amounts.
pub fn total(lines: &[Line]) -> i64 {
    lines.iter().map(|l| l.amount_micro).sum()
}

/// A spend of `lines` on `stream_id` by `user_id` in `conversation_id`.
pub fn spend_request(
    user_id: &str,
    conversation_id: &str,
    stream_id: &str,
    context: SpendContext,
    lines: Vec<Line>,
    created_at: &str,
) -> SpendRequest {
    SpendRequest {
        user_id: user_id.to_string(),
        conversation_id: conversation_id.to_string(),
        stream_id: stream_id.to_string(),
        message_id: format!("msg-of-{stream_id}"),
        model: "gpt-4o".to_string(),
        context,
        lines,
        created_at: created_at.to_string(),
    }
}

/// Runs `spend` on `db` for each request concurrently, each in its own task; the
/// outcomes in no particular order.
async fn spend_concurrently(
    db: &Db,
    requests: Vec<SpendRequest>,
) -> Result<Vec<SpendOutcome>, EngineError> {
    let mut tasks = tokio::task::JoinSet::new();
    for req in requests {
        let db = db.clone();
        tasks.spawn(async move { db.spend(&req).await });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        outcomes
            .push(joined.map_err(|e| EngineError::Internal(format!("task failed: {e}").into()))??);
    }
    Ok(outcomes)
}

const T0: &str = "2025-01-01T00:00:00.000Z";
const T1: &str = "2025-01-01T00:00:01.000Z";
const T2: &str = "2025-01-01T00:00:02.000Z";

/// A spend records every line, charges their sum, stamps the balance's `updated_at`,
/// and reports what it did; lines priced at 0 are recorded too; a second stream of the
/// same user is charged on top.
pub async fn spend_records_lines_and_charges_the_balance(db: Db) -> Result<(), EngineError> {
    let start = 1_000_000_000;
    let created = db.ensure_balance("alice", start, T0).await?;
    assert_eq!(created.balance_micro, start);

    let mut lines = lines_of(0..2);
    let free = Line {
        rate_micro: 0,
        amount_micro: 0,
        ..line(2, TokenType::Input)
    };
    lines.push(free);
    let sum = total(&lines);
    let out = db
        .spend(&spend_request(
            "alice",
            "c1",
            "s1",
            SpendContext::Message,
            lines.clone(),
            T1,
        ))
        .await?;
    assert_eq!(
        out,
        SpendOutcome {
            inserted: 11,
            amount_micro: sum,
            balance_micro: Some(start - sum),
        }
    );
    assert_eq!(
        db.balance("alice").await?,
        Some(Balance {
            user_id: "alice".to_string(),
            balance_micro: start - sum,
            refilled_at: Some(T0.to_string()),
            updated_at: T1.to_string(),
        })
    );
    assert_eq!(db.spent_on_stream("s1").await?, sum);
    assert_eq!(db.spent_on_stream("never").await?, 0);

    let other = lines_of(0..1);
    let out = db
        .spend(&spend_request(
            "alice",
            "c1",
            "s2",
            SpendContext::Message,
            other.clone(),
            T2,
        ))
        .await?;
    assert_eq!(out.inserted, 5);
    assert_eq!(out.balance_micro, Some(start - sum - total(&other)));
    assert_eq!(db.spent_on_stream("s1").await?, sum);
    assert_eq!(db.spent_on_stream("s2").await?, total(&other));

    // Nothing to spend: nothing changes, and the balance is still reported.
    let out = db
        .spend(&spend_request(
            "alice",
            "c1",
            "s3",
            SpendContext::Error,
            Vec::new(),
            T2,
        ))
        .await?;
    assert_eq!(
        out,
        SpendOutcome {
            inserted: 0,
            amount_micro: 0,
            balance_micro: Some(start - sum - total(&other)),
        }
    );
    Ok(())
}

/// The same request spent again charges nothing; an abort after completion (or the
/// other way round) spending lines of the same calls charges only the lines that were
/// not yet recorded, whatever their context; a request repeating a line charges it
/// once.
pub async fn spend_again_charges_nothing_more(db: Db) -> Result<(), EngineError> {
    let start = 1_000_000;
    db.ensure_balance("alice", start, T0).await?;
    let first = lines_of(0..2);
    let req = spend_request("alice", "c1", "s1", SpendContext::Abort, first.clone(), T1);
    let out = db.spend(&req).await?;
    assert_eq!(out.amount_micro, total(&first));
    let after_first = start - total(&first);

    let again = db.spend(&req).await?;
    assert_eq!(
        again,
        SpendOutcome {
            inserted: 0,
            amount_micro: 0,
            balance_micro: Some(after_first),
        }
    );
    // The completion arrives late with every call, the aborted ones included.
    let all = lines_of(0..3);
    let out = db
        .spend(&spend_request(
            "alice",
            "c1",
            "s1",
            SpendContext::Message,
            all.clone(),
            T2,
        ))
        .await?;
    let new = lines_of(2..3);
    assert_eq!(
        out,
        SpendOutcome {
            inserted: new.len(),
            amount_micro: total(&new),
            balance_micro: Some(after_first - total(&new)),
        }
    );
    assert_eq!(db.spent_on_stream("s1").await?, total(&all));

    // One request listing a line twice.
    let twice = vec![line(0, TokenType::Input), line(0, TokenType::Input)];
    let out = db
        .spend(&spend_request(
            "alice",
            "c1",
            "s2",
            SpendContext::Message,
            twice,
            T2,
        ))
        .await?;
    assert_eq!(out.inserted, 1);
    assert_eq!(out.amount_micro, line(0, TokenType::Input).amount_micro);
    assert_eq!(
        db.balance("alice").await?.map(|b| b.balance_micro),
        Some(start - total(&all) - line(0, TokenType::Input).amount_micro)
    );
    Ok(())
}

/// Twenty-five concurrent spends — the full set of a stream's lines, the same in
/// reverse order, and overlapping subsets (an abort and a completion spending lines of
/// the same calls), plus another stream of the same user — charge each distinct line
/// exactly once: the inserted counts and amounts add up to the distinct lines, the
/// balance drops by exactly their sum, and `spent_on_stream` equals it.
pub async fn concurrent_spends_charge_each_line_once(db: Db) -> Result<(), EngineError> {
    let start = 1_000_000_000_000;
    db.ensure_balance("alice", start, T0).await?;
    let all = lines_of(0..4);
    let mut requests = Vec::new();
    for i in 0..20 {
        let (context, lines) = match i % 4 {
            0 => (SpendContext::Message, all.clone()),
            1 => (SpendContext::Abort, all.iter().rev().cloned().collect()),
            // An abort that saw only the first two calls, input and output.
            2 => (
                SpendContext::Abort,
                all.iter()
                    .filter(|l| l.call_index < 2)
                    .filter(|l| matches!(l.token_type, TokenType::Input | TokenType::Output))
                    .cloned()
                    .collect(),
            ),
            // A reaper that saw the last two calls, in reverse.
            _ => (
                SpendContext::ReplicaLost,
                all.iter()
                    .rev()
                    .filter(|l| l.call_index >= 2)
                    .cloned()
                    .collect(),
            ),
        };
        requests.push(spend_request("alice", "c1", "s1", context, lines, T1));
    }
    let other = lines_of(0..2);
    for _ in 0..5 {
        requests.push(spend_request(
            "alice",
            "c2",
            "s2",
            SpendContext::Error,
            other.clone(),
            T2,
        ));
    }
    let outcomes = spend_concurrently(&db, requests).await?;
    let inserted: usize = outcomes.iter().map(|o| o.inserted).sum();
    let charged: i64 = outcomes.iter().map(|o| o.amount_micro).sum();
    assert_eq!(inserted, all.len() + other.len());
    assert_eq!(charged, total(&all) + total(&other));
    for o in &outcomes {
        assert!(o.balance_micro.is_some(), "{o:?}");
    }
    assert_eq!(db.spent_on_stream("s1").await?, total(&all));
    assert_eq!(db.spent_on_stream("s2").await?, total(&other));
    assert_eq!(
        db.balance("alice").await?.map(|b| b.balance_micro),
        Some(start - total(&all) - total(&other))
    );
    // Every call of s1 is counted once in the report.
    let report = db.usage_report("alice", None, 10).await?;
    let s1 = report.iter().find(|r| r.key == "c1");
    assert_eq!(
        s1.map(|r| (r.calls, r.amount_micro)),
        Some((4, total(&all)))
    );
    Ok(())
}

/// A user without a balance row still has their lines recorded (and reported), but no
/// balance appears.
pub async fn spend_without_balance_row_records_lines(db: Db) -> Result<(), EngineError> {
    let lines = lines_of(0..1);
    let out = db
        .spend(&spend_request(
            "nobal",
            "c1",
            "s1",
            SpendContext::Message,
            lines.clone(),
            T1,
        ))
        .await?;
    assert_eq!(
        out,
        SpendOutcome {
            inserted: lines.len(),
            amount_micro: total(&lines),
            balance_micro: None,
        }
    );
    assert_eq!(db.balance("nobal").await?, None);
    assert_eq!(db.spent_on_stream("s1").await?, total(&lines));
    let report = db.usage_report("nobal", None, 10).await?;
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].amount_micro, total(&lines));
    Ok(())
}

/// `ensure_balance` creates the row once: later calls, with another start or time,
/// return it unchanged; concurrent first calls agree on one row.
pub async fn ensure_balance_is_idempotent(db: Db) -> Result<(), EngineError> {
    let want = Balance {
        user_id: "alice".to_string(),
        balance_micro: 5_000_000,
        refilled_at: Some(T0.to_string()),
        updated_at: T0.to_string(),
    };
    assert_eq!(db.ensure_balance("alice", 5_000_000, T0).await?, want);
    assert_eq!(db.ensure_balance("alice", 9, T1).await?, want);
    assert_eq!(db.balance("alice").await?, Some(want));
    assert_eq!(db.balance("bob").await?, None);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10i64 {
        let db = db.clone();
        tasks.spawn(async move { db.ensure_balance("carol", 1000 + i, T1).await });
    }
    let mut seen = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let b = joined.map_err(|e| EngineError::Internal(format!("task failed: {e}").into()))??;
        seen.insert(b.balance_micro);
    }
    assert_eq!(seen.len(), 1, "callers disagree: {seen:?}");
    assert_eq!(
        db.balance("carol").await?.map(|b| b.balance_micro),
        seen.first().copied()
    );
    Ok(())
}

/// `add_credits` gives a new user the start balance (refilled now, as
/// `ensure_balance` would) and adds to it, ignores the start for an existing row, takes
/// negative amounts, refuses to overflow, and concurrent grants all count.
pub async fn add_credits_creates_and_adds(db: Db) -> Result<(), EngineError> {
    assert_eq!(db.add_credits("alice", 700, 5000, T0).await?, 5700);
    assert_eq!(
        db.balance("alice").await?,
        Some(Balance {
            user_id: "alice".to_string(),
            balance_micro: 5700,
            refilled_at: Some(T0.to_string()),
            updated_at: T0.to_string(),
        })
    );
    // The row exists: the start is not given again.
    assert_eq!(db.add_credits("alice", -6000, 5000, T1).await?, -300);
    let b = db.balance("alice").await?;
    assert_eq!(b.as_ref().map(|b| b.balance_micro), Some(-300));
    assert_eq!(
        b.map(|b| (b.refilled_at, b.updated_at)),
        Some((Some(T0.to_string()), T1.to_string()))
    );

    db.ensure_balance("bob", 10, T0).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let db = db.clone();
        tasks.spawn(async move { db.add_credits("bob", 7, 1_000_000, T1).await });
    }
    let mut results = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        results.insert(
            joined.map_err(|e| EngineError::Internal(format!("task failed: {e}").into()))??,
        );
    }
    // Each grant saw a different balance, the last one all ten.
    assert_eq!(results, (1..=10).map(|n| 10 + 7 * n).collect());
    assert_eq!(db.balance("bob").await?.map(|b| b.balance_micro), Some(80));
    // Integers only: an overflow is an error, never a rounded (floating point) value.
    assert_eq!(db.add_credits("max", i64::MAX - 1, 1, T0).await?, i64::MAX);
    let err = db.add_credits("max", 1, 0, T1).await;
    assert!(matches!(err, Err(EngineError::Persistence(_))), "{err:?}");
    assert_eq!(
        db.balance("max")
            .await?
            .map(|b| (b.balance_micro, b.updated_at)),
        Some((i64::MAX, T0.to_string()))
    );
    // Spending still works on a row made by add_credits.
    let out = db
        .spend(&spend_request(
            "alice",
            "c",
            "s",
            SpendContext::Message,
            lines_of(0..1),
            T2,
        ))
        .await?;
    assert_eq!(out.balance_micro, Some(-300 - total(&lines_of(0..1))));
    Ok(())
}

/// `refill_if_due` refills only when the last refill is at or before `due_before`:
/// ten concurrent due calls refill once and all report the refilled balance; it is not
/// due again until `due_before` reaches the new `refilled_at`; a row never refilled is
/// due; no row is created for a user without one.
pub async fn refill_if_due_refills_once(db: Db) -> Result<(), EngineError> {
    const DAY1: &str = "2025-01-02T00:00:00.000Z";
    const DAY1_NOON: &str = "2025-01-02T12:00:00.000Z";
    const DAY2: &str = "2025-01-03T00:00:00.000Z";
    assert_eq!(db.refill_if_due("nobody", 50, DAY1, DAY1).await?, None);
    assert_eq!(db.balance("nobody").await?, None);

    db.ensure_balance("alice", 100, T0).await?;
    // Refilled at T0, which is after this due_before: not due.
    assert_eq!(
        db.refill_if_due("alice", 50, "2024-12-31T23:59:59.999Z", DAY1)
            .await?,
        Some(100)
    );
    // Ten replicas at once, due exactly at the boundary (at or before).
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let db = db.clone();
        tasks.spawn(async move { db.refill_if_due("alice", 50, T0, DAY1).await });
    }
    while let Some(joined) = tasks.join_next().await {
        let after =
            joined.map_err(|e| EngineError::Internal(format!("task failed: {e}").into()))??;
        assert_eq!(after, Some(150));
    }
    assert_eq!(
        db.balance("alice").await?,
        Some(Balance {
            user_id: "alice".to_string(),
            balance_micro: 150,
            refilled_at: Some(DAY1.to_string()),
            updated_at: DAY1.to_string(),
        })
    );
    // Half a day later, with a one-day interval: due_before = T0 + 12 h < DAY1.
    assert_eq!(
        db.refill_if_due("alice", 50, "2025-01-01T12:00:00.000Z", DAY1_NOON)
            .await?,
        Some(150)
    );
    // A day after the refill it is due again.
    assert_eq!(db.refill_if_due("alice", 50, DAY1, DAY2).await?, Some(200));
    assert_eq!(
        db.balance("alice").await?.and_then(|b| b.refilled_at),
        Some(DAY2.to_string())
    );

    // A row made by add_credits counts as refilled when it was made: not due before
    // a whole interval has passed, then due once.
    db.add_credits("bob", 5, 0, T1).await?;
    assert_eq!(db.refill_if_due("bob", 50, T0, T2).await?, Some(5));
    assert_eq!(db.refill_if_due("bob", 50, T1, T2).await?, Some(55));
    assert_eq!(db.refill_if_due("bob", 50, T1, T2).await?, Some(55));
    Ok(())
}

/// Usage by conversation (latest charged first, ties by id descending), by UTC day and
/// by month (latest first, keys as RFC 3339 period starts): tokens summed per type,
/// amounts summed, calls counted once per `(stream, call)`; only the user's own lines;
/// `limit` honoured; an unknown period refused.
pub async fn usage_report_groups_per_user(db: Db) -> Result<(), EngineError> {
    let spend = |user: &str, conv: &str, stream: &str, lines: Vec<Line>, at: &str| {
        spend_request(user, conv, stream, SpendContext::Message, lines, at)
    };
    // c1: s1 (calls 0, 1) on Jan 1 and s2 (call 0, input and output) on Jan 2.
    let s1 = lines_of(0..2);
    let s2 = vec![line(0, TokenType::Input), line(0, TokenType::Output)];
    // c2: s3 (call 0) late on Jan 2; cA: s4 on Feb 1 at the same instant as cB's s5.
    let s3 = lines_of(0..1);
    let s4 = vec![line(3, TokenType::CacheRead)];
    let s5 = vec![line(1, TokenType::Reasoning)];
    let requests = [
        spend("alice", "c1", "s1", s1.clone(), "2025-01-01T10:00:00.000Z"),
        spend("alice", "c1", "s2", s2.clone(), "2025-01-02T09:00:00.000Z"),
        spend("alice", "c2", "s3", s3.clone(), "2025-01-02T23:59:59.999Z"),
        spend("alice", "cA", "s4", s4.clone(), "2025-02-01T00:00:00.000Z"),
        spend("alice", "cB", "s5", s5.clone(), "2025-02-01T00:00:00.000Z"),
        // Bob's usage never shows in Alice's report, even in her conversation.
        spend(
            "bob",
            "c1",
            "b1",
            lines_of(0..5),
            "2025-01-01T10:00:00.000Z",
        ),
        spend(
            "alicebob",
            "c9",
            "b2",
            lines_of(0..1),
            "2025-03-01T10:00:00.000Z",
        ),
    ];
    for r in &requests {
        db.spend(r).await?;
    }
    let row = |key: &str, sets: &[&[Line]], calls: i64| {
        let mut r = UsageRow {
            key: key.to_string(),
            input_tokens: 0,
            output_tokens: 0,
            reasoning_tokens: 0,
            cache_write_tokens: 0,
            cache_read_tokens: 0,
            amount_micro: 0,
            calls,
        };
        for l in sets.iter().flat_map(|s| s.iter()) {
            let tokens = l.tokens as i64;
            match l.token_type {
                TokenType::Input => r.input_tokens += tokens,
                TokenType::Output => r.output_tokens += tokens,
                TokenType::Reasoning => r.reasoning_tokens += tokens,
                TokenType::CacheWrite => r.cache_write_tokens += tokens,
                TokenType::CacheRead => r.cache_read_tokens += tokens,
            }
            r.amount_micro += l.amount_micro;
        }
        r
    };

    let by_conversation = db.usage_report("alice", None, 100).await?;
    assert_eq!(
        by_conversation,
        vec![
            row("cB", &[&s5], 1),
            row("cA", &[&s4], 1),
            row("c2", &[&s3], 1),
            row("c1", &[&s1, &s2], 3),
        ]
    );
    let by_day = db.usage_report("alice", Some("day"), 100).await?;
    assert_eq!(
        by_day,
        vec![
            row("2025-02-01T00:00:00.000Z", &[&s4, &s5], 2),
            row("2025-01-02T00:00:00.000Z", &[&s2, &s3], 2),
            row("2025-01-01T00:00:00.000Z", &[&s1], 2),
        ]
    );
    let by_month = db.usage_report("alice", Some("month"), 100).await?;
    assert_eq!(
        by_month,
        vec![
            row("2025-02-01T00:00:00.000Z", &[&s4, &s5], 2),
            row("2025-01-01T00:00:00.000Z", &[&s1, &s2, &s3], 4),
        ]
    );
    assert_eq!(
        db.usage_report("alice", None, 2).await?,
        by_conversation[..2].to_vec()
    );
    assert_eq!(
        db.usage_report("alice", Some("day"), 1).await?,
        by_day[..1].to_vec()
    );
    assert_eq!(db.usage_report("alice", None, 0).await?, Vec::new());
    assert_eq!(
        db.usage_report("bob", None, 100).await?,
        vec![row("c1", &[&lines_of(0..5)], 5)]
    );
    assert_eq!(
        db.usage_report("nobody", Some("month"), 100).await?,
        Vec::new()
    );
    let err = db.usage_report("alice", Some("week"), 10).await;
    assert!(
        matches!(err, Err(EngineError::BadRequest { ref field, .. }) if field == "by"),
        "{err:?}"
    );
    Ok(())
}
