//! What the relay reads and writes: the waiting jobs not yet handed to Redis, the mark that
//! they were (written after Redis took them), and every waiting job unmarked when Redis lost
//! what it was handed.

use sea_orm::{ConnectionTrait as _, DbBackend, DbErr, Value};

use super::{JobStore, QueueError, each_named, statement, update_listed};
use crate::job::now_ms;

/// A due job not yet handed to Redis, as the relay read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unhanded {
    /// The job.
    pub id: String,
    /// Its kind: which stream it goes to.
    pub kind: String,
    /// The attempts it had when read.
    pub attempts: i32,
    /// When it last changed, as read: with `attempts`, the version of the row the mark is for,
    /// so that it never marks a later life of the job (a failed attempt's retry, a dead job
    /// retried, whose attempts start again at 0).
    pub updated_at: i64,
}

/// The relay's writes happen only while `$h` holds its lease: one that lost it (stalled past
/// its term) leaves the rows to the holder.
const HOLDING: &str = "EXISTS (SELECT 1 FROM queue_leases WHERE name = 'relay' AND holder = $h \
     AND until >= $t)";

/// The due waiting jobs never handed to Redis, oldest first. Its terms are those of the
/// `queue_jobs_unhanded` partial index: the read costs what it finds, however many finished
/// or handed jobs the table keeps.
const UNHANDED: &str = "SELECT id, kind, attempts, updated_at FROM queue_jobs \
     WHERE published_at IS NULL AND state IN ('QUEUED', 'FAILED') AND run_after <= $1 \
     ORDER BY run_after LIMIT $2";

impl JobStore {
    /// Up to `max` due jobs that wait and were not handed to Redis (since they last became
    /// due: a failed attempt's retry is handed again).
    pub async fn unhanded(&self, max: usize) -> Result<Vec<Unhanded>, QueueError> {
        let rows = self
            .db
            .query_all_raw(statement(
                self.backend(),
                UNHANDED,
                vec![
                    now_ms().into(),
                    i64::try_from(max).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Unhanded {
                    id: row.try_get("", "id")?,
                    kind: row.try_get("", "kind")?,
                    attempts: row.try_get("", "attempts")?,
                    updated_at: row.try_get("", "updated_at")?,
                })
            })
            .collect::<Result<_, DbErr>>()
            .map_err(QueueError::from)
    }

    /// When the next waiting job not yet handed comes due after `since` (when the relay's last
    /// pass began), if one is to: what the relay waits for between wake-ups (the smallest entry
    /// of `queue_jobs_unhanded` past `since`; past already when one came due during the pass).
    pub async fn next_unhanded(&self, since: i64) -> Result<Option<i64>, QueueError> {
        let row = self
            .db
            .query_one_raw(statement(
                self.backend(),
                "SELECT min(run_after) AS at FROM queue_jobs WHERE published_at IS NULL \
                 AND state IN ('QUEUED', 'FAILED') AND run_after > $1",
                vec![since.into()],
            ))
            .await?;
        Ok(row.map_or(Ok(None), |row| row.try_get::<Option<i64>>("", "at"))?)
    }

    /// Records that Redis took `jobs`, while `holder` holds the relay's lease: each as read, so
    /// that a job claimed, failed and waiting for its retry meanwhile stays to be handed again.
    /// Returns how many it marked.
    pub async fn handed(&self, jobs: &[Unhanded], holder: &str) -> Result<u64, QueueError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let sql = marking(self.backend(), jobs.len());
        let mut values: Vec<Value> = vec![now_ms().into(), holder.into()];
        for job in jobs {
            values.push(job.id.clone().into());
            values.push(job.attempts.into());
            values.push(job.updated_at.into());
        }
        let marked = self
            .db
            .execute_raw(statement(self.backend(), &sql, values))
            .await?;
        Ok(marked.rows_affected())
    }

    /// Marks every waiting job as never handed (Redis lost what it was handed), while `holder`
    /// holds the relay's lease; returns how many were. A row held elsewhere meanwhile is passed
    /// over (it is being claimed); one that stays waiting is claimed by the workers' sweep of
    /// the table.
    pub async fn hand_again(&self, holder: &str) -> Result<u64, QueueError> {
        let terms = format!(
            "{} AND state IN ('QUEUED', 'FAILED') AND published_at IS NOT NULL",
            HOLDING.replace("$h", "$1").replace("$t", "$2")
        );
        let sql = without_waiting(self.backend(), "published_at = NULL", &terms);
        let reset = self
            .db
            .execute_raw(statement(
                self.backend(),
                &sql,
                vec![holder.into(), now_ms().into()],
            ))
            .await?;
        Ok(reset.rows_affected())
    }
}

