//! The relay: one process at a time hands each due job to Redis once, marks it handed only
//! once Redis took it, and hands every waiting job again, once, when Redis comes back empty.

use std::time::Duration;

use fred::prelude::{ClientLike as _, KeysInterface as _, StreamsInterface as _};
use keel_queue::{JobStore, Queue, QueueMetrics, stream_key};
use sea_orm_migration::MigratorTrait as _;

use super::{counter, database, for_later, job};

/// What a queue and its relay come with: the registry of its metrics, and what stops the relay
/// (dropped).
type Relayed = (
    Queue,
    prometheus::Registry,
    tokio::sync::oneshot::Sender<()>,
);

/// A queue of `db` on Redis at `url` under `prefix` whose relay runs until the sender drops,
/// with the registry its metrics are in.
async fn relayed(db: sea_orm::DatabaseConnection, url: &str, prefix: &str) -> Relayed {
    relayed_polling(db, url, prefix, Duration::from_millis(50)).await
}

/// [`relayed`], with a relay that looks again `poll` apart when nothing wakes it.
async fn relayed_polling(
    db: sea_orm::DatabaseConnection,
    url: &str,
    prefix: &str,
    poll: Duration,
) -> Relayed {
    let registry = prometheus::Registry::new();
    let metrics = QueueMetrics::register(&registry).unwrap();
    let queue = Queue::streams(db, url, prefix, metrics).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    queue.spawn_relay(poll, async move {
        let _ = stopped.await;
    });
    (queue, registry, stop)
}

