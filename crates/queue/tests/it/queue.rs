//! The queue's contract, on SQLite and on PostgreSQL: a job exists exactly when its transaction
//! committed, a unique key yields one live job, a request id is replayed, a failing job dies after
//! its attempts with its last error and comes back when retried, a lease that runs out hands the
//! job to another worker, a kind's limit holds across workers, scheduled jobs wait, and workers
//! run handlers to the end — through Redis Streams too, and without Redis when it stops; one
//! relay hands each job to Redis once, again only when Redis lost it; finished jobs are deleted
//! after their retention window; a kind with slots of its own runs that many at once; a limited
//! kind's freed slot is taken at once.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_queue::job::now_ms;
use keel_queue::{
    Backoff, Failure, Handler, Job, JobStore, Kind, NewJob, Queue, QueueError, QueueMetrics, State,
    Worker, WorkerOptions,
};
use sea_orm::{DatabaseConnection, TransactionTrait as _};

use crate::database;
use serde_json::json;

fn job(kind: &str) -> NewJob {
    NewJob {
        kind: kind.into(),
        payload: json!({"n": 1}),
        creator: "test".into(),
        ..NewJob::default()
    }
}

/// A job of `kind` written to run 300 ms from now.
fn for_later(kind: &str) -> keel_queue::NewJob {
    keel_queue::NewJob {
        run_after: Some(now_ms() + 300),
        ..job(kind)
    }
}

/// The value of the unlabelled counter or gauge `name` in `registry` (0 when absent).
fn counter(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

const LEASE: Duration = Duration::from_secs(30);

async fn a_job_exists_exactly_when_its_transaction_commits(db: DatabaseConnection) {
    let store = JobStore::new(db.clone());
    let txn = db.begin().await.unwrap();
    let rolled_back = keel_queue::enqueue(&txn, job("k")).await.unwrap();
    txn.rollback().await.unwrap();
    assert_eq!(store.get(&rolled_back.id).await.unwrap(), None);
    let txn = db.begin().await.unwrap();
    let committed = keel_queue::enqueue(&txn, job("k")).await.unwrap();
    txn.commit().await.unwrap();
    let stored = store.get(&committed.id).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.attempts), (State::Queued, 0));
}

async fn a_unique_key_yields_one_live_job(db: DatabaseConnection) {
    let store = JobStore::new(db);
    let keyed = || NewJob {
        unique_key: Some("welcome:ada".into()),
        ..job("k")
    };
    let first = store.enqueue(keyed()).await.unwrap();
    let second = store.enqueue(keyed()).await.unwrap();
    assert_eq!(
        first.id, second.id,
        "a second job with a live key is the first"
    );
    let claimed = store.claim("w", "k", None, 10, LEASE, None).await.unwrap();
    assert!(store.succeed(&claimed[0], "w").await.unwrap());
    let third = store.enqueue(keyed()).await.unwrap();
    assert_ne!(third.id, first.id, "once done, the key is free again");
}

async fn a_request_id_is_replayed_and_its_reuse_refused(db: DatabaseConnection) {
    let store = JobStore::new(db);
    let with = |hash: &str| NewJob {
        request: Some(("r1".into(), hash.into())),
        ..job("k")
    };
    let first = store.enqueue(with("h")).await.unwrap();
    assert_eq!(store.enqueue(with("h")).await.unwrap().id, first.id);
    assert!(matches!(
        store.enqueue(with("other")).await,
        Err(QueueError::RequestReused(_))
    ));
}

