//! Suite cases for API keys: stored as hashes, listed, revoked, authenticated.

use super::*;

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
