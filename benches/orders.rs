//! Orders on PostgreSQL + Redis (ephemeral, started by the test kit), against the release `keel`
//! binary running every service and its workers on loopback; the load generator shares the
//! machine.
//!
//!     cargo bench --bench orders
//!
//! Measures orders placed per second, and PlaceOrder → CONFIRMED (the saga: ReserveStock, Charge,
//! CommitReservation through the mesh, each step a queue job) as seen by a client on WatchOrder.
//! Prints a Markdown section for benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod load;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use keel::proto::keel::orders::v1::{GetOrderRequest, WatchOrderRequest, order};
use load::shop::{fixtures, placing};
use load::{Keel, Stores, authed, row};
use tonic::transport::Channel;

use load::shop::{PRODUCTS, USERS};
const CONNECTIONS: usize = 2;
/// Orders each placed and watched to the end at once (one per user).
const WATCHED: usize = USERS;
/// PlaceOrder calls in flight when only placing is measured.
const PLACING: usize = 50;
const WARMUP: Duration = Duration::from_secs(2);
const RUN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    let stores = Stores::fresh().await;
    // `KEEL_WORKER_CONCURRENCY=N` and `KEEL_JOB_CONCURRENCY=order.saga=M cargo bench --bench
    // orders` to try other concurrencies.
    let concurrency = std::env::var("KEEL_WORKER_CONCURRENCY")
        .unwrap_or_else(|_| format!("{} (the default: the CPUs)", num_cpus()));
    let sagas = std::env::var("KEEL_JOB_CONCURRENCY")
        .unwrap_or_else(|_| format!("order.saga={} (the default)", keel::orders::SAGA_SLOTS));
    // One load generator is one client address: no per-client or sign-in limits.
    let unlimited = ["--rate-limit", "off", "--auth-rate-limit", "off"];
    let keel = Keel::start(&unlimited, &stores.env()).await;
    let channels = keel.connections(CONNECTIONS).await;
    let (products, users) = fixtures(&channels[0]).await;
    let (products, users) = (Arc::new(products), Arc::new(users));

    println!("### orders on PostgreSQL + Redis (cargo bench --bench orders)\n");
    println!(
        "One keel process: every service, its mesh and a worker running {concurrency} jobs at once \
         in its shared slots, sagas in slots of their own ({sagas}). {USERS} users, {PRODUCTS} \
         products, one line per order.\n"
    );
    println!("| scenario | orders/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|");

    // Closed loop: place, then watch until CONFIRMED; the latency is the whole saga.
    let confirmed = load::run(WATCHED, WARMUP, RUN, {
        let (channels, products, users) = (channels.clone(), products.clone(), users.clone());
        move |w| {
            let client = OrderServiceClient::new(channels[w % CONNECTIONS].clone());
            let token = users[w % users.len()].clone();
            let product = products[w % products.len()].clone();
            async move { place_and_watch(client, &token, &product).await }
        }
    })
    .await;
    println!(
        "{}",
        row(
            &format!("PlaceOrder → CONFIRMED on WatchOrder, {WATCHED} orders at once"),
            &confirmed
        )
    );

    // Placing alone: the saga falls behind and catches up afterwards. What it costs PostgreSQL
    // is counted by keel's own statement counter, over placing, the saga and the e-mails.
    let statements = r#"keel_db_statements_total{result="ok"}"#;
    let statements_before = keel.metric(statements).await;
    let placed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let placing = load::run(PLACING, WARMUP, RUN, {
        let (channels, products, users, placed) = (
            channels.clone(),
            products.clone(),
            users.clone(),
            placed.clone(),
        );
        move |w| {
            let mut client = OrderServiceClient::new(channels[w % CONNECTIONS].clone());
            let user = w % users.len();
            let token = users[user].clone();
            let request = authed(placing(&products[w % products.len()]), &token);
            let placed = placed.clone();
            async move {
                match client.place_order(request).await {
                    Ok(order) => {
                        placed.lock().unwrap().push((user, order.into_inner().name));
                        true
                    }
                    Err(_) => false,
                }
            }
        }
    })
    .await;
    let caught_up = Instant::now();
    let placed = std::mem::take(&mut *placed.lock().unwrap());
    let settled = settle(&channels[0], &users, placed.clone()).await;
    println!(
        "{}",
        row(
            &format!("PlaceOrder alone, {PLACING} in flight (the saga falls behind)"),
            &placing
        )
    );
    println!(
        "| the saga catching up after it: {} orders ({} confirmed) settled {:.1} s after placing stopped | | | | |",
        placed.len(),
        settled,
        caught_up.elapsed().as_secs_f64()
    );
    // The confirmation e-mails run behind the saga: wait for every one before counting.
    let sent = r#"keel_queue_jobs_succeeded_total{kind="order.email"}"#;
    let deadline = Instant::now() + Duration::from_secs(300);
    while keel.metric(sent).await < settled as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spent = keel.metric(statements).await - statements_before;
    println!(
        "\nSQL statements per order, placed through confirmed and its e-mail sent (keel's \
         keel_db_statements_total over that phase, background tasks included): {:.1}",
        spent / placed.len().max(1) as f64
    );
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Places an order and watches it; true once it is CONFIRMED.
async fn place_and_watch(
    mut client: OrderServiceClient<Channel>,
    token: &str,
    product: &str,
) -> bool {
    let Ok(order) = client.place_order(authed(placing(product), token)).await else {
        return false;
    };
    let name = order.into_inner().name;
    let Ok(stream) = client
        .watch_order(authed(WatchOrderRequest { name }, token))
        .await
    else {
        return false;
    };
    let mut stream = stream.into_inner();
    while let Some(Ok(change)) = stream.next().await {
        if change
            .order
            .is_some_and(|o| o.state() == order::State::Confirmed)
        {
            return true;
        }
    }
    false
}

/// Waits (bounded) until every order in `placed` has left PENDING; returns how many confirmed.
async fn settle(channel: &Channel, users: &[String], mut placed: Vec<(usize, String)>) -> usize {
    let mut client = OrderServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut confirmed = 0;
    while let Some((user, name)) = placed.pop() {
        assert!(Instant::now() < deadline, "the saga caught up");
        let request = authed(GetOrderRequest { name: name.clone() }, &users[user]);
        let order = client.get_order(request).await.unwrap().into_inner();
        match order.state() {
            order::State::Confirmed => confirmed += 1,
            order::State::Rejected | order::State::Cancelled => {}
            _ => {
                placed.push((user, name));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    confirmed
}
