//! Orders on both store pairs: placed once whatever the retries, confirmed by the saga through
//! catalog and payments with its e-mail, or rejected with the reason and nothing moved; cancelled
//! with the money and the stock back; watched as they change; two hundred of them racing for
//! little stock without selling what is not there; a user never reaching the internal APIs or
//! another user's wallet; and Redis going away losing none.

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt as _;
use keel::proto::keel::catalog::v1::{ReleaseStockRequest, ReserveStockRequest, StockLine};
use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use keel::proto::keel::orders::v1::{
    CancelOrderRequest, GetOrderRequest, LineItem, Order, PlaceOrderRequest, order, saga_step,
};
use keel::proto::keel::payments::v1::{
    ChargeRequest, ListTransactionsRequest, TopUpWalletRequest, transaction,
};
use serde_json::{Value, json};
use support::{Stores, TestApp, authed, eur, expect_code};
use tonic::Code;

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn top_up(app: &TestApp, token: &str, units: i64) {
    app.payments()
        .await
        .top_up_wallet(authed(
            TopUpWalletRequest {
                name: "users/me/wallet".into(),
                amount: eur(units),
                request_id: uuid(),
            },
            token,
        ))
        .await
        .unwrap();
}

async fn orders(app: &TestApp) -> OrderServiceClient<tonic::transport::Channel> {
    OrderServiceClient::new(app.channel().await)
}

fn placing(lines: &[(&str, i64)], request_id: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        parent: "users/me".into(),
        order: Some(Order {
            line_items: lines
                .iter()
                .map(|(product, quantity)| LineItem {
                    product: (*product).into(),
                    quantity: *quantity,
                    unit_price: None,
                })
                .collect(),
            ..Default::default()
        }),
        request_id: request_id.into(),
    }
}

async fn place(app: &TestApp, token: &str, lines: &[(&str, i64)]) -> Order {
    orders(app)
        .await
        .place_order(authed(placing(lines, &uuid()), token))
        .await
        .unwrap()
        .into_inner()
}

/// Whether the saga is done with `order`: CONFIRMED, REJECTED or CANCELLED, and the last step
/// recorded is the one that ends its phase.
fn settled(order: &Order) -> bool {
    use saga_step::Action;
    let last = order.history.last().map(|s| s.action());
    match order.state() {
        order::State::Confirmed => last == Some(Action::Confirm),
        order::State::Rejected => last == Some(Action::Reject),
        order::State::Cancelled => true,
        _ => false,
    }
}

async fn until_settled(app: &TestApp, token: &str, name: &str) -> Order {
    let mut client = orders(app).await;
    keel_testkit::eventually(Duration::from_secs(60), "the order to settle", || {
        let (mut client, token, name) = (client.clone(), token.to_owned(), name.to_owned());
        async move {
            let order = client
                .get_order(authed(GetOrderRequest { name }, &token))
                .await
                .unwrap()
                .into_inner();
            settled(&order).then_some(order)
        }
    })
    .await;
    client
        .get_order(authed(GetOrderRequest { name: name.into() }, token))
        .await
        .unwrap()
        .into_inner()
}

/// Ada buys one lamp she can pay for; the order once confirmed.
async fn one_confirmed_order(app: &TestApp) -> Order {
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 100, 10).await.name;
    top_up(app, &people.ada, 1_000).await;
    let placed = place(app, &people.ada, &[(&lamp, 1)]).await;
    let order = until_settled(app, &people.ada, &placed.name).await;
    assert_eq!(order.state(), order::State::Confirmed, "{order:?}");
    order
}

