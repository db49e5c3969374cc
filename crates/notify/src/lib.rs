//! PostgreSQL notifications between processes: one listening connection per process that
//! reconnects, and an announcer that coalesces what it sends.

use std::time::Duration;

use sea_orm::sqlx::PgPool;
use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::mpsc;

/// The shortest time between two announcements of one process: at most 100 a second however
/// fast it writes, each at most this late.
const GAP: Duration = Duration::from_millis(10);

/// A pool of one connection to the database of `pool`, opened when first used and kept: for a
/// listener that should not take a connection from `pool`'s budget for as long as it listens.
pub fn own_connection(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// What a listener hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard<'a> {
    /// A notification, with its payload.
    Notification(&'a str),
    /// It listens (again, after a reconnect, or for the first time): whatever was sent before
    /// was not heard, so whoever waits for a notification should look for itself now.
    Listening,
}

/// Calls `on` with what is heard on `channel` — each notification, and [`Heard::Listening`]
/// each time LISTEN takes effect (first, and again after sqlx re-established a lost connection
/// before it reports the loss) — over a connection taken from `pool` for as long as it
/// listens, connecting again (after 0.1 s, doubling up to 5 s while each connection lives
/// less than that) when sqlx cannot, until `on` returns false or the pool is closed.
pub async fn listen(pool: PgPool, channel: &str, mut on: impl FnMut(Heard<'_>) -> bool + Send) {
    const LONGEST: Duration = Duration::from_secs(5);
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(channel).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        match listener.await {
            Ok(mut listener) => {
                let since = tokio::time::Instant::now();
                if !on(Heard::Listening) {
                    return;
                }
                loop {
                    match listener.try_recv().await {
                        Ok(Some(notification)) => {
                            if !on(Heard::Notification(notification.payload())) {
                                return;
                            }
                        }
                        // The connection was lost, and sqlx has connected and listened again:
                        // what was sent in between went unheard.
                        Ok(None) => {
                            tracing::warn!(%channel, "notifications interrupted; listening again");
                            if !on(Heard::Listening) {
                                return;
                            }
                        }
                        Err(_) if pool.is_closed() => return,
                        Err(e) => {
                            tracing::warn!(%channel, error = %e, "notifications interrupted");
                            break;
                        }
                    }
                }
                // A connection that lived long enough starts the pauses again from the shortest.
                if since.elapsed() >= LONGEST {
                    backoff = Duration::from_millis(100);
                }
            }
            Err(e) => tracing::warn!(%channel, error = %e, "cannot listen for notifications"),
        }
        if pool.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LONGEST);
    }
}

/// Sends one notification on a channel whenever asked, after the writes it announces have
/// committed: asks that come while one is being sent, or within [`GAP`] after it, share the
/// next, so a burst of writes costs two statements, not one each.
#[derive(Debug, Clone)]
pub struct Announcer {
    asks: mpsc::Sender<()>,
}

impl Announcer {
    /// Announces on `channel` with `payload` through `pool`, until every clone is dropped.
    pub fn spawn(pool: PgPool, channel: &'static str, payload: String) -> Self {
        let (asks, mut asked) = mpsc::channel(1);
        tokio::spawn(async move {
            while asked.recv().await.is_some() {
                let sent = sea_orm::sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(channel)
                    .bind(&payload)
                    .execute(&pool)
                    .await;
                if let Err(e) = sent {
                    tracing::debug!(%channel, error = %e, "cannot announce; listeners poll");
                }
                tokio::time::sleep(GAP).await;
            }
        });
        Self { asks }
    }

    /// Asks for a notification; returns at once.
    pub fn announce(&self) {
        // Full: one is already due, and it is sent after this ask.
        let _ = self.asks.try_send(());
    }
}
