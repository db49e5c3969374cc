//! orders' storage: an order placed with its lines, its first history step and its saga job in
//! one transaction; the saga advanced stage by stage by conditional updates, each with its
//! history and its jobs in the same transaction (on PostgreSQL, the same statement), so that a
//! step replayed after a crash or a redelivery changes nothing twice.

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, ConnectionTrait as _, DatabaseConnection,
    DatabaseTransaction, DbBackend, EntityName as _, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _, Set, SqliteTransactionMode, TransactionOptions,
    TransactionTrait as _,
};
use uuid::Uuid;

use super::entity::{line, order, step};
use super::error::OrderError;
use super::lifecycle::{Action, Corrupt, OrderState, Outcome, Stage, Step};
use crate::store::is_unique_violation;

/// The job kind that drives an order's saga.
pub const SAGA: &str = "order.saga";
/// The job kind that tells the buyer what became of an order.
pub const NOTICE: &str = "order.email";
/// The notification channel of order changes (PostgreSQL).
pub const CHANNEL: &str = "keel_orders";

/// A history step as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The step.
    pub step: Step,
    /// When it ended.
    pub at: chrono::DateTime<Utc>,
}

/// An order with its lines and its history (`H`: the steps, or `()` where they were not read:
/// what runs the saga or sends its notices never reads them), read strictly.
#[derive(Debug, Clone)]
pub struct Placed<H = Vec<Recorded>> {
    /// The order row.
    pub order: order::Model,
    /// What the buyer sees.
    pub state: OrderState,
    /// What the saga still has to do.
    pub stage: Stage,
    /// Its lines, in request order.
    pub lines: Vec<line::Model>,
    /// Its saga's steps, oldest first.
    pub history: H,
}

/// An order with its lines, as the saga and its notices read it (no history).
pub type Unrecorded = Placed<()>;

impl<H> Placed<H> {
    /// Whether the saga is done with it (CONFIRMED, REJECTED or CANCELLED, nothing pending).
    pub fn settled(&self) -> bool {
        self.stage == Stage::Done && self.state != OrderState::Pending
    }

    /// The order and its lines, read strictly, with `history`.
    fn with(order: order::Model, lines: Vec<line::Model>, history: H) -> Result<Self, Corrupt> {
        Ok(Self {
            state: OrderState::parse(&order.state)?,
            stage: Stage::parse(&order.stage)?,
            order,
            lines,
            history,
        })
    }
}

impl Placed {
    fn read(
        order: order::Model,
        lines: Vec<line::Model>,
        history: &[step::Model],
    ) -> Result<Self, Corrupt> {
        let history = history
            .iter()
            .map(|s| {
                Ok(Recorded {
                    step: Step {
                        action: Action::parse(&s.action)?,
                        outcome: Outcome::parse(&s.outcome)?,
                        detail: s.detail.clone(),
                        compensation: s.compensation,
                    },
                    at: s.created_at,
                })
            })
            .collect::<Result<_, Corrupt>>()?;
        Self::with(order, lines, history)
    }
}

/// A line to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLine {
    /// The product.
    pub product_id: Uuid,
    /// Its title now, for the buyer's e-mails.
    pub title: String,
    /// Units.
    pub quantity: i64,
    /// Price of one unit now.
    pub unit_price_units: i64,
}

/// An order to place.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// The buyer.
    pub user_id: Uuid,
    /// Where the confirmation goes.
    pub buyer_email: String,
    /// The lines' currency.
    pub currency_code: String,
    /// The lines.
    pub lines: Vec<NewLine>,
    /// AIP-155 request id and the request's fingerprint.
    pub request: (String, String),
}

/// What a stage change also does.
#[derive(Debug, Default)]
pub struct Change {
    /// The order's new state, if it changes.
    pub state: Option<OrderState>,
    /// Why it is rejected.
    pub reason: Option<String>,
    /// Steps to record.
    pub steps: Vec<Step>,
    /// A notice to send the buyer once (`confirmation`, `cancellation`).
    pub notice: Option<&'static str>,
    /// The saga has work again: a job for this phase (`cancel`), one per order and phase.
    pub saga: Option<&'static str>,
}

/// Orders, their lines and history.
#[derive(Debug, Clone)]
pub struct OrderStore {
    db: DatabaseConnection,
}

