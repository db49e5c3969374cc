//! Everything catalog can refuse, mapped once to gRPC status codes.

use keel_pagetoken::PageError;
use sea_orm::DbErr;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::input::FieldError;

/// Why a catalog or inventory call failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A malformed field; nothing was written.
    #[error(transparent)]
    InvalidArgument(#[from] FieldError),
    /// No such product.
    #[error("{0} not found")]
    ProductNotFound(String),
    /// No such reservation.
    #[error("reservation {0} not found")]
    ReservationNotFound(String),
    /// A line asks for more than the shelf holds; nothing was reserved.
    #[error("insufficient stock for {0}")]
    InsufficientStock(String),
    /// A released reservation cannot be committed.
    #[error("reservation {0} was released")]
    ReservationReleased(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// Missing or unusable credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
}

impl From<PageError> for CatalogError {
    fn from(e: PageError) -> Self {
        Self::InvalidArgument(e.into())
    }
}

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::InvalidArgument(field) => field.into(),
            CatalogError::ProductNotFound(_) | CatalogError::ReservationNotFound(_) => {
                Status::not_found(e.to_string())
            }
            CatalogError::InsufficientStock(ref product) => Status::with_error_details(
                Code::FailedPrecondition,
                e.to_string(),
                ErrorDetails::with_precondition_failure_violation(
                    "STOCK",
                    product,
                    "insufficient stock",
                ),
            ),
            CatalogError::ReservationReleased(_) => Status::failed_precondition(e.to_string()),
            CatalogError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            CatalogError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            CatalogError::Database(db) => crate::store::database_status(&db),
        }
    }
}
