//! What a service writes in its own transaction: a job (the outbox: it exists exactly when
//! the change it belongs to committed), and the fence that makes the rest of a job's
//! transaction conditional on its attempt still holding the job.

use std::collections::HashMap;

use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, EntityTrait as _, QueryFilter as _, Statement, Value,
};

use super::{DEFAULT_MAX_ATTEMPTS, QueueError, statement};
use crate::entity;
use crate::job::{Fence, Job, NewJob, now_ms};

/// What [`enqueue_new`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// The job was written.
    Written(Job),
    /// An earlier job stands for it: the live one with its unique key, or the one written
    /// under its request id.
    Found(Job),
}

impl Enqueued {
    /// The job, written or found.
    pub fn job(self) -> Job {
        match self {
            Enqueued::Written(job) | Enqueued::Found(job) => job,
        }
    }
}

/// Writes `new` with `db`: the caller's transaction, so that the job exists exactly when the
/// change it belongs to committed (the outbox). A live job with the same unique key, or the job
/// written earlier under the same request id (with the same fingerprint), is returned instead.
pub async fn enqueue(db: &impl ConnectionTrait, new: NewJob) -> Result<Job, QueueError> {
    enqueue_new(db, new).await.map(Enqueued::job)
}

/// [`enqueue`], saying whether the job was written or an earlier one stands for it.
pub async fn enqueue_new(db: &impl ConnectionTrait, new: NewJob) -> Result<Enqueued, QueueError> {
    let mut written = enqueue_all(db, vec![new]).await?;
    Ok(written.remove(0))
}

/// Writes every one of `news` with `db` in one statement, answering for each, in order, the job
/// written or the earlier one that stands for it (as [`enqueue_new`] does; a later job of the
/// batch with an earlier one's unique key or request id gets the earlier one). All or nothing
/// when `db` is a transaction: an error leaves it to the caller to roll back.
pub async fn enqueue_all(
    db: &impl ConnectionTrait,
    news: Vec<NewJob>,
) -> Result<Vec<Enqueued>, QueueError> {
    if news.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = news
        .iter()
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    // Rows in the order of their unique keys and request ids: two batches that share keys
    // wait for each other's rows in the same order, never in a circle (a deadlock).
    let mut order: Vec<usize> = (0..news.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |k: usize| (&news[k].unique_key, news[k].request.as_ref().map(|r| &r.0));
        key(a).cmp(&key(b))
    });
    let rows: Vec<(&String, &NewJob)> = order.iter().map(|&k| (&ids[k], &news[k])).collect();
    // The rows as inserted: read back afterwards, a worker may already have claimed one.
    let inserted = db.query_all_raw(insert(db, &rows)).await?;
    let mut written: HashMap<String, Job> = super::jobs(inserted)?
        .into_iter()
        .map(|job| (job.id.clone(), job))
        .collect();
    let mut answers = Vec::with_capacity(news.len());
    for (id, new) in ids.iter().zip(&news) {
        answers.push(match written.remove(id) {
            Some(job) => Enqueued::Written(job),
            None => Enqueued::Found(earlier(db, new).await?),
        });
    }
    Ok(answers)
}

/// The columns a job is written with; the others (its lease, its error, when it ran) start
/// empty.
const COLUMNS: &str = "id, kind, payload, state, attempts, max_attempts, unique_key, creator, \
                       request_id, request_hash, run_after, created_at, updated_at, queued_at";

/// Job `new`'s values for [`COLUMNS`], under `id`, written at `now`: the SQL of the row, its
/// placeholders numbered from `$first`, and their values.
fn row(id: &str, new: &NewJob, now: i64, first: usize) -> (String, Vec<Value>) {
    let p = |i: usize| format!("${}", first + i);
    let (request_id, request_hash) = new.request.clone().unzip();
    let sql = format!(
        "{}, {}, {}, 'QUEUED', 0, {}, {}, {}, {}, {}, {}, {}, {}, {}",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
        p(9),
        p(9),
        p(9)
    );
    let values = vec![
        id.to_owned().into(),
        new.kind.clone().into(),
        new.payload.to_string().into(),
        new.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).into(),
        new.unique_key.clone().into(),
        new.creator.clone().into(),
        request_id.into(),
        request_hash.into(),
        new.run_after.unwrap_or(now).into(),
        now.into(),
    ];
    (sql, values)
}

/// The statement that writes `jobs` (each under its id), skipping any row a unique index
/// refuses.
/// Each row's placeholders are numbered in order (see [`statement`]).
fn insert(db: &impl ConnectionTrait, jobs: &[(&String, &NewJob)]) -> Statement {
    let now = now_ms();
    let mut rows = Vec::with_capacity(jobs.len());
    let mut values: Vec<Value> = Vec::new();
    for (id, new) in jobs {
        let (sql, row_values) = row(id, new, now, values.len() + 1);
        rows.push(format!("({sql})"));
        values.extend(row_values);
    }
    statement(
        db.get_database_backend(),
        &format!(
            "INSERT INTO queue_jobs ({COLUMNS}) VALUES {} ON CONFLICT DO NOTHING RETURNING *",
            rows.join(", ")
        ),
        values,
    )
}

