//! The IdentityService gRPC API: each RPC validates, authorises, then touches the store.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use keel_auth::{AccessClaims, Caller, ISSUER};
use keel_cache::CacheAside;
use keel_pagetoken::PageRequest;
use sha2::Digest as _;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::devices::{Device, Devices};
use super::directory::{Directory, NewClaim, NewRefreshToken, NewUser, Rotation, UserChanges};
use super::entity::user;
use super::error::IdentityError;
use super::keys::SigningKeys;
use super::password::Passwords;
use super::{letters, rules, tokens};
use crate::input::{self, FieldError, MaskPath};
use crate::principal::{self, ADMIN_ROLE, USER_ROLE};
use crate::proto::keel::identity::v1::identity_service_server::IdentityService as IdentityApi;
use crate::proto::keel::identity::v1::{
    ConfirmEmailRequest, DeleteUserRequest, GetJwksRequest, GetJwksResponse, GetUserRequest,
    ListUsersRequest, ListUsersResponse, LoginRequest, LoginResponse, LogoutRequest,
    LogoutResponse, RefreshTokenRequest, RefreshTokenResponse, RegisterRequest, RegisterResponse,
    UpdateUserRequest, User, user::Role,
};

/// Failed sign-ins counted per account, from any address, in a shared limiter: past the quota,
/// sign-ins of that account wait (credential stuffing from many addresses is slowed; the wait is
/// bounded and drains once failures stop). A sign-in with a device token of that account counts
/// in the device's own bucket instead, so that failures aimed at the account from elsewhere never
/// lock its owner out.
#[derive(Clone)]
pub struct LoginPenalty {
    /// Where the failures are counted.
    pub limiter: Arc<keel_guard::RateLimiter>,
    /// Failures per period.
    pub quota: keel_guard::Quota,
    /// What proves a device.
    pub devices: Devices,
}

impl LoginPenalty {
    /// The bucket a sign-in to `email` counts in: `device`'s when it proved one of that account,
    /// else the account's (a digest, so that no e-mail is stored in the limiter).
    fn bucket(email: &str, device: Option<&Device>) -> String {
        if let Some(device) = device {
            return format!("login-failures:device:{}", device.id.simple());
        }
        let digest = sha2::Sha256::digest(email.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("login-failures:{hex}")
    }

    async fn check(&self, bucket: &str) -> Result<(), IdentityError> {
        self.limiter
            .peek(bucket, self.quota)
            .await
            .map_err(IdentityError::Throttled)
    }

    async fn failed(&self, bucket: &str) {
        self.limiter.charge(bucket, self.quota).await;
    }
}

/// How admins come to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// Development: the first user, and a listed e-mail as it registers.
    Trusting,
    /// Production: a listed e-mail once its owner confirms it with the mailed code, and whoever
    /// the operator names with `keel users grant-admin`. No one by registering first.
    Confirmed,
}

/// The longest `device_token` a sign-in may carry (ours are about 100 characters).
const MAX_DEVICE_TOKEN: usize = 200;

/// How long a mailed e-mail code works.
const EMAIL_CODE_TTL: chrono::Duration = chrono::Duration::days(1);

/// Policy knobs of the identity service.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// How admins come to be.
    pub bootstrap: Bootstrap,
    /// Lifetime of access tokens.
    pub access_token_ttl: Duration,
    /// Lifetime of refresh tokens.
    pub refresh_token_ttl: Duration,
    /// Lower-case e-mails that register as admins.
    pub admin_emails: Vec<String>,
}

/// The identity service.
#[derive(Clone)]
pub struct IdentityService {
    directory: Directory,
    queue: keel_queue::Queue,
    passwords: Passwords,
    penalty: Option<LoginPenalty>,
    keys: Arc<SigningKeys>,
    users: CacheAside,
    /// Every user's token generation, as the token verifiers of every process read it.
    generations: CacheAside,
    config: Arc<IdentityConfig>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService").finish_non_exhaustive()
    }
}

/// A freshly issued access + refresh pair.
struct Session {
    access_token: String,
    refresh_token: String,
    expires_in: i64,
}

const TOKEN_TYPE: &str = "Bearer";

/// What UpdateUser may change.
#[derive(Debug, Clone, Copy)]
enum Updatable {
    DisplayName,
    Email,
    Role,
}

impl MaskPath for Updatable {
    const PATHS: &'static [(&'static str, Self)] = &[
        ("display_name", Self::DisplayName),
        ("email", Self::Email),
        ("role", Self::Role),
    ];
}

