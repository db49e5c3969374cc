//! Running jobs: a worker claims what its handlers can do, as many at once as its slots allow
//! (shared by most kinds; a kind that waits on the network has slots of its own), renews each
//! lease while the handler runs (a heartbeat), and records the outcome — done, tried again after
//! a backoff with jitter, or dead after the last attempt. A worker that dies leaves leases that
//! run out; another worker then takes those jobs up. Delivery is at least once: handlers are
//! idempotent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt as _;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::Queue;
use crate::dispatch::KindLimits;
use crate::job::{Backoff, Job, State, millis, now_ms};

/// Longest a busy worker waits for its last claim's slots to come free before it claims again.
const BATCH_WAIT: Duration = Duration::from_millis(5);

/// Most successes one statement records, and most a pool's completer holds unrecorded: past
/// that, a finished attempt keeps its slot until the completer catches up.
const COMPLETE_BATCH: usize = 500;

/// A job whose handler succeeded, the attempt waiting to hear whether it is recorded (true:
/// done; false: the worker had lost it), and its place in the completer's backlog.
type Success = (
    Job,
    oneshot::Sender<Result<bool, String>>,
    OwnedSemaphorePermit,
);

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// It may work later: tried again after a backoff while attempts remain.
    Retry(String),
    /// It never will: dead at once.
    Permanent(String),
    /// The attempt lost its job to another worker (a write under its fence was refused):
    /// nothing is recorded, the job is the other attempt's.
    Lost(String),
}

impl From<crate::QueueError> for Failure {
    fn from(e: crate::QueueError) -> Self {
        match e {
            crate::QueueError::LeaseLost { .. } => Failure::Lost(e.to_string()),
            e => Failure::Retry(e.to_string()),
        }
    }
}

/// What runs the jobs of one kind.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// One attempt at `job`. It may run more than once for one job (a redelivery after a lost
    /// lease), so its effects must be idempotent.
    async fn run(&self, job: &Job) -> Result<(), Failure>;
}

/// A kind of job a worker runs.
#[derive(Clone)]
pub struct Kind {
    /// Its name (`email.send`).
    pub name: String,
    /// What runs it.
    pub handler: Arc<dyn Handler>,
    /// At most this many of the kind run at once, across every worker.
    pub limit: Option<usize>,
    /// A job of the kind is tried again for this long after it was written, however many
    /// attempts that takes (its `max_attempts` still bounds it); `None`: by attempts alone.
    pub retry_for: Option<Duration>,
    /// A job of the kind is written every this often, by one of the processes that run it.
    pub every: Option<Duration>,
    /// Slots of its own in each worker (at most this many of the kind at once there), beside
    /// the worker's shared ones; `None`: the kind takes the shared slots.
    pub concurrency: Option<usize>,
}

impl Kind {
    /// Kind `name`, run by `handler`, unlimited, retried by attempts, written by callers.
    pub fn new(name: impl Into<String>, handler: Arc<dyn Handler>) -> Self {
        Self {
            name: name.into(),
            handler,
            limit: None,
            retry_for: None,
            every: None,
            concurrency: None,
        }
    }

    /// `slots` of its own in each worker, beside the shared ones: for a kind that spends its
    /// time waiting on the network (a saga's calls), which a worker's CPU-sized share of slots
    /// would starve, and which should not take the other kinds' slots either.
    #[must_use]
    pub fn concurrent(mut self, slots: Option<usize>) -> Self {
        self.concurrency = slots;
        self
    }

    /// At most `limit` of the kind at once across every worker.
    #[must_use]
    pub fn limited(mut self, limit: Option<usize>) -> Self {
        self.limit = limit;
        self
    }

    /// Tried again for `window` after being written (e-mail outlasting an SMTP outage).
    #[must_use]
    pub fn retried_for(mut self, window: Duration) -> Self {
        self.retry_for = Some(window);
        self
    }