async fn a_failing_job_dies_after_its_attempts_and_comes_back_when_retried(db: DatabaseConnection) {
    let store = JobStore::new(db);
    let written = store
        .enqueue(NewJob {
            max_attempts: Some(3),
            ..job("k")
        })
        .await
        .unwrap();
    for attempt in 1..=3 {
        let claimed = store.claim("w", "k", None, 1, LEASE, None).await.unwrap();
        assert_eq!(claimed.len(), 1, "attempt {attempt} is due at once");
        assert_eq!(claimed[0].attempts, attempt);
        let state = store
            .fail(&claimed[0], "w", &format!("boom {attempt}"), Some(now_ms()))
            .await
            .unwrap();
        let expected = if attempt < 3 {
            State::Failed
        } else {
            State::Dead
        };
        assert_eq!(state, Some(expected));
    }
    let dead = store.get(&written.id).await.unwrap().unwrap();
    assert_eq!(
        (dead.state, dead.attempts, dead.last_error.as_deref()),
        (State::Dead, 3, Some("boom 3"))
    );
    assert!(
        store
            .claim("w", "k", None, 1, LEASE, None)
            .await
            .unwrap()
            .is_empty()
    );
    let back = store.retry(&written.id).await.unwrap();
    assert_eq!((back.state, back.attempts), (State::Queued, 0));
    assert!(matches!(
        store.retry(&written.id).await,
        Err(QueueError::NotDead { .. })
    ));
}

async fn a_lease_that_runs_out_hands_the_job_to_another_worker(db: DatabaseConnection) {
    let store = JobStore::new(db);
    store.enqueue(job("k")).await.unwrap();
    let short = Duration::from_millis(200);
    let first = store
        .claim("dead-worker", "k", None, 1, short, None)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        store
            .claim("other", "k", None, 1, LEASE, None)
            .await
            .unwrap()
            .is_empty(),
        "held while the lease lasts"
    );
    let taken =
        keel_testkit::eventually(Duration::from_secs(10), "the lease to run out", || async {
            let taken = store
                .claim("other", "k", None, 1, LEASE, None)
                .await
                .unwrap();
            (!taken.is_empty()).then_some(taken)
        })
        .await;
    assert_eq!(
        (taken[0].id.as_str(), taken[0].attempts),
        (first[0].id.as_str(), 2)
    );
    assert!(
        !store.succeed(&first[0], "dead-worker").await.unwrap(),
        "the first worker no longer holds it"
    );
    assert!(store.succeed(&taken[0], "other").await.unwrap());
}

async fn successes_recorded_together_mark_only_the_jobs_still_held(db: DatabaseConnection) {
    let store = JobStore::new(db);
    for _ in 0..3 {
        store.enqueue(job("k")).await.unwrap();
    }
    let short = Duration::from_millis(200);
    let held = store.claim("w", "k", None, 3, short, None).await.unwrap();
    assert_eq!(held.len(), 3);
    let taken =
        keel_testkit::eventually(Duration::from_secs(10), "the leases to run out", || async {
            let taken = store.claim("other", "k", None, 1, LEASE, None).await;
            taken.ok().filter(|t| !t.is_empty())
        })
        .await;
    let done = store.succeed_all(&held, "w").await.unwrap();
    let mut expected: Vec<&str> = held.iter().map(|j| j.id.as_str()).collect();
    expected.retain(|id| *id != taken[0].id);
    let mut marked: Vec<&str> = done.iter().map(String::as_str).collect();
    marked.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        marked, expected,
        "the one another worker took is not w's to mark"
    );
    for job in &held {
        let state = store.get(&job.id).await.unwrap().unwrap().state;
        let want = if job.id == taken[0].id {
            State::Running
        } else {
            State::Succeeded
        };
        assert_eq!(state, want, "{}", job.id);
    }
    assert!(store.succeed_all(&[], "w").await.unwrap().is_empty());
}

