//! keel's own handlers past their capacity, beside a ceiling measured in the same run:
//!
//!     cargo bench --bench overload
//!
//! PlaceOrder (a transaction; prices and stock read from catalog through the mesh) offered open
//! loop at 1×, 2× and 3× its capacity, each call with a 1 s deadline, under the static limit and
//! under the adaptive one (the default). The capacity is the closed-loop rate of 50 callers
//! under the static limit, measured first; goodput is orders placed within their deadline per
//! second. The saga does not run (`--worker-concurrency 0`): its work would move the capacity
//! during the run. A fresh keel and fresh stores for each limit. Prints a Markdown section for
//! benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod load;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use load::shop::{fixtures, placing};
use load::{Keel, Report, Stores, authed};
use tonic::Code;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(1);
const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
/// Callers of the closed loop that measures the capacity.
const CALLERS: usize = 50;
const CONNECTIONS: usize = 2;

/// How the recorded calls of one rate ended.
#[derive(Default)]
struct Tally {
    placed: AtomicUsize,
    refused: AtomicUsize,
    late: AtomicUsize,
    failed: AtomicUsize,
}

impl Tally {
    fn share(&self, counter: &AtomicUsize) -> f64 {
        let all = [&self.placed, &self.refused, &self.late, &self.failed]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<usize>()
            .max(1);
        100.0 * counter.load(Ordering::Relaxed) as f64 / all as f64
    }
}

/// A keel whose services admit calls under `limit`, with its shop; no worker.
struct Shop {
    keel: Keel,
    _stores: Stores,
    channels: Vec<Channel>,
    products: Arc<Vec<String>>,
    users: Arc<Vec<String>>,
}

impl Shop {
    async fn open(limit: &str) -> Self {
        let stores = Stores::fresh().await;
        let args = [
            "--rate-limit",
            "off",
            "--auth-rate-limit",
            "off",
            "--worker-concurrency",
            "0",
            "--concurrency-limit",
            limit,
        ];
        let keel = Keel::start(&args, &stores.env()).await;
        let channels = keel.connections(CONNECTIONS).await;
        let (products, users) = fixtures(&channels[0]).await;
        Self {
            keel,
            _stores: stores,
            channels,
            products: Arc::new(products),
            users: Arc::new(users),
        }
    }

    /// PlaceOrder by caller `n`, within the deadline; how it ended.
    fn place(&self, n: usize) -> impl Future<Output = Result<(), Code>> + Send + use<> {
        let mut client = OrderServiceClient::new(self.channels[n % CONNECTIONS].clone());
        let product = &self.products[n % self.products.len()];
        let mut request = authed(placing(product), &self.users[n % self.users.len()]);
        request.set_timeout(DEADLINE);
        async move {
            match tokio::time::timeout(DEADLINE, client.place_order(request)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(status)) => Err(status.code()),
                Err(_) => Err(Code::DeadlineExceeded),
            }
        }
    }

    /// OrderService's concurrency limit now (the static one, or where the adaptive one stands).
    async fn limit(&self) -> f64 {
        let series = "keel_server_concurrency_limit{grpc_service=\"keel.orders.v1.OrderService\"}";
        self.keel.metric(series).await
    }

    /// Orders placed per second by `CALLERS` closed loops.
    async fn capacity(self: &Arc<Self>) -> Report {
        let shop = self.clone();
        load::run(CALLERS, WARMUP, MEASURE, move |n| {
            let placed = shop.place(n);
            async move { placed.await.is_ok() }
        })
        .await
    }

    /// PlaceOrder offered at `rate` a second; the report counts the orders placed.
    async fn offer(self: &Arc<Self>, rate: f64) -> (Report, Arc<Tally>) {
        let tally = Arc::new(Tally::default());
        let recorded_from = (rate * WARMUP.as_secs_f64()) as usize;
        let (shop, counts) = (self.clone(), tally.clone());
        let report = load::run_at(rate, 20_000, WARMUP, MEASURE, move |n| {
            let (placed, counts) = (shop.place(n), counts.clone());
            async move {
                let outcome = placed.await;
                if n >= recorded_from {
                    let counter = match outcome {
                        Ok(()) => &counts.placed,
                        Err(Code::ResourceExhausted) => &counts.refused,
                        Err(Code::DeadlineExceeded | Code::Cancelled) => &counts.late,
                        Err(_) => &counts.failed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                outcome.is_ok()
            }
        })
        .await;
        (report, tally)
    }
}

#[tokio::main]
async fn main() {
    println!("### PlaceOrder past its capacity (cargo bench --bench overload)\n");
    println!(
        "Each rate: {} s offered open loop after {} s of warm-up, a {} s deadline per call; the \
         ceiling is the static limit's closed-loop rate.\n",
        MEASURE.as_secs(),
        WARMUP.as_secs(),
        DEADLINE.as_secs(),
    );
    let mut ceiling = None;
    let mut rows = String::new();
    for limit in ["static", "adaptive"] {
        let shop = Arc::new(Shop::open(limit).await);
        // The same closed loop under each limit: the "50 in flight" row, where the
        // adaptive limit must refuse nothing and place no fewer orders than the static one.
        let closed = shop.capacity().await;
        println!(
            "Closed loop, {CALLERS} callers, {limit} limit: {:.0} orders/s, p50 {:.1} ms, p99 \
             {:.1} ms, {} errors; OrderService's limit after it: {:.0}.\n",
            closed.per_second(),
            closed.percentile_ms(50.0),
            closed.percentile_ms(99.0),
            closed.errors,
            shop.limit().await,
        );
        // The ceiling: the static limit's rate.
        let capacity = *ceiling.get_or_insert(closed.per_second());
        for times in [1.0, 2.0, 3.0] {
            let rate = times * capacity;
            let (report, tally) = shop.offer(rate).await;
            let goodput = tally.placed.load(Ordering::Relaxed) as f64 / MEASURE.as_secs_f64();
            // Beside the ceiling, this limit's own closed loop: the host's speed moves between
            // the two halves of a run (a fresh keel and fresh stores each), by a fifth at times.
            rows.push_str(&format!(
                "| {times}x | {limit} | {rate:.0} | {goodput:.0} | {:.2} | {:.2} | {:.0} | {:.0}% \
                 | {:.0}% | {:.0}% | {:.0} |\n",
                goodput / capacity,
                goodput / closed.per_second(),
                report.percentile_ms(99.0),
                tally.share(&tally.refused),
                tally.share(&tally.late),
                tally.share(&tally.failed),
                shop.limit().await,
            ));
        }
    }
    println!(
        "| load | limit | offered orders/s | goodput orders/s | of ceiling | of its closed loop \
         | p99 placed (ms) | refused | late | other errors | limit after |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    print!("{rows}");
}
