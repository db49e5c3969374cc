//! The refusals every service shares — a malformed field, a caller who may not, a database that
//! failed — mapped once to gRPC status codes. Each service's error enum carries them as one
//! variant, `Refused`, and [`refusals!`] gives it the conversions.

use keel_pagetoken::PageError;
use sea_orm::DbErr;
use tonic::Status;

use crate::input::{FieldError, Reused};
use crate::principal::AccessError;

/// What any service refuses for the same reasons.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// A malformed field; nothing was written.
    #[error(transparent)]
    InvalidArgument(#[from] FieldError),
    /// An idempotency key already used with another request; nothing was written.
    #[error(transparent)]
    Reused(#[from] Reused),
    /// No credentials, or a caller who may not do this.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
}

impl From<crate::principal::NameError> for Refusal {
    fn from(e: crate::principal::NameError) -> Self {
        match e {
            crate::principal::NameError::Malformed(field) => Self::InvalidArgument(field),
            crate::principal::NameError::Access(access) => Self::Access(access),
        }
    }
}

impl From<PageError> for Refusal {
    fn from(e: PageError) -> Self {
        Self::InvalidArgument(e.into())
    }
}

impl From<Refusal> for Status {
    fn from(e: Refusal) -> Self {
        match e {
            Refusal::InvalidArgument(field) => field.into(),
            Refusal::Reused(reused) => reused.into(),
            Refusal::Access(access) => access.into(),
            Refusal::Database(db) => crate::store::database_status(&db),
        }
    }
}

/// Implements `From` for a service's error enum, whose `Refused(Refusal)` variant holds them,
/// for everything a [`Refusal`] is made of: `?` works on field checks, access checks, page
/// tokens and database calls alike.
macro_rules! refusals {
    ($error:ty) => {
        impl From<$crate::input::FieldError> for $error {
            fn from(e: $crate::input::FieldError) -> Self {
                Self::Refused(e.into())
            }
        }
        impl From<$crate::input::Reused> for $error {
            fn from(e: $crate::input::Reused) -> Self {
                Self::Refused(e.into())
            }
        }
        impl From<$crate::principal::AccessError> for $error {
            fn from(e: $crate::principal::AccessError) -> Self {
                Self::Refused(e.into())
            }
        }
        impl From<sea_orm::DbErr> for $error {
            fn from(e: sea_orm::DbErr) -> Self {
                Self::Refused(e.into())
            }
        }
        impl From<keel_pagetoken::PageError> for $error {
            fn from(e: keel_pagetoken::PageError) -> Self {
                Self::Refused(e.into())
            }
        }
    };
}

pub(crate) use refusals;
