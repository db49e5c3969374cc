//! Applying the services' migrations: on PostgreSQL in one transaction under an advisory lock,
//! so that replicas starting together take turns and a failure leaves the schema as it was.

use anyhow::Context as _;
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, IntoDatabaseExecutor as _, TransactionTrait as _,
};

use crate::domain::Domain;

/// Any fixed number: the PostgreSQL advisory lock that keel's migrations take.
const MIGRATION_LOCK: i64 = 0x006b_6565_6c6d_6967; // "keelmig" in ASCII

/// Applies the job queue's migrations (every service may write jobs), then those of `domains`.
/// On PostgreSQL they run in one transaction that first
/// takes an advisory lock, so that processes starting together (the replicas of a Deployment)
/// take turns: the first applies them, the others find them applied; and a failure leaves the
/// schema as it was. On the embedded SQLite, processes sharing a data dir should not start
/// together on a fresh file: `keel migrate` first (the README's multi-process walkthrough does).
pub async fn migrate(db: &DatabaseConnection, domains: &[&Domain]) -> anyhow::Result<()> {
    use sea_orm_migration::MigratorTrait as _;
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        keel_queue::Migrator::up(db, None)
            .await
            .context("migrate the job queue")?;
        for domain in domains {
            apply(domain, db.into_database_executor()).await?;
        }
        return Ok(());
    }
    let transaction = db.begin().await.context("begin the migrations")?;
    transaction
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        .await
        .context("take the migration lock")?;
    keel_queue::Migrator::up(&transaction, None)
        .await
        .context("migrate the job queue")?;
    for domain in domains {
        apply(domain, (&transaction).into_database_executor()).await?;
    }
    transaction.commit().await.context("commit the migrations")
}

async fn apply(domain: &Domain, db: sea_orm::DatabaseExecutor<'_>) -> anyhow::Result<()> {
    domain
        .migrations
        .apply(db)
        .await
        .with_context(|| format!("migrate {}", domain.name))
}