/// A plain client of the Redis at `url`.
async fn client(url: &str) -> fred::prelude::Client {
    let client = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

/// Waits until the stream at `key` holds `n` entries (the Redis at `url` may be restarting).
async fn until_stream_holds(url: &str, key: &str, n: u64) {
    keel_testkit::eventually(Duration::from_secs(30), "the stream to fill", || async {
        let client =
            fred::prelude::Builder::from_config(fred::prelude::Config::from_url(url).ok()?)
                .build()
                .ok()?;
        client.init().await.ok()?;
        let len: u64 = client.xlen(key).await.ok()?;
        let _ = client.quit().await;
        (len == n).then_some(())
    })
    .await;
}

/// Waits until counter `name` of `registry` reaches `n` (the relay counts after its mark).
async fn until_counted(registry: &prometheus::Registry, name: &str, n: usize) {
    keel_testkit::eventually(Duration::from_secs(30), name, || async {
        (counter(registry, name) >= n as f64).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_is_handed_every_waiting_job_again_once() {
    const JOBS: usize = 200;
    let redis = keel_testkit::Redis::dedicated().await;
    let (db, _) = database(true).await;
    let (queue, registry, _relay) = relayed(db, &redis.url, "restarted:").await;
    for _ in 0..JOBS {
        queue.store().enqueue(job("k")).await.unwrap();
    }
    queue.wake();
    let stream = stream_key("restarted:", "k");
    until_stream_holds(&redis.url, &stream, JOBS as u64).await;
    let handed = |name| counter(&registry, name);
    until_counted(&registry, "keel_queue_relay_handed_total", JOBS).await;

    // No worker ran them: Redis restarts without them, and the relay's own client reconnects.
    let redis = redis.restart_empty().await;
    until_stream_holds(&redis.url, &stream, JOBS as u64).await;
    assert_eq!(handed("keel_queue_relay_handed_again_total"), JOBS as f64);
    // A job written now reaches the stream through the relay (no worker sweeps the table here).
    queue.store().enqueue(job("k")).await.unwrap();
    queue.wake();
    until_stream_holds(&redis.url, &stream, JOBS as u64 + 1).await;
    until_counted(&registry, "keel_queue_relay_handed_total", 2 * JOBS + 1).await;
    assert_eq!(
        handed("keel_queue_relay_handed_total"),
        (2 * JOBS + 1) as f64,
        "each job handed once before the restart and once after"
    );
    assert_eq!(handed("keel_queue_relay_handed_again_total"), JOBS as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_hand_each_job_once() {
    const ROUNDS: usize = 10;
    const JOBS: usize = 50;
    let redis = keel_testkit::Redis::shared().unwrap();
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let url = keel_testkit::fresh_database().await;
    // Two processes: a pool each, one database.
    let connect = || async { sea_orm::Database::connect(&url).await.unwrap() };
    keel_queue::Migrator::up(&connect().await, None)
        .await
        .unwrap();
    let (a, a_metrics, _a) = relayed(connect().await, &redis.url, &prefix).await;
    let (b, b_metrics, _b) = relayed(connect().await, &redis.url, &prefix).await;
    // Both relays are woken by every write: each would hand the same rows if both relayed.
    for _ in 0..ROUNDS {
        for _ in 0..JOBS {
            a.store().enqueue(job("k")).await.unwrap();
        }
        a.wake();
        b.wake();
    }
    let total = (ROUNDS * JOBS) as f64;
    let handed = || {
        counter(&a_metrics, "keel_queue_relay_handed_total")
            + counter(&b_metrics, "keel_queue_relay_handed_total")
    };
    keel_testkit::eventually(Duration::from_secs(30), "every job handed", || async {
        (handed() >= total).then_some(())
    })
    .await;
    assert_eq!(handed(), total, "a job was handed twice");
    until_stream_holds(&redis.url, &stream_key(&prefix, "k"), total as u64).await;
    let relaying =
        counter(&a_metrics, "keel_queue_relaying") + counter(&b_metrics, "keel_queue_relaying");
    assert_eq!(relaying, 1.0, "one relay at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_marked_handed_only_once_redis_took_it() {
    let redis = keel_testkit::Redis::dedicated().await;
    let prefix = "refused:";
    let (db, _) = database(true).await;
    let store = JobStore::new(db.clone());
    // The stream's key holds a string: Redis refuses every XADD to it (WRONGTYPE).
    let stream = stream_key(prefix, "k");
    let admin = client(&redis.url).await;
    let (): () = admin
        .set(&stream, "not a stream", None, None, false)
        .await
        .unwrap();
    let (queue, registry, _relay) = relayed(db, &redis.url, prefix).await;
    let written = store.enqueue(job("k")).await.unwrap();
    queue.wake();
    // The relay tried, and Redis refused.
    keel_testkit::eventually(Duration::from_secs(10), "a refused XADD", || async {
        (failed_xadds(&admin).await? >= 1).then_some(())
    })
    .await;
    let unhanded = store.unhanded(10).await.unwrap();
    assert_eq!(
        unhanded.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        [written.id.as_str()],
        "a job Redis refused stays to be handed"
    );
    assert_eq!(counter(&registry, "keel_queue_relay_handed_total"), 0.0);
    // Redis takes it once the key is a stream's again.
    let (): () = admin.del(&stream).await.unwrap();
    queue.wake();
    until_stream_holds(&redis.url, &stream, 1).await;
    keel_testkit::eventually(Duration::from_secs(10), "the mark", || async {
        store.unhanded(10).await.ok()?.is_empty().then_some(())
    })
    .await;
}

/// How many XADD commands Redis refused (`failed_calls` in INFO commandstats).
async fn failed_xadds(client: &fred::prelude::Client) -> Option<u64> {
    use fred::types::{ClusterHash, CustomCommand};
    let info = CustomCommand::new_static("INFO", ClusterHash::FirstKey, false);
    let info: String = client.custom(info, vec!["commandstats"]).await.ok()?;
    let line = info.lines().find(|l| l.starts_with("cmdstat_xadd:"))?;
    let failed = line
        .split(',')
        .find_map(|f| f.strip_prefix("failed_calls="))?;
    failed.parse().ok()
}

async fn a_mark_is_for_the_row_as_read_and_only_by_the_lease_holder(
    db: sea_orm::DatabaseConnection,
) {
    use sea_orm::ConnectionTrait as _;
    let store = JobStore::new(db.clone());
    let written = store.enqueue(job("k")).await.unwrap();
    let read = store.unhanded(10).await.unwrap();
    // Not holding the relay's lease: nothing is marked.
    store.handed(&read, "me").await.unwrap();
    assert_eq!(store.unhanded(10).await.unwrap(), read);
    assert!(
        store
            .lease("relay", "me", Duration::from_secs(60))
            .await
            .unwrap()
    );
    // The job lived on meanwhile (a dead job retried starts its attempts at 0 again): the mark
    // was for the row as read, not for this one.
    let backend = db.get_database_backend();
    db.execute_raw(sea_orm::Statement::from_sql_and_values(
        backend,
        "UPDATE queue_jobs SET updated_at = updated_at + 1 WHERE id = $1",
        vec![written.id.clone().into()],
    ))
    .await
    .unwrap();
    store.handed(&read, "me").await.unwrap();
    assert_eq!(
        store.unhanded(10).await.unwrap().len(),
        1,
        "a later life stays unhanded"
    );
    let again = store.unhanded(10).await.unwrap();
    store.handed(&again, "me").await.unwrap();
    assert!(store.unhanded(10).await.unwrap().is_empty());
}

on_both_databases!(a_mark_is_for_the_row_as_read_and_only_by_the_lease_holder);

/// The relay hands a job written for later when it comes due: it waits for the soonest waiting
/// job not yet handed, not for its poll (an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_written_for_later_is_handed_when_it_comes_due() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let (db, _) = database(true).await;
    let hour = Duration::from_secs(3600);
    let (queue, _registry, _relay) = relayed_polling(db, &redis.url, &prefix, hour).await;
    queue.store().enqueue(for_later("k")).await.unwrap();
    queue.wake();
    until_stream_holds(&redis.url, &stream_key(&prefix, "k"), 1).await;
}

/// On a Redis Cluster the relay's marker holds the run id of the primary that holds the
/// queue's keys, the node whose restart or failover may lose what it was handed (INFO asked of
/// whichever node a key-less command lands on would watch another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_marker_follows_the_node_that_holds_the_queue() {
    use fred::prelude::ClientLike as _;
    use fred::types::{ClusterHash, CustomCommand};
    let cluster = keel_testkit::RedisCluster::dedicated(0).await;
    let (db, _) = database(true).await;
    let prefix = "m:";
    let (_queue, _registry, _relay) = relayed(db, &cluster.url, prefix).await;
    let marker = keel_queue::marker_key(prefix);
    let slot = fred::util::redis_keyslot(marker.as_bytes());
    let node = client(&cluster.primary_of(slot).expect("the queue's primary").url).await;
    let info = CustomCommand::new_static("INFO", ClusterHash::FirstKey, false);
    let info: String = node.custom(info, vec!["server"]).await.unwrap();
    let run_id = info
        .lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(str::trim)
        .expect("a run id")
        .to_owned();
    let reader = client(&cluster.url).await;
    keel_testkit::eventually(Duration::from_secs(20), "the marker", || async {
        let found: Option<String> = reader.get(&marker).await.ok()?;
        (found? == run_id).then_some(())
    })
    .await;
}