impl OrderStore {
    /// Orders in `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Places `new`: the order PENDING, its lines, its first step and its saga's job, in one
    /// transaction. A concurrent call with the same request id that committed first is
    /// answered as it was.
    pub async fn place(&self, new: NewOrder) -> Result<Placed, OrderError> {
        let (request_id, request_hash) = new.request.clone();
        match self.try_place(new.clone()).await {
            Err(OrderError::Refused(crate::refusal::Refusal::Database(e)))
                if is_unique_violation(&e) =>
            {
                self.by_request(new.user_id, &request_id, &request_hash)
                    .await?
                    .ok_or(OrderError::Refused(crate::refusal::Refusal::Database(e)))
            }
            placed => placed,
        }
    }

    async fn try_place(&self, new: NewOrder) -> Result<Placed, OrderError> {
        let now = Utc::now();
        let id = Uuid::now_v7();
        let total = new.lines.iter().try_fold(0i64, |sum, l| {
            l.unit_price_units
                .checked_mul(l.quantity)
                .and_then(|line| sum.checked_add(line))
        });
        let total = total.ok_or_else(|| {
            crate::input::FieldError::new("order.line_items", "the total is too large")
        })?;
        let txn = self.db.begin().await?;
        // The order row first: its unique request id serialises retries, and writing first
        // lets SQLite's one writer queue us.
        let order = order::ActiveModel {
            id: Set(id),
            user_id: Set(new.user_id),
            state: Set(OrderState::Pending.as_str().into()),
            stage: Set(Stage::Reserve.as_str().into()),
            rejection_reason: Set(String::new()),
            currency_code: Set(new.currency_code.clone()),
            total_units: Set(total),
            buyer_email: Set(new.buyer_email.clone()),
            request_id: Set(new.request.0.clone()),
            request_hash: Set(new.request.1.clone()),
            version: Set(1),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(&txn)
        .await?;
        let mut lines = Vec::with_capacity(new.lines.len());
        for (position, l) in new.lines.iter().enumerate() {
            let line = line::ActiveModel {
                order_id: Set(id),
                position: Set(i32::try_from(position).unwrap_or(i32::MAX)),
                product_id: Set(l.product_id),
                quantity: Set(l.quantity),
                unit_price_units: Set(l.unit_price_units),
                currency_code: Set(new.currency_code.clone()),
                title: Set(l.title.clone()),
            }
            .insert(&txn)
            .await?;
            lines.push(line);
        }
        let history = record(&txn, id, &[Step::done(Action::Place)]).await?;
        keel_queue::enqueue(&txn, saga_job(id, new.user_id, "place"))
            .await
            .map_err(OrderError::Queue)?;
        notify(&txn, id).await?;
        txn.commit().await?;
        // The rows as written (each insert returned its own): no read after the commit.
        Ok(Placed::read(order, lines, &history)?)
    }

    /// The order `user_id` placed under `request_id`, if any; refused when that order was
    /// placed with another request (`hash`).
    pub async fn by_request(
        &self,
        user_id: Uuid,
        request_id: &str,
        hash: &str,
    ) -> Result<Option<Placed>, OrderError> {
        let found = order::Entity::find()
            .filter(order::Column::UserId.eq(user_id))
            .filter(order::Column::RequestId.eq(request_id))
            .one(&self.db)
            .await?;
        match crate::input::replay(found, |m| Some(m.request_hash.as_str()), request_id, hash)? {
            Some(found) => self.complete(found).await.map(Some),
            None => Ok(None),
        }
    }

    /// Order `id`, if any.
    pub async fn find(&self, id: Uuid) -> Result<Option<Placed>, OrderError> {
        match order::Entity::find_by_id(id).one(&self.db).await? {
            Some(found) => self.complete(found).await.map(Some),
            None => Ok(None),
        }
    }

    /// Order `id` and its lines, without its history, if any: what the saga and its notices
    /// read, in one statement (the order joined to its lines).
    pub async fn find_unrecorded(&self, id: Uuid) -> Result<Option<Unrecorded>, OrderError> {
        let found = order::Entity::find_by_id(id)
            .find_with_related(line::Entity)
            .order_by_asc(line::Column::Position)
            .all(&self.db)
            .await?;
        match found.into_iter().next() {
            Some((found, lines)) => Ok(Some(Placed::with(found, lines, ())?)),
            None => Ok(None),
        }
    }

    async fn lines(&self, id: Uuid) -> Result<Vec<line::Model>, OrderError> {
        Ok(line::Entity::find()
            .filter(line::Column::OrderId.eq(id))
            .order_by_asc(line::Column::Position)
            .all(&self.db)
            .await?)
    }

    async fn complete(&self, found: order::Model) -> Result<Placed, OrderError> {
        let lines = self.lines(found.id).await?;
        let history = step::Entity::find()
            .filter(step::Column::OrderId.eq(found.id))
            .order_by_asc(step::Column::Seq)
            .all(&self.db)
            .await?;
        Ok(Placed::read(found, lines, &history)?)
    }

    /// Up to `limit` of `user_id`'s orders placed before `before`, newest first.
    pub async fn list(
        &self,
        user_id: Uuid,
        before: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<Placed>, OrderError> {
        let mut query = order::Entity::find()
            .filter(order::Column::UserId.eq(user_id))
            .order_by_desc(order::Column::Id)
            .limit(limit);
        if let Some(before) = before {
            query = query.filter(order::Column::Id.lt(before));
        }
        let orders = query.all(&self.db).await?;
        let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
        let lines = line::Entity::find()
            .filter(line::Column::OrderId.is_in(ids.clone()))
            .order_by_asc(line::Column::Position)
            .all(&self.db)
            .await?;
        let history = step::Entity::find()
            .filter(step::Column::OrderId.is_in(ids))
            .order_by_asc(step::Column::Seq)
            .all(&self.db)
            .await?;
        orders
            .into_iter()
            .map(|o| {
                let id = o.id;
                let mine: Vec<line::Model> =
                    lines.iter().filter(|l| l.order_id == id).cloned().collect();
                let steps: Vec<step::Model> = history
                    .iter()
                    .filter(|s| s.order_id == id)
                    .cloned()
                    .collect();
                Ok(Placed::read(o, mine, &steps)?)
            })
            .collect()
    }

    /// Up to `limit` orders whose saga is not done and that have not changed since `before`,
    /// oldest change first, each with its stage (or why it cannot be read).
    pub async fn unsettled(
        &self,
        before: chrono::DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<(order::Model, Result<Stage, Corrupt>)>, OrderError> {
        let rows = order::Entity::find()
            .filter(order::Column::Stage.ne(Stage::Done.as_str()))
            .filter(order::Column::UpdatedAt.lt(before))
            .order_by_asc(order::Column::UpdatedAt)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|o| {
                let stage = Stage::parse(&o.stage);
                (o, stage)
            })
            .collect())
    }

    /// Makes sure a saga job drives `order` (as the sweep read it) through `phase`. The order's
    /// row is held, at the version read, while the job is written: a saga job that finished the
    /// order in between leaves no live job behind, and without the check a needless one would
    /// be written after it.
    pub async fn redrive(&self, order: &order::Model, phase: &str) -> Result<Redrive, OrderError> {
        // FOR UPDATE on PostgreSQL; on SQLite, its one writer's lock from BEGIN (IMMEDIATE), so
        // that the busy timeout queues the sweep behind other writers instead of failing it.
        let txn = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            })
            .await?;
        let unmoved = order::Entity::find_by_id(order.id)
            .filter(order::Column::Version.eq(order.version))
            .lock_exclusive()
            .one(&txn)
            .await?
            .is_some();
        if !unmoved {
            return Ok(Redrive::Moved);
        }
        let enqueued = keel_queue::enqueue_new(&txn, saga_job(order.id, order.user_id, phase))
            .await
            .map_err(OrderError::Queue)?;
        txn.commit().await?;
        Ok(match enqueued {
            keel_queue::Enqueued::Written(_) => Redrive::Written,
            _ => Redrive::Waiting,
        })
    }

    /// Moves order `id` (of `buyer`) from stage `from` to `to` with `change`, all at once (on
    /// PostgreSQL one statement, on SQLite one transaction), and only while `fence` (the saga
    /// job's attempt, when a saga step writes) still holds its job; false when the order was not
    /// at `from` any more (another run of its saga moved it).
    pub async fn advance(
        &self,
        (id, buyer): (Uuid, Uuid),
        (from, to): (Stage, Stage),
        change: Change,
        fence: Option<&keel_queue::Fence>,
    ) -> Result<bool, OrderError> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            return self
                .advance_at_once((id, buyer), (from, to), &change, fence)
                .await;
        }
        let txn = self.db.begin().await?;
        if let Some(fence) = fence {
            keel_queue::hold(&txn, fence)
                .await
                .map_err(OrderError::Queue)?;
        }
        let mut update = order::Entity::update_many()
            .col_expr(order::Column::Stage, Expr::value(to.as_str()))
            .col_expr(
                order::Column::Version,
                Expr::col(order::Column::Version).add(1),
            )
            .col_expr(order::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(order::Column::Id.eq(id))
            .filter(order::Column::Stage.eq(from.as_str()));
        if let Some(state) = leaving(from) {
            update = update.filter(order::Column::State.eq(state.as_str()));
        }
        if let Some(state) = change.state {
            update = update.col_expr(order::Column::State, Expr::value(state.as_str()));
        }
        if let Some(reason) = &change.reason {
            update = update.col_expr(order::Column::RejectionReason, Expr::value(reason.clone()));
        }
        if update.exec(&txn).await?.rows_affected == 0 {
            // Not at `from` any more.
            return Ok(false);
        }
        record(&txn, id, &change.steps).await?;
        for job in jobs((id, buyer), &change) {
            keel_queue::enqueue(&txn, job)
                .await
                .map_err(OrderError::Queue)?;
        }
        notify(&txn, id).await?;
        txn.commit().await?;
        Ok(true)
    }

    /// [`advance`](Self::advance) on PostgreSQL: one statement instead of a transaction — the
    /// fence held (the job's row locked first, as [`keel_queue::hold`] does), the order moved
    /// on, its steps appended, its jobs queued and watchers told, each only if what came before
    /// it happened. The steps are
    /// numbered from the statement's snapshot, taken before it waits for the order's row: sound
    /// because every writer of an order's history moves it on from a stage and no order leaves
    /// a stage twice (see [`leaving`]), so a writer that committed meanwhile leaves `moved` empty
    /// (were that to change, the (order_id, seq) key refuses the step: an error, not a wrong
    /// history).
    async fn advance_at_once(
        &self,
        (id, buyer): (Uuid, Uuid),
        (from, to): (Stage, Stage),
        change: &Change,
        fence: Option<&keel_queue::Fence>,
    ) -> Result<bool, OrderError> {
        let mut values: Vec<sea_orm::Value> = vec![
            id.into(),
            Utc::now().into(),
            from.as_str().into(),
            to.as_str().into(),
        ];
        let mut sets = vec![
            "stage = $4".to_owned(),
            "version = version + 1".into(),
            "updated_at = $2".into(),
        ];
        if let Some(state) = change.state {
            values.push(state.as_str().into());
            sets.push(format!("state = ${}", values.len()));
        }
        if let Some(reason) = &change.reason {
            values.push(reason.clone().into());
            sets.push(format!("rejection_reason = ${}", values.len()));
        }
        let mut moving = "stage = $3".to_owned();
        if let Some(state) = leaving(from) {
            values.push(state.as_str().into());
            moving = format!("{moving} AND state = ${}", values.len());
        }
        let mut with = Vec::new();
        let mut held = "TRUE";
        if let Some(fence) = fence {
            let (sql, fenced) = keel_queue::held(fence, values.len() + 1);
            values.extend(fenced);
            with.push(format!("held AS ({sql})"));
            held = "EXISTS (SELECT 1 FROM held)";
        }
        with.push(format!(
            "moved AS (UPDATE {} SET {} WHERE id = $1 AND {moving} AND {held} RETURNING id)",
            order::Entity.table_name(),
            sets.join(", ")
        ));
        if !change.steps.is_empty() {
            let steps = appending(&change.steps, &mut values, "moved CROSS JOIN ");
            with.push(format!("steps AS ({steps} RETURNING 1)"));
        }
        for (k, job) in jobs((id, buyer), change).iter().enumerate() {
            let (sql, queued) = keel_queue::enqueuing(job, "moved", values.len() + 1);
            values.extend(queued);
            with.push(format!("job{k} AS ({sql})"));
        }
        // Told only when moved: NOTIFY is delivered once the statement commits.
        let sql = format!(
            "WITH {} SELECT {held} AS held, EXISTS (SELECT 1 FROM moved) AS moved, \
             (SELECT pg_notify('{CHANNEL}', CAST(id AS TEXT)) FROM moved) AS told",
            with.join(", ")
        );
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await?
            .ok_or_else(|| sea_orm::DbErr::RecordNotFound("the stage's own row".into()))?;
        if let Some(fence) = fence
            && !row.try_get::<bool>("", "held")?
        {
            return Err(OrderError::Queue(fence.lost()));
        }
        Ok(row.try_get::<bool>("", "moved")?)
    }
}

