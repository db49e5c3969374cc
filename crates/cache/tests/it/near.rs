//! The near tier: a value changed through one process leaves every other process's memory, and
//! while a process's invalidation stream is cut it serves nothing from memory.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::client::ClientKillFilter;
use keel_cache::{Cache, NearCache};

const TIMEOUT: Duration = Duration::from_millis(500);

/// Two processes' caches over one Redis and one prefix.
async fn replicas() -> (NearCache, NearCache, String) {
    let (url, prefix) = keel_testkit::fresh_prefix().await;
    replicas_on(url, &prefix).await
}

/// Two processes' caches over the Redis (or cluster) at `url`, under `prefix`.
async fn replicas_on(url: String, prefix: &str) -> (NearCache, NearCache, String) {
    let connect = || NearCache::connect(&url, prefix, TIMEOUT, 1 << 20, Duration::from_secs(60));
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    for cache in [&a, &b] {
        keel_testkit::eventually(Duration::from_secs(5), "tracking to start", || async {
            cache.tracking().then_some(())
        })
        .await;
    }
    (a, b, url)
}

/// Stores `value` under `key` through `cache`, the way a read-through fill does.
async fn put(cache: &NearCache, key: &str, value: &'static str) {
    assert!(try_put(cache, key, value).await.unwrap());
}

/// [`put`], saying whether it could.
async fn try_put(
    cache: &NearCache,
    key: &str,
    value: &'static str,
) -> Result<bool, keel_cache::CacheError> {
    cache.invalidate(key).await?;
    let lease = cache.lease(key, Duration::from_secs(5)).await?;
    let value = Bytes::from_static(value.as_bytes());
    cache
        .fill(key, &lease, value, Duration::from_secs(60))
        .await
}

/// Reads `key` through `cache` until its memory keeps it: a read that an invalidation crossed
/// (the writer's own, arriving late) is not kept.
async fn kept(cache: &NearCache, key: &str) {
    keel_testkit::eventually(Duration::from_secs(30), "a copy kept in memory", || async {
        let _ = cache.get(key).await;
        cache.holds(key).then_some(())
    })
    .await;
}