    /// Written every `interval` by whichever process that runs the kind claims the round
    /// (leader-free: a conditional update of its row in `queue_periodic`).
    #[must_use]
    pub fn every(mut self, interval: Duration) -> Self {
        self.every = Some(interval);
        self
    }
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kind")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .field("retry_for", &self.retry_for)
            .field("every", &self.every)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Its name in leases and logs; unique per worker. A kind with slots of its own is claimed
    /// as `{id}/{kind}`.
    pub id: String,
    /// Jobs of the kinds without slots of their own it runs at once.
    pub concurrency: usize,
    /// How long a claim holds a job without a heartbeat (the visibility timeout).
    pub lease: Duration,
    /// Waits between attempts.
    pub backoff: Backoff,
    /// The longest it waits for work before looking again; wake-ups (writes, freed slots, the
    /// next job coming due) cut the wait short, and this catches one that was lost.
    pub poll: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            concurrency: 4,
            lease: Duration::from_secs(30),
            backoff: Backoff::default(),
            poll: Duration::from_secs(1),
        }
    }
}

/// Slots a worker claims jobs for: those its kinds without slots of their own share, or one
/// kind's own.
struct Pool {
    /// The claimer's name in leases and as a stream consumer.
    id: String,
    kinds: KindLimits,
    concurrency: usize,
    /// One of its jobs finished: a slot is free.
    freed: Arc<Notify>,
}

impl Pool {
    fn new(id: String, kinds: KindLimits, concurrency: usize) -> Self {
        Self {
            id,
            kinds,
            concurrency: concurrency.max(1),
            freed: Arc::new(Notify::new()),
        }
    }
}

/// A worker over a queue.
pub struct Worker {
    queue: Queue,
    kinds: Arc<HashMap<String, Kind>>,
    options: WorkerOptions,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker running `kinds` from `queue`.
    pub fn new(queue: Queue, kinds: Vec<Kind>, options: WorkerOptions) -> Self {
        queue.metrics.runs(kinds.iter().map(|k| k.name.as_str()));
        Self {
            queue,
            kinds: Arc::new(kinds.into_iter().map(|k| (k.name.clone(), k)).collect()),
            options,
        }
    }

    /// Runs until `stop` resolves, then stops claiming and waits for the jobs it holds.
    pub fn spawn(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let stopped = Arc::new(AtomicBool::new(false));
        self.queue.listen_to_other_processes();
        let pools = self.pools();
        tokio::spawn({
            let freed: Vec<Arc<Notify>> = pools.iter().map(|p| p.freed.clone()).collect();
            let (stopped, wake) = (stopped.clone(), self.queue.wake.claimers.clone());
            async move {
                stop.await;
                stopped.store(true, Ordering::SeqCst);
                freed.iter().for_each(|f| f.notify_waiters());
                wake.notify_waiters();
            }
        });
        tokio::spawn(self.run(pools, stopped))
    }

    /// The slots it claims for: one pool shared by the kinds without slots of their own, one
    /// for the kinds under a limit (claimed from the table, never blocked on a Redis read, and
    /// woken when a slot of theirs frees in this process: as many slots as the shared pool, at
    /// most the sum of their limits, named `{id}#limited`), and one for each kind with its own.
    fn pools(&self) -> Vec<Pool> {
        let id = &self.options.id;
        let (limited, shared): (KindLimits, KindLimits) = self
            .kinds
            .values()
            .filter(|k| k.concurrency.is_none())
            .map(|k| (k.name.clone(), k.limit))
            .partition(|(_, limit)| limit.is_some());
        let own = self.kinds.values().filter_map(|k| {
            let slots = k.concurrency?;
            Some(Pool::new(
                format!("{id}/{}", k.name),
                vec![(k.name.clone(), k.limit)],
                slots,
            ))
        });
        let concurrency = self.options.concurrency;
        let at_most = limited
            .iter()
            .filter_map(|(_, limit)| *limit)
            .fold(0, usize::saturating_add);
        let shared = (!shared.is_empty()).then(|| Pool::new(id.clone(), shared, concurrency));
        let limited = (!limited.is_empty())
            .then(|| Pool::new(format!("{id}#limited"), limited, concurrency.min(at_most)));
        shared.into_iter().chain(limited).chain(own).collect()
    }