async fn charges(app: &TestApp, token: &str) -> usize {
    app.payments()
        .await
        .list_transactions(authed(
            ListTransactionsRequest {
                parent: "users/me/wallet".into(),
                page_size: 1000,
                page_token: String::new(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .transactions
        .iter()
        .filter(|t| t.kind() == transaction::Kind::Charge)
        .count()
}

fn actions(order: &Order) -> Vec<(saga_step::Action, saga_step::Outcome, bool)> {
    order
        .history
        .iter()
        .map(|s| (s.action(), s.outcome(), s.compensation))
        .collect()
}

fn order_id(order: &Order) -> &str {
    order.name.rsplit('/').next().unwrap()
}

/// The server-sent events of `GET /v1/{name}:watch`, as order JSON, into `events`.
async fn watch_over_sse(
    http: std::net::SocketAddr,
    name: String,
    token: String,
    events: tokio::sync::mpsc::UnboundedSender<Value>,
) {
    let response = reqwest::Client::new()
        .get(format!("http://{http}/v1/{name}:watch"))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            if let Some(data) = frame.trim().strip_prefix("data: ") {
                let event: Value = serde_json::from_str(data).unwrap();
                let _ = events.send(event["order"].clone());
            }
        }
    }
}

async fn an_order_goes_from_placed_to_confirmed_through_the_gateway(app: TestApp) {
    let admin = app.register("admin@example.com").await.access_token;
    let app = &app;
    let rest = |method: reqwest::Method,
                path: String,
                token: Option<String>,
                body: Option<Value>| async move {
        support::rest(app, method, &path, token.as_deref(), body).await
    };
    let (status, registered) = rest(
        reqwest::Method::POST,
        "/v1/auth:register".into(),
        None,
        Some(json!({"email": "ada@example.com", "password": support::PASSWORD})),
    )
    .await;
    assert_eq!(status, 200);
    let ada = registered["accessToken"].as_str().unwrap().to_owned();
    let lamp = app.product(&admin, "Lamp", 2500, 7).await.name;
    let (status, _) = rest(
        reqwest::Method::POST,
        "/v1/users/me/wallet:topUp".into(),
        Some(ada.clone()),
        Some(json!({"amount": {"currencyCode": "EUR", "units": "10000"}, "requestId": uuid()})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, placed) = rest(
        reqwest::Method::POST,
        format!("/v1/users/me/orders?requestId={}", uuid()),
        Some(ada.clone()),
        Some(json!({"lineItems": [{"product": lamp, "quantity": 2}]})),
    )
    .await;
    assert_eq!((status, placed["state"].as_str()), (200, Some("PENDING")));
    let name = placed["name"].as_str().unwrap().to_owned();

    // The watcher sees the order PENDING; only then does a worker take up its saga.
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watching = tokio::spawn(watch_over_sse(
        app.http_addr,
        name.clone(),
        ada.clone(),
        events,
    ));
    let first = tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first["state"], "PENDING");
    let worker = app.start_worker(|_| {}).await;
    let mut last = first;
    while last["state"] == "PENDING" {
        last = tokio::time::timeout(Duration::from_secs(30), seen.recv())
            .await
            .expect("a change within 30 s")
            .expect("the stream goes on until the order is confirmed");
    }
    assert_eq!(last["state"], "CONFIRMED");
    tokio::time::timeout(Duration::from_secs(30), watching)
        .await
        .expect("the stream ends once the order is settled")
        .unwrap();

    let confirmed = until_settled(app, &ada, &name).await;
    assert_eq!(confirmed.total, eur(5000));
    use saga_step::{Action::*, Outcome::*};
    assert_eq!(
        actions(&confirmed),
        vec![
            (Place, Done, false),
            (ReserveStock, Done, false),
            (Charge, Done, false),
            (CommitReservation, Done, false),
            (Confirm, Done, false),
        ]
    );
    assert_eq!(app.stock(&lamp).await, 5);
    assert_eq!(app.balance(&ada).await, 5000);
    let confirmed = &confirmed;
    keel_testkit::eventually(Duration::from_secs(30), "the e-mails to be sent", || {
        let mail = app.mail();
        async move {
            let welcome = mail
                .iter()
                .any(|m| m.to == "ada@example.com" && m.subject == "Welcome to keel");
            let confirmation = mail
                .iter()
                .any(|m| m.to == "ada@example.com" && m.subject.contains(order_id(confirmed)));
            (welcome && confirmation).then_some(())
        }
    })
    .await;
    // Written for the buyer: titles, money as people read it, the total, no links.
    let mail = app.mail();
    let confirmation = mail
        .iter()
        .find(|m| m.subject.contains(order_id(confirmed)))
        .unwrap();
    let body = &confirmation.body;
    assert!(
        body.contains("2 x Lamp, 25.00 EUR each: 50.00 EUR"),
        "{body}"
    );
    assert!(body.contains("Total: 50.00 EUR"), "{body}");
    for unwanted in ["products/", "minor units", "http"] {
        assert!(!body.contains(unwanted), "{unwanted:?} in {body}");
    }
    worker.stop().await;
}

async fn out_of_stock_and_insufficient_funds_reject_and_move_nothing(app: TestApp) {
    let people = app.people().await;
    let scarce = app.product(&people.admin, "Scarce", 1000, 1).await.name;
    let plenty = app.product(&people.admin, "Plenty", 1000, 50).await.name;
    top_up(&app, &people.ada, 1500).await;

    let too_many = place(&app, &people.ada, &[(&plenty, 1), (&scarce, 2)]).await;
    let rejected = until_settled(&app, &people.ada, &too_many.name).await;
    assert_eq!(rejected.state(), order::State::Rejected);
    assert!(
        rejected.rejection_reason.contains("out of stock"),
        "{rejected:?}"
    );
    use saga_step::{Action::*, Outcome::*};
    assert_eq!(
        actions(&rejected),
        vec![
            (Place, Done, false),
            (ReserveStock, Refused, false),
            (Reject, Refused, false)
        ]
    );
    assert_eq!(
        (app.stock(&scarce).await, app.stock(&plenty).await),
        (1, 50)
    );
    assert_eq!(app.balance(&people.ada).await, 1500);

    let too_dear = place(&app, &people.ada, &[(&plenty, 2)]).await;
    let rejected = until_settled(&app, &people.ada, &too_dear.name).await;
    assert_eq!(
        (rejected.state(), rejected.rejection_reason.as_str()),
        (order::State::Rejected, "insufficient funds")
    );
    assert_eq!(
        actions(&rejected),
        vec![
            (Place, Done, false),
            (ReserveStock, Done, false),
            (Charge, Refused, false),
            (ReleaseStock, Done, true),
            (Reject, Refused, false),
        ],
        "the reservation was compensated"
    );
    assert_eq!(app.stock(&plenty).await, 50, "the stock went back");
    assert_eq!(app.balance(&people.ada).await, 1500);
    assert_eq!(charges(&app, &people.ada).await, 0);
}

async fn one_request_id_sent_ten_times_at_once_makes_one_order_and_one_charge(app: TestApp) {
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 700, 10).await.name;
    top_up(&app, &people.ada, 10_000).await;
    let request_id = uuid();
    let channel = app.channel().await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let (channel, token, request) = (
                channel.clone(),
                people.ada.clone(),
                placing(&[(&lamp, 1)], &request_id),
            );
            tokio::spawn(async move {
                OrderServiceClient::new(channel)
                    .place_order(authed(request, &token))
                    .await
                    .map(|r| r.into_inner().name)
            })
        })
        .collect();
    let mut names = std::collections::BTreeSet::new();
    for call in calls {
        names.insert(call.await.unwrap().expect("every retry answers"));
    }
    assert_eq!(names.len(), 1, "one order: {names:?}");
    let name = names.into_iter().next().unwrap();
    let confirmed = until_settled(&app, &people.ada, &name).await;
    assert_eq!(confirmed.state(), order::State::Confirmed);
    assert_eq!(app.count("orders_orders").await, 1);
    assert_eq!(charges(&app, &people.ada).await, 1);
    assert_eq!(app.stock(&lamp).await, 9);
    // The same request id with another body conflicts with the first order, naming it.
    let status = expect_code(
        orders(&app)
            .await
            .place_order(authed(placing(&[(&lamp, 2)], &request_id), &people.ada))
            .await,
        Code::AlreadyExists,
    );
    assert!(status.message().contains(&request_id), "{status:?}");
}

