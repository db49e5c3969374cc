//! The Redis Streams dispatcher: a consumer group per kind hands out job ids (XREADGROUP),
//! XACK when an attempt is over, XAUTOCLAIM takes up a dead consumer's entries, a dead-letter
//! stream records dead jobs; the SQL claim still decides who holds a job, and the table is the
//! fallback whenever Redis does not answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::*;
use keel_redis::fail_fast;
use tokio::sync::Notify;

use super::{Dispatch, KindLimits, claim_from_table, claim_or_wait, lock};
use crate::QueueMetrics;
use crate::job::Job;
use crate::store::JobStore;

/// Stream entries as read: entry id and fields.
type Entries = Vec<(String, HashMap<String, String>)>;

/// Where a stream entry came from, to acknowledge it.
#[derive(Debug, Clone)]
struct Entry {
    stream: String,
    id: String,
}

/// A stream entry read and not yet claimed: its kind, entry id and job id.
#[derive(Debug, Clone)]
struct Read {
    kind: String,
    entry: String,
    job: String,
}

/// What one consumer (a worker's pool of slots) reads with.
struct Consumer {
    /// A connection of its own: XREADGROUP blocks it.
    reader: Client,
    /// Entries read beyond the room of the call that read them (a read counts per stream, and
    /// a worker reads every kind's stream at once), claimed first by the next call.
    read_ahead: Mutex<Vec<Read>>,
    last_autoclaim: Mutex<Option<Instant>>,
    last_sweep: Mutex<Option<Instant>>,
}

/// Jobs handed out by Redis Streams, claimed in the table.
pub struct StreamDispatch {
    store: JobStore,
    url: String,
    /// Each consumer's own reader and state, by its name.
    consumers: Mutex<HashMap<String, Arc<Consumer>>>,
    /// Acknowledgements, heartbeats and the dead letters.
    client: Client,
    prefix: String,
    wake: std::sync::Arc<Notify>,
    entries: Mutex<HashMap<String, Entry>>,
    /// When the streams of the kinds under a limit were last emptied.
    last_trim: Mutex<Option<Instant>>,
    /// While Redis does not answer, until when the table alone is used.
    unreachable_until: Mutex<Option<Instant>>,
    metrics: QueueMetrics,
}

impl std::fmt::Debug for StreamDispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDispatch")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The consumer group every worker joins.
pub const GROUP: &str = "workers";

/// The key `name` of the queue under `prefix`. Every key of the queue shares one hash tag,
/// `{queue}`: on a Redis Cluster they live in one slot, so that one XREADGROUP reads every
/// kind's stream and a pipeline of XADDs is one node's; the prefix stays first, for ACL key
/// patterns (`~keel:*`).
pub(super) fn queue_key(prefix: &str, name: &str) -> String {
    format!("{prefix}{{queue}}:{name}")
}

/// The stream of `kind` under `prefix` (apart from the queue's other keys, whatever the kind's
/// name).
pub fn stream_key(prefix: &str, kind: &str) -> String {
    queue_key(prefix, &format!("jobs:{kind}"))
}

/// The dead-letter stream under `prefix`.
pub fn dead_letter_key(prefix: &str) -> String {
    queue_key(prefix, "dead")
}

/// The entry field that carries the job id.
pub(super) const JOB_FIELD: &str = "job";

/// How long the table alone is used after Redis failed to answer.
const FALLBACK: Duration = Duration::from_secs(2);

/// How often the streams of kinds under a limit are emptied.
const TRIM: Duration = Duration::from_secs(1);

/// How often a worker also claims from the table, for jobs no relay has handed out yet.
const SWEEP: Duration = Duration::from_secs(5);

/// The timeout of a command that does not block.
pub(super) const COMMAND: Duration = Duration::from_millis(500);

