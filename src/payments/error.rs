//! Everything payments can refuse, mapped once to gRPC status codes.

use keel_pagetoken::PageError;
use sea_orm::DbErr;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::input::FieldError;
use crate::principal::AccessError;

/// Why a payments call failed.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// A malformed field; nothing was written.
    #[error(transparent)]
    InvalidArgument(#[from] FieldError),
    /// No charge with this payment id.
    #[error("payment {0} not found")]
    PaymentNotFound(String),
    /// The balance is short; nothing was taken.
    #[error("insufficient funds")]
    InsufficientFunds,
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// A user reference the caller may not use.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
}

impl From<PageError> for PaymentError {
    fn from(e: PageError) -> Self {
        Self::InvalidArgument(e.into())
    }
}

impl From<PaymentError> for Status {
    fn from(e: PaymentError) -> Self {
        match e {
            PaymentError::InvalidArgument(field) => field.into(),
            PaymentError::PaymentNotFound(_) => Status::not_found(e.to_string()),
            PaymentError::InsufficientFunds => Status::with_error_details(
                Code::FailedPrecondition,
                e.to_string(),
                ErrorDetails::with_precondition_failure_violation(
                    "FUNDS",
                    "wallet",
                    "balance below the amount",
                ),
            ),
            PaymentError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            PaymentError::Access(access) => access.into(),
            PaymentError::Database(db) => crate::store::database_status(&db),
        }
    }
}
