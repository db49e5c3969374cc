//! Claiming due jobs under a lease: `FOR UPDATE SKIP LOCKED` on PostgreSQL, SQLite's one
//! writer otherwise, within each kind's limit across every worker.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, TransactionTrait as _, Value};

use super::{JobStore, QueueError, each_named, jobs, placeholders, statement, update_listed};
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
            None => claim_due(&self.db, worker, &[kind], max, lease, ids).await?,
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
                        RUNNING,
                        vec![now.into(), kind.into()],
                    ))
                    .await?
                    .map_or(Ok(0), |row| row.try_get::<i64>("", "n"))?;
                let room = usize::try_from(running)
                    .map_or(0, |running| limit.saturating_sub(running))
                    .min(max);
                let claimed = if room == 0 {
                    Vec::new()
                } else {
                    claim_due(&txn, worker, &[kind], room, lease, ids).await?
                };
                txn.commit().await?;
                claimed
            }
        };
        self.live(claimed, worker).await
    }

    /// Claims up to `max` due jobs of `kinds`, none of them under a limit, for `worker` under
    /// a lease of `lease`, in one statement: on PostgreSQL each kind in turn, as many as it
    /// has, until `max` (on SQLite the oldest first, whatever their kind). A worker's claim from
    /// the table pays one round trip, not one per kind it runs.
    pub async fn claim_any(
        &self,
        worker: &str,
        kinds: &[&str],
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, QueueError> {
        if max == 0 || kinds.is_empty() {
            return Ok(Vec::new());
        }
        let claimed = claim_due(&self.db, worker, kinds, max, lease, None).await?;
        self.live(claimed, worker).await
    }

    /// The claimed jobs that have an attempt left; the others (their worker was lost on their
    /// last attempt) are dead.
    async fn live(&self, claimed: Vec<Job>, worker: &str) -> Result<Vec<Job>, QueueError> {
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

    /// When a claim of `kinds` that found nothing at `since` (milliseconds since the epoch, read
    /// before it) could next find a job by the clock alone: the soonest a waiting job comes due
    /// or a running one's lease runs out after `since`, if any will (a time already past when
    /// one came due during the claim). What was due already and not claimed (a limited kind at
    /// its limit, rows another claimer holds) is not counted: waking for it would spin; whoever
    /// frees it wakes the claimers.
    pub async fn next_due(&self, kinds: &[&str], since: i64) -> Result<Option<i64>, QueueError> {
        if kinds.is_empty() {
            return Ok(None);
        }
        let mut values: Vec<Value> = vec![since.into()];
        values.extend(kinds.iter().map(|kind| Value::from(*kind)));
        let row = self
            .db
            .query_one_raw(statement(self.backend(), &soonest(kinds.len()), values))
            .await?;
        Ok(row.map_or(Ok(None), |row| row.try_get::<Option<i64>>("", "at"))?)
    }

    /// Which of `kinds` have a job a claim could take now (due, or under a lease that ran
    /// out), in one statement that reads one index entry per kind and index: what a claim of a
    /// limited kind asks before it takes the kind's lock and counts what runs (three statements
    /// and a transaction, on every wake-up of its pool, mostly finding nothing).
    pub async fn due_kinds(&self, kinds: &[&str]) -> Result<Vec<String>, QueueError> {
        if kinds.is_empty() {
            return Ok(Vec::new());
        }
        let mut values: Vec<Value> = vec![now_ms().into()];
        values.extend(kinds.iter().map(|kind| Value::from(*kind)));
        let sql = (2..2 + kinds.len())
            .map(|k| {
                format!(
                    "SELECT CAST(${k} AS TEXT) AS kind WHERE EXISTS (SELECT 1 FROM queue_jobs \
                     WHERE kind = ${k} AND state IN ('QUEUED', 'FAILED') AND run_after <= $1) \
                     OR EXISTS (SELECT 1 FROM queue_jobs WHERE kind = ${k} \
                     AND state = 'RUNNING' AND locked_until < $1)"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = self
            .db
            .query_all_raw(statement(self.backend(), &sql, values))
            .await?;
        rows.iter()
            .map(|row| row.try_get::<String>("", "kind").map_err(QueueError::from))
            .collect()
    }

    /// Which of `ids` (of `kind`) a claim could take now: due and not held under a live lease.
    /// A named claim skips a row another transaction has locked (the relay marking it handed,
    /// a moment after Redis took it); such a job is still claimable, and its stream entry must
    /// not be dropped as if it were not.
    pub async fn claimable(&self, kind: &str, ids: &[String]) -> Result<Vec<String>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut values: Vec<Value> = vec![kind.into(), now_ms().into()];
        values.extend(ids.iter().map(|id| Value::from(id.clone())));
        let sql = format!(
            "SELECT id FROM queue_jobs WHERE id IN ({}) AND {}",
            placeholders(3, ids.len()),
            claimable_at("kind = $1", "$2")
        );
        let rows = self
            .db
            .query_all_raw(statement(self.backend(), &sql, values))
            .await?;
        rows.iter()
            .map(|row| row.try_get::<String>("", "id").map_err(QueueError::from))
            .collect()
    }
}

/// How many jobs of the kind `$2` run under a lease unexpired at `$1`: a limited kind's count.
const RUNNING: &str = "SELECT COUNT(*) AS n FROM queue_jobs \
     WHERE kind = $2 AND state = 'RUNNING' AND locked_until >= $1";

/// When the first of `kinds` kinds (at `$2…`) comes due after `$1`: for each, the smallest entry
/// past `$1` of the index of waiting jobs (`queue_jobs_ready`) and of the leased ones
/// (`queue_jobs_leased`), one entry each however long the backlog.
fn soonest(kinds: usize) -> String {
    let each = (2..2 + kinds)
        .flat_map(|k| {
            [
                format!(
                    "SELECT (SELECT min(run_after) FROM queue_jobs WHERE kind = ${k} \
                     AND state IN ('QUEUED', 'FAILED') AND run_after > $1) AS at"
                ),
                format!(
                    "SELECT (SELECT min(locked_until) FROM queue_jobs WHERE kind = ${k} \
                     AND state = 'RUNNING' AND locked_until >= $1) AS at"
                ),
            ]
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    format!("SELECT min(at) AS at FROM ({each}) AS soonest")
}

/// The due jobs of `kind` (an SQL expression) at `$3`, at most `max`, locked: first those
/// whose lease ran out, then the waiting ones oldest first, read in order from the partial index
/// of waiting jobs (`queue_jobs_ready`), so that a claim reads the rows it takes, not the whole
/// backlog (one `OR` of both, ordered, sorted every due row of the kind: 20,000 of them per
/// claim in the queue bench, 0.08 of BullMQ without Redis).
fn ready_or_expired(kind: &str, max: usize) -> String {
    format!(
        "SELECT id FROM (SELECT id FROM queue_jobs WHERE kind = {kind} AND state = 'RUNNING' \
         AND locked_until < $3 LIMIT {max} FOR UPDATE SKIP LOCKED) AS expired \
         UNION ALL SELECT id FROM (SELECT id FROM queue_jobs WHERE kind = {kind} \
         AND state IN ('QUEUED', 'FAILED') AND run_after <= $3 ORDER BY run_after, id \
         LIMIT {max} FOR UPDATE SKIP LOCKED) AS ready LIMIT {max}"
    )
}

/// The due jobs of the kinds at the placeholders `kinds`, each kind in turn, at most `max` in
/// all, locked ([`ready_or_expired`] for each, read only until `max` are found).
fn due_of_kinds(kinds: &str, max: usize) -> String {
    format!(
        "SELECT job.id FROM unnest(ARRAY[{kinds}]::text[]) AS wanted(kind) \
         CROSS JOIN LATERAL ({}) AS job LIMIT {max}",
        ready_or_expired("wanted.kind", max)
    )
}

/// What a claim may take: a job of the kinds `of_kinds` (an SQL condition) that is due, or
/// whose lease ran out, at `now` (a statement parameter).
fn claimable_at(of_kinds: &str, now: &str) -> String {
    format!(
        "{of_kinds} AND ((state IN ('QUEUED', 'FAILED') AND run_after <= {now}) \
         OR (state = 'RUNNING' AND locked_until < {now}))"
    )
}

/// The claiming statement: due jobs of `kinds` (or leased ones whose lease ran out), oldest
/// first, locked so that concurrent claimers skip them, moved to RUNNING under `worker`'s lease.
async fn claim_due(
    db: &impl ConnectionTrait,
    worker: &str,
    kinds: &[&str],
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
    ];
    values.extend(kinds.iter().map(|kind| Value::from(*kind)));
    let kind_list = placeholders(4, kinds.len());
    let claimable = claimable_at(&format!("kind IN ({kind_list})"), "$3");
    let first_id = 4 + kinds.len();
    let set = "state = 'RUNNING', attempts = attempts + 1, locked_by = $1, \
               locked_until = $2, started_at = $3, updated_at = $3";
    let postgres = backend == DbBackend::Postgres;
    let due = match ids {
        // Named jobs (from a stream) are looked up one by one by their key.
        Some(ids) if postgres => {
            let list = placeholders(first_id, ids.len());
            values.extend(ids.iter().map(|id| Value::from(id.clone())));
            let named = format!("(SELECT DISTINCT unnest(ARRAY[{list}]::text[])) AS named(id)");
            format!("{} LIMIT {max}", each_named(&named, &claimable))
        }
        Some(ids) => {
            let list = placeholders(first_id, ids.len());
            values.extend(ids.iter().map(|id| Value::from(id.clone())));
            format!("SELECT id FROM queue_jobs WHERE id IN ({list}) AND {claimable} LIMIT {max}")
        }
        None if postgres => due_of_kinds(&kind_list, max),
        None => format!(
            "SELECT id FROM queue_jobs WHERE {claimable} ORDER BY run_after, id LIMIT {max}"
        ),
    };
    let sql = if postgres {
        // The due rows are picked and locked once, in a materialized CTE: inside an
        // `IN (subquery)`, a plan may evaluate `LIMIT … FOR UPDATE SKIP LOCKED` more than once
        // and update more rows than the limit (a known PostgreSQL planner behaviour).
        format!(
            "WITH due AS MATERIALIZED ({due}) {} RETURNING *",
            update_listed("due", set)
        )
    } else {
        // SQLite's single writer: nothing else claims meanwhile.
        format!("UPDATE queue_jobs SET {set} WHERE id IN ({due}) RETURNING *")
    };
    let rows = db.query_all_raw(statement(backend, &sql, values)).await?;
    jobs(rows)
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait as _;

    use super::*;
    use crate::store::explain;

    /// `count` jobs of kind `k` in `state`, the n-th (from 1) due at `run_after` and leased
    /// until `locked_until` (SQL expressions of `n`).
    fn jobs_of_k(count: u32, state: &str, run_after: &str, locked_until: &str) -> String {
        let now = now_ms();
        format!(
            "INSERT INTO queue_jobs (id, kind, payload, state, attempts, max_attempts, \
             creator, run_after, locked_until, created_at, updated_at) \
             SELECT '{state}-' || n, 'k', '{{}}', '{state}', 0, 8, 'test', {run_after}, \
             {locked_until}, {now}, {now} FROM generate_series(1, {count}) AS n"
        )
    }

    /// A claim from the table (PostgreSQL without Redis, the workers' sweep, a limited kind)
    /// reads the rows it takes: with a backlog of 20,000 waiting jobs of the kind, its plan
    /// walks the index of waiting jobs in order, for each kind it claims, and sorts nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_reads_the_rows_it_takes_not_the_backlog() {
        let db = explain::database().await;
        let now = now_ms();
        for (count, state) in [(20_000, "QUEUED"), (50, "RUNNING"), (20_000, "SUCCEEDED")] {
            let due = format!("{now} - n");
            let leased = format!("{now} + 30000");
            db.execute_unprepared(&jobs_of_k(count, state, &due, &leased))
                .await
                .unwrap();
        }
        let values = vec![
            "w".into(),
            (now + 30_000).into(),
            now.into(),
            "other".into(),
            "k".into(),
        ];
        let plan = explain::plan(&db, &due_of_kinds("$4, $5", 20), values).await;
        assert!(plan.contains("queue_jobs_ready"), "{plan}");
        assert!(!plan.contains("Sort"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }

    /// The kinds a limited pool is told have work are those a claim could take a job of: one
    /// waiting and due, or one whose lease ran out; not one due later, nor one running under a
    /// live lease, nor a finished one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_kinds_with_jobs_due_are_those_a_claim_could_take() {
        let db = explain::database().await;
        let now = now_ms();
        let job = |kind: &str, state: &str, run_after: i64, locked_until: Option<i64>| {
            let until = locked_until.map_or("NULL".to_owned(), |at| at.to_string());
            format!(
                "INSERT INTO queue_jobs (id, kind, payload, state, attempts, max_attempts, \
                 creator, run_after, locked_until, created_at, updated_at) VALUES \
                 ('{kind}', '{kind}', '{{}}', '{state}', 1, 8, 'test', {run_after}, {until}, \
                 {now}, {now})"
            )
        };
        for row in [
            job("due", "QUEUED", now - 1, None),
            job("retried", "FAILED", now - 1, None),
            job("abandoned", "RUNNING", now - 60_000, Some(now - 1)),
            job("later", "QUEUED", now + 60_000, None),
            job("running", "RUNNING", now - 60_000, Some(now + 60_000)),
            job("finished", "SUCCEEDED", now - 60_000, None),
        ] {
            db.execute_unprepared(&row).await.unwrap();
        }
        let kinds = [
            "due",
            "retried",
            "abandoned",
            "later",
            "running",
            "finished",
            "none",
        ];
        let mut due = JobStore::new(db).due_kinds(&kinds).await.unwrap();
        due.sort();
        assert_eq!(due, ["abandoned", "due", "retried"]);
    }

    /// What reads running jobs by kind reads the running jobs alone, by when their lease runs
    /// out, and when jobs next come due is one index entry per kind and index: with 20,000
    /// waiting, 20,000 finished and 2,000 running jobs of the kind, neither walks the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_runs_and_what_comes_due_next_are_read_from_their_own_indexes() {
        let db = explain::database().await;
        let now = now_ms();
        for (count, state) in [
            (20_000, "QUEUED"),
            (2_000, "RUNNING"),
            (20_000, "SUCCEEDED"),
        ] {
            let later = format!("{now} + n");
            db.execute_unprepared(&jobs_of_k(count, state, &later, &later))
                .await
                .unwrap();
        }
        let values = || vec![now.into(), "k".into(), "other".into()];
        let next = explain::plan(&db, &soonest(2), values()).await;
        assert!(next.contains("queue_jobs_ready"), "{next}");
        assert!(next.contains("queue_jobs_leased"), "{next}");
        assert!(!next.contains("Seq Scan"), "{next}");
        let count = explain::plan(&db, RUNNING, values().drain(..2).collect()).await;
        assert!(count.contains("queue_jobs_leased"), "{count}");
        // An admin's ListJobs of a kind the table holds few of: a page in index order, not a
        // walk of every other kind's jobs by id.
        let other = crate::Listing {
            kind: Some("other".into()),
            ..crate::Listing::default()
        };
        let (listing, by_kind) = crate::store::listed(&other, None, 20);
        let listed = explain::plan(&db, &listing, by_kind).await;
        assert!(listed.contains("queue_listing_kind"), "{listed}");
        assert!(!listed.contains("Sort"), "{listed}");
        // A user's ListJobs, the same way by creator, past a page already read.
        let ada = crate::Listing {
            creator: Some("users/ada".into()),
            ..crate::Listing::default()
        };
        let (listing, by_creator) = crate::store::listed(&ada, Some("z".into()), 20);
        let listed = explain::plan(&db, &listing, by_creator).await;
        assert!(listed.contains("queue_listing_creator"), "{listed}");
        assert!(!listed.contains("Sort"), "{listed}");
        let expired = ready_or_expired("$2", 20).replace("$3", "$1");
        let claim = explain::plan(&db, &expired, values().drain(..2).collect()).await;
        assert!(claim.contains("queue_jobs_leased"), "{claim}");
        assert!(!claim.contains("Seq Scan"), "{claim}");
    }
}
