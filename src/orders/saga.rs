//! The order saga, orchestrated by `order.saga` jobs: ReserveStock → Charge → CommitReservation
//! → CONFIRMED (and the confirmation e-mail); out of stock or insufficient funds compensates
//! (ReleaseStock) and ends REJECTED with the reason; a cancellation refunds and puts the stock
//! back. Every call is idempotent by the order's name (the reservation id and the payment id),
//! and every stage change is a conditional update with its history, so a step replayed after a
//! crash or a redelivery moves nothing twice.

use std::sync::Arc;

use async_trait::async_trait;
use keel_mesh::client::MeshChannel;
use keel_queue::{Failure, Handler, Job};
use tonic::Code;
use uuid::Uuid;

use super::store::{CANCELLED, CONFIRMED, Change, OrderStore, Placed, REJECTED, Stage, Step};
use crate::config::WorkerSettings;
use crate::credentials::ServiceCredentials;
use crate::proto::keel::catalog::v1::inventory_service_client::InventoryServiceClient;
use crate::proto::keel::catalog::v1::{
    CommitReservationRequest, ReleaseStockRequest, ReserveStockRequest, StockLine,
};
use crate::proto::keel::payments::v1::ledger_service_client::LedgerServiceClient;
use crate::proto::keel::payments::v1::{ChargeRequest, RefundRequest};
use crate::proto::keel::r#type::v1::Money;

/// Drives orders through their saga.
pub struct Saga {
    store: OrderStore,
    inventory: InventoryServiceClient<MeshChannel>,
    ledger: LedgerServiceClient<MeshChannel>,
    credentials: Arc<ServiceCredentials>,
    faults: WorkerSettings,
}

impl Saga {
    /// A saga over `store`, calling catalog's inventory and payments' ledger as the orders
    /// service.
    pub fn new(
        store: OrderStore,
        catalog: MeshChannel,
        payments: MeshChannel,
        credentials: Arc<ServiceCredentials>,
        faults: WorkerSettings,
    ) -> Self {
        Self {
            store,
            inventory: InventoryServiceClient::new(catalog),
            ledger: LedgerServiceClient::new(payments),
            credentials,
            faults,
        }
    }

    fn name(placed: &Placed) -> String {
        super::order_name(placed.order.user_id, placed.order.id)
    }

    async fn advance(
        &self,
        placed: &Placed,
        from: Stage,
        to: Stage,
        change: Change,
    ) -> Result<(), Failure> {
        self.store
            .advance(placed.order.id, from, to, change)
            .await
            .map(|_| ())
            .map_err(|e| Failure::Retry(format!("record the order: {e}")))
    }

    /// Ends the order REJECTED because of `reason`, with `steps` before the rejection.
    async fn reject(
        &self,
        placed: &Placed,
        from: Stage,
        reason: String,
        mut steps: Vec<Step>,
    ) -> Result<(), Failure> {
        steps.push(Step::refused("REJECT", reason.clone()));
        let change = Change {
            state: Some(REJECTED),
            reason: Some(reason),
            steps,
            ..Change::default()
        };
        self.advance(placed, from, Stage::Done, change).await
    }

