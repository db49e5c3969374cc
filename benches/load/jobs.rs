//! No-op jobs for the queue's benches: added in bulk through BatchCreateJobs, run by `keel
//! worker` processes, counted in their `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel::proto::keel::jobs::v1::job_service_client::JobServiceClient;
use keel::proto::keel::jobs::v1::{BatchCreateJobsRequest, CreateJobRequest, Job};

use super::{Worker, authed};

/// Adds `jobs` no-op jobs through BatchCreateJobs, `batch` a call, `in_flight` calls at once
/// spread over `channels`.
pub async fn add_noops(
    channels: &[tonic::transport::Channel],
    token: &str,
    jobs: usize,
    (batch, in_flight): (usize, usize),
) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..in_flight {
        let mut client = JobServiceClient::new(channels[i % channels.len()].clone());
        let (next, token) = (next.clone(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= jobs {
                    break;
                }
                let request = BatchCreateJobsRequest {
                    requests: (from..jobs.min(from + batch)).map(|_| noop()).collect(),
                };
                client
                    .batch_create_jobs(authed(request, &token))
                    .await
                    .expect("BatchCreateJobs");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// One no-op job, with a request id of its own.
fn noop() -> CreateJobRequest {
    CreateJobRequest {
        job: Some(Job {
            r#type: "noop".into(),
            ..Job::default()
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
    }
}

/// Starts `count` `keel worker` processes running `concurrency` jobs at once, with `args` after
/// those: `noop` runs one at a time across the fleet by default, and the benches lift that limit.
pub async fn noop_workers(
    count: usize,
    concurrency: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> Vec<Worker> {
    let concurrency = concurrency.to_string();
    let mut all = vec!["--worker-concurrency", &concurrency];
    all.extend(["--job-limits", "noop=unlimited"]);
    all.extend(args);
    let mut workers = Vec::new();
    for _ in 0..count {
        workers.push(Worker::start(&all, env).await);
    }
    workers
}

/// The sum of `series` over `workers`' `/metrics`.
pub async fn sum(workers: &[Worker], series: &str) -> usize {
    let mut sum = 0.0;
    for worker in workers {
        sum += worker.metric(series).await;
    }
    sum as usize
}

/// How often [`rate_between`] reads the workers' counts. Each read is a whole `/metrics` page
/// from every worker (~140 KB, mostly the gRPC histograms' buckets), encoded on the cores the
/// drain runs on; BullMQ's count is one Redis command. The rate is exact at any interval (taken
/// between two readings of a count and an instant); `bullmq/noop.js` polls as often.
const POLL: Duration = Duration::from_millis(100);

/// No-op jobs done by `workers`.
pub async fn succeeded(workers: &[Worker]) -> usize {
    sum(workers, r#"keel_queue_jobs_succeeded_total{kind="noop"}"#).await
}

/// The jobs/s `workers` reach between `from` and `to` no-op jobs done (polled every [`POLL`], for
/// at most `limit`).
pub async fn rate_between(workers: &[Worker], (from, to): (usize, usize), limit: Duration) -> f64 {
    let deadline = Instant::now() + limit;
    let mut start = None;
    loop {
        assert!(Instant::now() < deadline, "keel's workers ran {to} jobs");
        let (now, count) = (Instant::now(), succeeded(workers).await);
        if start.is_none() && count >= from {
            start = Some((now, count));
        }
        if count >= to {
            let (then, at) = start.unwrap_or((now, count));
            return (count - at) as f64 / now.duration_since(then).as_secs_f64();
        }
        tokio::time::sleep(POLL).await;
    }
}