async fn a_kinds_limit_holds_across_workers(db: DatabaseConnection) {
    let store = JobStore::new(db);
    store.register_kind("limited").await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(store.enqueue(job("limited")).await.unwrap().id);
    }
    let a = store
        .claim("a", "limited", Some(2), 10, LEASE, None)
        .await
        .unwrap();
    assert_eq!(a.len(), 2);
    let b = store
        .claim("b", "limited", Some(2), 10, LEASE, None)
        .await
        .unwrap();
    assert!(b.is_empty(), "two run already");
    assert!(store.succeed(&a[0], "a").await.unwrap());
    let b = store
        .claim("b", "limited", Some(2), 10, LEASE, None)
        .await
        .unwrap();
    assert_eq!(b.len(), 1, "one slot came free");
    // Named jobs, as a stream hands them out, count against the limit too.
    assert!(store.succeed(&b[0], "b").await.unwrap());
    let named = store
        .claim("c", "limited", Some(2), ids.len(), LEASE, Some(&ids))
        .await
        .unwrap();
    assert_eq!(
        named.len(),
        1,
        "one slot came free, whatever the stream offered"
    );
}

async fn racing_claims_take_no_more_than_asked_and_no_job_twice(db: DatabaseConnection) {
    const JOBS: usize = 1000;
    const CLAIMERS: usize = 8;
    const BATCH: usize = 3;
    let store = JobStore::new(db);
    for _ in 0..JOBS {
        store.enqueue(job("raced")).await.unwrap();
    }
    // The relay updates the same rows meanwhile, as it does in production.
    let relay = tokio::spawn({
        let store = store.clone();
        async move {
            loop {
                store.lease("relay", "racer", LEASE).await.unwrap();
                let due = store.unhanded(50).await.unwrap();
                if due.is_empty() {
                    store.hand_again("racer").await.unwrap();
                }
                store.handed(&due, "racer").await.unwrap();
                tokio::task::yield_now().await;
            }
        }
    });
    let claimed = Arc::new(AtomicUsize::new(0));
    let mut claimers = Vec::new();
    for c in 0..CLAIMERS {
        let (store, claimed) = (store.clone(), claimed.clone());
        claimers.push(tokio::spawn(async move {
            let worker = format!("w{c}");
            let (mut taken, mut largest) = (Vec::new(), 0);
            // Until every job is claimed (an empty claim only means the rest are locked).
            while claimed.load(Ordering::SeqCst) < JOBS {
                let batch = store
                    .claim(&worker, "raced", None, BATCH, LEASE, None)
                    .await
                    .unwrap();
                claimed.fetch_add(batch.len(), Ordering::SeqCst);
                largest = largest.max(batch.len());
                taken.extend(batch.into_iter().map(|j| j.id));
            }
            (taken, largest)
        }));
    }
    let mut all = std::collections::HashSet::new();
    for claimer in claimers {
        let (taken, largest) = claimer.await.unwrap();
        assert!(largest <= BATCH, "a claim of {BATCH} took {largest}");
        for id in taken {
            assert!(all.insert(id), "a job was claimed twice");
        }
    }
    relay.abort();
    assert_eq!(all.len(), JOBS);
}

async fn a_scheduled_job_waits_until_it_is_due(db: DatabaseConnection) {
    let store = JobStore::new(db);
    store
        .enqueue(NewJob {
            run_after: Some(now_ms() + 60_000),
            ..job("later")
        })
        .await
        .unwrap();
    assert!(
        store
            .claim("w", "later", None, 1, LEASE, None)
            .await
            .unwrap()
            .is_empty()
    );
    let soon = store
        .enqueue(NewJob {
            run_after: Some(now_ms() + 300),
            ..job("soon")
        })
        .await
        .unwrap();
    let claimed =
        keel_testkit::eventually(Duration::from_secs(10), "the job to be due", || async {
            let claimed = store
                .claim("w", "soon", None, 1, LEASE, None)
                .await
                .unwrap();
            (!claimed.is_empty()).then_some(claimed)
        })
        .await;
    assert_eq!(claimed[0].id, soon.id);
}

/// Fails its first `failures` attempts of each job, then succeeds; counts attempts.
struct Flaky {
    failures: i32,
    attempts: AtomicUsize,
}

#[async_trait]
impl Handler for Flaky {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if job.attempts <= self.failures {
            Err(Failure::Retry(format!("attempt {} failed", job.attempts)))
        } else {
            Ok(())
        }
    }
}

