//! A near tier in front of Redis: values read from Redis kept in process (moka, short TTL),
//! dropped as soon as Redis reports that their key changed (RESP3 client tracking, broadcast
//! mode over the cache's keys, on every primary of a cluster), and all dropped, the tier
//! bypassed, while that report stream is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::*;

use crate::redis::{RedisCache, cache_key, error};
use crate::{Cache, CacheError, Lease};

/// What the near tier holds and whether it may be trusted.
struct Near {
    entries: moka::sync::Cache<String, Bytes>,
    /// Whether invalidations are arriving; while not, the tier is bypassed.
    tracking: AtomicBool,
    /// Bumped by every invalidation: a value read from Redis across one is not kept.
    epoch: AtomicU64,
    /// Bumped whenever a tracking connection fails: arming that began before it does not turn
    /// the tier on (the node it armed first may be the one lost).
    losses: AtomicU64,
    /// The Redis id of the tracking connection (for operators and tests).
    connection: AtomicI64,
    /// The prefix of the cache's keys in Redis, which tracking follows.
    namespace: String,
}

impl Near {
    fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
    }

    /// Drops what Redis reported changed at `redis_key`.
    fn drop_key(&self, redis_key: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(key) = cache_key(redis_key, &self.namespace) {
            self.entries.invalidate(key);
        }
    }

    /// Drops `key` (as callers name it), changed by this process.
    fn forget(&self, key: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate(key);
    }
}

/// [`RedisCache`] with a near tier of at most `bytes` of keys and values, each kept at most
/// `ttl` (the safety net should an invalidation be lost).
#[derive(Clone)]
pub struct NearCache {
    far: RedisCache,
    near: Arc<Near>,
    /// Counts the reads the near tier answered.
    hits: Option<prometheus::IntCounter>,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("namespace", &self.near.namespace)
            .finish()
    }
}

impl NearCache {
    /// The cache at `url`, keys under `prefix`, and its tracking connection (RESP3), both
    /// connecting in the background: the near tier is bypassed until tracking is armed on a
    /// connection, and again whenever that connection is lost.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
        bytes: u64,
        ttl: Duration,
    ) -> Result<Self, CacheError> {
        let far = RedisCache::connect(url, prefix, timeout).await?;
        let tracker = keel_redis::client(url, timeout, keel_redis::Protocol::Resp3)
            .await
            .map_err(|e| error(&e))?;
        let near = Arc::new(Near {
            entries: moka::sync::Cache::builder()
                .weigher(|key: &String, value: &Bytes| crate::weight(key, value))
                .max_capacity(bytes)
                .time_to_live(ttl)
                .build(),
            tracking: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            losses: AtomicU64::new(0),
            connection: AtomicI64::new(0),
            namespace: far.namespace().to_owned(),
        });
        // Every connection after this is announced on `reconnects`, and tracking armed there;
        // one made already is armed below.
        let watched = Arc::downgrade(&near);
        tokio::spawn(follow_invalidations(
            tracker.invalidation_rx(),
            watched.clone(),
        ));
        tokio::spawn(follow_errors(tracker.error_rx(), watched.clone()));
        let reasons = Rearm {
            reconnects: tracker.reconnect_rx(),
            changes: far
                .client()
                .is_clustered()
                .then(|| far.client().cluster_change_rx()),
        };
        tokio::spawn(keep_armed(tracker.clone(), reasons, watched));
        if tracker.is_connected()
            && let Err(e) = track(&tracker, &near).await
        {
            tracing::warn!(error = %e, "cache tracking did not start; near tier off");
        }
        Ok(Self {
            far,
            near,
            hits: None,
        })
    }

    /// Counts in `hits` every read the near tier answers without asking Redis.
    #[must_use]
    pub fn counting(mut self, hits: prometheus::IntCounter) -> Self {
        self.hits = Some(hits);
        self
    }

    /// Whether the near tier is in use (invalidations are arriving).
    pub fn tracking(&self) -> bool {
        self.near.tracking.load(Ordering::SeqCst)
    }

    /// Whether the near tier holds `key` (a key as [`Cache`] callers name it).
    pub fn holds(&self, key: &str) -> bool {
        self.near.entries.contains_key(key)
    }

    /// How much of the bound (`bytes` at connect) the near tier's keys and values take now, by
    /// the weight the bound is counted in (for operators and tests).
    pub fn held_bytes(&self) -> u64 {
        self.near.entries.run_pending_tasks();
        self.near.entries.weighted_size()
    }

    /// The Redis client id of the tracking connection (`CLIENT LIST` shows it).
    pub fn tracking_connection(&self) -> i64 {
        self.near.connection.load(Ordering::SeqCst)
    }

    fn keep(&self, key: &str, value: &Bytes, epoch: u64) {
        let near = &self.near;
        if !near.tracking.load(Ordering::SeqCst) || near.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        // A copy: the value Redis's client hands back may be a slice of its read buffer, which a
        // kept slice would hold whole, past the bound the weigher counts.
        near.entries
            .insert(key.to_owned(), Bytes::copy_from_slice(value));
        // An invalidation that landed between the check and the insert wins.
        if near.epoch.load(Ordering::SeqCst) != epoch {
            near.entries.invalidate(key);
        }
    }

    fn near(&self, key: &str) -> Option<Bytes> {
        if !self.near.tracking.load(Ordering::SeqCst) {
            return None;
        }
        let value = self.near.entries.get(key);
        if let (Some(_), Some(hits)) = (&value, &self.hits) {
            hits.inc();
        }
        value
    }
}

