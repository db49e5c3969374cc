//! Everything todos can refuse, mapped once to gRPC status codes.

use tonic::Status;

use crate::refusal::{Refusal, refusals};

/// Why a todos call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TodoError {
    /// No such todo.
    #[error("todo not found")]
    NotFound,
    /// A malformed field, another user's todos, or a database failure.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

refusals!(TodoError);

impl From<TodoError> for Status {
    fn from(e: TodoError) -> Self {
        match e {
            TodoError::NotFound => Status::not_found(e.to_string()),
            TodoError::Refused(refusal) => refusal.into(),
        }
    }
}
