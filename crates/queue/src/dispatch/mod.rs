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
use std::time::Duration;

use async_trait::async_trait;

use crate::job::Job;
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

/// Claims every kind in turn, up to `max` in all; the SQL table alone.
async fn claim_from_table(
    store: &JobStore,
    worker: &str,
    kinds: &KindLimits,
    max: usize,
    lease: Duration,
) -> Vec<Job> {
    let mut claimed = Vec::new();
    for (kind, limit) in kinds {
        let room = max.saturating_sub(claimed.len());
        if room == 0 {
            break;
        }
        match store.claim(worker, kind, *limit, room, lease, None).await {
            Ok(jobs) => claimed.extend(jobs),
            Err(e) => tracing::warn!(%kind, error = %e, "cannot claim jobs"),
        }
    }
    claimed
}

/// Claims from the table (`worker`, its kinds, at most `max`, under `lease`); with nothing
/// claimed, waits up to `wait` for this process's next write (`wake`) before answering.
async fn claim_or_wait(
    store: &JobStore,
    wake: &tokio::sync::Notify,
    (worker, kinds, max, lease): (&str, &KindLimits, usize, Duration),
    wait: Duration,
) -> Vec<Job> {
    let woken = wake.notified();
    let claimed = claim_from_table(store, worker, kinds, max, lease).await;
    if claimed.is_empty() {
        let _ = tokio::time::timeout(wait, woken).await;
    }
    claimed
}

/// The guard of `mutex`, whether or not a holder panicked: what it guards stays usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
