//! Slots of a kind's own: a worker runs as many of such a kind at once as its own slots, however
//! few the shared slots are, never more; and the kinds that share slots keep running meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_queue::{Failure, Handler, Job, Kind, Queue, Worker, WorkerOptions};
use tokio::sync::watch;

use crate::{Done, job, until_done};

/// Holds every attempt until released, counting how many run at once.
struct Held {
    running: AtomicUsize,
    most: AtomicUsize,
    released: watch::Receiver<bool>,
}

#[async_trait]
impl Handler for Held {
    async fn run(&self, _job: &Job) -> Result<(), Failure> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let _ = self.released.clone().wait_for(|released| *released).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn a_kind_with_slots_of_its_own_runs_that_many_beside_the_shared_ones(queue: Queue) {
    const OWN: usize = 4;
    let (release, released) = watch::channel(false);
    let held = Arc::new(Held {
        running: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
        released,
    });
    let store = queue.store();
    let mut waiting = Vec::new();
    for _ in 0..=OWN {
        waiting.push(store.enqueue(job("waits")).await.unwrap().id);
    }
    let quick = store.enqueue(job("quick")).await.unwrap().id;
    queue.wake();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let kinds = vec![
        Kind::new("waits", held.clone()).concurrent(Some(OWN)),
        Kind::new("quick", Arc::new(Done)),
    ];
    let options = WorkerOptions {
        id: "w".into(),
        concurrency: 1,
        poll: Duration::from_millis(20),
        ..WorkerOptions::default()
    };
    let worker = Worker::new(queue.clone(), kinds, options).spawn(async move {
        let _ = stopped.await;
    });

    // Four at once though the worker shares one slot: the kind's own four.
    keel_testkit::eventually(Duration::from_secs(20), "four held at once", || async {
        (held.running.load(Ordering::SeqCst) == OWN).then_some(())
    })
    .await;
    // The shared slot is free for the other kind meanwhile.
    until_done(store, std::slice::from_ref(&quick)).await;
    assert_eq!(
        held.most.load(Ordering::SeqCst),
        OWN,
        "never more than its slots"
    );

    release.send(true).unwrap();
    until_done(store, &waiting).await;
    assert_eq!(
        held.most.load(Ordering::SeqCst),
        OWN,
        "never more than its slots"
    );
    let done = store.get(&waiting[0]).await.unwrap().unwrap();
    assert_eq!(done.attempts, 1, "each ran once");
    stop.send(()).unwrap();
    worker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_with_slots_of_its_own_runs_from_the_table() {
    let (db, _dir) = crate::database(false).await;
    let queue = Queue::table(db, keel_queue::QueueMetrics::default());
    a_kind_with_slots_of_its_own_runs_that_many_beside_the_shared_ones(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_with_slots_of_its_own_runs_from_redis_streams() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (queue, _relay) = crate::streamed(&redis.url).await;
    a_kind_with_slots_of_its_own_runs_that_many_beside_the_shared_ones(queue).await;
}
