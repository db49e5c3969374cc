//! Wallets and their ledger: every movement is a ledger row and a balance change in one
//! transaction, idempotent by key; a charge never takes a balance below zero; and a payment id,
//! once refunded (or refunded before it was ever charged), is never charged: charges and
//! refunds of one id take turns on its row in `payments_payments`, so whichever comes second
//! sees the first.

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait as _, OnConflict, Query};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait as _, DatabaseConnection,
    DatabaseTransaction, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
    Set, Statement, TransactionTrait as _,
};
use uuid::Uuid;

use super::entity::{transaction, wallet};
use super::error::PaymentError;
use crate::input::{Amount, FieldError};
use crate::refusal::Refusal;
use crate::store::is_unique_violation;

/// Ledger kinds.
pub const TOP_UP: &str = "TOP_UP";
/// Money taken for an order.
pub const CHARGE: &str = "CHARGE";
/// Money given back.
pub const REFUND: &str = "REFUND";

/// One movement to apply.
#[derive(Debug, Clone)]
pub struct Movement {
    /// The wallet's owner.
    pub user_id: Uuid,
    /// `TOP_UP`, `CHARGE` or `REFUND`.
    pub kind: &'static str,
    /// Signed change, minor units, in the wallet's currency.
    pub amount: Amount,
    /// Unique key of this movement.
    pub idempotency_key: String,
    /// Fingerprint of the request.
    pub request_hash: String,
    /// What it pays for.
    pub reference: String,
}

/// Wallets and the ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    db: DatabaseConnection,
    reads: keel_replicas::Reads,
    /// The currency of new wallets.
    pub currency: String,
}

impl Ledger {
    /// The ledger on the primary of `reads`, its balances and entries read where `reads` sends
    /// them; wallets hold `currency`.
    pub fn new(reads: keel_replicas::Reads, currency: String) -> Self {
        Self {
            db: reads.primary().clone(),
            reads,
            currency,
        }
    }

    /// The wallet of `user_id`; an empty one if nothing was ever paid in.
    pub async fn wallet(&self, user_id: Uuid) -> Result<wallet::Model, PaymentError> {
        let query = wallet::Entity::find_by_id(user_id);
        Ok(self
            .reads
            .read(|db| Box::pin(query.clone().one(db)))
            .await?
            .unwrap_or_else(|| wallet::Model {
                user_id,
                balance_units: 0,
                currency_code: self.currency.clone(),
                updated_at: Utc::now(),
            }))
    }

    /// Applies `movement` once: a repeat with the same key and request returns the first entry,
    /// a repeat with another request is refused. Negative movements need the balance to cover
    /// them.
    pub async fn apply(&self, movement: Movement) -> Result<transaction::Model, PaymentError> {
        self.currency(&movement.amount)?;
        match self.try_apply(&movement).await {
            Err(PaymentError::Refused(Refusal::Database(e))) if is_unique_violation(&e) => {
                self.replay(&movement).await
            }
            result => result,
        }
    }

    async fn try_apply(&self, m: &Movement) -> Result<transaction::Model, PaymentError> {
        let txn = self.db.begin().await?;
        let entry = write(&txn, m).await?;
        txn.commit().await?;
        Ok(entry)
    }

    /// Charges `m` under payment id `payment`, once: a repeat answers the first entry; a payment
    /// id that was refunded is refused for good.
    pub async fn charge(
        &self,
        payment: &str,
        m: Movement,
    ) -> Result<transaction::Model, PaymentError> {
        self.currency(&m.amount)?;
        let txn = self.db.begin().await?;
        // The payment's row first: a refund of the same id in flight is waited for.
        let opened = txn
            .query_one_raw(statement(
                &txn,
                "INSERT INTO payments_payments (payment_id, state, updated_at) \
                 VALUES ($1, 'CHARGED', $2) ON CONFLICT (payment_id) DO NOTHING \
                 RETURNING payment_id",
                vec![payment.into(), Utc::now().timestamp_millis().into()],
            ))
            .await?
            .is_some();
        if !opened {
            let closed = payment_state(&txn, payment).await?.as_deref() == Some(CLOSED);
            txn.rollback().await?;
            return if closed {
                Err(PaymentError::PaymentClosed(payment.to_owned()))
            } else {
                self.replay(&m).await
            };
        }
        match write(&txn, &m).await {
            Ok(entry) => {
                txn.commit().await?;
                Ok(entry)
            }
            // Charged before payment ids had rows: the first entry answers.
            Err(PaymentError::Refused(Refusal::Database(e))) if is_unique_violation(&e) => {
                txn.rollback().await?;
                self.replay(&m).await
            }
            Err(e) => Err(e),
        }
    }