impl IdentityService {
    /// The service over `directory`, hashing with `passwords`, slowing accounts that fail to
    /// sign in with `penalty`, signing with `keys`, caching users and their token generations in
    /// `users` and `generations`.
    pub fn new(
        directory: Directory,
        queue: keel_queue::Queue,
        passwords: Passwords,
        penalty: Option<LoginPenalty>,
        keys: Arc<SigningKeys>,
        (users, generations): (CacheAside, CacheAside),
        config: IdentityConfig,
    ) -> Self {
        Self {
            directory,
            queue,
            passwords,
            penalty,
            keys,
            users,
            generations,
            config: Arc::new(config),
        }
    }

    /// An access token for `user` as stored now: their role, their token generation.
    fn access_token(&self, user: &user::Model) -> Result<(String, i64), IdentityError> {
        let now = Utc::now().timestamp();
        let ttl = i64::try_from(self.config.access_token_ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = AccessClaims {
            sub: user.id.to_string(),
            role: user.role.clone(),
            iss: ISSUER.to_owned(),
            aud: ISSUER.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl),
            jti: Uuid::now_v7().to_string(),
            generation: u64::try_from(user.token_generation).unwrap_or_default(),
        };
        Ok((self.keys.sign(&claims)?, ttl))
    }

    /// Forgets what is cached of user `id` once their row changed; with `revoked`, also the
    /// generation every process checks tokens against, so that older tokens are refused on
    /// their next call.
    async fn changed(&self, id: Uuid, revoked: bool) {
        self.users.invalidate(&id.to_string()).await;
        if revoked {
            self.generations.invalidate(&id.to_string()).await;
        }
    }

    /// A code for an address, as mailed, and its claim, as stored.
    fn new_claim() -> (String, NewClaim) {
        let (code, code_hash) = tokens::new_email_code();
        let claim = NewClaim {
            code_hash,
            expires_at: Utc::now() + EMAIL_CODE_TTL,
        };
        (code, claim)
    }

    fn new_refresh_token(&self) -> (String, NewRefreshToken) {
        let (token, hash) = tokens::new_refresh_token();
        let ttl = chrono::Duration::from_std(self.config.refresh_token_ttl)
            .unwrap_or(chrono::Duration::days(30));
        (
            token,
            NewRefreshToken {
                hash,
                expires_at: Utc::now() + ttl,
            },
        )
    }

    async fn register(&self, r: RegisterRequest) -> Result<RegisterResponse, IdentityError> {
        let email = rules::email(&r.email)?;
        rules::password(&r.password)?;
        let display_name = if r.display_name.trim().is_empty() {
            email.split('@').next().unwrap_or_default().to_owned()
        } else {
            rules::display_name(&r.display_name)?
        };
        let trusting = self.config.bootstrap == Bootstrap::Trusting;
        let listed_admin = trusting && self.config.admin_emails.contains(&email);
        let password_hash = self.passwords.hash(r.password).await?;
        let (refresh_token, stored) = self.new_refresh_token();
        let (code, claim) = Self::new_claim();
        let welcome = letters::welcome(&email, &code);
        let created = self
            .directory
            .register(
                NewUser {
                    email,
                    display_name,
                    password_hash,
                    listed_admin,
                    first_is_admin: trusting,
                },
                stored,
                claim,
                welcome,
            )
            .await?;
        self.queue.wake();
        let (access_token, expires_in) = self.access_token(&created)?;
        tracing::info!(user = %created.id, role = %created.role, "user registered");
        Ok(RegisterResponse {
            user: Some(to_proto(&created)),
            access_token,
            refresh_token,
            token_type: TOKEN_TYPE.into(),
            expires_in,
        })
    }

