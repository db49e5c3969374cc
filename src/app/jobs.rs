//! The jobs of a process: its workers (the kinds of the services it runs, or of every service
//! for `keel worker`), the relay that hands jobs to Redis, the queue's metrics, and the one kind
//! that belongs to no service: cache invalidations that failed and are done again once the
//! cache answers.

use std::sync::Arc;

use async_trait::async_trait;
use keel_cache::Cache;
use keel_queue::{Failure, Handler, Job, Kind, Queue, Worker, WorkerOptions};

use crate::config::Settings;
use crate::domain::{Domain, Parts};
use crate::store::CACHE_INVALIDATE;

/// Invalidates a key once the cache answers.
struct InvalidateCache(Arc<dyn Cache>);

#[async_trait]
impl Handler for InvalidateCache {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        let key = job
            .payload
            .get("key")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| Failure::Permanent("no key".into()))?;
        self.0
            .invalidate(key)
            .await
            .map_err(|e| Failure::Retry(e.to_string()))
    }
}

/// The kinds a worker of this process runs: those of `domains`, and the cache's.
pub fn kinds(parts: &Parts<'_>, domains: &[&Domain]) -> anyhow::Result<Vec<Kind>> {
    let mut kinds = vec![Kind::new(
        CACHE_INVALIDATE,
        Arc::new(InvalidateCache(parts.cache.clone())),
    )];
    for domain in domains {
        kinds.extend(
            (domain.jobs)(parts).map_err(|e| e.context(format!("{}'s jobs", domain.name)))?,
        );
    }
    for kind in &mut kinds {
        if let Some(limit) = parts.settings.workers.limit(&kind.name) {
            kind.limit = limit;
        }
        if let Some(slots) = parts.settings.workers.slots(&kind.name) {
            kind.concurrency = slots;
        }
    }
    Ok(kinds)
}

/// A worker of `kinds` with the settings' concurrency, lease, poll and backoff.
pub fn worker(settings: &Settings, queue: &Queue, kinds: Vec<Kind>) -> Worker {
    let workers = &settings.workers;
    Worker::new(
        queue.clone(),
        kinds,
        WorkerOptions {
            id: format!(
                "{}-{}",
                hostname(),
                uuid::Uuid::new_v4()
                    .simple()
                    .to_string()
                    .get(..8)
                    .unwrap_or_default()
            ),
            concurrency: workers.concurrency(),
            lease: workers.job_lease,
            backoff: keel_queue::Backoff {
                base: workers.job_backoff,
                max: workers.job_backoff_max.max(workers.job_backoff),
            },
            poll: workers.job_poll,
        },
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}