    /// Refunds the charge made under payment id `payment`, once, and closes the id to charges
    /// for good, whether or not it was charged: `None` when nothing was charged.
    pub async fn refund(
        &self,
        payment: &str,
        request_hash: String,
    ) -> Result<Option<transaction::Model>, PaymentError> {
        let txn = self.db.begin().await?;
        // The payment's row first: a charge of the same id in flight is waited for, and any
        // charge after this commits is refused.
        txn.execute_raw(statement(
            &txn,
            "INSERT INTO payments_payments (payment_id, state, updated_at) \
             VALUES ($1, 'CLOSED', $2) ON CONFLICT (payment_id) \
             DO UPDATE SET state = 'CLOSED', updated_at = $2",
            vec![payment.into(), Utc::now().timestamp_millis().into()],
        ))
        .await?;
        let Some(charge) = entry_in(&txn, &format!("charge:{payment}")).await? else {
            txn.commit().await?;
            return Ok(None);
        };
        if let Some(refunded) = entry_in(&txn, &format!("refund:{payment}")).await? {
            txn.commit().await?;
            return Ok(Some(refunded));
        }
        let entry = write(
            &txn,
            &Movement {
                user_id: charge.user_id,
                kind: REFUND,
                amount: Amount {
                    currency_code: charge.currency_code.clone(),
                    units: -charge.amount_units,
                },
                idempotency_key: format!("refund:{payment}"),
                request_hash,
                reference: charge.reference,
            },
        )
        .await?;
        txn.commit().await?;
        Ok(Some(entry))
    }

    fn currency(&self, amount: &Amount) -> Result<(), PaymentError> {
        if amount.currency_code == self.currency {
            return Ok(());
        }
        Err(FieldError::new(
            "amount",
            format!(
                "wallets hold {}, not {}",
                self.currency, amount.currency_code
            ),
        )
        .into())
    }

    async fn replay(&self, m: &Movement) -> Result<transaction::Model, PaymentError> {
        let first = self
            .entry(&m.idempotency_key)
            .await?
            .ok_or_else(|| PaymentError::PaymentNotFound(m.idempotency_key.clone()))?;
        if first.request_hash != m.request_hash {
            let field = if m.kind == TOP_UP {
                "request_id"
            } else {
                "payment_id"
            };
            return Err(crate::input::Reused {
                field,
                key: m.idempotency_key.clone(),
            }
            .into());
        }
        Ok(first)
    }

    /// Makes a movement that a service wrote on `user_id`'s wallet (the saga's charge or refund)
    /// visible to the owner's next read at once, as the owner's own writes are.
    pub async fn show_owner(&self, user_id: Uuid) {
        self.reads.wrote_for(&user_id.to_string()).await;
    }

    /// The ledger entry with `key`, if any.
    pub async fn entry(&self, key: &str) -> Result<Option<transaction::Model>, PaymentError> {
        Ok(transaction::Entity::find()
            .filter(transaction::Column::IdempotencyKey.eq(key))
            .one(&self.db)
            .await?)
    }