    /// Signs in; with a device token for the next sign-in when failures are limited.
    async fn login(&self, r: LoginRequest) -> Result<(Session, Option<String>), IdentityError> {
        if r.device_token.len() > MAX_DEVICE_TOKEN {
            return Err(FieldError::new("device_token", "too long").into());
        }
        // A malformed e-mail cannot belong to anyone: same answer as a wrong password.
        let email = rules::email(&r.email).map_err(|_| IdentityError::BadCredentials)?;
        let found = self.directory.find_by_email(&email).await?;
        // A device token counts only for the account it was issued to.
        let bucket = self.penalty.as_ref().map(|penalty| {
            let device = penalty
                .devices
                .verify(&r.device_token)
                .filter(|d| found.as_ref().is_some_and(|u| u.id == d.user_id));
            (penalty, LoginPenalty::bucket(&email, device.as_ref()))
        });
        if let Some((penalty, bucket)) = &bucket {
            penalty.check(bucket).await?;
        }
        let hash = found.as_ref().map(|u| u.password_hash.clone());
        if !self.passwords.verify(r.password, hash).await? {
            if let Some((penalty, bucket)) = &bucket {
                penalty.failed(bucket).await;
            }
            return Err(IdentityError::BadCredentials);
        }
        let user = found.ok_or(IdentityError::BadCredentials)?;
        let (refresh_token, stored) = self.new_refresh_token();
        self.directory.start_family(user.id, stored).await?;
        let (access_token, expires_in) = self.access_token(&user)?;
        let device = bucket.map(|(penalty, _)| penalty.devices.issue(user.id));
        let session = Session {
            access_token,
            refresh_token,
            expires_in,
        };
        Ok((session, device))
    }

    async fn refresh(&self, r: RefreshTokenRequest) -> Result<Session, IdentityError> {
        if r.refresh_token.is_empty() {
            return Err(FieldError::new("refresh_token", "required").into());
        }
        let (refresh_token, stored) = self.new_refresh_token();
        match self
            .directory
            .rotate(&tokens::hash(&r.refresh_token), stored)
            .await?
        {
            Rotation::Rotated { user_id } => {
                let user = self
                    .directory
                    .find(user_id)
                    .await?
                    .ok_or(IdentityError::InvalidRefreshToken)?;
                let (access_token, expires_in) = self.access_token(&user)?;
                Ok(Session {
                    access_token,
                    refresh_token,
                    expires_in,
                })
            }
            Rotation::Reused { user_id } => {
                tracing::warn!(
                    user = %user_id,
                    "a spent refresh token was presented again; its family and the user's access \
                     tokens are revoked"
                );
                self.changed(user_id, true).await;
                Err(IdentityError::InvalidRefreshToken)
            }
            Rotation::Invalid => Err(IdentityError::InvalidRefreshToken),
        }
    }

    async fn logout(&self, r: LogoutRequest) -> Result<LogoutResponse, IdentityError> {
        if r.refresh_token.is_empty() {
            return Err(FieldError::new("refresh_token", "required").into());
        }
        let owner = self
            .directory
            .sign_out(&tokens::hash(&r.refresh_token))
            .await?;
        if let Some(owner) = owner {
            self.changed(owner, true).await;
        }
        Ok(LogoutResponse {})
    }

    async fn get_user(&self, caller: &Caller, r: GetUserRequest) -> Result<User, IdentityError> {
        let id = principal::owned_user(&r.name, caller, "name")?;
        let directory = self.directory.clone();
        self.users
            .get_or_load(&id.to_string(), || async move {
                Ok::<_, crate::refusal::Refusal>(directory.find(id).await?.as_ref().map(to_proto))
            })
            .await?
            .ok_or(IdentityError::UserNotFound)
    }

    async fn list_users(
        &self,
        caller: &Caller,
        r: ListUsersRequest,
    ) -> Result<ListUsersResponse, IdentityError> {
        principal::require_admin(caller, "only admins list users")?;
        let page = PageRequest::new(r.page_size, &r.page_token, "users")?;
        let rows = self.directory.list(page.after(), page.fetch()).await?;
        let (rows, next_page_token) = page.finish(rows, |last| last.id);
        Ok(ListUsersResponse {
            users: rows.iter().map(to_proto).collect(),
            next_page_token,
        })
    }

