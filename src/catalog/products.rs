//! Product rows: idempotent creates, conditional updates, keyset-paginated lists.

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, Condition, DatabaseConnection, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::entity::product;
use super::error::CatalogError;
use super::query::{ProductFilter, ProductOrder};
use crate::input::Amount;
use crate::store::insert_once;

/// A product to create.
#[derive(Debug, Clone)]
pub struct NewProduct {
    /// Validated title.
    pub title: String,
    /// Validated description.
    pub description: String,
    /// Validated price.
    pub price: Amount,
    /// Units on the shelf.
    pub stock: i64,
    /// AIP-155 request id and the request's fingerprint.
    pub request: Option<(String, String)>,
}

/// Changes to a product; `None` leaves a field alone.
#[derive(Debug, Default)]
pub struct ProductChanges {
    /// New title.
    pub title: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New price.
    pub price: Option<Amount>,
    /// New stock level.
    pub stock: Option<i64>,
    /// Only if the product is still at this version (its etag, as the caller read it).
    pub version: Option<i64>,
}

impl ProductChanges {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.title.is_none()
            && self.description.is_none()
            && self.price.is_none()
            && self.stock.is_none()
    }
}

/// Where the previous page of ListProducts ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Cursor {
    /// The last product's price (price orders only).
    pub price: Option<i64>,
    /// The last product's id.
    pub id: Uuid,
}

/// Product rows.
#[derive(Debug, Clone)]
pub struct ProductStore {
    db: DatabaseConnection,
    reads: keel_replicas::Reads,
}

impl ProductStore {
    /// Products written to the primary of `reads`, read where `reads` sends them.
    pub fn new(reads: keel_replicas::Reads) -> Self {
        Self {
            db: reads.primary().clone(),
            reads,
        }
    }

    /// Creates a product; a retry with the same request id and body returns the first one.
    pub async fn create(&self, new: NewProduct) -> Result<product::Model, CatalogError> {
        let now = Utc::now();
        let (request_id, request_hash) = new.request.clone().unzip();
        let row = product::ActiveModel {
            id: Set(Uuid::now_v7()),
            title: Set(new.title.clone()),
            description: Set(new.description.clone()),
            price_units: Set(new.price.units),
            currency_code: Set(new.price.currency_code.clone()),
            stock: Set(new.stock),
            request_id: Set(request_id),
            request_hash: Set(request_hash),
            created_at: Set(now),
            updated_at: Set(now),
            version: Set(1),
        };
        insert_once(|| self.replay(&new), || row.insert(&self.db)).await
    }

    async fn replay(&self, new: &NewProduct) -> Result<Option<product::Model>, CatalogError> {
        let Some((request_id, hash)) = &new.request else {
            return Ok(None);
        };
        let existing = product::Entity::find()
            .filter(product::Column::RequestId.eq(request_id.as_str()))
            .one(&self.db)
            .await?;
        Ok(crate::input::replay(
            existing,
            |m| m.request_hash.as_deref(),
            request_id,
            hash,
        )?)
    }

    /// Product `id`, if any.
    pub async fn find(&self, id: Uuid) -> Result<Option<product::Model>, CatalogError> {
        let query = product::Entity::find_by_id(id);
        Ok(self
            .reads
            .read(|db| Box::pin(query.clone().one(db)))
            .await?)
    }

