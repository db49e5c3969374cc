//! Many jobs written at once: one statement, all or none, each answered in order with the job
//! written or the earlier one that stands for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_queue::{Enqueued, JobStore, NewJob, QueueError};
use sea_orm::DatabaseConnection;

use super::job;

/// `db` counting the statements it runs.
fn counted(mut db: DatabaseConnection) -> (DatabaseConnection, Arc<AtomicUsize>) {
    let statements = Arc::new(AtomicUsize::new(0));
    let counter = statements.clone();
    db.set_metric_callback(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    (db, statements)
}

async fn a_thousand_jobs_are_one_statement(db: DatabaseConnection) {
    let (db, statements) = counted(db);
    let store = JobStore::new(db);
    let news: Vec<NewJob> = (0..1000).map(|_| job("batched")).collect();
    let before = statements.load(Ordering::SeqCst);
    let written = store.enqueue_all(news).await.unwrap();
    assert_eq!(statements.load(Ordering::SeqCst) - before, 1, "one INSERT");
    assert_eq!(written.len(), 1000);
    assert!(written.iter().all(|e| matches!(e, Enqueued::Written(_))));
    for enqueued in written.iter().step_by(97) {
        let job = enqueued.clone().job();
        assert_eq!(store.get(&job.id).await.unwrap(), Some(job));
    }
}

async fn a_batch_answers_earlier_jobs_in_place_and_writes_all_or_nothing(db: DatabaseConnection) {
    let store = JobStore::new(db);
    let keyed = |key: &str| NewJob {
        unique_key: Some(key.into()),
        ..job("batched")
    };
    let live = store.enqueue(keyed("taken")).await.unwrap();
    let answers = store
        .enqueue_all(vec![
            keyed("taken"),
            keyed("fresh"),
            keyed("fresh"),
            job("batched"),
        ])
        .await
        .unwrap();
    assert_eq!(answers[0], Enqueued::Found(live));
    let Enqueued::Written(fresh) = &answers[1] else {
        panic!("the first with a new key is written: {:?}", answers[1]);
    };
    assert_eq!(
        answers[2],
        Enqueued::Found(fresh.clone()),
        "the batch's own earlier job"
    );
    assert!(matches!(answers[3], Enqueued::Written(_)));

    // A request id reused with another request refuses the whole batch.
    let requested = |hash: &str| NewJob {
        request: Some(("r-1".into(), hash.into())),
        ..job("batched")
    };
    store.enqueue(requested("first")).await.unwrap();
    let refused = store
        .enqueue_all(vec![keyed("never"), requested("second")])
        .await;
    assert!(
        matches!(refused, Err(QueueError::RequestReused(_))),
        "{refused:?}"
    );
    let listed = store
        .list(&keel_queue::Listing::default(), None, 100)
        .await
        .unwrap();
    assert!(
        listed
            .iter()
            .all(|j| j.unique_key.as_deref() != Some("never")),
        "nothing of a refused batch is written"
    );
}

async fn a_cap_counts_what_a_batch_adds_and_replays_once(db: DatabaseConnection) {
    let store = JobStore::new(db);
    let requested = |id: &str| NewJob {
        request: Some((id.into(), "same".into())),
        ..job("batched")
    };
    let batch = || vec![requested("r-1"), requested("r-2"), requested("r-3")];
    let first = store.enqueue_all_capped(batch(), "test", 3).await.unwrap();
    // Sent again at the cap: the same jobs, nothing added.
    let again = store.enqueue_all_capped(batch(), "test", 3).await.unwrap();
    let ids = |answers: Vec<Enqueued>| answers.into_iter().map(|e| e.job().id).collect::<Vec<_>>();
    assert_eq!(ids(first), ids(again));
    let over = store
        .enqueue_all_capped(vec![job("batched")], "test", 3)
        .await;
    assert!(matches!(over, Err(QueueError::Capped(3))), "{over:?}");
    assert_eq!(
        store.live_of("test").await.unwrap(),
        3,
        "a refused job is not written"
    );
}

async fn batches_racing_past_a_cap_leave_no_more_than_it_live(db: DatabaseConnection) {
    const RACERS: usize = 8;
    let store = JobStore::new(db);
    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let batches: Vec<_> = (0..RACERS)
        .map(|_| {
            let (store, start) = (store.clone(), start.clone());
            tokio::spawn(async move {
                let three = vec![job("batched"), job("batched"), job("batched")];
                start.wait().await;
                store.enqueue_all_capped(three, "test", 4).await
            })
        })
        .collect();
    let mut written = 0;
    for batch in batches {
        match batch.await.unwrap() {
            Ok(_) => written += 1,
            Err(QueueError::Capped(4)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(written, 1, "one batch of three fits under four");
    assert_eq!(store.live_of("test").await.unwrap(), 3);
}

on_both_databases!(
    a_cap_counts_what_a_batch_adds_and_replays_once,
    batches_racing_past_a_cap_leave_no_more_than_it_live,
    a_thousand_jobs_are_one_statement,
    a_batch_answers_earlier_jobs_in_place_and_writes_all_or_nothing,
);