    async fn run(self, pools: Vec<Pool>, stopped: Arc<AtomicBool>) {
        for kind in self.kinds.values().filter(|k| k.limit.is_some()) {
            if let Err(e) = self.queue.store.register_kind(&kind.name).await {
                tracing::warn!(kind = %kind.name, error = %e, "cannot register a job kind");
            }
        }
        let this = Arc::new(self);
        spawn_periodic(&this, stopped.clone());
        let claiming: Vec<_> = pools
            .into_iter()
            .map(|pool| tokio::spawn(this.clone().claim(pool, stopped.clone())))
            .collect();
        for pool in claiming {
            let _ = pool.await;
        }
        tracing::info!(worker = %this.options.id, "worker stopped");
    }

    /// Claims jobs for `pool`'s free slots and runs them, until `stopped`; then waits for every
    /// job it holds to be recorded.
    async fn claim(self: Arc<Self>, pool: Pool, stopped: Arc<AtomicBool>) {
        let Pool {
            id,
            kinds,
            concurrency,
            freed,
        } = pool;
        let permits = Arc::new(Semaphore::new(concurrency));
        tracing::info!(worker = %id, kinds = ?kinds, concurrency, "worker started");
        let completer = Completer::spawn(self.queue.clone(), id.clone());
        // Every attempt's task holds a clone until it ends: the drain waits for all to go.
        let (attempt, mut attempts_ended) = mpsc::channel::<()>(1);
        // How many jobs the last claim took if it filled every free slot (more work is
        // waiting then); 0 if it did not.
        let mut last_batch = 0;
        while !stopped.load(Ordering::SeqCst) {
            if last_batch > 0 && permits.available_permits() < last_batch {
                // Work is waiting anyway: give the last claim's jobs a moment to finish, so that
                // the next claim (a round trip to SQL, and to Redis) takes as many, not a few.
                // Per statement PostgreSQL claimed and recorded 1.4k jobs/s one at a time, 6.9k
                // twelve, 8.2k twenty (benches/queue_rows.sh); waiting for half the slots, the
                // queue bench's claims took ~12 jobs of 20. Slots that longer jobs held before
                // that claim are not waited for: one slow job would hold every claim back.
                let until = tokio::time::Instant::now() + BATCH_WAIT;
                loop {
                    let finished = freed.notified();
                    if permits.available_permits() >= last_batch || stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    if tokio::time::timeout_at(until, finished).await.is_err() {
                        break;
                    }
                }
            }
            if stopped.load(Ordering::SeqCst) {
                // A stop that came during the wait: nothing more is claimed.
                break;
            }
            let free = permits.available_permits();
            if free == 0 {
                // Wait for a job to finish (or the stop).
                let finished = freed.notified();
                if permits.available_permits() == 0 && !stopped.load(Ordering::SeqCst) {
                    finished.await;
                }
                continue;
            }
            let (lease, poll) = (self.options.lease, self.options.poll);
            let jobs = self
                .queue
                .dispatch
                .next(&id, &kinds, free, lease, poll)
                .await;
            let claimed = jobs.len();
            last_batch = if claimed >= free { claimed } else { 0 };
            for job in jobs {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    // Never more claimed than free slots; should it happen, the lease expires
                    // and another worker takes the job.
                    tracing::error!(job = %job.id, claimed, free, "claimed a job without a free slot");
                    continue;
                };
                let slot = Slot {
                    permit: Some(permit),
                    freed: freed.clone(),
                };
                let (this, completer, id) = (self.clone(), completer.clone(), id.clone());
                let attempt = attempt.clone();
                tokio::spawn(async move {
                    this.run_one(&id, job, slot, &completer).await;
                    drop(attempt);
                });
            }
        }
        // Drain: every attempt ends once its outcome is recorded (or could not be).
        drop(attempt);
        let _ = attempts_ended.recv().await;
    }

    /// Runs `job`, claimed as `worker` in `slot`, renewing its lease while the handler runs, and
    /// records its outcome. A success of a kind without a limit gives the slot back as soon as the
    /// completer has it, so that the pool claims its next jobs while the last ones are recorded;
    /// a failure, or a kind under a limit (whose claims count the job as running until its
    /// success is recorded), keeps it until recorded.
    async fn run_one(&self, worker: &str, job: Job, mut slot: Slot, completer: &Completer) {
        let Some(kind) = self.kinds.get(&job.kind) else {
            return;
        };
        let queue = &self.queue;
        queue.metrics.started(&job.kind);
        let running_now = queue.metrics.running(&job.kind);
        let (heartbeat, lease_lost) = self.heartbeat(&job, worker);
        let running = std::panic::AssertUnwindSafe(kind.handler.run(&job)).catch_unwind();
        // An attempt whose job another worker took over stops where it is: dropping the
        // handler's future cancels it at its next await, before it acts again.
        let outcome = tokio::select! {
            outcome = running => outcome
                .unwrap_or_else(|_| Err(Failure::Retry("the handler panicked".into()))),
            Ok(()) = lease_lost => Err(Failure::Lost("the lease was taken over".into())),
        };
        drop(running_now);
        // Not renewed while the outcome waits to be recorded: with a pool's backlog of
        // successes, a stall of the database would otherwise wake hundreds of renewals at once
        // (the soak saw 95 in one instant, each wanting a connection the completer needed).
        heartbeat.abort();
        let recorded = match &outcome {
            Err(Failure::Lost(why)) => {
                tracing::warn!(job = %job.id, kind = %job.kind, attempt = job.attempts, %why, "an attempt lost its job: stopped, nothing recorded");
                queue.metrics.lost(&job.kind);
                return;
            }
            Ok(()) => {
                let recorded = completer.record(job.clone()).await;
                if kind.limit.is_none() {
                    slot.give_back();
                }
                recorded
                    .await
                    .unwrap_or_else(|_| Err("the completer stopped".into()))
                    .map(|held| {
                        held.then(|| queue.metrics.succeeded(&job.kind));
                        held.then_some(State::Succeeded)
                    })
            }
            Err(failure) => self.record_failure(kind, (&job, worker), failure).await,
        };
        drop(slot);
        if kind.limit.is_some() {
            // A slot of a limited kind came free: the waiting claims take the next job now
            // (another process's too, on PostgreSQL).
            queue.wake();
        }
        match recorded {
            Ok(Some(_)) => {}
            Ok(None) => {
                // Another attempt holds the job now: this one's outcome is not the job's.
                queue.metrics.lost(&job.kind);
                tracing::warn!(job = %job.id, attempt = job.attempts, "the job was taken over before this attempt's outcome was recorded")
            }
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "cannot record a job's outcome; it will run again")
            }
        }
    }

    /// Renews `job`'s lease (held by `worker`) every third of it while the attempt runs; the
    /// receiver hears when the lease was lost (another worker holds the job).
    fn heartbeat(&self, job: &Job, worker: &str) -> (JoinHandle<()>, oneshot::Receiver<()>) {
        let (lost, lease_lost) = oneshot::channel::<()>();
        let (queue, job) = (self.queue.clone(), job.clone());
        let (worker, lease) = (worker.to_owned(), self.options.lease);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                match queue.store.heartbeat(&job, &worker, lease).await {
                    Ok(true) => queue.dispatch.heartbeat(&job, &worker).await,
                    Ok(false) => {
                        let _ = lost.send(());
                        return;
                    }
                    Err(e) => tracing::warn!(job = %job.id, error = %e, "heartbeat failed"),
                }
            }
        });
        (task, lease_lost)
    }

    /// Records a failed attempt: to be retried (after a backoff, within the kind's window) or
    /// dead; `None` when another attempt holds the job now.
    async fn record_failure(
        &self,
        kind: &Kind,
        (job, worker): (&Job, &str),
        failure: &Failure,
    ) -> Result<Option<State>, String> {
        let queue = &self.queue;
        let (error, retry_at) = match failure {
            Failure::Retry(e) => (e, self.retry_at(kind, job)),
            Failure::Permanent(e) | Failure::Lost(e) => (e, None),
        };
        tracing::warn!(job = %job.id, kind = %job.kind, attempt = job.attempts, %error, "job attempt failed");
        queue.metrics.failed(&job.kind);
        let state = queue.store.fail(job, worker, error, retry_at).await;
        match &state {
            Ok(Some(State::Failed)) => {
                queue.metrics.retried(&job.kind);
                // Idle claimers wait for the soonest due job they saw; this one is new to them
                // (and the relay hands it again once due).
                queue.wake();
            }
            Ok(Some(State::Dead)) => {
                queue.metrics.dead(&job.kind);
                queue.dispatch.dead(job, error).await;
            }
            _ => {}
        }
        if let Ok(Some(_)) = state {
            queue.dispatch.finished(std::slice::from_ref(job)).await;
        }
        state.map_err(|e| e.to_string())
    }
}

