//! A durable job queue that knows nothing of users or orders. A job is a row written in the
//! caller's own database transaction (the transactional outbox), claimed by workers under a lease
//! they renew while they run it, retried with exponential backoff and jitter (by attempts, or for
//! a window of time), dead after its last attempt with its last error, scheduled (`run_after`),
//! unique by key while it lives, limited per kind across every worker, and written
//! periodically by whichever process claims the round. Each attempt carries a fencing token
//! ([`Fence`]) that the handler's own writes are made conditional on ([`hold`]), and is stopped
//! when another worker takes its job over; side effects outside the database are done once per
//! key ([`effect`]). Jobs reach workers through Redis Streams when Redis is configured (a relay
//! hands the table's due jobs to them), or straight from the table. Finished jobs are deleted
//! after a retention window.

#![forbid(unsafe_code)]

mod dispatch;
pub mod effect;
mod entity;
pub mod job;
mod metrics;
pub mod migration;
pub mod store;
mod wake;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::task::JoinHandle;

pub use dispatch::{Dispatch, GROUP, dead_letter_key, marker_key, stream_key};
pub use job::{Backoff, Fence, Job, NewJob, State};
pub use metrics::QueueMetrics;
pub use migration::Migrator;
pub use store::{
    Enqueued, JobStore, Listing, QueueError, Unhanded, enqueue, enqueue_all, enqueue_new,
    enqueuing, held, hold,
};
pub use worker::{Failure, Handler, Kind, Worker, WorkerOptions};

/// The queue of a process: its table, how jobs reach its workers, and a wake-up for them.
#[derive(Clone)]
pub struct Queue {
    store: JobStore,
    dispatch: Arc<dyn Dispatch>,
    redis: Option<(fred::prelude::Client, String)>,
    wake: wake::Wake,
    /// Whether this process listens for the others' announcements (once it runs workers).
    listening: Arc<std::sync::atomic::AtomicBool>,
    metrics: QueueMetrics,
    /// Who this process is when it takes a role under a lease (the relay, the pruner).
    holder: String,
}

