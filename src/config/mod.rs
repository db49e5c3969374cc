//! The operator surface: every setting is a flag and a `KEEL_*` variable (README's settings
//! table; `keel --help` says the same), grouped by
//! concern, with defaults that serve the embedded mode and checks that stop a bad start with one
//! clear line.

mod edge;
mod identity;
mod jobs;
mod limits;
mod mail;
mod mesh;
mod operations;
mod orders;
mod payments;
mod peers;
mod stores;
mod workers;

use std::time::Duration;

use clap::{Args, FromArgMatches as _};

pub use edge::{EdgeSettings, RateLimit};
pub use identity::IdentitySettings;
pub use jobs::JobSettings;
pub use limits::{ConcurrencyLimit, Limits};
pub use mail::MailSettings;
pub use mesh::{MeshSettings, Switch};
pub use operations::{Environment, Operations, Reflection};
pub use orders::OrderSettings;
pub use payments::PaymentSettings;
pub use peers::{PeerEndpoints, SERVICES};
pub use stores::{Listen, StoreSettings, redacted};
pub use workers::WorkerSettings;

/// Every setting, as flags and `KEEL_*` variables, by concern.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Where this process listens.
    #[command(flatten)]
    pub listen: Listen,
    /// The database and the cache.
    #[command(flatten)]
    pub stores: StoreSettings,
    /// Environment, logs, health and drain.
    #[command(flatten)]
    pub operations: Operations,
    /// What one call may cost.
    #[command(flatten)]
    pub limits: Limits,
    /// Who the client is and how much it may ask, over REST and gRPC.
    #[command(flatten)]
    pub edge: EdgeSettings,
    /// Peers, replicas and mTLS.
    #[command(flatten)]
    pub mesh: MeshSettings,
    /// identity's policy.
    #[command(flatten)]
    pub identity: IdentitySettings,
    /// payments' policy.
    #[command(flatten)]
    pub payments: PaymentSettings,
    /// orders' reconciler.
    #[command(flatten)]
    pub orders: OrderSettings,
    /// How jobs run.
    #[command(flatten)]
    pub workers: WorkerSettings,
    /// The jobs API.
    #[command(flatten)]
    pub jobs: JobSettings,
    /// Where e-mail goes.
    #[command(flatten)]
    pub mail: MailSettings,
}

/// A duration flag: `10s`, `15m`, `30d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 15m, 30d)"))
}

/// A setting that cannot work; printed as one line before exit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Production needs a real database.
    #[error("KEEL_ENV=production needs KEEL_DATABASE_URL: the embedded SQLite is for development")]
    ProductionWithoutDatabase,
    /// A lag bound the watch cannot tell (it looks every second) or past any use.
    #[error("KEEL_DATABASE_READ_MAX_LAG must be between 2s and 1h")]
    ReplicaLag,
    /// Read replicas are PostgreSQL's.
    #[error(
        "KEEL_DATABASE_READ_URLS needs KEEL_DATABASE_URL: read replicas are of a PostgreSQL primary"
    )]
    ReplicasWithoutPrimary,
    /// Production needs a provisioned signing key.
    #[error(
        "KEEL_ENV=production needs KEEL_SIGNING_KEY: a generated development key would sign production tokens"
    )]
    ProductionWithoutSigningKey,
    /// Production should not run a per-process cache across replicas.
    #[error(
        "KEEL_ENV=production needs KEEL_REDIS_URL: an in-process cache is not shared by replicas"
    )]
    ProductionWithoutRedis,
    /// Some but not all of the TLS files.
    #[error("mTLS needs all of KEEL_TLS_CA, KEEL_TLS_CERT and KEEL_TLS_KEY, or none (plaintext)")]
    PartialTls,
    /// A REST certificate without its key or the other way round.
    #[error("HTTPS needs both KEEL_HTTP_TLS_CERT and KEEL_HTTP_TLS_KEY, or neither (plaintext)")]
    PartialHttpTls,
    /// Not an ISO 4217 code.
    #[error("KEEL_WALLET_CURRENCY must be a three-letter ISO 4217 code such as EUR, not {0:?}")]
    Currency(String),
    /// Zero-sized limits.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// Replicas out of range.
    #[error("KEEL_REPLICAS must be between 1 and {MAX_REPLICAS}, not {0}")]
    Replicas(usize),
    /// Production needs a provisioned service secret.
    #[error(
        "KEEL_ENV=production needs KEEL_SERVICE_SECRET: keel's services authenticate to each other with it"
    )]
    ProductionWithoutServiceSecret,
    /// Not a mailbox.
    #[error("KEEL_MAIL_FROM must be a mailbox such as `keel <keel@example.com>`, not {0:?}")]
    MailFrom(String),
}