async fn a_cancelled_order_gives_the_money_and_the_stock_back(app: TestApp) {
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 1200, 5).await.name;
    top_up(&app, &people.ada, 5000).await;
    let placed = place(&app, &people.ada, &[(&lamp, 2)]).await;
    let mut client = orders(&app).await;
    let status = expect_code(
        client
            .cancel_order(authed(
                CancelOrderRequest {
                    name: placed.name.clone(),
                },
                &people.bob,
            ))
            .await,
        Code::PermissionDenied,
    );
    assert!(!status.message().is_empty());
    let confirmed = until_settled(&app, &people.ada, &placed.name).await;
    assert_eq!(confirmed.state(), order::State::Confirmed);
    assert_eq!(
        (app.stock(&lamp).await, app.balance(&people.ada).await),
        (3, 2600)
    );
    let cancelling = CancelOrderRequest {
        name: placed.name.clone(),
    };
    client
        .cancel_order(authed(cancelling.clone(), &people.ada))
        .await
        .unwrap();
    client
        .cancel_order(authed(cancelling, &people.ada))
        .await
        .expect("cancelling twice is the same as once");
    let cancelled = until_settled(&app, &people.ada, &placed.name).await;
    assert_eq!(cancelled.state(), order::State::Cancelled);
    use saga_step::Action::*;
    let tail: Vec<_> = cancelled
        .history
        .iter()
        .skip(5)
        .map(|s| (s.action(), s.compensation))
        .collect();
    assert_eq!(
        tail,
        vec![(Cancel, false), (Refund, true), (ReleaseStock, true)]
    );
    assert_eq!(
        (app.stock(&lamp).await, app.balance(&people.ada).await),
        (5, 5000)
    );
}

