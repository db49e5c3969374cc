//! identity's part of the operator surface: who becomes an admin, the signing keys and how they
//! rotate, token lifetimes, how many passwords are hashed at once and how failed sign-ins slow
//! an account down.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{ConfigError, RateLimit, parse_duration};

/// identity's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Identity")]
pub struct IdentitySettings {
    /// E-mails that become admins (comma-separated): on registration in development (where the
    /// first user is one too), once the address is confirmed in production (where no one becomes
    /// an admin by registering first; `keel users grant-admin <email>` names one).
    #[arg(long, env = "KEEL_ADMIN_EMAILS", value_delimiter = ',', global = true)]
    pub admin_emails: Vec<String>,

    /// PKCS#8 Ed25519 private key (PEM or DER) that signs access tokens, or a directory of them
    /// (every one verifies; the last by name signs; `keel keys rotate` adds one). In
    /// development, keys are generated under the data dir when unset; production refuses to
    /// start without it.
    #[arg(long, env = "KEEL_SIGNING_KEY", global = true)]
    pub signing_key: Option<PathBuf>,

    /// How often identity reads its key directory again, to sign with a rotated key and stop
    /// publishing a removed one.
    #[arg(long, env = "KEEL_SIGNING_KEY_RELOAD", default_value = "30s", value_parser = parse_duration, global = true)]
    pub signing_key_reload: Duration,

    /// How often every process refreshes the key set it verifies tokens with, so that a removed
    /// key stops verifying (a key it has not seen is fetched at once).
    #[arg(long, env = "KEEL_KEY_SET_REFRESH", default_value = "60s", value_parser = parse_duration, global = true)]
    pub key_set_refresh: Duration,

    /// How long a process that verifies tokens with identity's published key set (identity runs
    /// elsewhere) waits at start for that set before it reports ready all the same: until then
    /// `/readyz` is 503 and its gRPC health NOT_SERVING, so no balancer sends it a token it could
    /// not verify; past it, public calls need no key, and the set is fetched in the background
    /// until it comes.
    #[arg(long, env = "KEEL_KEY_SET_WAIT", default_value = "10s", value_parser = parse_duration, global = true)]
    pub key_set_wait: Duration,

    /// Lifetime of access tokens.
    #[arg(long, env = "KEEL_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = parse_duration, global = true)]
    pub access_token_ttl: Duration,

    /// Lifetime of refresh tokens.
    #[arg(long, env = "KEEL_REFRESH_TOKEN_TTL", default_value = "30d", value_parser = parse_duration, global = true)]
    pub refresh_token_ttl: Duration,

    /// Password hashes computed at once (argon2id is CPU- and memory-heavy); half the CPUs when unset.
    #[arg(long, env = "KEEL_MAX_CONCURRENT_HASHES", global = true)]
    pub max_concurrent_hashes: Option<usize>,

    /// Sign-ins and registrations waiting for a hashing slot; past it they are refused with
    /// RESOURCE_EXHAUSTED and a retry delay instead of queueing. Eight per slot when unset.
    #[arg(long, env = "KEEL_MAX_QUEUED_HASHES", global = true)]
    pub max_queued_hashes: Option<usize>,

    /// Failed sign-ins per account as COUNT/PERIOD, from any address: past COUNT, each attempt
    /// waits its share of PERIOD (never more than PERIOD, and the wait drains when failures
    /// stop), or `off`.
    #[arg(
        long,
        env = "KEEL_LOGIN_FAILURES",
        default_value = "5/5m",
        global = true
    )]
    pub login_failures: RateLimit,
}

impl IdentitySettings {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_hashes == Some(0) {
            return Err(ConfigError::Zero("KEEL_MAX_CONCURRENT_HASHES"));
        }
        if self.signing_key_reload.is_zero() {
            return Err(ConfigError::Zero("KEEL_SIGNING_KEY_RELOAD"));
        }
        if self.key_set_refresh.is_zero() {
            return Err(ConfigError::Zero("KEEL_KEY_SET_REFRESH"));
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

    /// Sign-ins that may wait for a hashing slot.
    pub fn queued_hashes(&self) -> usize {
        self.max_queued_hashes
            .unwrap_or_else(|| self.concurrent_hashes() * 8)
    }
}
