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
    /// A released reservation is never reserved or committed again.
    #[error("reservation {0} was released")]
    ReservationReleased(String),
    /// The product changed since the caller read it (its etag moved on).
    #[error("{product} changed since it was read: its etag is now {etag}; read it again")]
    Changed {
        /// The product.
        product: String,
        /// Its etag now.
        etag: String,
    },
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
            CatalogError::ReservationReleased(ref reservation) => Status::with_error_details(
                Code::FailedPrecondition,
                e.to_string(),
                ErrorDetails::with_precondition_failure_violation(
                    "RESERVATION",
                    reservation,
                    "released",
                ),
            ),
            CatalogError::Changed { .. } => Status::aborted(e.to_string()),
            CatalogError::Refused(refusal) => refusal.into(),
        }
    }
}
