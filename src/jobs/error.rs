//! Everything jobs can refuse, mapped once to gRPC status codes.

use keel_queue::QueueError;
use tonic::Status;

use crate::refusal::{Refusal, refusals};

/// Why a jobs call failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No such job.
    #[error("{0} not found")]
    NotFound(String),
    /// Only a dead job can be retried.
    #[error("{name} is {state}; only a DEAD job can be retried")]
    NotDead {
        /// The job.
        name: String,
        /// Its state.
        state: &'static str,
    },
    /// A live job holds the unique key of the one to retry.
    #[error("a live job already holds the unique key of {0}")]
    KeyTaken(String),
    /// The caller has as many live jobs as one may.
    #[error("{0} live jobs at most per caller; wait for some to finish")]
    Quota(i64),
    /// A malformed field, a caller who may not, or a database failure.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The queue failed below the request.
    #[error("queue: {0}")]
    Queue(QueueError),
}

refusals!(JobError);

impl JobError {
    /// The same refusal, of a request inside a batch: a malformed field is named as it sits
    /// under `parent` (`requests[3]`).
    #[must_use]
    pub fn within(self, parent: &str) -> Self {
        match self {
            JobError::Refused(Refusal::InvalidArgument(field)) => {
                Refusal::InvalidArgument(field.within(parent)).into()
            }
            other => other,
        }
    }
}

/// When a caller at its quota of live jobs is told to try again.
const RETRY_QUOTA: std::time::Duration = std::time::Duration::from_secs(10);

impl From<QueueError> for JobError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::RequestReused(id) => crate::input::request_id_reused(&id).into(),
            QueueError::NotFound(id) => JobError::NotFound(format!("jobs/{id}")),
            QueueError::NotDead { id, state } => JobError::NotDead {
                name: format!("jobs/{id}"),
                state,
            },
            QueueError::KeyTaken(id) => JobError::KeyTaken(format!("jobs/{id}")),
            QueueError::Capped(cap) => JobError::Quota(cap),
            QueueError::Database(db) => db.into(),
            other => JobError::Queue(other),
        }
    }
}

impl From<JobError> for Status {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotFound(_) => Status::not_found(e.to_string()),
            JobError::NotDead { .. } => Status::failed_precondition(e.to_string()),
            JobError::KeyTaken(_) => Status::already_exists(e.to_string()),
            JobError::Quota(_) => keel_guard::throttled(&e.to_string(), RETRY_QUOTA),
            JobError::Refused(refusal) => refusal.into(),
            JobError::Queue(queue) => {
                tracing::error!(error = %queue, "queue failure");
                Status::internal("internal error")
            }
        }
    }
}
