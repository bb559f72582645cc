//! The behaviour every [`Persistence`] must have, as one test suite for all of them.
//!
//! The trait's documentation states the contract; this module states it again as
//! code. Each case is an async function that takes a fresh, empty database and either
//! returns `Ok` or panics on a failed assertion (database errors are returned with
//! `?`). [`persistence_suite!`](crate::persistence_suite) turns the list of cases
//! into one `#[tokio::test]` each for a given backend, so every backend runs every
//! case, and a case added here runs everywhere without touching the tests.
//!
//! [`MemoryPersistence`](genstream_engine::persist::MemoryPersistence) is the
//! reference: when SQL and memory disagree, the suite is what decides.
//!
//! Public only so that `tests/` can call it; not part of the crate's API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use genstream_engine::EngineError;
use genstream_engine::event::{ContentPart, Message, ToolCall};
use genstream_engine::ledger::{Line, TokenType};
use genstream_engine::persist::{
    ApiKey, Balance, Conversation, Persistence, SpendContext, SpendOutcome, SpendRequest, UsageRow,
};

/// A case's database, shared with any tasks it spawns.
pub type Db = Arc<dyn Persistence>;

/// Expands to one `#[tokio::test]` per suite case, each running
/// `$run(|db| suite::case(db)).await`, where `$run` is an async function of the
/// calling test crate that builds a fresh database, runs the case on it and cleans up:
///
/// ```ignore
/// async fn run<F, Fut>(case: F) -> Result<(), EngineError>
/// where
///     F: FnOnce(Arc<dyn Persistence>) -> Fut,
///     Fut: Future<Output = Result<(), EngineError>> + Send + 'static;
/// ```
///
/// Use it inside a module per backend. The calling crate needs `tokio` with the
/// `macros` and `rt-multi-thread` features.
#[macro_export]
#[doc(hidden)]
macro_rules! persistence_suite {
    ($run:path) => {
        $crate::persistence_suite!(@cases $run;
            message_round_trips_every_content_part,
            save_message_replaces_every_field,
            messages_ordered_by_created_at_then_id,
            message_tree_by_parent,
            second_save_of_conversation_only_bumps_updated_at,
            conversations_newest_first_and_per_user,
            delete_conversation_removes_its_messages,
            add_message_writes_only_into_an_existing_conversation,
            add_message_racing_delete_leaves_nothing_behind,
            missing_rows_are_none,
            concurrent_secret_init_agrees,
            ping_answers,
            spend_records_lines_and_charges_the_balance,
            spend_again_charges_nothing_more,
            concurrent_spends_charge_each_line_once,
            spend_without_balance_row_records_lines,
            ensure_balance_is_idempotent,
            add_credits_creates_and_adds,
            refill_if_due_refills_once,
            usage_report_groups_per_user,
            api_keys_are_stored_listed_and_revoked,
            api_keys_authenticate_by_hash_until_revoked,
            api_key_ids_and_hashes_are_unique,
            concurrent_uses_of_a_key_all_authenticate,
        );
    };
    (@cases $run:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> Result<(), $crate::suite::EngineError> {
                $run(|db| $crate::suite::$case(db)).await
            }
        )*
    };
}

/// A conversation row owned by `user_id`.
pub fn conversation(id: &str, user_id: &str, updated_at: &str) -> Conversation {
    Conversation {
        conversation_id: id.to_string(),
        user_id: user_id.to_string(),
        title: format!("title of {id}"),
        created_at: "2025-01-01T00:00:00Z".to_string(),
        updated_at: updated_at.to_string(),
    }
}

/// A plain text message by the user.
pub fn message(id: &str, conversation_id: &str, parent: Option<&str>, created_at: &str) -> Message {
    Message {
        message_id: id.to_string(),
        conversation_id: conversation_id.to_string(),
        parent_message_id: parent.map(str::to_string),
        sender: "User".to_string(),
        text: format!("text of {id}"),
        content: vec![ContentPart::Text {
            text: format!("text of {id}"),
        }],
        is_created_by_user: true,
        model: None,
        unfinished: false,
        error: false,
        created_at: created_at.to_string(),
    }
}

