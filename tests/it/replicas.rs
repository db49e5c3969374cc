//! PostgreSQL read replicas: a caller reads its own writes at once while the replica lags (over
//! gRPC and REST), another caller reads the replica unless it sends the writer's consistency
//! token, and reads leave a replica that stops answering or dies, without a failed call, and
//! come back to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use keel::proto::keel::catalog::v1::{
    GetProductRequest, ListProductsRequest, Product, UpdateProductRequest,
};
use keel::proto::keel::payments::v1::{GetWalletRequest, TopUpWalletRequest};
use keel::proto::keel::todos::v1::{CreateTodoRequest, ListTodosRequest, Todo};
use keel_testkit::{Postgres, eventually};
use reqwest::Method;
use serde_json::json;

use crate::support::{Stores, TestApp, authed, eur};

const TOKEN: &str = "keel-consistency-token";

/// How late the lagging replica applies each commit: longer than the test's steps between a
/// write and the reads that must find the replica without it, on a loaded machine.
const LAG: Duration = Duration::from_secs(5);

/// keel over a PostgreSQL of its own and a streaming replica of it that applies each commit
/// `delay` late; returns the app and the replica.
async fn over_a_replica(delay: Option<Duration>) -> (TestApp, Postgres, Postgres) {
    let (primary, url) = Postgres::dedicated().await;
    let replica = {
        let primary = primary.clone();
        tokio::task::spawn_blocking(move || primary.replica(std::process::id(), delay))
            .await
            .expect("start the replica")
            .expect("a replica")
    };
    let replica_url = format!("{}/postgres", replica.base_url);
    let app = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.stores.database_url = Some(url);
        s.stores.database_read_urls = vec![replica_url];
        // Far from the replica's lag: it stays in service throughout.
        s.stores.database_read_max_lag = Duration::from_secs(60);
    })
    .await;
    in_service(&app, &replica, true).await;
    (app, primary, replica)
}

/// Waits until the app has `replica` in service (`true`) or out of it.
async fn in_service(app: &TestApp, replica: &Postgres, up: bool) {
    let address = replica.base_url.trim_start_matches("postgres://postgres@");
    let series = format!("keel_db_replica_up{{replica=\"{address}\"}}");
    let want = if up { 1.0 } else { 0.0 };
    eventually(Duration::from_secs(30), "the replica's state", || {
        let series = series.clone();
        async move { (app.metric(&series).await == want).then_some(()) }
    })
    .await;
}

async fn reads(app: &TestApp, target: &str, reason: &str) -> f64 {
    app.metric(&format!(
        "keel_db_reads_total{{reason=\"{reason}\",target=\"{target}\"}}"
    ))
    .await
}