/// Appends `steps` to order `id`'s history, numbered after its last step, in one statement;
/// the steps as recorded. The order's row is locked (written first in the same transaction), so
/// no other writer numbers steps of this order meanwhile.
async fn record(
    txn: &DatabaseTransaction,
    id: Uuid,
    steps: &[Step],
) -> Result<Vec<step::Model>, OrderError> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let mut values: Vec<sea_orm::Value> = vec![id.into(), Utc::now().into()];
    let sql = format!(
        "{} RETURNING order_id, seq, action, outcome, detail, compensation, created_at",
        appending(steps, &mut values, "")
    );
    let recorded = txn
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            txn.get_database_backend(),
            sql,
            values,
        ))
        .await?;
    let mut recorded = recorded
        .iter()
        .map(|row| <step::Model as sea_orm::FromQueryResult>::from_query_result(row, ""))
        .collect::<Result<Vec<_>, _>>()?;
    recorded.sort_by_key(|s| s.seq);
    Ok(recorded)
}

/// The INSERT that appends `steps` to the history of order `$1`, stamped `$2`, numbered after
/// its last step, their values pushed onto `values`; its rows are the VALUES list crossed with
/// `source` (`"moved CROSS JOIN "`: as many times as that names rows, none when it is empty).
fn appending(steps: &[Step], values: &mut Vec<sea_orm::Value>, source: &str) -> String {
    let mut rows = Vec::with_capacity(steps.len());
    for (k, s) in steps.iter().enumerate() {
        let first = values.len() + 1;
        rows.push(format!(
            "(${first}, ${}, ${}, ${}, ${})",
            first + 1,
            first + 2,
            first + 3,
            first + 4
        ));
        values.extend([
            i32::try_from(k + 1).unwrap_or(i32::MAX).into(),
            s.action.as_str().into(),
            s.outcome.as_str().into(),
            s.detail.clone().into(),
            s.compensation.into(),
        ]);
    }
    // A VALUES list's columns are column1, column2, … on PostgreSQL and SQLite alike.
    format!(
        "INSERT INTO orders_history \
         (order_id, seq, action, outcome, detail, compensation, created_at) \
         SELECT $1, last.seq + step.column1, step.column2, step.column3, step.column4, \
         step.column5, $2 FROM {source}(VALUES {}) AS step \
         CROSS JOIN (SELECT COALESCE(MAX(seq), 0) AS seq FROM orders_history \
         WHERE order_id = $1) AS last",
        rows.join(", ")
    )
}

