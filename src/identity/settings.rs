//! identity's part of the operator surface: who becomes an admin, the signing key, token
//! lifetimes and how many passwords are hashed at once.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::service::IdentityConfig;
use crate::config::{ConfigError, parse_duration};

/// identity's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Identity")]
pub struct IdentitySettings {
    /// E-mails that become admins on registration (comma-separated). The first user always does.
    #[arg(long, env = "KEEL_ADMIN_EMAILS", value_delimiter = ',', global = true)]
    pub admin_emails: Vec<String>,

    /// PKCS#8 Ed25519 private key (PEM or DER) that signs access tokens. In development, a key
    /// is generated under the data dir when unset; production refuses to start without one.
    #[arg(long, env = "KEEL_SIGNING_KEY", global = true)]
    pub signing_key: Option<PathBuf>,

    /// Lifetime of access tokens.
    #[arg(long, env = "KEEL_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = parse_duration, global = true)]
    pub access_token_ttl: Duration,

    /// Lifetime of refresh tokens.
    #[arg(long, env = "KEEL_REFRESH_TOKEN_TTL", default_value = "30d", value_parser = parse_duration, global = true)]
    pub refresh_token_ttl: Duration,

    /// Password hashes computed at once (argon2id is CPU- and memory-heavy); half the CPUs when unset.
    #[arg(long, env = "KEEL_MAX_CONCURRENT_HASHES", global = true)]
    pub max_concurrent_hashes: Option<usize>,
}

impl IdentitySettings {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_hashes == Some(0) {
            return Err(ConfigError::Zero("KEEL_MAX_CONCURRENT_HASHES"));
        }
        Ok(())
    }

    /// Hashes at once: as set, else half the cores, so that argon2 leaves the rest to reads.
    pub fn concurrent_hashes(&self) -> usize {
        self.max_concurrent_hashes.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
            (cores / 2).max(1)
        })
    }

    /// The service's policy.
    pub fn policy(&self) -> IdentityConfig {
        IdentityConfig {
            access_token_ttl: self.access_token_ttl,
            refresh_token_ttl: self.refresh_token_ttl,
            admin_emails: self
                .admin_emails
                .iter()
                .map(|e| e.trim().to_lowercase())
                .collect(),
        }
    }
}