/// An assistant message with every kind of content part, and text that stresses
/// escaping: quotes, backslashes, newlines, non-ASCII, emoji.
pub fn rich_message(id: &str, conversation_id: &str, parent: Option<&str>) -> Message {
    Message {
        message_id: id.to_string(),
        conversation_id: conversation_id.to_string(),
        parent_message_id: parent.map(str::to_string),
        sender: "gpt-4o".to_string(),
        text: "Héllo \"wörld\"\n\\ 🦀 — done".to_string(),
        content: vec![
            ContentPart::Think {
                think: "Let me think…\n'step 1'".to_string(),
                signature: Some("EqQBCkgIBRABGAIiQL+/sig==".to_string()),
            },
            ContentPart::ToolCall {
                tool_call: ToolCall {
                    id: "call_1".to_string(),
                    name: "calculator".to_string(),
                    args: r#"{"expression":"6 * 7","note":"\"quoted\""}"#.to_string(),
                    output: Some("42".to_string()),
                },
            },
            ContentPart::ToolCall {
                tool_call: ToolCall {
                    id: "call_2".to_string(),
                    name: "search".to_string(),
                    args: "{}".to_string(),
                    output: None,
                },
            },
            ContentPart::Text {
                text: "Héllo \"wörld\"\n\\ 🦀 — done".to_string(),
            },
        ],
        is_created_by_user: false,
        model: Some("gpt-4o".to_string()),
        unfinished: true,
        error: true,
        created_at: "2025-01-01T00:00:01.123456789+02:00".to_string(),
    }
}

/// Every content part type, every optional field set and unset, survives a save and
/// comes back equal from both `get_message` and `list_messages`.
pub async fn message_round_trips_every_content_part(db: Db) -> Result<(), EngineError> {
    db.save_conversation(&conversation("c1", "alice", "2025-01-01T00:00:00Z"))
        .await?;
    // Timestamps in several RFC 3339 spellings, each of which must come back as is.
    let user = message("m1", "c1", None, "2025-01-01T00:00:00.000Z");
    let mut empty = message("m0", "c1", None, "2024-12-31T23:59:59Z");
    empty.text = String::new();
    empty.content = Vec::new();
    let rich = rich_message("m2", "c1", Some("m1"));
    for m in [&user, &rich, &empty] {
        db.save_message(m).await?;
    }
    assert_eq!(db.get_message("m1").await?.as_ref(), Some(&user));
    assert_eq!(db.get_message("m2").await?.as_ref(), Some(&rich));
    assert_eq!(db.get_message("m0").await?.as_ref(), Some(&empty));
    assert_eq!(db.list_messages("c1").await?, vec![empty, user, rich]);
    Ok(())
}

/// A second save of the same `messageId` replaces every field, including clearing
/// flags and optional fields, and leaves one message.
pub async fn save_message_replaces_every_field(db: Db) -> Result<(), EngineError> {
    let first = rich_message("m1", "c1", Some("p1"));
    db.save_message(&first).await?;
    let second = Message {
        message_id: "m1".to_string(),
        conversation_id: "c2".to_string(),
        parent_message_id: None,
        sender: "claude".to_string(),
        text: "final".to_string(),
        content: vec![ContentPart::Text {
            text: "final".to_string(),
        }],
        is_created_by_user: true,
        model: None,
        unfinished: false,
        error: false,
        created_at: "2025-02-02T00:00:00Z".to_string(),
    };
    db.save_message(&second).await?;
    assert_eq!(db.get_message("m1").await?.as_ref(), Some(&second));
    assert_eq!(db.list_messages("c1").await?, Vec::new());
    assert_eq!(db.list_messages("c2").await?, vec![second.clone()]);
    // And back: saving the first again restores it exactly (an aborted partial answer
    // overwritten by the completed one, or the other way round).
    db.save_message(&first).await?;
    assert_eq!(db.get_message("m1").await?, Some(first));
    Ok(())
}

