//! The order saga, orchestrated by `order.saga` jobs. Forward: ReserveStock → Charge →
//! CommitReservation → CONFIRMED, with a confirmation notice. A permanent refusal on the way (out
//! of stock, insufficient funds, a reservation that is gone) is a decision — REJECT, with its
//! reason — recorded first, by one conditional write; a cancellation is the buyer's decision.
//! After either, the saga compensates until the world agrees with the decision: the charge under
//! the order's payment id refunded and the reservation under its id released, both for good (a
//! late charge or reservation from a worker that lost its job is refused by payments and
//! catalog), and only then settles the order. Every write is conditional on the order's stage
//! and on the job's attempt still holding its job (its fence), so a worker that stalled past its
//! lease commits nothing; every call is idempotent by the order's name.

use std::sync::Arc;

use async_trait::async_trait;
use keel_mesh::client::MeshChannel;
use keel_queue::{Failure, Fence, Handler, Job};
use tonic::Code;
use tonic_types::StatusExt as _;
use uuid::Uuid;

use super::lifecycle::{Action, OrderState, Stage, Step};
use super::store::{Change, OrderStore, Unrecorded};
use crate::credentials::ServiceCredentials;
use crate::fault;
use crate::proto::keel::catalog::v1::inventory_service_client::InventoryServiceClient;
use crate::proto::keel::catalog::v1::{
    CommitReservationRequest, ReleaseStockRequest, ReserveStockRequest, StockLine,
};
use crate::proto::keel::payments::v1::ledger_service_client::LedgerServiceClient;
use crate::proto::keel::payments::v1::{ChargeRequest, RefundRequest};
use crate::proto::keel::r#type::v1::Money;

/// What a step did: the stage this attempt moved the order to, or `None` when another run
/// moved it first.
type Moved = Result<Option<Stage>, Failure>;

/// Drives orders through their saga.
pub struct Saga {
    store: OrderStore,
    /// Woken after a step wrote jobs (a notice, the next phase's saga).
    queue: keel_queue::Queue,
    inventory: InventoryServiceClient<MeshChannel>,
    ledger: LedgerServiceClient<MeshChannel>,
    credentials: Arc<ServiceCredentials>,
}

/// One attempt's view of one order: what it read, and the fence its writes hold.
struct Attempt<'a> {
    placed: &'a Unrecorded,
    fence: &'a Fence,
}

impl Attempt<'_> {
    /// The order's name: its reservation id and its payment id.
    fn name(&self) -> String {
        super::order_name(self.placed.order.user_id, self.placed.order.id)
    }
}

impl Saga {
    /// A saga over `store`, calling catalog's inventory and payments' ledger as the orders
    /// service.
    pub fn new(
        store: OrderStore,
        queue: keel_queue::Queue,
        catalog: MeshChannel,
        payments: MeshChannel,
        credentials: Arc<ServiceCredentials>,
    ) -> Self {
        Self {
            store,
            queue,
            inventory: InventoryServiceClient::new(catalog),
            ledger: LedgerServiceClient::new(payments),
            credentials,
        }
    }

    /// Moves the order on from its stage to `to`, under the attempt's fence: `to` when this
    /// attempt moved it, `None` when another run moved it first (the loop reads it again).
    async fn advance(&self, at: &Attempt<'_>, to: Stage, change: Change) -> Moved {
        let writes_jobs = change.notice.is_some() || change.saga.is_some();
        let moved = self
            .store
            .advance(
                (at.placed.order.id, at.placed.order.user_id),
                (at.placed.stage, to),
                change,
                Some(at.fence),
            )
            .await?;
        if moved && writes_jobs {
            // Committed: idle workers and the relay look now, here and elsewhere.
            self.queue.wake();
        }
        Ok(moved.then_some(to))
    }

    /// Decides REJECT because of `reason` (the refused step first): recorded before anything is
    /// undone, so that every later attempt compensates towards it.
    async fn reject(&self, at: &Attempt<'_>, reason: String, refused: Step) -> Moved {
        let change = Change {
            reason: Some(reason),
            steps: vec![refused],
            ..Change::default()
        };
        self.advance(at, Stage::Reject, change).await
    }

