//! Retention: finished jobs deleted once they are older than the window their state keeps them,
//! a batch per statement, so that no delete holds many rows or blocks a claim for long.

use sea_orm::ConnectionTrait as _;

use super::{JobStore, QueueError, statement};
use crate::job::State;

impl JobStore {
    /// Deletes up to `batch` jobs in final state `state` that finished before `before` (ms);
    /// returns how many. A job that left that state meanwhile (a dead job retried) is kept: the
    /// outer terms are checked again on the row as it is when deleted.
    pub async fn prune(&self, state: State, before: i64, batch: u64) -> Result<u64, QueueError> {
        if !state.is_final() {
            return Ok(0);
        }
        let deleted = self
            .db
            .execute_raw(statement(
                self.backend(),
                "DELETE FROM queue_jobs WHERE state = $1 AND finished_at < $2 AND id IN \
                 (SELECT id FROM queue_jobs WHERE state = $1 AND finished_at < $2 LIMIT $3)",
                vec![
                    state.as_str().into(),
                    before.into(),
                    i64::try_from(batch).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await?;
        Ok(deleted.rows_affected())
    }
}
