//! Wake-ups: a slot of a limited kind that comes free is taken at once by the process that
//! freed it — never at the next poll (an hour here) — from the table as through Redis Streams,
//! where such a kind is never waited for on a blocking read.

use std::sync::Arc;
use std::time::Duration;

use keel_queue::{Failure, Handler, Job, Kind, Queue, QueueMetrics, State, Worker, WorkerOptions};

use crate::{Done, job, until_done};

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
    let (db, _dir) = crate::database(true).await;
    a_limited_kinds_freed_slot_is_claimed_at_once(Queue::table(db, QueueMetrics::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_kinds_freed_slot_is_claimed_at_once_through_redis() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (queue, _relay) = crate::streamed(&redis.url).await;
    a_limited_kinds_freed_slot_is_claimed_at_once(queue).await;
}
