//! Reservations: stock taken off the shelf by conditional updates in one transaction, all lines
//! or none, idempotent by reservation id, and monotonic: RESERVED → COMMITTED or RELEASED, and a
//! release that comes before any reservation leaves a RELEASED row with no lines, so that a
//! reservation arriving late (from a worker that lost its job) is refused instead of held for
//! ever.

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, DatabaseConnection, DatabaseTransaction,
    EntityTrait as _, QueryFilter as _, QueryOrder as _, Set, TransactionTrait as _,
    TryInsertResult,
};
use uuid::Uuid;

use super::entity::{product, reservation, reservation_line};
use super::error::CatalogError;
use crate::input::FieldError;
use crate::refusal::Refusal;
use crate::store::is_unique_violation;

/// Where a reservation is.
pub const RESERVED: &str = "RESERVED";
/// Stock went back to the shelf.
pub const RELEASED: &str = "RELEASED";
/// Stock is sold.
pub const COMMITTED: &str = "COMMITTED";

/// A validated line to reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The product.
    pub product_id: Uuid,
    /// Units, at least 1.
    pub quantity: i64,
}

/// A reservation with its lines, in request order.
#[derive(Debug, Clone)]
pub struct Held {
    /// The reservation row.
    pub reservation: reservation::Model,
    /// Its lines.
    pub lines: Vec<reservation_line::Model>,
}

/// Reservation rows.
#[derive(Debug, Clone)]
pub struct Inventory {
    db: DatabaseConnection,
}

impl Inventory {
    /// Reservations in `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Holds `lines` under `id`: every line or none. The same id with the same lines returns the
    /// first reservation; with other lines it is refused.
    pub async fn reserve(
        &self,
        id: &str,
        lines: &[Line],
        hash: &str,
    ) -> Result<Held, CatalogError> {
        match self.try_reserve(id, lines, hash).await {
            // The id exists (a retry, or a concurrent call that committed first): answer as the
            // first call did.
            Err(CatalogError::Refused(Refusal::Database(e))) if is_unique_violation(&e) => {
                self.replay(id, hash).await
            }
            result => result,
        }
    }

