//! Keeping health honest after start-up: NOT_SERVING while the database does not answer,
//! SERVING again when it does. (A cache outage does not count: reads fall through to the
//! database.)

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
                for health in &healths {
                    health.serving().await;
                }
            } else {
                tracing::error!("the database does not answer; not serving");
                for health in &healths {
                    health.not_serving().await;
                }
            }
        }
    }
}
