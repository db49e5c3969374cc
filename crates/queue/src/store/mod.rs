//! The jobs table, on PostgreSQL and SQLite alike: a job written in the caller's transaction,
//! due jobs claimed under a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite's one writer
//! otherwise), the lease renewed, an attempt finished or failed (retried later, or dead), a dead
//! job retried, and what the metrics and the relay read. Every transition is a conditional
//! update: a job is held by one worker at a time, whatever the races.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, FromQueryResult as _, Statement,
    TransactionTrait as _, Value,
};

mod claim;
#[cfg(test)]
pub(crate) mod explain;
mod handoff;
mod lease;
mod outbox;
mod retention;

use crate::entity;
use crate::job::{Job, NewJob, State, millis, now_ms};

pub use handoff::Unhanded;
pub(crate) use lease::Lease;
pub use outbox::{Enqueued, enqueue, enqueue_all, enqueue_new, enqueuing, find, held, hold};

/// Attempts a job gets when its writer does not say.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 8;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The request id was used before with another request.
    #[error("request_id {0} was already used with a different request")]
    RequestReused(String),
    /// No such job.
    #[error("job {0} not found")]
    NotFound(String),
    /// Only a dead job can be retried.
    #[error("job {id} is {state}, not DEAD")]
    NotDead {
        /// The job.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// A live job holds the unique key the retried one has.
    #[error("a live job already holds the unique key of job {0}")]
    KeyTaken(String),
    /// The attempt no longer holds its job: its lease ran out and another worker claimed it, or
    /// the job finished. Whatever it meant to write is refused.
    #[error("attempt {attempt} of job {job} no longer holds it")]
    LeaseLost {
        /// The job.
        job: String,
        /// The attempt that lost it.
        attempt: i32,
    },
    /// A stored row cannot be read (a payload that is not JSON, an unknown state).
    #[error("corrupt job {id}: {why}")]
    Corrupt {
        /// The job.
        id: String,
        /// What is wrong.
        why: String,
    },
    /// The jobs would leave their creator with more live jobs than it may have.
    #[error("at most {0} live jobs per creator")]
    Capped(i64),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
}

/// A statement with `$1, $2, …` placeholders: `$n` is the n-th value on PostgreSQL and on
/// SQLite alike (sqlx binds SQLite's `$n` by number), wherever it first appears.
fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(backend, sql, values)
}

/// The ids of the jobs named in `named` (a relation aliased `named`, with an `id` column) whose
/// rows (`job`) meet `terms`, each looked up by its key alone and locked, passing over a row
/// another transaction holds (`SKIP LOCKED`); `terms` see the row as locked (its latest
/// version). A row locked and found not to meet `terms` stays locked until the transaction ends
/// (each caller's is the one statement, or a claim's commit right after), and what waits for it
/// meanwhile never holds a row this side wants: it never waits. PostgreSQL neither flattens a
/// locking subquery into the join nor, as it has a `LIMIT` (keep it), pushes `terms` into it,
/// and a lookup by `id` alone can use no index but the key: each named job is one lookup
/// whatever the statistics say. Left to choose, on statistics taken before a burst (the waiting jobs
/// looked few), the planner walked the index of waiting jobs instead, once per named job: a
/// claim from a stream took 30 ms, and the relay's mark of 500 jobs grew from 4 s to 57 s a
/// pass in a soak, while the completions of those jobs waited for it.
fn each_named(named: &str, terms: &str) -> String {
    format!(
        "SELECT job.id FROM {named} CROSS JOIN LATERAL (SELECT * FROM queue_jobs \
         WHERE id = named.id LIMIT 1 FOR UPDATE SKIP LOCKED) AS job WHERE {terms}"
    )
}

/// `UPDATE queue_jobs SET {set}` of the jobs whose ids the statement's CTE `rows` holds, each
/// found by its key: as a join, the planner may read the whole table for them (it chose to for a
/// mark of 500 jobs on statistics older than the table).
fn update_listed(rows: &str, set: &str) -> String {
    format!("UPDATE queue_jobs SET {set} WHERE id = ANY(ARRAY(SELECT id FROM {rows}))")
}

/// `$from, $from+1, …` for `n` values.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl TryFrom<entity::Model> for Job {
    type Error = QueueError;

    fn try_from(m: entity::Model) -> Result<Self, Self::Error> {
        let corrupt = |why: String| QueueError::Corrupt {
            id: m.id.clone(),
            why,
        };
        Ok(Job {
            payload: serde_json::from_str(&m.payload).map_err(|e| corrupt(e.to_string()))?,
            state: State::parse(&m.state).ok_or_else(|| corrupt(format!("state {}", m.state)))?,
            id: m.id,
            kind: m.kind,
            attempts: m.attempts,
            max_attempts: m.max_attempts,
            last_error: m.last_error,
            unique_key: m.unique_key,
            creator: m.creator,
            run_after: m.run_after,
            created_at: m.created_at,
            updated_at: m.updated_at,
            started_at: m.started_at,
            finished_at: m.finished_at,
            queued_at: m.queued_at,
        })
    }
}

