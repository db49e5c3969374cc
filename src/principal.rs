//! Who is calling and what they may reach, in one place for every service: the verified caller
//! of a request, the admin and internal-service roles, and `users/{user}` / `users/me` resolved
//! against the caller.

use keel_auth::Caller;
use uuid::Uuid;

/// The role name access tokens carry for admins.
pub const ADMIN_ROLE: &str = "admin";
/// The role name access tokens carry for everyone else.
pub const USER_ROLE: &str = "user";
/// The role keel's own services carry when they call each other's internal APIs.
pub const SERVICE_ROLE: &str = "service";
/// The creator of the jobs identity makes for itself: e-mails that carry a code, which no user
/// may read through JobService.
pub const IDENTITY: &str = "services/identity";

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The call carried no bearer token and the RPC is not public.
    #[error("missing bearer token")]
    Unauthenticated,
    /// The name is not `users/{uuid}` or `users/me`.
    #[error("{field} must be `users/{{user}}` or `users/me`")]
    MalformedName {
        /// The request field that held the name.
        field: &'static str,
    },
    /// The caller's token names a subject that is not a user id.
    #[error("the access token's subject is not a user")]
    BadSubject,
    /// The caller may not reach another user's resources.
    #[error("callers may only reach their own resources")]
    NotYours,
    /// The caller's role may not do this; the text says who may.
    #[error("{0}")]
    Denied(&'static str),
}

/// The verified caller of `request`, or UNAUTHENTICATED when it carried no bearer token.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, AccessError> {
    optional_caller(request).ok_or(AccessError::Unauthenticated)
}

/// The verified caller of `request`, if it carried a bearer token: for public RPCs.
pub fn optional_caller<T>(request: &tonic::Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

/// Whether the caller is an admin.
pub fn is_admin(caller: &Caller) -> bool {
    caller.role == ADMIN_ROLE
}

/// Admins only; `denied` says so to everyone else (`"only admins change the catalog"`).
pub fn require_admin(caller: &Caller, denied: &'static str) -> Result<(), AccessError> {
    if is_admin(caller) {
        Ok(())
    } else {
        Err(AccessError::Denied(denied))
    }
}

/// keel's own services only (a service token from identity): the internal APIs. Users, admins
/// included, never reach them.
pub fn require_service(caller: &Caller) -> Result<(), AccessError> {
    if caller.role == SERVICE_ROLE {
        Ok(())
    } else {
        Err(AccessError::Denied("this API is for keel's own services"))
    }
}

/// The caller's user id.
pub fn caller_id(caller: &Caller) -> Result<Uuid, AccessError> {
    Uuid::parse_str(&caller.subject).map_err(|_| AccessError::BadSubject)
}

/// The user id in `segment` (what follows `users/`: a UUID or `me`).
pub fn user_id(segment: &str, caller: &Caller, field: &'static str) -> Result<Uuid, AccessError> {
    if segment == "me" {
        return caller_id(caller);
    }
    crate::names::canonical_uuid(segment).ok_or(AccessError::MalformedName { field })
}

/// Who besides the user may reach a user's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The user and admins.
    OwnerOrAdmin,
    /// The user alone.
    OwnerOnly,
}

/// Checks that the caller may reach user `id`'s resources.
pub fn may_reach(id: Uuid, caller: &Caller, reach: Reach) -> Result<Uuid, AccessError> {
    let own = caller_id(caller).is_ok_and(|me| me == id);
    if own || (reach == Reach::OwnerOrAdmin && is_admin(caller)) {
        Ok(id)
    } else {
        Err(AccessError::NotYours)
    }
}

/// The user that `name` (`users/{user}` or `users/me`) names, if the caller may reach it.
pub fn reachable_user(
    name: &str,
    caller: &Caller,
    field: &'static str,
    reach: Reach,
) -> Result<Uuid, AccessError> {
    match crate::names::captures(name, &["users", "*"]).as_deref() {
        Some([segment]) => may_reach(user_id(segment, caller, field)?, caller, reach),
        _ => Err(AccessError::MalformedName { field }),
    }
}

/// Why a child resource name was refused: its shape, or its owner out of the caller's reach.
#[derive(Debug)]
pub enum NameError {
    /// Not `users/{user}/<collection>/{id}`.
    Malformed(crate::input::FieldError),
    /// The caller may not reach the owner.
    Access(AccessError),
}

