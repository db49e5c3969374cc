//! `keel worker` processes beside a keel, on both store pairs: a worker killed (SIGKILL) between
//! ReserveStock and Charge leaves an order that another worker completes exactly once; a job
//! whose worker dies mid-run is taken up after its lease; a kind's limit holds across two
//! worker processes, as the attempts' own start and finish times show.

mod support;

use std::time::Duration;

use keel::proto::keel::catalog::v1::GetProductRequest;
use keel::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient;
use keel::proto::keel::jobs::v1::job_service_client::JobServiceClient;
use keel::proto::keel::jobs::v1::{CreateJobRequest, GetJobRequest, Job, job};
use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use keel::proto::keel::orders::v1::{GetOrderRequest, LineItem, Order, PlaceOrderRequest, order};
use keel::proto::keel::payments::v1::payment_service_client::PaymentServiceClient;
use keel::proto::keel::payments::v1::{ListTransactionsRequest, TopUpWalletRequest, transaction};
use sea_orm::{ConnectionTrait as _, Database, Statement};
use support::process::{KeelProcess, WorkerProcess, peers_at, register_over_rest, shared_stores};
use support::{authed, create_product, eur};

/// A keel that runs no worker of its own, over PostgreSQL and Redis or over the embedded stores.
struct Setup {
    keel: KeelProcess,
    stores: Vec<(String, String)>,
    admin: String,
    ada: String,
}

impl Setup {
    async fn start(postgres: bool) -> Self {
        let stores = if postgres {
            shared_stores().await
        } else {
            Vec::new()
        };
        let keel = KeelProcess::start_with_env(
            &[
                "dev",
                "--worker-concurrency",
                "0",
                "--auth-rate-limit",
                "off",
                "--rate-limit",
                "off",
            ],
            &stores,
        )
        .await;
        let admin = register_over_rest(keel.http_addr, "admin@example.com").await;
        let ada = register_over_rest(keel.http_addr, "ada@example.com").await;
        Self {
            keel,
            stores,
            admin,
            ada,
        }
    }

    /// A `keel worker` over the same stores and data dir, reaching the keel's services, with
    /// short leases and `extra` settings.
    async fn worker(&self, extra: &[(&str, &str)]) -> WorkerProcess {
        let mut env = self.stores.clone();
        env.extend(peers_at(self.keel.grpc_addr()));
        env.push(("KEEL_JOB_LEASE".into(), "1s".into()));
        env.push(("KEEL_JOB_POLL".into(), "20ms".into()));
        env.push(("KEEL_JOB_BACKOFF".into(), "100ms".into()));
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        WorkerProcess::start(self.keel.data_dir.path(), &env).await
    }

    /// The database both share.
    async fn db(&self) -> sea_orm::DatabaseConnection {
        let url = match self.stores.iter().find(|(k, _)| k == "KEEL_DATABASE_URL") {
            Some((_, url)) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rw",
                self.keel.data_dir.path().join("keel.db").display()
            ),
        };
        Database::connect(url).await.unwrap()
    }

    async fn job(&self, kind: &str, payload: serde_json::Value) -> Job {
        JobServiceClient::new(self.keel.channel().await)
            .create_job(authed(
                CreateJobRequest {
                    job: Some(Job {
                        r#type: kind.into(),
                        payload: Some(keel::proto::json_to_struct(&payload)),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn until_job(&self, name: &str, state: job::State) -> Job {
        let client = JobServiceClient::new(self.keel.channel().await);
        keel_testkit::eventually(Duration::from_secs(60), "the job's state", || {
            let (mut client, name) = (client.clone(), name.to_owned());
            async move {
                let found = client
                    .get_job(authed(GetJobRequest { name }, &self.admin))
                    .await
                    .unwrap()
                    .into_inner();
                (found.state() == state).then_some(found)
            }
        })
        .await
    }

    async fn order(&self, name: &str) -> Order {
        OrderServiceClient::new(self.keel.channel().await)
            .get_order(authed(GetOrderRequest { name: name.into() }, &self.ada))
            .await
            .unwrap()
            .into_inner()
    }
}

async fn a_worker_killed_between_reserve_and_charge_leaves_an_order_completed_once(postgres: bool) {
    let setup = Setup::start(postgres).await;
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
    let halfway = setup.order(&placed.name).await;
    assert_eq!(halfway.state(), order::State::Pending);
    assert_eq!(halfway.history.len(), 2, "placed and reserved: {halfway:?}");

    let _survivor = setup.worker(&[]).await;
    let confirmed = keel_testkit::eventually(
        Duration::from_secs(60),
        "another worker to complete the order",
        || async {
            let order = setup.order(&placed.name).await;
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
    let setup = Setup::start(postgres).await;
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
    let setup = Setup::start(postgres).await;
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