/// Oldest first by `createdAt`; ties by id in byte order (so `"B"` < `"a"`, which a
/// locale-aware collation would reverse); other conversations' messages excluded.
pub async fn messages_ordered_by_created_at_then_id(db: Db) -> Result<(), EngineError> {
    let msgs = [
        message("z", "c1", None, "2025-01-01T00:00:03Z"),
        message("a", "c1", Some("z"), "2025-01-01T00:00:01Z"),
        message("b", "c1", Some("a"), "2025-01-01T00:00:02Z"),
        message("a-2", "c1", Some("a"), "2025-01-01T00:00:02Z"),
        message("B", "c1", Some("a"), "2025-01-01T00:00:02Z"),
        message("other", "c2", None, "2025-01-01T00:00:00Z"),
    ];
    for m in &msgs {
        db.save_message(m).await?;
    }
    let ids: Vec<String> = db
        .list_messages("c1")
        .await?
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(ids, ["a", "B", "a-2", "b", "z"]);
    assert_eq!(db.list_messages("c2").await?.len(), 1);
    assert_eq!(db.list_messages("nope").await?, Vec::new());
    Ok(())
}

/// A branching tree (an edited question and a regenerated answer) comes back whole,
/// and every `parentMessageId` names a stored message.
pub async fn message_tree_by_parent(db: Db) -> Result<(), EngineError> {
    // root ─┬─ a1 ── q2
    //       └─ a1b (regenerated) ─┬─ q2b
    //                             └─ q2c
    let tree = [
        ("root", None, "2025-01-01T00:00:00Z"),
        ("a1", Some("root"), "2025-01-01T00:00:01Z"),
        ("a1b", Some("root"), "2025-01-01T00:00:02Z"),
        ("q2", Some("a1"), "2025-01-01T00:00:03Z"),
        ("q2b", Some("a1b"), "2025-01-01T00:00:04Z"),
        ("q2c", Some("a1b"), "2025-01-01T00:00:05Z"),
    ];
    for (id, parent, at) in tree {
        db.save_message(&message(id, "c1", parent, at)).await?;
    }
    let listed = db.list_messages("c1").await?;
    let mut children: BTreeMap<Option<String>, BTreeSet<String>> = BTreeMap::new();
    for m in &listed {
        children
            .entry(m.parent_message_id.clone())
            .or_default()
            .insert(m.message_id.clone());
        if let Some(parent) = &m.parent_message_id {
            assert!(
                db.get_message(parent).await?.is_some(),
                "parent {parent} of {} is missing",
                m.message_id
            );
        }
    }
    let kids = |p: Option<&str>| -> Vec<String> {
        children
            .get(&p.map(str::to_string))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(kids(None), ["root"]);
    assert_eq!(kids(Some("root")), ["a1", "a1b"]);
    assert_eq!(kids(Some("a1")), ["q2"]);
    assert_eq!(kids(Some("a1b")), ["q2b", "q2c"]);
    assert_eq!(listed.len(), tree.len());
    Ok(())
}

/// Saving an existing conversation changes only `updated_at`: owner, title and
/// creation time are those of the first save.
pub async fn second_save_of_conversation_only_bumps_updated_at(db: Db) -> Result<(), EngineError> {
    let first = conversation("c1", "alice", "2025-01-01T00:00:00Z");
    db.save_conversation(&first).await?;
    assert_eq!(db.get_conversation("c1").await?.as_ref(), Some(&first));
    db.save_conversation(&Conversation {
        conversation_id: "c1".to_string(),
        user_id: "mallory".to_string(),
        title: "a new title".to_string(),
        created_at: "2030-01-01T00:00:00Z".to_string(),
        updated_at: "2025-01-01T00:05:00.5Z".to_string(),
    })
    .await?;
    let want = Conversation {
        updated_at: "2025-01-01T00:05:00.5Z".to_string(),
        ..first
    };
    assert_eq!(db.get_conversation("c1").await?, Some(want.clone()));
    assert_eq!(db.list_conversations("alice").await?, vec![want]);
    assert_eq!(db.list_conversations("mallory").await?, Vec::new());
    Ok(())
}

/// A user's conversations, most recently updated first, ties by id descending; other
/// users' never appear; a bump moves a conversation to the front.
pub async fn conversations_newest_first_and_per_user(db: Db) -> Result<(), EngineError> {
    for c in [
        conversation("c1", "alice", "2025-01-01T00:00:01Z"),
        conversation("c2", "alice", "2025-01-01T00:00:03Z"),
        conversation("c3", "alice", "2025-01-01T00:00:02Z"),
        conversation("c4", "alice", "2025-01-01T00:00:02Z"),
        conversation("C5", "alice", "2025-01-01T00:00:02Z"),
        conversation("b1", "bob", "2025-01-01T00:00:09Z"),
        conversation("b2", "alicebob", "2025-01-01T00:00:09Z"),
    ] {
        db.save_conversation(&c).await?;
    }
    let ids = |v: Vec<Conversation>| -> Vec<String> {
        v.into_iter().map(|c| c.conversation_id).collect()
    };
    assert_eq!(
        ids(db.list_conversations("alice").await?),
        ["c2", "c4", "c3", "C5", "c1"]
    );
    assert_eq!(ids(db.list_conversations("bob").await?), ["b1"]);
    assert_eq!(db.list_conversations("nobody").await?, Vec::new());

    db.save_conversation(&conversation("c1", "alice", "2025-01-01T00:00:04Z"))
        .await?;
    assert_eq!(
        ids(db.list_conversations("alice").await?),
        ["c1", "c2", "c4", "c3", "C5"]
    );
    Ok(())
}

/// Deleting a conversation removes it and its messages, reports that it existed, and
/// leaves other conversations alone; deleting it again reports false.
pub async fn delete_conversation_removes_its_messages(db: Db) -> Result<(), EngineError> {
    db.save_conversation(&conversation("c1", "alice", "2025-01-01T00:00:00Z"))
        .await?;
    db.save_conversation(&conversation("c2", "alice", "2025-01-01T00:00:00Z"))
        .await?;
    db.save_message(&message("m1", "c1", None, "2025-01-01T00:00:00Z"))
        .await?;
    db.save_message(&rich_message("m2", "c1", Some("m1")))
        .await?;
    db.save_message(&message("keep", "c2", None, "2025-01-01T00:00:00Z"))
        .await?;

    assert!(db.delete_conversation("c1").await?);
    assert_eq!(db.get_conversation("c1").await?, None);
    assert_eq!(db.get_message("m1").await?, None);
    assert_eq!(db.get_message("m2").await?, None);
    assert_eq!(db.list_messages("c1").await?, Vec::new());
    assert!(db.get_conversation("c2").await?.is_some());
    assert!(db.get_message("keep").await?.is_some());
    assert_eq!(db.list_conversations("alice").await?.len(), 1);

    assert!(!db.delete_conversation("c1").await?);
    assert!(!db.delete_conversation("never").await?);
    // The id can be reused afterwards.
    db.save_conversation(&conversation("c1", "bob", "2025-01-02T00:00:00Z"))
        .await?;
    assert_eq!(
        db.get_conversation("c1").await?.map(|c| c.user_id),
        Some("bob".to_string())
    );
    Ok(())
}

/// `add_message` saves into an existing conversation and bumps its `updated_at`; into
/// a missing (deleted) one it writes nothing and says so.
pub async fn add_message_writes_only_into_an_existing_conversation(
    db: Db,
) -> Result<(), EngineError> {
    db.save_conversation(&conversation("c1", "alice", "2025-01-01T00:00:00Z"))
        .await?;
    let m = message("m1", "c1", None, "2025-01-02T00:00:00Z");
    assert!(db.add_message(&m).await?);
    assert_eq!(db.get_message("m1").await?, Some(m));
    assert_eq!(
        db.get_conversation("c1").await?.map(|c| c.updated_at),
        Some("2025-01-02T00:00:00Z".to_string())
    );
    assert!(db.delete_conversation("c1").await?);
    assert!(
        !db.add_message(&message("m2", "c1", None, "2025-01-03T00:00:00Z"))
            .await?
    );
    assert_eq!(db.get_message("m2").await?, None);
    assert_eq!(db.get_conversation("c1").await?, None);
    Ok(())
}

/// An `add_message` racing the conversation's delete either lands before it (and is
/// deleted with it) or is refused: whatever the interleaving, nothing of the
/// conversation is left once both are done.
pub async fn add_message_racing_delete_leaves_nothing_behind(db: Db) -> Result<(), EngineError> {
    for round in 0..40 {
        let cid = format!("race{round}");
        db.save_conversation(&conversation(&cid, "alice", "2025-01-01T00:00:00Z"))
            .await?;
        let adds: Vec<_> = (0..4)
            .map(|i| {
                let db = db.clone();
                let m = message(&format!("{cid}-m{i}"), &cid, None, "2025-01-02T00:00:00Z");
                tokio::spawn(async move { db.add_message(&m).await })
            })
            .collect();
        let del = {
            let db = db.clone();
            let cid = cid.clone();
            tokio::spawn(async move { db.delete_conversation(&cid).await })
        };
        for a in adds {
            a.await
                .map_err(|e| EngineError::internal("task failed", e))??;
        }
        let deleted = del
            .await
            .map_err(|e| EngineError::internal("task failed", e))??;
        assert!(deleted, "round {round}");
        assert_eq!(db.get_conversation(&cid).await?, None, "round {round}");
        assert_eq!(db.list_messages(&cid).await?, Vec::new(), "round {round}");
    }
    Ok(())
}

/// Lookups of ids that were never saved are `None`, not errors.
pub async fn missing_rows_are_none(db: Db) -> Result<(), EngineError> {
    assert_eq!(db.get_conversation("nope").await?, None);
    assert_eq!(db.get_message("nope").await?, None);
    assert_eq!(db.list_conversations("nobody").await?, Vec::new());
    assert_eq!(db.list_messages("nope").await?, Vec::new());
    Ok(())
}

/// Twenty concurrent first calls with different candidates all get the same value,
/// one of the candidates; later calls keep it; other names are independent.
pub async fn concurrent_secret_init_agrees(db: Db) -> Result<(), EngineError> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let db = db.clone();
        tasks.spawn(async move {
            db.get_or_init_secret("jwt_secret", &format!("candidate-{i}"))
                .await
        });
    }
    let mut seen = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let value =
            joined.map_err(|e| EngineError::Internal(format!("task failed: {e}").into()))??;
        seen.insert(value);
    }
    assert_eq!(seen.len(), 1, "callers disagree: {seen:?}");
    let winner = seen.into_iter().next().unwrap_or_default();
    assert!(
        (0..20).any(|i| winner == format!("candidate-{i}")),
        "{winner} is no candidate"
    );
    assert_eq!(db.get_or_init_secret("jwt_secret", "late").await?, winner);
    assert_eq!(db.get_or_init_secret("other", "x").await?, "x");
    assert_eq!(db.get_or_init_secret("other", "y").await?, "x");
    Ok(())
}