/// Drops what Redis says changed from the near tier (all of it when some were missed), until
/// the tracker or the tier is gone.
async fn follow_invalidations(
    mut invalidations: tokio::sync::broadcast::Receiver<fred::types::client::Invalidation>,
    watched: std::sync::Weak<Near>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let message = invalidations.recv().await;
        let Some(near) = watched.upgrade() else {
            return;
        };
        match message {
            Ok(invalidation) if invalidation.keys.is_empty() => near.flush(),
            Ok(invalidation) => {
                for key in &invalidation.keys {
                    if let Some(key) = key.as_str() {
                        near.drop_key(key);
                    }
                }
            }
            // Some were missed: nothing near can be trusted.
            Err(RecvError::Lagged(_)) => near.flush(),
            Err(RecvError::Closed) => {
                near.tracking.store(false, Ordering::SeqCst);
                near.flush();
                return;
            }
        }
    }
}

/// Turns the near tier off (and empties it) whenever a tracking connection fails, or failures
/// were missed.
async fn follow_errors(
    mut errors: tokio::sync::broadcast::Receiver<(
        fred::error::Error,
        Option<fred::types::config::Server>,
    )>,
    watched: std::sync::Weak<Near>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let failure = errors.recv().await;
        let Some(near) = watched.upgrade() else {
            return;
        };
        match failure {
            Ok((e, _)) => {
                tracing::warn!(error = %e, "cache tracking connection failed; near tier off")
            }
            Err(RecvError::Lagged(_)) => {
                tracing::warn!("cache tracking failures missed; near tier off")
            }
            Err(RecvError::Closed) => return,
        }
        near.losses.fetch_add(1, Ordering::SeqCst);
        near.tracking.store(false, Ordering::SeqCst);
        near.flush();
    }
}

/// What makes the near tier arm its tracking again.
struct Rearm {
    /// Every new connection of the tracker.
    reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    /// On a cluster, the data client's finding that nodes came or went (a reshard onto a new
    /// primary): the tracker sends no command that names a key, is never redirected, and would
    /// not find out for itself.
    changes: Option<tokio::sync::broadcast::Receiver<Vec<fred::types::ClusterStateChange>>>,
}