async fn reads_on_primary(app: &TestApp) -> f64 {
    let metrics = app.metrics().await;
    metrics
        .lines()
        .filter(|l| l.starts_with("keel_db_reads_total{") && l.contains("target=\"primary\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn price_update(name: &str, units: i64) -> UpdateProductRequest {
    UpdateProductRequest {
        product: Some(Product {
            name: name.into(),
            price: eur(units),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["price".into()],
        }),
    }
}

fn everything() -> ListProductsRequest {
    ListProductsRequest {
        page_size: 100,
        ..Default::default()
    }
}

fn price_in(list: &[Product], name: &str) -> i64 {
    let product = list.iter().find(|p| p.name == name).expect("listed");
    product.price.as_ref().expect("a price").units
}

/// A REST call with `headers`; the status, the JSON body and the consistency token it answered.
async fn rest(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    consistency: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value, Option<String>) {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", app.rest_base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(consistency) = consistency {
        request = request.header("Grpc-Metadata-Keel-Consistency-Token", consistency);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("REST call");
    let status = response.status().as_u16();
    let answered = response
        .headers()
        .get("grpc-metadata-keel-consistency-token")
        .map(|v| v.to_str().expect("ASCII").to_owned());
    let json = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, json, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_reads_its_writes_at_once_while_the_replica_lags() {
    let (app, _primary, _replica) = over_a_replica(Some(LAG)).await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 2500, 7).await;
    let mut catalog = app.catalog().await;
    let mut payments = app.payments().await;
    let mut todos = app.todos().await;
    // The lagging replica has the product before it changes.
    eventually(
        Duration::from_secs(30),
        "the product on the replica",
        || {
            let mut catalog = catalog.clone();
            let name = lamp.name.clone();
            async move {
                let listed = catalog.list_products(everything()).await.ok()?.into_inner();
                listed.products.iter().any(|p| p.name == name).then_some(())
            }
        },
    )
    .await;

    // gRPC: the admin changes a price and lists the catalog at once: the new price.
    let update = catalog
        .update_product(authed(price_update(&lamp.name, 3000), &people.admin))
        .await
        .expect("the update");
    let token = update
        .metadata()
        .get(TOKEN)
        .expect("a consistency token")
        .clone();
    let answered = update.into_inner().price.unwrap().units;
    assert_eq!(
        answered, 3000,
        "a write answers what it wrote, read from the primary"
    );
    let listed = catalog
        .list_products(authed(everything(), &people.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        price_in(&listed.products, &lamp.name),
        3000,
        "the writer's own write"
    );

    // Anyone else reads the replica, behind by LAG: the old price, unless they send the
    // writer's token.
    let before = reads(&app, "replica", "ok").await;
    let anonymous = catalog
        .list_products(everything())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        price_in(&anonymous.products, &lamp.name),
        2500,
        "another caller may lag"
    );
    assert!(
        reads(&app, "replica", "ok").await > before,
        "read on the replica"
    );
    let mut with_token = tonic::Request::new(everything());
    with_token.metadata_mut().insert(TOKEN, token);
    let causal = catalog
        .list_products(with_token)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        price_in(&causal.products, &lamp.name),
        3000,
        "the token's write"
    );

    // The cache is filled from the primary, whoever misses first: a value from the lagging
    // replica would be served to the writer too.
    let get = || GetProductRequest {
        name: lamp.name.clone(),
    };
    let first = catalog.get_product(get()).await.unwrap().into_inner();
    let writers = catalog
        .get_product(authed(get(), &people.admin))
        .await
        .unwrap();
    assert_eq!(
        (
            first.price.unwrap().units,
            writers.into_inner().price.unwrap().units
        ),
        (3000, 3000)
    );

    // A wallet topped up and read at once, and a todo written and listed at once.
    let topped = payments
        .top_up_wallet(authed(
            TopUpWalletRequest {
                name: "users/me/wallet".into(),
                amount: eur(1500),
                request_id: uuid::Uuid::new_v4().to_string(),
            },
            &people.ada,
        ))
        .await;
    let topped = topped.expect("the top-up").into_inner();
    assert_eq!(
        topped.wallet.unwrap().balance.unwrap().units,
        1500,
        "as written"
    );
    let wallet = GetWalletRequest {
        name: "users/me/wallet".into(),
    };
    let wallet = payments
        .get_wallet(authed(wallet, &people.ada))
        .await
        .unwrap();
    assert_eq!(wallet.into_inner().balance.unwrap().units, 1500);
    for title in ["first", "second"] {
        let create = CreateTodoRequest {
            parent: "users/me".into(),
            todo: Some(Todo {
                title: title.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        };
        todos
            .create_todo(authed(create, &people.ada))
            .await
            .unwrap();
    }
    let page = ListTodosRequest {
        parent: "users/me".into(),
        page_size: 1,
        ..Default::default()
    };
    let first = todos
        .list_todos(authed(page.clone(), &people.ada))
        .await
        .unwrap();
    let next = ListTodosRequest {
        page_token: first.into_inner().next_page_token,
        ..page
    };
    let second = todos.list_todos(authed(next, &people.ada)).await.unwrap();
    assert_eq!(
        second.into_inner().todos[0].title,
        "first",
        "an uncached page, at once"
    );

    // REST: the same through the gateway, the token in `Grpc-Metadata-*`.
    let path = format!("/v1/{}", lamp.name);
    let body = json!({"price": {"currencyCode": "EUR", "units": "3500"}});
    let (status, _, token) = rest(
        &app,
        Method::PATCH,
        &format!("{path}?updateMask=price"),
        Some(&people.admin),
        None,
        Some(body),
    )
    .await;
    assert_eq!(status, 200);
    let token = token.expect("a consistency token over REST");
    let price_of = |list: &serde_json::Value| {
        list["products"]
            .as_array()
            .expect("products")
            .iter()
            .find(|p| p["name"] == lamp.name.as_str())
            .map(|p| p["price"]["units"].clone())
    };
    let (_, mine, _) = rest(
        &app,
        Method::GET,
        "/v1/products",
        Some(&people.admin),
        None,
        None,
    )
    .await;
    assert_eq!(price_of(&mine), Some(json!("3500")));
    let (_, theirs, _) = rest(&app, Method::GET, "/v1/products", None, None, None).await;
    assert_eq!(
        price_of(&theirs),
        Some(json!("2500")),
        "another caller may lag"
    );
    let (_, causal, _) = rest(&app, Method::GET, "/v1/products", None, Some(&token), None).await;
    assert_eq!(price_of(&causal), Some(json!("3500")));
    let top_up = json!({"amount": {"currencyCode": "EUR", "units": "500"}, "requestId": uuid::Uuid::new_v4().to_string()});
    let wallet = "/v1/users/me/wallet";
    let (status, _, _) = rest(
        &app,
        Method::POST,
        &format!("{wallet}:topUp"),
        Some(&people.ada),
        None,
        Some(top_up),
    )
    .await;
    assert_eq!(status, 200);
    let (_, read, _) = rest(&app, Method::GET, wallet, Some(&people.ada), None, None).await;
    assert_eq!(read["balance"]["units"], json!("2000"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_the_saga_makes_on_a_wallet_is_seen_by_its_owner_at_once() {
    use keel::proto::keel::payments::v1::ChargeRequest;
    let (app, _primary, _replica) = over_a_replica(Some(LAG)).await;
    let people = app.people().await;
    let ada = app.user_name(&people.ada).await;
    let wallet = format!("{ada}/wallet");
    let mut payments = app.payments().await;
    let top_up = TopUpWalletRequest {
        name: wallet.clone(),
        amount: eur(1500),
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    payments
        .top_up_wallet(authed(top_up, &people.admin))
        .await
        .expect("an admin's top-up");
    let balance = || {
        let mut payments = payments.clone();
        let token = people.ada.clone();
        async move {
            let read = GetWalletRequest {
                name: "users/me/wallet".into(),
            };
            let wallet = payments.get_wallet(authed(read, &token)).await.unwrap();
            wallet.into_inner().balance.unwrap().units
        }
    };
    assert_eq!(
        balance().await,
        1500,
        "the owner sees an admin's top-up at once"
    );
    // Once the replica has the top-up, the owner's reads go to it.
    eventually(
        Duration::from_secs(30),
        "the top-up read on the replica",
        || async {
            let before = reads(&app, "replica", "ok").await;
            let read = balance().await;
            (read == 1500 && reads(&app, "replica", "ok").await > before).then_some(())
        },
    )
    .await;

    let charge = ChargeRequest {
        payment_id: uuid::Uuid::new_v4().to_string(),
        wallet,
        amount: eur(400),
        reference: "orders/1".into(),
    };
    let mut ledger = app.ledger().await;
    ledger
        .charge(authed(charge, &people.service))
        .await
        .expect("the saga's charge");
    assert_eq!(balance().await, 1100, "the owner sees the charge at once");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_leave_a_replica_that_stops_answering_or_dies_without_a_failed_call() {
    let (app, _primary, replica) = over_a_replica(None).await;
    let people = app.people().await;
    app.product(&people.admin, "Lamp", 2500, 7).await;
    let app = Arc::new(app);
    let (stop, failed, served) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (app, stop, failed, served) =
            (app.clone(), stop.clone(), failed.clone(), served.clone());
        readers.push(tokio::spawn(async move {
            let mut catalog = app.catalog().await;
            while !stop.load(Ordering::Relaxed) {
                match catalog.list_products(everything()).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let rising = |what: &'static str, now: f64| {
        let app = app.clone();
        async move {
            eventually(Duration::from_secs(30), what, || {
                let app = app.clone();
                async move {
                    let at = match what {
                        "replica" => reads(&app, "replica", "ok").await,
                        _ => reads_on_primary(&app).await,
                    };
                    (at > now + 20.0).then_some(())
                }
            })
            .await;
        }
    };
    rising("replica", reads(&app, "replica", "ok").await).await;

    replica.pause();
    in_service(&app, &replica, false).await;
    rising("primary", reads_on_primary(&app).await).await;

    replica.resume();
    in_service(&app, &replica, true).await;
    rising("replica", reads(&app, "replica", "ok").await).await;

    replica.kill();
    in_service(&app, &replica, false).await;
    rising("primary", reads_on_primary(&app).await).await;

    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no read failed");
    assert!(served.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistency_token_that_no_write_answered_is_invalid_over_grpc_and_rest() {
    let (app, _primary, _replica) = over_a_replica(None).await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 2500, 7).await;
    let mut catalog = app.catalog().await;
    for sent in ["12", "not-a-token-at-all", "zzzzzzzzzzzzzzzz"] {
        // A write with it is refused before it writes, over gRPC and REST.
        let mut write = authed(price_update(&lamp.name, 9900), &people.admin);
        write.metadata_mut().insert(TOKEN, sent.parse().unwrap());
        let status = catalog.update_product(write).await.expect_err(sent);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{sent}");
        let (code, body, answered) = rest(
            &app,
            Method::PATCH,
            &format!("/v1/{}?updateMask=price", lamp.name),
            Some(&people.admin),
            Some(sent),
            Some(json!({"price": {"currencyCode": "EUR", "units": "9900"}})),
        )
        .await;
        assert_eq!(code, 400, "{sent}: {body}");
        assert_eq!(answered, None, "no write, no token");
        // The admin's own read: from the primary, past any lag.
        let listed = catalog
            .list_products(authed(everything(), &people.admin))
            .await
            .unwrap();
        assert_eq!(
            price_in(&listed.into_inner().products, &lamp.name),
            2500,
            "nothing written"
        );

        let mut request = tonic::Request::new(everything());
        request.metadata_mut().insert(TOKEN, sent.parse().unwrap());
        let status = catalog.list_products(request).await.expect_err(sent);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{sent}");
        assert!(
            status.message().contains("keel-consistency-token"),
            "{status:?}"
        );
        let (code, body, _) = rest(&app, Method::GET, "/v1/products", None, Some(sent), None).await;
        assert_eq!(code, 400, "{sent}: {body}");
    }
    let mut request = tonic::Request::new(everything());
    request
        .metadata_mut()
        .insert(TOKEN, "0000000000000000".parse().unwrap());
    catalog
        .list_products(request)
        .await
        .expect("a token is read");
    app.stop().await;
}

#[test]
fn replicas_need_a_postgresql_primary_and_a_lag_bound_the_watch_can_tell() {
    use clap::Parser as _;
    use keel::config::ConfigError;
    let with = |args: &[&str]| {
        let argv = [&["keel"][..], args, &["dev"]].concat();
        keel::cli::Cli::try_parse_from(argv).unwrap().validate()
    };
    let replica = ["--database-read-urls", "postgres://replica/keel"];
    let primary = ["--database-url", "postgres://primary/keel"];
    assert!(matches!(
        with(&replica),
        Err(ConfigError::ReplicasWithoutPrimary)
    ));
    assert!(with(&[&primary[..], &replica].concat()).is_ok());
    // An empty list, as a compose file's `${KEEL_DATABASE_READ_URLS:-}` gives it, is none.
    assert!(with(&["--database-read-urls", ""]).is_ok());
    assert!(with(&["--database-read-urls", " , "]).is_ok());
    for lag in ["1s", "2h"] {
        let lag = ["--database-read-max-lag", lag];
        assert!(matches!(
            with(&[&primary[..], &replica, &lag].concat()),
            Err(ConfigError::ReplicaLag)
        ));
    }
}
