//! The wake-up of a process's claimers and relay: its own at once, every other process's
//! through PostgreSQL's NOTIFY.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::store::JobStore;

/// The channel on which processes wake each other's workers; the payload is the sender.
pub(crate) const CHANNEL: &str = "keel_queue";

/// Wakes whoever waits for jobs: here, and (on PostgreSQL) in every process that listens.
#[derive(Clone)]
pub(crate) struct Wake {
    /// This process's claimers (its workers' dispatch).
    pub(crate) claimers: Arc<Notify>,
    /// This process's relay.
    pub(crate) relay: Arc<Notify>,
    /// Tells the other processes: their listeners wake their claimers and relay.
    announcer: Option<keel_notify::Announcer>,
}

impl Wake {
    /// The wake-up of the process named `holder`, announcing through `store`'s database when
    /// it is PostgreSQL.
    pub(crate) fn new(store: &JobStore, holder: &str) -> Self {
        let announcer = store
            .postgres_pool()
            .map(|pool| keel_notify::Announcer::spawn(pool, CHANNEL, holder.to_owned()));
        Self {
            claimers: Arc::new(Notify::new()),
            relay: Arc::new(Notify::new()),
            announcer,
        }
    }

    /// Wakes the claimers and the relay here at once, and asks for an announcement to the
    /// other processes (after the writes it tells of have committed).
    pub(crate) fn everyone(&self) {
        self.relay.notify_waiters();
        self.claimers_everywhere();
    }

    /// Wakes the claimers here at once, and asks for an announcement to the other processes:
    /// what the relay does when it lets go of rows it held.
    pub(crate) fn claimers_everywhere(&self) {
        self.claimers.notify_waiters();
        if let Some(announcer) = &self.announcer {
            announcer.announce();
        }
    }
}
