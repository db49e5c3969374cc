//! `keel worker` processes beside a keel, on both store pairs: a worker killed (SIGKILL) between
//! ReserveStock and Charge leaves an order that another worker completes exactly once; a job
//! whose worker dies mid-run is taken up after its lease; a kind's limit holds across two
//! worker processes, as the attempts' own start and finish times show; and `keel dev`,
//! `keel serve catalog` and `keel worker` start and serve while Redis is down, degraded, and
//! take it up once it answers.

use crate::support;

use std::time::Duration;

use keel::proto::keel::catalog::v1::GetProductRequest;
use keel::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient;
use keel::proto::keel::jobs::v1::job;
use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use keel::proto::keel::orders::v1::{LineItem, Order, PlaceOrderRequest, order};
use keel::proto::keel::payments::v1::payment_service_client::PaymentServiceClient;
use keel::proto::keel::payments::v1::{ListTransactionsRequest, TopUpWalletRequest, transaction};
use sea_orm::{ConnectionTrait as _, Statement};
use support::process::{Fleet, KeelProcess, WorkerProcess, peers_at, register_over_rest};
use support::{authed, create_product, eur};

async fn a_worker_killed_between_reserve_and_charge_leaves_an_order_completed_once(postgres: bool) {
    let setup = Fleet::start(postgres, &[]).await;
    let channel = setup.keel.channel().await;
    let admin = &setup.admin;
    let lamp = create_product(channel.clone(), admin, "Lamp", 1500, 10)
        .await
        .name;
    PaymentServiceClient::new(channel.clone())
        .top_up_wallet(authed(
            TopUpWalletRequest {
                name: "users/me/wallet".into(),
                amount: eur(10_000),
                request_id: uuid::Uuid::new_v4().to_string(),
            },
            &setup.ada,
        ))
        .await
        .unwrap();
    let mut doomed = setup
        .worker(&[("KEEL_FAULT_POINTS", "order.after_reserve")])
        .await;
    let placed = OrderServiceClient::new(channel.clone())
        .place_order(authed(
            PlaceOrderRequest {
                parent: "users/me".into(),
                order: Some(Order {
                    line_items: vec![LineItem {
                        product: lamp.clone(),
                        quantity: 3,
                        unit_price: None,
                    }],
                    ..Default::default()
                }),
                request_id: uuid::Uuid::new_v4().to_string(),
            },
            &setup.ada,
        ))
        .await
        .unwrap()
        .into_inner();
    let status = doomed.exited().await;
    assert!(!status.success(), "killed at the fault point: {status:?}");
    let halfway = setup.order_of(&placed.name, &setup.ada).await;
    assert_eq!(halfway.state(), order::State::Pending);
    assert_eq!(halfway.history.len(), 2, "placed and reserved: {halfway:?}");

    let _survivor = setup.worker(&[]).await;
    let confirmed = keel_testkit::eventually(
        Duration::from_secs(60),
        "another worker to complete the order",
        || async {
            let order = setup.order_of(&placed.name, &setup.ada).await;
            (order.state() == order::State::Confirmed).then_some(order)
        },
    )
    .await;
    let stock = CatalogServiceClient::new(channel.clone())
        .get_product(GetProductRequest { name: lamp })
        .await
        .unwrap()
        .into_inner()
        .stock;
    assert_eq!(stock, 7, "the stock moved once");
    let charges = PaymentServiceClient::new(channel)
        .list_transactions(authed(
            ListTransactionsRequest {
                parent: "users/me/wallet".into(),
                ..Default::default()
            },
            &setup.ada,
        ))
        .await
        .unwrap()
        .into_inner()
        .transactions
        .into_iter()
        .filter(|t| t.kind() == transaction::Kind::Charge)
        .count();
    assert_eq!(charges, 1, "charged once");
    let id = confirmed.name.rsplit('/').next().unwrap().to_owned();
    let outbox = keel::mail::outbox(setup.keel.data_dir.path());
    keel_testkit::eventually(Duration::from_secs(30), "the confirmation", || {
        let (outbox, id) = (outbox.clone(), id.clone());
        async move {
            let confirmations = std::fs::read_dir(&outbox)
                .ok()?
                .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .filter(|text| text.contains(&id))
                .count();
            (confirmations == 1).then_some(())
        }
    })
    .await;
}

async fn a_job_whose_worker_dies_mid_run_is_taken_up_after_its_lease(postgres: bool) {
    let setup = Fleet::start(postgres, &[]).await;
    let mut first = setup.worker(&[]).await;
    let slow = setup
        .job("noop", serde_json::json!({"sleep_ms": 3000}))
        .await;
    setup.until_job(&slow.name, job::State::Running).await;
    first.child.start_kill().unwrap();
    first.exited().await;
    let _second = setup.worker(&[]).await;
    let done = setup.until_job(&slow.name, job::State::Succeeded).await;
    assert_eq!(
        done.attempts, 2,
        "the dead worker's attempt counts, and a second one ran"
    );
}