    async fn try_reserve(
        &self,
        id: &str,
        lines: &[Line],
        hash: &str,
    ) -> Result<Held, CatalogError> {
        let now = Utc::now();
        let txn = self.db.begin().await?;
        // The reservation row first: its primary key serialises calls with one id, and writing
        // first lets SQLite's single writer queue us instead of failing us.
        let reservation = reservation::ActiveModel {
            reservation_id: Set(id.to_owned()),
            state: Set(RESERVED.to_owned()),
            request_hash: Set(hash.to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(&txn)
        .await?;
        // Take stock in product-id order so that two reservations never wait on each other.
        let mut ordered: Vec<(usize, &Line)> = lines.iter().enumerate().collect();
        ordered.sort_by_key(|(_, line)| line.product_id);
        let mut held = vec![None; lines.len()];
        for (position, line) in ordered {
            let taken = product::Entity::update_many()
                .col_expr(
                    product::Column::Stock,
                    Expr::col(product::Column::Stock).sub(line.quantity),
                )
                .col_expr(
                    product::Column::Version,
                    Expr::col(product::Column::Version).add(1),
                )
                .col_expr(product::Column::UpdatedAt, Expr::value(now))
                .filter(product::Column::Id.eq(line.product_id))
                .filter(product::Column::Stock.gte(line.quantity))
                .exec_with_returning(&txn)
                .await?;
            // The product as taken (its price for the line), read by the update that locks it:
            // a read after it would hold a popular product's row one round trip longer.
            let Some(product) = taken.into_iter().next() else {
                let name = super::product_name(line.product_id);
                let exists = product::Entity::find_by_id(line.product_id)
                    .one(&txn)
                    .await?
                    .is_some();
                return Err(if exists {
                    CatalogError::InsufficientStock(name)
                } else {
                    CatalogError::ProductNotFound(name)
                });
            };
            let row = reservation_line::ActiveModel {
                reservation_id: Set(id.to_owned()),
                position: Set(i32::try_from(position).unwrap_or(i32::MAX)),
                product_id: Set(line.product_id),
                quantity: Set(line.quantity),
                unit_price_units: Set(product.price_units),
                currency_code: Set(product.currency_code),
            }
            .insert(&txn)
            .await?;
            held[position] = Some(row);
        }
        txn.commit().await?;
        Ok(Held {
            reservation,
            lines: held.into_iter().flatten().collect(),
        })
    }

    async fn replay(&self, id: &str, hash: &str) -> Result<Held, CatalogError> {
        let held = self
            .find(id)
            .await?
            .ok_or_else(|| CatalogError::ReservationNotFound(id.to_owned()))?;
        if held.reservation.state == RELEASED {
            return Err(CatalogError::ReservationReleased(id.to_owned()));
        }
        if held.reservation.request_hash != hash {
            return Err(FieldError::new(
                "reservation_id",
                format!("reservation {id} was already made with other lines"),
            )
            .into());
        }
        Ok(held)
    }

    /// Reservation `id` and its lines, if any.
    pub async fn find(&self, id: &str) -> Result<Option<Held>, CatalogError> {
        let Some(reservation) = reservation::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let lines = lines_of(&self.db, id).await?;
        Ok(Some(Held { reservation, lines }))
    }

    /// Puts a reservation's stock back on the shelf (from RESERVED or COMMITTED); releasing
    /// twice changes nothing. An id never reserved is recorded RELEASED, with no lines.
    pub async fn release(&self, id: &str) -> Result<Held, CatalogError> {
        let now = Utc::now();
        let txn = self.db.begin().await?;
        // The row first: a reservation of the same id in flight is waited for (its primary
        // key), and one that comes after finds this one.
        let unheard = reservation::Entity::insert(reservation::ActiveModel {
            reservation_id: Set(id.to_owned()),
            state: Set(RELEASED.to_owned()),
            request_hash: Set(String::new()),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict_do_nothing()
        .exec(&txn)
        .await?;
        let moved = matches!(unheard, TryInsertResult::Conflicted)
            && transition(&txn, id, &[RESERVED, COMMITTED], RELEASED).await?;
        if moved {
            for line in lines_of(&txn, id).await? {
                product::Entity::update_many()
                    .col_expr(
                        product::Column::Stock,
                        Expr::col(product::Column::Stock).add(line.quantity),
                    )
                    .col_expr(
                        product::Column::Version,
                        Expr::col(product::Column::Version).add(1),
                    )
                    .col_expr(product::Column::UpdatedAt, Expr::value(now))
                    .filter(product::Column::Id.eq(line.product_id))
                    .exec(&txn)
                    .await?;
            }
        }
        txn.commit().await?;
        self.find(id)
            .await?
            .ok_or_else(|| CatalogError::ReservationNotFound(id.to_owned()))
    }

    /// Makes a reservation final; committing twice changes nothing; a released one is refused.
    /// One conditional update, atomic on its own, that answers the row it moved; the row is
    /// read only when it did not move (committed before, released, or never made).
    pub async fn commit(&self, id: &str) -> Result<Held, CatalogError> {
        let committed = reservation::Entity::update_many()
            .col_expr(reservation::Column::State, Expr::value(COMMITTED))
            .col_expr(reservation::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(reservation::Column::ReservationId.eq(id))
            .filter(reservation::Column::State.eq(RESERVED))
            .exec_with_returning(&self.db)
            .await?;
        let reservation = match committed.into_iter().next() {
            Some(reservation) => reservation,
            None => reservation::Entity::find_by_id(id.to_owned())
                .one(&self.db)
                .await?
                .ok_or_else(|| CatalogError::ReservationNotFound(id.to_owned()))?,
        };
        if reservation.state == RELEASED {
            return Err(CatalogError::ReservationReleased(id.to_owned()));
        }
        let lines = lines_of(&self.db, id).await?;
        Ok(Held { reservation, lines })
    }
}

/// Moves reservation `id` from one of `from` to `to`; false when it was not in `from`.
async fn transition(
    txn: &DatabaseTransaction,
    id: &str,
    from: &[&str],
    to: &str,
) -> Result<bool, CatalogError> {
    let moved = reservation::Entity::update_many()
        .col_expr(reservation::Column::State, Expr::value(to))
        .col_expr(reservation::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(reservation::Column::ReservationId.eq(id))
        .filter(reservation::Column::State.is_in(from.iter().copied()))
        .exec(txn)
        .await?;
    Ok(moved.rows_affected == 1)
}

async fn lines_of(
    db: &impl sea_orm::ConnectionTrait,
    id: &str,
) -> Result<Vec<reservation_line::Model>, CatalogError> {
    Ok(reservation_line::Entity::find()
        .filter(reservation_line::Column::ReservationId.eq(id))
        .order_by_asc(reservation_line::Column::Position)
        .all(db)
        .await?)
}