/// How long finished jobs are kept before they are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Jobs that succeeded.
    pub succeeded: Duration,
    /// Dead jobs (kept longer: someone may want to read why, and retry them).
    pub dead: Duration,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("redis", &self.redis.as_ref().map(|(_, prefix)| prefix))
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Jobs in `db`, handed to workers straight from the table.
    pub fn table(db: DatabaseConnection, metrics: QueueMetrics) -> Self {
        let (store, holder) = (JobStore::new(db), holder());
        let wake = wake::Wake::new(&store, &holder);
        Self {
            dispatch: Arc::new(dispatch::TableDispatch::new(
                store.clone(),
                wake.claimers.clone(),
            )),
            store,
            redis: None,
            wake,
            listening: Arc::default(),
            metrics,
            holder,
        }
    }

    /// Jobs in `db`, handed to workers through Redis Streams under `prefix` at `url` —
    /// from the table while Redis is away, which does not keep a process from starting.
    pub async fn streams(
        db: DatabaseConnection,
        url: &str,
        prefix: &str,
        metrics: QueueMetrics,
    ) -> Result<Self, fred::error::Error> {
        let (store, holder) = (JobStore::new(db), holder());
        let wake = wake::Wake::new(&store, &holder);
        let dispatch = dispatch::StreamDispatch::connect(
            store.clone(),
            url,
            prefix,
            wake.claimers.clone(),
            metrics.clone(),
        )
        .await?;
        let relay_client = keel_redis::client(
            url,
            std::time::Duration::from_millis(500),
            keel_redis::Protocol::Resp2,
        )
        .await?;
        Ok(Self {
            dispatch: Arc::new(dispatch),
            store,
            redis: Some((relay_client, prefix.to_owned())),
            wake,
            listening: Arc::default(),
            metrics,
            holder,
        })
    }

    /// The jobs table.
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// Tells the workers and relay of this process, and on PostgreSQL of every process, that
    /// jobs were written or a limited kind's slot freed (after the commit): they look at once
    /// instead of at their next poll.
    pub fn wake(&self) {
        self.wake.everyone();
    }

    /// On PostgreSQL, from now on wakes this process's workers and relay when another process
    /// announces a write of jobs (for as long as they live), over a connection of its own
    /// beside the pool: a process that runs workers listens, one that only writes does not
    /// spend a connection on it. Once per process; its own announcements are passed over, and
    /// each time the listener (re)connects they are woken too: what was sent while it did not
    /// listen is lost.
    pub(crate) fn listen_to_other_processes(&self) {
        use std::sync::atomic::Ordering;
        let Some(pool) = self.store.postgres_pool() else {
            return;
        };
        if self.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        let (claimers, relay) = (&self.wake.claimers, &self.wake.relay);
        let (claimers, relay) = (Arc::downgrade(claimers), Arc::downgrade(relay));
        let me = self.holder.clone();
        let own = keel_notify::own_connection(&pool);
        tokio::spawn(keel_notify::listen(own, wake::CHANNEL, move |heard| {
            let (Some(claimers), Some(relay)) = (claimers.upgrade(), relay.upgrade()) else {
                return false;
            };
            // Anything but its own announcement: another process's, or listening (again),
            // when what was announced before went unheard.
            if heard != keel_notify::Heard::Notification(&me) {
                claimers.notify_waiters();
                relay.notify_waiters();
            }
            true
        }));
    }

    /// Hands due jobs to Redis until `stop` resolves, while this process holds the relay's
    /// lease (one process at a time does); nothing to do without Redis. It looks when woken
    /// (a write of jobs) and every `idle` (for jobs that came due, or a lost notification).
    pub fn spawn_relay(
        &self,
        idle: Duration,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Option<JoinHandle<()>> {
        let (client, prefix) = self.redis.clone()?;
        let relay = dispatch::Relay {
            store: self.store.clone(),
            client,
            prefix,
            holder: self.holder.clone(),
            metrics: self.metrics.clone(),
            handed_again_for: None,
            wake: self.wake.clone(),
        };
        Some(tokio::spawn(relay.run(idle, stop)))
    }

    /// Deletes finished jobs past `retention` every `every`, in batches, while this process
    /// holds the pruner's lease (one process at a time does), until `stop` resolves.
    pub fn spawn_pruner(
        &self,
        retention: Retention,
        every: Duration,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        let mut lease = store::Lease::new("pruner", &self.holder, every * 2, every);
        tokio::spawn(async move {
            let mut stop = std::pin::pin!(stop);
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = tick.tick() => {}
                }
                if lease.hold(&store).await {
                    prune(&store, retention, &metrics).await;
                }
            }
            lease.release(&store).await;
        })
    }

    /// Samples what waits into the metrics every `every`, until `stop` resolves.
    pub fn spawn_sampler(
        &self,
        every: Duration,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let mut stop = std::pin::pin!(stop);
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    _ = tick.tick() => {}
                }
                match store.depths().await {
                    Ok(depths) => metrics.waiting(&depths),
                    Err(e) => tracing::debug!(error = %e, "cannot sample the queue"),
                }
            }
        })
    }
}

/// A name for this process among the holders of leases.
fn holder() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Deletes the finished jobs past `retention`, a batch at a time.
async fn prune(store: &JobStore, retention: Retention, metrics: &QueueMetrics) {
    const BATCH: u64 = 1_000;
    for (state, window) in [
        (State::Succeeded, retention.succeeded),
        (State::Dead, retention.dead),
    ] {
        let before = job::now_ms().saturating_sub(job::millis(window));
        loop {
            match store.prune(state, before, BATCH).await {
                Ok(deleted) => {
                    metrics.pruned(deleted);
                    if deleted < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete finished jobs");
                    return;
                }
            }
            // Between batches, the claims that waited for the table have their turn.
            tokio::task::yield_now().await;
        }
    }
}
