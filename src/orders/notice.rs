//! What the buyer is told, by `order.email` jobs: a confirmation once the order is CONFIRMED, a
//! cancellation once it is CANCELLED. Each job reads the order when it runs, just before it
//! sends, so a confirmation whose turn comes after the buyer cancelled (SMTP was down, say) is
//! never sent; each is sent once, by the attempt that holds its job.

use async_trait::async_trait;
use keel_queue::{Failure, Handler, Job};
use uuid::Uuid;

use super::lifecycle::{OrderState, Stage};
use super::store::{OrderStore, Unrecorded};
use crate::mail::{Email, Postman};
use crate::money::for_people;

/// Sends order notices.
pub struct Notices {
    store: OrderStore,
    postman: Postman,
}

impl Notices {
    /// Notices about orders in `store`, sent by `postman`.
    pub fn new(store: OrderStore, postman: Postman) -> Self {
        Self { store, postman }
    }
}

#[async_trait]
impl Handler for Notices {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        let field = |name: &str| job.payload.get(name).and_then(serde_json::Value::as_str);
        let id: Uuid = field("order")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Failure::Permanent("no order in the job".into()))?;
        let placed = self
            .store
            .find_unrecorded(id)
            .await?
            .ok_or_else(|| Failure::Permanent(format!("order {id} is gone")))?;
        let email = match (field("notice"), placed.state, placed.stage) {
            (Some("confirmation"), OrderState::Confirmed, Stage::Done) => confirmation(&placed),
            (Some("cancellation"), OrderState::Cancelled, Stage::Done) => cancellation(&placed),
            // The order moved on (a confirmation after the buyer cancelled): not worth telling.
            (Some("confirmation" | "cancellation"), _, _) => {
                tracing::info!(order = %id, state = %placed.state, stage = %placed.stage, "a notice the order has moved past: not sent");
                return Ok(());
            }
            (notice, _, _) => {
                return Err(Failure::Permanent(format!("unknown notice {notice:?}")));
            }
        };
        self.postman.deliver(job, &email).await
    }
}

/// The lines and total, as the buyer reads them.
fn summary(placed: &Unrecorded) -> String {
    let order = &placed.order;
    let mut text = String::new();
    for line in &placed.lines {
        let title = if line.title.is_empty() {
            "an item"
        } else {
            line.title.as_str()
        };
        let each = for_people(line.unit_price_units, &line.currency_code);
        let cost = line.unit_price_units.saturating_mul(line.quantity);
        text += &format!(
            "  {} x {title}, {each} each: {}\n",
            line.quantity,
            for_people(cost, &line.currency_code)
        );
    }
    text += &format!(
        "\nTotal: {}\n",
        for_people(order.total_units, &order.currency_code)
    );
    text
}

fn confirmation(placed: &Unrecorded) -> Email {
    let order = &placed.order;
    Email {
        to: order.buyer_email.clone(),
        subject: format!("Your keel order {} is confirmed", order.id),
        body: format!(
            "Thank you for your order. It is confirmed, and {} was charged to your keel \
             wallet.\n\n{}\nOrder reference: {}\n",
            for_people(order.total_units, &order.currency_code),
            summary(placed),
            order.id
        ),
    }
}

fn cancellation(placed: &Unrecorded) -> Email {
    let order = &placed.order;
    Email {
        to: order.buyer_email.clone(),
        subject: format!("Your keel order {} is cancelled", order.id),
        body: format!(
            "Your order is cancelled, and {} went back to your keel wallet.\n\n{}\n\
             Order reference: {}\n",
            for_people(order.total_units, &order.currency_code),
            summary(placed),
            order.id
        ),
    }
}
