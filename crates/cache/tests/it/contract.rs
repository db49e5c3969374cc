//! One contract, three backends: every test runs on the in-process cache, on Redis, and on a
//! Redis Cluster of three primaries (where a command whose keys span slots is refused).

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keel_cache::{Cache, CacheAside, CacheMetrics, MemoryCache, RedisCache};

const TIMEOUT: Duration = Duration::from_millis(250);

async fn memory() -> Arc<dyn Cache> {
    Arc::new(MemoryCache::new(1 << 20))
}

async fn redis() -> Arc<dyn Cache> {
    let (url, prefix) = keel_testkit::fresh_prefix().await;
    Arc::new(RedisCache::connect(&url, &prefix, TIMEOUT).await.unwrap())
}

async fn cluster() -> Arc<dyn Cache> {
    let cluster = keel_testkit::RedisCluster::running().await;
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    Arc::new(
        RedisCache::connect(&cluster.url, &prefix, TIMEOUT)
            .await
            .unwrap(),
    )
}

fn aside(cache: Arc<dyn Cache>) -> (CacheAside, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = CacheMetrics::register(&registry).unwrap();
    (
        CacheAside::new(cache, "things", Duration::from_secs(60), metrics),
        registry,
    )
}

fn counter(registry: &prometheus::Registry, result: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "keel_cache_requests_total")
        .flat_map(|f| f.get_metric().iter())
        .find(|m| m.get_label().iter().any(|l| l.value() == result))
        .map_or(0, |m| m.get_counter().get_value() as u64)
}

/// Runs each scenario, an `async fn(Arc<dyn Cache>)`, on every backend, as the tests
/// `<scenario>::memory`, `<scenario>::redis` and `<scenario>::cluster`.
macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test]
                async fn memory() {
                    super::$scenario(super::memory().await).await
                }

                #[tokio::test]
                async fn redis() {
                    super::$scenario(super::redis().await).await
                }

                #[tokio::test]
                async fn cluster() {
                    super::$scenario(super::cluster().await).await
                }
            }
        )*
    };
}