/// `ping` succeeds on a working database.
pub async fn ping_answers(db: Db) -> Result<(), EngineError> {
    db.ping().await
}

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

/// An API key row for `user_id` whose hash is derived from `id` (the suite needs no
/// real key: the store only ever sees hashes).
pub fn api_key(id: &str, user_id: &str, name: Option<&str>, created_at: &str) -> ApiKey {
    ApiKey {
        id: id.to_string(),
        user_id: user_id.to_string(),
        name: name.map(str::to_string),
        prefix: format!("gsk_{id}"),
        hash: format!("hash-of-{id}"),
        created_at: created_at.to_string(),
        last_used_at: None,
        revoked_at: None,
    }
}

pub async fn api_keys_are_stored_listed_and_revoked(db: Db) -> Result<(), EngineError> {
    let a = api_key("k1", "alice", Some("laptop"), "2025-01-01T00:00:00.000Z");
    let b = api_key("k2", "alice", None, "2025-01-02T00:00:00.000Z");
    let c = api_key("k3", "bob", Some("ci"), "2025-01-03T00:00:00.000Z");
    for k in [&a, &b, &c] {
        db.create_api_key(k).await?;
    }
    // Newest first, per user, every field as written.
    assert_eq!(db.list_api_keys("alice").await?, vec![b.clone(), a.clone()]);
    assert_eq!(db.list_api_keys("bob").await?, vec![c.clone()]);
    assert!(db.list_api_keys("carol").await?.is_empty());
    // Revoking returns the row; a second revocation keeps the first time.
    let revoked_a = ApiKey {
        revoked_at: Some("2025-02-01T00:00:00.000Z".into()),
        ..a.clone()
    };
    assert_eq!(
        db.revoke_api_key("k1", "2025-02-01T00:00:00.000Z").await?,
        Some(revoked_a.clone())
    );
    assert_eq!(
        db.revoke_api_key("k1", "2025-03-01T00:00:00.000Z").await?,
        Some(revoked_a.clone())
    );
    assert_eq!(
        db.revoke_api_key("nope", "2025-03-01T00:00:00.000Z")
            .await?,
        None
    );
    // A revoked key is still listed, as revoked; the others are untouched.
    assert_eq!(db.list_api_keys("alice").await?, vec![b, revoked_a]);
    Ok(())
}

