//! todos' storage: one owner's list, keyset-paginated newest first, with idempotent creates.

use chrono::Utc;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, DatabaseConnection, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
};
use uuid::Uuid;

use super::entity::todo;
use super::error::TodoError;
use crate::store::insert_once;
use keel_replicas::Reads;

/// A todo to create.
#[derive(Debug)]
pub struct NewTodo {
    /// The owner.
    pub user_id: Uuid,
    /// Validated title.
    pub title: String,
    /// Done already?
    pub completed: bool,
    /// AIP-155 request id and the request's fingerprint.
    pub request: Option<(String, String)>,
}

/// Changes to a todo; `None` leaves a field alone.
#[derive(Debug, Default)]
pub struct TodoChanges {
    /// New title.
    pub title: Option<String>,
    /// New completion.
    pub completed: Option<bool>,
}

/// Todo rows.
#[derive(Debug, Clone)]
pub struct TodoStore {
    db: DatabaseConnection,
    reads: Reads,
}

impl TodoStore {
    /// Todos written to the primary of `reads`, read where `reads` sends them.
    pub fn new(reads: Reads) -> Self {
        Self {
            db: reads.primary().clone(),
            reads,
        }
    }

    /// Creates a todo; a retry with the same request id and body returns the first one.
    pub async fn create(&self, new: NewTodo) -> Result<todo::Model, TodoError> {
        let now = Utc::now();
        let (request_id, request_hash) = new.request.clone().unzip();
        let row = todo::ActiveModel {
            id: Set(Uuid::now_v7()),
            user_id: Set(new.user_id),
            title: Set(new.title.clone()),
            completed: Set(new.completed),
            request_id: Set(request_id),
            request_hash: Set(request_hash),
            created_at: Set(now),
            updated_at: Set(now),
        };
        insert_once(|| self.replay(&new), || row.insert(&self.db)).await
    }

    /// The todo created earlier under the same request id, if any; a reuse with another body
    /// is refused.
    async fn replay(&self, new: &NewTodo) -> Result<Option<todo::Model>, TodoError> {
        let Some((request_id, hash)) = &new.request else {
            return Ok(None);
        };
        let existing = todo::Entity::find()
            .filter(todo::Column::UserId.eq(new.user_id))
            .filter(todo::Column::RequestId.eq(request_id.as_str()))
            .one(&self.db)
            .await?;
        Ok(crate::input::replay(
            existing,
            |m| m.request_hash.as_deref(),
            request_id,
            hash,
        )?)
    }

    /// Todo `id` of `user_id`, if any.
    pub async fn find(&self, user_id: Uuid, id: Uuid) -> Result<Option<todo::Model>, TodoError> {
        let query = todo::Entity::find_by_id(id).filter(todo::Column::UserId.eq(user_id));
        Ok(self
            .reads
            .read(|db| Box::pin(query.clone().one(db)))
            .await?)
    }

    /// Up to `limit` of the owner's todos older than `before`, newest first.
    pub async fn list(
        &self,
        user_id: Uuid,
        completed: Option<bool>,
        before: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<todo::Model>, TodoError> {
        let mut query = todo::Entity::find()
            .filter(todo::Column::UserId.eq(user_id))
            .order_by_desc(todo::Column::Id)
            .limit(limit);
        if let Some(completed) = completed {
            query = query.filter(todo::Column::Completed.eq(completed));
        }
        if let Some(before) = before {
            query = query.filter(todo::Column::Id.lt(before));
        }
        Ok(self
            .reads
            .read(|db| Box::pin(query.clone().all(db)))
            .await?)
    }

    /// Applies `changes` to the owner's todo `id`.
    pub async fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        changes: TodoChanges,
    ) -> Result<todo::Model, TodoError> {
        let mut update = todo::Entity::update_many()
            .col_expr(todo::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(todo::Column::Id.eq(id))
            .filter(todo::Column::UserId.eq(user_id));
        if let Some(title) = changes.title {
            update = update.col_expr(todo::Column::Title, Expr::value(title));
        }
        if let Some(completed) = changes.completed {
            update = update.col_expr(todo::Column::Completed, Expr::value(completed));
        }
        if update.exec(&self.db).await?.rows_affected == 0 {
            return Err(TodoError::NotFound);
        }
        self.find(user_id, id).await?.ok_or(TodoError::NotFound)
    }

    /// Deletes the owner's todo `id`.
    pub async fn delete(&self, user_id: Uuid, id: Uuid) -> Result<(), TodoError> {
        let deleted = todo::Entity::delete_many()
            .filter(todo::Column::Id.eq(id))
            .filter(todo::Column::UserId.eq(user_id))
            .exec(&self.db)
            .await?;
        if deleted.rows_affected == 0 {
            return Err(TodoError::NotFound);
        }
        Ok(())
    }
}
