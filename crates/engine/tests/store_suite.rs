//! The shared job-store suite against the memory store.

use std::sync::Arc;

use genstream_engine::store::{JobStore, MemoryStore};
use genstream_engine::suite::{SUITE_LIMITS, run_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_suite() {
    run_all(|| async { Arc::new(MemoryStore::new(SUITE_LIMITS)) as Arc<dyn JobStore> }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_limits() {
    use genstream_engine::suite::{
        rate_limit_is_a_sliding_window_per_key, user_cap_holds_under_racing_creates,
    };
    let capped = || {
        Arc::new(MemoryStore::new(SUITE_LIMITS).with_max_running_per_user(Some(2)))
            as Arc<dyn JobStore>
    };
    user_cap_holds_under_racing_creates(capped()).await;
    rate_limit_is_a_sliding_window_per_key(capped()).await;
}
