//! Wake-ups across processes: on PostgreSQL a write of jobs wakes the workers and the relay of
//! every process at its commit, so that a job written elsewhere runs at once, not at the next
//! poll (an hour here).

use std::sync::Arc;
use std::time::Duration;

use keel_queue::{Kind, Queue, QueueMetrics, Worker, WorkerOptions, stream_key};
use sea_orm_migration::MigratorTrait as _;

use crate::relay::{until_counted, until_stream_holds};
use crate::{Done, job, until_done};

const NEVER: Duration = Duration::from_secs(3600);

/// Two pools on one fresh, migrated database: two processes.
async fn two_processes() -> (sea_orm::DatabaseConnection, sea_orm::DatabaseConnection) {
    let url = keel_testkit::fresh_database().await;
    let connect = || async { sea_orm::Database::connect(&url).await.unwrap() };
    keel_queue::Migrator::up(&connect().await, None)
        .await
        .unwrap();
    (connect().await, connect().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_written_by_another_process_runs_at_once_not_at_the_poll() {
    let (writer, runner) = two_processes().await;
    let writer = Queue::table(writer, QueueMetrics::default());
    let runner = Queue::table(runner, QueueMetrics::default());
    let options = WorkerOptions {
        poll: NEVER,
        ..WorkerOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(
        runner.clone(),
        vec![Kind::new("k", Arc::new(Done))],
        options,
    )
    .spawn(async move {
        let _ = stopped.await;
    });
    // Each job is written by the other process once the worker has run the last one and waits
    // for work again (its next claim was made as it started the last one).
    for _ in 0..3 {
        let id = writer.store().enqueue(job("k")).await.unwrap().id;
        until_done(runner.store(), &[id]).await;
    }
    stop.send(()).unwrap();
    worker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_written_by_another_process_is_handed_to_redis_at_once() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let (writer, relaying) = two_processes().await;
    let registry = prometheus::Registry::new();
    let metrics = QueueMetrics::register(&registry).unwrap();
    let relaying = Queue::streams(relaying, &redis.url, &prefix, metrics)
        .await
        .unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    relaying.spawn_relay(NEVER, async move {
        let _ = stopped.await;
    });
    keel_testkit::eventually(Duration::from_secs(20), "the relay's lease", || async {
        (crate::counter(&registry, "keel_queue_relaying") == 1.0).then_some(())
    })
    .await;
    // The writer runs no relay and tells nobody but the database.
    let writer = Queue::table(writer, QueueMetrics::default());
    for n in 1..=3 {
        writer.store().enqueue(job("k")).await.unwrap();
        until_stream_holds(&redis.url, &stream_key(&prefix, "k"), n).await;
    }
    until_counted(&registry, "keel_queue_relay_handed_total", 3).await;
}

/// Holds its one attempt until released.
struct HeldOnce(tokio::sync::watch::Receiver<bool>);

#[async_trait::async_trait]
impl keel_queue::Handler for HeldOnce {
    async fn run(&self, _job: &keel_queue::Job) -> Result<(), keel_queue::Failure> {
        let _ = self.0.clone().wait_for(|released| *released).await;
        Ok(())
    }
}

/// A job of a kind at its limit runs as soon as a worker of another process frees the slot:
/// that worker announces it, and the waiting one claims at once instead of at its poll.
async fn a_limited_kinds_slot_freed_in_another_process_is_claimed_at_once(
    holder: Queue,
    waiter: Queue,
) {
    holder.store().register_kind("limited").await.unwrap();
    let first = holder.store().enqueue(job("limited")).await.unwrap().id;
    let options = || WorkerOptions {
        poll: NEVER,
        ..WorkerOptions::default()
    };
    let (release, released) = tokio::sync::watch::channel(false);
    let (stop_holder, holder_stopped) = tokio::sync::oneshot::channel::<()>();
    let held = Kind::new("limited", Arc::new(HeldOnce(released))).limited(Some(1));
    let holding = Worker::new(holder.clone(), vec![held], options()).spawn(async move {
        let _ = holder_stopped.await;
    });
    keel_testkit::eventually(Duration::from_secs(20), "the first job to run", || async {
        let job = holder.store().get(&first).await.unwrap().unwrap();
        (job.state == keel_queue::State::Running).then_some(())
    })
    .await;
    // The holder takes nothing more; it finishes what it runs.
    stop_holder.send(()).unwrap();
    // The waiter finds the kind at its limit, runs a job of another limited kind meanwhile,
    // and waits for work again (its next claim was made as it started that job).
    waiter.store().register_kind("other").await.unwrap();
    let second = waiter.store().enqueue(job("limited")).await.unwrap().id;
    let other = waiter.store().enqueue(job("other")).await.unwrap().id;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let kinds = vec![
        Kind::new("limited", Arc::new(Done)).limited(Some(1)),
        Kind::new("other", Arc::new(Done)).limited(Some(1)),
    ];
    let waiting = Worker::new(waiter.clone(), kinds, options()).spawn(async move {
        let _ = stopped.await;
    });
    until_done(waiter.store(), std::slice::from_ref(&other)).await;
    let job = waiter.store().get(&second).await.unwrap().unwrap();
    assert_eq!(job.state, keel_queue::State::Queued, "the limit holds");
    release.send(true).unwrap();
    until_done(waiter.store(), &[first, second]).await;
    holding.await.unwrap();
    stop.send(()).unwrap();
    waiting.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_kinds_slot_freed_elsewhere_is_claimed_at_once_from_the_table() {
    let (a, b) = two_processes().await;
    a_limited_kinds_slot_freed_in_another_process_is_claimed_at_once(
        Queue::table(a, QueueMetrics::default()),
        Queue::table(b, QueueMetrics::default()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_kinds_slot_freed_elsewhere_is_claimed_at_once_through_redis() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (_, prefix) = keel_testkit::fresh_prefix().await;
    let (a, b) = two_processes().await;
    let streams = |db| Queue::streams(db, &redis.url, &prefix, QueueMetrics::default());
    let (a, b) = (streams(a).await.unwrap(), streams(b).await.unwrap());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    a.spawn_relay(Duration::from_millis(50), async move {
        let _ = stopped.await;
    });
    a_limited_kinds_slot_freed_in_another_process_is_claimed_at_once(a, b).await;
}
