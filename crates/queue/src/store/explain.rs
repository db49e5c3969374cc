//! What PostgreSQL plans for the queue's statements, for the tests that keep them reading only
//! what they need.

use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement, Value};
use sea_orm_migration::MigratorTrait as _;

/// A fresh, migrated PostgreSQL database of the test kit.
pub async fn database() -> DatabaseConnection {
    let url = keel_testkit::fresh_database().await;
    let db = sea_orm::Database::connect(&url).await.unwrap();
    crate::Migrator::up(&db, None).await.unwrap();
    db
}

/// `sql` with `values` as PostgreSQL would run it in `db` (its statistics fresh), one line per
/// plan node.
pub async fn plan(db: &DatabaseConnection, sql: &str, values: Vec<Value>) -> String {
    db.execute_unprepared("ANALYZE queue_jobs, queue_listing")
        .await
        .unwrap();
    plan_as_analyzed(db, sql, values).await
}

/// [`plan`] on the statistics `db` has, however old.
pub async fn plan_as_analyzed(db: &DatabaseConnection, sql: &str, values: Vec<Value>) -> String {
    let explain =
        Statement::from_sql_and_values(DbBackend::Postgres, format!("EXPLAIN {sql}"), values);
    let plan: Vec<String> = db
        .query_all_raw(explain)
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get("", "QUERY PLAN").unwrap())
        .collect();
    plan.join("\n")
}
