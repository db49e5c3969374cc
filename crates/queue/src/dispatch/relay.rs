//! The outbox relay: one process at a time (under a lease) hands the table's due jobs to their
//! Redis streams — Redis first, then the mark that it took them — and hands every waiting job
//! again when the Redis it talks to is not the one it handed them to: the marker it leaves there
//! holds that server's run id, which a restart (empty, or from a snapshot that may lack recent
//! entries) or a failover changes.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use super::streams::{COMMAND, JOB_FIELD, bounded, queue_key, stream_key};
use crate::QueueMetrics;
use crate::job::{at_most_until, now_ms};
use crate::store::{JobStore, Lease, Unhanded};

/// The role's name in the leases table.
const ROLE: &str = "relay";

/// How long a relay that stopped answering keeps the role from the others; the workers' table
/// sweep moves jobs meanwhile.
const TERM: Duration = Duration::from_secs(5);

/// Most jobs handed in one pass.
const BATCH: usize = 500;

/// The longest the relay waits for Redis to take a pass's jobs.
const XADD_BOUND: Duration = Duration::from_secs(2);

/// The relay of one process.
pub struct Relay {
    /// The jobs table.
    pub store: JobStore,
    /// Its Redis client.
    pub client: Client,
    /// The prefix of every key.
    pub prefix: String,
    /// Who this process is, in the leases table and the marker.
    pub holder: String,
    /// Counts what it hands.
    pub metrics: QueueMetrics,
    /// The Redis (run id) every waiting job was last handed again for: a marker that cannot be
    /// set does not hand them again on every pass.
    pub handed_again_for: Option<String>,
    /// Wakes it (a write of jobs), and what it wakes once it lets go of the rows it marked.
    pub(crate) wake: crate::wake::Wake,
}

/// The key that holds the run id of the Redis the relay handed jobs to.
pub fn marker_key(prefix: &str) -> String {
    queue_key(prefix, "handoff")
}

