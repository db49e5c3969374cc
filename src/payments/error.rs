//! Everything payments can refuse, mapped once to gRPC status codes.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::refusal::{Refusal, refusals};

/// Why a payments call failed.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// No charge with this payment id.
    #[error("payment {0} not found")]
    PaymentNotFound(String),
    /// The payment id was refunded (or closed before any charge): it is never charged.
    #[error("payment {0} was refunded; it cannot be charged")]
    PaymentClosed(String),
    /// The balance is short; nothing was taken.
    #[error("insufficient funds")]
    InsufficientFunds,
    /// A malformed field, a caller who may not, or a database failure.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

refusals!(PaymentError);

impl From<PaymentError> for Status {
    fn from(e: PaymentError) -> Self {
        match e {
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
            PaymentError::PaymentClosed(ref payment) => Status::with_error_details(
                Code::FailedPrecondition,
                e.to_string(),
                ErrorDetails::with_precondition_failure_violation("PAYMENT", payment, "refunded"),
            ),
            PaymentError::Refused(refusal) => refusal.into(),
        }
    }
}
