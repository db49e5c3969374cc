//! How claimed jobs reach workers, behind one trait: straight from the SQL table (a worker polls
//! it, and is woken early by its own process's writes), or through Redis Streams with a consumer
//! group per kind (XREADGROUP hands out job ids; XACK when the attempt is over; XAUTOCLAIM takes
//! up the entries of a consumer that died; a dead-letter stream records dead jobs). Either way
//! the SQL claim decides who holds a job, and a worker that cannot reach Redis falls back to the
//! table, so that nothing waits on Redis to come back.

mod relay;
mod streams;
mod table;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::job::{Job, at_most_until, now_ms};
use crate::store::JobStore;

pub use relay::{Relay, marker_key};
pub use streams::{GROUP, StreamDispatch, dead_letter_key, stream_key};
pub use table::TableDispatch;

/// The kinds a worker runs, each with its concurrency limit across every worker.
pub type KindLimits = Vec<(String, Option<usize>)>;

/// How jobs reach workers.
#[async_trait]
pub trait Dispatch: Send + Sync + 'static {
    /// Claims up to `max` due jobs of `kinds` for `worker` under `lease`, waiting at most `wait`
    /// for some to appear.
    async fn next(
        &self,
        worker: &str,
        kinds: &KindLimits,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Vec<Job>;

    /// `worker` still runs `job` (its lease was just renewed).
    async fn heartbeat(&self, _job: &Job, _worker: &str) {}

    /// The attempts of `jobs` are over and recorded.
    async fn finished(&self, _jobs: &[Job]) {}

    /// `job` is dead after `error`.
    async fn dead(&self, _job: &Job, _error: &str) {}
}

/// Which kind a claim from the table starts with, turning by one each claim in this process:
/// claims fill the free slots kind by kind, and a kind always first would keep one behind it
/// waiting for as long as its own backlog lasts.
static TURN: AtomicUsize = AtomicUsize::new(0);

/// `kinds`, starting at this claim's turn.
fn in_turn<T>(mut kinds: Vec<T>) -> Vec<T> {
    if !kinds.is_empty() {
        let turn = TURN.fetch_add(1, Ordering::Relaxed) % kinds.len();
        kinds.rotate_left(turn);
    }
    kinds
}

/// Claims every kind in turn, up to `max` in all, from the SQL table alone: the kinds without a
/// limit in one statement, then each kind under a limit (its own count of what runs), each
/// claim starting one kind further than the last.
async fn claim_from_table(
    store: &JobStore,
    worker: &str,
    kinds: &KindLimits,
    max: usize,
    lease: Duration,
) -> Vec<Job> {
    let (limited, unlimited): (Vec<_>, Vec<_>) =
        kinds.iter().partition(|(_, limit)| limit.is_some());
    let unlimited: Vec<&str> = in_turn(unlimited)
        .into_iter()
        .map(|(kind, _)| kind.as_str())
        .collect();
    let mut claimed = match store.claim_any(worker, &unlimited, max, lease).await {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::warn!(kinds = ?unlimited, error = %e, "cannot claim jobs");
            Vec::new()
        }
    };
    if limited.is_empty() || claimed.len() >= max {
        return claimed;
    }
    // A limited kind's claim takes its lock and counts what runs: asked first, for every
    // limited kind at once, which have anything to claim (a failed read claims them all).
    let names: Vec<&str> = limited.iter().map(|(kind, _)| kind.as_str()).collect();
    let due = store.due_kinds(&names).await.unwrap_or_else(|e| {
        tracing::warn!(kinds = ?names, error = %e, "cannot read which kinds have jobs due");
        names.iter().map(|kind| (*kind).to_owned()).collect()
    });
    for (kind, limit) in in_turn(limited) {
        let room = max.saturating_sub(claimed.len());
        if room == 0 {
            break;
        }
        if !due.contains(kind) {
            continue;
        }
        match store.claim(worker, kind, *limit, room, lease, None).await {
            Ok(jobs) => claimed.extend(jobs),
            Err(e) => tracing::warn!(%kind, error = %e, "cannot claim jobs"),
        }
    }
    claimed
}

