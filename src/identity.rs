//! identity: users, registration and sign-in, access tokens (EdDSA JWTs) with refresh-token
//! rotation, and the key set every service verifies tokens with.

mod devices;
mod directory;
mod entity;
mod error;
mod letters;
mod migration;
mod password;
mod rules;
mod service;
mod service_tokens;
mod settings;
mod tokens;

use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use keel_auth::{KeySource, VerificationKey};
use keel_cache::CacheAside;

pub use crate::config::IdentitySettings;
pub use crate::keys::{self, SigningKeys};
pub use directory::Directory;
pub use error::IdentityError;
pub use password::Passwords;
pub use service::{Bootstrap, IdentityConfig, IdentityService, LoginPenalty};

use crate::domain::{Domain, Migrator, Parts, Services};
use crate::proto::keel::identity::v1::identity_service_server::IdentityServiceServer;
use crate::proto::keel::identity::v1::service_token_service_server::ServiceTokenServiceServer;
use crate::proto::lane;

/// The fully-qualified gRPC names, as health and reflection list them.
pub const SERVICE_NAME: &str = "keel.identity.v1.IdentityService";
/// The internal service that issues service tokens.
pub const SERVICE_TOKEN_SERVICE_NAME: &str = "keel.identity.v1.ServiceTokenService";

/// The cache of every user's token generation (keyed by user id), which identity invalidates
/// when it moves one on and every process's token verifier reads ([`generation`]).
pub const GENERATIONS: &str = "identity.generations";

/// identity in the registry.
pub static DOMAIN: Domain = Domain {
    name: "identity",
    about: "Users, sign-in and tokens",
    grpc_names: &[SERVICE_NAME, SERVICE_TOKEN_SERVICE_NAME],
    guarded: &[
        "/keel.identity.v1.IdentityService/Login",
        "/keel.identity.v1.IdentityService/Register",
        "/keel.identity.v1.ServiceTokenService/IssueServiceToken",
    ],
    migrations: &Migrator::<migration::Migrator>::new(),
    build,
    jobs: crate::domain::no_jobs,
    openapi_rules: crate::domain::no_openapi_rules,
};

fn build(parts: &Parts<'_>, services: &mut Services) -> anyhow::Result<()> {
    let settings = &parts.settings.identity;
    let keys = parts
        .signing_keys
        .context("identity signs tokens with this process's keys")?;
    let secret = crate::credentials::service_secret(parts.settings)?;
    let penalty = settings.login_failures.0.map(|quota| LoginPenalty {
        limiter: parts.limiter.clone(),
        quota,
        devices: devices::Devices::new(&secret),
    });
    let service = IdentityService::new(
        Directory::new(parts.db.clone()),
        parts.queue.clone(),
        Passwords::new(settings.concurrent_hashes(), settings.queued_hashes())?,
        penalty,
        keys.clone(),
        (parts.cache("identity.users"), parts.cache(GENERATIONS)),
        settings.policy(parts.settings.operations.environment),
    );
    let tokens = service_tokens::ServiceTokens::new(keys.clone(), &secret);
    let max = parts.max_message_bytes();
    let (service, tokens) = (Arc::new(service), Arc::new(tokens));
    services
        .add(
            IdentityServiceServer::from_arc(service.clone()).max_decoding_message_size(max),
            lane::identity_service(&service),
        )
        .add(
            ServiceTokenServiceServer::from_arc(tokens.clone()).max_decoding_message_size(max),
            lane::service_token_service(&tokens),
        );
    Ok(())
}

/// Verification keys straight from this process's signing keys.
#[derive(Debug, Clone)]
pub struct LocalKeys(pub Arc<SigningKeys>);

#[async_trait]
impl KeySource for LocalKeys {
    async fn keys(&self) -> anyhow::Result<Vec<VerificationKey>> {
        Ok(self.0.verification_keys())
    }
}

/// The generation user `subject`'s access tokens must carry, through `cache` (the
/// [`GENERATIONS`] cache) over `directory`: 0 for a subject that is not a user (a service), the
/// largest for a user who is gone, `None` when neither the cache nor the database answers.
pub async fn generation(cache: &CacheAside, directory: &Directory, subject: &str) -> Option<u64> {
    let Ok(id) = uuid::Uuid::parse_str(subject) else {
        return Some(0);
    };
    let directory = directory.clone();
    let loaded = cache
        .get_or_load(subject, || async move {
            // A user who is gone is remembered as such: their token costs no read per call.
            directory
                .generation(id)
                .await
                .map(|found| Some(found.unwrap_or(u64::MAX)))
                .map_err(|e| Arc::new(e.to_string()))
        })
        .await;
    match loaded {
        Ok(found) => Some(found.unwrap_or(u64::MAX)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a token generation; judging by signature");
            None
        }
    }
}