    async fn reserve(&self, at: &Attempt<'_>) -> Moved {
        let request = ReserveStockRequest {
            reservation_id: at.name(),
            lines: at
                .placed
                .lines
                .iter()
                .map(|l| StockLine {
                    product: format!("products/{}", l.product_id),
                    quantity: l.quantity,
                })
                .collect(),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.inventory.clone().reserve_stock(request).await {
            Ok(_) => {
                fault::point("order.reserved");
                let change = Change {
                    steps: vec![Step::done(Action::ReserveStock)],
                    ..Change::default()
                };
                let moved = self.advance(at, Stage::Charge, change).await?;
                fault::point("order.after_reserve");
                Ok(moved)
            }
            Err(s) if refused(&s, &[Code::FailedPrecondition, Code::NotFound]) => {
                fault::point("order.reserve.refused");
                let reason = format!("out of stock: {}", s.message());
                let step = Step::refused(Action::ReserveStock, s.message());
                self.reject(at, reason, step).await
            }
            Err(s) => Err(transient(s)),
        }
    }

    async fn charge(&self, at: &Attempt<'_>) -> Moved {
        let order = &at.placed.order;
        let request = ChargeRequest {
            payment_id: at.name(),
            wallet: format!("{}/wallet", crate::principal::user_name(order.user_id)),
            amount: Some(Money {
                currency_code: order.currency_code.clone(),
                units: order.total_units,
            }),
            reference: at.name(),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.ledger.clone().charge(request).await {
            Ok(_) => {
                fault::point("order.charged");
                let change = Change {
                    steps: vec![Step::done(Action::Charge)],
                    ..Change::default()
                };
                self.advance(at, Stage::Commit, change).await
            }
            Err(s) if refused(&s, &[Code::FailedPrecondition, Code::InvalidArgument]) => {
                fault::point("order.charge.refused");
                let reason = if violation(&s).as_deref() == Some("FUNDS") {
                    "insufficient funds".to_owned()
                } else {
                    format!("cannot charge: {}", s.message())
                };
                self.reject(at, reason, Step::refused(Action::Charge, s.message()))
                    .await
            }
            Err(s) => Err(transient(s)),
        }
    }

    async fn commit(&self, at: &Attempt<'_>) -> Moved {
        let request = CommitReservationRequest {
            reservation_id: at.name(),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.inventory.clone().commit_reservation(request).await {
            Ok(_) => {
                let change = Change {
                    state: Some(OrderState::Confirmed),
                    steps: vec![
                        Step::done(Action::CommitReservation),
                        Step::done(Action::Confirm),
                    ],
                    notice: Some("confirmation"),
                    ..Change::default()
                };
                self.advance(at, Stage::Done, change).await
            }
            // Released or never made: the stock is not held for this order, so it cannot be
            // confirmed; the charge is given back.
            Err(s) if refused(&s, &[Code::FailedPrecondition, Code::NotFound]) => {
                let reason = format!("the reserved stock is gone: {}", s.message());
                let step = Step::refused(Action::CommitReservation, s.message());
                self.reject(at, reason, step).await
            }
            Err(s) => Err(transient(s)),
        }
    }

    /// After a REJECT or CANCEL decision: refunds, releases, then settles the order, recording
    /// what was actually undone.
    async fn compensate(&self, at: &Attempt<'_>) -> Moved {
        fault::point("order.decided");
        let cancelling = at.placed.stage == Stage::Cancel;
        let mut steps = Vec::new();
        if self.refund(at).await? {
            steps.push(Step::compensation(
                Action::Refund,
                "the charge was refunded",
            ));
        }
        fault::point("order.refunded");
        if self.release(at).await? {
            let detail = if cancelling {
                "the sold stock went back"
            } else {
                "the reserved stock went back"
            };
            steps.push(Step::compensation(Action::ReleaseStock, detail));
        }
        fault::point("order.released");
        let change = if cancelling {
            Change {
                state: Some(OrderState::Cancelled),
                steps,
                notice: Some("cancellation"),
                ..Change::default()
            }
        } else {
            let reason = at.placed.order.rejection_reason.clone();
            steps.push(Step::refused(Action::Reject, reason));
            Change {
                state: Some(OrderState::Rejected),
                steps,
                ..Change::default()
            }
        };
        self.advance(at, Stage::Done, change).await
    }

    /// Refunds the order's charge and closes its payment id to charges; whether there was a
    /// charge to give back.
    async fn refund(&self, at: &Attempt<'_>) -> Result<bool, Failure> {
        let request = RefundRequest {
            payment_id: at.name(),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.ledger.clone().refund(request).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(transient(s)),
        }
    }

    /// Releases the order's reservation and closes its id to reservations; whether stock went
    /// back.
    async fn release(&self, at: &Attempt<'_>) -> Result<bool, Failure> {
        let request = ReleaseStockRequest {
            reservation_id: at.name(),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.inventory.clone().release_stock(request).await {
            Ok(released) => Ok(released
                .into_inner()
                .reservation
                .is_some_and(|r| !r.lines.is_empty())),
            Err(s) => Err(transient(s)),
        }
    }
}

/// Whether `status` is a refusal about the order itself (one of `codes`), which no retry
/// changes.
fn refused(status: &tonic::Status, codes: &[Code]) -> bool {
    codes.contains(&status.code())
}

/// The type of the precondition `status` says failed (`FUNDS`, `STOCK`, `RESERVATION`), if any.
fn violation(status: &tonic::Status) -> Option<String> {
    status
        .get_details_precondition_failure()
        .and_then(|failure| failure.violations.first().map(|v| v.r#type.clone()))
}

/// A failure worth another attempt later: the peer did not answer, or answered with an error
/// that is not about the order.
fn transient(status: tonic::Status) -> Failure {
    Failure::Retry(format!("{:?}: {}", status.code(), status.message()))
}

#[async_trait]
impl Handler for Saga {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        let id: Uuid = job
            .payload
            .get("order")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Failure::Permanent("no order in the job".into()))?;
        let fence = job.fence();
        let mut placed = self.read(id).await?;
        loop {
            let at = Attempt {
                placed: &placed,
                fence: &fence,
            };
            let moved = match placed.stage {
                Stage::Reserve => self.reserve(&at).await?,
                Stage::Charge => self.charge(&at).await?,
                Stage::Commit => self.commit(&at).await?,
                Stage::Reject | Stage::Cancel => self.compensate(&at).await?,
                Stage::Done => return Ok(()),
            };
            match moved {
                Some(Stage::Done) => return Ok(()),
                // This attempt moved it forward: all it read still holds but the stage.
                Some(stage @ (Stage::Charge | Stage::Commit)) => placed.stage = stage,
                // Decided (the compensation reads the reason), or moved by another run.
                _ => placed = self.read(id).await?,
            }
        }
    }
}

impl Saga {
    /// Order `id` as it stands.
    async fn read(&self, id: Uuid) -> Result<Unrecorded, Failure> {
        self.store
            .find_unrecorded(id)
            .await?
            .ok_or_else(|| Failure::Permanent(format!("order {id} is gone")))
    }
}