/// `command`, given at most `within`: fred's own timeouts do not cover a command queued while
/// the client reconnects, and a worker must never wait on a Redis that went away.
pub(super) async fn bounded<T>(
    within: Duration,
    command: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, fred::error::Error> {
    tokio::time::timeout(within, command)
        .await
        .unwrap_or_else(|_| {
            Err(fred::error::Error::new(
                fred::error::ErrorKind::Timeout,
                "Redis did not answer in time",
            ))
        })
}

impl StreamDispatch {
    /// Reads up to `count` new entries of every kind's stream for `worker` (COUNT holds per
    /// stream, so more may come: what is beyond the room is read ahead), waiting up to `wait`
    /// for some when `blocking`; `None` when Redis did not answer or a group was missing (made
    /// again).
    async fn read_new(
        &self,
        (worker, consumer): (&str, &Consumer),
        kinds: &KindLimits,
        count: usize,
        (wait, blocking): (Duration, bool),
    ) -> Option<Vec<Read>> {
        let keys: Vec<String> = kinds
            .iter()
            .map(|(kind, _)| stream_key(&self.prefix, kind))
            .collect();
        let ids: Vec<&str> = keys.iter().map(|_| ">").collect();
        let block = blocking.then(|| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
        let read: Result<Value, _> = bounded(
            wait + COMMAND * 2,
            consumer
                .reader
                .with_options(&fail_fast(wait + COMMAND))
                .xreadgroup(
                    GROUP,
                    worker,
                    Some(count as u64),
                    block,
                    false,
                    keys.clone(),
                    ids,
                ),
        )
        .await;
        // A read that waited its BLOCK out answers nil: nothing new, not a Redis gone away.
        let read = read.and_then(|value| match value {
            Value::Null => Ok(HashMap::new()),
            value => value.into_xread_response::<String, String, String, String>(),
        });
        let mut read = match read {
            Ok(read) => read,
            Err(e) if e.details().contains("NOGROUP") => {
                if let Err(e) = self.ensure_groups(kinds).await {
                    self.unreachable(&e);
                }
                return None;
            }
            Err(e) => {
                self.unreachable(&e);
                return None;
            }
        };
        // COUNT holds per stream: what is beyond the room is read ahead.
        let mut reads = Vec::new();
        for (kind, _) in kinds {
            if let Some(entries) = read.remove(&stream_key(&self.prefix, kind)) {
                reads.extend(to_reads(kind, entries));
            }
        }
        Some(reads)
    }

    /// Streams under `prefix` in the Redis at `url`, claims in `store`; while Redis is away,
    /// the table alone.
    pub async fn connect(
        store: JobStore,
        url: &str,
        prefix: &str,
        wake: std::sync::Arc<Notify>,
        metrics: QueueMetrics,
    ) -> Result<Self, fred::error::Error> {
        Ok(Self {
            store,
            url: url.to_owned(),
            consumers: Mutex::new(HashMap::new()),
            client: connect(url).await?,
            prefix: prefix.to_owned(),
            wake,
            entries: Mutex::new(HashMap::new()),
            last_trim: Mutex::new(None),
            unreachable_until: Mutex::new(None),
            metrics,
        })
    }

    /// Consumer `worker`'s reader and state, its connection made on its first read.
    async fn consumer(&self, worker: &str) -> Result<Arc<Consumer>, fred::error::Error> {
        if let Some(consumer) = lock(&self.consumers).get(worker) {
            return Ok(consumer.clone());
        }
        let consumer = Arc::new(Consumer {
            reader: connect(&self.url).await?,
            read_ahead: Mutex::new(Vec::new()),
            last_autoclaim: Mutex::new(None),
            last_sweep: Mutex::new(Some(Instant::now())),
        });
        Ok(lock(&self.consumers)
            .entry(worker.to_owned())
            .or_insert(consumer)
            .clone())
    }

    fn reachable(&self) -> bool {
        lock(&self.unreachable_until).is_none_or(|until| Instant::now() >= until)
    }

    fn unreachable(&self, error: &fred::error::Error) {
        let mut until = lock(&self.unreachable_until);
        if until.is_none_or(|at| Instant::now() >= at) {
            tracing::warn!(%error, "job streams unavailable; claiming from the table");
            self.metrics.fell_back();
        }
        *until = Some(Instant::now() + FALLBACK);
    }

    async fn ensure_groups(&self, kinds: &KindLimits) -> Result<(), fred::error::Error> {
        for (kind, _) in kinds {
            let created: Result<Value, _> = bounded(
                COMMAND,
                self.client.with_options(&fail_fast(COMMAND)).xgroup_create(
                    stream_key(&self.prefix, kind),
                    GROUP,
                    "0",
                    true,
                ),
            )
            .await;
            if let Err(e) = created
                && !e.details().contains("BUSYGROUP")
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Claims the jobs of stream entries `ids` (entry id → job id) of `kind`; acknowledges the
    /// entries whose job is done or held elsewhere, and gives back (to be claimed again) those
    /// whose row was only locked for a moment.
    async fn claim_entries(
        &self,
        worker: &str,
        (kind, limit): (&str, Option<usize>),
        lease: Duration,
        entries: Vec<(String, String)>,
    ) -> (Vec<Job>, Vec<Read>) {
        let stream = stream_key(&self.prefix, kind);
        let job_ids: Vec<String> = entries.iter().map(|(_, job)| job.clone()).collect();
        let claimed = match self
            .store
            .claim(worker, kind, limit, job_ids.len(), lease, Some(&job_ids))
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(%kind, error = %e, "cannot claim streamed jobs");
                return (Vec::new(), Vec::new());
            }
        };
        let mut spare = Vec::new();
        {
            let mut held = lock(&self.entries);
            for (entry, job) in entries {
                if claimed.iter().any(|j| j.id == job) {
                    let stream = stream.clone();
                    held.insert(job, Entry { stream, id: entry });
                } else {
                    spare.push((entry, job));
                }
            }
        }
        // Skipped though claimable: its row was locked (the relay marking it handed just after
        // Redis took it). Dropping the entry would leave the job to the sweep, seconds later.
        let again = match (limit, spare.is_empty()) {
            (None, false) => {
                let jobs: Vec<String> = spare.iter().map(|(_, job)| job.clone()).collect();
                self.store.claimable(kind, &jobs).await.unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let (again, spare): (Vec<_>, Vec<_>) =
            spare.into_iter().partition(|(_, job)| again.contains(job));
        // Not claimable now: done already, not due, held by a live lease, or over the kind's
        // limit. The table has it: a retry is handed again when due (a failed attempt unmarks
        // it); a job whose lease runs out is claimed from the table by the sweep, and a
        // limited kind is claimed from the table alone.
        self.discard(&stream, spare.into_iter().map(|(entry, _)| entry).collect())
            .await;
        let again = again.into_iter().map(|(entry, job)| Read {
            kind: kind.to_owned(),
            entry,
            job,
        });
        (claimed, again.collect())
    }

    /// Empties the streams of `kinds` (under a limit: claimed from the table, never read), at
    /// most once a second: the relay hands every kind alike, and unread entries would pile up.
    async fn trim(&self, kinds: &KindLimits) {
        if !due(&self.last_trim, TRIM) {
            return;
        }
        let pipeline = self.client.pipeline();
        for (kind, _) in kinds {
            let stream = stream_key(&self.prefix, kind);
            let _: Result<(), _> = pipeline.xtrim(stream, ("MAXLEN", 0)).await;
        }
        if let Err(e) = bounded(COMMAND, pipeline.all::<Vec<Value>>()).await {
            tracing::debug!(error = %e, "cannot trim the streams of limited kinds");
        }
    }

    /// Acknowledges and deletes `entries` of `stream`: a stream keeps an entry until it is
    /// deleted, acknowledged or not, so without this every job ever run stays in Redis.
    async fn discard(&self, stream: &str, entries: Vec<String>) {
        if entries.is_empty() {
            return;
        }
        let pipeline = self.client.pipeline();
        let _: Result<(), _> = pipeline.xack(stream, GROUP, entries.clone()).await;
        let _: Result<(), _> = pipeline.xdel(stream, entries).await;
        let done: Result<Vec<Value>, _> = bounded(COMMAND, pipeline.all()).await;
        if let Err(e) = done {
            tracing::debug!(error = %e, "cannot acknowledge stream entries");
        }
    }

    /// Claims the jobs of the entries read ahead before and of `reads`, at most `room`; the
    /// rest, and what was skipped for a moment's lock, is read ahead for the next call.
    async fn claim_reads(
        &self,
        (worker, consumer): (&str, &Consumer),
        kinds: &KindLimits,
        room: usize,
        lease: Duration,
        reads: Vec<Read>,
    ) -> Vec<Job> {
        let mut waiting = std::mem::take(&mut *lock(&consumer.read_ahead));
        waiting.extend(reads);
        let (mut claimed, mut again) = (Vec::new(), Vec::new());
        while claimed.len() < room && !waiting.is_empty() {
            let take = (room - claimed.len()).min(waiting.len());
            let batch: Vec<Read> = waiting.drain(..take).collect();
            for (kind, limit) in kinds {
                let entries: Vec<(String, String)> = batch
                    .iter()
                    .filter(|r| &r.kind == kind)
                    .map(|r| (r.entry.clone(), r.job.clone()))
                    .collect();
                if !entries.is_empty() {
                    let (jobs, locked) = self
                        .claim_entries(worker, (kind, *limit), lease, entries)
                        .await;
                    claimed.extend(jobs);
                    again.extend(locked);
                }
            }
        }
        lock(&consumer.read_ahead).extend(waiting.into_iter().chain(again));
        claimed
    }

    /// Entries pending with consumers that stopped renewing them, taken over.
    async fn autoclaim(
        &self,
        (worker, consumer): (&str, &Consumer),
        kinds: &KindLimits,
        max: usize,
        lease: Duration,
    ) -> Vec<Read> {
        if !due(&consumer.last_autoclaim, lease / 2) {
            return Vec::new();
        }
        let idle = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let mut reads = Vec::new();
        for (kind, _) in kinds {
            let stream = stream_key(&self.prefix, kind);
            let taken: Result<(String, Entries), _> = bounded(
                COMMAND,
                self.client
                    .with_options(&fail_fast(COMMAND))
                    .xautoclaim_values(
                        &stream,
                        GROUP,
                        worker,
                        idle,
                        "0-0",
                        Some(max as u64),
                        false,
                    ),
            )
            .await;
            match taken {
                Ok((_, entries)) => reads.extend(to_reads(kind, entries)),
                Err(e) => tracing::debug!(%kind, error = %e, "cannot autoclaim"),
            }
        }
        reads
    }
}

/// The entries of `kind`'s stream that name a job.
fn to_reads(kind: &str, entries: Entries) -> impl Iterator<Item = Read> + '_ {
    entries.into_iter().filter_map(move |(entry, fields)| {
        fields.get(JOB_FIELD).map(|job| Read {
            kind: kind.to_owned(),
            entry,
            job: job.clone(),
        })
    })
}

/// Whether `every` has passed since `last` (then it is now): what is done at most so often.
fn due(last: &Mutex<Option<Instant>>, every: Duration) -> bool {
    let mut last = lock(last);
    let due = last.is_none_or(|at| at.elapsed() >= every);
    if due {
        *last = Some(Instant::now());
    }
    due
}

/// A client of its own, connecting in the background.
async fn connect(url: &str) -> Result<Client, fred::error::Error> {
    keel_redis::client(url, COMMAND, keel_redis::Protocol::Resp2).await
}

#[async_trait]
impl Dispatch for StreamDispatch {
    async fn next(
        &self,
        worker: &str,
        kinds: &KindLimits,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Vec<Job> {
        // Kinds under a limit alone are claimed from the table, woken when a slot of theirs
        // frees (here or in another process), never blocked on Redis: their streams hand out
        // more than may run, and a read that waits would not see the slot come free.
        let limited_only = kinds.iter().all(|(_, limit)| limit.is_some());
        let consumer = match self.reachable() && !limited_only {
            true => self
                .consumer(worker)
                .await
                .map_err(|e| self.unreachable(&e))
                .ok(),
            false => None,
        };
        let Some(consumer) = consumer else {
            if limited_only && self.reachable() {
                // What their streams hold is only a hand-off of what the table holds.
                self.trim(kinds).await;
            }
            return claim_or_wait(&self.store, &self.wake, (worker, kinds, max, lease), wait).await;
        };
        let me = (worker, &*consumer);
        let reclaimed = self.autoclaim(me, kinds, max, lease).await;
        let mut claimed = self.claim_reads(me, kinds, max, lease, reclaimed).await;
        // A kind under a limit beside unlimited ones (a caller other than `Worker`, which gives
        // limited kinds a pool of their own) is claimed from the table as well, every time:
        // its stream hands out more than the limit lets run, and what cannot run yet is
        // dropped from the stream. Left to the sweep, its backlog would run a few per sweep.
        let limited: KindLimits = kinds.iter().filter(|(_, l)| l.is_some()).cloned().collect();
        if claimed.len() < max && !limited.is_empty() {
            let room = max - claimed.len();
            claimed.extend(claim_from_table(&self.store, worker, &limited, room, lease).await);
        }
        if claimed.len() < max && due(&consumer.last_sweep, SWEEP) {
            let room = max - claimed.len();
            claimed.extend(claim_from_table(&self.store, worker, kinds, room, lease).await);
        }
        if claimed.len() >= max {
            return claimed;
        }
        // Wait for entries only with nothing in hand: claimed jobs should start now.
        let blocking = claimed.is_empty();
        let room = max - claimed.len();
        let Some(reads) = self.read_new(me, kinds, room, (wait, blocking)).await else {
            return claimed;
        };
        let room = max - claimed.len();
        claimed.extend(self.claim_reads(me, kinds, room, lease, reads).await);
        claimed
    }

    async fn heartbeat(&self, job: &Job, worker: &str) {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job.id)
            .cloned();
        if let Some(entry) = entry {
            // Resets the entry's idle time, so that XAUTOCLAIM leaves it to us.
            let reset: Result<Value, _> = bounded(
                COMMAND,
                self.client.with_options(&fail_fast(COMMAND)).xclaim(
                    &entry.stream,
                    GROUP,
                    worker,
                    0,
                    entry.id,
                    None,
                    None,
                    None,
                    false,
                    true,
                ),
            )
            .await;
            if let Err(e) = reset {
                tracing::debug!(error = %e, "cannot renew a stream entry");
            }
        }
    }

    async fn finished(&self, jobs: &[Job]) {
        let mut by_stream: HashMap<String, Vec<String>> = HashMap::new();
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            for job in jobs {
                if let Some(entry) = entries.remove(&job.id) {
                    by_stream.entry(entry.stream).or_default().push(entry.id);
                }
            }
        }
        for (stream, ids) in by_stream {
            self.discard(&stream, ids).await;
        }
    }

    async fn dead(&self, job: &Job, error: &str) {
        let cap = ("MAXLEN", "~", 100_000);
        let fields = vec![
            ("job", job.id.clone()),
            ("kind", job.kind.clone()),
            ("error", error.to_owned()),
        ];
        let added: Result<Value, _> = bounded(
            COMMAND,
            self.client.with_options(&fail_fast(COMMAND)).xadd(
                dead_letter_key(&self.prefix),
                false,
                cap,
                "*",
                fields,
            ),
        )
        .await;
        if let Err(e) = added {
            tracing::debug!(error = %e, "cannot record a dead letter");
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm_migration::MigratorTrait as _;

    use super::*;
    use crate::NewJob;
    use crate::dispatch::Relay;

    const LEASE: Duration = Duration::from_secs(600);

    /// A fresh database with the queue's tables.
    async fn migrated() -> sea_orm::DatabaseConnection {
        let db = sea_orm::Database::connect(keel_testkit::fresh_database().await)
            .await
            .unwrap();
        crate::Migrator::up(&db, None).await.unwrap();
        db
    }

    /// A dispatch of `store` through the shared Redis under a fresh prefix, and the relay that
    /// hands it the table's jobs.
    async fn streamed(store: &JobStore) -> (StreamDispatch, Relay) {
        let redis = keel_testkit::Redis::shared().unwrap();
        let (_, prefix) = keel_testkit::fresh_prefix().await;
        let wake = crate::wake::Wake::new(store, "test");
        let dispatch = StreamDispatch::connect(
            store.clone(),
            &redis.url,
            &prefix,
            wake.claimers.clone(),
            QueueMetrics::default(),
        )
        .await
        .unwrap();
        let relay = Relay {
            store: store.clone(),
            client: dispatch.client.clone(),
            prefix,
            holder: "test".into(),
            metrics: QueueMetrics::default(),
            handed_again_for: None,
            wake,
        };
        (dispatch, relay)
    }

    /// A streamed job whose row another transaction holds for a moment when its entry is read
    /// (the relay marking it handed, just after Redis took it) is claimed once the row is free:
    /// its entry is kept, not dropped and the job left to the sweep seconds later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_read_while_its_row_is_locked_is_claimed_once_the_row_is_free() {
        use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
        let db = migrated().await;
        let store = JobStore::new(db.clone());
        let (dispatch, relay) = streamed(&store).await;
        let prefix = relay.prefix;
        let kinds: KindLimits = vec![("k".into(), None)];
        // The consumer group first.
        let none = dispatch.next("w", &kinds, 10, LEASE, Duration::ZERO).await;
        assert!(none.is_empty());
        let job = NewJob {
            kind: "k".into(),
            creator: "test".into(),
            ..NewJob::default()
        };
        let job = store.enqueue(job).await.unwrap();
        let _: String = dispatch
            .client
            .xadd(
                stream_key(&prefix, "k"),
                false,
                None::<()>,
                "*",
                vec![(JOB_FIELD, job.id.as_str())],
            )
            .await
            .unwrap();
        let holder = db.begin().await.unwrap();
        holder
            .execute_unprepared(&format!(
                "SELECT id FROM queue_jobs WHERE id = '{}' FOR UPDATE",
                job.id
            ))
            .await
            .unwrap();
        let skipped = dispatch.next("w", &kinds, 10, LEASE, Duration::ZERO).await;
        assert!(skipped.is_empty(), "its row is locked");
        holder.commit().await.unwrap();
        let claimed = dispatch.next("w", &kinds, 10, LEASE, Duration::ZERO).await;
        assert_eq!(claimed.len(), 1, "claimed once the row is free");
        assert_eq!(claimed[0].id, job.id);
    }

    /// A job of a limited kind whose stream entry was dropped (it could not run yet: the limit
    /// was full) runs as soon as the limit allows, not at the next sweep.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_limited_kind_runs_as_the_limit_frees_not_at_the_sweep() {
        let store = JobStore::new(migrated().await);
        store.register_kind("limited").await.unwrap();
        let (dispatch, relay) = streamed(&store).await;
        let stream = stream_key(&relay.prefix, "limited");
        let kinds: KindLimits = vec![("limited".into(), Some(1))];
        // The consumer group first, then three jobs handed to the stream.
        let none = dispatch.next("w", &kinds, 10, LEASE, Duration::ZERO).await;
        assert!(none.is_empty());
        for _ in 0..3 {
            let job = NewJob {
                kind: "limited".into(),
                creator: "test".into(),
                ..NewJob::default()
            };
            store.enqueue(job).await.unwrap();
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(relay.run(Duration::from_millis(10), async move {
            let _ = stopped.await;
        }));
        keel_testkit::eventually(Duration::from_secs(10), "three entries", || async {
            let len: u64 = dispatch.client.xlen(&stream).await.ok()?;
            (len == 3).then_some(())
        })
        .await;
        stop.send(()).unwrap();
        relay.await.unwrap();
        // The table holds all three; the limit lets one run, and the stream, never read for a
        // limited kind, is emptied.
        let wait = Duration::from_millis(50);
        let first = dispatch.next("w", &kinds, 10, LEASE, wait).await;
        assert_eq!(first.len(), 1, "the limit");
        assert!(store.succeed(&first[0], "w").await.unwrap());
        let second = dispatch.next("w", &kinds, 10, LEASE, wait).await;
        assert_eq!(second.len(), 1, "the next job, as soon as the limit allows");
        // Never read, the stream is emptied (at most once a second), not left to grow.
        keel_testkit::eventually(Duration::from_secs(10), "an empty stream", || async {
            let _ = dispatch.next("w", &kinds, 10, LEASE, Duration::ZERO).await;
            let len: u64 = dispatch.client.xlen(&stream).await.ok()?;
            (len == 0).then_some(())
        })
        .await;
    }

    /// A claim of a limited kind from the table that found nothing because the relay held the
    /// rows (marking them handed: `SKIP LOCKED` passes over them) is woken when the relay lets
    /// go, not left to its next poll (an hour here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_that_skipped_the_rows_the_relay_held_looks_again_when_it_lets_go() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
        let url = keel_testkit::fresh_database().await;
        let mut db = sea_orm::Database::connect(&url).await.unwrap();
        crate::Migrator::up(&db, None).await.unwrap();
        let claims = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = claims.clone();
        db.set_metric_callback(move |info| {
            if info.statement.sql.starts_with("WITH due") {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let store = JobStore::new(db);
        store.register_kind("limited").await.unwrap();
        let (dispatch, mut relay) = streamed(&store).await;
        let dispatch = std::sync::Arc::new(dispatch);
        let job = NewJob {
            kind: "limited".into(),
            creator: "test".into(),
            ..NewJob::default()
        };
        let job = store.enqueue(job).await.unwrap();
        // The relay's mark, as the claimer sees it: the row locked.
        let elsewhere = sea_orm::Database::connect(&url).await.unwrap();
        let held = elsewhere.begin().await.unwrap();
        held.execute_unprepared(&format!(
            "SELECT id FROM queue_jobs WHERE id = '{}' FOR UPDATE",
            job.id
        ))
        .await
        .unwrap();
        let kinds: KindLimits = vec![("limited".into(), Some(1))];
        let claimer = tokio::spawn({
            let (dispatch, kinds) = (dispatch.clone(), kinds.clone());
            async move {
                dispatch
                    .next("w", &kinds, 10, LEASE, Duration::from_secs(3600))
                    .await
            }
        });
        keel_testkit::eventually(Duration::from_secs(20), "a claim past the row", || async {
            (claims.load(Ordering::SeqCst) >= 1).then_some(())
        })
        .await;
        held.commit().await.unwrap();
        // The relay hands the job and marks it: then it wakes the claimer.
        let mut role = relay.role();
        assert_eq!(relay.pass(&mut role).await, 1);
        let skipped = tokio::time::timeout(Duration::from_secs(20), claimer)
            .await
            .expect("woken, not left to the poll")
            .unwrap();
        assert!(skipped.is_empty(), "the row was held when it looked");
        // Woken, the worker looks again at once.
        let claimed = dispatch.next("w", &kinds, 10, LEASE, Duration::ZERO).await;
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, job.id);
    }

    /// A relay whose role another process took over (its own lease ran out during the pass)
    /// hands nothing: the other hands the same jobs. Once the role is free, it hands them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_that_lost_its_role_before_handing_hands_nothing() {
        let store = JobStore::new(migrated().await);
        let (dispatch, mut relay) = streamed(&store).await;
        let job = NewJob {
            kind: "k".into(),
            creator: "test".into(),
            ..NewJob::default()
        };
        store.enqueue(job).await.unwrap();
        let stream = stream_key(&relay.prefix, "k");
        let other = Duration::from_secs(60);
        assert!(
            store
                .lease("relay", "another process", other)
                .await
                .unwrap()
        );
        let mut role = relay.role();
        assert_eq!(relay.pass(&mut role).await, 0, "the role is another's");
        let len: u64 = dispatch.client.xlen(&stream).await.unwrap();
        assert_eq!(len, 0);
        assert_eq!(store.unhanded(10).await.unwrap().len(), 1, "still to hand");
        store.release("relay", "another process").await.unwrap();
        assert_eq!(relay.pass(&mut role).await, 1);
        let len: u64 = dispatch.client.xlen(&stream).await.unwrap();
        assert_eq!(len, 1);
        assert!(
            store.unhanded(10).await.unwrap().is_empty(),
            "marked handed"
        );
    }
}
