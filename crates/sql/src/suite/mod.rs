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

mod api_keys;
mod ledger;

pub use api_keys::*;
pub use ledger::*;

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
