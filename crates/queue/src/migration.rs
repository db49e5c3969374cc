//! The queue's schema, tracked in its own `queue_migrations` table: one table of jobs (the
//! outbox and the queue at once); one row per kind that has a concurrency limit, which claims
//! of that kind lock to take turns; the side effects done once per key; and when each periodic
//! kind is next due; the leases that let one process at a time relay or prune.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

/// Applies the queue's migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateJobs),
            Box::new(CreateEffectsAndPeriodic),
            Box::new(CreateLeasesAndRetention),
            Box::new(IndexReadyJobs),
            Box::new(IndexLeasedJobs),
            Box::new(IndexGivenRequests),
            Box::new(ListJobsBeside),
        ]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("queue_migrations").into_iden()
    }
}

#[derive(DeriveIden)]
enum Jobs {
    #[sea_orm(iden = "queue_jobs")]
    Table,
    Id,
    Kind,
    Payload,
    State,
    Attempts,
    MaxAttempts,
    LastError,
    UniqueKey,
    Creator,
    RequestId,
    RequestHash,
    RunAfter,
    LockedBy,
    LockedUntil,
    PublishedAt,
    CreatedAt,
    UpdatedAt,
    StartedAt,
    FinishedAt,
    QueuedAt,
}

#[derive(DeriveIden)]
enum Listing {
    #[sea_orm(iden = "queue_listing")]
    Table,
    Id,
    Creator,
    Kind,
}

#[derive(DeriveIden)]
enum Kinds {
    #[sea_orm(iden = "queue_kinds")]
    Table,
    Kind,
    Claims,
}

struct CreateJobs;

impl MigrationName for CreateJobs {
    fn name(&self) -> &str {
        "m0001_create_jobs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateJobs {
    #[allow(
        clippy::too_many_lines,
        reason = "the schema, one statement per table and index, read top to bottom"
    )]
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let millis = |col: Jobs| ColumnDef::new(col).big_integer().not_null().to_owned();
        manager
            .create_table(
                Table::create()
                    .table(Jobs::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Jobs::Id).string().not_null().primary_key())
                    .col(ColumnDef::new(Jobs::Kind).string().not_null())
                    .col(ColumnDef::new(Jobs::Payload).text().not_null())
                    .col(ColumnDef::new(Jobs::State).string().not_null())
                    .col(ColumnDef::new(Jobs::Attempts).integer().not_null())
                    .col(ColumnDef::new(Jobs::MaxAttempts).integer().not_null())
                    .col(ColumnDef::new(Jobs::LastError).text().null())
                    .col(ColumnDef::new(Jobs::UniqueKey).string().null())
                    .col(ColumnDef::new(Jobs::Creator).string().not_null())
                    .col(ColumnDef::new(Jobs::RequestId).string().null())
                    .col(ColumnDef::new(Jobs::RequestHash).string().null())
                    .col(millis(Jobs::RunAfter))
                    .col(ColumnDef::new(Jobs::LockedBy).string().null())
                    .col(ColumnDef::new(Jobs::LockedUntil).big_integer().null())
                    .col(ColumnDef::new(Jobs::PublishedAt).big_integer().null())
                    .col(millis(Jobs::CreatedAt))
                    .col(millis(Jobs::UpdatedAt))
                    .col(ColumnDef::new(Jobs::StartedAt).big_integer().null())
                    .col(ColumnDef::new(Jobs::FinishedAt).big_integer().null())
                    .to_owned(),
            )
            .await?;
        // Claims: the due jobs of a kind, oldest first.
        manager
            .create_index(
                Index::create()
                    .name("queue_jobs_due")
                    .table(Jobs::Table)
                    .col(Jobs::Kind)
                    .col(Jobs::State)
                    .col(Jobs::RunAfter)
                    .to_owned(),
            )
            .await?;
        // ListJobs: a creator's jobs, newest first.
        manager
            .create_index(
                Index::create()
                    .name("queue_jobs_creator")
                    .table(Jobs::Table)
                    .col(Jobs::Creator)
                    .col(Jobs::Id)
                    .to_owned(),
            )
            .await?;
        // AIP-155: one job per creator and request id.
        manager
            .create_index(
                Index::create()
                    .name("queue_jobs_request")
                    .table(Jobs::Table)
                    .col(Jobs::Creator)
                    .col(Jobs::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // The relay: waiting jobs by when they were handed to Redis (0: never). Partial, so that
        // its reads cost what they find, however many finished jobs the table keeps.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS queue_jobs_relay ON queue_jobs \
                 (COALESCE(published_at, 0)) WHERE state IN ('QUEUED', 'FAILED')",
            )
            .await?;
        // At most one live job per unique key (the same SQL on PostgreSQL and SQLite).
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE UNIQUE INDEX IF NOT EXISTS queue_jobs_live_key ON queue_jobs (unique_key) \
                 WHERE unique_key IS NOT NULL AND state IN ('QUEUED', 'RUNNING', 'FAILED')",
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Kinds::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Kinds::Kind)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Kinds::Claims).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Effects {
    #[sea_orm(iden = "queue_effects")]
    Table,
    Key,
    JobId,
    Attempt,
    DoneAt,
}

