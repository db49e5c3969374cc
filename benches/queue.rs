//! The job queue's throughput on PostgreSQL + Redis (ephemeral, started by the test kit) for a
//! no-op job, with one `keel worker` process and two, beside BullMQ running the same no-op job on
//! the same Redis in the same run (`benches/bullmq`, installed with npm on first use); then keel
//! on a Redis Cluster of three primaries (the test kit's), and on PostgreSQL alone (no Redis),
//! against the same BullMQ rates.
//!
//!     cargo bench --bench queue
//!
//! Each run adds its jobs first (through BatchCreateJobs, with no worker running), then starts the
//! workers and counts done jobs; the rate is taken between 10% and 90% done, so start-up and the
//! tail are left out for both queues alike. Prints a Markdown section for benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod load;

use std::path::Path;
use std::time::{Duration, Instant};

use load::{Keel, Stores, jobs, register};

const JOBS: usize = 20_000;
/// Jobs each worker process runs at once, for keel and BullMQ alike.
const CONCURRENCY: usize = 20;
const IN_FLIGHT: usize = 4;
/// Where keel's jobs go besides PostgreSQL.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One Redis, beside BullMQ on it.
    Redis,
    /// A Redis Cluster of three primaries.
    Cluster,
    /// No Redis: the table alone.
    PostgresAlone,
}

/// Jobs per BatchCreateJobs call.
const BATCH: usize = 1_000;
const CONNECTIONS: usize = 2;

#[tokio::main]
async fn main() {
    println!("### the job queue on PostgreSQL + Redis beside BullMQ (cargo bench --bench queue)\n");
    println!(
        "{JOBS} no-op jobs per run, added before the workers start; {CONCURRENCY} jobs at once per \
         worker process; jobs/s between 10% and 90% done. \"Redis Cluster\": keel on a cluster \
         of three primaries on this machine; \"PostgreSQL alone\": keel without Redis (its own \
         database); both against BullMQ's rate (on one Redis) with as many workers in this run.\n"
    );
    println!("| scenario | jobs/s | of BullMQ, same workers |");
    println!("|---|---|---|");
    let bullmq = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/bullmq");
    install_bullmq(&bullmq);
    let mut bull_rates = Vec::new();
    for mode in [Mode::Redis, Mode::Cluster, Mode::PostgresAlone] {
        let redis = mode == Mode::Redis;
        let mut stores = Stores::fresh().await;
        if mode == Mode::Cluster {
            let cluster = keel_testkit::RedisCluster::running().await;
            stores.redis = cluster.url;
        }
        let env: Vec<(&str, &str)> = stores
            .env()
            .into_iter()
            .filter(|(name, _)| mode != Mode::PostgresAlone || !name.starts_with("KEEL_REDIS"))
            .collect();
        let keel = api(&env).await;
        let channels = keel.connections(CONNECTIONS).await;
        let token = register(channels[0].clone(), "bench@example.com").await;
        let mode = match mode {
            Mode::Redis => "",
            Mode::Cluster => ", Redis Cluster",
            Mode::PostgresAlone => ", PostgreSQL alone",
        };
        for workers in [1, 2] {
            let started = Instant::now();
            jobs::add_noops(&channels, &token, JOBS, (BATCH, IN_FLIGHT)).await;
            let added = JOBS as f64 / started.elapsed().as_secs_f64();
            let peers = keel.peers();
            let env: Vec<(&str, &str)> = env
                .iter()
                .copied()
                .chain(peers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .collect();
            let keel_rate = drain_with_keel(workers, &env).await;
            println!(
                "| BatchCreateJobs, {BATCH} a call, {IN_FLIGHT} calls in flight (adding the jobs{mode}) | {added:.0} | |"
            );
            if redis {
                let prefix = format!("{}bull", stores.prefix);
                bull_rates.push(bullmq_rate(&bullmq, &stores.redis, &prefix, workers));
            }
            let bull_rate = bull_rates[workers - 1];
            println!(
                "| keel, {workers} `keel worker` process(es){mode} | {keel_rate:.0} | {:.2} |",
                keel_rate / bull_rate
            );
            if redis {
                println!(
                    "| BullMQ {}, {workers} node process(es) | {bull_rate:.0} | 1.00 |",
                    bullmq_version(&bullmq)
                );
            }
        }
    }
}

/// The API process, which runs no worker: the jobs wait for `keel worker`.
async fn api(env: &[(&str, &str)]) -> Keel {
    // The jobs wait for the workers started later, and a run stops counting at 90% done: the
    // quota of live jobs must hold two runs' worth.
    let quota = (2 * JOBS + 100).to_string();
    let args = [
        "--worker-concurrency",
        "0",
        "--rate-limit",
        "off",
        "--job-live-per-caller",
        &quota,
    ];
    Keel::start(&args, env).await
}

/// Starts `workers` `keel worker` processes and returns their jobs/s between 10% and 90% of
/// [`JOBS`] done (counted in their `/metrics`); stops them when done.
async fn drain_with_keel(workers: usize, env: &[(&str, &str)]) -> f64 {
    let workers = jobs::noop_workers(workers, CONCURRENCY, &[], env).await;
    let done = (JOBS / 10, JOBS * 9 / 10);
    jobs::rate_between(&workers, done, Duration::from_secs(600)).await
}

/// Installs BullMQ from its lock file unless it is there.
fn install_bullmq(dir: &Path) {
    if dir.join("node_modules/bullmq").exists() {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("npm (Node.js) to install BullMQ");
    assert!(status.success(), "npm ci in {}", dir.display());
}

fn bullmq_version(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("node_modules/bullmq/package.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// BullMQ's jobs/s for the same no-op job, workers and concurrency.
fn bullmq_rate(dir: &Path, redis: &str, prefix: &str, workers: usize) -> f64 {
    let output = std::process::Command::new("node")
        .arg(dir.join("noop.js"))
        .args([
            redis,
            prefix,
            &JOBS.to_string(),
            &workers.to_string(),
            &CONCURRENCY.to_string(),
        ])
        .output()
        .expect("node to run BullMQ");
    assert!(
        output.status.success(),
        "BullMQ: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("BullMQ's report");
    report["per_second"].as_f64().expect("per_second")
}