    /// Up to `limit` entries of `user_id`'s ledger older than `before`, newest first.
    pub async fn entries(
        &self,
        user_id: Uuid,
        before: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<transaction::Model>, PaymentError> {
        let mut query = transaction::Entity::find()
            .filter(transaction::Column::UserId.eq(user_id))
            .order_by_desc(transaction::Column::Id)
            .limit(limit);
        if let Some(before) = before {
            query = query.filter(transaction::Column::Id.lt(before));
        }
        Ok(self
            .reads
            .read(|db| Box::pin(query.clone().all(db)))
            .await?)
    }
}

/// Writes `m`'s ledger row and moves the balance, in `txn`: the row first, whose unique key
/// serialises retries (and lets SQLite's single writer queue us instead of failing us); a
/// negative movement only if the balance covers it.
async fn write(
    txn: &DatabaseTransaction,
    m: &Movement,
) -> Result<transaction::Model, PaymentError> {
    let now = Utc::now();
    let entry = transaction::ActiveModel {
        id: Set(Uuid::now_v7()),
        user_id: Set(m.user_id),
        kind: Set(m.kind.to_owned()),
        amount_units: Set(m.amount.units),
        currency_code: Set(m.amount.currency_code.clone()),
        idempotency_key: Set(m.idempotency_key.clone()),
        request_hash: Set(m.request_hash.clone()),
        reference: Set(m.reference.clone()),
        created_at: Set(now),
    }
    .insert(txn)
    .await?;
    if m.amount.units >= 0 {
        credit(txn, m.user_id, &m.amount, now).await?;
    } else {
        // Conditional: of any number of concurrent charges, only those the balance covers take
        // effect.
        let debited = wallet::Entity::update_many()
            .col_expr(
                wallet::Column::BalanceUnits,
                Expr::col(wallet::Column::BalanceUnits).add(m.amount.units),
            )
            .col_expr(wallet::Column::UpdatedAt, Expr::value(now))
            .filter(wallet::Column::UserId.eq(m.user_id))
            .filter(wallet::Column::BalanceUnits.gte(-m.amount.units))
            .exec(txn)
            .await?;
        if debited.rows_affected == 0 {
            return Err(PaymentError::InsufficientFunds);
        }
    }
    Ok(entry)
}

/// A refund closed the payment id to charges.
const CLOSED: &str = "CLOSED";

fn statement(txn: &DatabaseTransaction, sql: &str, values: Vec<sea_orm::Value>) -> Statement {
    Statement::from_sql_and_values(txn.get_database_backend(), sql, values)
}

/// Whether payment id `payment` was charged (`CHARGED`) or closed (`CLOSED`), as `txn` sees it.
async fn payment_state(
    txn: &DatabaseTransaction,
    payment: &str,
) -> Result<Option<String>, PaymentError> {
    let row = txn
        .query_one_raw(statement(
            txn,
            "SELECT state FROM payments_payments WHERE payment_id = $1",
            vec![payment.into()],
        ))
        .await?;
    Ok(row.map(|r| r.try_get::<String>("", "state")).transpose()?)
}

/// The ledger entry with `key`, as `txn` sees it.
async fn entry_in(
    txn: &DatabaseTransaction,
    key: &str,
) -> Result<Option<transaction::Model>, PaymentError> {
    Ok(transaction::Entity::find()
        .filter(transaction::Column::IdempotencyKey.eq(key))
        .one(txn)
        .await?)
}

/// Adds `amount` to the wallet, creating it on first use.
async fn credit(
    txn: &DatabaseTransaction,
    user_id: Uuid,
    amount: &Amount,
    now: chrono::DateTime<Utc>,
) -> Result<(), PaymentError> {
    let upsert = Query::insert()
        .into_table(wallet::Entity)
        .columns([
            wallet::Column::UserId,
            wallet::Column::BalanceUnits,
            wallet::Column::CurrencyCode,
            wallet::Column::UpdatedAt,
        ])
        .values([
            user_id.into(),
            amount.units.into(),
            amount.currency_code.clone().into(),
            now.into(),
        ])
        .map_err(|e| PaymentError::from(sea_orm::DbErr::Custom(e.to_string())))?
        .on_conflict(
            OnConflict::column(wallet::Column::UserId)
                .value(
                    wallet::Column::BalanceUnits,
                    Expr::col((wallet::Entity, wallet::Column::BalanceUnits)).add(amount.units),
                )
                .value(wallet::Column::UpdatedAt, now)
                // Never past what a balance holds: SQLite would turn the sum into a REAL.
                .action_and_where(
                    Expr::col((wallet::Entity, wallet::Column::BalanceUnits))
                        .lte(i64::MAX - amount.units),
                )
                .to_owned(),
        )
        .to_owned();
    if txn.execute(&upsert).await?.rows_affected() == 0 {
        return Err(FieldError::new(
            "amount",
            "the balance would exceed the largest amount a wallet holds",
        )
        .into());
    }
    Ok(())
}
