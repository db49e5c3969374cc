//! The queue held at half its peak rate for half an hour (ephemeral PostgreSQL + Redis from the
//! test kit, one `keel worker` process): whether the job table, its size on disk and the
//! processes' memory stay flat once finished jobs start to be deleted, and whether every job
//! added ran exactly once.
//!
//!     cargo bench --bench soak                       # 30 minutes
//!     KEEL_SOAK_MINUTES=5 cargo bench --bench soak   # a shorter look
//!
//! The peak is measured first, in the same run: 20,000 no-op jobs added before the worker
//! starts, jobs/s between 10% and 90% done. Then no-op jobs are added at half that rate, a batch
//! every few milliseconds, for the soak's length, with finished jobs kept for [`RETENTION`] (the
//! pruner runs every minute). A sample a minute: jobs added and done, rows in `queue_jobs`, its
//! size on disk with its indexes, and each process's RSS. At the end the adding stops, the worker
//! finishes what waits, and its counters say how many jobs ran and how many attempts started.
//! Prints a Markdown section for benches/RESULTS.md.

mod load;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use load::{Keel, Stores, Worker, jobs, login, register, rss_mib};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement};

/// Jobs of the peak measurement.
const PEAK_JOBS: usize = 20_000;
/// Jobs one worker process runs at once, as in `cargo bench --bench queue`.
const CONCURRENCY: usize = 20;
/// How long a finished job is kept.
const RETENTION: &str = "2m";
/// Most jobs per BatchCreateJobs call.
const BATCH: usize = 1_000;
/// Who adds the jobs.
const EMAIL: &str = "soak@example.com";
/// How often the adder logs in again (an access token lives 15 minutes).
const RELOGIN: Duration = Duration::from_secs(600);

#[tokio::main]
async fn main() {
    let minutes: u64 = std::env::var("KEEL_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30);
    let stores = Stores::fresh().await;
    let db = sea_orm::Database::connect(&stores.database)
        .await
        .expect("the bench's own connection");
    let retention = ["--job-retention", RETENTION];
    let quota = (10 * PEAK_JOBS).to_string();
    let mut api_args = vec!["--worker-concurrency", "0", "--rate-limit", "off"];
    api_args.extend(["--job-live-per-caller", &quota]);
    api_args.extend(retention);
    let api = Keel::start(&api_args, &stores.env()).await;
    let channels = api.connections(2).await;
    let token = register(channels[0].clone(), EMAIL).await;
    let peers = api.peers();
    let env: Vec<(&str, &str)> = stores
        .env()
        .into_iter()
        .chain(peers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();

    jobs::add_noops(&channels, &token, PEAK_JOBS, (BATCH, 4)).await;
    let workers = jobs::noop_workers(1, CONCURRENCY, &retention, &env).await;
    let window = (PEAK_JOBS / 10, PEAK_JOBS * 9 / 10);
    let peak = jobs::rate_between(&workers, window, Duration::from_secs(600)).await;
    let rate = peak / 2.0;
    settle(&workers, PEAK_JOBS).await;

    println!(
        "### the queue held at half its peak for {minutes} minutes (cargo bench --bench soak)\n"
    );
    println!(
        "One `keel worker` process, {CONCURRENCY} jobs at once, PostgreSQL + Redis; peak \
         {peak:.0} no-op jobs/s (measured first, in this run); held at {rate:.0} jobs/s; finished \
         jobs kept {RETENTION}, the pruner runs every minute.\n"
    );
    println!(
        "| minute | added | done | rows in queue_jobs | queue_jobs on disk (MiB) | worker RSS (MiB) | API RSS (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let added = Arc::new(AtomicUsize::new(PEAK_JOBS));
    let soak = Duration::from_secs(minutes * 60);
    let adder = tokio::spawn(add_at(rate, soak, channels.clone(), added.clone()));
    let started = Instant::now();
    for minute in 0..=minutes {
        let at = started + Duration::from_secs(minute * 60);
        tokio::time::sleep_until(at.into()).await;
        let (rows, bytes) = table(&db).await;
        println!(
            "| {minute} | {} | {} | {rows} | {:.1} | {:.1} | {:.1} |",
            added.load(Ordering::Relaxed),
            jobs::succeeded(&workers).await,
            bytes as f64 / 1_048_576.0,
            rss_mib(workers[0].child.id().unwrap_or(0)),
            rss_mib(api.pid),
        );
    }
    adder.await.unwrap();
    let added = added.load(Ordering::Relaxed);
    settle(&workers, added).await;
    let done = jobs::succeeded(&workers).await;
    let started = jobs::sum(&workers, r#"keel_queue_jobs_started_total{kind="noop"}"#).await;
    let pruned = jobs::sum(&workers, "keel_queue_jobs_pruned_total").await
        + api.metric("keel_queue_jobs_pruned_total").await as usize;
    println!(
        "\n{added} jobs added, {done} done ({} lost), {started} attempts started ({} more than \
         jobs done); {pruned} finished jobs deleted by the pruner.\n",
        added - done.min(added),
        started.saturating_sub(done),
    );
}

/// Adds no-op jobs at `rate` a second for `soak`, counting them in `added`, logging in again
/// every [`RELOGIN`].
async fn add_at(
    rate: f64,
    soak: Duration,
    channels: Vec<tonic::transport::Channel>,
    added: Arc<AtomicUsize>,
) {
    let (started, mut sent) = (Instant::now(), 0);
    let mut token = (Instant::now(), login(channels[0].clone(), EMAIL).await);
    while started.elapsed() < soak {
        let due = (rate * started.elapsed().as_secs_f64()) as usize;
        if due <= sent {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        if token.0.elapsed() >= RELOGIN {
            token = (Instant::now(), login(channels[0].clone(), EMAIL).await);
        }
        let n = (due - sent).min(BATCH);
        jobs::add_noops(&channels, &token.1, n, (BATCH, 1)).await;
        sent += n;
        added.fetch_add(n, Ordering::Relaxed);
    }
}

/// Waits (at most ten minutes) until `workers` have done `jobs` jobs.
async fn settle(workers: &[Worker], jobs: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while jobs::succeeded(workers).await < jobs {
        assert!(Instant::now() < deadline, "the worker ran {jobs} jobs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows in `queue_jobs`, and its size on disk with its indexes (bytes).
async fn table(db: &DatabaseConnection) -> (i64, i64) {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS n, pg_total_relation_size('queue_jobs') AS bytes FROM queue_jobs",
        ))
        .await
        .expect("the job table")
        .expect("one row");
    (
        row.try_get("", "n").unwrap(),
        row.try_get("", "bytes").unwrap(),
    )
}
