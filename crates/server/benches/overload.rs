//! Overload and tail latency, each beside a ceiling measured in the same run:
//!
//!     cargo bench -p keel-server --bench overload
//!
//! - Goodput (calls answered within their 200 ms deadline) and p99 under 1x, 2x and 3x the
//!   capacity of the model service in `tests/it/support/work.rs` (16 "cores", 64 ms a call),
//!   static limit of 1000 against the adaptive limit; the ceiling is the model's capacity as
//!   measured closed-loop with 16 calls in flight.
//! - p99 of reads over the mesh client with one of three replicas stalled (each of its calls
//!   takes a second), hedging off and on; the ceiling is the p99 with no replica stalled.
//!
//! Prints a Markdown section for benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

#[path = "../tests/it/support/replica.rs"]
mod replica;
#[path = "../tests/it/support/work.rs"]
mod work;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_mesh::client::{ClientOptions, Hedging, Methods, balanced};
use keel_server::shed::Concurrency;
use replica::{Endpoints, IDEMPOTENT, Raw, Replica};
use work::{Outcome, capacity, count, offer, serve};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at].as_secs_f64() * 1000.0
}

/// The model's capacity, measured: calls/s with exactly one call per core in flight.
async fn ceiling() -> f64 {
    let (url, _) = serve(Concurrency::Static(1000)).await;
    let calls = (capacity() * 3.0) as usize;
    let started = Instant::now();
    // 16 closed loops, one per core: `calls / 16` each.
    let loops: Vec<_> = (0..work::PARALLEL as usize)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let per_loop = calls / work::PARALLEL as usize;
                let mut done = 0;
                for _ in 0..per_loop {
                    let answered = offer(&url, 1, 1000.0, |_| "default").await;
                    done += count(&answered, None, Outcome::Answered);
                }
                done
            })
        })
        .collect();
    let mut answered = 0;
    for l in loops {
        answered += l.await.unwrap();
    }
    answered as f64 / started.elapsed().as_secs_f64()
}

async fn overload_rows(ceiling: f64) -> String {
    let mut out = String::from(
        "| load | limit | offered calls/s | goodput calls/s | of ceiling | p99 answered (ms) \
         | refused | late | limit at end |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for times in [1.0, 2.0, 3.0] {
        for (name, concurrency) in [
            ("static 1000", Concurrency::Static(1000)),
            ("adaptive", Concurrency::adaptive(1000)),
        ] {
            let rate = times * capacity();
            let (url, shed) = serve(concurrency).await;
            // One second to settle, three measured.
            offer(&url, rate as usize, rate, |_| "default").await;
            let started = Instant::now();
            let calls = offer(&url, (rate * 3.0) as usize, rate, |_| "default").await;
            let took = started.elapsed().as_secs_f64();
            let answered = count(&calls, None, Outcome::Answered);
            let mut latencies: Vec<Duration> = calls
                .iter()
                .filter(|c| c.outcome == Outcome::Answered)
                .map(|c| c.latency)
                .collect();
            latencies.sort();
            let share = |o| 100.0 * count(&calls, None, o) as f64 / calls.len() as f64;
            let goodput = answered as f64 / took;
            out.push_str(&format!(
                "| {times}x | {name} | {rate:.0} | {goodput:.0} | {:.2} | {:.0} | {:.0}% | {:.0}% \
                 | {:.0} |\n",
                goodput / ceiling,
                percentile(&latencies, 0.99),
                share(Outcome::Refused),
                share(Outcome::Late),
                shed.limit("test.Work").unwrap(),
            ));
        }
    }
    out
}

/// `calls` reads over `channel`, 8 in flight; sorted latencies and failures.
async fn reads(channel: keel_mesh::client::MeshChannel, calls: usize) -> (Vec<Duration>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (channel, next) = (channel.clone(), next.clone());
            tokio::spawn(async move {
                let (mut latencies, mut failed) = (Vec::new(), 0);
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let began = Instant::now();
                    let mut grpc = tonic::client::Grpc::new(channel.clone());
                    grpc.ready().await.unwrap();
                    let answer = grpc
                        .unary(
                            tonic::Request::new(Bytes::new()),
                            http::uri::PathAndQuery::from_static(IDEMPOTENT),
                            Raw,
                        )
                        .await;
                    match answer {
                        Ok(_) => latencies.push(began.elapsed()),
                        Err(_) => failed += 1,
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for worker in workers {
        let (latencies, f) = worker.await.unwrap();
        all.extend(latencies);
        failed += f;
    }
    all.sort();
    (all, failed)
}

async fn hedging_rows() -> String {
    let mut out = String::from(
        "| replicas | hedging | p50 (ms) | p99 (ms) | p99 of ceiling | max (ms) | failed | hedges |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut ceiling = f64::NAN;
    for (stalled, hedging) in [(false, false), (true, false), (true, true)] {
        let replicas = [
            Replica::start().await,
            Replica::start().await,
            Replica::start().await,
        ];
        for r in &replicas {
            r.delay_ms.store(2, Ordering::SeqCst);
        }
        let registry = prometheus::Registry::new();
        let metrics = keel_mesh::client::ClientMetrics::register(&registry).unwrap();
        let options = ClientOptions {
            peer: "echo".into(),
            metrics: Some(metrics),
            methods: Methods {
                idempotent: [IDEMPOTENT.to_owned()].into(),
                no_side_effects: [IDEMPOTENT.to_owned()].into(),
                single_request: [IDEMPOTENT.to_owned()].into(),
                ..Methods::default()
            },
            default_timeout: Some(Duration::from_secs(5)),
            hedging: hedging.then(Hedging::default),
            ..ClientOptions::default()
        };
        let channel = balanced(Endpoints::new(replicas.iter().map(|r| r.addr)), options);
        // Warm up: every replica admitted, the read's p95 learnt.
        reads(channel.clone(), 300).await;
        if stalled {
            replicas[0].delay_ms.store(1000, Ordering::SeqCst);
        }
        let (latencies, failed) = reads(channel, 3000).await;
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        if !stalled {
            ceiling = p99;
        }
        let hedges: f64 = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "keel_mesh_hedges_total")
            .flat_map(|f| f.get_metric().iter())
            .map(|m| m.get_counter().get_value())
            .fold(0.0, |a, b| a + b);
        out.push_str(&format!(
            "| {} | {} | {p50:.1} | {p99:.1} | {:.1}x | {:.0} | {failed} | {hedges:.0} |\n",
            if stalled {
                "1 of 3 stalled (1 s a call)"
            } else {
                "3 healthy"
            },
            if hedging { "on" } else { "off" },
            p99 / ceiling,
            percentile(&latencies, 1.0),
        ));
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ceiling = ceiling().await;
    let overload = overload_rows(ceiling).await;
    let hedging = hedging_rows().await;
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "## Overload and hedging ({date})\n\n`cargo bench -p keel-server --bench overload`, \
         {} cores. Open loop, 200 ms deadlines; the model service has 16 \"cores\" of 64 ms a call. \
         Ceiling: its capacity measured closed-loop with 16 calls in flight, {ceiling:.0} calls/s.\n\n\
         {overload}\nReads over the mesh client (3 in-process replicas, 2 ms a call, 8 in flight, \
         3000 calls after 300 of warm-up); the ceiling is the p99 with no replica stalled.\n\n\
         {hedging}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
