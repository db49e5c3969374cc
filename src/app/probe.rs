//! Keeping health honest after start-up: NOT_SERVING while the database does not answer,
//! SERVING again when it does. Redis does not count: reads fall through to the database, jobs
//! come from the table and rate limits admit — so while Redis is away the process is ready but
//! degraded (`/readyz` says so, `keel_redis_up` reads 0).

use std::time::Duration;

use keel_server::{Drain, Health};
use sea_orm::DatabaseConnection;

/// Pings `db` every `every` until the drain starts, and flips `healths` when the answer changes.
pub async fn database(db: DatabaseConnection, healths: Vec<Health>, drain: Drain, every: Duration) {
    let mut answering = true;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = drain.started() => return,
        }
        let ok = matches!(
            tokio::time::timeout(every.max(Duration::from_secs(1)), db.ping()).await,
            Ok(Ok(()))
        );
        if ok != answering {
            answering = ok;
            if ok {
                tracing::info!("the database answers again; serving");
            } else {
                tracing::error!("the database does not answer; not serving");
            }
            for health in &healths {
                health.waiting_for("the database", !ok).await;
            }
        }
    }
}

/// Pings the Redis at `url` every `every` until the drain starts, and records on `healths`
/// whether the process is doing without it, and in `up` (`keel_redis_up`).
pub async fn redis(
    url: String,
    healths: Vec<Health>,
    up: prometheus::IntGauge,
    drain: Drain,
    every: Duration,
) {
    use fred::prelude::ClientLike as _;
    let timeout = every.clamp(Duration::from_millis(100), Duration::from_secs(1));
    let client = match keel_redis::client(&url, timeout, keel_redis::Protocol::Resp2).await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot probe Redis");
            return;
        }
    };
    let options = keel_redis::fail_fast(timeout);
    let mut answering = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let probing = client.with_options(&options);
        let pong = probing.ping::<String>(None);
        let ok = matches!(tokio::time::timeout(timeout, pong).await, Ok(Ok(_)));
        if answering != Some(ok) {
            answering = Some(ok);
            if ok {
                tracing::info!("Redis answers");
            } else {
                tracing::warn!("Redis does not answer; serving without it (degraded)");
            }
            up.set(i64::from(ok));
            for health in &healths {
                health.doing_without("redis", !ok);
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = drain.started() => return,
        }
    }
}
