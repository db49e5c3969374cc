//! Who may act for a job, on SQLite and on PostgreSQL: a write held under an attempt's fence
//! commits only while that attempt holds its job; an attempt whose job another worker took over
//! is stopped where it is and records nothing; a periodic kind is written once per round
//! whoever asks; and a kind retried for a window outlasts any number of attempts within it, and
//! dies once it has passed.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_queue::job::now_ms;
use keel_queue::{
    Backoff, Failure, Handler, Job, JobStore, Kind, NewJob, Queue, QueueError, QueueMetrics, State,
    Worker, WorkerOptions, hold,
};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, TransactionTrait as _};
use tokio::sync::Notify;

fn job(kind: &str) -> NewJob {
    NewJob {
        kind: kind.into(),
        creator: "test".into(),
        ..NewJob::default()
    }
}

const LEASE: Duration = Duration::from_secs(30);

/// What a worker does when it claims `id` after its holder's lease ran out: the next attempt,
/// under `worker`'s lease.
async fn take_over(db: &DatabaseConnection, id: &str, worker: &str) {
    let until = now_ms() + 60_000;
    db.execute_unprepared(&format!(
        "UPDATE queue_jobs SET attempts = attempts + 1, locked_by = '{worker}', \
         locked_until = {until} WHERE id = '{id}'"
    ))
    .await
    .unwrap();
}

async fn a_write_under_a_fence_commits_only_while_its_attempt_holds_the_job(
    db: DatabaseConnection,
) {
    let store = JobStore::new(db.clone());
    let written = store.enqueue(job("k")).await.unwrap();
    let first = store.claim("a", "k", None, 1, LEASE, None).await.unwrap();
    let first = first.first().expect("claimed");
    let txn = db.begin().await.unwrap();
    hold(&txn, &first.fence()).await.unwrap();
    txn.commit().await.unwrap();

    take_over(&db, &written.id, "b").await;
    let txn = db.begin().await.unwrap();
    let refused = hold(&txn, &first.fence()).await.unwrap_err();
    assert!(
        matches!(refused, QueueError::LeaseLost { attempt: 1, .. }),
        "{refused:?}"
    );
    drop(txn);
    let second = store.get(&written.id).await.unwrap().unwrap();
    assert_eq!(second.attempts, 2);

    if db.get_database_backend() == DbBackend::Postgres {
        // While the holder writes, its job's row is locked: a claimer whose clock says the
        // lease ran out skips it rather than taking it over under the write.
        db.execute_unprepared(&format!(
            "UPDATE queue_jobs SET locked_until = 0 WHERE id = '{}'",
            written.id
        ))
        .await
        .unwrap();
        let txn = db.begin().await.unwrap();
        hold(&txn, &second.fence()).await.unwrap();
        let claimed = store.claim("c", "k", None, 1, LEASE, None).await.unwrap();
        assert!(claimed.is_empty(), "{claimed:?}");
        txn.commit().await.unwrap();
    }

    assert!(store.succeed(&second, "b").await.unwrap());
    let txn = db.begin().await.unwrap();
    assert!(
        hold(&txn, &second.fence()).await.is_err(),
        "a finished job has no holder"
    );
}

/// Signals when it starts, then waits for ever; signals again when it is dropped (cancelled).
struct Stalls {
    started: Arc<Notify>,
    cancelled: Arc<AtomicBool>,
}

struct Dropped(Arc<AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Handler for Stalls {
    async fn run(&self, _job: &Job) -> Result<(), Failure> {
        let _guard = Dropped(self.cancelled.clone());
        self.started.notify_one();
        std::future::pending::<()>().await;
        Ok(())
    }
}

fn lost(registry: &prometheus::Registry, kind: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "keel_queue_jobs_lost_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.value() == kind))
        .map(|m| m.get_counter().get_value())
        .sum()
}

async fn an_attempt_whose_job_is_taken_over_stops_and_records_nothing(db: DatabaseConnection) {
    let registry = prometheus::Registry::new();
    let queue = Queue::table(db.clone(), QueueMetrics::register(&registry).unwrap());
    let (started, cancelled) = (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false)));
    let stalls = Arc::new(Stalls {
        started: started.clone(),
        cancelled: cancelled.clone(),
    });
    let options = WorkerOptions {
        id: "a".into(),
        lease: Duration::from_millis(300),
        poll: Duration::from_millis(20),
        ..WorkerOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker =
        Worker::new(queue.clone(), vec![Kind::new("k", stalls)], options).spawn(async move {
            let _ = stopped.await;
        });
    let running = started.notified();
    let written = queue.store().enqueue(job("k")).await.unwrap();
    queue.wake();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the handler to start");

    take_over(&db, &written.id, "b").await;
    keel_testkit::eventually(Duration::from_secs(20), "the handler to be stopped", || {
        let cancelled = cancelled.clone();
        async move { cancelled.load(Ordering::SeqCst).then_some(()) }
    })
    .await;
    let now = queue.store().get(&written.id).await.unwrap().unwrap();
    assert_eq!(
        (now.state, now.attempts, now.last_error.as_deref()),
        (State::Running, 2, None),
        "the stopped attempt recorded nothing: the job is b's"
    );
    assert_eq!(lost(&registry, "k"), 1.0);
    assert!(queue.store().succeed(&now, "b").await.unwrap());
    stop.send(()).unwrap();
    worker.await.unwrap();
}

