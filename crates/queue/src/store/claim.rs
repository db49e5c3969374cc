//! Claiming due jobs under a lease: `FOR UPDATE SKIP LOCKED` on PostgreSQL, SQLite's one
//! writer otherwise, within each kind's limit across every worker.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, TransactionTrait as _, Value};

use super::{JobStore, QueueError, jobs, placeholders, statement};
use crate::job::{Job, millis, now_ms};

impl JobStore {
    /// Claims up to `max` due jobs of `kind` for `worker` under a lease of `lease` — at most
    /// `limit` of that kind running at once across every worker — optionally only among `ids`.
    /// A job whose previous worker's lease ran out is due again, and counts an attempt; one that
    /// has no attempt left is dead instead.
    pub async fn claim(
        &self,
        worker: &str,
        kind: &str,
        limit: Option<usize>,
        max: usize,
        lease: Duration,
        ids: Option<&[String]>,
    ) -> Result<Vec<Job>, QueueError> {
        if max == 0 || ids.is_some_and(<[String]>::is_empty) {
            return Ok(Vec::new());
        }
        let claimed = match limit {
            None => claim_due(&self.db, worker, kind, max, lease, ids).await?,
            Some(limit) => {
                let now = now_ms();
                let txn = self.db.begin().await?;
                // Take turns with every other claimer of this kind (the row lock on PostgreSQL,
                // the write lock on SQLite), then count what runs.
                txn.execute_raw(statement(
                    self.backend(),
                    "UPDATE queue_kinds SET claims = claims + 1 WHERE kind = $1",
                    vec![kind.into()],
                ))
                .await?;
                let running = txn
                    .query_one_raw(statement(
                        self.backend(),
                        "SELECT COUNT(*) AS n FROM queue_jobs \
                         WHERE kind = $1 AND state = 'RUNNING' AND locked_until >= $2",
                        vec![kind.into(), now.into()],
                    ))
                    .await?
                    .map_or(Ok(0), |row| row.try_get::<i64>("", "n"))?;
                let room = usize::try_from(running)
                    .map_or(0, |running| limit.saturating_sub(running))
                    .min(max);
                let claimed = if room == 0 {
                    Vec::new()
                } else {
                    claim_due(&txn, worker, kind, room, lease, ids).await?
                };
                txn.commit().await?;
                claimed
            }
        };
        let (live, exhausted): (Vec<Job>, Vec<Job>) = claimed
            .into_iter()
            .partition(|job| job.attempts <= job.max_attempts);
        for job in exhausted {
            self.fail(
                &job,
                worker,
                "its worker was lost with no attempt left",
                None,
            )
            .await?;
        }
        Ok(live)
    }
}

/// The claiming statement: due jobs of `kind` (or leased ones whose lease ran out), oldest first,
/// locked so that concurrent claimers skip them, moved to RUNNING under `worker`'s lease.
async fn claim_due(
    db: &impl ConnectionTrait,
    worker: &str,
    kind: &str,
    max: usize,
    lease: Duration,
    ids: Option<&[String]>,
) -> Result<Vec<Job>, QueueError> {
    let backend = db.get_database_backend();
    let now = now_ms();
    let mut values: Vec<Value> = vec![
        worker.into(),
        now.saturating_add(millis(lease)).into(),
        now.into(),
        kind.into(),
    ];
    let claimable = "kind = $4 AND ((state IN ('QUEUED', 'FAILED') AND run_after <= $3) \
                     OR (state = 'RUNNING' AND locked_until < $3))";
    let set = "SET state = 'RUNNING', attempts = attempts + 1, locked_by = $1, \
               locked_until = $2, started_at = $3, updated_at = $3";
    let postgres = backend == DbBackend::Postgres;
    let due = match ids {
        // Named jobs (from a stream) are looked up one by one by their key. Left to choose,
        // the planner may scan every due job of the kind for them (it did, 30 ms a claim, on a
        // table whose statistics predate a burst).
        Some(ids) if postgres => {
            let list = placeholders(5, ids.len());
            values.extend(ids.iter().map(|id| Value::from(id.clone())));
            format!(
                "SELECT job.id FROM (SELECT DISTINCT unnest(ARRAY[{list}]::text[])) AS named(id) \
                 CROSS JOIN LATERAL (SELECT id FROM queue_jobs WHERE id = named.id \
                 AND {claimable} FOR UPDATE SKIP LOCKED) AS job LIMIT {max}"
            )
        }
        Some(ids) => {
            let list = placeholders(5, ids.len());
            values.extend(ids.iter().map(|id| Value::from(id.clone())));
            format!("SELECT id FROM queue_jobs WHERE id IN ({list}) AND {claimable} LIMIT {max}")
        }
        None => {
            let lock = if postgres {
                "FOR UPDATE SKIP LOCKED"
            } else {
                ""
            };
            format!(
                "SELECT id FROM queue_jobs WHERE {claimable} \
                 ORDER BY run_after, id LIMIT {max} {lock}"
            )
        }
    };
    let sql = if postgres {
        // The due rows are picked and locked once, in a materialized CTE: inside an
        // `IN (subquery)`, a plan may evaluate `LIMIT … FOR UPDATE SKIP LOCKED` more than once
        // and update more rows than the limit (a known PostgreSQL planner behaviour).
        format!(
            "WITH due AS MATERIALIZED ({due}) \
             UPDATE queue_jobs {set} FROM due WHERE queue_jobs.id = due.id \
             RETURNING queue_jobs.*"
        )
    } else {
        // SQLite's single writer: nothing else claims meanwhile.
        format!("UPDATE queue_jobs {set} WHERE id IN ({due}) RETURNING *")
    };
    let rows = db.query_all_raw(statement(backend, &sql, values)).await?;
    jobs(rows)
}