async fn users_never_reach_the_internal_apis_nor_another_wallet(app: TestApp) {
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 100, 5).await.name;
    top_up(&app, &people.bob, 1000).await;
    let reserve = || ReserveStockRequest {
        reservation_id: "orders/x".into(),
        lines: vec![StockLine {
            product: lamp.clone(),
            quantity: 1,
        }],
    };
    let bob = app.user_name(&people.bob).await;
    let bob_wallet = format!("{bob}/wallet");
    for token in [&people.ada, &people.admin] {
        let mut inventory = app.inventory().await;
        expect_code(
            inventory.reserve_stock(authed(reserve(), token)).await,
            Code::PermissionDenied,
        );
        expect_code(
            inventory
                .release_stock(authed(
                    ReleaseStockRequest {
                        reservation_id: "orders/x".into(),
                    },
                    token,
                ))
                .await,
            Code::PermissionDenied,
        );
        expect_code(
            app.ledger()
                .await
                .charge(authed(
                    ChargeRequest {
                        payment_id: "p".into(),
                        wallet: bob_wallet.clone(),
                        amount: eur(10),
                        reference: String::new(),
                    },
                    token,
                ))
                .await,
            Code::PermissionDenied,
        );
    }
    // Through orders: Ada cannot place an order that Bob pays for.
    let mut for_bob = placing(&[(&lamp, 1)], &uuid());
    for_bob.parent = bob.clone();
    expect_code(
        orders(&app)
            .await
            .place_order(authed(for_bob, &people.ada))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(app.count("orders_orders").await, 0);
    assert_eq!(
        (app.stock(&lamp).await, app.balance(&people.bob).await),
        (5, 1000)
    );
}

