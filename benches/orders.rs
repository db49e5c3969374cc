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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use keel::proto::keel::orders::v1::{GetOrderRequest, ListOrdersRequest, WatchOrderRequest, order};
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

/// Waits (bounded) until every order in `placed` has settled; returns how many confirmed.
///
/// The saga takes orders oldest first, so the newest settles about last: it is waited for alone,
/// one read every 20 ms, which costs the saga nothing. Then each buyer's orders are read a page
/// of up to 1,000 at a time, every buyer at once, until none of `placed` is left unsettled: a few
/// dozen calls for the whole backlog. (Reading each order in turn, as this once did, took
/// 2.4 ms a call behind the e-mails: 12.7 s of a 25.9-s row was the check, not the saga;
/// benches/RESULTS.md, 2026-12-07.)
async fn settle(channel: &Channel, users: &[String], placed: Vec<(usize, String)>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut client = OrderServiceClient::new(channel.clone());
    if let Some((user, name)) = placed.last() {
        loop {
            assert!(Instant::now() < deadline, "the saga caught up");
            let request = authed(GetOrderRequest { name: name.clone() }, &users[*user]);
            if settled(
                client
                    .get_order(request)
                    .await
                    .unwrap()
                    .into_inner()
                    .state(),
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut waiting: Vec<HashSet<String>> = vec![HashSet::new(); users.len()];
    for (user, name) in placed {
        waiting[user].insert(name);
    }
    let mut confirmed = 0;
    loop {
        assert!(Instant::now() < deadline, "the saga caught up");
        let read = waiting.iter().enumerate().map(|(user, names)| {
            let (mut client, token) = (client.clone(), users[user].clone());
            async move {
                if names.is_empty() {
                    return Vec::new();
                }
                let mut orders = Vec::new();
                let mut page_token = String::new();
                loop {
                    let request = ListOrdersRequest {
                        parent: "users/me".into(),
                        page_size: 1_000,
                        page_token,
                    };
                    let page = client
                        .list_orders(authed(request, &token))
                        .await
                        .unwrap()
                        .into_inner();
                    orders.extend(
                        page.orders
                            .into_iter()
                            .filter(|o| names.contains(&o.name) && settled(o.state())),
                    );
                    if page.next_page_token.is_empty() {
                        return orders;
                    }
                    page_token = page.next_page_token;
                }
            }
        });
        let done = futures::future::join_all(read).await;
        for (names, orders) in waiting.iter_mut().zip(done) {
            for order in orders {
                names.remove(&order.name);
                confirmed += usize::from(order.state() == order::State::Confirmed);
            }
        }
        if waiting.iter().all(HashSet::is_empty) {
            return confirmed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether an order in `state` is done with: confirmed, rejected or cancelled.
fn settled(state: order::State) -> bool {
    matches!(
        state,
        order::State::Confirmed | order::State::Rejected | order::State::Cancelled
    )
}