pub async fn api_keys_authenticate_by_hash_until_revoked(db: Db) -> Result<(), EngineError> {
    let k = api_key("k1", "alice", None, "2025-01-01T00:00:00.000Z");
    db.create_api_key(&k).await?;
    db.create_api_key(&api_key("k2", "bob", None, "2025-01-01T00:00:00.000Z"))
        .await?;
    let used = |db: Db| async move {
        Ok::<_, EngineError>(db.list_api_keys("alice").await?[0].last_used_at.clone())
    };
    assert_eq!(used(db.clone()).await?, None);
    assert_eq!(
        db.authenticate_api_key(&k.hash, "2025-01-05T10:00:30.000Z")
            .await?,
        Some("alice".to_string())
    );
    assert_eq!(
        db.authenticate_api_key("hash-of-k2", "2025-01-05T10:00:30.000Z")
            .await?,
        Some("bob".to_string())
    );
    assert_eq!(
        db.authenticate_api_key("hash-of-nothing", "2025-01-05T10:00:30.000Z")
            .await?,
        None
    );
    // The first use is stamped; a use in the same minute is not; a later one is.
    assert_eq!(
        used(db.clone()).await?.as_deref(),
        Some("2025-01-05T10:00:30.000Z")
    );
    db.authenticate_api_key(&k.hash, "2025-01-05T10:00:59.999Z")
        .await?;
    assert_eq!(
        used(db.clone()).await?.as_deref(),
        Some("2025-01-05T10:00:30.000Z")
    );
    db.authenticate_api_key(&k.hash, "2025-01-05T10:01:00.000Z")
        .await?;
    assert_eq!(
        used(db.clone()).await?.as_deref(),
        Some("2025-01-05T10:01:00.000Z")
    );
    // Revoked: refused at once; the other user's key is not affected.
    db.revoke_api_key("k1", "2025-01-05T10:02:00.000Z").await?;
    assert_eq!(
        db.authenticate_api_key(&k.hash, "2025-01-05T10:02:00.001Z")
            .await?,
        None
    );
    assert_eq!(
        db.authenticate_api_key("hash-of-k2", "2025-01-05T10:02:00.001Z")
            .await?,
        Some("bob".to_string())
    );
    Ok(())
}