async fn two_hundred_orders_of_twenty_buyers_sell_only_what_is_there(app: TestApp) {
    const BUYERS: usize = 20;
    const ORDERS_EACH: usize = 10;
    // Two workers beside the process, racing each other for the sagas.
    let workers = [
        app.start_worker(|_| {}).await,
        app.start_worker(|_| {}).await,
    ];
    let admin = app.register("admin@example.com").await.access_token;
    let mut shelf = Vec::new();
    for (k, stock) in [8, 12, 15, 20, 25].into_iter().enumerate() {
        shelf.push((
            app.product(&admin, &format!("P{k}"), 300 + 100 * k as i64, stock)
                .await
                .name,
            stock,
        ));
    }
    let mut buyers = Vec::new();
    for b in 0..BUYERS {
        let token = app
            .register(&format!("buyer{b}@example.com"))
            .await
            .access_token;
        // Some can pay for everything they try, some for little.
        top_up(&app, &token, if b % 3 == 0 { 1500 } else { 20_000 }).await;
        buyers.push(token);
    }
    let channel = app.channel().await;
    let runs: Vec<_> = buyers
        .iter()
        .enumerate()
        .map(|(b, token)| {
            let (channel, token, shelf) = (channel.clone(), token.clone(), shelf.clone());
            tokio::spawn(async move {
                let mut client = OrderServiceClient::new(channel);
                let mut placed = Vec::new();
                for k in 0..ORDERS_EACH {
                    let (product, _) = &shelf[(b + k) % shelf.len()];
                    let quantity = 1 + ((b * 7 + k * 3) % 3) as i64;
                    let order = client
                        .place_order(authed(placing(&[(product, quantity)], &uuid()), &token))
                        .await
                        .expect("placed")
                        .into_inner();
                    placed.push(order.name);
                }
                placed
            })
        })
        .collect();
    let mut names = Vec::new();
    for (run, token) in runs.into_iter().zip(&buyers) {
        for name in run.await.unwrap() {
            names.push((name, token.clone()));
        }
    }
    let mut sold: HashMap<String, i64> = HashMap::new();
    let mut spent: HashMap<String, i64> = HashMap::new();
    let mut confirmed = Vec::new();
    for (name, token) in &names {
        let order = until_settled(&app, token, name).await;
        match order.state() {
            order::State::Confirmed => {
                for line in &order.line_items {
                    *sold.entry(line.product.clone()).or_default() += line.quantity;
                }
                *spent.entry(token.clone()).or_default() += order.total.clone().unwrap().units;
                confirmed.push(order);
            }
            order::State::Rejected => {}
            other => panic!("{name} ended {other:?}"),
        }
    }
    assert!(!confirmed.is_empty() && confirmed.len() < names.len());
    for (product, initial) in &shelf {
        let left = app.stock(product).await;
        assert!(left >= 0);
        assert_eq!(
            initial - left,
            sold.get(product).copied().unwrap_or(0),
            "{product}: what left the shelf is what confirmed orders bought"
        );
    }
    for (b, token) in buyers.iter().enumerate() {
        let funded = if b % 3 == 0 { 1500 } else { 20_000 };
        let left = app.balance(token).await;
        assert!(left >= 0, "no wallet below zero");
        assert_eq!(left, funded - spent.get(token).copied().unwrap_or(0));
    }
    keel_testkit::eventually(Duration::from_secs(60), "every confirmation e-mail", || {
        let mail = app.mail();
        let confirmed = &confirmed;
        async move {
            let complete = confirmed.iter().all(|order| {
                mail.iter()
                    .filter(|m| m.subject.contains(order_id(order)))
                    .count()
                    == 1
            });
            complete.then_some(())
        }
    })
    .await;
    let confirmations = app
        .mail()
        .iter()
        .filter(|m| m.subject.starts_with("Your keel order"))
        .count();
    assert_eq!(
        confirmations,
        confirmed.len(),
        "exactly one e-mail per confirmed order"
    );
    for worker in workers {
        worker.stop().await;
    }
}

/// No rate limit, and no worker in the app's process (the scenario starts its own).
fn one_worker_outside(s: &mut keel::config::Settings) {
    s.edge.rate_limit = keel::config::RateLimit(None);
    s.edge.auth_rate_limit = keel::config::RateLimit(None);
    s.workers.worker_concurrency = Some(0);
}

// These start their workers themselves: the first once the order was seen PENDING, the second
// two of them beside the process.
on_every_store!(
    with one_worker_outside;
    an_order_goes_from_placed_to_confirmed_through_the_gateway,
    two_hundred_orders_of_twenty_buyers_sell_only_what_is_there,
);

on_every_store!(
    out_of_stock_and_insufficient_funds_reject_and_move_nothing,
    one_request_id_sent_ten_times_at_once_makes_one_order_and_one_charge,
    a_cancelled_order_gives_the_money_and_the_stock_back,
    users_never_reach_the_internal_apis_nor_another_wallet,
);

/// The jobs an order needs are taken at once, never at a poll (an hour here, as the
/// reconciler's period, so that nothing else wakes the workers): the placement wakes them for
/// its saga, and the saga, once it recorded the confirmation, for the notice that sends the
/// e-mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_confirmed_and_its_email_sent_without_waiting_for_a_poll() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.workers.job_poll = Duration::from_secs(3600);
        s.orders.order_reconcile_every = Duration::from_secs(3600);
    })
    .await;
    let order = one_confirmed_order(&app).await;
    keel_testkit::eventually(Duration::from_secs(20), "the confirmation e-mail", || {
        let mail = app.mail();
        let id = order_id(&order).to_owned();
        async move { mail.iter().any(|m| m.subject.contains(&id)).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_orders_still_complete_through_the_table() {
    let redis = keel_testkit::Redis::dedicated().await;
    let url = redis.url.clone();
    let app = TestApp::spawn_with(Stores::PostgresRedis, move |s| {
        s.stores.redis_url = Some(url);
    })
    .await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 100, 100).await.name;
    top_up(&app, &people.ada, 10_000).await;
    redis.kill();
    let mut placed = Vec::new();
    for _ in 0..10 {
        placed.push(place(&app, &people.ada, &[(&lamp, 1)]).await.name);
    }
    for name in &placed {
        let order = until_settled(&app, &people.ada, name).await;
        assert_eq!(order.state(), order::State::Confirmed, "{order:?}");
    }
    assert_eq!(charges(&app, &people.ada).await, 10);
    assert_eq!(app.stock(&lamp).await, 90);
}

/// On a Redis Cluster with a replica per primary, the primary that holds the queue's streams
/// dies while a reader reads a cached product in a loop and orders are placed: no read and no
/// placement fails, every order is confirmed once, and the stock and the charges agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_failing_over_under_reads_and_orders_fails_no_call_and_loses_no_order() {
    a_cluster_primary_dies_under_reads_and_orders(1).await;
}

/// The same without replicas: the primary's slots stay unserved, and the reads go to the
/// database, the jobs through the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_lost_for_good_under_reads_and_orders_fails_no_call_and_loses_no_order() {
    a_cluster_primary_dies_under_reads_and_orders(0).await;
}

