//! The reconciler: a periodic `order.reconcile` job (written every interval by whichever process
//! claims the round, so there is no leader) that looks for orders whose saga is not done and
//! that have not moved for a while, and makes sure a saga job drives each: one whose job died
//! (DEAD after its attempts) or is gone gets a new one. Corrupt orders are reported, not driven.
//! Everything it finds is counted in `keel_orders_unsettled_total`, which an alert watches.

use std::time::Duration;

use async_trait::async_trait;
use keel_queue::{Failure, Handler, Job};
use prometheus::IntCounterVec;

use super::store::{OrderStore, Redrive};

/// Orders one sweep looks at, oldest change first.
const SWEEP: u64 = 500;

/// Sweeps the unsettled orders.
pub struct Reconciler {
    store: OrderStore,
    /// An order that has not changed for this long is looked at.
    stuck_after: Duration,
    found: IntCounterVec,
}

impl Reconciler {
    /// A reconciler of `store`'s orders that have not moved for `stuck_after`, counting what it
    /// finds in `registry`.
    pub fn new(
        store: OrderStore,
        stuck_after: Duration,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<Self> {
        let found = IntCounterVec::new(
            prometheus::Opts::new(
                "keel_orders_unsettled_total",
                "Orders the reconciler found unsettled long after their last change, by what it \
                 did: redriven (their saga job had died or was gone), waiting (a live job drives \
                 them), moved (they moved while the sweep looked: whatever moved them drives \
                 them), corrupt (their row cannot be read).",
            ),
            &["found"],
        )?;
        match registry.register(Box::new(found.clone())) {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(e) => return Err(e),
        }
        for found_as in ["redriven", "waiting", "moved", "corrupt"] {
            found.with_label_values(&[found_as]);
        }
        Ok(Self {
            store,
            stuck_after,
            found,
        })
    }
}

#[async_trait]
impl Handler for Reconciler {
    async fn run(&self, _job: &Job) -> Result<(), Failure> {
        let before = chrono::Utc::now()
            - chrono::Duration::from_std(self.stuck_after).unwrap_or(chrono::Duration::zero());
        for (order, stage) in self.store.unsettled(before, SWEEP).await? {
            let found_as = match stage {
                Err(corrupt) => {
                    tracing::error!(order = %order.id, error = %corrupt, "an unsettled order cannot be read");
                    "corrupt"
                }
                Ok(stage) => {
                    crate::fault::point("order.reconcile.found");
                    match self.store.redrive(&order, stage.phase()).await? {
                        Redrive::Written => {
                            tracing::warn!(order = %order.id, %stage, "an order's saga job had died: driven again");
                            "redriven"
                        }
                        Redrive::Waiting => "waiting",
                        Redrive::Moved => "moved",
                    }
                }
            };
            self.found.with_label_values(&[found_as]).inc();
        }
        Ok(())
    }
}
