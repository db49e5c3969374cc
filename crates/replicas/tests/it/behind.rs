//! A replica that comes back behind what it had replayed (restarted from an older state, or its
//! URL now reaching another standby) is not read until the watch has looked again: the reads
//! that look chose it for would miss writes it had.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_replicas::{ConsistencyLayer, Floors, Lsn, Reads, ReplicaSettings};
use keel_testkit::Postgres;
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, DbErr, Statement};
use tower::{Layer as _, ServiceExt as _};

/// A TCP forwarder to whichever address `to` holds when a connection arrives.
async fn forwarder(to: Arc<Mutex<String>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = to.lock().unwrap().clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    address
}

fn address(server: &Postgres) -> String {
    server
        .base_url
        .trim_start_matches("postgres://postgres@")
        .to_owned()
}

async fn text(db: &DatabaseConnection, sql: &str) -> String {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<String>("", "v").unwrap()
}

async fn notes(db: &DatabaseConnection) -> Result<i64, DbErr> {
    let sql = "SELECT count(*) AS n FROM notes";
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?
        .expect("a count");
    row.try_get::<i64>("", "n")
}

async fn replica(primary: &Postgres, delay: Option<Duration>) -> Postgres {
    let primary = primary.clone();
    tokio::task::spawn_blocking(move || primary.replica(std::process::id(), delay))
        .await
        .unwrap()
        .expect("a replica")
}

/// Whether the replica at `name` is in service, by the registry's gauge.
fn in_service(registry: &prometheus::Registry, name: &str) -> bool {
    registry.gather().iter().any(|family| {
        family.name() == "keel_db_replica_up"
            && family.get_metric().iter().any(|m| {
                m.get_label().iter().any(|l| l.value() == name) && m.get_gauge().get_value() == 1.0
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_comes_back_behind_what_it_had_replayed_is_not_read() {
    let (primary, url) = Postgres::dedicated().await;
    let db = Database::connect(&url).await.unwrap();
    db.execute_unprepared("CREATE TABLE notes (id int PRIMARY KEY)")
        .await
        .unwrap();
    // Cloned before the note and applying nothing for ten minutes: it never has the note.
    let behind = replica(&primary, Some(Duration::from_secs(600))).await;
    db.execute_unprepared("INSERT INTO notes VALUES (1)")
        .await
        .unwrap();
    let current = replica(&primary, None).await;
    let to = Arc::new(Mutex::new(address(&current)));
    let through = forwarder(to.clone()).await;
    let current_db = Database::connect(format!("{}/postgres", current.base_url))
        .await
        .unwrap();

    // The watch looks once (then not for an hour), when the replica has everything.
    let settings = ReplicaSettings {
        interval: Duration::from_secs(3600),
        max_lag: Duration::from_secs(3600),
        read_timeout: Duration::from_secs(1),
        max_connections: 4,
    };
    let mut attempts = 0;
    let (reads, registry) = loop {
        attempts += 1;
        assert!(attempts <= 5, "the replica never came into service");
        keel_testkit::eventually(Duration::from_secs(30), "the replica caught up", || async {
            let head = text(&db, "SELECT pg_current_wal_insert_lsn()::text AS v").await;
            let replayed = text(&current_db, "SELECT pg_last_wal_replay_lsn()::text AS v").await;
            let head = head.parse::<Lsn>().unwrap().settled();
            (replayed.parse::<Lsn>().unwrap() >= head).then_some(())
        })
        .await;
        let registry = prometheus::Registry::new();
        let urls = [format!("postgres://postgres@{through}/postgres")];
        let reads = Reads::with_replicas(db.clone(), &urls, Floors::local(), settings, &registry)
            .await
            .unwrap();
        // The first look comes at once; one that found the replica a record behind leaves it
        // out for the hour, and the test starts again.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline && !in_service(&registry, &through) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if in_service(&registry, &through) {
            break (reads, registry);
        }
    };

    // A call's read, as the layer scopes it: no session, no token, so any replica in service.
    let read = |reads: Reads| {
        let layer = ConsistencyLayer::new(reads.clone(), Vec::<String>::new(), |_| None);
        let service = tower::service_fn(move |_: http::Request<()>| {
            let reads = reads.clone();
            async move {
                let counted = reads.read(|db| Box::pin(notes(db))).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Some(counted)))
            }
        });
        async move {
            let response = layer.layer(service).oneshot(http::Request::new(())).await;
            response
                .unwrap()
                .into_body()
                .expect("an answer")
                .expect("a count")
        }
    };
    assert_eq!(
        read(reads.clone()).await,
        1,
        "read on the replica, which has the note"
    );

    // The URL now reaches a standby without the note, and the old server is gone.
    *to.lock().unwrap() = address(&behind);
    current.kill();
    assert_eq!(read(reads.clone()).await, 1, "the primary answers instead");
    assert!(
        !in_service(&registry, &through),
        "out until the watch looks again"
    );
}