/// The state an order must be in to leave stage `from`, if one: a settled order leaves `done`
/// only to be cancelled, and only while CONFIRMED — so no stage is left twice (a cancellation
/// that read the order before another was settled finds it CANCELLED and moves nothing).
fn leaving(from: Stage) -> Option<OrderState> {
    (from == Stage::Done).then_some(OrderState::Confirmed)
}

/// The jobs `change` queues for order `id` of `buyer`: its notice, then its saga's next phase.
fn jobs((id, buyer): (Uuid, Uuid), change: &Change) -> Vec<keel_queue::NewJob> {
    let notice = change.notice.map(|notice| notice_job(id, buyer, notice));
    let saga = change.saga.map(|phase| saga_job(id, buyer, phase));
    notice.into_iter().chain(saga).collect()
}

/// What [`OrderStore::redrive`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redrive {
    /// The order's saga job had died or was gone: a new one was written.
    Written,
    /// A live saga job drives the order.
    Waiting,
    /// The order moved since the sweep read it: whatever moved it drives it.
    Moved,
}

/// The job that drives order `id`'s saga through `phase` (`place`, `cancel`): one live job per
/// order and phase, so that a cancellation is not taken for the placement's job still
/// finishing.
fn saga_job(id: Uuid, buyer: Uuid, phase: &str) -> keel_queue::NewJob {
    keel_queue::NewJob {
        kind: SAGA.into(),
        payload: serde_json::json!({ "order": id.to_string() }),
        creator: crate::principal::user_name(buyer),
        unique_key: Some(format!("{SAGA}:{id}:{phase}")),
        max_attempts: Some(50),
        ..keel_queue::NewJob::default()
    }
}

