//! Everything identity can refuse, mapped once to gRPC status codes.

use tonic::Status;

use crate::refusal::{Refusal, refusals};

/// The one message for a wrong password and an unknown e-mail alike: no user enumeration.
pub const BAD_CREDENTIALS: &str = "invalid e-mail or password";

/// Why an identity call failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Another user has this e-mail.
    #[error("a user with this e-mail already exists")]
    EmailTaken,
    /// Wrong password or unknown e-mail.
    #[error("{BAD_CREDENTIALS}")]
    BadCredentials,
    /// Unknown, expired, spent or revoked refresh token.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// No such user.
    #[error("user not found")]
    UserNotFound,
    /// Not the code of the caller's pending e-mail confirmation, or an expired or spent one.
    #[error(
        "code: not the code of a pending e-mail confirmation (it may have expired or been replaced)"
    )]
    BadEmailCode,
    /// Every hashing slot is taken and the queue for one is full.
    #[error("too many sign-ins at once; retry shortly")]
    Busy,
    /// The account failed too many sign-ins lately; wait this long.
    #[error("too many failed sign-ins for this account; retry later")]
    Throttled(std::time::Duration),
    /// A malformed field, a caller who may not, or a database failure.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A bug or an unexpected failure.
    #[error("internal: {0:#}")]
    Internal(#[from] anyhow::Error),
}

refusals!(IdentityError);

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::EmailTaken => Status::already_exists(e.to_string()),
            IdentityError::BadCredentials | IdentityError::InvalidRefreshToken => {
                Status::unauthenticated(e.to_string())
            }
            IdentityError::UserNotFound => Status::not_found(e.to_string()),
            IdentityError::BadEmailCode => Status::invalid_argument(e.to_string()),
            IdentityError::Busy => {
                keel_guard::throttled(&e.to_string(), std::time::Duration::from_secs(1))
            }
            IdentityError::Throttled(wait) => keel_guard::throttled(&e.to_string(), wait),
            IdentityError::Refused(refusal) => refusal.into(),
            IdentityError::Internal(err) => {
                tracing::error!(error = %format!("{err:#}"), "identity internal error");
                Status::internal("internal error")
            }
        }
    }
}
