//! Leases on roles that one process at a time plays (the relay, the pruner): held until a time,
//! renewed by their holder, taken over by another process once they run out.

use std::time::Duration;

use sea_orm::ConnectionTrait as _;

use super::{JobStore, QueueError, statement};
use crate::job::{millis, now_ms};

impl JobStore {
    /// Takes or renews the lease on `role` for `holder` until `term` from now; true when
    /// `holder` holds it now (it held it, or its last holder's lease ran out).
    pub async fn lease(
        &self,
        role: &str,
        holder: &str,
        term: Duration,
    ) -> Result<bool, QueueError> {
        let now = now_ms();
        let taken = self
            .db
            .execute_raw(statement(
                self.backend(),
                "INSERT INTO queue_leases (name, holder, until) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                 until = excluded.until \
                 WHERE queue_leases.holder = excluded.holder OR queue_leases.until < $4",
                vec![
                    role.into(),
                    holder.into(),
                    now.saturating_add(millis(term)).into(),
                    now.into(),
                ],
            ))
            .await?;
        Ok(taken.rows_affected() == 1)
    }

    /// Gives up `holder`'s lease on `role`, so that another process takes the role at once.
    pub async fn release(&self, role: &str, holder: &str) -> Result<(), QueueError> {
        self.db
            .execute_raw(statement(
                self.backend(),
                "DELETE FROM queue_leases WHERE name = $1 AND holder = $2",
                vec![role.into(), holder.into()],
            ))
            .await?;
        Ok(())
    }
}

/// A role this process plays while it holds its lease: taken when free, renewed at most once
/// per `renew` while held, lost when a renewal fails (another process took it over meanwhile).
#[derive(Debug)]
pub(crate) struct Lease {
    role: &'static str,
    holder: String,
    term: Duration,
    renew: Duration,
    until: Option<std::time::Instant>,
}

impl Lease {
    /// `holder`'s lease on `role`, for `term` at a time, renewed every `renew` (less than `term`).
    pub(crate) fn new(role: &'static str, holder: &str, term: Duration, renew: Duration) -> Self {
        Self {
            role,
            holder: holder.to_owned(),
            term,
            renew: renew.min(term / 2),
            until: None,
        }
    }

    /// Whether this process holds the role now, taking or renewing the lease when due.
    pub(crate) async fn hold(&mut self, store: &JobStore) -> bool {
        self.hold_for(store, self.term - self.renew).await
    }

    /// Whether this process holds the role now with more than `at_least` of its term left,
    /// taking or renewing the lease when less is.
    pub(crate) async fn hold_for(&mut self, store: &JobStore, at_least: Duration) -> bool {
        let now = std::time::Instant::now();
        if self
            .until
            .is_some_and(|until| until.saturating_duration_since(now) > at_least)
        {
            return true;
        }
        self.until = match store.lease(self.role, &self.holder, self.term).await {
            Ok(true) => Some(now + self.term),
            Ok(false) => None,
            Err(e) => {
                tracing::debug!(role = self.role, error = %e, "cannot take or renew a lease");
                None
            }
        };
        self.until.is_some()
    }

    /// Gives the role up (when this process stops), so that another takes it at once.
    pub(crate) async fn release(&mut self, store: &JobStore) {
        if self.until.take().is_some()
            && let Err(e) = store.release(self.role, &self.holder).await
        {
            tracing::debug!(role = self.role, error = %e, "cannot release a lease");
        }
    }
}