pub async fn api_key_ids_and_hashes_are_unique(db: Db) -> Result<(), EngineError> {
    db.create_api_key(&api_key("k1", "alice", None, "2025-01-01T00:00:00.000Z"))
        .await?;
    let same_id = ApiKey {
        hash: "another-hash".into(),
        ..api_key("k1", "bob", None, "2025-01-02T00:00:00.000Z")
    };
    assert!(db.create_api_key(&same_id).await.is_err());
    let same_hash = ApiKey {
        id: "k9".into(),
        ..api_key("k1", "bob", None, "2025-01-02T00:00:00.000Z")
    };
    assert!(db.create_api_key(&same_hash).await.is_err());
    assert!(db.list_api_keys("bob").await?.is_empty());
    assert_eq!(db.list_api_keys("alice").await?.len(), 1);
    Ok(())
}

pub async fn concurrent_uses_of_a_key_all_authenticate(db: Db) -> Result<(), EngineError> {
    let k = api_key("k1", "alice", None, "2025-01-01T00:00:00.000Z");
    db.create_api_key(&k).await?;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let db = db.clone();
            let hash = k.hash.clone();
            tokio::spawn(async move {
                let now = format!("2025-01-05T10:{:02}:00.000Z", i % 4);
                db.authenticate_api_key(&hash, &now).await
            })
        })
        .collect();
    for t in tasks {
        let user = t
            .await
            .map_err(|e| EngineError::Internal(e.to_string().into()))??;
        assert_eq!(user.as_deref(), Some("alice"));
    }
    // Stamps only move forward, so racing uses leave the latest minute.
    let last = db.list_api_keys("alice").await?[0].last_used_at.clone();
    assert_eq!(last.as_deref(), Some("2025-01-05T10:03:00.000Z"));
    Ok(())
}