fn jobs(rows: Vec<sea_orm::QueryResult>) -> Result<Vec<Job>, QueueError> {
    rows.iter()
        .map(|row| Job::try_from(entity::Model::from_query_result(row, "")?))
        .collect()
}

/// Which jobs a listing shows.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Only this creator's.
    pub creator: Option<String>,
    /// Only in this state.
    pub state: Option<State>,
    /// Only of this kind.
    pub kind: Option<String>,
}

/// The jobs table of one database.
#[derive(Debug, Clone)]
pub struct JobStore {
    db: DatabaseConnection,
}

impl JobStore {
    /// Jobs in `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// The pool under the store, on PostgreSQL.
    pub(crate) fn postgres_pool(&self) -> Option<sea_orm::sqlx::PgPool> {
        (self.backend() == DbBackend::Postgres)
            .then(|| self.db.get_postgres_connection_pool().clone())
    }

    /// Writes `new` on its own (not in a caller's transaction).
    pub async fn enqueue(&self, new: NewJob) -> Result<Job, QueueError> {
        enqueue(&self.db, new).await
    }

    /// Writes every one of `news` in one statement and one transaction, all or none; answers
    /// for each, in order, the job written or the earlier one that stands for it.
    pub async fn enqueue_all(&self, news: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError> {
        let txn = self.db.begin().await?;
        let answers = enqueue_all(&txn, news).await?;
        txn.commit().await?;
        Ok(answers)
    }

    /// [`JobStore::enqueue_all`] for `creator`, refused with [`QueueError::Capped`] (and nothing
    /// written) when it would leave `creator` with more than `cap` live jobs: counted after the
    /// insert, in its transaction, so that a replayed job counts once. Several jobs at once take
    /// the creator's lock first (PostgreSQL; SQLite has one writer), so that concurrent batches
    /// cannot each pass the count; one job at a time may overshoot by the calls in flight.
    pub async fn enqueue_all_capped(
        &self,
        news: Vec<NewJob>,
        creator: &str,
        cap: i64,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let txn = self.db.begin().await?;
        if news.len() > 1 && self.backend() == DbBackend::Postgres {
            txn.execute_raw(statement(
                self.backend(),
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                vec![format!("queue_jobs:{creator}").into()],
            ))
            .await?;
        }
        let answers = enqueue_all(&txn, news).await?;
        // Counting stops past the cap: the check costs the cap, not the creator's backlog.
        let over = txn
            .query_one_raw(statement(
                self.backend(),
                LIVE_OF,
                vec![creator.into(), cap.saturating_add(1).into()],
            ))
            .await?
            .map_or(Ok(0), |row| row.try_get::<i64>("", "n"))?;
        if over > cap {
            return Err(QueueError::Capped(cap));
        }
        txn.commit().await?;
        Ok(answers)
    }

    /// Job `id`, if any.
    pub async fn get(&self, id: &str) -> Result<Option<Job>, QueueError> {
        find(&self.db, id).await
    }

    /// Up to `limit` jobs matching `listing`, newest first, older than the job `before`.
    pub async fn list(
        &self,
        listing: &Listing,
        before: Option<String>,
        limit: u64,
    ) -> Result<Vec<Job>, QueueError> {
        let (sql, values) = listed(listing, before, limit);
        let rows = self
            .db
            .query_all_raw(statement(self.backend(), &sql, values))
            .await?;
        jobs(rows)
    }

    /// How many of `creator`'s jobs live (queued, running, or failed and waiting for a retry).
    pub async fn live_of(&self, creator: &str) -> Result<i64, QueueError> {
        live_of(&self.db, creator).await
    }

    /// Makes sure kind `kind` has the row its limited claims lock. Reads first: an insert that
    /// meets the row would wait for whoever holds it (a claim in flight, or a frozen process).
    pub async fn register_kind(&self, kind: &str) -> Result<(), QueueError> {
        self.db
            .execute_raw(statement(
                self.backend(),
                "INSERT INTO queue_kinds (kind, claims) SELECT $1, 0 \
                 WHERE NOT EXISTS (SELECT 1 FROM queue_kinds WHERE kind = $2) \
                 ON CONFLICT DO NOTHING",
                vec![kind.into(), kind.into()],
            ))
            .await?;
        Ok(())
    }

    /// Claims the round of periodic kind `kind` that is due now and writes its job (one live
    /// job per kind) in the same transaction; true when this call did. Any number of processes
    /// may call it: a conditional update of the kind's row picks one per round.
    pub async fn schedule(&self, kind: &str, every: Duration) -> Result<bool, QueueError> {
        let now = now_ms();
        let txn = self.db.begin().await?;
        txn.execute_raw(statement(
            self.backend(),
            "INSERT INTO queue_periodic (kind, next_at) VALUES ($1, 0) ON CONFLICT DO NOTHING",
            vec![kind.into()],
        ))
        .await?;
        let claimed = txn
            .execute_raw(statement(
                self.backend(),
                "UPDATE queue_periodic SET next_at = $1 WHERE kind = $2 AND next_at <= $3",
                vec![
                    now.saturating_add(millis(every)).into(),
                    kind.into(),
                    now.into(),
                ],
            ))
            .await?
            .rows_affected()
            == 1;
        if claimed {
            enqueue(
                &txn,
                NewJob {
                    kind: kind.to_owned(),
                    payload: serde_json::json!({}),
                    creator: "queue".into(),
                    unique_key: Some(format!("periodic:{kind}")),
                    ..NewJob::default()
                },
            )
            .await?;
        }
        txn.commit().await?;
        Ok(claimed)
    }

    /// Renews the lease of `job`'s attempt; false when that attempt no longer holds it.
    pub async fn heartbeat(
        &self,
        job: &Job,
        worker: &str,
        lease: Duration,
    ) -> Result<bool, QueueError> {
        let until = now_ms().saturating_add(millis(lease));
        let renewed = self
            .db
            .execute_raw(statement(
                self.backend(),
                "UPDATE queue_jobs SET locked_until = $1 \
                 WHERE id = $2 AND locked_by = $3 AND attempts = $4 AND state = 'RUNNING'",
                vec![
                    until.into(),
                    job.id.clone().into(),
                    worker.into(),
                    job.attempts.into(),
                ],
            ))
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Marks `job` done; false when `worker` had lost it (another worker may run it again: the
    /// handler must be idempotent, as at-least-once delivery always asks).
    pub async fn succeed(&self, job: &Job, worker: &str) -> Result<bool, QueueError> {
        let done = self.succeed_all(std::slice::from_ref(job), worker).await?;
        Ok(done.contains(&job.id))
    }

    /// Marks every one of `jobs` that `worker` still holds done, in one statement; returns the
    /// ids it held (the others were lost, as in [`JobStore::succeed`]).
    pub async fn succeed_all(
        &self,
        jobs: &[Job],
        worker: &str,
    ) -> Result<HashSet<String>, QueueError> {
        if jobs.is_empty() {
            return Ok(HashSet::new());
        }
        let now = now_ms();
        // Each job as the attempt that ran it: a later attempt of the same job is not this one.
        let attempts = (0..jobs.len())
            .map(|k| format!("(${}, ${})", 3 + 2 * k, 4 + 2 * k))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE queue_jobs SET state = 'SUCCEEDED', locked_by = NULL, \
             locked_until = NULL, finished_at = $1, updated_at = $1 \
             WHERE locked_by = $2 AND state = 'RUNNING' \
             AND (id, attempts) IN (VALUES {attempts}) RETURNING id"
        );
        let mut values: Vec<Value> = vec![now.into(), worker.into()];
        for job in jobs {
            values.push(job.id.clone().into());
            values.push(job.attempts.into());
        }
        let rows = self
            .db
            .query_all_raw(statement(self.backend(), &sql, values))
            .await?;
        rows.iter()
            .map(|row| row.try_get::<String>("", "id").map_err(QueueError::from))
            .collect()
    }

    /// Records a failed attempt of `job`: tried again at `retry_at` (ms), or dead when that is
    /// `None` or no attempt is left. Returns the state it is in now (`None` when `worker` had
    /// lost it).
    pub async fn fail(
        &self,
        job: &Job,
        worker: &str,
        error: &str,
        retry_at: Option<i64>,
    ) -> Result<Option<State>, QueueError> {
        let now = now_ms();
        let (state, run_after) = match retry_at {
            Some(at) if job.attempts < job.max_attempts => (State::Failed, at),
            _ => (State::Dead, job.run_after),
        };
        let error: String = error.chars().take(2000).collect();
        let failed = self
            .db
            .execute_raw(statement(
                self.backend(),
                "UPDATE queue_jobs SET state = $1, last_error = $2, run_after = $3, \
                 locked_by = NULL, locked_until = NULL, published_at = NULL, finished_at = $4, \
                 updated_at = $4 \
                 WHERE id = $5 AND locked_by = $6 AND attempts = $7 AND state = 'RUNNING'",
                vec![
                    state.as_str().into(),
                    error.into(),
                    run_after.into(),
                    now.into(),
                    job.id.clone().into(),
                    worker.into(),
                    job.attempts.into(),
                ],
            ))
            .await?;
        Ok((failed.rows_affected() == 1).then_some(state))
    }

    /// Puts dead job `id` back in the queue with its attempts (and its retry window) reset.
    pub async fn retry(&self, id: &str) -> Result<Job, QueueError> {
        let now = now_ms();
        // The row as this update left it: read afterwards, a worker may already hold it.
        let moved = self
            .db
            .query_all_raw(statement(
                self.backend(),
                "UPDATE queue_jobs SET state = 'QUEUED', attempts = 0, run_after = $1, \
                 published_at = NULL, updated_at = $1, queued_at = $1 \
                 WHERE id = $2 AND state = 'DEAD' RETURNING *",
                vec![now.into(), id.into()],
            ))
            .await;
        match moved {
            Ok(rows) => match jobs(rows)?.pop() {
                Some(job) => Ok(job),
                None => {
                    let job = self
                        .get(id)
                        .await?
                        .ok_or_else(|| QueueError::NotFound(id.to_owned()))?;
                    Err(QueueError::NotDead {
                        id: id.to_owned(),
                        state: job.state.as_str(),
                    })
                }
            },
            Err(e)
                if matches!(
                    e.sql_err(),
                    Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
                ) =>
            {
                Err(QueueError::KeyTaken(id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Per kind: how many jobs wait (queued, or failed and awaiting their retry), and how long
    /// the oldest due one has been due, in milliseconds.
    pub async fn depths(&self) -> Result<Vec<(String, i64, i64)>, QueueError> {
        let now = now_ms();
        let rows = self
            .db
            .query_all_raw(statement(
                self.backend(),
                "SELECT kind, COUNT(*) AS depth, \
                 MIN(CASE WHEN run_after <= $1 THEN run_after END) AS oldest \
                 FROM queue_jobs WHERE state IN ('QUEUED', 'FAILED') GROUP BY kind",
                vec![now.into()],
            ))
            .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("", "kind")?;
                let depth: i64 = row.try_get("", "depth")?;
                let oldest: Option<i64> = row.try_get("", "oldest")?;
                Ok((kind, depth, oldest.map_or(0, |at| now.saturating_sub(at))))
            })
            .collect()
    }
}

/// The statement of [`JobStore::list`]: by creator or kind, a page read in the order of
/// `queue_listing`'s index of them; otherwise in the order of the jobs' key.
pub(crate) fn listed(
    listing: &Listing,
    before: Option<String>,
    limit: u64,
) -> (String, Vec<Value>) {
    let (by, joined) = if listing.creator.is_some() || listing.kind.is_some() {
        (
            "queue_listing",
            " JOIN queue_listing ON queue_listing.id = queue_jobs.id",
        )
    } else {
        ("queue_jobs", "")
    };
    let mut terms = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    let mut term = |term: String, value: Value| {
        values.push(value);
        terms.push(format!("{term} ${}", values.len()));
    };
    if let Some(creator) = &listing.creator {
        term("queue_listing.creator =".into(), creator.as_str().into());
    }
    if let Some(kind) = &listing.kind {
        term("queue_listing.kind =".into(), kind.as_str().into());
    }
    if let Some(state) = listing.state {
        term("queue_jobs.state =".into(), state.as_str().into());
    }
    if let Some(before) = before {
        term(format!("{by}.id <"), before.into());
    }
    let filter = if terms.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", terms.join(" AND "))
    };
    values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
    let sql = format!(
        "SELECT queue_jobs.* FROM queue_jobs{joined}{filter} ORDER BY {by}.id DESC LIMIT ${}",
        values.len()
    );
    (sql, values)
}

/// How many of a creator's (`$1`) jobs live, counted up to `$2`: read from the index of live
/// jobs by creator alone, however many finished ones the table keeps.
pub(crate) const LIVE_OF: &str = "SELECT COUNT(*) AS n FROM (SELECT 1 FROM queue_jobs \
     WHERE creator = $1 AND state IN ('QUEUED', 'RUNNING', 'FAILED') LIMIT $2) AS live";

/// How many of `creator`'s jobs live in `db` (queued, running, or failed and waiting for a
/// retry).
async fn live_of(db: &impl ConnectionTrait, creator: &str) -> Result<i64, QueueError> {
    let row = db
        .query_one_raw(statement(
            db.get_database_backend(),
            LIVE_OF,
            vec![creator.into(), i64::MAX.into()],
        ))
        .await?;
    Ok(row.map_or(Ok(0), |r| r.try_get::<i64>("", "n"))?)
}