/// The relay's mark of `n` jobs as read: `$1` now, `$2` the holder, then each job's id, attempts
/// and `updated_at` from `$3` on. On PostgreSQL each job is looked up by its key and a row
/// another transaction holds is passed over ([`each_named`]; why not wait: [`without_waiting`]).
fn marking(backend: DbBackend, n: usize) -> String {
    let rows = (0..n)
        .map(|k| format!("(${}, ${}, ${})", 3 + 3 * k, 4 + 3 * k, 5 + 3 * k))
        .collect::<Vec<_>>()
        .join(", ");
    let holding = HOLDING.replace("$h", "$2").replace("$t", "$1");
    let waiting = "state IN ('QUEUED', 'FAILED')";
    match backend {
        DbBackend::Postgres => {
            let named = format!("(VALUES {rows}) AS named(id, attempts, updated_at)");
            let as_read = format!(
                "job.attempts = named.attempts AND job.updated_at = named.updated_at \
                 AND job.{waiting} AND {holding}"
            );
            format!(
                "WITH free AS MATERIALIZED ({}) {}",
                each_named(&named, &as_read),
                update_listed("free", "published_at = $1")
            )
        }
        _ => format!(
            "UPDATE queue_jobs SET published_at = $1 WHERE {holding} AND {waiting} \
             AND (id, attempts, updated_at) IN (VALUES {rows})"
        ),
    }
}

