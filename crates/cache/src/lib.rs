//! Cache-aside over Redis (fred) or in-process moka: one interface, fill leases against stale
//! writes, and failures that fall through to the source of truth.
//!
//! The [`Cache`] trait is the storage contract; [`CacheAside`] is what services use: it reads
//! through, coalesces concurrent misses on one key (single-flight), adds TTL jitter, counts hits
//! and misses, and never lets a cache error fail a request.
//!
//! Stale fills are prevented by leases: a reader takes a lease on a key *before* it reads the
//! database and may store its value only while that lease survives. An invalidation after a write
//! drops the value and every outstanding lease, so a reader that raced the write cannot put the
//! old value back.

#![forbid(unsafe_code)]

mod aside;
mod memory;
mod near;
mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use aside::{CacheAside, CacheMetrics, InvalidateLater, Invalidation};
pub use memory::MemoryCache;
pub use near::NearCache;
pub use redis::RedisCache;

/// What one cached entry is counted as against an in-process bound in bytes: its key and value
/// and about what the cache keeps beside them (the map node, the expiry and eviction records).
pub(crate) fn weight(key: &str, value: &[u8]) -> u32 {
    const BESIDE: usize = 96;
    u32::try_from(key.len() + value.len() + BESIDE).unwrap_or(u32::MAX)
}

/// A cache backend failed; callers fall through to the source of truth.
#[derive(Debug, thiserror::Error)]
#[error("cache backend {backend} failed: {reason}")]
pub struct CacheError {
    /// Which backend failed (`redis`, `memory`).
    pub backend: &'static str,
    /// What went wrong, for logs.
    pub reason: String,
}

/// Permission to fill one key, taken before reading the source of truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease(String);

/// A byte cache with leased fills. Keys are namespaced by the implementation.
#[async_trait]
pub trait Cache: Send + Sync + std::fmt::Debug + 'static {
    /// The cached value, if any.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError>;

    /// The cached values of `keys`, in their order: one round trip where the backend has one
    /// (Redis MGET), else one `get` after another.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.get(key).await?);
        }
        Ok(values)
    }

    /// Takes a fill lease on `key`, valid for `ttl` unless an invalidation comes first.
    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, CacheError>;

    /// Stores `value` for `ttl` if `lease` is still the key's lease; reports whether it did.
    async fn fill(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, CacheError>;

    /// Drops the value and every outstanding lease of `key`.
    async fn invalidate(&self, key: &str) -> Result<(), CacheError>;

    /// The backend's name for logs and metrics.
    fn backend(&self) -> &'static str;
}

fn random_lease() -> Lease {
    Lease(uuid::Uuid::new_v4().simple().to_string())
}
