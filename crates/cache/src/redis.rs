//! Redis cache through fred, on one server or a Redis Cluster; every command fails fast so that
//! a dead Redis costs one timeout, not a reconnect wait. A key's value and its lease share a
//! hash tag (the key in braces), so the fill's script and the invalidation's DEL touch one slot.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::*;
use fred::types::Expiration;
use fred::types::config::Options;

use crate::{Cache, CacheError, Lease, random_lease};

/// Stores `ARGV[2]` at `KEYS[1]` for `ARGV[3]` ms only if `KEYS[2]` (the lease) still holds
/// `ARGV[1]`; the lease is spent either way.
const FILL_IF_LEASED: &str = r#"
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"#;

/// A cache in Redis under a key prefix.
#[derive(Clone)]
pub struct RedisCache {
    client: Client,
    /// Where its keys are: `{prefix}cache:`, apart from what else keel keeps under the prefix
    /// (the queue's streams, the rate limits), whose changes a near tier tracking this never
    /// hears of.
    namespace: String,
    options: Options,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl RedisCache {
    /// The Redis at `url` (`redis://host:port/db`), every key namespaced with `prefix`,
    /// connecting in the background: while Redis is away every command fails at once (and the
    /// reader falls through to the database); from the moment it answers, it is used.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, CacheError> {
        let client = keel_redis::client(url, timeout, keel_redis::Protocol::Resp2)
            .await
            .map_err(|e| error(&e))?;
        let options = keel_redis::fail_fast(timeout);
        Ok(Self {
            client,
            namespace: format!("{prefix}cache:"),
            options,
        })
    }

    /// The prefix of every key of the cache.
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Its client.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    fn key(&self, key: &str) -> String {
        format!("{}{{{key}}}", self.namespace)
    }

    fn lease_key(&self, key: &str) -> String {
        format!("{}{{{key}}}#lease", self.namespace)
    }

    /// The values of `keys` (Redis keys), in order, from a cluster: one MGET per hash slot,
    /// all at once (a multi-key command must stay in one slot).
    async fn get_by_slot(&self, keys: Vec<String>) -> Result<Vec<Option<Bytes>>, CacheError> {
        let mut slots: BTreeMap<u16, (Vec<usize>, Vec<String>)> = BTreeMap::new();
        for (at, key) in keys.into_iter().enumerate() {
            let slot = slots
                .entry(fred::util::redis_keyslot(key.as_bytes()))
                .or_default();
            slot.0.push(at);
            slot.1.push(key);
        }
        let client = self.client.with_options(&self.options);
        let reads = slots.into_values().map(|(places, keys)| {
            let client = &client;
            async move {
                let values = client.mget::<Vec<Option<Bytes>>, _>(keys).await;
                values.map(|values| places.into_iter().zip(values))
            }
        });
        let mut found = Vec::new();
        for group in futures::future::try_join_all(reads)
            .await
            .map_err(|e| error(&e))?
        {
            found.extend(group);
        }
        found.sort_unstable_by_key(|(at, _)| *at);
        Ok(found.into_iter().map(|(_, value)| value).collect())
    }
}

/// The cache's key in `redis_key` (the key under `namespace`, in its hash tag's braces); `None`
/// for a lease's key or anything else.
pub(crate) fn cache_key<'k>(redis_key: &'k str, namespace: &str) -> Option<&'k str> {
    redis_key
        .strip_prefix(namespace)?
        .strip_prefix('{')?
        .strip_suffix('}')
}

pub(crate) fn error(e: &fred::error::Error) -> CacheError {
    CacheError {
        backend: "redis",
        reason: e.to_string(),
    }
}

fn millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        self.client
            .with_options(&self.options)
            .get::<Option<Bytes>, _>(self.key(key))
            .await
            .map_err(|e| error(&e))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        if self.client.is_clustered() {
            return self.get_by_slot(keys).await;
        }
        self.client
            .with_options(&self.options)
            .mget::<Vec<Option<Bytes>>, _>(keys)
            .await
            .map_err(|e| error(&e))
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, CacheError> {
        let lease = random_lease();
        self.client
            .with_options(&self.options)
            .set::<(), _, _>(
                self.lease_key(key),
                lease.0.as_str(),
                Some(Expiration::PX(millis(ttl))),
                None,
                false,
            )
            .await
            .map_err(|e| error(&e))?;
        Ok(lease)
    }

    async fn fill(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let stored: i64 = self
            .client
            .with_options(&self.options)
            .eval(
                FILL_IF_LEASED,
                vec![self.key(key), self.lease_key(key)],
                vec![
                    Value::from(lease.0.as_str()),
                    Value::Bytes(value),
                    Value::from(millis(ttl)),
                ],
            )
            .await
            .map_err(|e| error(&e))?;
        Ok(stored == 1)
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.client
            .with_options(&self.options)
            .del::<(), _>(vec![self.key(key), self.lease_key(key)])
            .await
            .map_err(|e| error(&e))
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
