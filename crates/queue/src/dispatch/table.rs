//! The table dispatcher: a worker claims straight from the SQL table, polling, and is woken
//! early by its own process's writes.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Dispatch, KindLimits, claim_or_wait};
use crate::job::Job;
use crate::store::JobStore;

/// Jobs straight from the SQL table.
#[derive(Debug)]
pub struct TableDispatch {
    store: JobStore,
    wake: std::sync::Arc<Notify>,
}

impl TableDispatch {
    /// Polls `store`; `wake` cuts a wait short.
    pub fn new(store: JobStore, wake: std::sync::Arc<Notify>) -> Self {
        Self { store, wake }
    }
}

#[async_trait]
impl Dispatch for TableDispatch {
    async fn next(
        &self,
        worker: &str,
        kinds: &KindLimits,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Vec<Job> {
        claim_or_wait(&self.store, &self.wake, (worker, kinds, max, lease), wait).await
    }
}