impl Worker {
    /// When `job`, whose attempt failed, is tried again: after a backoff, unless its kind's
    /// retry window (from when it was queued) has passed; its attempts are counted by the store.
    fn retry_at(&self, kind: &Kind, job: &Job) -> Option<i64> {
        let now = now_ms();
        let within = kind
            .retry_for
            .is_none_or(|window| now.saturating_sub(job.queued_at) < millis(window));
        within.then(|| now.saturating_add(millis(self.options.backoff.delay(job.attempts))))
    }
}

/// Writes the jobs of the periodic kinds a worker runs, each when its round is due and this
/// process claims it, until the worker stops.
fn spawn_periodic(worker: &Arc<Worker>, stopped: Arc<AtomicBool>) {
    let periodic: Vec<(String, Duration)> = worker
        .kinds
        .values()
        .filter_map(|k| k.every.map(|every| (k.name.clone(), every)))
        .collect();
    let Some(shortest) = periodic.iter().map(|(_, every)| *every).min() else {
        return;
    };
    let queue = worker.queue.clone();
    let tick = (shortest / 2).clamp(Duration::from_millis(10), Duration::from_secs(5));
    tokio::spawn(async move {
        while !stopped.load(Ordering::SeqCst) {
            for (kind, every) in &periodic {
                match queue.store.schedule(kind, *every).await {
                    Ok(true) => queue.wake(),
                    Ok(false) => {}
                    Err(e) => tracing::debug!(%kind, error = %e, "cannot schedule a periodic job"),
                }
            }
            tokio::time::sleep(tick).await;
        }
    });
}

