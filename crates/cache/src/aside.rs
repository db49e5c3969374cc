//! Read-through caching for services: single-flight per key, TTL jitter, leased fills, metrics,
//! and fall-through on any cache failure.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
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
    /// `keel_cache_near_hits_total`: reads the near tier answered without asking Redis.
    pub near_hits: IntCounter,
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
        let near_hits = IntCounter::new(
            "keel_cache_near_hits_total",
            "Reads the near tier (this process's memory) answered without asking Redis.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(invalidations.clone()))?;
        registry.register(Box::new(near_hits.clone()))?;
        Ok(Self {
            requests,
            invalidations,
            near_hits,
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

/// What became of an invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// The cache dropped the entry.
    Done,
    /// The cache refused; the entry is dropped when the retry runs (until then, or its TTL, it
    /// may be read).
    Later,
    /// The cache refused, and there is no retry: the entry lives out its TTL.
    Failed,
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
    flights: Mutex<HashMap<String, Flight>>,
    later: Option<Arc<dyn InvalidateLater>>,
}

/// What a leader's load came to, for its waiters: the value or the error, type-erased because
/// one cache serves loads of any value and error type.
type Shared = Arc<dyn Any + Send + Sync>;
type Outcome = Result<Option<Shared>, Shared>;

/// One load in progress: its waiters watch for the outcome. The sender is the leader's; if the
/// leader is dropped (its caller cancelled) before it sends, the waiters see the channel close
/// and one of them leads instead.
#[derive(Clone)]
struct Flight {
    id: u64,
    outcome: tokio::sync::watch::Receiver<Option<Outcome>>,
}

/// The leader's hold on a flight: removes it from the map however the leader ends.
struct Leading<'a> {
    aside: &'a CacheAside,
    key: &'a str,
    id: u64,
    outcome: tokio::sync::watch::Sender<Option<Outcome>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut flights = self.aside.flights();
        if flights.get(self.key).is_some_and(|f| f.id == self.id) {
            flights.remove(self.key);
        }
    }
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
        // The cache's series read zero from the start: a hit ratio has a denominator, an
        // error alert a value.
        for result in ["hit", "miss", "error"] {
            metrics.requests.with_label_values(&[name, result]);
        }
        for result in ["ok", "error"] {
            metrics.invalidations.with_label_values(&[name, result]);
        }
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
    /// one key in this process run `load` once and all get its result, value or error; a
    /// leader whose caller gives up hands the load to a waiter. A cache failure runs `load` and
    /// skips the fill.
    pub async fn get_or_load<V, E, F, Fut>(&self, key: &str, load: F) -> Result<Option<V>, E>
    where
        V: prost::Message + Default + Clone + Send + Sync + 'static,
        E: Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        let key = self.namespaced(key);
        match self.lookup::<V>(&key).await {
            Lookup::Hit(v) => return Ok(Some(v)),
            Lookup::Failed => return load().await,
            Lookup::Miss => {}
        }
        let mut load = Some(load);
        loop {
            match self.join(&key) {
                Err(leading) => {
                    let load = load.take().expect("a caller leads at most once");
                    let result = self.load_and_fill(&key, load).await;
                    let outcome: Outcome = match &result {
                        Ok(value) => Ok(value.clone().map(|v| Arc::new(v) as Shared)),
                        Err(e) => Err(Arc::new(e.clone()) as Shared),
                    };
                    leading.outcome.send_replace(Some(outcome));
                    return result;
                }
                Ok(mut flight) => {
                    let outcome = flight
                        .outcome
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|o| o.clone());
                    match outcome {
                        Some(Ok(value)) => {
                            return Ok(value.and_then(|v| v.downcast_ref::<V>().cloned()));
                        }
                        Some(Err(e)) => {
                            if let Some(e) = e.downcast_ref::<E>() {
                                return Err(e.clone());
                            }
                            // Another error type under the same key: load ourselves.
                            return load.take().expect("not led yet")().await;
                        }
                        // The leader gave up before it finished: lead, or follow whoever does.
                        None => {}
                    }
                }
            }
        }
    }

    /// Loads of `key` under way in this process (0 once every flight has landed).
    pub fn flights_in_progress(&self) -> usize {
        self.flights().len()
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

    /// Drops `key` after a committed write, and forgets a load of it in flight. Failures are
    /// logged and counted, never returned: the write already happened. A failed invalidation
    /// goes to the retry, when there is one (else the TTL bounds how long a stale entry can
    /// live).
    pub async fn invalidate(&self, key: &str) {
        self.invalidation(key).await;
    }

    /// [`CacheAside::invalidate`], saying what became of it: for a caller that tells a person
    /// (an operator's command) whether the change is seen everywhere now.
    pub async fn invalidation(&self, key: &str) -> Invalidation {
        let key = self.namespaced(key);
        // A load in flight read the source before this write: a reader from now on must not
        // share its value. Its own waiters keep it (they asked before the write was done).
        self.flights().remove(&key);
        let invalidation = match self.inner.cache.invalidate(&key).await {
            Ok(()) => Invalidation::Done,
            Err(e) => {
                tracing::warn!(cache = self.inner.name, error = %e, "cache invalidation failed");
                match &self.inner.later {
                    Some(later) => {
                        later.invalidate_later(&key).await;
                        Invalidation::Later
                    }
                    None => Invalidation::Failed,
                }
            }
        };
        let result = match invalidation {
            Invalidation::Done => "ok",
            Invalidation::Later | Invalidation::Failed => "error",
        };
        self.inner
            .metrics
            .invalidations
            .with_label_values(&[self.inner.name, result])
            .inc();
        invalidation
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

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<String, Flight>> {
        self.inner.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the flight of `key`, or starts one and leads it.
    fn join<'a>(&'a self, key: &'a str) -> Result<Flight, Leading<'a>> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut flights = self.flights();
        if let Some(flight) = flights.get(key) {
            return Ok(flight.clone());
        }
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (outcome, watched) = tokio::sync::watch::channel(None);
        flights.insert(
            key.to_owned(),
            Flight {
                id,
                outcome: watched,
            },
        );
        Err(Leading {
            aside: self,
            key,
            id,
            outcome,
        })
    }
}

enum Lookup<V> {
    Hit(V),
    Miss,
    Failed,
}