/// The job that e-mails the buyer `notice` about order `id`, once per order and notice; it
/// reads the order when it runs, so it never tells of a state the order has left.
fn notice_job(id: Uuid, buyer: Uuid, notice: &str) -> keel_queue::NewJob {
    keel_queue::NewJob {
        kind: NOTICE.into(),
        payload: serde_json::json!({ "order": id.to_string(), "notice": notice }),
        creator: crate::principal::user_name(buyer),
        unique_key: Some(format!("{NOTICE}:{id}:{notice}")),
        // Tried for as long as mail is (its kind's window), not a number of times.
        max_attempts: Some(i32::MAX),
        ..keel_queue::NewJob::default()
    }
}

/// Tells watchers in every process that order `id` changed (PostgreSQL delivers it at commit;
/// SQLite's watchers poll).
async fn notify(txn: &DatabaseTransaction, id: Uuid) -> Result<(), OrderError> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!("NOTIFY {CHANNEL}, '{id}'"))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use sea_orm::sqlx::postgres::PgListener;

    use super::*;

    /// The store on a fresh PostgreSQL database, an order placed in it with its saga's job
    /// claimed (the attempt's fence), and a count of the statements run from now on.
    async fn placed() -> (
        OrderStore,
        Placed,
        keel_queue::Fence,
        Arc<AtomicUsize>,
        String,
    ) {
        let url = keel_testkit::fresh_database().await;
        let mut db = sea_orm::Database::connect(&url).await.unwrap();
        crate::app::migrate(&db, &[&super::super::DOMAIN])
            .await
            .unwrap();
        let counted = Arc::new(AtomicUsize::new(0));
        let counter = counted.clone();
        db.set_metric_callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let store = OrderStore::new(db.clone());
        let order = store
            .place(NewOrder {
                user_id: Uuid::now_v7(),
                buyer_email: "ada@example.com".into(),
                currency_code: "EUR".into(),
                lines: [("Lamp", 1, 100), ("Chair", 2, 40), ("Desk", 1, 300)]
                    .into_iter()
                    .map(|(title, quantity, unit_price_units)| NewLine {
                        product_id: Uuid::now_v7(),
                        title: title.into(),
                        quantity,
                        unit_price_units,
                    })
                    .collect(),
                request: ("r1".into(), "h1".into()),
            })
            .await
            .unwrap();
        let jobs = keel_queue::JobStore::new(db);
        let claimed = jobs
            .claim("w", SAGA, None, 1, Duration::from_secs(60), None)
            .await
            .unwrap();
        let fence = claimed[0].fence();
        counted.store(0, Ordering::SeqCst);
        (store, order, fence, counted, url)
    }

    async fn listening(url: &str) -> PgListener {
        let mut listener = PgListener::connect(url).await.unwrap();
        listener.listen(CHANNEL).await.unwrap();
        listener
    }

    fn steps(placed: &Placed) -> Vec<Step> {
        placed.history.iter().map(|r| r.step.clone()).collect()
    }

    /// What the saga and its notices read, an order and its lines in request order, is one
    /// statement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_order_is_read_with_its_lines_in_one_statement() {
        let (store, order, _, counted, _) = placed().await;
        let read = store
            .find_unrecorded(order.order.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(counted.load(Ordering::SeqCst), 1);
        assert_eq!(read.order, order.order);
        assert_eq!(read.lines, order.lines);
        assert_eq!(
            (read.stage, read.state),
            (Stage::Reserve, OrderState::Pending)
        );
        let unknown = store.find_unrecorded(Uuid::now_v7()).await.unwrap();
        assert!(unknown.is_none());
    }

    /// The jobs of `kind`, oldest first: their payload, creator, unique key and state.
    async fn queued(db: &DatabaseConnection, kind: &str) -> Vec<(String, String, String, String)> {
        let rows = db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT payload, creator, unique_key, state FROM queue_jobs \
                 WHERE kind = $1 ORDER BY created_at, id",
                [kind.into()],
            ))
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                let get = |c: &str| r.try_get::<String>("", c).unwrap();
                (
                    get("payload"),
                    get("creator"),
                    get("unique_key"),
                    get("state"),
                )
            })
            .collect()
    }

    /// On PostgreSQL a stage that writes no job is one statement: the order moved on under the
    /// job's fence, its steps numbered after the last, its watchers told.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_that_writes_no_job_is_one_statement() {
        let (store, order, fence, counted, url) = placed().await;
        let mut told = listening(&url).await;
        let id = (order.order.id, order.order.user_id);
        let change = Change {
            steps: vec![Step::done(Action::ReserveStock)],
            ..Change::default()
        };
        let moved = store.advance(id, (Stage::Reserve, Stage::Charge), change, Some(&fence));
        assert!(moved.await.unwrap());
        assert_eq!(counted.load(Ordering::SeqCst), 1);
        let notice = tokio::time::timeout(Duration::from_secs(10), told.recv()).await;
        let notice = notice.expect("watchers told").unwrap();
        assert_eq!(notice.payload(), id.0.to_string());

        let decided = Change {
            reason: Some("insufficient funds".into()),
            steps: vec![Step::refused(Action::Charge, "no money")],
            ..Change::default()
        };
        let moved = store.advance(id, (Stage::Charge, Stage::Reject), decided, Some(&fence));
        assert!(moved.await.unwrap());
        let settled = Change {
            state: Some(OrderState::Rejected),
            steps: vec![
                Step::compensation(Action::ReleaseStock, "the reserved stock went back"),
                Step::refused(Action::Reject, "insufficient funds"),
            ],
            ..Change::default()
        };
        let moved = store.advance(id, (Stage::Reject, Stage::Done), settled, Some(&fence));
        assert!(moved.await.unwrap());
        assert_eq!(counted.load(Ordering::SeqCst), 3);

        let now = store.find(id.0).await.unwrap().unwrap();
        assert_eq!((now.stage, now.state), (Stage::Done, OrderState::Rejected));
        assert_eq!(now.order.rejection_reason, "insufficient funds");
        assert_eq!(now.order.version, order.order.version + 3);
        assert_eq!(
            steps(&now),
            [
                Step::done(Action::Place),
                Step::done(Action::ReserveStock),
                Step::refused(Action::Charge, "no money"),
                Step::compensation(Action::ReleaseStock, "the reserved stock went back"),
                Step::refused(Action::Reject, "insufficient funds"),
            ]
        );
    }

    /// The confirmation queues its notice in the same one statement, once: a replay moves
    /// nothing and queues nothing; a cancellation queues the saga's next phase the same way,
    /// and a settled cancellation is not cancelled again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_queues_its_jobs_in_the_same_statement() {
        let (store, order, fence, counted, _) = placed().await;
        let id = (order.order.id, order.order.user_id);
        for (from, to) in [
            (Stage::Reserve, Stage::Charge),
            (Stage::Charge, Stage::Commit),
        ] {
            let moved = store.advance(id, (from, to), Change::default(), Some(&fence));
            assert!(moved.await.unwrap());
        }
        let confirm = || Change {
            state: Some(OrderState::Confirmed),
            steps: vec![
                Step::done(Action::CommitReservation),
                Step::done(Action::Confirm),
            ],
            notice: Some("confirmation"),
            ..Change::default()
        };
        let before = counted.load(Ordering::SeqCst);
        let moved = store.advance(id, (Stage::Commit, Stage::Done), confirm(), Some(&fence));
        assert!(moved.await.unwrap());
        assert_eq!(counted.load(Ordering::SeqCst) - before, 1);
        // The notice sent: its unique key no longer stands for it, so a replay that wrote
        // despite moving nothing would show.
        store
            .db
            .execute_unprepared(&format!(
                "UPDATE queue_jobs SET state = 'SUCCEEDED' WHERE kind = '{NOTICE}'"
            ))
            .await
            .unwrap();
        let moved = store.advance(id, (Stage::Commit, Stage::Done), confirm(), Some(&fence));
        assert!(!moved.await.unwrap(), "a replay moves nothing");
        let cancel = || Change {
            steps: vec![Step::done(Action::Cancel)],
            saga: Some("cancel"),
            ..Change::default()
        };
        let before = counted.load(Ordering::SeqCst);
        let moved = store.advance(id, (Stage::Done, Stage::Cancel), cancel(), None);
        assert!(moved.await.unwrap());
        assert_eq!(counted.load(Ordering::SeqCst) - before, 1);
        let settled = Change {
            state: Some(OrderState::Cancelled),
            steps: vec![Step::compensation(
                Action::Refund,
                "the charge was refunded",
            )],
            notice: Some("cancellation"),
            ..Change::default()
        };
        let moved = store.advance(id, (Stage::Cancel, Stage::Done), settled, Some(&fence));
        assert!(moved.await.unwrap());
        // A cancellation that read the order CONFIRMED before this one settled.
        let moved = store.advance(id, (Stage::Done, Stage::Cancel), cancel(), None);
        assert!(
            !moved.await.unwrap(),
            "a settled cancellation is not cancelled again"
        );

        let creator = crate::principal::user_name(id.1);
        let notices = queued(&store.db, NOTICE).await;
        assert_eq!(
            notices.len(),
            2,
            "the confirmation, the cancellation: {notices:?}"
        );
        let payload = serde_json::json!({ "order": id.0.to_string(), "notice": "confirmation" });
        assert_eq!(notices[0].0, payload.to_string());
        assert_eq!(notices[0].1, creator);
        assert_eq!(notices[0].2, format!("{NOTICE}:{}:confirmation", id.0));
        assert_eq!(notices[1].2, format!("{NOTICE}:{}:cancellation", id.0));
        assert_eq!(notices[1].3, "QUEUED");
        let sagas = queued(&store.db, SAGA).await;
        assert_eq!(
            sagas.len(),
            2,
            "the placement's and the cancellation's: {sagas:?}"
        );
        assert_eq!(sagas[1].2, format!("{SAGA}:{}:cancel", id.0));

        let now = store.find(id.0).await.unwrap().unwrap();
        assert_eq!((now.stage, now.state), (Stage::Done, OrderState::Cancelled));
        assert_eq!(now.history.len(), 5, "{:?}", now.history);
    }

    /// An attempt that no longer holds its job (another attempt claimed it since) moves
    /// nothing, records nothing and tells no one: its write is refused as a lost lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_under_a_fence_that_lost_its_job_writes_nothing() {
        let (store, order, fence, _, url) = placed().await;
        let mut told = listening(&url).await;
        let id = (order.order.id, order.order.user_id);
        let stale = keel_queue::Fence {
            attempt: fence.attempt - 1,
            ..fence
        };
        let change = Change {
            steps: vec![Step::done(Action::ReserveStock)],
            ..Change::default()
        };
        let refused = store
            .advance(id, (Stage::Reserve, Stage::Charge), change, Some(&stale))
            .await;
        assert!(
            matches!(
                refused,
                Err(OrderError::Queue(keel_queue::QueueError::LeaseLost { .. }))
            ),
            "{refused:?}"
        );
        let now = store.find(id.0).await.unwrap().unwrap();
        assert_eq!(now.stage, Stage::Reserve);
        assert_eq!(now.order.version, order.order.version);
        assert_eq!(steps(&now), [Step::done(Action::Place)]);
        // Notifications arrive in commit order: the first is one sent after the refusal.
        store
            .db
            .execute_unprepared(&format!("NOTIFY {CHANNEL}, 'after'"))
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), told.recv()).await;
        let first = first.expect("the marker arrives").unwrap();
        assert_eq!(
            first.payload(),
            "after",
            "told of a change that did not happen"
        );
    }

    /// A stage the order has already left (another run moved it) writes nothing and says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_the_order_has_left_writes_nothing() {
        let (store, order, fence, _, _) = placed().await;
        let id = (order.order.id, order.order.user_id);
        let change = Change {
            steps: vec![Step::done(Action::Charge)],
            ..Change::default()
        };
        let moved = store.advance(id, (Stage::Charge, Stage::Commit), change, Some(&fence));
        assert!(!moved.await.unwrap());
        let now = store.find(id.0).await.unwrap().unwrap();
        assert_eq!(now.stage, Stage::Reserve);
        assert_eq!(steps(&now), [Step::done(Action::Place)]);
    }
}