    async fn update_user(
        &self,
        caller: &Caller,
        r: UpdateUserRequest,
    ) -> Result<User, IdentityError> {
        let user = r.user.ok_or_else(|| FieldError::new("user", "required"))?;
        let id = principal::owned_user(&user.name, caller, "user.name")?;
        let mut changes = UserChanges::default();
        let mut claimed = None;
        for field in input::update_mask(r.update_mask.as_ref())? {
            match field {
                Updatable::DisplayName => {
                    changes.display_name = Some(rules::display_name(&user.display_name)?);
                }
                Updatable::Email => claimed = Some(rules::email(&user.email)?),
                Updatable::Role => {
                    let role = match Role::try_from(user.role) {
                        Ok(Role::User) => USER_ROLE,
                        Ok(Role::Admin) => ADMIN_ROLE,
                        _ => {
                            return Err(
                                FieldError::new("user.role", "must be USER or ADMIN").into()
                            );
                        }
                    };
                    principal::require_admin(caller, "only admins change roles")?;
                    changes.role = Some(role.to_owned());
                }
            }
        }
        let revoked = changes.role.is_some();
        let updated = self.directory.update(id, changes).await?;
        self.changed(id, revoked).await;
        // The same answer whether or not the address is taken (no enumeration oracle); the code
        // goes to the address, and only its holder can apply it.
        if let Some(email) = claimed.filter(|email| *email != updated.email) {
            let (code, claim) = Self::new_claim();
            let letter = letters::change(&email, &code);
            self.directory
                .claim_email(id, &email, claim, letter)
                .await?;
            self.queue.wake();
        }
        Ok(to_proto(&updated))
    }

    async fn confirm_email(
        &self,
        caller: &Caller,
        r: ConfirmEmailRequest,
    ) -> Result<User, IdentityError> {
        let id = principal::reachable_user(&r.name, caller, "name", principal::Reach::OwnerOnly)?;
        if r.code.is_empty() {
            return Err(FieldError::new("code", "required").into());
        }
        let confirmed = self
            .directory
            .confirm_email(id, &tokens::hash(&r.code), &self.config.admin_emails)
            .await?;
        self.changed(id, true).await;
        tracing::info!(user = %id, role = %confirmed.role, "e-mail confirmed");
        Ok(to_proto(&confirmed))
    }

    async fn delete_user(
        &self,
        caller: &Caller,
        r: DeleteUserRequest,
    ) -> Result<(), IdentityError> {
        let id = principal::owned_user(&r.name, caller, "name")?;
        let deleted = self.directory.delete(id).await?;
        self.changed(id, true).await;
        if deleted {
            tracing::info!(user = %id, "user deleted");
            Ok(())
        } else {
            Err(IdentityError::UserNotFound)
        }
    }
}

fn to_proto(m: &user::Model) -> User {
    let role = if m.role == ADMIN_ROLE {
        Role::Admin
    } else {
        Role::User
    };
    User {
        name: principal::user_name(m.id),
        email: m.email.clone(),
        display_name: m.display_name.clone(),
        role: role as i32,
        create_time: Some(crate::proto::timestamp(m.created_at)),
        update_time: Some(crate::proto::timestamp(m.updated_at)),
    }
}

fn tokens_response<T>(session: Session, build: impl FnOnce(String, String, String, i64) -> T) -> T {
    build(
        session.access_token,
        session.refresh_token,
        TOKEN_TYPE.into(),
        session.expires_in,
    )
}

#[tonic::async_trait]
impl IdentityApi for IdentityService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(
            Self::register(self, request.into_inner()).await?,
        ))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let (session, device) = Self::login(self, request.into_inner()).await?;
        Ok(Response::new(tokens_response(
            session,
            |access_token, refresh_token, token_type, expires_in| LoginResponse {
                access_token,
                refresh_token,
                token_type,
                expires_in,
                device_token: device.unwrap_or_default(),
            },
        )))
    }

    async fn refresh_token(
        &self,
        request: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        let session = self.refresh(request.into_inner()).await?;
        Ok(Response::new(tokens_response(
            session,
            |access_token, refresh_token, token_type, expires_in| RefreshTokenResponse {
                access_token,
                refresh_token,
                token_type,
                expires_in,
            },
        )))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        Ok(Response::new(
            Self::logout(self, request.into_inner()).await?,
        ))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            Self::get_user(self, &caller, request.into_inner()).await?,
        ))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            Self::list_users(self, &caller, request.into_inner()).await?,
        ))
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<User>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            Self::update_user(self, &caller, request.into_inner()).await?,
        ))
    }

    async fn confirm_email(
        &self,
        request: Request<ConfirmEmailRequest>,
    ) -> Result<Response<User>, Status> {
        let caller = principal::caller(&request)?;
        Ok(Response::new(
            Self::confirm_email(self, &caller, request.into_inner()).await?,
        ))
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = principal::caller(&request)?;
        Self::delete_user(self, &caller, request.into_inner()).await?;
        Ok(Response::new(()))
    }

    async fn get_jwks(
        &self,
        _request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        Ok(Response::new(GetJwksResponse {
            keys: self.keys.jwks(),
        }))
    }
}