async fn a_periodic_kind_is_written_once_per_round_whoever_asks(db: DatabaseConnection) {
    let store = JobStore::new(db.clone());
    let asks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.schedule("tick", Duration::from_secs(3600)).await })
        })
        .collect();
    let mut claimed = 0;
    for ask in asks {
        claimed += usize::from(ask.await.unwrap().unwrap());
    }
    assert_eq!(claimed, 1, "one of the eight claimed the round");
    let ticks = |state: Option<State>| {
        let store = store.clone();
        async move {
            let listing = keel_queue::Listing {
                kind: Some("tick".into()),
                state,
                ..Default::default()
            };
            store.list(&listing, None, 100).await.unwrap()
        }
    };
    assert_eq!(ticks(None).await.len(), 1);
    assert!(
        !store
            .schedule("tick", Duration::from_secs(3600))
            .await
            .unwrap(),
        "the next round is an hour away"
    );

    let due = "UPDATE queue_periodic SET next_at = 0 WHERE kind = 'tick'";
    db.execute_unprepared(due).await.unwrap();
    assert!(
        store
            .schedule("tick", Duration::from_secs(3600))
            .await
            .unwrap()
    );
    assert_eq!(
        ticks(None).await.len(),
        1,
        "the round's job is the one still waiting"
    );

    let run = store
        .claim("w", "tick", None, 1, LEASE, None)
        .await
        .unwrap();
    assert!(store.succeed(&run[0], "w").await.unwrap());
    db.execute_unprepared(due).await.unwrap();
    assert!(
        store
            .schedule("tick", Duration::from_secs(3600))
            .await
            .unwrap()
    );
    assert_eq!(ticks(Some(State::Queued)).await.len(), 1);
    assert_eq!(ticks(None).await.len(), 2);
}

/// Fails every attempt up to `failures`, then succeeds.
struct Fails {
    failures: i32,
    attempts: AtomicUsize,
}

#[async_trait]
impl Handler for Fails {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if job.attempts <= self.failures {
            Err(Failure::Retry("not yet".into()))
        } else {
            Ok(())
        }
    }
}

async fn a_kind_retried_for_a_window_outlasts_its_attempts_and_dies_after_it(
    db: DatabaseConnection,
) {
    let queue = Queue::table(db.clone(), QueueMetrics::default());
    let window = Duration::from_secs(3600);
    let kinds = vec![
        Kind::new(
            "patient",
            Arc::new(Fails {
                failures: 12,
                attempts: AtomicUsize::new(0),
            }),
        )
        .retried_for(window),
        Kind::new(
            "late",
            Arc::new(Fails {
                failures: i32::MAX,
                attempts: AtomicUsize::new(0),
            }),
        )
        .retried_for(window),
    ];
    let unbounded = |kind: &str| NewJob {
        max_attempts: Some(i32::MAX),
        ..job(kind)
    };
    let patient = queue.store().enqueue(unbounded("patient")).await.unwrap();
    let late = queue.store().enqueue(unbounded("late")).await.unwrap();
    // Queued two hours ago: its window has passed.
    db.execute_unprepared(&format!(
        "UPDATE queue_jobs SET queued_at = {} WHERE id = '{}'",
        now_ms() - 7_200_000,
        late.id
    ))
    .await
    .unwrap();
    let options = WorkerOptions {
        backoff: Backoff {
            base: Duration::from_millis(5),
            max: Duration::from_millis(20),
        },
        poll: Duration::from_millis(10),
        ..WorkerOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(queue.clone(), kinds, options).spawn(async move {
        let _ = stopped.await;
    });
    queue.wake();
    let settled = |id: String, want: State| {
        let store = queue.store().clone();
        keel_testkit::eventually(Duration::from_secs(30), "the job to settle", move || {
            let (store, id) = (store.clone(), id.clone());
            async move {
                let job = store.get(&id).await.unwrap().unwrap();
                (job.state == want).then_some(job)
            }
        })
    };
    let done = settled(patient.id, State::Succeeded).await;
    assert_eq!(done.attempts, 13, "more than a count-bound job's 8");
    let dead = settled(late.id.clone(), State::Dead).await;
    assert_eq!(dead.attempts, 1, "its first failure ended it");

    // Retried by hand, its window starts again.
    queue.store().retry(&late.id).await.unwrap();
    queue.wake();
    let revived = settled(late.id, State::Failed).await;
    assert!(revived.queued_at > now_ms() - 60_000, "{revived:?}");
    stop.send(()).unwrap();
    worker.await.unwrap();
}

on_both_databases!(
    a_write_under_a_fence_commits_only_while_its_attempt_holds_the_job,
    an_attempt_whose_job_is_taken_over_stops_and_records_nothing,
    a_periodic_kind_is_written_once_per_round_whoever_asks,
    a_kind_retried_for_a_window_outlasts_its_attempts_and_dies_after_it,
);