impl From<crate::input::FieldError> for NameError {
    fn from(e: crate::input::FieldError) -> Self {
        Self::Malformed(e)
    }
}

impl From<AccessError> for NameError {
    fn from(e: AccessError) -> Self {
        Self::Access(e)
    }
}

/// The owner and id in `users/{user}/<collection>/{id}` (the id a canonical UUID), if the
/// caller may reach it: todos' and orders' resource names alike.
pub fn reachable_child(
    name: &str,
    collection: &'static str,
    caller: &Caller,
    field: &'static str,
    reach: Reach,
) -> Result<(Uuid, Uuid), NameError> {
    let singular = collection.strip_suffix('s').unwrap_or(collection);
    let malformed = || {
        let shape = format!("must be `users/{{user}}/{collection}/{{{singular}}}`");
        crate::input::FieldError::new(field, shape)
    };
    let Some([user, id]) = crate::names::captures(name, &["users", "*", collection, "*"])
        .as_deref()
        .map(|c| [c[0], c[1]])
    else {
        return Err(malformed().into());
    };
    let owner = may_reach(user_id(user, caller, field)?, caller, reach)?;
    let id = crate::names::canonical_uuid(id).ok_or_else(malformed)?;
    Ok((owner, id))
}

/// The user that `name` names, if the caller is that user or an admin.
pub fn owned_user(name: &str, caller: &Caller, field: &'static str) -> Result<Uuid, AccessError> {
    reachable_user(name, caller, field, Reach::OwnerOrAdmin)
}

impl From<AccessError> for tonic::Status {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::MalformedName { field } => {
                keel_mesh::status::invalid_argument(field, e.to_string())
            }
            AccessError::Unauthenticated | AccessError::BadSubject => {
                tonic::Status::unauthenticated(e.to_string())
            }
            AccessError::NotYours | AccessError::Denied(_) => {
                tonic::Status::permission_denied(e.to_string())
            }
        }
    }
}

/// `users/{id}`.
pub fn user_name(id: Uuid) -> String {
    format!("users/{}", id.hyphenated())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id: Uuid, role: &str) -> Caller {
        Caller {
            subject: id.to_string(),
            role: role.into(),
        }
    }

    #[test]
    fn me_is_the_caller() {
        let id = Uuid::now_v7();
        assert_eq!(
            owned_user("users/me", &caller(id, USER_ROLE), "name"),
            Ok(id)
        );
    }

    #[test]
    fn another_user_is_refused_unless_admin() {
        let (me, other) = (Uuid::now_v7(), Uuid::now_v7());
        let name = user_name(other);
        assert_eq!(
            owned_user(&name, &caller(me, USER_ROLE), "name"),
            Err(AccessError::NotYours)
        );
        assert_eq!(
            owned_user(&name, &caller(me, ADMIN_ROLE), "name"),
            Ok(other)
        );
    }

    #[test]
    fn roles_gate_admin_and_internal_apis() {
        let id = Uuid::now_v7();
        let user = caller(id, USER_ROLE);
        assert_eq!(
            require_admin(&user, "only admins"),
            Err(AccessError::Denied("only admins"))
        );
        assert!(require_service(&user).is_err());
        assert!(require_admin(&caller(id, ADMIN_ROLE), "only admins").is_ok());
        assert!(require_service(&caller(id, SERVICE_ROLE)).is_ok());
        assert!(
            require_service(&caller(id, ADMIN_ROLE)).is_err(),
            "an admin is a user"
        );
        assert_eq!(
            tonic::Status::from(AccessError::Denied("x")).code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            tonic::Status::from(AccessError::Unauthenticated).code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        let c = caller(Uuid::now_v7(), ADMIN_ROLE);
        for name in [
            "",
            "users/",
            "user/me",
            "users/me/todos",
            "users/not-a-uuid",
            "users/ME",
        ] {
            assert_eq!(
                owned_user(name, &c, "name"),
                Err(AccessError::MalformedName { field: "name" }),
                "{name}"
            );
        }
        let upper = user_name(Uuid::now_v7())
            .to_uppercase()
            .replace("USERS/", "users/");
        assert!(
            owned_user(&upper, &c, "name").is_err(),
            "ids are canonical lower case"
        );
    }
}
