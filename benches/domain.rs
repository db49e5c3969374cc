//! catalog and payments on PostgreSQL + Redis (ephemeral, started by the test kit), against the
//! release `keel` binary on loopback; the load generator shares the machine.
//!
//!     cargo bench --bench domain
//!
//! Prints a Markdown section for benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod load;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient;
use keel::proto::keel::catalog::v1::inventory_service_client::InventoryServiceClient;
use keel::proto::keel::catalog::v1::{
    CreateProductRequest, GetProductRequest, ListProductsRequest, Product, ReserveStockRequest,
    StockLine,
};
use keel::proto::keel::identity::v1::RegisterRequest;
use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use keel::proto::keel::payments::v1::ledger_service_client::LedgerServiceClient;
use keel::proto::keel::payments::v1::payment_service_client::PaymentServiceClient;
use keel::proto::keel::payments::v1::{ChargeRequest, TopUpWalletRequest};
use load::{Keel, Stores, authed, eur, row, service_token};

const IN_FLIGHT: usize = 50;
const CONNECTIONS: usize = 2;
const PRODUCTS: usize = 1000;
const WALLETS: usize = 20;
const WARMUP: Duration = Duration::from_secs(2);
const RUN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    let stores = Stores::fresh().await;
    let env = stores.env();
    // The fixtures register 21 users from one address, past the sign-in limit.
    let keel = Keel::start(&["--auth-rate-limit", "off"], &env).await;
    let channels = keel.connections(CONNECTIONS).await;

    // Fixtures: an admin, products, wallets.
    let admin = load::register(channels[0].clone(), "admin@example.com").await;
    let mut identity = IdentityServiceClient::new(channels[0].clone());
    let mut catalog = CatalogServiceClient::new(channels[0].clone());
    let mut products = Vec::new();
    for i in 0..PRODUCTS {
        let product = Product {
            title: format!("Product {i}"),
            price: eur(100 + i as i64),
            stock: 1_000_000,
            ..Default::default()
        };
        let created = catalog
            .create_product(authed(
                CreateProductRequest {
                    product: Some(product),
                    request_id: String::new(),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        products.push(created.name);
    }
    let mut payments = PaymentServiceClient::new(channels[0].clone());
    let mut wallets = Vec::new();
    for i in 0..WALLETS {
        let user = identity
            .register(RegisterRequest {
                email: format!("u{i}@example.com"),
                password: "correct horse battery".into(),
                display_name: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let wallet = format!("{}/wallet", user.user.unwrap().name);
        payments
            .top_up_wallet(authed(
                TopUpWalletRequest {
                    name: wallet.clone(),
                    amount: eur(i64::MAX / 4),
                    request_id: uuid::Uuid::new_v4().to_string(),
                },
                &admin,
            ))
            .await
            .unwrap();
        wallets.push(wallet);
    }
    let products = Arc::new(products);
    let wallets = Arc::new(wallets);
    // The internal APIs (ReserveStock, Charge) take a service's token, as orders presents.
    let service = service_token(channels[0].clone()).await;

    println!("### catalog and payments on PostgreSQL + Redis (cargo bench --bench domain)\n");
    println!(
        "{PRODUCTS} products, {WALLETS} wallets; {IN_FLIGHT} calls in flight over {CONNECTIONS} connections.\n"
    );
    println!("| scenario | calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|");

    let hot = products[0].clone();
    let hits = load::run(IN_FLIGHT, WARMUP, RUN, {
        let channels = channels.clone();
        move |w| {
            let mut client = CatalogServiceClient::new(channels[w % CONNECTIONS].clone());
            let name = hot.clone();
            async move { client.get_product(GetProductRequest { name }).await.is_ok() }
        }
    })
    .await;
    println!("{}", row("GetProduct, cache hit (one hot product)", &hits));

    // A second process on the same stores whose cache entries expire at once: every read
    // misses, reads PostgreSQL and fills Redis.
    let cold = Keel::start(&["--cache-ttl", "1ms"], &env).await;
    let cold_channels = cold.connections(CONNECTIONS).await;
    let counter = Arc::new(AtomicU64::new(0));
    let misses = load::run(IN_FLIGHT, WARMUP, RUN, {
        let (channels, products, counter) =
            (cold_channels.clone(), products.clone(), counter.clone());
        move |w| {
            let mut client = CatalogServiceClient::new(channels[w % CONNECTIONS].clone());
            let i = counter.fetch_add(1, Ordering::Relaxed) as usize;
            let name = products[i % products.len()].clone();
            async move { client.get_product(GetProductRequest { name }).await.is_ok() }
        }
    })
    .await;
    println!(
        "{}",
        row(
            "GetProduct, cache miss (PostgreSQL read + Redis fill)",
            &misses
        )
    );
    drop(cold);

    let lists = load::run(IN_FLIGHT, WARMUP, RUN, {
        let channels = channels.clone();
        move |w| {
            let mut client = CatalogServiceClient::new(channels[w % CONNECTIONS].clone());
            async move {
                client
                    .list_products(ListProductsRequest::default())
                    .await
                    .is_ok()
            }
        }
    })
    .await;
    println!("{}", row("ListProducts, first page of 50", &lists));

    let reservations = Arc::new(AtomicU64::new(0));
    let reserves = load::run(IN_FLIGHT, WARMUP, RUN, {
        let (channels, products, service, n) = (
            channels.clone(),
            products.clone(),
            service.clone(),
            reservations.clone(),
        );
        move |w| {
            let mut client = InventoryServiceClient::new(channels[w % CONNECTIONS].clone());
            let i = n.fetch_add(1, Ordering::Relaxed) as usize;
            let request = ReserveStockRequest {
                reservation_id: format!("bench/{i}"),
                lines: vec![StockLine {
                    product: products[i % 100].clone(),
                    quantity: 1,
                }],
            };
            let request = authed(request, &service);
            async move { client.reserve_stock(request).await.is_ok() }
        }
    })
    .await;
    println!(
        "{}",
        row("ReserveStock, 1 line, spread over 100 products", &reserves)
    );

    let charges_made = Arc::new(AtomicU64::new(0));
    let charges = load::run(IN_FLIGHT, WARMUP, RUN, {
        let (channels, wallets, service, n) = (
            channels.clone(),
            wallets.clone(),
            service.clone(),
            charges_made.clone(),
        );
        move |w| {
            let mut client = LedgerServiceClient::new(channels[w % CONNECTIONS].clone());
            let i = n.fetch_add(1, Ordering::Relaxed) as usize;
            let request = ChargeRequest {
                payment_id: format!("bench/{i}"),
                wallet: wallets[i % wallets.len()].clone(),
                amount: eur(1),
                reference: String::new(),
            };
            let request = authed(request, &service);
            async move { client.charge(request).await.is_ok() }
        }
    })
    .await;
    println!(
        "{}",
        row(&format!("Charge, spread over {WALLETS} wallets"), &charges)
    );
}