async fn a_kinds_limit_holds_across_two_worker_processes(postgres: bool) {
    let setup = Fleet::start(postgres, &[]).await;
    let limited = [
        ("KEEL_JOB_LIMITS", "noop=2"),
        ("KEEL_WORKER_CONCURRENCY", "4"),
    ];
    let _workers = [setup.worker(&limited).await, setup.worker(&limited).await];
    let mut names = Vec::new();
    for _ in 0..12 {
        names.push(
            setup
                .job("noop", serde_json::json!({"sleep_ms": 250}))
                .await
                .name,
        );
    }
    for name in &names {
        setup.until_job(name, job::State::Succeeded).await;
    }
    // Each attempt's start and finish, as the workers recorded them: never more than two at once.
    let db = setup.db().await;
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT started_at, finished_at FROM queue_jobs WHERE kind = 'noop'",
        ))
        .await
        .unwrap();
    let mut edges = Vec::new();
    for row in rows {
        let started: i64 = row.try_get("", "started_at").unwrap();
        let finished: i64 = row.try_get("", "finished_at").unwrap();
        edges.push((started, 1));
        edges.push((finished, -1));
    }
    // At equal times a finish comes before a start: the slot was free again.
    edges.sort();
    let (mut running, mut most) = (0, 0);
    for (_, change) in edges {
        running += change;
        most = most.max(running);
    }
    assert_eq!(most, 2, "two at once at most, and the limit was used");
}

macro_rules! on_both_store_pairs {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$scenario(false).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_redis() {
                    super::$scenario(true).await;
                }
            }
        )*
    };
}

on_both_store_pairs!(
    a_worker_killed_between_reserve_and_charge_leaves_an_order_completed_once,
    a_job_whose_worker_dies_mid_run_is_taken_up_after_its_lease,
    a_kinds_limit_holds_across_two_worker_processes,
);

/// `/readyz` of the admin port at `admin`: status and body.
async fn readiness(admin: std::net::SocketAddr) -> (u16, String) {
    keel_testkit::http::get(&format!("http://{admin}/readyz"))
        .await
        .expect("GET /readyz")
}

/// Calls of `command` the Redis at `url` has served (`INFO commandstats`).
async fn redis_calls(url: &str, command: &str) -> u64 {
    use fred::prelude::{ClientLike as _, Config};
    use fred::types::{ClusterHash, CustomCommand};
    let client = fred::prelude::Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let info = CustomCommand::new_static("INFO", ClusterHash::FirstKey, false);
    let info: String = client.custom(info, vec!["commandstats"]).await.unwrap();
    let _ = client.quit().await;
    let stat = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&stat)?.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_start_and_serve_while_redis_is_down_and_take_it_up_when_it_answers() {
    use keel::proto::keel::catalog::v1::Product;
    let port = keel_testkit::free_port();
    let redis_url = format!("redis://127.0.0.1:{port}");
    let database = keel_testkit::fresh_database().await;
    let mut env = vec![
        ("KEEL_DATABASE_URL".to_owned(), database),
        ("KEEL_REDIS_URL".to_owned(), redis_url.clone()),
        ("KEEL_REDIS_PREFIX".to_owned(), "away:".to_owned()),
        ("KEEL_HEALTH_PROBE_INTERVAL".to_owned(), "100ms".to_owned()),
    ];
    let dev = [
        "dev",
        "--worker-concurrency",
        "0",
        "--auth-rate-limit",
        "off",
    ];
    let keel = KeelProcess::start_with_env(&dev, &env).await;
    env.extend(peers_at(keel.grpc_addr()));
    let catalog = KeelProcess::start_with_env(&["serve", "catalog"], &env).await;
    env.push(("KEEL_JOB_POLL".into(), "20ms".into()));
    let worker = WorkerProcess::start(keel.data_dir.path(), &env).await;
    for admin in [keel.admin_addr, catalog.admin_addr, worker.admin_addr] {
        let degraded = (200, "ready, degraded: without redis\n".to_owned());
        keel_testkit::eventually(Duration::from_secs(10), "a degraded readiness", || async {
            (readiness(admin).await == degraded).then_some(())
        })
        .await;
    }
    assert_eq!(worker.metric("keel_redis_up").await, 0.0);

    // Served without Redis: a product written and read through `keel serve catalog`, a job
    // run by `keel worker` from the table.
    let admin = register_over_rest(keel.http_addr, "admin@example.com").await;
    let lamp = create_product(catalog.channel().await, &admin, "Lamp", 1500, 3).await;
    let read = |name: String| async {
        CatalogServiceClient::new(catalog.channel().await)
            .get_product(GetProductRequest { name })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(read(lamp.name.clone()).await.stock, 3);
    let fleet = Fleet::alongside(keel, admin);
    let away = fleet.job("noop", serde_json::json!({})).await;
    fleet.until_job(&away.name, job::State::Succeeded).await;

    let redis = keel_testkit::Redis::dedicated_at(port).await;
    for admin in [fleet.keel.admin_addr, catalog.admin_addr, worker.admin_addr] {
        keel_testkit::eventually(Duration::from_secs(30), "Redis to be taken up", || async {
            (readiness(admin).await == (200, "ready\n".to_owned())).then_some(())
        })
        .await;
    }
    assert_eq!(worker.metric("keel_redis_up").await, 1.0);
    // Reads are cached in it, and jobs reach the worker through its streams.
    let _: Product = read(lamp.name.clone()).await;
    let cached = keel_testkit::eventually(Duration::from_secs(10), "a cache fill", || async {
        let gets = redis_calls(&redis.url, "get").await;
        let _ = read(lamp.name.clone()).await;
        (gets > 0).then_some(gets)
    })
    .await;
    assert!(cached > 0);
    let streamed = fleet.job("noop", serde_json::json!({})).await;
    fleet.until_job(&streamed.name, job::State::Succeeded).await;
    keel_testkit::eventually(Duration::from_secs(30), "jobs through streams", || async {
        let handed = redis_calls(&redis.url, "xadd").await;
        let read = redis_calls(&redis.url, "xreadgroup").await;
        (handed > 0 && read > 0).then_some(())
    })
    .await;
    drop(worker);
}