/// What [`enqueue`] writes, for a caller on PostgreSQL that folds writing `new` into a
/// statement of its own (a data-modifying `WITH … AS (…)`): an INSERT of the job if `source` (a
/// relation the statement names before it) has a row — one job, under one id, however many
/// rows it has — that writes nothing where a unique index refuses it (a live job with its
/// unique key stands for it); its parameters numbered from `$first`. Unlike [`enqueue`] it
/// answers nothing: for a job without a request id (a reused one would be refused silently,
/// not as [`QueueError::RequestReused`]). The caller wakes the workers once it committed.
pub fn enqueuing(new: &NewJob, source: &str, first: usize) -> (String, Vec<Value>) {
    debug_assert!(new.request.is_none(), "a folded job carries no request id");
    let (sql, values) = row(&uuid::Uuid::now_v7().to_string(), new, now_ms(), first);
    (
        format!(
            "INSERT INTO queue_jobs ({COLUMNS}) SELECT {sql} FROM {source} ON CONFLICT DO NOTHING"
        ),
        values,
    )
}

/// The job that stands for `new`, which a unique index refused: the one written under its
/// request id (refused if with another request), or the live one with its unique key.
async fn earlier(db: &impl ConnectionTrait, new: &NewJob) -> Result<Job, QueueError> {
    if let Some((request_id, hash)) = &new.request {
        let earlier = entity::Entity::find()
            .filter(sea_orm::ColumnTrait::eq(
                &entity::Column::Creator,
                new.creator.as_str(),
            ))
            .filter(sea_orm::ColumnTrait::eq(
                &entity::Column::RequestId,
                request_id.as_str(),
            ))
            .one(db)
            .await?;
        if let Some(earlier) = earlier {
            if earlier.request_hash.as_deref() != Some(hash.as_str()) {
                return Err(QueueError::RequestReused(request_id.clone()));
            }
            return Job::try_from(earlier);
        }
    }
    if let Some(key) = &new.unique_key {
        let live = entity::Entity::find()
            .filter(sea_orm::ColumnTrait::eq(
                &entity::Column::UniqueKey,
                key.as_str(),
            ))
            .filter(sea_orm::ColumnTrait::is_in(
                &entity::Column::State,
                ["QUEUED", "RUNNING", "FAILED"],
            ))
            .one(db)
            .await?;
        if let Some(live) = live {
            return Job::try_from(live);
        }
    }
    Err(QueueError::Database(DbErr::Custom(
        "a job could not be written and no earlier one matches".into(),
    )))
}

/// Makes the rest of transaction `txn` conditional on `fence`: fails with
/// [`QueueError::LeaseLost`] when its attempt no longer holds the job (its lease ran out and
/// another worker claimed it, or the job is over). On PostgreSQL the job's row stays locked
/// until `txn` ends, so no claim takes the job over while the caller writes; on SQLite the
/// statement is a write, which takes the one writer's lock first, as every keel transaction does.
pub async fn hold(txn: &impl ConnectionTrait, fence: &Fence) -> Result<(), QueueError> {
    let backend = txn.get_database_backend();
    let (sql, values) = if backend == DbBackend::Postgres {
        held(fence, 1)
    } else {
        (
            "UPDATE queue_jobs SET attempts = attempts \
             WHERE id = $1 AND attempts = $2 AND state = 'RUNNING' RETURNING id"
                .to_owned(),
            vec![fence.job.clone().into(), fence.attempt.into()],
        )
    };
    match txn.query_one_raw(statement(backend, &sql, values)).await? {
        Some(_) => Ok(()),
        None => Err(fence.lost()),
    }
}

/// What [`hold`] runs on PostgreSQL, for a caller that folds holding `fence` into a statement
/// of its own (as a `WITH held AS (…)` whose emptiness means [`Fence::lost`]): a query of the
/// job's id that locks its row, or finds nothing once the attempt no longer holds it; its
/// parameters numbered from `$first`.
pub fn held(fence: &Fence, first: usize) -> (String, Vec<Value>) {
    (
        format!(
            "SELECT id FROM queue_jobs WHERE id = ${first} AND attempts = ${} \
             AND state = 'RUNNING' FOR UPDATE",
            first + 1
        ),
        vec![fence.job.clone().into(), fence.attempt.into()],
    )
}

/// Job `id`, if any.
pub async fn find(db: &impl ConnectionTrait, id: &str) -> Result<Option<Job>, QueueError> {
    entity::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(Job::try_from)
        .transpose()
}
