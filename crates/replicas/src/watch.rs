//! The watch: every interval, how far the primary has written and each replica has replayed; a
//! replica is in service while it answers and has replayed what the primary had written one lag
//! bound ago.

use std::collections::VecDeque;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Instant;

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use sea_orm::{DatabaseConnection, DbErr};

use crate::{Lsn, Pool, text};

/// The replicas' series.
#[derive(Debug, Clone)]
pub struct ReplicaMetrics {
    /// Reads by where they were served and why.
    pub(crate) reads: IntCounterVec,
    /// 1 while a replica is in service.
    pub(crate) up: IntGaugeVec,
    /// How many bytes of WAL a replica has yet to replay.
    lag: IntGaugeVec,
}

impl ReplicaMetrics {
    /// Creates the series and registers them with `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let reads = IntCounterVec::new(
            Opts::new(
                "keel_db_reads_total",
                "Reads that may be served by a read replica, by where they were served \
                 (replica, primary) and why (ok; latest, outside_a_call, no_replica, \
                 floor_unknown, replica_failed for the primary).",
            ),
            &["target", "reason"],
        )?;
        let up = IntGaugeVec::new(
            Opts::new(
                "keel_db_replica_up",
                "1 while a read replica answers and is within the lag bound.",
            ),
            &["replica"],
        )?;
        let lag = IntGaugeVec::new(
            Opts::new(
                "keel_db_replica_lag_bytes",
                "Bytes of WAL the primary has written that a read replica has not replayed.",
            ),
            &["replica"],
        )?;
        registry.register(Box::new(reads.clone()))?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        Ok(Self { reads, up, lag })
    }

    /// Runs `read` on the primary, counted with `reason`.
    pub(crate) async fn on_primary<T>(
        &self,
        reason: &str,
        read: impl Future<Output = Result<T, DbErr>>,
    ) -> Result<T, DbErr> {
        self.reads.with_label_values(&["primary", reason]).inc();
        read.await
    }
}

/// The primary's insert position.
pub(crate) async fn insert_position(primary: &DatabaseConnection) -> Result<Lsn, DbErr> {
    let text = text(primary, "SELECT pg_current_wal_insert_lsn()::text AS v")
        .await?
        .unwrap_or_default();
    text.parse().map_err(DbErr::Custom)
}

/// Starts the watch of `pool`, which ends once the pool is dropped.
pub(crate) fn spawn(primary: DatabaseConnection, pool: Weak<Pool>) {
    tokio::spawn(async move {
        // What the primary had written, and when: the oldest entry within the lag bound is the
        // least a replica must have replayed.
        let mut written: VecDeque<(Instant, Lsn)> = VecDeque::new();
        loop {
            let Some(pool) = pool.upgrade() else { return };
            let settings = pool.settings;
            look(&primary, &pool, &mut written).await;
            drop(pool);
            tokio::time::sleep(settings.interval).await;
        }
    });
}

async fn look(primary: &DatabaseConnection, pool: &Pool, written: &mut VecDeque<(Instant, Lsn)>) {
    let settings = pool.settings;
    let now = Instant::now();
    let head = match tokio::time::timeout(settings.read_timeout, insert_position(primary)).await {
        Ok(Ok(lsn)) => Some(lsn.settled()),
        _ => None,
    };
    if let Some(head) = head {
        written.push_back((now, head));
    }
    // Without a look at the primary within the lag bound, no replica can be shown to be
    // within it.
    let head_known = written
        .back()
        .is_some_and(|(at, _)| now.duration_since(*at) < settings.max_lag);
    // The newest position at least one lag bound old; until the history reaches back that far,
    // the oldest there is.
    while written.len() > 1 && now.duration_since(written[1].0) >= settings.max_lag {
        written.pop_front();
    }
    let required = written.front().map_or(Lsn::ZERO, |(_, lsn)| *lsn);
    for replica in &pool.replicas {
        let replayed = tokio::time::timeout(
            settings.read_timeout,
            text(&replica.watch, "SELECT pg_last_wal_replay_lsn()::text AS v"),
        )
        .await;
        let state = match replayed {
            Ok(Ok(Some(text))) => text.parse::<Lsn>().map_err(|e| e.to_string()),
            Ok(Ok(None)) => Err("it is not a standby (pg_last_wal_replay_lsn is null)".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer in time".into()),
        };
        let was_up = replica.up.load(Ordering::Acquire);
        let state = if head_known {
            state
        } else {
            Err("the primary's position is unknown: the lag cannot be told".into())
        };
        let up = match state {
            Ok(replayed) => {
                replica.replayed.store(replayed.0, Ordering::Release);
                let lag = head.map_or(0, |head| head.bytes_after(replayed));
                pool.metrics
                    .lag
                    .with_label_values(&[&replica.name])
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
                if replayed < required {
                    if was_up {
                        tracing::warn!(replica = %replica.name, %replayed, %required, "read replica lags past the bound; taken out");
                    }
                    false
                } else {
                    true
                }
            }
            Err(why) => {
                if was_up {
                    tracing::warn!(replica = %replica.name, why, "read replica taken out");
                }
                false
            }
        };
        if up && !was_up {
            tracing::info!(replica = %replica.name, "read replica in service");
        }
        replica.up.store(up, Ordering::Release);
        pool.metrics
            .up
            .with_label_values(&[&replica.name])
            .set(i64::from(up));
    }
}
