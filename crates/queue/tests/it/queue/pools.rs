//! Slots of a kind's own: a worker runs as many of such a kind at once as its own slots, however
//! few the shared slots are, never more; and the kinds that share slots keep running meanwhile.
//! A slot whose job succeeded takes the next job while that success is being recorded, and a
//! stopped worker still waits for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_queue::{Failure, Handler, Job, Kind, Queue, State, Worker, WorkerOptions};
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, DatabaseTransaction, TransactionTrait as _,
};
use tokio::sync::{mpsc, watch};

use super::{Done, job, until_done};

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
    let (db, _dir) = super::database(false).await;
    let queue = Queue::table(db, keel_queue::QueueMetrics::default());
    a_kind_with_slots_of_its_own_runs_that_many_beside_the_shared_ones(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_with_slots_of_its_own_runs_from_redis_streams() {
    let redis = keel_testkit::Redis::shared().unwrap();
    let (queue, _relay) = super::streamed(&redis.url).await;
    a_kind_with_slots_of_its_own_runs_that_many_beside_the_shared_ones(queue).await;
}

/// Succeeds, leaving its own job's row locked by a transaction it hands to the test: recording
/// that success waits until the test lets the row go.
struct LocksItsRow {
    db: DatabaseConnection,
    locks: mpsc::UnboundedSender<DatabaseTransaction>,
}

#[async_trait]
impl Handler for LocksItsRow {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        let txn = self.db.begin().await.unwrap();
        txn.execute_unprepared(&format!(
            "SELECT id FROM queue_jobs WHERE id = '{}' FOR UPDATE",
            job.id
        ))
        .await
        .unwrap();
        self.locks.send(txn).unwrap();
        Ok(())
    }
}

/// Counts its attempts.
#[derive(Default)]
struct Counts(AtomicUsize);

#[async_trait]
impl Handler for Counts {
    async fn run(&self, _job: &Job) -> Result<(), Failure> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A worker of one slot on a table queue, running `kinds` beside a kind whose job leaves its row
/// locked; a job of that kind is written first. Returns the queue, that job, the locks its
/// attempts hand over, and the worker with its stop.
async fn one_slot_beside_a_locked_row(
    kinds: Vec<Kind>,
) -> (
    Queue,
    String,
    mpsc::UnboundedReceiver<DatabaseTransaction>,
    (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
) {
    let (db, dir) = super::database(true).await;
    drop(dir);
    let queue = Queue::table(db.clone(), keel_queue::QueueMetrics::default());
    let (locks, locked) = mpsc::unbounded_channel();
    let kinds = std::iter::once(Kind::new("locks", Arc::new(LocksItsRow { db, locks })))
        .chain(kinds)
        .collect();
    let options = WorkerOptions {
        id: "w".into(),
        concurrency: 1,
        poll: Duration::from_millis(20),
        ..WorkerOptions::default()
    };
    let first = queue.store().enqueue(job("locks")).await.unwrap().id;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(queue.clone(), kinds, options).spawn(async move {
        let _ = stopped.await;
    });
    (queue, first, locked, (stop, worker))
}

/// A worker with one slot runs its next job while the last one's success waits to be recorded:
/// a slot is held by a running handler, not by the round trip that records its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_takes_the_next_job_while_the_last_success_is_recorded() {
    let next = Arc::new(Counts::default());
    let (queue, first, mut locked, (stop, worker)) =
        one_slot_beside_a_locked_row(vec![Kind::new("next", next.clone())]).await;
    let store = queue.store();
    let row = locked.recv().await.expect("the first job ran");

    let second = store.enqueue(job("next")).await.unwrap().id;
    queue.wake();
    keel_testkit::eventually(Duration::from_secs(20), "the next job to run", || async {
        (next.0.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let recording = store.get(&first).await.unwrap().unwrap();
    assert_eq!(
        recording.state,
        State::Running,
        "the first success is still being recorded"
    );

    row.rollback().await.unwrap();
    until_done(store, &[first, second]).await;
    stop.send(()).unwrap();
    worker.await.unwrap();
}

/// A worker told to stop returns only once the success of every job it ran is recorded, even
/// though their slots came free before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_returns_once_every_success_is_recorded() {
    let (queue, id, mut locked, (stop, mut worker)) = one_slot_beside_a_locked_row(vec![]).await;
    let store = queue.store();
    let row = locked.recv().await.expect("the job ran");
    stop.send(()).unwrap();
    // A worker that did not wait would return within a poll (20 ms) of the stop; this one
    // cannot return at all while the row is locked, so the bound only limits how long the
    // test looks, it can never fail a correct worker.
    let returned = tokio::time::timeout(Duration::from_secs(2), &mut worker).await;
    assert!(
        returned.is_err(),
        "returned while a success waited to be recorded"
    );

    row.rollback().await.unwrap();
    worker.await.unwrap();
    let job = store.get(&id).await.unwrap().unwrap();
    assert_eq!(
        job.state,
        State::Succeeded,
        "recorded before the worker returned"
    );
}
