//! The mesh balancer against round robin, and its own cost, on in-process replicas over
//! loopback (the load generator shares the 2 cores):
//!
//!     cargo bench -p keel-server --bench balancer
//!
//! Prints a Markdown section for benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

#[path = "../tests/it/support/replica.rs"]
mod replica;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use keel_mesh::client::{ClientOptions, Methods, balanced};
use replica::{Endpoints, IDEMPOTENT, Raw, Replica};
use tonic::transport::Channel;

const CALLS: usize = 10_000;

/// The echo method as keel's own channels treat its unary reads: idempotent, one request
/// message and one answer, so that every call is buffered for a retry and its answer read whole.
fn options() -> ClientOptions {
    ClientOptions {
        methods: Methods {
            idempotent: [IDEMPOTENT.to_owned()].into(),
            single_request: [IDEMPOTENT.to_owned()].into(),
            single_response: [IDEMPOTENT.to_owned()].into(),
            ..Methods::default()
        },
        ..ClientOptions::default()
    }
}

/// The same, with the answer streamed through (as a server-streaming method's is).
fn streamed_options() -> ClientOptions {
    let mut options = options();
    options.methods.single_response.clear();
    options
}
const IN_FLIGHT: usize = 32;

/// Runs `CALLS` calls through `pick` (a channel per call), `IN_FLIGHT` at a time; returns
/// calls/s, p50 and p99 in milliseconds.
async fn run<T>(pick: impl Fn() -> T + Send + Sync + 'static) -> (f64, f64, f64)
where
    T: tonic::client::GrpcService<tonic::body::Body> + Send + 'static,
    T::Future: Send,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tower::BoxError> + Send,
    T::Error: Into<tower::BoxError>,
{
    let pick = Arc::new(pick);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (pick, next) = (pick.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < CALLS {
                    let began = Instant::now();
                    let mut grpc = tonic::client::Grpc::new(pick());
                    grpc.ready().await.map_err(Into::into).expect("ready");
                    grpc.unary(
                        tonic::Request::new(Bytes::new()),
                        http::uri::PathAndQuery::from_static(IDEMPOTENT),
                        Raw,
                    )
                    .await
                    .expect("call");
                    latencies.push(began.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let ms = |p: f64| all[((p / 100.0) * (all.len() - 1) as f64) as usize].as_secs_f64() * 1000.0;
    (CALLS as f64 / elapsed.as_secs_f64(), ms(50.0), ms(99.0))
}

async fn channel(replica: &Replica) -> Channel {
    Channel::from_shared(format!("http://{}", replica.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    replicas[2].delay_ms.store(20, Ordering::SeqCst);
    println!("### mesh client (cargo bench -p keel-server --bench balancer)\n");
    println!("{CALLS} calls, {IN_FLIGHT} in flight, in-process echo replicas on loopback.\n");
    println!("| scenario | calls/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|");

    let endpoints = Endpoints::new(replicas.iter().map(|r| r.addr));
    let mesh = balanced(endpoints, options());
    // Let health admit every replica before measuring.
    while replicas.iter().any(|r| r.calls() == 0) {
        let _ = replica::call(mesh.clone()).await;
    }
    let slow_before = replicas[2].calls();
    let (rate, p50, p99) = run({
        let mesh = mesh.clone();
        move || mesh.clone()
    })
    .await;
    let slow_share = (replicas[2].calls() - slow_before) as f64 * 100.0 / CALLS as f64;
    println!(
        "| P2C + PeakEWMA, 3 replicas, one 20 ms slower ({slow_share:.2}% of calls to the slow one) | {rate:.0} | {p50:.2} | {p99:.2} |"
    );

    let channels = [
        channel(&replicas[0]).await,
        channel(&replicas[1]).await,
        channel(&replicas[2]).await,
    ];
    let turn = Arc::new(AtomicUsize::new(0));
    let (rate, p50, p99) =
        run(move || channels[turn.fetch_add(1, Ordering::Relaxed) % 3].clone()).await;
    println!("| round robin, same 3 replicas | {rate:.0} | {p50:.2} | {p99:.2} |");

    replicas[2].delay_ms.store(0, Ordering::SeqCst);
    let single = Endpoints::new([replicas[0].addr]);
    let one = balanced(single, options());
    let streamed = balanced(Endpoints::new([replicas[0].addr]), streamed_options());
    while replica::call(one.clone()).await.is_err() {}
    while replica::call(streamed.clone()).await.is_err() {}
    // In turn, twice: the one measured first on a cold replica is not favoured or penalised.
    for round in 1..=2 {
        for (channel, answers) in [(&one, "read whole"), (&streamed, "streamed through")] {
            let channel = channel.clone();
            let (rate, p50, p99) = run(move || channel.clone()).await;
            println!(
                "| mesh channel, 1 replica, answers {answers} (round {round}) | {rate:.0} | {p50:.2} | {p99:.2} |"
            );
        }
    }
    let plain = channel(&replicas[0]).await;
    let (rate, p50, p99) = run(move || plain.clone()).await;
    println!("| plain tonic Channel, same replica | {rate:.0} | {p50:.2} | {p99:.2} |");
}