async fn a_leased_fill_is_read_back(cache: Arc<dyn Cache>) {
    assert_eq!(cache.get("k").await.unwrap(), None);
    let lease = cache.lease("k", Duration::from_secs(5)).await.unwrap();
    assert!(
        cache
            .fill(
                "k",
                &lease,
                Bytes::from_static(b"v"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
}

async fn an_invalidation_voids_outstanding_leases(cache: Arc<dyn Cache>) {
    // A reader leases, reads the old row; a writer commits and invalidates; the reader's
    // fill must not put the old row back.
    let lease = cache.lease("k", Duration::from_secs(5)).await.unwrap();
    cache.invalidate("k").await.unwrap();
    assert!(
        !cache
            .fill(
                "k",
                &lease,
                Bytes::from_static(b"stale"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
    assert_eq!(cache.get("k").await.unwrap(), None);
}

async fn a_lease_is_spent_by_its_fill(cache: Arc<dyn Cache>) {
    let lease = cache.lease("k", Duration::from_secs(5)).await.unwrap();
    assert!(
        cache
            .fill(
                "k",
                &lease,
                Bytes::from_static(b"1"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
    assert!(
        !cache
            .fill(
                "k",
                &lease,
                Bytes::from_static(b"2"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some(Bytes::from_static(b"1"))
    );
}

async fn a_newer_lease_supersedes_an_older_one(cache: Arc<dyn Cache>) {
    let old = cache.lease("k", Duration::from_secs(5)).await.unwrap();
    let new = cache.lease("k", Duration::from_secs(5)).await.unwrap();
    assert!(
        !cache
            .fill(
                "k",
                &old,
                Bytes::from_static(b"old"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
    assert!(
        cache
            .fill(
                "k",
                &new,
                Bytes::from_static(b"new"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
}

async fn entries_expire_after_their_ttl(cache: Arc<dyn Cache>) {
    let ttl = Duration::from_secs(1);
    let lease = cache.lease("k", Duration::from_secs(5)).await.unwrap();
    let before_fill = std::time::Instant::now();
    let filled = cache
        .fill("k", &lease, Bytes::from_static(b"v"), ttl)
        .await
        .unwrap();
    assert!(filled, "the fill was stored");
    let read = cache.get("k").await.unwrap();
    // Held for its TTL: a read that began within it sees the value. (Only a machine stalled for
    // the whole TTL could read later; then the read proves nothing and says so.)
    if before_fill.elapsed() < ttl {
        assert_eq!(read.as_deref(), Some(&b"v"[..]), "held until its TTL");
    } else {
        eprintln!("the read came after the TTL; holding was not observed");
    }
    keel_testkit::eventually(Duration::from_secs(10), "the entry to expire", || {
        let cache = cache.clone();
        async move { cache.get("k").await.unwrap().is_none().then_some(()) }
    })
    .await;
}

async fn concurrent_misses_on_one_key_load_once(cache: Arc<dyn Cache>) {
    let (aside, registry) = aside(cache);
    let loads = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for _ in 0..50 {
        let (aside, loads, mut rx) = (aside.clone(), loads.clone(), rx.clone());
        readers.push(tokio::spawn(async move {
            aside
                .get_or_load("cold", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    // Hold the load open until every reader has arrived.
                    let _ = rx.wait_for(|open| *open).await;
                    Ok::<_, ()>(Some(7u64))
                })
                .await
                .unwrap()
        }));
    }
    keel_testkit::eventually(Duration::from_secs(5), "every reader to miss", || {
        let registry = registry.clone();
        async move { (counter(&registry, "miss") == 50).then_some(()) }
    })
    .await;
    tx.send(true).unwrap();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), Some(7));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1, "single flight");
    drop(rx);
}

async fn a_failed_load_reaches_every_waiter_and_the_next_read_tries_again(cache: Arc<dyn Cache>) {
    let (aside, registry) = aside(cache);
    let loads = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for _ in 0..50 {
        let (aside, loads, mut rx) = (aside.clone(), loads.clone(), rx.clone());
        readers.push(tokio::spawn(async move {
            aside
                .get_or_load("down", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.wait_for(|open| *open).await;
                    Err::<Option<u64>, _>("the database is down")
                })
                .await
        }));
    }
    keel_testkit::eventually(Duration::from_secs(5), "every reader to miss", || {
        let registry = registry.clone();
        async move { (counter(&registry, "miss") == 50).then_some(()) }
    })
    .await;
    tx.send(true).unwrap();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), Err("the database is down"));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one load, its error shared"
    );
    assert_eq!(aside.flights_in_progress(), 0);
    let again = aside
        .get_or_load("down", || async { Ok::<_, &str>(Some(5u64)) })
        .await;
    assert_eq!(again, Ok(Some(5)), "the next read loads again");
    drop(rx);
}

async fn a_cancelled_leader_hands_the_load_over(cache: Arc<dyn Cache>) {
    let (aside, registry) = aside(cache);
    let leader = {
        let aside = aside.clone();
        tokio::spawn(async move {
            aside
                .get_or_load("slow", std::future::pending::<Result<Option<u64>, ()>>)
                .await
        })
    };
    keel_testkit::eventually(Duration::from_secs(5), "the leader to load", || {
        let aside = aside.clone();
        async move { (aside.flights_in_progress() == 1).then_some(()) }
    })
    .await;
    let mut waiters = Vec::new();
    for _ in 0..10 {
        let aside = aside.clone();
        waiters.push(tokio::spawn(async move {
            aside
                .get_or_load("slow", || async { Ok::<_, ()>(Some(9u64)) })
                .await
        }));
    }
    keel_testkit::eventually(Duration::from_secs(5), "every waiter to miss", || {
        let registry = registry.clone();
        async move { (counter(&registry, "miss") == 11).then_some(()) }
    })
    .await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap(), Ok(Some(9)), "a waiter took over");
    }
    assert_eq!(aside.flights_in_progress(), 0, "no flight left behind");
}

async fn a_read_after_an_invalidation_never_joins_a_load_that_began_before_it(
    cache: Arc<dyn Cache>,
) {
    let (aside, _) = aside(cache);
    // A load that read the old value is still in flight when the write commits.
    let (release, released) = tokio::sync::watch::channel(false);
    let before = {
        let (aside, mut released) = (aside.clone(), released.clone());
        tokio::spawn(async move {
            aside
                .get_or_load("price", || async move {
                    let _ = released.wait_for(|go| *go).await;
                    Ok::<_, ()>(Some(1u64))
                })
                .await
        })
    };
    keel_testkit::eventually(Duration::from_secs(5), "the old load to start", || {
        let aside = aside.clone();
        async move { (aside.flights_in_progress() == 1).then_some(()) }
    })
    .await;
    aside.invalidate("price").await;
    // A read that starts after the write loads afresh instead of waiting for the old value.
    let after = tokio::time::timeout(
        Duration::from_secs(5),
        aside.get_or_load("price", || async { Ok::<_, ()>(Some(2u64)) }),
    )
    .await
    .expect("the read after the write waited for a load from before it");
    assert_eq!(after, Ok(Some(2)));
    release.send(true).unwrap();
    assert_eq!(
        before.await.unwrap(),
        Ok(Some(1)),
        "the old reader keeps its answer"
    );
    drop(released);
}

async fn read_through_counts_hits_and_misses(cache: Arc<dyn Cache>) {
    let (aside, registry) = aside(cache);
    for _ in 0..3 {
        let v = aside
            .get_or_load("k", || async { Ok::<_, ()>(Some(42u64)) })
            .await
            .unwrap();
        assert_eq!(v, Some(42));
    }
    assert_eq!(
        (counter(&registry, "hit"), counter(&registry, "miss")),
        (2, 1)
    );
    aside.invalidate("k").await;
    let v = aside
        .get_or_load("k", || async { Ok::<_, ()>(Some(43u64)) })
        .await
        .unwrap();
    assert_eq!(v, Some(43), "invalidated entries are loaded again");
}

async fn absent_values_are_not_cached(cache: Arc<dyn Cache>) {
    let (aside, _) = aside(cache);
    let none = aside
        .get_or_load("k", || async { Ok::<Option<u64>, ()>(None) })
        .await
        .unwrap();
    assert_eq!(none, None);
    let some = aside
        .get_or_load("k", || async { Ok::<_, ()>(Some(1u64)) })
        .await
        .unwrap();
    assert_eq!(some, Some(1));
}

/// Many keys read at once come back in the order asked, each its own value or none: on a
/// cluster, keys of many slots (one MGET per slot).
async fn many_keys_read_at_once_come_back_in_order(cache: Arc<dyn Cache>) {
    let keys: Vec<String> = (0..40).map(|n| format!("things:{n}")).collect();
    for key in keys.iter().step_by(2) {
        let lease = cache.lease(key, Duration::from_secs(5)).await.unwrap();
        let value = Bytes::from(key.clone());
        assert!(
            cache
                .fill(key, &lease, value, Duration::from_secs(60))
                .await
                .unwrap()
        );
    }
    let values = cache.get_many(&keys).await.unwrap();
    let expected: Vec<Option<Bytes>> = keys
        .iter()
        .enumerate()
        .map(|(n, key)| (n % 2 == 0).then(|| Bytes::from(key.clone())))
        .collect();
    assert_eq!(values, expected);
}

on_every_backend!(
    many_keys_read_at_once_come_back_in_order,
    a_leased_fill_is_read_back,
    an_invalidation_voids_outstanding_leases,
    a_lease_is_spent_by_its_fill,
    a_newer_lease_supersedes_an_older_one,
    entries_expire_after_their_ttl,
    concurrent_misses_on_one_key_load_once,
    a_failed_load_reaches_every_waiter_and_the_next_read_tries_again,
    a_cancelled_leader_hands_the_load_over,
    a_read_after_an_invalidation_never_joins_a_load_that_began_before_it,
    read_through_counts_hits_and_misses,
    absent_values_are_not_cached
);

#[tokio::test]
async fn a_dead_redis_falls_through_to_the_loader() {
    let redis = keel_testkit::Redis::dedicated().await;
    let cache: Arc<dyn Cache> = Arc::new(
        RedisCache::connect(&redis.url, "p:", TIMEOUT)
            .await
            .unwrap(),
    );
    let (aside, registry) = aside(cache);
    assert_eq!(
        aside
            .get_or_load("k", || async { Ok::<_, ()>(Some(1u64)) })
            .await
            .unwrap(),
        Some(1)
    );
    redis.kill();
    for _ in 0..3 {
        let v = aside
            .get_or_load("k", || async { Ok::<_, ()>(Some(2u64)) })
            .await
            .unwrap();
        assert_eq!(v, Some(2), "answered by the loader");
    }
    aside.invalidate("k").await;
    assert_eq!(counter(&registry, "error"), 3);
}

#[tokio::test]
async fn a_new_cache_reads_zero_in_every_series_before_its_first_read() {
    let (_, registry) = aside(memory().await);
    let mut series: Vec<(String, String)> = registry
        .gather()
        .iter()
        .flat_map(|f| f.get_metric().iter().map(move |m| (f.name().to_owned(), m)))
        .map(|(name, m)| {
            assert_eq!(m.get_counter().get_value(), 0.0);
            let result = m.get_label().iter().find(|l| l.name() == "result");
            (
                name,
                result.map(|r| r.value().to_owned()).unwrap_or_default(),
            )
        })
        .collect();
    series.sort();
    let expected = [
        ("keel_cache_invalidations_total", "error"),
        ("keel_cache_invalidations_total", "ok"),
        ("keel_cache_near_hits_total", ""),
        ("keel_cache_requests_total", "error"),
        ("keel_cache_requests_total", "hit"),
        ("keel_cache_requests_total", "miss"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(n, r)| ((*n).to_owned(), (*r).to_owned()))
        .collect();
    assert_eq!(series, expected);
}
