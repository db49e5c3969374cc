//! Everything catalog can refuse, mapped once to gRPC status codes.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::refusal::{Refusal, refusals};

/// Why a catalog or inventory call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CatalogError {
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
    /// A malformed field, a caller who may not, or a database failure.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

refusals!(CatalogError);

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Self {
        match e {
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
            CatalogError::Refused(refusal) => refusal.into(),
        }
    }
}