    /// The products among `ids` that exist, in one query.
    pub async fn find_many(&self, ids: &[Uuid]) -> Result<Vec<product::Model>, CatalogError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let query = product::Entity::find().filter(product::Column::Id.is_in(ids.iter().copied()));
        Ok(self
            .reads
            .read(|db| Box::pin(query.clone().all(db)))
            .await?)
    }

    /// Up to `limit` products after `after` in `order`, matching `filter`.
    pub async fn list(
        &self,
        filter: &ProductFilter,
        order: ProductOrder,
        after: Option<Cursor>,
        limit: u64,
    ) -> Result<Vec<product::Model>, CatalogError> {
        use product::Column::{Id, PriceUnits, Stock};
        let mut query = product::Entity::find().limit(limit);
        if let Some(min) = filter.min_price {
            query = query.filter(PriceUnits.gte(min));
        }
        if let Some(max) = filter.max_price {
            query = query.filter(PriceUnits.lte(max));
        }
        match filter.in_stock {
            Some(true) => query = query.filter(Stock.gt(0)),
            Some(false) => query = query.filter(Stock.eq(0)),
            None => {}
        }
        query = match order {
            ProductOrder::CreatedAsc => query.order_by_asc(Id),
            ProductOrder::CreatedDesc => query.order_by_desc(Id),
            ProductOrder::PriceAsc => query.order_by_asc(PriceUnits).order_by_asc(Id),
            ProductOrder::PriceDesc => query.order_by_desc(PriceUnits).order_by_desc(Id),
        };
        if let Some(after) = after {
            let price = after.price.unwrap_or_default();
            query = query.filter(match order {
                ProductOrder::CreatedAsc => Condition::all().add(Id.gt(after.id)),
                ProductOrder::CreatedDesc => Condition::all().add(Id.lt(after.id)),
                ProductOrder::PriceAsc => Condition::any().add(PriceUnits.gt(price)).add(
                    Condition::all()
                        .add(PriceUnits.eq(price))
                        .add(Id.gt(after.id)),
                ),
                ProductOrder::PriceDesc => Condition::any().add(PriceUnits.lt(price)).add(
                    Condition::all()
                        .add(PriceUnits.eq(price))
                        .add(Id.lt(after.id)),
                ),
            });
        }
        Ok(self
            .reads
            .read(|db| Box::pin(query.clone().all(db)))
            .await?)
    }

    /// Applies `changes` to product `id`, only if it is still at `changes.version` when that is
    /// set: ABORTED when it moved on since the caller read it.
    pub async fn update(
        &self,
        id: Uuid,
        changes: ProductChanges,
    ) -> Result<product::Model, CatalogError> {
        let name = || super::product_name(id);
        if changes.is_empty() {
            // Nothing to change (a mask that named only the etag): the precondition alone.
            let now = self
                .find(id)
                .await?
                .ok_or_else(|| CatalogError::ProductNotFound(name()))?;
            return match changes.version {
                Some(version) if version != now.version => Err(CatalogError::Changed {
                    product: name(),
                    etag: now.version.to_string(),
                }),
                _ => Ok(now),
            };
        }
        let mut update = product::Entity::update_many()
            .col_expr(product::Column::UpdatedAt, Expr::value(Utc::now()))
            .col_expr(
                product::Column::Version,
                Expr::col(product::Column::Version).add(1),
            )
            .filter(product::Column::Id.eq(id));
        if let Some(title) = changes.title {
            update = update.col_expr(product::Column::Title, Expr::value(title));
        }
        if let Some(description) = changes.description {
            update = update.col_expr(product::Column::Description, Expr::value(description));
        }
        if let Some(price) = changes.price {
            update = update
                .col_expr(product::Column::PriceUnits, Expr::value(price.units))
                .col_expr(
                    product::Column::CurrencyCode,
                    Expr::value(price.currency_code),
                );
        }
        if let Some(stock) = changes.stock {
            update = update.col_expr(product::Column::Stock, Expr::value(stock));
        }
        if let Some(version) = changes.version {
            update = update.filter(product::Column::Version.eq(version));
        }
        if update.exec(&self.db).await?.rows_affected == 0 {
            return Err(match self.find(id).await? {
                Some(now) => CatalogError::Changed {
                    product: name(),
                    etag: now.version.to_string(),
                },
                None => CatalogError::ProductNotFound(name()),
            });
        }
        self.find(id)
            .await?
            .ok_or_else(|| CatalogError::ProductNotFound(name()))
    }

    /// Deletes product `id`.
    pub async fn delete(&self, id: Uuid) -> Result<(), CatalogError> {
        let deleted = product::Entity::delete_by_id(id).exec(&self.db).await?;
        if deleted.rows_affected == 0 {
            return Err(CatalogError::ProductNotFound(super::product_name(id)));
        }
        Ok(())
    }
}