/// `UPDATE queue_jobs SET {set} WHERE {terms}`, except that on PostgreSQL it never waits for a
/// row another transaction holds: it locks the rows it can (`SKIP LOCKED`) and updates those. A
/// held row is being claimed or finished, so no longer waits to be handed. Waiting for it, the
/// relay's mark deadlocked with a worker's batched completion (each held rows the other wanted;
/// the mark's recheck of a row changed meanwhile keeps it locked), and a completion chosen as
/// the victim ran its jobs again. A row skipped here is marked, or handed again, next pass.
/// SQLite has one writer at a time: nothing to wait for.
fn without_waiting(backend: DbBackend, set: &str, terms: &str) -> String {
    match backend {
        DbBackend::Postgres => format!(
            "WITH free AS MATERIALIZED (SELECT id FROM queue_jobs WHERE {terms} \
             FOR UPDATE SKIP LOCKED) \
             UPDATE queue_jobs SET {set} FROM free WHERE queue_jobs.id = free.id"
        ),
        _ => format!("UPDATE queue_jobs SET {set} WHERE {terms}"),
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait as _;

    use super::*;
    use crate::store::explain;

    /// The relay's mark never waits for a row another transaction holds (a worker recording a
    /// job's outcome): it marks the rest and leaves that one to be handed again. Waiting, it
    /// deadlocked with batched completions, which then ran their jobs again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relays_mark_passes_over_a_row_another_transaction_holds() {
        use sea_orm::TransactionTrait as _;
        let db = explain::database().await;
        let store = JobStore::new(db.clone());
        let job = || crate::NewJob {
            kind: "k".into(),
            creator: "test".into(),
            ..crate::NewJob::default()
        };
        let (held, free) = (
            store.enqueue(job()).await.unwrap(),
            store.enqueue(job()).await.unwrap(),
        );
        let term = std::time::Duration::from_secs(600);
        assert!(store.lease("relay", "relay-1", term).await.unwrap());
        let due = store.unhanded(10).await.unwrap();
        assert_eq!(due.len(), 2);
        let holder = db.begin().await.unwrap();
        holder
            .execute_unprepared(&format!(
                "SELECT id FROM queue_jobs WHERE id = '{}' FOR UPDATE",
                held.id
            ))
            .await
            .unwrap();
        let waits = async {
            loop {
                let waiting = db
                    .query_one_raw(statement(
                        DbBackend::Postgres,
                        "SELECT count(*) AS n FROM pg_stat_activity \
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        vec![],
                    ))
                    .await
                    .unwrap()
                    .unwrap()
                    .try_get::<i64>("", "n")
                    .unwrap();
                if waiting > 0 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            marked = store.handed(&due, "relay-1") => assert_eq!(marked.unwrap(), 1, "the free one; the held one passed over"),
            () = waits => panic!("the mark waits for a row another transaction holds"),
        }
        holder.commit().await.unwrap();
        let left: Vec<String> = store
            .unhanded(10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(
            left,
            vec![held.id],
            "the held job is handed again, {} is marked",
            free.id
        );
    }

    /// The relay's mark looks each job up by its key, whatever the statistics say. Planned on
    /// statistics taken when the table held finished jobs only, it walked every waiting job
    /// once per job marked: in a soak, a mark of 500 jobs over a backlog took 4 s, then 57 s,
    /// while the completions of those jobs waited for it and the backlog grew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relays_mark_looks_each_job_up_by_its_key_on_statistics_older_than_the_backlog() {
        let db = explain::database().await;
        db.execute_unprepared("ALTER TABLE queue_jobs SET (autovacuum_enabled = off)")
            .await
            .unwrap();
        let now = now_ms();
        let rows = |count: u32, state: &str, published: &str| {
            format!(
                "INSERT INTO queue_jobs (id, kind, payload, state, attempts, max_attempts, \
                 creator, run_after, published_at, created_at, updated_at) \
                 SELECT '{state}-' || n, 'k', '{{}}', '{state}', 0, 8, 'test', {now} - n, \
                 {published}, {now}, {now} FROM generate_series(1, {count}) AS n"
            )
        };
        db.execute_unprepared(&rows(20_000, "SUCCEEDED", &now.to_string()))
            .await
            .unwrap();
        db.execute_unprepared("ANALYZE queue_jobs").await.unwrap();
        db.execute_unprepared(&rows(20_000, "QUEUED", "NULL"))
            .await
            .unwrap();
        let due = JobStore::new(db.clone()).unhanded(500).await.unwrap();
        let mut values: Vec<Value> = vec![now.into(), "relay-1".into()];
        for job in &due {
            values.extend([
                job.id.clone().into(),
                job.attempts.into(),
                job.updated_at.into(),
            ]);
        }
        let sql = marking(DbBackend::Postgres, due.len());
        let plan = explain::plan_as_analyzed(&db, &sql, values).await;
        // Each named job found by its key (the next line is the key's condition).
        let lines: Vec<&str> = plan.lines().collect();
        let by_key = lines.windows(2).any(|pair| {
            pair[0].contains("Index Scan using queue_jobs_pkey")
                && pair[1].contains("= \"*VALUES*\".column1")
        });
        assert!(by_key, "{plan}");
        assert!(!plan.contains("queue_jobs_ready"), "{plan}");
        assert!(!plan.contains("Seq Scan on queue_jobs "), "{plan}");
    }

    /// The relay reads every 50 ms for as long as keel runs: what it reads must not grow with
    /// the finished jobs the table keeps, nor with a backlog already handed to Redis.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relays_read_scans_neither_finished_jobs_nor_a_handed_backlog() {
        let db = explain::database().await;
        let now = now_ms();
        // Finished jobs handed to Redis an hour ago; a backlog handed a second ago.
        let rows = |count: u32, state: &str, published: i64| {
            format!(
                "INSERT INTO queue_jobs (id, kind, payload, state, attempts, max_attempts, \
                 creator, run_after, published_at, created_at, updated_at) \
                 SELECT '{state}-' || n, 'k', '{{}}', '{state}', 1, 8, 'test', {published}, \
                 {published}, {published}, {now} FROM generate_series(1, {count}) AS n"
            )
        };
        let (hour_ago, second_ago) = (now - 3_600_000, now - 1_000);
        db.execute_unprepared(&rows(50_000, "SUCCEEDED", hour_ago))
            .await
            .unwrap();
        db.execute_unprepared(&rows(5_000, "QUEUED", second_ago))
            .await
            .unwrap();
        let plan = explain::plan(&db, UNHANDED, vec![now.into(), 500_i64.into()]).await;
        assert!(!plan.contains("Seq Scan"), "{plan}");
        assert!(plan.contains("queue_jobs_unhanded"), "{plan}");
    }
}
