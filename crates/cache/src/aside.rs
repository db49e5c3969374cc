//! Read-through caching for services: single-flight per key, TTL jitter, leased fills, metrics,
//! and fall-through on any cache failure.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use rand::Rng as _;

use crate::Cache;

/// How long a fill lease lives: longer than any sane database read.
const LEASE_TTL: Duration = Duration::from_secs(10);

/// Counters shared by every cache-aside in a process: `keel_cache_requests_total` by cache name
/// and result (`hit`, `miss`, `error`), and `keel_cache_invalidations_total` by cache and result.
#[derive(Clone, Debug)]
pub struct CacheMetrics {
    requests: IntCounterVec,
    invalidations: IntCounterVec,
}

impl CacheMetrics {
    /// Creates the counters and registers them with `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "keel_cache_requests_total",
                "Cache-aside reads by cache and result (hit, miss, error).",
            ),
            &["cache", "result"],
        )?;
        let invalidations = IntCounterVec::new(
            Opts::new(
                "keel_cache_invalidations_total",
                "Cache invalidations after writes by cache and result (ok, error).",
            ),
            &["cache", "result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(invalidations.clone()))?;
        Ok(Self {
            requests,
            invalidations,
        })
    }
}

/// What to do with an invalidation the cache refused (Redis down): do it later, durably, so
/// that a stale entry does not outlive the outage until its TTL.
#[async_trait::async_trait]
pub trait InvalidateLater: Send + Sync + 'static {
    /// Invalidates `key` (the cache's own, namespaced key) once the cache answers again.
    async fn invalidate_later(&self, key: &str);
}

/// A named read-through cache of protobuf messages in front of a loader.
#[derive(Clone)]
pub struct CacheAside {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Arc<dyn Cache>,
    name: &'static str,
    ttl: Duration,
    metrics: CacheMetrics,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    later: Option<Arc<dyn InvalidateLater>>,
}

impl std::fmt::Debug for CacheAside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheAside")
            .field("name", &self.inner.name)
            .field("backend", &self.inner.cache.backend())
            .finish()
    }
}

