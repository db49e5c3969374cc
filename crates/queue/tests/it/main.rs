//! keel-queue's integration tests, one binary: each module is what one file of tests/ used to
//! be. Each test binary links the dependency graph again; one a crate keeps a cold build short.

use sea_orm::{Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait as _;

/// A fresh, migrated database: SQLite in a temp dir (kept alive by the returned guard) or a
/// PostgreSQL database of the test kit.
async fn database(postgres: bool) -> (DatabaseConnection, Option<tempfile::TempDir>) {
    let (url, dir) = if postgres {
        (keel_testkit::fresh_database().await, None)
    } else {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("q.db").display());
        (url, Some(dir))
    };
    let db = Database::connect(&url).await.unwrap();
    keel_queue::Migrator::up(&db, None).await.unwrap();
    (db, dir)
}

/// Each scenario, a function of a fresh database, as two tests: on SQLite and on PostgreSQL.
macro_rules! on_both_databases {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let (db, _dir) = crate::database(false).await;
                    super::$scenario(db).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let (db, _dir) = crate::database(true).await;
                    super::$scenario(db).await;
                }
            }
        )*
    };
}

mod fencing;
mod queue;
