//! Retention: finished jobs are deleted once past the window their state keeps them, in
//! batches; a job that waits or runs is never deleted, however old.

use std::time::Duration;

use keel_queue::job::now_ms;
use keel_queue::{JobStore, Listing, Queue, QueueMetrics, Retention, State};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement};

use super::job;

const HOUR: i64 = 3_600_000;

/// A job of `store` put in `state`, finished (or, for a live one, last touched) `ago` ms ago.
async fn aged(store: &JobStore, state: State, ago: i64) -> String {
    let id = store.enqueue(job("aged")).await.unwrap().id;
    let at = now_ms() - ago;
    let backend = store.db().get_database_backend();
    store
        .db()
        .execute_raw(Statement::from_sql_and_values(
            backend,
            "UPDATE queue_jobs SET state = $1, finished_at = $2, created_at = $2, \
             updated_at = $2, run_after = $2, locked_until = $2 WHERE id = $3",
            vec![state.as_str().into(), at.into(), id.clone().into()],
        ))
        .await
        .unwrap();
    id
}

async fn retention_deletes_only_finished_jobs_past_their_window(db: DatabaseConnection) {
    let store = JobStore::new(db.clone());
    let mut kept = Vec::new();
    let mut deleted = Vec::new();
    for _ in 0..3 {
        deleted.push(aged(&store, State::Succeeded, 2 * HOUR).await);
    }
    deleted.push(aged(&store, State::Dead, 8 * 24 * HOUR).await);
    kept.push(aged(&store, State::Succeeded, HOUR / 2).await);
    kept.push(aged(&store, State::Dead, 2 * HOUR).await);
    // Live jobs, however old they look, are never deleted.
    for state in [State::Queued, State::Running, State::Failed] {
        kept.push(aged(&store, state, 30 * 24 * HOUR).await);
    }

    let registry = prometheus::Registry::new();
    let queue = Queue::table(db, QueueMetrics::register(&registry).unwrap());
    let retention = Retention {
        succeeded: Duration::from_secs(3600),
        dead: Duration::from_secs(7 * 24 * 3600),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let pruner = queue.spawn_pruner(retention, Duration::from_millis(20), async move {
        let _ = stopped.await;
    });
    keel_testkit::eventually(Duration::from_secs(20), "four jobs pruned", || async {
        (super::counter(&registry, "keel_queue_jobs_pruned_total") >= 4.0).then_some(())
    })
    .await;
    for id in &deleted {
        assert_eq!(
            store.get(id).await.unwrap(),
            None,
            "{id} is past its window"
        );
    }
    for id in &kept {
        assert!(store.get(id).await.unwrap().is_some(), "{id} was deleted");
    }
    // A deleted job leaves its creator's listing with it; what is kept stays listed.
    let by_test = Listing {
        creator: Some("test".into()),
        ..Listing::default()
    };
    let mut listed: Vec<String> = store
        .list(&by_test, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.id)
        .collect();
    listed.sort();
    kept.sort();
    assert_eq!(listed, kept);
    let listing = store
        .db()
        .query_one_raw(Statement::from_string(
            store.db().get_database_backend(),
            "SELECT COUNT(*) AS n FROM queue_listing",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(listing, 5, "no row is left of a deleted job");
    stop.send(()).unwrap();
    pruner.await.unwrap();
    assert_eq!(
        super::counter(&registry, "keel_queue_jobs_pruned_total"),
        4.0
    );
}

async fn a_prune_deletes_one_batch_at_a_time(db: DatabaseConnection) {
    let store = JobStore::new(db);
    for _ in 0..3 {
        aged(&store, State::Succeeded, 2 * HOUR).await;
    }
    let before = now_ms() - HOUR;
    assert_eq!(store.prune(State::Succeeded, before, 2).await.unwrap(), 2);
    assert_eq!(store.prune(State::Succeeded, before, 2).await.unwrap(), 1);
    assert_eq!(store.prune(State::Succeeded, before, 2).await.unwrap(), 0);
    // Only a finished state is ever pruned.
    aged(&store, State::Queued, 2 * HOUR).await;
    assert_eq!(store.prune(State::Queued, before, 2).await.unwrap(), 0);
}

on_both_databases!(
    retention_deletes_only_finished_jobs_past_their_window,
    a_prune_deletes_one_batch_at_a_time,
);