/// More replicas than this in one process is a typo, not a laptop mesh.
pub const MAX_REPLICAS: usize = 16;

/// `Err(Zero(name))` when `value` is zero.
fn positive(value: usize, name: &'static str) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::Zero(name))
    } else {
        Ok(())
    }
}

impl Settings {
    /// Checks what only the process's role tells: in production, a process that signs access
    /// tokens (`signs`: identity runs in it) has a provisioned key. The others fetch identity's
    /// public key set and never read the private keys, so they are not given them.
    pub fn validate_signing(&self, signs: bool) -> Result<(), ConfigError> {
        let production = self.operations.environment == Environment::Production;
        if production && signs && self.identity.signing_key.is_none() {
            return Err(ConfigError::ProductionWithoutSigningKey);
        }
        Ok(())
    }

    /// Checks what clap cannot: the production rules and sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.operations.environment == Environment::Production {
            if self.stores.database_url.is_none() {
                return Err(ConfigError::ProductionWithoutDatabase);
            }
            if self.stores.redis_url.is_none() {
                return Err(ConfigError::ProductionWithoutRedis);
            }
            if self.workers.service_secret.is_none() {
                return Err(ConfigError::ProductionWithoutServiceSecret);
            }
        }
        if !self.stores.read_urls().is_empty() {
            if self.stores.database_url.is_none() {
                return Err(ConfigError::ReplicasWithoutPrimary);
            }
            let lag = self.stores.database_read_max_lag;
            if lag < Duration::from_secs(2) || lag > Duration::from_secs(3600) {
                return Err(ConfigError::ReplicaLag);
            }
        }
        let mesh = &self.mesh;
        let tls = [&mesh.tls_ca, &mesh.tls_cert, &mesh.tls_key];
        if tls.iter().any(|f| f.is_some()) && !tls.iter().all(|f| f.is_some()) {
            return Err(ConfigError::PartialTls);
        }
        if self.edge.http_tls_cert.is_some() != self.edge.http_tls_key.is_some() {
            return Err(ConfigError::PartialHttpTls);
        }
        positive(
            self.stores.database_max_connections as usize,
            "KEEL_DATABASE_MAX_CONNECTIONS",
        )?;
        positive(
            self.limits.max_concurrent_calls,
            "KEEL_MAX_CONCURRENT_CALLS",
        )?;
        positive(self.limits.max_message_bytes, "KEEL_MAX_MESSAGE_BYTES")?;
        if self.stores.cache_memory_bytes == 0 {
            return Err(ConfigError::Zero("KEEL_CACHE_MEMORY_BYTES"));
        }
        positive(
            mesh.connections_per_endpoint,
            "KEEL_CONNECTIONS_PER_ENDPOINT",
        )?;
        if !(1..=MAX_REPLICAS).contains(&mesh.replicas) {
            return Err(ConfigError::Replicas(mesh.replicas));
        }
        self.identity.validate()?;
        self.jobs.validate()?;
        self.workers.validate()?;
        self.mail.validate()?;
        self.orders.validate()?;
        self.payments.validate()
    }

    /// The defaults alone, as `keel` with no flags and no `KEEL_*` variables would have them:
    /// what tests start from, whatever the developer's environment holds.
    pub fn defaults() -> Self {
        let command =
            Self::augment_args(clap::Command::new("keel")).mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(["keel"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults are settings")
    }
}