fn options() -> WorkerOptions {
    WorkerOptions {
        concurrency: 4,
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        poll: Duration::from_millis(20),
        ..WorkerOptions::default()
    }
}

async fn until_done(store: &JobStore, ids: &[String]) {
    keel_testkit::eventually(Duration::from_secs(20), "every job to succeed", || async {
        for id in ids {
            if store.get(id).await.unwrap().unwrap().state != State::Succeeded {
                return None;
            }
        }
        Some(())
    })
    .await;
}

async fn workers_run_jobs_through_their_retries(queue: Queue) {
    let handler = Arc::new(Flaky {
        failures: 2,
        attempts: AtomicUsize::new(0),
    });
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(queue.store().enqueue(job("flaky")).await.unwrap().id);
    }
    queue.wake();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(
        queue.clone(),
        vec![Kind::new("flaky", handler.clone())],
        options(),
    )
    .spawn(async move {
        let _ = stopped.await;
    });
    until_done(queue.store(), &ids).await;
    for id in &ids {
        assert_eq!(queue.store().get(id).await.unwrap().unwrap().attempts, 3);
    }
    assert_eq!(handler.attempts.load(Ordering::SeqCst), 15);
    stop.send(()).unwrap();
    worker.await.unwrap();
}

mod batch;
mod pools;
mod relay;
mod retention;
mod wakeups;

on_both_databases!(
    a_job_exists_exactly_when_its_transaction_commits,
    a_unique_key_yields_one_live_job,
    a_request_id_is_replayed_and_its_reuse_refused,
    a_failing_job_dies_after_its_attempts_and_comes_back_when_retried,
    a_lease_that_runs_out_hands_the_job_to_another_worker,
    successes_recorded_together_mark_only_the_jobs_still_held,
    a_kinds_limit_holds_across_workers,
    racing_claims_take_no_more_than_asked_and_no_job_twice,
    a_scheduled_job_waits_until_it_is_due,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_jobs_from_the_table() {
    let (db, _dir) = database(false).await;
    workers_run_jobs_through_their_retries(Queue::table(db, QueueMetrics::default())).await;
}

async fn streamed(redis_url: &str) -> (Queue, tokio::sync::oneshot::Sender<()>) {
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    streamed_under(redis_url, &prefix).await
}

/// A queue on PostgreSQL and Redis Streams under `prefix`, and its relay until the sender drops.
async fn streamed_under(
    redis_url: &str,
    prefix: &str,
) -> (Queue, tokio::sync::oneshot::Sender<()>) {
    let (db, _) = database(true).await;
    let queue = Queue::streams(db, redis_url, prefix, QueueMetrics::default())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    queue.spawn_relay(Duration::from_millis(50), async move {
        let _ = stopped.await;
    });
    (queue, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_jobs_from_redis_streams() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (queue, _relay) = streamed(&redis.url).await;
    workers_run_jobs_through_their_retries(queue).await;
}

/// On a Redis Cluster, jobs of two kinds reach a worker through their streams: one XREADGROUP
/// reads both (the queue's keys share a slot), and each entry is deleted once its job is done.
/// A read refused (CROSSSLOT) would leave the worker claiming from the table, and the entries
/// in their streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_jobs_from_the_streams_of_a_redis_cluster() {
    use fred::prelude::{ClientLike as _, StreamsInterface as _};
    let cluster = keel_testkit::RedisCluster::running().await;
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let (queue, _relay) = streamed_under(&cluster.url, &prefix).await;
    let mut ids = Vec::new();
    for kind in ["a", "b"] {
        for _ in 0..3 {
            ids.push(queue.store().enqueue(job(kind)).await.unwrap().id);
        }
    }
    queue.wake();
    let client =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&cluster.url).unwrap())
            .build()
            .unwrap();
    client.init().await.unwrap();
    let streams_hold = |n: u64| {
        let (client, prefix) = (client.clone(), prefix.clone());
        async move {
            for kind in ["a", "b"] {
                let stream = keel_queue::stream_key(&prefix, kind);
                let len: u64 = client.xlen(stream).await.ok()?;
                (len == n).then_some(())?;
            }
            Some(())
        }
    };
    keel_testkit::eventually(Duration::from_secs(10), "every job handed", || {
        streams_hold(3)
    })
    .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let kinds = vec![
        Kind::new("a", Arc::new(Done)),
        Kind::new("b", Arc::new(Done)),
    ];
    let worker = Worker::new(queue.clone(), kinds, options()).spawn(async move {
        let _ = stopped.await;
    });
    until_done(queue.store(), &ids).await;
    keel_testkit::eventually(
        Duration::from_secs(10),
        "every entry read and deleted",
        || streams_hold(0),
    )
    .await;
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// Succeeds at once.
struct Done;

