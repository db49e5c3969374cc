//! Wake-ups: a slot of a limited kind that comes free is taken at once by the process that
//! freed it — never at the next poll (an hour here) — from the table as through Redis Streams,
//! where such a kind is never waited for on a blocking read; on PostgreSQL, a write of jobs in
//! one process wakes the idle workers of another, and a listener that reconnects wakes its own;
//! a job that comes due by the clock (written for later, or its lease run out) is taken when it
//! does by an idle worker claiming from the table.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sea_orm::ConnectionTrait as _;
use sea_orm_migration::MigratorTrait as _;

use keel_queue::{Failure, Handler, Job, Kind, Queue, QueueMetrics, State, Worker, WorkerOptions};

use super::{Done, for_later, job, until_done};

const NEVER: Duration = Duration::from_secs(3600);

/// Holds every attempt until released.
struct Held(tokio::sync::watch::Receiver<bool>);

#[async_trait::async_trait]
impl Handler for Held {
    async fn run(&self, _job: &Job) -> Result<(), Failure> {
        let _ = self.0.clone().wait_for(|released| *released).await;
        Ok(())
    }
}

async fn a_limited_kinds_freed_slot_is_claimed_at_once(queue: Queue) {
    queue.store().register_kind("limited").await.unwrap();
    queue.store().register_kind("roomy").await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(queue.store().enqueue(job("limited")).await.unwrap().id);
    }
    let options = WorkerOptions {
        poll: NEVER,
        ..WorkerOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Another limited kind makes room for more than one at once: the worker has free slots
    // while the kind waits for its one.
    let (release, released) = tokio::sync::watch::channel(false);
    let kinds = vec![
        Kind::new("limited", Arc::new(Held(released))).limited(Some(1)),
        Kind::new("roomy", Arc::new(Done)).limited(Some(3)),
    ];
    let worker = Worker::new(queue.clone(), kinds, options).spawn(async move {
        let _ = stopped.await;
    });
    // The first runs and holds the kind's one slot: the worker looks again (it has room),
    // finds the kind at its limit, and waits.
    keel_testkit::eventually(Duration::from_secs(20), "the first job to run", || async {
        let running = queue.store().get(&ids[0]).await.unwrap().unwrap().state;
        (running == State::Running).then_some(())
    })
    .await;
    // One at a time, each as the last one's slot comes free.
    release.send(true).unwrap();
    until_done(queue.store(), &ids).await;
    stop.send(()).unwrap();
    worker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_kinds_freed_slot_is_claimed_at_once_from_the_table() {
    let (db, _dir) = super::database(true).await;
    a_limited_kinds_freed_slot_is_claimed_at_once(Queue::table(db, QueueMetrics::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_kinds_freed_slot_is_claimed_at_once_through_redis() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (queue, _relay) = super::streamed(&redis.url).await;
    a_limited_kinds_freed_slot_is_claimed_at_once(queue).await;
}

/// An idle worker of its own process (queue and connections) on the database at `url`, which
/// polls once an hour: returned once its first look found nothing and its LISTEN took effect
/// (a notification sent before would be missed), with what stops it.
async fn an_idle_listening_worker(url: &str) -> (tokio::task::JoinHandle<()>, impl FnOnce()) {
    let mut there = sea_orm::Database::connect(url).await.unwrap();
    keel_queue::Migrator::up(&there, None).await.unwrap();
    let claims = Arc::new(AtomicUsize::new(0));
    let counted = claims.clone();
    there.set_metric_callback(move |info| {
        if info.statement.sql.starts_with("WITH due") {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let reader = Queue::table(there, QueueMetrics::default());
    let options = WorkerOptions {
        poll: NEVER,
        ..WorkerOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let kinds = vec![Kind::new("k", Arc::new(Done))];
    let worker = Worker::new(reader, kinds, options).spawn(async move {
        let _ = stopped.await;
    });
    keel_testkit::eventually(
        Duration::from_secs(20),
        "the worker's first claim",
        || async { (claims.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    let db = sea_orm::Database::connect(url).await.unwrap();
    keel_testkit::eventually(Duration::from_secs(20), "a listener", || async {
        (listeners(&db).await? == 1).then_some(())
    })
    .await;
    (worker, move || stop.send(()).unwrap())
}

/// How many connections wait in LISTEN on the queue's channel, if the database answers.
async fn listeners(db: &sea_orm::DatabaseConnection) -> Option<i64> {
    db.query_one_raw(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND state = 'idle' \
         AND query LIKE 'LISTEN %keel_queue%'",
    ))
    .await
    .ok()??
    .try_get::<i64>("", "n")
    .ok()
}

/// A queue of its own process on the database at `url` that writes jobs and runs no worker:
/// it announces, and does not listen.
async fn a_writer(url: &str) -> Queue {
    let here = sea_orm::Database::connect(url).await.unwrap();
    Queue::table(here, QueueMetrics::default())
}

/// Without Redis, a job written in one process (its own queue and connections; the same
/// database) is claimed at once by another's idle worker, which the writer's wake-up reaches
/// through PostgreSQL (NOTIFY after the commit), not at its next poll (an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_written_in_one_process_wakes_the_idle_workers_of_another() {
    let url = keel_testkit::fresh_database().await;
    let (worker, stop) = an_idle_listening_worker(&url).await;
    let writer = a_writer(&url).await;
    let id = writer.store().enqueue(job("k")).await.unwrap().id;
    writer.wake();
    until_done(writer.store(), &[id]).await;
    stop();
    worker.await.unwrap();
}

/// What was announced while a process did not listen (its connection lost) is made up for:
/// listening again, it wakes its workers, which look for themselves. Here the job is written
/// unannounced and the listener's connection ended; only the listener's return reaches the
/// worker, which would otherwise wait for its poll (an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_listener_reconnects_looks_for_what_it_missed() {
    let url = keel_testkit::fresh_database().await;
    let (worker, stop) = an_idle_listening_worker(&url).await;
    let writer = a_writer(&url).await;
    let id = writer.store().enqueue(job("k")).await.unwrap().id;
    let db = sea_orm::Database::connect(&url).await.unwrap();
    db.execute_unprepared(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %keel_queue%'",
    )
    .await
    .unwrap();
    until_done(writer.store(), &[id]).await;
    stop();
    worker.await.unwrap();
}

/// Runs `queue`'s jobs of kind `k` with a worker that polls once an hour, until `ids` succeeded.
async fn an_idle_worker_runs(queue: &Queue, ids: &[String]) {
    let options = WorkerOptions {
        poll: NEVER,
        ..WorkerOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let kinds = vec![Kind::new("k", Arc::new(Done))];
    let worker = Worker::new(queue.clone(), kinds, options).spawn(async move {
        let _ = stopped.await;
    });
    until_done(queue.store(), ids).await;
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// An idle worker claiming from the table waits until the soonest of its kinds' jobs comes due,
/// not for its poll: the job written for 300 ms from now runs then.
async fn a_job_written_for_later_runs_when_it_comes_due(queue: Queue) {
    let id = queue.store().enqueue(for_later("k")).await.unwrap().id;
    queue.wake();
    an_idle_worker_runs(&queue, &[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_written_for_later_runs_when_it_comes_due_from_the_table() {
    for postgres in [true, false] {
        let (db, _dir) = super::database(postgres).await;
        a_job_written_for_later_runs_when_it_comes_due(Queue::table(db, QueueMetrics::default()))
            .await;
    }
}

/// A job whose worker was lost (it holds the job under a lease it never renews) is taken up by
/// an idle worker when the lease runs out, not at its poll (an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_was_lost_runs_again_when_its_lease_runs_out() {
    for postgres in [true, false] {
        let (db, _dir) = super::database(postgres).await;
        let queue = Queue::table(db, QueueMetrics::default());
        let id = queue.store().enqueue(job("k")).await.unwrap().id;
        let lease = Duration::from_millis(300);
        let lost = queue.store().claim("lost", "k", None, 1, lease, None);
        assert_eq!(
            lost.await.unwrap().len(),
            1,
            "the lost worker holds the job"
        );
        an_idle_worker_runs(&queue, std::slice::from_ref(&id)).await;
        let done = queue.store().get(&id).await.unwrap().unwrap();
        assert_eq!(done.attempts, 2, "the lost attempt, then the one that ran");
    }
}

/// Fails its first attempt once released, then succeeds.
struct FailsOnceReleased {
    released: tokio::sync::watch::Receiver<bool>,
    attempts: AtomicUsize,
}

#[async_trait::async_trait]
impl Handler for FailsOnceReleased {
    async fn run(&self, _job: &Job) -> Result<(), Failure> {
        if self.attempts.fetch_add(1, Ordering::SeqCst) == 0 {
            let _ = self.released.clone().wait_for(|released| *released).await;
            return Err(Failure::Retry("the first attempt fails".into()));
        }
        Ok(())
    }
}

/// A failed attempt's retry runs when its backoff ends, not when the lease the idle claimer
/// last saw runs out (a minute) nor at its poll (an hour): the claimer, which had read when
/// the next job comes due while the attempt ran, is told of the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_tried_again_when_its_backoff_ends() {
    let url = keel_testkit::fresh_database().await;
    let mut db = sea_orm::Database::connect(&url).await.unwrap();
    keel_queue::Migrator::up(&db, None).await.unwrap();
    let looks = Arc::new(AtomicUsize::new(0));
    let counted = looks.clone();
    db.set_metric_callback(move |info| {
        if info.statement.sql.starts_with("SELECT min(at)") {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let queue = Queue::table(db, QueueMetrics::default());
    let id = queue.store().enqueue(job("k")).await.unwrap().id;
    queue.wake();
    let options = WorkerOptions {
        poll: NEVER,
        lease: Duration::from_secs(60),
        ..super::options()
    };
    let (release, released) = tokio::sync::watch::channel(false);
    let handler = Arc::new(FailsOnceReleased {
        released,
        attempts: AtomicUsize::new(0),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let kinds = vec![Kind::new("k", handler.clone())];
    let worker = Worker::new(queue.clone(), kinds, options).spawn(async move {
        let _ = stopped.await;
    });
    // The first attempt runs; the claimer, with slots free, found nothing else and read when
    // the next job comes due (the running job's lease end, a minute away).
    keel_testkit::eventually(Duration::from_secs(20), "the claimer to wait", || async {
        let running = handler.attempts.load(Ordering::SeqCst) == 1;
        (running && looks.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    release.send(true).unwrap();
    until_done(queue.store(), std::slice::from_ref(&id)).await;
    assert_eq!(handler.attempts.load(Ordering::SeqCst), 2);
    stop.send(()).unwrap();
    worker.await.unwrap();
}
