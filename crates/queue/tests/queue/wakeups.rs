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