    async fn reserve(&self, placed: &Placed) -> Result<(), Failure> {
        let request = ReserveStockRequest {
            reservation_id: Self::name(placed),
            lines: placed
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
                let change = Change {
                    steps: vec![Step::done("RESERVE_STOCK")],
                    ..Change::default()
                };
                self.advance(placed, Stage::Reserve, Stage::Charge, change)
                    .await?;
                self.faults.fault("order.after_reserve");
                Ok(())
            }
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                let reason = format!("out of stock: {}", s.message());
                let refused = Step::refused("RESERVE_STOCK", s.message());
                self.reject(placed, Stage::Reserve, reason, vec![refused])
                    .await
            }
            Err(s) => Err(transient(s)),
        }
    }

    async fn charge(&self, placed: &Placed) -> Result<(), Failure> {
        let order = &placed.order;
        let request = ChargeRequest {
            payment_id: Self::name(placed),
            wallet: format!("{}/wallet", crate::principal::user_name(order.user_id)),
            amount: Some(Money {
                currency_code: order.currency_code.clone(),
                units: order.total_units,
            }),
            reference: Self::name(placed),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.ledger.clone().charge(request).await {
            Ok(_) => {
                let change = Change {
                    steps: vec![Step::done("CHARGE")],
                    ..Change::default()
                };
                self.advance(placed, Stage::Charge, Stage::Commit, change)
                    .await
            }
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument) => {
                // Nothing was taken: give the stock back, then reject.
                self.release_stock(placed).await?;
                let reason = if s.code() == Code::FailedPrecondition {
                    "insufficient funds".to_owned()
                } else {
                    format!("cannot charge: {}", s.message())
                };
                let steps = vec![
                    Step::refused("CHARGE", s.message()),
                    Step::compensation("RELEASE_STOCK", "the reserved stock went back"),
                ];
                self.reject(placed, Stage::Charge, reason, steps).await
            }
            Err(s) => Err(transient(s)),
        }
    }

    async fn commit(&self, placed: &Placed) -> Result<(), Failure> {
        let request = CommitReservationRequest {
            reservation_id: Self::name(placed),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        self.inventory
            .clone()
            .commit_reservation(request)
            .await
            .map_err(transient)?;
        let order = &placed.order;
        let email = crate::mail::Email {
            to: order.buyer_email.clone(),
            subject: format!("Your keel order {} is confirmed", order.id),
            body: confirmation(placed),
        };
        let change = Change {
            state: Some(CONFIRMED),
            steps: vec![Step::done("COMMIT_RESERVATION"), Step::done("CONFIRM")],
            email: Some((email, format!("order-confirmation:{}", order.id))),
            ..Change::default()
        };
        self.advance(placed, Stage::Commit, Stage::Done, change)
            .await
    }

    async fn release_stock(&self, placed: &Placed) -> Result<(), Failure> {
        let request = ReleaseStockRequest {
            reservation_id: Self::name(placed),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.inventory.clone().release_stock(request).await {
            Ok(_) => Ok(()),
            // Never reserved: nothing to give back.
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(transient(s)),
        }
    }

    async fn refund(&self, placed: &Placed) -> Result<(), Failure> {
        let request = RefundRequest {
            payment_id: Self::name(placed),
        };
        let request = self.credentials.request(request).await.map_err(transient)?;
        match self.ledger.clone().refund(request).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(transient(s)),
        }
        let change = Change {
            steps: vec![Step::compensation("REFUND", "the charge was refunded")],
            ..Change::default()
        };
        self.advance(placed, Stage::CancelRefund, Stage::CancelRelease, change)
            .await
    }

    async fn restock(&self, placed: &Placed) -> Result<(), Failure> {
        self.release_stock(placed).await?;
        let change = Change {
            state: Some(CANCELLED),
            steps: vec![Step::compensation(
                "RELEASE_STOCK",
                "the sold stock went back",
            )],
            ..Change::default()
        };
        self.advance(placed, Stage::CancelRelease, Stage::Done, change)
            .await
    }
}

/// A failure worth another attempt later: the peer did not answer, or answered with an error
/// that is not about the order.
fn transient(status: tonic::Status) -> Failure {
    Failure::Retry(format!("{:?}: {}", status.code(), status.message()))
}

fn confirmation(placed: &Placed) -> String {
    let order = &placed.order;
    let mut body = format!("Thank you for your order {}.\n\n", order.id);
    for line in &placed.lines {
        body += &format!(
            "  {} × products/{} at {} {}\n",
            line.quantity, line.product_id, line.unit_price_units, line.currency_code
        );
    }
    body += &format!(
        "\nTotal: {} {} (minor units), charged to your keel wallet.\n",
        order.total_units, order.currency_code
    );
    body
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
        loop {
            let placed = self
                .store
                .find(id)
                .await
                .map_err(|e| Failure::Retry(format!("read the order: {e}")))?
                .ok_or_else(|| Failure::Permanent(format!("order {id} is gone")))?;
            match placed.stage() {
                Stage::Reserve => self.reserve(&placed).await?,
                Stage::Charge => self.charge(&placed).await?,
                Stage::Commit => self.commit(&placed).await?,
                Stage::CancelRefund => self.refund(&placed).await?,
                Stage::CancelRelease => self.restock(&placed).await?,
                Stage::Done => return Ok(()),
            }
        }
    }
}