async fn a_cluster_primary_dies_under_reads_and_orders(replicas: usize) {
    use keel::proto::keel::catalog::v1::GetProductRequest;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let cluster = keel_testkit::RedisCluster::dedicated(replicas).await;
    let url = cluster.url.clone();
    let app = TestApp::spawn_with(Stores::PostgresRedis, move |s| {
        s.stores.redis_url = Some(url);
    })
    .await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 100, 100).await.name;
    top_up(&app, &people.ada, 10_000).await;

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let reads = std::sync::Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let (mut catalog, name) = (app.catalog().await, lamp.clone());
        let (stop, reads) = (stop.clone(), reads.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                let request = GetProductRequest { name: name.clone() };
                let read = catalog.get_product(request).await;
                assert!(read.is_ok(), "a read failed: {read:?}");
                reads.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let mut placed = Vec::new();
    for n in 0..20 {
        if n == 10 {
            // Every key of the queue carries the hash tag `{queue}`.
            let slot = fred::util::redis_keyslot(b"queue");
            cluster
                .primary_of(slot)
                .expect("the queue's primary")
                .kill();
        }
        placed.push(place(&app, &people.ada, &[(&lamp, 1)]).await.name);
    }
    for name in &placed {
        let order = until_settled(&app, &people.ada, name).await;
        assert_eq!(order.state(), order::State::Confirmed, "{order:?}");
    }
    stop.store(true, Ordering::SeqCst);
    reader.await.unwrap();
    assert!(reads.load(Ordering::SeqCst) > 0, "the reader read");
    assert_eq!(charges(&app, &people.ada).await, 20);
    // Read through the cache: an invalidation the dying primary refused is retried by a worker
    // (queued), so the promoted replica's copy may show the stock before the kill for a moment.
    keel_testkit::eventually(
        std::time::Duration::from_secs(10),
        "every reservation in the stock read",
        || async { (app.stock(&lamp).await == 80).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_has_one_budget_for_rest_and_grpc_calls_to_a_service() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    // One call in flight per service; no worker.
    let app = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.limits.max_concurrent_calls = 1;
        s.limits.concurrency_limit = keel::config::ConcurrencyLimit::Static;
        s.workers.worker_concurrency = Some(0);
    })
    .await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 100, 5).await.name;
    let order = place(&app, &people.ada, &[(&lamp, 1)]).await;

    // A placement through the gateway (its in-process lane) that cannot finish yet: another
    // transaction holds its request id, so its insert waits, holding the orders service's place.
    let request_id = uuid();
    let ada = app.user_name(&people.ada).await;
    let ada_id = ada.trim_start_matches("users/");
    let db = app.db().await;
    let holding = db.begin().await.unwrap();
    holding
        .execute_unprepared(&format!(
            "INSERT INTO orders_orders (id, user_id, state, stage, rejection_reason, \
             currency_code, total_units, buyer_email, request_id, request_hash, version, \
             created_at, updated_at) VALUES ('{}', '{ada_id}', 'PENDING', 'reserve', '', 'EUR', \
             0, 'x', '{request_id}', 'x', 1, now(), now())",
            uuid()
        ))
        .await
        .unwrap();
    let placing = tokio::spawn({
        let (http, token, lamp) = (app.http_addr, people.ada.clone(), lamp.clone());
        async move {
            reqwest::Client::new()
                .post(format!(
                    "http://{http}/v1/users/me/orders?requestId={request_id}"
                ))
                .bearer_auth(token)
                .json(&json!({"lineItems": [{"product": lamp, "quantity": 1}]}))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });

    // It waits on the database (the event that says it holds its place)...
    keel_testkit::eventually(Duration::from_secs(10), "the placement to wait", || async {
        let waiting = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND datname = current_database()",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    // ...so a direct gRPC call to the same service is refused: one budget, not one per lane.
    let app = &app;
    let get = |token: String, name: String| async move {
        orders(app)
            .await
            .get_order(authed(GetOrderRequest { name }, &token))
            .await
    };
    let refused = get(people.ada.clone(), order.name.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    // The placement goes through (as the first, whose request id it was); its place is free.
    holding.rollback().await.unwrap();
    let placed: Value = serde_json::from_str(&placing.await.unwrap()).unwrap();
    assert_eq!(placed["state"], "PENDING", "{placed}");
    get(people.ada.clone(), order.name.clone())
        .await
        .expect("the place given back");
}

/// Placing an order is one transaction and no read after it: the order, its line, its first
/// step (numbered in the same statement that writes it), its saga's job and the notice to
/// watchers, and the answer built from the rows as written. It cost nine statements when the
/// step's number was read first and the order read back after the commit. The least of ten
/// placements is taken, so that a background read (a health probe, a cache miss on the product)
/// does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placing_an_order_is_five_statements_and_no_read_after_them() {
    let app = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.workers.worker_concurrency = Some(0);
        s.operations.health_probe_interval = Duration::from_secs(3600);
        s.stores.redis_url = None;
    })
    .await;
    let people = app.people().await;
    let lamp = app.product(&people.admin, "Lamp", 100, 100).await.name;
    let statements = "keel_db_statements_total{result=\"ok\"}";
    let mut counted = Vec::new();
    for _ in 0..10 {
        let before = app.metric(statements).await;
        let placed = place(&app, &people.ada, &[(&lamp, 1)]).await;
        counted.push(app.metric(statements).await - before);
        assert_eq!(placed.history.len(), 1, "{placed:?}");
        assert_eq!(placed.state(), order::State::Pending, "{placed:?}");
    }
    let least = counted.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(least, 5.0, "{counted:?}");
}

