//! [`RateLimitStore`] for Redis: a sliding-window log per key (`P:rlw:{key}`), on the
//! Redis clock.

use std::time::Duration;

use async_trait::async_trait;
use genstream_engine::store::RateLimitStore;

use crate::functions::RATE_WINDOW_FN;
use crate::{RedisStore, StoreError};

#[async_trait]
impl RateLimitStore for RedisStore {
    /// One step of `genstream_rate_window_v1` (`append.lua`): drop the hits that left
    /// the window, count, add this one if under the limit — judged by Redis's clock, so
    /// all replicas share one window whatever their own clocks say.
    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        let period_ms = period.as_millis() as u64;
        if limit == 0 || period_ms == 0 {
            return Ok(None);
        }
        let wait_us: i64 = self
            .fcall(
                redis::cmd("FCALL")
                    .arg(RATE_WINDOW_FN)
                    .arg(1)
                    .arg(format!("{}:rlw:{{{key}}}", self.inner.cfg.key_prefix))
                    .arg(limit)
                    .arg(period_ms)
                    .arg(uuid::Uuid::now_v7().to_string()),
            )
            .await?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us as u64)))
    }
}
