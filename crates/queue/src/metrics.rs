//! The queue in `/metrics`: per kind, attempts started, succeeded, failed, retried and dead, and
//! how many jobs wait and for how long the oldest due one has; how often Redis Streams did not
//! answer and workers turned to the table; what the relay handed to Redis, and how many finished
//! jobs were deleted. Every kind a process runs reads zero from the start.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
    lost: IntCounterVec,
    running: IntGaugeVec,
    depth: IntGaugeVec,
    oldest: IntGaugeVec,
    fallbacks: IntCounter,
    roles: RoleMetrics,
    /// The kinds this process runs: they read zero when nothing of theirs waits.
    runs: Arc<Mutex<BTreeSet<String>>>,
}

/// What the roles one process at a time plays did: the relay and the pruner.
#[derive(Debug, Clone)]
struct RoleMetrics {
    relaying: IntGauge,
    handed: IntCounter,
    handed_again: IntCounter,
    pruned: IntCounter,
}

impl RoleMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).and_then(|c| {
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            })
        };
        let relaying = IntGauge::new(
            "keel_queue_relaying",
            "1 while this process holds the relay's lease: one process at a time hands jobs to \
             Redis.",
        )?;
        registry.register(Box::new(relaying.clone()))?;
        Ok(Self {
            relaying,
            handed: counter(
                "keel_queue_relay_handed_total",
                "Jobs this process's relay handed to Redis.",
            )?,
            handed_again: counter(
                "keel_queue_relay_handed_again_total",
                "Waiting jobs to be handed to Redis again because it had lost them (restarted \
                 empty).",
            )?,
            pruned: counter(
                "keel_queue_jobs_pruned_total",
                "Finished jobs deleted after their retention window.",
            )?,
        })
    }
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
            lost: counter(
                "keel_queue_jobs_lost_total",
                "Attempts stopped because another worker took their job over.",
            )?,
            running: gauge(
                "keel_queue_running",
                "Attempts this process is running now.",
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
            roles: RoleMetrics::register(registry)?,
            runs: Arc::default(),
        })))
    }

    /// This process runs `kinds`: each of their series reads zero until it moves, so that a
    /// rate, an alert or an autoscaler reading the queue's depth sees 0 rather than nothing.
    pub fn runs<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        let Some(r) = &self.0 else {
            return;
        };
        let mut runs = r.runs.lock().expect("queue metrics lock");
        for kind in kinds {
            for counter in [
                &r.started,
                &r.succeeded,
                &r.failed,
                &r.retried,
                &r.dead,
                &r.lost,
            ] {
                counter.with_label_values(&[kind]);
            }
            r.depth.with_label_values(&[kind]);
            r.oldest.with_label_values(&[kind]);
            r.running.with_label_values(&[kind]);
            runs.insert(kind.to_owned());
        }
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

    /// An attempt of a `kind` job runs until the returned guard is dropped.
    pub fn running(&self, kind: &str) -> Running {
        let gauge = self
            .0
            .as_ref()
            .map(|r| r.running.with_label_values(&[kind]));
        if let Some(gauge) = &gauge {
            gauge.inc();
        }
        Running(gauge)
    }

    /// An attempt of a `kind` job lost it to another worker and stopped.
    pub fn lost(&self, kind: &str) {
        self.count(|r| &r.lost, kind);
    }

    /// The relay handed `n` jobs to Redis.
    pub fn handed(&self, n: usize) {
        if let Some(r) = &self.0 {
            r.roles.handed.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }

    /// The relay found Redis without what it was handed: `n` waiting jobs are to be handed
    /// again.
    pub fn handed_again(&self, n: u64) {
        if let Some(r) = &self.0 {
            r.roles.handed_again.inc_by(n);
        }
    }

    /// Whether this process holds the relay's lease now.
    pub fn relaying(&self, held: bool) {
        if let Some(r) = &self.0 {
            r.roles.relaying.set(i64::from(held));
        }
    }

    /// `n` finished jobs were deleted.
    pub fn pruned(&self, n: u64) {
        if let Some(r) = &self.0 {
            r.roles.pruned.inc_by(n);
        }
    }

    /// Redis Streams did not answer: workers claim from the table for a while.
    pub fn fell_back(&self) {
        if let Some(r) = &self.0 {
            r.fallbacks.inc();
        }
    }

    /// What waits, per kind: `(kind, depth, oldest due job's wait in milliseconds)`. KindLimits this
    /// process runs that no longer wait read zero; others' series go.
    pub fn waiting(&self, depths: &[(String, i64, i64)]) {
        let Some(r) = &self.0 else {
            return;
        };
        r.depth.reset();
        r.oldest.reset();
        for kind in r.runs.lock().expect("queue metrics lock").iter() {
            r.depth.with_label_values(&[kind]).set(0);
            r.oldest.with_label_values(&[kind]).set(0);
        }
        for (kind, depth, oldest_ms) in depths {
            r.depth.with_label_values(&[kind]).set(*depth);
            r.oldest.with_label_values(&[kind]).set(oldest_ms / 1000);
        }
    }
}

/// An attempt counted in `keel_queue_running` until dropped.
#[derive(Debug)]
pub struct Running(Option<prometheus::IntGauge>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(registry: &Registry, name: &str) -> Vec<(String, f64)> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                let kind = m.get_label()[0].value().to_owned();
                (
                    kind,
                    m.get_counter().get_value() + m.get_gauge().get_value(),
                )
            })
            .collect()
    }

    #[test]
    fn kinds_a_process_runs_read_zero_before_anything_happens_and_after_their_queue_empties() {
        let registry = Registry::new();
        let metrics = QueueMetrics::register(&registry).unwrap();
        metrics.runs(["email.send"]);
        for name in [
            "keel_queue_jobs_started_total",
            "keel_queue_jobs_dead_total",
            "keel_queue_depth",
            "keel_queue_oldest_age_seconds",
        ] {
            assert_eq!(
                series(&registry, name),
                [("email.send".into(), 0.0)],
                "{name}"
            );
        }

        metrics.waiting(&[("email.send".into(), 3, 4000), ("other".into(), 1, 0)]);
        let depth = series(&registry, "keel_queue_depth");
        assert_eq!(depth, [("email.send".into(), 3.0), ("other".into(), 1.0)]);
        metrics.waiting(&[]);
        assert_eq!(
            series(&registry, "keel_queue_depth"),
            [("email.send".into(), 0.0)]
        );
        assert_eq!(
            series(&registry, "keel_queue_oldest_age_seconds"),
            [("email.send".into(), 0.0)]
        );
    }
}
