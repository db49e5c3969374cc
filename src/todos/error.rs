//! Everything todos can refuse, mapped once to gRPC status codes.

use keel_pagetoken::PageError;
use sea_orm::DbErr;
use tonic::Status;

use crate::input::FieldError;
use crate::principal::AccessError;

/// Why a todos call failed.
#[derive(Debug, thiserror::Error)]
pub enum TodoError {
    /// A malformed field; nothing was written.
    #[error(transparent)]
    InvalidArgument(#[from] FieldError),
    /// No such todo.
    #[error("todo not found")]
    NotFound,
    /// Another user's todos, or a malformed user reference.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
}

impl From<PageError> for TodoError {
    fn from(e: PageError) -> Self {
        Self::InvalidArgument(e.into())
    }
}

impl From<TodoError> for Status {
    fn from(e: TodoError) -> Self {
        match e {
            TodoError::InvalidArgument(field) => field.into(),
            TodoError::NotFound => Status::not_found(e.to_string()),
            TodoError::Access(access) => access.into(),
            TodoError::Database(db) => crate::store::database_status(&db),
        }
    }
}