#[derive(DeriveIden)]
enum Periodic {
    #[sea_orm(iden = "queue_periodic")]
    Table,
    Kind,
    NextAt,
}

struct CreateEffectsAndPeriodic;

impl MigrationName for CreateEffectsAndPeriodic {
    fn name(&self) -> &str {
        "m0002_create_effects_and_periodic"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateEffectsAndPeriodic {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Effects::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Effects::Key)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Effects::JobId).string().not_null())
                    .col(ColumnDef::new(Effects::Attempt).integer().not_null())
                    .col(ColumnDef::new(Effects::DoneAt).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        // When a job was last put in the queue (written, or retried by hand): a kind retried
        // for a window of time counts it from there.
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .add_column(
                        ColumnDef::new(Jobs::QueuedAt)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared("UPDATE queue_jobs SET queued_at = created_at")
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Periodic::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Periodic::Kind)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Periodic::NextAt).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Leases {
    #[sea_orm(iden = "queue_leases")]
    Table,
    Name,
    Holder,
    Until,
}

struct CreateLeasesAndRetention;

impl MigrationName for CreateLeasesAndRetention {
    fn name(&self) -> &str {
        "m0003_create_leases_and_retention"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateLeasesAndRetention {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One row per role that one process at a time plays (the relay, the pruner).
        manager
            .create_table(
                Table::create()
                    .table(Leases::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Leases::Name)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Leases::Holder).string().not_null())
                    .col(ColumnDef::new(Leases::Until).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        // The relay reads the waiting jobs not yet handed to Redis, oldest first: an index of
        // exactly those, which a hand-off leaves (nothing is re-handed by age any more).
        db.execute_unprepared("DROP INDEX IF EXISTS queue_jobs_relay")
            .await?;
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS queue_jobs_unhanded ON queue_jobs (run_after) \
             WHERE published_at IS NULL AND state IN ('QUEUED', 'FAILED')",
        )
        .await?;
        // Retention: the finished jobs, by when they finished.
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS queue_jobs_finished ON queue_jobs (state, finished_at) \
             WHERE state IN ('SUCCEEDED', 'DEAD')",
        )
        .await?;
        Ok(())
    }
}

struct IndexReadyJobs;

impl MigrationName for IndexReadyJobs {
    fn name(&self) -> &str {
        "m0004_index_ready_jobs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for IndexReadyJobs {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // A claim from the table: the waiting jobs of a kind, oldest first, in index order, so
        // that it stops at the rows it takes.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS queue_jobs_ready ON queue_jobs (kind, run_after, id) \
                 WHERE state IN ('QUEUED', 'FAILED')",
            )
            .await?;
        Ok(())
    }
}

struct IndexLeasedJobs;

impl MigrationName for IndexLeasedJobs {
    fn name(&self) -> &str {
        "m0005_index_leased_jobs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for IndexLeasedJobs {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        // What reads running jobs by kind (a claim's expired leases, a limited kind's count of
        // what runs, when the next lease runs out) reads these alone, by when their lease ends.
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS queue_jobs_leased ON queue_jobs (kind, locked_until) \
             WHERE state = 'RUNNING'",
        )
        .await?;
        // An admin's ListJobs of one kind, newest first: a page read in index order, however
        // many jobs of other kinds the table keeps.
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS queue_jobs_kind ON queue_jobs (kind, id)",
        )
        .await?;
        // Every job was in this one by kind and state, which served neither ordering: the
        // ready, leased and kind indexes answer its reads.
        db.execute_unprepared("DROP INDEX IF EXISTS queue_jobs_due")
            .await?;
        Ok(())
    }
}

struct IndexGivenRequests;