/// Arms tracking again on every new connection of `tracker`, the near tier emptied first:
/// whatever changed while there was no connection was never reported. On a cluster, fred
/// announces each connection it makes as a reconnection, those to a failover's new primary
/// included, and tracking is armed on every primary again; when the data client finds nodes
/// added, the tracker reads the cluster's shape too (and connects to them). An arming that fails
/// is tried again each second, the tier off meanwhile.
async fn keep_armed(tracker: Client, mut reasons: Rearm, watched: std::sync::Weak<Near>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let changes = async {
            match &mut reasons.changes {
                Some(changes) => changes.recv().await.map(drop),
                None => std::future::pending().await,
            }
        };
        // A missed event (lagged) is a reason all the same.
        let (heard, reshaped) = tokio::select! {
            heard = reasons.reconnects.recv() => (heard.map(drop), false),
            heard = changes => (heard, true),
        };
        if matches!(heard, Err(RecvError::Closed)) {
            return;
        }
        if let Some(near) = watched.upgrade() {
            near.tracking.store(false, Ordering::SeqCst);
            near.flush();
        }
        if reshaped && let Err(e) = tracker.sync_cluster().await {
            tracing::warn!(error = %e, "cache tracking cannot read the cluster's shape");
        }
        loop {
            let Some(near) = watched.upgrade() else {
                return;
            };
            match track(&tracker, &near).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cache tracking did not restart; near tier off");
                }
            }
            drop(near);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Turns on broadcast tracking of `near`'s namespace on `tracker`'s connection: on each primary's
/// in a cluster, where fred's own `start_tracking` would arm one node of them, and a key
/// changed on the others would never be reported.
async fn track(tracker: &Client, near: &Near) -> Result<(), CacheError> {
    let losses = near.losses.load(Ordering::SeqCst);
    let primaries = tracker
        .cached_cluster_state()
        .map(|routing| routing.unique_primary_nodes());
    match primaries {
        Some(primaries) if tracker.is_clustered() => {
            for primary in primaries {
                let node = tracker.with_cluster_node(primary);
                // Armed again on a connection that still tracks, the same prefix is refused
                // as overlapping: off first.
                let _: () = node
                    .client_tracking(
                        "off",
                        None,
                        Vec::<String>::new(),
                        false,
                        false,
                        false,
                        false,
                    )
                    .await
                    .map_err(|e| error(&e))?;
                let _: () = node
                    .client_tracking(
                        "on",
                        None,
                        near.namespace.clone(),
                        true,
                        false,
                        false,
                        false,
                    )
                    .await
                    .map_err(|e| error(&e))?;
            }
        }
        _ => tracker
            .start_tracking(near.namespace.clone(), true, false, false, false)
            .await
            .map_err(|e| error(&e))?,
    }
    let id: i64 = tracker.client_id().await.map_err(|e| error(&e))?;
    near.connection.store(id, Ordering::SeqCst);
    near.flush();
    near.tracking.store(true, Ordering::SeqCst);
    // A connection lost since arming began (its node perhaps armed already): off again. Checked
    // after turning on, so that a loss reported in between is never overridden.
    if near.losses.load(Ordering::SeqCst) != losses {
        near.tracking.store(false, Ordering::SeqCst);
        near.flush();
        return Err(CacheError {
            backend: "redis",
            reason: "a tracking connection was lost while tracking was armed".into(),
        });
    }
    Ok(())
}

#[async_trait]
impl Cache for NearCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        if let Some(value) = self.near(key) {
            return Ok(Some(value));
        }
        let epoch = self.near.epoch.load(Ordering::SeqCst);
        let value = self.far.get(key).await?;
        if let Some(value) = &value {
            self.keep(key, value, epoch);
        }
        Ok(value)
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>, CacheError> {
        let mut values: Vec<Option<Bytes>> = keys.iter().map(|k| self.near(k)).collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| values[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(values);
        }
        let epoch = self.near.epoch.load(Ordering::SeqCst);
        let asked: Vec<String> = missing.iter().map(|&i| keys[i].clone()).collect();
        let found = self.far.get_many(&asked).await?;
        for (&i, value) in missing.iter().zip(found) {
            if let Some(value) = &value {
                self.keep(&keys[i], value, epoch);
            }
            values[i] = value;
        }
        Ok(values)
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, CacheError> {
        self.far.lease(key, ttl).await
    }

    async fn fill(
        &self,
        key: &str,
        lease: &Lease,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        self.far.fill(key, lease, value, ttl).await
    }

    async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        self.near.forget(key);
        self.far.invalidate(key).await
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
