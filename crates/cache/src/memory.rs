//! In-process cache on moka, the embedded default.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache as Moka;

use crate::{Cache, CacheError, Lease, random_lease};

#[derive(Clone)]
struct Entry {
    value: Bytes,
    ttl: Duration,
}

struct PerEntryTtl;

impl moka::Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _now: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// A bounded in-process cache; each entry lives for the TTL it was stored with.
pub struct MemoryCache {
    entries: Moka<String, Entry>,
    /// Outstanding fill leases with their deadlines. Fill and invalidate take this lock so that
    /// "check lease, then store" cannot interleave with "drop value and leases".
    leases: Mutex<std::collections::HashMap<String, (Lease, Instant)>>,
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl MemoryCache {
    /// A cache holding at most `bytes` of keys and values (with what each entry costs beside).
    pub fn new(bytes: u64) -> Self {
        Self {
            entries: Moka::builder()
                .weigher(|key: &String, entry: &Entry| crate::weight(key, &entry.value))
                .max_capacity(bytes)
                .expire_after(PerEntryTtl)
                .build(),
            leases: Mutex::new(Default::default()),
        }
    }

    fn leases(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (Lease, Instant)>> {
        // A panic while holding this lock cannot leave the map inconsistent: every critical
        // section is a single map operation.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        Ok(self.entries.get(key).map(|e| e.value))
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, CacheError> {
        let lease = random_lease();
        let now = Instant::now();
        let mut leases = self.leases();
        if leases.len() > 10_000 {
            leases.retain(|_, (_, deadline)| *deadline > now);
        }
        leases.insert(key.to_owned(), (lease.clone(), now + ttl));
        Ok(lease)
    }

    async fn fill(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let mut leases = self.leases();
        match leases.get(key) {
            Some((held, deadline)) if held == lease && *deadline > Instant::now() => {
                leases.remove(key);
                self.entries.insert(key.to_owned(), Entry { value, ttl });
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        let mut leases = self.leases();
        leases.remove(key);
        self.entries.invalidate(key);
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_past_the_byte_bound_are_evicted() {
        let cache = MemoryCache::new(1 << 20);
        let value = Bytes::from(vec![7u8; 64 * 1024]);
        let ttl = Duration::from_secs(60);
        for i in 0..64 {
            let key = format!("things/{i}");
            let lease = cache.lease(&key, ttl).await.unwrap();
            assert!(cache.fill(&key, &lease, value.clone(), ttl).await.unwrap());
        }
        cache.entries.run_pending_tasks();
        let held: usize = cache.entries.iter().map(|(_, e)| e.value.len()).sum();
        assert!(
            held <= 1 << 20,
            "{held} bytes of values held past a bound of 1 MiB"
        );
        assert!(held > 0, "the newest values are kept");
    }
}