async fn dropped(cache: &NearCache, key: &str, what: &str) {
    keel_testkit::eventually(Duration::from_secs(5), what, || async {
        (!cache.holds(key)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_change_through_one_replica_leaves_the_others_memory() {
    let (a, b, _) = replicas().await;
    put(&a, "products:1", "v1").await;
    assert_eq!(b.get("products:1").await.unwrap().unwrap(), "v1");
    assert!(b.holds("products:1"), "served from memory from now on");
    assert_eq!(b.get("products:1").await.unwrap().unwrap(), "v1");

    put(&a, "products:1", "v2").await;
    dropped(&b, "products:1", "Redis to invalidate b's copy").await;
    assert_eq!(b.get("products:1").await.unwrap().unwrap(), "v2");
}

/// On a Redis Cluster, a change on any primary leaves the other process's memory: tracking is
/// armed on each primary, not on the one node a single `CLIENT TRACKING` would reach. The keys
/// are chosen to fall in each primary's third of the slots.
#[tokio::test]
async fn on_a_cluster_a_change_on_any_primary_leaves_the_others_memory() {
    let cluster = keel_testkit::RedisCluster::running().await;
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let (a, b, _) = replicas_on(cluster.url, &prefix).await;
    let mut keys: Vec<String> = Vec::new();
    for third in 0..3u16 {
        let key = (0..)
            .map(|n| format!("products:{n}"))
            .find(|key| fred::util::redis_keyslot(key.as_bytes()) / 5462 == third)
            .unwrap();
        keys.push(key);
    }
    for key in &keys {
        put(&a, key, "v1").await;
        assert_eq!(b.get(key).await.unwrap().unwrap(), "v1");
        assert!(b.holds(key), "{key} served from memory from now on");
    }
    for key in &keys {
        put(&a, key, "v2").await;
        dropped(&b, key, "the cluster to invalidate b's copy").await;
        assert_eq!(b.get(key).await.unwrap().unwrap(), "v2");
    }
}

/// A primary of a cluster dies and its replica takes over. A value changed once the replica
/// serves is never answered from the other process's memory as it was before, and a change
/// after that leaves its memory too: tracking is armed on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_no_copy_from_before_is_served_and_changes_still_arrive() {
    let cluster = keel_testkit::RedisCluster::dedicated(1).await;
    let (a, b, _) = replicas_on(cluster.url.clone(), "p:").await;
    let key = "products:9";
    put(&a, key, "v1").await;
    kept(&b, key).await;

    // The key's hash tag is the key itself: its slot's primary dies.
    let slot = fred::util::redis_keyslot(key.as_bytes());
    cluster.primary_of(slot).expect("the key's primary").kill();
    keel_testkit::eventually(
        Duration::from_secs(30),
        "a write on the new primary",
        || async { try_put(&a, key, "v2").await.ok().filter(|filled| *filled) },
    )
    .await;
    keel_testkit::eventually(Duration::from_secs(30), "b to read the change", || async {
        let read = b.get(key).await.ok().flatten();
        assert_ne!(
            read.as_deref(),
            Some(&b"v1"[..]),
            "a copy from before served"
        );
        (read.as_deref() == Some(&b"v2"[..])).then_some(())
    })
    .await;

    kept(&b, key).await;
    put(&a, key, "v3").await;
    dropped(&b, key, "the new primary to invalidate b's copy").await;
    assert_eq!(b.get(key).await.unwrap().unwrap(), "v3");
}

/// A key's slot resharded onto a primary that joined the cluster after the near tiers armed:
/// a change there still leaves the other process's memory. The tracker sends no command that
/// names a key, so it is never redirected; the data client's finding that a node was added is
/// what makes it connect there and arm it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_resharded_onto_a_new_primary_is_tracked_there() {
    let mut cluster = keel_testkit::RedisCluster::dedicated(0).await;
    let (a, b, _) = replicas_on(cluster.url.clone(), "p:").await;
    let key = "products:5";
    put(&a, key, "v1").await;
    kept(&b, key).await;

    let joined = cluster.add_primary().await;
    let slot = fred::util::redis_keyslot(key.as_bytes());
    let moved = cluster.clone();
    tokio::task::spawn_blocking(move || moved.move_slot(slot, &joined))
        .await
        .unwrap();
    // The migration deletes the key where it was, which reports it.
    dropped(&b, key, "the migration to drop b's copy").await;
    put(&a, key, "v2").await;
    for value in ["v3", "v4"] {
        // b reads the key from the new primary (its client redirected there), and keeps it.
        kept(&b, key).await;
        put(&a, key, value).await;
        dropped(&b, key, "the new primary to invalidate b's copy").await;
        assert_eq!(b.get(key).await.unwrap().unwrap(), value);
    }
}

#[tokio::test]
async fn a_cut_tracking_connection_empties_the_memory_and_reads_go_to_redis() {
    let (a, b, url) = replicas().await;
    put(&a, "users:7", "ada").await;
    assert_eq!(b.get("users:7").await.unwrap().unwrap(), "ada");
    assert!(b.holds("users:7"));

    let admin = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    admin.init().await.unwrap();
    let killed: i64 = admin
        .client_kill(vec![ClientKillFilter::ID(
            b.tracking_connection().to_string(),
        )])
        .await
        .unwrap();
    assert_eq!(killed, 1);
    dropped(&b, "users:7", "the near tier to be flushed").await;

    put(&a, "users:7", "grace").await;
    assert_eq!(b.get("users:7").await.unwrap().unwrap(), "grace");
}

/// The memory holds at most its bound in keys and values: values read past it are not all kept,
/// and those kept still answer from memory.
#[tokio::test]
async fn the_memory_holds_at_most_its_bound() {
    const BOUND: u64 = 1 << 20;
    let (url, prefix) = keel_testkit::fresh_prefix().await;
    let cache = NearCache::connect(&url, &prefix, TIMEOUT, BOUND, Duration::from_secs(60))
        .await
        .unwrap();
    keel_testkit::eventually(Duration::from_secs(5), "tracking to start", || async {
        cache.tracking().then_some(())
    })
    .await;
    let value = Bytes::from(vec![7u8; 64 * 1024]);
    let keys: Vec<String> = (0..64).map(|i| format!("things/{i}")).collect();
    for key in &keys {
        let lease = cache.lease(key, Duration::from_secs(5)).await.unwrap();
        let filled = cache.fill(key, &lease, value.clone(), TIMEOUT * 20);
        assert!(filled.await.unwrap());
        assert_eq!(cache.get(key).await.unwrap(), Some(value.clone()));
    }
    let held = cache.held_bytes();
    assert!(held <= BOUND, "{held} bytes held past a bound of {BOUND}");
    let kept = keys.iter().filter(|key| cache.holds(key)).count();
    assert!(
        (1..=16).contains(&kept),
        "{kept} values of 64 KiB kept under a bound of 1 MiB"
    );
}