impl MigrationName for IndexGivenRequests {
    fn name(&self) -> &str {
        "m0006_index_given_requests"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for IndexGivenRequests {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        // AIP-155's one job per creator and request id holds among the jobs that carry one: a
        // job written without (the saga's, the e-mails', most of a batch) was an entry in this
        // index for every version of its row, three or four a job.
        db.execute_unprepared("DROP INDEX IF EXISTS queue_jobs_request")
            .await?;
        db.execute_unprepared(
            "CREATE UNIQUE INDEX IF NOT EXISTS queue_jobs_request ON queue_jobs \
             (creator, request_id) WHERE request_id IS NOT NULL",
        )
        .await?;
        Ok(())
    }
}

struct ListJobsBeside;

impl MigrationName for ListJobsBeside {
    fn name(&self) -> &str {
        "m0007_list_jobs_beside"
    }
}

/// What the database does on its own to keep `queue_listing` one row per job: the job's insert
/// writes it, the job's delete removes it. PostgreSQL once per statement (a batch's insert, a
/// prune's delete), from the statement's own rows; SQLite once per row.
const LISTING_KEPT: [(DbBackend, &str); 8] = [
    (
        DbBackend::Postgres,
        "CREATE OR REPLACE FUNCTION queue_listing_add() RETURNS trigger LANGUAGE plpgsql \
         SET search_path FROM CURRENT AS $$ BEGIN INSERT INTO queue_listing (id, creator, kind) \
         SELECT id, creator, kind FROM added; RETURN NULL; END $$",
    ),
    (
        DbBackend::Postgres,
        "DROP TRIGGER IF EXISTS queue_listing_add ON queue_jobs",
    ),
    (
        DbBackend::Postgres,
        "CREATE TRIGGER queue_listing_add AFTER INSERT ON queue_jobs \
         REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION queue_listing_add()",
    ),
    (
        DbBackend::Postgres,
        "CREATE OR REPLACE FUNCTION queue_listing_remove() RETURNS trigger LANGUAGE plpgsql \
         SET search_path FROM CURRENT AS $$ BEGIN DELETE FROM queue_listing \
         WHERE id IN (SELECT id FROM removed); RETURN NULL; END $$",
    ),
    (
        DbBackend::Postgres,
        "DROP TRIGGER IF EXISTS queue_listing_remove ON queue_jobs",
    ),
    (
        DbBackend::Postgres,
        "CREATE TRIGGER queue_listing_remove AFTER DELETE ON queue_jobs \
         REFERENCING OLD TABLE AS removed FOR EACH STATEMENT \
         EXECUTE FUNCTION queue_listing_remove()",
    ),
    (
        DbBackend::Sqlite,
        "CREATE TRIGGER IF NOT EXISTS queue_listing_add AFTER INSERT ON queue_jobs BEGIN \
         INSERT INTO queue_listing (id, creator, kind) VALUES (NEW.id, NEW.creator, NEW.kind); END",
    ),
    (
        DbBackend::Sqlite,
        "CREATE TRIGGER IF NOT EXISTS queue_listing_remove AFTER DELETE ON queue_jobs BEGIN \
         DELETE FROM queue_listing WHERE id = OLD.id; END",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for ListJobsBeside {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // ListJobs by creator or by kind, newest first, reads a table of what never changes
        // about a job, written once with it. As indexes of `queue_jobs`, (creator, id) and
        // (kind, id) took an entry from every version of a job's row, its claim's and its
        // completion's too: a quarter of what a drained job cost PostgreSQL
        // (benches/queue_rows.sh). Now a completion's version enters the key and the finished
        // index alone; a claim's the key, the leased index and the live creators' below.
        let listing = |col: Listing| ColumnDef::new(col).string().not_null().to_owned();
        manager
            .create_table(
                Table::create()
                    .table(Listing::Table)
                    .if_not_exists()
                    .col(listing(Listing::Id).primary_key())
                    .col(listing(Listing::Creator))
                    .col(listing(Listing::Kind))
                    .to_owned(),
            )
            .await?;
        // On PostgreSQL one transaction (src/app/migrate.rs): the trigger's lock holds the
        // queue's writes from here to the end, the backfill included. The listing's indexes
        // are built after the backfill, once, not entry by entry.
        let db = manager.get_connection();
        let backend = db.get_database_backend();
        for (_, sql) in LISTING_KEPT.iter().filter(|(of, _)| *of == backend) {
            db.execute_unprepared(sql).await?;
        }
        db.execute_unprepared(
            "INSERT INTO queue_listing (id, creator, kind) SELECT id, creator, kind \
             FROM queue_jobs WHERE id NOT IN (SELECT id FROM queue_listing)",
        )
        .await?;
        for (name, columns) in [("creator", "creator, id"), ("kind", "kind, id")] {
            db.execute_unprepared(&format!(
                "CREATE INDEX IF NOT EXISTS queue_listing_{name} ON queue_listing ({columns})"
            ))
            .await?;
        }
        // A creator's live jobs, which its cap counts on every CreateJob and BatchCreateJobs:
        // partial, so that the count reads the live jobs alone (through the listing by creator
        // it read every job of the creator the table keeps, finished ones too, as the old index
        // made it). A job's insert and its claim enter it; its completion does not.
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS queue_jobs_live_creator ON queue_jobs (creator) \
             WHERE state IN ('QUEUED', 'RUNNING', 'FAILED')",
        )
        .await?;
        db.execute_unprepared("DROP INDEX IF EXISTS queue_jobs_creator")
            .await?;
        db.execute_unprepared("DROP INDEX IF EXISTS queue_jobs_kind")
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait as _;
    use sea_orm_migration::MigratorTrait as _;

    use super::Migrator;
    use crate::store::explain;
    use crate::{JobStore, Listing, NewJob};

    /// A claim and a completion each write a version of the job's row, and each version is an
    /// entry in every index of `queue_jobs` it qualifies for: the key's, and no index but
    /// partial ones of the states it may be in (waiting, running, live, finished, keyed,
    /// requested). What lists jobs by creator or kind is `queue_listing`'s, written once per
    /// job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_row_s_new_version_enters_the_key_and_partial_indexes_alone() {
        let db = explain::database().await;
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'queue_jobs' \
                 ORDER BY indexname",
            ))
            .await
            .unwrap();
        let whole: Vec<String> = rows
            .iter()
            .filter(|row| {
                !row.try_get::<String>("", "indexdef")
                    .unwrap()
                    .contains(" WHERE ")
            })
            .map(|row| row.try_get("", "indexname").unwrap())
            .collect();
        assert_eq!(whole, ["queue_jobs_pkey"]);
    }

    /// A creator's cap is counted from its live jobs alone: twenty thousand finished jobs of
    /// the same creator are not read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_creator_s_live_jobs_are_counted_without_its_finished_ones() {
        let db = explain::database().await;
        db.execute_unprepared(
            "INSERT INTO queue_jobs (id, kind, payload, state, attempts, max_attempts, creator, \
             run_after, created_at, updated_at, finished_at) SELECT 'done-' || n, 'k', '{}', \
             'SUCCEEDED', 1, 8, 'users/ada', 1, 1, 1, 1 FROM generate_series(1, 20000) AS n",
        )
        .await
        .unwrap();
        let store = JobStore::new(db.clone());
        for _ in 0..3 {
            store
                .enqueue(NewJob {
                    kind: "k".into(),
                    creator: "users/ada".into(),
                    ..NewJob::default()
                })
                .await
                .unwrap();
        }
        assert_eq!(store.live_of("users/ada").await.unwrap(), 3);
        let values = vec!["users/ada".into(), 1_001_i64.into()];
        let plan = explain::plan(&db, crate::store::LIVE_OF, values).await;
        assert!(plan.contains("queue_jobs_live_creator"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }

    /// A database migrated before the listing table came lists its jobs after it: by creator,
    /// by kind, and each job once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_written_before_the_listing_table_are_listed_after_it() {
        let url = keel_testkit::fresh_database().await;
        let db = sea_orm::Database::connect(&url).await.unwrap();
        Migrator::up(&db, Some(6)).await.unwrap();
        let store = JobStore::new(db.clone());
        let job = |kind: &str, creator: &str| NewJob {
            kind: kind.into(),
            creator: creator.into(),
            ..NewJob::default()
        };
        store
            .enqueue_all(vec![
                job("a", "users/ada"),
                job("b", "users/ada"),
                job("a", "users/bob"),
            ])
            .await
            .unwrap();
        Migrator::up(&db, None).await.unwrap();
        store.enqueue(job("b", "users/bob")).await.unwrap();
        let count = |listing: Listing| {
            let store = store.clone();
            async move { store.list(&listing, None, 100).await.unwrap().len() }
        };
        for creator in ["users/ada", "users/bob"] {
            let listing = Listing {
                creator: Some(creator.into()),
                ..Listing::default()
            };
            assert_eq!(count(listing).await, 2, "{creator}");
        }
        let of_a = Listing {
            kind: Some("a".into()),
            ..Listing::default()
        };
        assert_eq!(count(of_a).await, 2);
        assert_eq!(count(Listing::default()).await, 4);
    }

    /// The request index holds the jobs that carry a request id and no other: two thousand
    /// jobs written without one leave it empty (its first page alone), and a request id given
    /// twice by one creator is still one job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_jobs_that_carry_a_request_id_are_in_the_request_index() {
        let db = explain::database().await;
        let store = JobStore::new(db.clone());
        let job = |request: Option<&str>| NewJob {
            kind: "k".into(),
            creator: "users/ada".into(),
            request: request.map(|id| (id.to_owned(), "hash".to_owned())),
            ..NewJob::default()
        };
        store
            .enqueue_all((0..2_000).map(|_| job(None)).collect())
            .await
            .unwrap();
        let size = || async {
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT pg_relation_size('queue_jobs_request') AS bytes",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "bytes")
            .unwrap()
        };
        assert_eq!(size().await, 8192, "the index's first page, no entry");
        let first = store.enqueue(job(Some("r-1"))).await.unwrap();
        let again = store.enqueue(job(Some("r-1"))).await.unwrap();
        assert_eq!(first.id, again.id, "one job per creator and request id");
    }
}
