//! identity: users, registration and sign-in, access tokens (EdDSA JWTs) with refresh-token
//! rotation, and the key set every service verifies tokens with.

mod directory;
mod entity;
mod error;
mod keys;
mod migration;
mod password;
mod rules;
mod service;
mod tokens;

use std::sync::Arc;

use async_trait::async_trait;
use keel_mesh::auth::{KeySource, VerificationKey};

pub use directory::Directory;
pub use error::IdentityError;
pub use keys::SigningKeys;
pub use migration::Migrator;
pub use password::Passwords;
pub use service::{IdentityConfig, IdentityService};

/// The fully-qualified gRPC name, as health and reflection list it.
pub const SERVICE_NAME: &str = "keel.identity.v1.IdentityService";

/// Verification keys straight from this process's signing keys.
#[derive(Debug, Clone)]
pub struct LocalKeys(pub Arc<SigningKeys>);

#[async_trait]
impl KeySource for LocalKeys {
    async fn keys(&self) -> anyhow::Result<Vec<VerificationKey>> {
        Ok(self.0.verification_keys())
    }
}