#[async_trait]
impl Handler for Done {
    async fn run(&self, _job: &Job) -> Result<(), Failure> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reading_every_kinds_stream_claims_no_more_than_it_can_run() {
    // A read's COUNT holds per stream: with two kinds waiting, one read returns twice the
    // room. What does not fit must wait for a slot, not be claimed and left to its lease.
    use fred::prelude::{ClientLike as _, StreamsInterface as _};
    let redis = keel_testkit::Redis::shared().unwrap();
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let (queue, _relay) = streamed_under(&redis.url, &prefix).await;
    let mut ids = Vec::new();
    for kind in ["a", "b"] {
        for _ in 0..3 {
            ids.push(queue.store().enqueue(job(kind)).await.unwrap().id);
        }
    }
    queue.wake();
    let client =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&redis.url).unwrap())
            .build()
            .unwrap();
    client.init().await.unwrap();
    keel_testkit::eventually(Duration::from_secs(10), "every job in its stream", || {
        let (client, prefix) = (client.clone(), prefix.clone());
        async move {
            for kind in ["a", "b"] {
                let len: u64 = client
                    .xlen(keel_queue::stream_key(&prefix, kind))
                    .await
                    .ok()?;
                (len == 3).then_some(())?;
            }
            Some(())
        }
    })
    .await;
    // Each job, while it runs, counts the jobs claimed and not yet run (RUNNING in the table,
    // less those whose handler returned and whose success is being recorded): never more than
    // the worker can run.
    let most = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let counting = Arc::new(CountingClaims {
        db: queue.store().db().clone(),
        most: most.clone(),
        returned: std::sync::Mutex::default(),
    });
    let kinds = ["a", "b"].map(|name| Kind::new(name, counting.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(
        queue.clone(),
        kinds.to_vec(),
        WorkerOptions {
            concurrency: 2,
            // Longer than the test: a job claimed and dropped would never run again in it.
            lease: Duration::from_secs(600),
            ..options()
        },
    )
    .spawn(async move {
        let _ = stopped.await;
    });
    let store = queue.store();
    keel_testkit::eventually(Duration::from_secs(20), "every job to succeed", || async {
        let most = most.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            most <= 2,
            "{most} jobs claimed at once by a worker that runs 2"
        );
        for id in &ids {
            if store.get(id).await.unwrap().unwrap().state != State::Succeeded {
                return None;
            }
        }
        Some(())
    })
    .await;
    stop.send(()).unwrap();
    worker.await.unwrap();
    assert!(most.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// A handler that records the most jobs claimed (RUNNING) and not yet returned from at once
/// while one of them runs.
struct CountingClaims {
    db: sea_orm::DatabaseConnection,
    most: Arc<std::sync::atomic::AtomicI64>,
    /// The jobs it has returned from: RUNNING in the table until their success is recorded.
    returned: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[async_trait::async_trait]
impl Handler for CountingClaims {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        use sea_orm::ConnectionTrait as _;
        let rows = self
            .db
            .query_all_raw(sea_orm::Statement::from_string(
                self.db.get_database_backend(),
                "SELECT id FROM queue_jobs WHERE state = 'RUNNING'",
            ))
            .await
            .unwrap();
        let returned = self.returned.lock().unwrap().clone();
        let running = rows
            .iter()
            .map(|row| row.try_get::<String>("", "id").unwrap())
            .filter(|id| !returned.contains(id))
            .count();
        self.most.fetch_max(
            i64::try_from(running).unwrap(),
            std::sync::atomic::Ordering::SeqCst,
        );
        self.returned.lock().unwrap().insert(job.id.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_through_a_stream_leave_nothing_in_it() {
    // A stream keeps every entry until it is deleted: acknowledging is not enough, and Redis
    // would hold every job ever run.
    use fred::prelude::{ClientLike as _, StreamsInterface as _};
    let redis = keel_testkit::Redis::shared().unwrap();
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let (queue, _relay) = streamed_under(&redis.url, &prefix).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(queue.store().enqueue(job("k")).await.unwrap().id);
    }
    queue.wake();
    let kinds = vec![Kind::new("k", Arc::new(Done))];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(queue.clone(), kinds, options()).spawn(async move {
        let _ = stopped.await;
    });
    until_done(queue.store(), &ids).await;
    stop.send(()).unwrap();
    worker.await.unwrap();
    let client =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&redis.url).unwrap())
            .build()
            .unwrap();
    client.init().await.unwrap();
    let stream = keel_queue::stream_key(&prefix, "k");
    let left: u64 = client.xlen(&stream).await.unwrap();
    assert_eq!(left, 0, "every entry of a finished job is deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_keeps_reading_its_streams() {
    // A blocking read that waits its time out with nothing new answers nil. That is an idle
    // queue, not a Redis gone away: the worker reads again, and never turns to the table.
    let redis = keel_testkit::Redis::dedicated().await;
    let (db, _) = database(true).await;
    let registry = prometheus::Registry::new();
    let metrics = QueueMetrics::register(&registry).unwrap();
    let queue = Queue::streams(db, &redis.url, "idle:", metrics)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let kinds = vec![Kind::new("k", Arc::new(Done))];
    let poll = Duration::from_millis(20);
    let worker = Worker::new(queue, kinds, WorkerOptions { poll, ..options() }).spawn(async move {
        let _ = stopped.await;
    });
    // The first read creates the consumer group; each further one follows a read that timed out.
    keel_testkit::eventually(Duration::from_secs(20), "five blocking reads", || async {
        (xreadgroup_calls(&redis.url).await? >= 5).then_some(())
    })
    .await;
    stop.send(()).unwrap();
    worker.await.unwrap();
    let fallbacks = registry
        .gather()
        .into_iter()
        .find(|family| family.name() == "keel_queue_table_fallbacks_total")
        .map(|family| family.get_metric()[0].get_counter().get_value());
    assert_eq!(
        fallbacks,
        Some(0.0),
        "an idle read is not a Redis that did not answer"
    );
}

/// How many XREADGROUP commands the Redis at `url` has run.
async fn xreadgroup_calls(url: &str) -> Option<u64> {
    use fred::prelude::ClientLike as _;
    use fred::types::{ClusterHash, CustomCommand};
    let client = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(url).ok()?)
        .build()
        .ok()?;
    client.init().await.ok()?;
    let info = CustomCommand::new_static("INFO", ClusterHash::FirstKey, false);
    let info: String = client.custom(info, vec!["commandstats"]).await.ok()?;
    let _ = client.quit().await;
    let line = info
        .lines()
        .find(|l| l.starts_with("cmdstat_xreadgroup:"))?;
    line.split(['=', ',']).nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_jobs_still_run_from_the_table() {
    let redis = keel_testkit::Redis::dedicated().await;
    let (queue, _relay) = streamed(&redis.url).await;
    redis.kill();
    workers_run_jobs_through_their_retries(queue).await;
}
