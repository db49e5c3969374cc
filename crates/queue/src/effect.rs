//! Side effects outside the database (an e-mail handed to SMTP), done once per key: the attempt
//! that holds a job looks for the key's mark under its fence just before it acts, and marks the
//! key once it has acted. A redelivered or taken-over job does not act again, and an attempt
//! that lost its job does not act at all. What stays possible, as with any effect outside the
//! transaction: a crash after acting and before the mark acts again on the next attempt, with
//! the same key (an e-mail's Message-ID) for the receiver to recognise.

use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement, TransactionTrait as _};

use crate::job::{Fence, now_ms};
use crate::store::{QueueError, hold};

/// Whether effect `key` is still to be done, asked by the attempt holding `fence`: false when
/// it was done already; [`QueueError::LeaseLost`] when this attempt no longer holds its job.
pub async fn pending(
    db: &DatabaseConnection,
    fence: &Fence,
    key: &str,
) -> Result<bool, QueueError> {
    let txn = db.begin().await?;
    hold(&txn, fence).await?;
    let done = txn
        .query_one_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "SELECT key FROM queue_effects WHERE key = $1",
            [key.into()],
        ))
        .await?
        .is_some();
    txn.commit().await?;
    Ok(!done)
}

/// Records that effect `key` was done by `fence`'s attempt. Not conditional on the fence: an
/// attempt that acted and lost its job meanwhile still acted, and its successor must know.
pub async fn done(db: &DatabaseConnection, fence: &Fence, key: &str) -> Result<(), QueueError> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO queue_effects (key, job_id, attempt, done_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
        [
            key.into(),
            fence.job.clone().into(),
            fence.attempt.into(),
            now_ms().into(),
        ],
    ))
    .await?;
    Ok(())
}
