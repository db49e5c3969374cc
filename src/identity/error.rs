//! Everything identity can refuse, mapped once to gRPC status codes.

use keel_mesh::status::invalid_argument;
use keel_pagetoken::PageError;
use sea_orm::DbErr;
use tonic::Status;

use crate::principal::AccessError;

/// The one message for a wrong password and an unknown e-mail alike: no user enumeration.
pub const BAD_CREDENTIALS: &str = "invalid e-mail or password";

/// Why an identity call failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A field is malformed; nothing was written.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
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
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// A user reference the caller may not use.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// A bug or an unexpected failure.
    #[error("internal: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl IdentityError {
    /// A malformed field.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<PageError> for IdentityError {
    fn from(e: PageError) -> Self {
        let field = crate::input::FieldError::from(e);
        Self::InvalidArgument {
            field: field.field,
            reason: field.reason,
        }
    }
}

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::InvalidArgument { field, reason } => invalid_argument(field, reason),
            IdentityError::EmailTaken => Status::already_exists(e.to_string()),
            IdentityError::BadCredentials | IdentityError::InvalidRefreshToken => {
                Status::unauthenticated(e.to_string())
            }
            IdentityError::UserNotFound => Status::not_found(e.to_string()),
            IdentityError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            IdentityError::Access(access) => access.into(),
            IdentityError::Database(db) => crate::store::database_status(&db),
            IdentityError::Internal(err) => {
                tracing::error!(error = %format!("{err:#}"), "identity internal error");
                Status::internal("internal error")
            }
        }
    }
}
