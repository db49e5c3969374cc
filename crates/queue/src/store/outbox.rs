//! What a service writes in its own transaction: a job (the outbox: it exists exactly when
//! the change it belongs to committed), and the fence that makes the rest of a job's
//! transaction conditional on its attempt still holding the job.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, EntityTrait as _, QueryFilter as _};

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
    let backend = db.get_database_backend();
    let now = now_ms();
    let id = uuid::Uuid::now_v7().to_string();
    let payload = new.payload.to_string();
    let (request_id, request_hash) = new.request.clone().unzip();
    let insert = statement(
        backend,
        "INSERT INTO queue_jobs (id, kind, payload, state, attempts, max_attempts, last_error, \
         unique_key, creator, request_id, request_hash, run_after, locked_by, locked_until, \
         published_at, created_at, updated_at, started_at, finished_at, queued_at) \
         VALUES ($1, $2, $3, 'QUEUED', 0, $4, NULL, $5, $6, $7, $8, $9, NULL, NULL, NULL, $10, \
         $10, NULL, NULL, $10) ON CONFLICT DO NOTHING RETURNING *",
        vec![
            id.clone().into(),
            new.kind.clone().into(),
            payload.into(),
            new.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).into(),
            new.unique_key.clone().into(),
            new.creator.clone().into(),
            request_id.into(),
            request_hash.into(),
            new.run_after.unwrap_or(now).into(),
            now.into(),
        ],
    );
    // The row as inserted: read back afterwards, a worker may already have claimed it.
    if let Some(inserted) = entity::Entity::find().from_raw_sql(insert).one(db).await? {
        return Job::try_from(inserted).map(Enqueued::Written);
    }
    // Something unique was taken: the request id, or the unique key of a live job.
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
            return Job::try_from(earlier).map(Enqueued::Found);
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
            return Job::try_from(live).map(Enqueued::Found);
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
    let sql = if backend == DbBackend::Postgres {
        "SELECT id FROM queue_jobs WHERE id = $1 AND attempts = $2 AND state = 'RUNNING' \
         FOR UPDATE"
    } else {
        "UPDATE queue_jobs SET attempts = attempts \
         WHERE id = $1 AND attempts = $2 AND state = 'RUNNING' RETURNING id"
    };
    let held = txn
        .query_one_raw(statement(
            backend,
            sql,
            vec![fence.job.clone().into(), fence.attempt.into()],
        ))
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(QueueError::LeaseLost {
            job: fence.job.clone(),
            attempt: fence.attempt,
        }),
    }
}

/// Job `id`, if any.
pub async fn find(db: &impl ConnectionTrait, id: &str) -> Result<Option<Job>, QueueError> {
    entity::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(Job::try_from)
        .transpose()
}
