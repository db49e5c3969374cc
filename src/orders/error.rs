//! Everything orders can refuse, mapped once to gRPC status codes.

use tonic::Status;

use crate::refusal::{Refusal, refusals};

/// Why an orders call failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// No such order.
    #[error("{0} not found")]
    NotFound(String),
    /// A line names a product the catalog does not have; the text names it.
    #[error("{0}")]
    MissingProduct(String),
    /// The order is not in a state that allows this; the text says why.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller holds as many open watches as one may.
    #[error("at most {0} open watches per caller; close one, or watch again later")]
    TooManyWatches(usize),
    /// A service the order needs did not answer; try again.
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    /// A malformed field, a caller who may not, or a database failure.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The job queue failed, or the saga's attempt lost its job.
    #[error("queue: {0}")]
    Queue(keel_queue::QueueError),
    /// A stored order cannot be read.
    #[error(transparent)]
    Corrupt(#[from] super::lifecycle::Corrupt),
}

refusals!(OrderError);

impl From<OrderError> for Status {
    fn from(e: OrderError) -> Self {
        match e {
            OrderError::NotFound(_) | OrderError::MissingProduct(_) => {
                Status::not_found(e.to_string())
            }
            OrderError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            OrderError::Unavailable(_) => Status::unavailable(e.to_string()),
            OrderError::TooManyWatches(_) => {
                keel_guard::throttled(&e.to_string(), std::time::Duration::from_secs(5))
            }
            OrderError::Refused(refusal) => refusal.into(),
            OrderError::Queue(queue) => {
                tracing::error!(error = %queue, "orders cannot write a job");
                Status::internal("internal error")
            }
            OrderError::Corrupt(corrupt) => {
                tracing::error!(error = %corrupt, "orders read a corrupt row");
                Status::internal("internal error")
            }
        }
    }
}

impl From<OrderError> for keel_queue::Failure {
    /// What a saga or notice attempt makes of an orders failure: its job lost (nothing to
    /// record), a corrupt order (never worth another attempt), or worth another attempt.
    fn from(e: OrderError) -> Self {
        match e {
            OrderError::Queue(queue) => queue.into(),
            OrderError::Corrupt(corrupt) => keel_queue::Failure::Permanent(corrupt.to_string()),
            other => keel_queue::Failure::Retry(other.to_string()),
        }
    }
}
