//! How jobs run: worker concurrency, leases, backoff, per-kind limits, the service secret.

use std::time::Duration;

use clap::Args;

use super::parse_duration;

/// How jobs run: in `keel dev` beside the services, and in `keel worker` alone. Its `Debug`
/// hides the service secret.
#[derive(Clone, Args)]
#[command(next_help_heading = "Workers")]
pub struct WorkerSettings {
    /// Jobs one process runs at once; the CPUs when unset. `0` runs no worker in `keel dev` and
    /// `keel serve` (the jobs wait for a `keel worker`).
    #[arg(long, env = "KEEL_WORKER_CONCURRENCY", global = true)]
    pub worker_concurrency: Option<usize>,

    /// How long a claimed job is held without a heartbeat before another worker may take it up
    /// (the visibility timeout; running jobs renew it every third of it).
    #[arg(long, env = "KEEL_JOB_LEASE", default_value = "30s", value_parser = parse_duration, global = true)]
    pub job_lease: Duration,

    /// The longest an idle worker waits before it looks for work again (the relay to Redis: at
    /// most 50 ms). It is woken sooner by a write of jobs (in any process, through PostgreSQL's
    /// NOTIFY), a slot that frees, and the next job that comes due: the poll catches a wake-up
    /// that was lost.
    #[arg(long, env = "KEEL_JOB_POLL", default_value = "1s", value_parser = parse_duration, global = true)]
    pub job_poll: Duration,

    /// The first wait before a failed job is tried again; it doubles, with jitter, up to
    /// `KEEL_JOB_BACKOFF_MAX`.
    #[arg(long, env = "KEEL_JOB_BACKOFF", default_value = "1s", value_parser = parse_duration, global = true)]
    pub job_backoff: Duration,

    /// The longest wait between two attempts of a failed job: how late a job notices that what
    /// it waited for (SMTP, a peer) is back.
    #[arg(long, env = "KEEL_JOB_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration, global = true)]
    pub job_backoff_max: Duration,

    /// Most jobs of a kind that run at once across every worker, as `kind=N` (comma-separated),
    /// e.g. `email.send=4`; `kind=unlimited` lifts a kind's default limit (noop's one).
    #[arg(long, env = "KEEL_JOB_LIMITS", value_delimiter = ',', value_parser = parse_limit, global = true)]
    pub job_limits: Vec<(String, Option<usize>)>,

    /// Slots of its own for a kind in each worker, as `kind=N` (comma-separated), e.g.
    /// `order.saga=64`: for a kind that waits on the network rather than the CPU. `kind=shared`
    /// puts a kind back among the shared `KEEL_WORKER_CONCURRENCY` slots.
    #[arg(long, env = "KEEL_JOB_CONCURRENCY", value_delimiter = ',', value_parser = parse_slots, global = true)]
    pub job_concurrency: Vec<(String, Option<usize>)>,

    /// How long a job that succeeded is kept (readable with GetJob, its request id replayed)
    /// before it is deleted.
    #[arg(long, env = "KEEL_JOB_RETENTION", default_value = "24h", value_parser = parse_duration, global = true)]
    pub job_retention: Duration,

    /// How long a dead job is kept (to read why it died, and retry it) before it is deleted.
    #[arg(long, env = "KEEL_DEAD_JOB_RETENTION", default_value = "7d", value_parser = parse_duration, global = true)]
    pub dead_job_retention: Duration,

    /// The secret keel's own services present to identity for a service token (the internal
    /// APIs accept nothing else). In development it is generated under the data dir; production
    /// refuses to start without it.
    #[arg(
        long,
        env = "KEEL_SERVICE_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub service_secret: Option<String>,
}

impl std::fmt::Debug for WorkerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSettings")
            .field("worker_concurrency", &self.worker_concurrency)
            .field("job_lease", &self.job_lease)
            .field("job_poll", &self.job_poll)
            .field("job_backoff", &self.job_backoff)
            .field("job_backoff_max", &self.job_backoff_max)
            .field("job_limits", &self.job_limits)
            .field("job_concurrency", &self.job_concurrency)
            .field("job_retention", &self.job_retention)
            .field("dead_job_retention", &self.dead_job_retention)
            .field(
                "service_secret",
                &self.service_secret.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl WorkerSettings {
    /// Checks what clap cannot: a retention of nothing would delete a job as it finishes (no
    /// GetJob of it, no replay of its request id).
    pub fn validate(&self) -> Result<(), super::ConfigError> {
        if self.job_retention.is_zero() {
            return Err(super::ConfigError::Zero("KEEL_JOB_RETENTION"));
        }
        if self.dead_job_retention.is_zero() {
            return Err(super::ConfigError::Zero("KEEL_DEAD_JOB_RETENTION"));
        }
        Ok(())
    }

    /// How long finished jobs are kept.
    pub fn retention(&self) -> keel_queue::Retention {
        keel_queue::Retention {
            succeeded: self.job_retention,
            dead: self.dead_job_retention,
        }
    }

    /// Jobs one process runs at once.
    pub fn concurrency(&self) -> usize {
        self.worker_concurrency.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
        })
    }

    /// What the settings say of `kind`'s limit: nothing (`None`), at most N at once
    /// (`Some(Some(N))`), or no limit at all (`Some(None)`).
    pub fn limit(&self, kind: &str) -> Option<Option<usize>> {
        of_kind(&self.job_limits, kind)
    }

    /// What the settings say of `kind`'s own slots: nothing (`None`), N of its own
    /// (`Some(Some(N))`), or the shared ones (`Some(None)`).
    pub fn slots(&self, kind: &str) -> Option<Option<usize>> {
        of_kind(&self.job_concurrency, kind)
    }
}

fn of_kind(settings: &[(String, Option<usize>)], kind: &str) -> Option<Option<usize>> {
    settings.iter().find(|(k, _)| k == kind).map(|(_, n)| *n)
}

fn parse_limit(s: &str) -> Result<(String, Option<usize>), String> {
    kind_number(s, "unlimited", "email.send=4")
}

fn parse_slots(s: &str) -> Result<(String, Option<usize>), String> {
    kind_number(s, "shared", "order.saga=64")
}

/// `kind=N` (N > 0), or `kind={none}` (`None`).
fn kind_number(s: &str, none: &str, example: &str) -> Result<(String, Option<usize>), String> {
    let (kind, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use kind=N, e.g. {example}"))?;
    let kind = kind.trim().to_owned();
    if n.trim() == none {
        return Ok((kind, None));
    }
    let n: usize = n
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: N must be a positive whole number, or `{none}`"))?;
    Ok((kind, Some(n)))
}
