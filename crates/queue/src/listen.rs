//! PostgreSQL notifications as they arrive: one LISTEN connection per channel and process,
//! made again (with a backoff) whenever it is lost, until the pool closes.

use std::time::Duration;

use sea_orm::sqlx::PgPool;
use sea_orm::sqlx::postgres::PgListener;

/// The channel a write of jobs notifies at its commit (a trigger on the jobs table), and a
/// worker when a slot of a limited kind came free, with an empty payload: PostgreSQL folds a
/// transaction's notifications into one.
pub const JOBS_CHANNEL: &str = "keel_queue_jobs";

/// Calls `heard` with the payload of every notification on `channel` in `pool`'s database,
/// from a connection of its own, until the pool closes. A notification sent while the
/// connection is being made again is lost: whoever listens keeps a slow poll besides.
pub async fn listen(pool: PgPool, channel: &'static str, heard: impl Fn(&str) + Send + 'static) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(channel).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        match listener.await {
            Ok(mut listener) => {
                backoff = Duration::from_millis(100);
                loop {
                    match listener.recv().await {
                        Ok(notification) => heard(notification.payload()),
                        Err(e) => {
                            tracing::warn!(%channel, error = %e, "notifications interrupted");
                            break;
                        }
                    }
                }
            }
            Err(e) if pool.is_closed() => {
                tracing::debug!(%channel, error = %e, "the pool closed: no more notifications");
            }
            Err(e) => tracing::warn!(%channel, error = %e, "cannot listen for notifications"),
        }
        if pool.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
