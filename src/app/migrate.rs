//! Applying the services' migrations: on PostgreSQL in one transaction under an advisory lock,
//! so that replicas starting together take turns and a failure leaves the schema as it was.

use anyhow::Context as _;
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, IntoDatabaseExecutor as _, TransactionTrait as _,
};

use crate::domain::{Domain, Migrations};

/// Any fixed number: the PostgreSQL advisory lock that keel's migrations take.
const MIGRATION_LOCK: i64 = 0x006b_6565_6c6d_6967; // "keelmig" in ASCII

/// Applies the job queue's migrations (every service may write jobs), then those of `domains`.
/// On PostgreSQL they run in one transaction that first
/// takes an advisory lock, so that processes starting together (the replicas of a Deployment)
/// take turns: the first applies them, the others find them applied; and a failure leaves the
/// schema as it was. On the embedded SQLite, processes sharing a data dir should not start
/// together on a fresh file: `keel migrate` first (the README's multi-process walkthrough does).
///
/// Answers how many migrations it applied (none when the schema was up to date).
pub async fn migrate(db: &DatabaseConnection, domains: &[&Domain]) -> anyhow::Result<usize> {
    let queue = crate::domain::Migrator::<keel_queue::Migrator>::new();
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        let mut applied = apply("the job queue", &queue, db.into_database_executor()).await?;
        for domain in domains {
            applied += apply(domain.name, domain.migrations, db.into_database_executor()).await?;
        }
        return Ok(applied);
    }
    let transaction = db.begin().await.context("begin the migrations")?;
    transaction
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        .await
        .context("take the migration lock")?;
    let mut applied = apply(
        "the job queue",
        &queue,
        (&transaction).into_database_executor(),
    )
    .await?;
    for domain in domains {
        let executor = (&transaction).into_database_executor();
        applied += apply(domain.name, domain.migrations, executor).await?;
    }
    transaction
        .commit()
        .await
        .context("commit the migrations")?;
    Ok(applied)
}

async fn apply(
    name: &str,
    migrations: &dyn Migrations,
    db: sea_orm::DatabaseExecutor<'_>,
) -> anyhow::Result<usize> {
    migrations
        .apply(db)
        .await
        .with_context(|| format!("migrate {name}"))
}
