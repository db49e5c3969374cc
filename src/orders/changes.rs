//! Order changes, seen from every process: on PostgreSQL each change NOTIFYs at commit and one
//! LISTEN connection per process fans the order ids out to its watchers (with a slow poll as a
//! safety net); on SQLite, watchers poll. Nothing depends on the change happening in this
//! process.

use std::time::Duration;

use sea_orm::{DatabaseConnection, DbBackend};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::store::CHANNEL;

/// What a watcher hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// This order changed.
    Order(Uuid),
    /// Any order may have: the listener (re)connected, and what was sent before is lost.
    Any,
}

/// A process's view of order changes.
#[derive(Debug, Clone)]
pub struct Changes {
    sender: broadcast::Sender<Change>,
    poll: Duration,
}

impl Changes {
    /// Changes of the orders in `db`.
    pub fn new(db: &DatabaseConnection) -> Self {
        let (sender, _) = broadcast::channel(1024);
        if db.get_database_backend() == DbBackend::Postgres {
            let pool = db.get_postgres_connection_pool().clone();
            tokio::spawn(listen(pool, sender.clone()));
            Self {
                sender,
                poll: Duration::from_secs(2),
            }
        } else {
            Self {
                sender,
                poll: Duration::from_millis(150),
            }
        }
    }

    /// A subscription to every change.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }

    /// Waits until order `id` may have changed: its notification, a missed one, or the poll.
    pub async fn wait(&self, id: Uuid, changes: &mut broadcast::Receiver<Change>) {
        let notified = async {
            loop {
                match changes.recv().await {
                    Ok(Change::Any) => return,
                    Ok(Change::Order(changed)) if changed == id => return,
                    Ok(_) => {}
                    // Missed some: look now rather than wait for the poll.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        let _ = tokio::time::timeout(self.poll, notified).await;
    }
}

/// Fans PostgreSQL's notifications out, for as long as the process runs.
async fn listen(pool: sea_orm::sqlx::PgPool, sender: broadcast::Sender<Change>) {
    keel_notify::listen(pool, CHANNEL, |heard| {
        let change = match heard {
            keel_notify::Heard::Notification(payload) => payload.parse().ok().map(Change::Order),
            keel_notify::Heard::Listening => Some(Change::Any),
        };
        if let Some(change) = change {
            let _ = sender.send(change);
        }
        true
    })
    .await;
}