impl CacheAside {
    /// A cache called `name` (a metric label and key namespace) whose entries live about `ttl`
    /// (plus up to 10% jitter so that entries filled together do not expire together).
    pub fn new(
        cache: Arc<dyn Cache>,
        name: &'static str,
        ttl: Duration,
        metrics: CacheMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cache,
                name,
                ttl,
                metrics,
                flights: Mutex::new(HashMap::new()),
                later: None,
            }),
        }
    }

    /// The same cache, handing invalidations that fail to `later`.
    pub fn with_retry(self, later: Arc<dyn InvalidateLater>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                cache: inner.cache.clone(),
                name: inner.name,
                ttl: inner.ttl,
                metrics: inner.metrics.clone(),
                flights: Mutex::new(HashMap::new()),
                later: Some(later),
            }),
        }
    }

    /// The value for `key`: from the cache, or from `load` (then stored). Concurrent misses on
    /// one key in this process run `load` once. A cache failure runs `load` and skips the fill.
    pub async fn get_or_load<V, E, F, Fut>(&self, key: &str, load: F) -> Result<Option<V>, E>
    where
        V: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        let key = self.namespaced(key);
        match self.lookup::<V>(&key).await {
            Lookup::Hit(v) => return Ok(Some(v)),
            Lookup::Failed => return load().await,
            Lookup::Miss => {}
        }

        let flight = self.flight(&key);
        let _turn = flight.lock().await;
        // Someone ahead of us in this flight may have filled the key while we waited.
        let result = match self.peek::<V>(&key).await {
            Some(v) => {
                self.count("hit");
                Ok(Some(v))
            }
            None => self.load_and_fill(&key, load).await,
        };
        drop(_turn);
        self.land(&key, flight);
        result
    }

    /// The values for `keys`, in their order: one cache read for all of them, and one `load`
    /// for the misses (given their keys; it answers the values it found, by key), each filled
    /// under its own lease. A cache failure loads every key and fills nothing. Batches are not
    /// single-flighted against each other.
    pub async fn get_many_or_load<V, E, F, Fut>(
        &self,
        keys: &[String],
        load: F,
    ) -> Result<Vec<Option<V>>, E>
    where
        V: prost::Message + Default + Clone,
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<HashMap<String, V>, E>>,
    {
        let namespaced: Vec<String> = keys.iter().map(|k| self.namespaced(k)).collect();
        let cached = match self.inner.cache.get_many(&namespaced).await {
            Ok(cached) => cached,
            Err(e) => {
                tracing::warn!(cache = self.inner.name, error = %e, "cache read failed; reading the source");
                for _ in keys {
                    self.count("error");
                }
                let found = load(keys.to_vec()).await?;
                return Ok(keys.iter().map(|k| found.get(k).cloned()).collect());
            }
        };
        let mut values: Vec<Option<V>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, bytes) in cached.into_iter().enumerate() {
            match bytes.and_then(|b| V::decode(b).ok()) {
                Some(v) => {
                    self.count("hit");
                    values.push(Some(v));
                }
                None => {
                    self.count("miss");
                    values.push(None);
                    missing.push(i);
                }
            }
        }
        if missing.is_empty() {
            return Ok(values);
        }
        // Leases before the read, as for one key: an invalidation in between voids them.
        let leases = futures::future::join_all(
            missing
                .iter()
                .map(|&i| self.inner.cache.lease(&namespaced[i], LEASE_TTL)),
        )
        .await;
        let found = load(missing.iter().map(|&i| keys[i].clone()).collect()).await?;
        let fills = missing.iter().zip(leases).filter_map(|(&i, lease)| {
            let value = found.get(&keys[i])?;
            values[i] = Some(value.clone());
            let lease = lease.ok()?;
            let bytes = value.encode_to_vec().into();
            let key = &namespaced[i];
            Some(async move {
                if let Err(e) = self
                    .inner
                    .cache
                    .fill(key, &lease, bytes, self.jittered_ttl())
                    .await
                {
                    tracing::warn!(cache = self.inner.name, error = %e, "cache fill failed");
                }
            })
        });
        futures::future::join_all(fills.collect::<Vec<_>>()).await;
        Ok(values)
    }

    /// Drops `key` after a committed write. Failures are logged and counted, never returned:
    /// the write already happened. A failed invalidation goes to the retry, when there is one
    /// (else the TTL bounds how long a stale entry can live).
    pub async fn invalidate(&self, key: &str) {
        let key = self.namespaced(key);
        let result = match self.inner.cache.invalidate(&key).await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(cache = self.inner.name, error = %e, "cache invalidation failed");
                if let Some(later) = &self.inner.later {
                    later.invalidate_later(&key).await;
                }
                "error"
            }
        };
        self.inner
            .metrics
            .invalidations
            .with_label_values(&[self.inner.name, result])
            .inc();
    }

    fn namespaced(&self, key: &str) -> String {
        format!("{}:{key}", self.inner.name)
    }

    fn count(&self, result: &str) {
        self.inner
            .metrics
            .requests
            .with_label_values(&[self.inner.name, result])
            .inc();
    }

    async fn lookup<V: prost::Message + Default>(&self, key: &str) -> Lookup<V> {
        match self.inner.cache.get(key).await {
            Ok(Some(bytes)) => match V::decode(bytes) {
                Ok(v) => {
                    self.count("hit");
                    Lookup::Hit(v)
                }
                Err(e) => {
                    tracing::warn!(cache = self.inner.name, error = %e, "undecodable cache entry");
                    self.count("miss");
                    Lookup::Miss
                }
            },
            Ok(None) => {
                self.count("miss");
                Lookup::Miss
            }
            Err(e) => {
                tracing::warn!(cache = self.inner.name, error = %e, "cache read failed; reading the source");
                self.count("error");
                Lookup::Failed
            }
        }
    }

    async fn peek<V: prost::Message + Default>(&self, key: &str) -> Option<V> {
        let bytes = self.inner.cache.get(key).await.ok()??;
        V::decode(bytes).ok()
    }

    async fn load_and_fill<V, E, F, Fut>(&self, key: &str, load: F) -> Result<Option<V>, E>
    where
        V: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        // The lease must be taken before the read: an invalidation between the two voids it.
        let lease = self.inner.cache.lease(key, LEASE_TTL).await.ok();
        let value = load().await?;
        if let (Some(lease), Some(v)) = (lease, value.as_ref()) {
            let bytes = v.encode_to_vec().into();
            if let Err(e) = self
                .inner
                .cache
                .fill(key, &lease, bytes, self.jittered_ttl())
                .await
            {
                tracing::warn!(cache = self.inner.name, error = %e, "cache fill failed");
            }
        }
        Ok(value)
    }

    fn jittered_ttl(&self) -> Duration {
        let ttl = self.inner.ttl;
        let jitter = rand::thread_rng().gen_range(0.0..=0.1);
        ttl + ttl.mul_f64(jitter)
    }

    fn flight(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.entry(key.to_owned()).or_default().clone()
    }

    /// Forgets the flight of `key` once nobody else holds it.
    fn land(&self, key: &str, flight: Arc<tokio::sync::Mutex<()>>) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        // Two references left: the map's and ours.
        if Arc::strong_count(&flight) == 2 {
            flights.remove(key);
        }
    }
}

enum Lookup<V> {
    Hit(V),
    Miss,
    Failed,
}