/// A slot of a pool, held by one attempt; given back (and the pool told) when dropped.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Slot {
    /// Gives the slot back now, once.
    fn give_back(&mut self) {
        if let Some(permit) = self.permit.take() {
            // Back first, then told: a claim loop woken must find the slot free.
            drop(permit);
            self.freed.notify_waiters();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Records a pool's successes in batches, as River's batch completer does: every success that
/// arrived while the last statement ran goes into the next one (one UPDATE, one XACK per
/// stream), so a busy worker pays one round trip for many jobs and an idle one waits for none.
/// It runs beside the pool's claims: an attempt gives its slot back once its success is here,
/// and at most [`COMPLETE_BATCH`] of the pool's wait to be recorded (River bounds its
/// completer's backlog the same way).
#[derive(Clone)]
struct Completer {
    successes: mpsc::UnboundedSender<Success>,
    backlog: Arc<Semaphore>,
}

impl Completer {
    fn spawn(queue: Queue, worker: String) -> Self {
        let (successes, mut received) = mpsc::unbounded_channel::<Success>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(COMPLETE_BATCH);
            while received.recv_many(&mut batch, COMPLETE_BATCH).await > 0 {
                let (jobs, waiting): (Vec<Job>, Vec<_>) = batch
                    .drain(..)
                    .map(|(job, reply, place)| (job, (reply, place)))
                    .unzip();
                let held = queue.store.succeed_all(&jobs, &worker).await;
                if let Ok(held) = &held {
                    let done: Vec<Job> = jobs
                        .iter()
                        .filter(|job| held.contains(&job.id))
                        .cloned()
                        .collect();
                    queue.dispatch.finished(&done).await;
                }
                for (job, (reply, place)) in jobs.iter().zip(waiting) {
                    let recorded = match &held {
                        Ok(held) => Ok(held.contains(&job.id)),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = reply.send(recorded);
                    drop(place);
                }
            }
        });
        Self {
            successes,
            backlog: Arc::new(Semaphore::new(COMPLETE_BATCH)),
        }
    }

    /// Hands `job`'s success over, once the backlog has room; the receiver hears whether it
    /// was recorded.
    async fn record(&self, job: Job) -> oneshot::Receiver<Result<bool, String>> {
        let (reply, recorded) = oneshot::channel();
        // The backlog is never closed: a place always comes.
        if let Ok(place) = self.backlog.clone().acquire_owned().await {
            let _ = self.successes.send((job, reply, place));
        }
        recorded
    }
}