impl Relay {
    /// Hands due jobs while this process holds the role, woken by a write of jobs, when the
    /// next waiting job comes due, or every `idle` (what catches a wake-up lost, and a Redis
    /// that lost what it was handed), until `stopped` resolves (then gives the role up).
    pub async fn run(
        mut self,
        idle: Duration,
        stopped: impl std::future::Future<Output = ()> + Send,
    ) {
        let mut stopped = std::pin::pin!(stopped);
        let mut lease = self.role();
        let wake = self.wake.relay.clone();
        loop {
            let woken = wake.notified();
            let began = now_ms();
            let held = lease.hold(&self.store).await;
            self.metrics.relaying(held);
            let handed = if held { self.pass(&mut lease).await } else { 0 };
            if handed < BATCH {
                // Not holding the role, look again once a second, woken by nothing (a write of
                // jobs is the holder's to hand): a holder that stopped is replaced within its
                // term and that.
                let rest = async {
                    match held {
                        true => {
                            let due = self.store.next_unhanded(began).await.unwrap_or_else(|e| {
                                tracing::warn!(error = %e, "cannot read when jobs come due");
                                None
                            });
                            drop(tokio::time::timeout(at_most_until(idle, due), woken).await);
                        }
                        false => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                };
                tokio::select! {
                    () = &mut stopped => break,
                    () = rest => {}
                }
            }
        }
        lease.release(&self.store).await;
        self.metrics.relaying(false);
    }

    /// The lease on the relay's role, as this process holds it (once taken).
    pub(super) fn role(&self) -> Lease {
        Lease::new(ROLE, &self.holder, TERM, Duration::from_secs(1))
    }

    /// One pass, while this process holds the role under `lease`: makes sure Redis still holds
    /// what it was handed, then hands the next due jobs. Returns how many it handed and
    /// marked (none when the mark took nothing).
    pub(super) async fn pass(&mut self, lease: &mut Lease) -> usize {
        if let Err(e) = self.redis_kept().await {
            tracing::warn!(error = %e, "relay cannot check Redis; workers claim from the table");
            return 0;
        }
        let due = match self.store.unhanded(BATCH).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "relay cannot read the jobs table");
                return 0;
            }
        };
        if due.is_empty() {
            return 0;
        }
        // The role should stay this process's until Redis has them: a relay that took it over
        // meanwhile would hand the same jobs again (the mark is fenced by the lease; Redis is
        // not). Renewed when less than twice the XADD's bound is left; a lease lost meanwhile
        // hands nothing. Best effort: the takeover is judged by the other process's clock, and
        // an XADD given up on may still be applied. A job handed twice is claimed once.
        if !lease.hold_for(&self.store, XADD_BOUND * 2).await {
            tracing::info!("the relay lost its role before handing; another process hands");
            return 0;
        }
        if let Err(e) = self.xadd(&due).await {
            tracing::warn!(error = %e, "cannot hand jobs to Redis; workers claim them from the table");
            return 0;
        }
        // Redis has them: a mark that fails now only means they are handed again.
        self.metrics.handed(due.len());
        match self.store.handed(&due, &self.holder).await {
            Ok(0) => 0,
            Ok(_) => {
                self.let_go();
                due.len()
            }
            // Counted as nothing handed: the relay rests before it looks again, rather than
            // hand the same jobs at once (a lease lost in the table, a failing database).
            Err(e) => {
                tracing::warn!(error = %e, "relay cannot mark jobs handed");
                0
            }
        }
    }

    /// Hands every waiting job again when the marker does not hold the run id of the Redis
    /// that answers now (it restarted, was restored or failed over, or was never handed any),
    /// then sets the marker to it.
    async fn redis_kept(&mut self) -> Result<(), CheckError> {
        let marker = marker_key(&self.prefix);
        let found: Option<String> = bounded(COMMAND, self.client.get(&marker)).await?;
        // Asked of the node that holds the queue's keys (on a cluster; the one server else).
        let slot = fred::util::redis_keyslot(marker.as_bytes());
        let info = CustomCommand::new_static("INFO", ClusterHash::Custom(slot), false);
        let info: String = bounded(COMMAND, self.client.custom(info, vec!["server"])).await?;
        let run_id = info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned();
        if found.as_deref() == Some(run_id.as_str()) {
            return Ok(());
        }
        if self.handed_again_for.as_deref() != Some(run_id.as_str()) {
            let again = self.store.hand_again(&self.holder).await?;
            if again > 0 {
                tracing::warn!(
                    jobs = again,
                    "Redis may have lost the jobs handed to it; handing them again"
                );
                self.metrics.handed_again(again);
                self.let_go();
            }
            self.handed_again_for = Some(run_id.clone());
        }
        let _: () = bounded(COMMAND, self.client.set(&marker, run_id, None, None, false)).await?;
        Ok(())
    }

    /// Wakes the claimers of every process after the relay wrote to waiting jobs: a claim
    /// skips the rows the relay holds (`SKIP LOCKED`), and one that found nothing else waits
    /// for a wake-up — the claimers from the table of limited kinds, whose stream entries are
    /// never read, would otherwise take those jobs at their next poll only.
    fn let_go(&self) {
        self.wake.claimers_everywhere();
    }

    /// Appends `due` to their kinds' streams, in one round trip.
    async fn xadd(&self, due: &[Unhanded]) -> Result<(), fred::error::Error> {
        let pipeline = self.client.pipeline();
        for job in due {
            let _: () = pipeline
                .xadd(
                    stream_key(&self.prefix, &job.kind),
                    false,
                    None::<()>,
                    "*",
                    vec![(JOB_FIELD, job.id.as_str())],
                )
                .await?;
        }
        let _: Vec<Value> = bounded(XADD_BOUND, pipeline.all()).await?;
        Ok(())
    }
}

/// Why the relay could not tell whether Redis kept what it was handed.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error(transparent)]
    Table(#[from] crate::QueueError),
}