/// Claims from the table (`worker`, its kinds, at most `max`, under `lease`); with nothing
/// claimed, waits for the process's next wake-up (`wake`: a write of jobs here or, announced,
/// elsewhere; a slot or a row let go), or until one of its kinds' jobs comes due by the clock
/// (a retry's or a scheduled job's time, a lease that runs out), or at most `wait` (the poll:
/// what catches a wake-up lost all the same).
async fn claim_or_wait(
    store: &JobStore,
    wake: &tokio::sync::Notify,
    (worker, kinds, max, lease): (&str, &KindLimits, usize, Duration),
    wait: Duration,
) -> Vec<Job> {
    let woken = wake.notified();
    let looked = now_ms();
    let claimed = claim_from_table(store, worker, kinds, max, lease).await;
    if claimed.is_empty() {
        let names: Vec<&str> = kinds.iter().map(|(kind, _)| kind.as_str()).collect();
        let due = match store.next_due(&names, looked).await {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(kinds = ?names, error = %e, "cannot read when jobs come due");
                None
            }
        };
        let _ = tokio::time::timeout(at_most_until(wait, due), woken).await;
    }
    claimed
}

/// The guard of `mutex`, whether or not a holder panicked: what it guards stays usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::NewJob;

    /// One waiting job of each of `kinds`, in order.
    async fn enqueue(store: &JobStore, kinds: impl IntoIterator<Item = &str>) {
        for kind in kinds {
            let new = NewJob {
                kind: kind.into(),
                creator: "test".into(),
                ..NewJob::default()
            };
            store.enqueue(new).await.unwrap();
        }
    }

    /// A store on a fresh database, and the count of statements it runs.
    async fn store_counting_statements() -> (JobStore, Arc<AtomicUsize>) {
        let mut db = crate::store::explain::database().await;
        let statements = Arc::new(AtomicUsize::new(0));
        let counter = statements.clone();
        db.set_metric_callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        (JobStore::new(db), statements)
    }

    /// A worker's claim from the table costs one round trip for all the kinds it runs without
    /// a limit, each kind in turn until its free slots are filled: not one per kind, most of
    /// which find nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_from_the_table_is_one_statement_for_every_unlimited_kind() {
        let (store, statements) = store_counting_statements().await;
        enqueue(&store, ["a", "a", "b", "b"]).await;
        let kinds: KindLimits = ["none", "a", "b", "nothing"]
            .into_iter()
            .map(|kind| (kind.to_owned(), None))
            .collect();
        let before = statements.load(Ordering::SeqCst);
        let claimed = claim_from_table(&store, "w", &kinds, 3, Duration::from_secs(60)).await;
        assert_eq!(statements.load(Ordering::SeqCst) - before, 1, "one claim");
        assert_eq!(claimed.len(), 3);
    }

    /// A limited kind with nothing due costs its pool one read, not a transaction that takes
    /// the kind's lock and counts what runs: every wake-up of the pool of `jobs.noop` (limited
    /// to one by default) ran that transaction, two or three times an order in the orders
    /// bench, for a kind nobody had used. With a job due, it is claimed, within its limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_limited_kind_with_nothing_due_is_one_read_and_no_claim() {
        let (store, statements) = store_counting_statements().await;
        let kinds: KindLimits = vec![("quiet".into(), Some(1)), ("other".into(), Some(2))];
        let lease = Duration::from_secs(60);
        let before = statements.load(Ordering::SeqCst);
        assert!(
            claim_from_table(&store, "w", &kinds, 3, lease)
                .await
                .is_empty()
        );
        assert_eq!(statements.load(Ordering::SeqCst) - before, 1, "one read");
        enqueue(&store, ["quiet", "quiet"]).await;
        let claimed = claim_from_table(&store, "w", &kinds, 3, lease).await;
        assert_eq!(claimed.len(), 1, "one at a time: {claimed:?}");
    }

    /// A kind behind a busy one is not kept waiting for the busy one's backlog: each claim from
    /// the table starts one kind further, so with two kinds the quiet one's job is among the
    /// first two claims of one slot each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kind_behind_a_busy_one_is_claimed_at_its_turn() {
        let store = JobStore::new(crate::store::explain::database().await);
        enqueue(&store, ["busy"; 10].into_iter().chain(["quiet"])).await;
        let kinds: KindLimits = vec![("busy".into(), None), ("quiet".into(), None)];
        let mut claimed = Vec::new();
        for _ in 0..2 {
            let one = claim_from_table(&store, "w", &kinds, 1, Duration::from_secs(60)).await;
            claimed.extend(one.into_iter().map(|job| job.kind));
        }
        claimed.sort();
        assert_eq!(claimed, ["busy", "quiet"], "one of each in two claims");
    }
}