/// A process of one replica calls its own catalog and payments in process: the saga's calls
/// pass the mesh's client (counted there, with their deadlines and retries) and the server's
/// stack, none goes to an endpoint over a socket, and the mesh reads the process as catalog's
/// one endpoint admitted (no alert that none is). A process of several replicas has them to
/// balance over, so the same calls are dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_calls_its_own_services_in_process_unless_it_has_replicas_to_balance() {
    use keel_testkit::http::metric;
    let reserved = r#"{grpc_code="OK",grpc_method="ReserveStock",grpc_service="keel.catalog.v1.InventoryService""#;
    for replicas in [1, 2] {
        let app = TestApp::spawn_with(Stores::Embedded, |s| s.mesh.replicas = replicas).await;
        one_confirmed_order(&app).await;

        let metrics = app.metrics().await;
        let sent = metric(
            &metrics,
            &format!(r#"grpc_client_handled_total{reserved},peer="catalog"}}"#),
        );
        let served = metric(
            &metrics,
            &format!(r#"grpc_server_handled_total{reserved},grpc_type="unary"}}"#),
        );
        assert_eq!(
            (sent, served),
            (1.0, 1.0),
            "{replicas} replica(s): sent once, served once"
        );
        let dialled: f64 = app
            .replicas
            .iter()
            .map(|replica| {
                let endpoint = keel_mesh::client::endpoint_digest(*replica);
                let series = format!(
                    r#"keel_mesh_endpoint_attempts_total{{endpoint="{endpoint}",outcome="ok",peer="catalog"}}"#
                );
                metric(&metrics, &series)
            })
            .sum();
        let admitted = r#"keel_mesh_endpoints{peer="catalog",state="admitted"}"#;
        if replicas == 1 {
            assert_eq!(dialled, 0.0, "one replica: catalog called without a socket");
            assert_eq!(
                metric(&metrics, admitted),
                1.0,
                "the process is catalog's endpoint"
            );
        } else {
            assert!(
                dialled >= 2.0,
                "{replicas} replicas: catalog dialled ({dialled})"
            );
        }
        app.stop().await;
    }
}
