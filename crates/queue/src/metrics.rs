//! The queue in `/metrics`: per kind, attempts started, succeeded, failed, retried and dead, and
//! how many jobs wait and for how long the oldest due one has; how often Redis Streams did not
//! answer and workers turned to the table.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The queue's metrics; a no-op until registered.
#[derive(Debug, Clone, Default)]
pub struct QueueMetrics(Option<Registered>);

#[derive(Debug, Clone)]
struct Registered {
    started: IntCounterVec,
    succeeded: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    dead: IntCounterVec,
    depth: IntGaugeVec,
    oldest: IntGaugeVec,
    fallbacks: IntCounter,
}

impl QueueMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["kind"]).and_then(|c| {
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            })
        };
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["kind"]).and_then(|g| {
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            })
        };
        let fallbacks = IntCounter::new(
            "keel_queue_table_fallbacks_total",
            "Times Redis Streams did not answer and workers claimed from the SQL table instead.",
        )?;
        registry.register(Box::new(fallbacks.clone()))?;
        Ok(Self(Some(Registered {
            started: counter("keel_queue_jobs_started_total", "Job attempts started.")?,
            succeeded: counter("keel_queue_jobs_succeeded_total", "Jobs done.")?,
            failed: counter("keel_queue_jobs_failed_total", "Job attempts that failed.")?,
            retried: counter(
                "keel_queue_jobs_retried_total",
                "Failed attempts that will be tried again.",
            )?,
            dead: counter(
                "keel_queue_jobs_dead_total",
                "Jobs dead after their last attempt.",
            )?,
            depth: gauge(
                "keel_queue_depth",
                "Jobs waiting: queued, or failed and awaiting their retry.",
            )?,
            oldest: gauge(
                "keel_queue_oldest_age_seconds",
                "How long the oldest due job has waited.",
            )?,
            fallbacks,
        })))
    }

    fn count(&self, pick: impl Fn(&Registered) -> &IntCounterVec, kind: &str) {
        if let Some(r) = &self.0 {
            pick(r).with_label_values(&[kind]).inc();
        }
    }

    /// An attempt of a `kind` job started.
    pub fn started(&self, kind: &str) {
        self.count(|r| &r.started, kind);
    }

    /// A `kind` job is done.
    pub fn succeeded(&self, kind: &str) {
        self.count(|r| &r.succeeded, kind);
    }

    /// An attempt of a `kind` job failed.
    pub fn failed(&self, kind: &str) {
        self.count(|r| &r.failed, kind);
    }

    /// A failed `kind` job will be tried again.
    pub fn retried(&self, kind: &str) {
        self.count(|r| &r.retried, kind);
    }

    /// A `kind` job is dead.
    pub fn dead(&self, kind: &str) {
        self.count(|r| &r.dead, kind);
    }

    /// Redis Streams did not answer: workers claim from the table for a while.
    pub fn fell_back(&self) {
        if let Some(r) = &self.0 {
            r.fallbacks.inc();
        }
    }

    /// What waits, per kind: `(kind, depth, oldest due job's wait in milliseconds)`. Kinds that
    /// no longer wait read zero.
    pub fn waiting(&self, depths: &[(String, i64, i64)]) {
        let Some(r) = &self.0 else {
            return;
        };
        r.depth.reset();
        r.oldest.reset();
        for (kind, depth, oldest_ms) in depths {
            r.depth.with_label_values(&[kind]).set(*depth);
            r.oldest.with_label_values(&[kind]).set(oldest_ms / 1000);
        }
    }
}
