//! The shared job-store suite against the memory store.

use std::sync::Arc;

use genstream_engine::store::{JobStore, MemoryStore};
use genstream_engine::suite::{SUITE_LIMITS, run_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_suite() {
    run_all(|| async { Arc::new(MemoryStore::new(SUITE_LIMITS)) as Arc<dyn JobStore> }).await;
}
