//! The operator surface: every setting is a flag and a `KEEL_*` variable (API.md), with defaults
//! that serve the embedded mode and checks that stop a bad start with one clear line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_mesh::client::Target;
use keel_mesh::telemetry::LogFormat;

/// keel: a mesh of gRPC services with client-side load balancing, fronted by a REST translator.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, propagate_version = true)]
pub struct Cli {
    /// Settings shared by every command.
    #[command(flatten)]
    pub settings: Settings,
    /// What to run; `dev` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the `keel` binary runs.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Every service in one process with embedded stores by default (the default command).
    Dev,
    /// One service, or the REST gateway alone in front of services elsewhere.
    Serve {
        /// The service to run.
        service: Served,
    },
    /// Applies every service's database migrations and exits.
    Migrate,
    /// Writes a development CA and a certificate per service for mTLS, then exits.
    DevCerts {
        /// Where to write the PEM files.
        #[arg(long, default_value = "./.keel/certs")]
        out: PathBuf,
    },
}

/// The services this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum ServiceName {
    /// Users, sign-in and tokens.
    Identity,
    /// Todo lists.
    Todos,
    /// Products and stock.
    Catalog,
    /// Wallets and the ledger.
    Payments,
}

/// What `keel serve` runs: one service, or the gateway alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Served {
    /// Users, sign-in and tokens.
    Identity,
    /// Todo lists.
    Todos,
    /// Products and stock.
    Catalog,
    /// Wallets and the ledger.
    Payments,
    /// The REST gateway only, calling the services at their `--<service>-endpoints`.
    Gateway,
}

impl Served {
    /// The services this process runs itself (none for the gateway alone).
    pub fn services(self) -> &'static [ServiceName] {
        match self {
            Served::Identity => &[ServiceName::Identity],
            Served::Todos => &[ServiceName::Todos],
            Served::Catalog => &[ServiceName::Catalog],
            Served::Payments => &[ServiceName::Payments],
            Served::Gateway => &[],
        }
    }
}

impl ServiceName {
    /// Its name in flags, logs and metrics (`catalog`).
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Identity => "identity",
            ServiceName::Todos => "todos",
            ServiceName::Catalog => "catalog",
            ServiceName::Payments => "payments",
        }
    }

    /// Every service, in start-up order.
    pub const ALL: &'static [ServiceName] = &[
        ServiceName::Identity,
        ServiceName::Todos,
        ServiceName::Catalog,
        ServiceName::Payments,
    ];
}

/// Development (generated keys and embedded stores allowed) or production (refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    /// Generated keys, embedded SQLite and in-process cache are fine.
    Development,
    /// Requires a real signing key and a database URL.
    Production,
}

/// Every setting, as flags and `KEEL_*` variables.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// gRPC listen address.
    #[arg(
        long,
        env = "KEEL_GRPC_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub grpc_addr: SocketAddr,

    /// REST gateway listen address (served once the gateway exists).
    #[arg(
        long,
        env = "KEEL_HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub http_addr: SocketAddr,

    /// Admin listen address: /healthz, /readyz, /metrics.
    #[arg(
        long,
        env = "KEEL_ADMIN_ADDR",
        default_value = "127.0.0.1:9090",
        global = true
    )]
    pub admin_addr: SocketAddr,

    /// Directory for the embedded SQLite database and the development signing key.
    #[arg(long, env = "KEEL_DATA_DIR", default_value = "./.keel", global = true)]
    pub data_dir: PathBuf,

    /// PostgreSQL URL (`postgres://…`); the embedded SQLite file when unset.
    #[arg(long, env = "KEEL_DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Largest database connection pool per process.
    #[arg(
        long,
        env = "KEEL_DATABASE_MAX_CONNECTIONS",
        default_value_t = 20,
        global = true
    )]
    pub database_max_connections: u32,

    /// Redis URL (`redis://…`); an in-process cache when unset.
    #[arg(long, env = "KEEL_REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key this deployment writes.
    #[arg(
        long,
        env = "KEEL_REDIS_PREFIX",
        default_value = "keel:",
        global = true
    )]
    pub redis_prefix: String,

    /// How long cached reads live.
    #[arg(long, env = "KEEL_CACHE_TTL", default_value = "5m", value_parser = parse_duration, global = true)]
    pub cache_ttl: Duration,

    /// `development` or `production`.
    #[arg(long = "env", env = "KEEL_ENV", value_enum, default_value_t = Environment::Development, global = true)]
    pub environment: Environment,

    /// `pretty` or `json`.
    #[arg(long, env = "KEEL_LOG_FORMAT", default_value = "pretty", global = true)]
    pub log_format: LogFormat,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "KEEL_LOG", default_value = "info", global = true)]
    pub log: String,

    /// How often health checks that the database still answers.
    #[arg(long, env = "KEEL_HEALTH_PROBE_INTERVAL", default_value = "5s", value_parser = parse_duration, global = true)]
    pub health_probe_interval: Duration,

    /// Longest a drain on SIGTERM may take before in-flight calls are cut.
    #[arg(long, env = "KEEL_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration, global = true)]
    pub shutdown_grace: Duration,

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

    /// gRPC calls in flight per service before new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "KEEL_MAX_CONCURRENT_CALLS",
        default_value_t = 1000,
        global = true
    )]
    pub max_concurrent_calls: usize,

    /// Largest gRPC request message accepted, in bytes.
    #[arg(long, env = "KEEL_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, global = true)]
    pub max_message_bytes: usize,

    /// Origins the REST gateway allows cross-origin (comma-separated; `*` for any).
    #[arg(long, env = "KEEL_CORS_ORIGINS", value_delimiter = ',', global = true)]
    pub cors_origins: Vec<String>,

    /// REST requests per client (token subject, else IP) as COUNT/PERIOD, or `off`.
    #[arg(long, env = "KEEL_RATE_LIMIT", default_value = "100/1s", global = true)]
    pub rate_limit: RateLimit,

    /// Sign-in requests (register, login) per client IP as COUNT/PERIOD, or `off`.
    #[arg(
        long,
        env = "KEEL_AUTH_RATE_LIMIT",
        default_value = "10/60s",
        global = true
    )]
    pub auth_rate_limit: RateLimit,

    /// The currency of every wallet (ISO 4217).
    #[arg(
        long,
        env = "KEEL_WALLET_CURRENCY",
        default_value = "EUR",
        global = true
    )]
    pub wallet_currency: String,

    /// CA that signs every peer (PEM); with --tls-cert and --tls-key, gRPC requires mTLS.
    #[arg(long, env = "KEEL_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// This process's certificate (PEM), for mTLS.
    #[arg(long, env = "KEEL_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// This process's private key (PEM), for mTLS.
    #[arg(long, env = "KEEL_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,

    /// Where identity lives when not in this process (`host:port,host:port` or
    /// `dns:///name:port`); the token key set is fetched from it.
    #[arg(long, env = "KEEL_IDENTITY_ENDPOINTS", global = true)]
    pub identity_endpoints: Option<Target>,

    /// Where todos lives when not in this process.
    #[arg(long, env = "KEEL_TODOS_ENDPOINTS", global = true)]
    pub todos_endpoints: Option<Target>,

    /// Where catalog lives when not in this process.
    #[arg(long, env = "KEEL_CATALOG_ENDPOINTS", global = true)]
    pub catalog_endpoints: Option<Target>,

    /// Where payments lives when not in this process.
    #[arg(long, env = "KEEL_PAYMENTS_ENDPOINTS", global = true)]
    pub payments_endpoints: Option<Target>,

    /// HTTP/2 connections the mesh client keeps to each endpoint of a peer service.
    #[arg(
        long,
        env = "KEEL_CONNECTIONS_PER_ENDPOINT",
        default_value_t = 1,
        global = true
    )]
    pub connections_per_endpoint: usize,

    /// Replicas of each service this process runs, each a gRPC server on its own port (the
    /// first on --grpc-addr, the others on free ports) behind the mesh client.
    #[arg(long, env = "KEEL_REPLICAS", default_value_t = 1, global = true)]
    pub replicas: usize,
}

/// A rate limit: `COUNT/PERIOD` (`10/60s`) or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit(pub Option<keel_gateway::Quota>);

impl std::str::FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            Ok(Self(None))
        } else {
            s.parse().map(|quota| Self(Some(quota)))
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 15m, 30d)"))
}

/// A setting that cannot work; printed as one line before exit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Production needs a real database.
    #[error("KEEL_ENV=production needs KEEL_DATABASE_URL: the embedded SQLite is for development")]
    ProductionWithoutDatabase,
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
    /// Not an ISO 4217 code.
    #[error("KEEL_WALLET_CURRENCY must be a three-letter ISO 4217 code such as EUR, not {0:?}")]
    Currency(String),
    /// Zero-sized limits.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// Replicas out of range.
    #[error("KEEL_REPLICAS must be between 1 and {MAX_REPLICAS}, not {0}")]
    Replicas(usize),
}

/// More replicas than this in one process is a typo, not a laptop mesh.
pub const MAX_REPLICAS: usize = 16;

impl Settings {
    /// Checks what clap cannot: the production rules and sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.environment == Environment::Production {
            if self.database_url.is_none() {
                return Err(ConfigError::ProductionWithoutDatabase);
            }
            if self.redis_url.is_none() {
                return Err(ConfigError::ProductionWithoutRedis);
            }
            if self.signing_key.is_none() {
                return Err(ConfigError::ProductionWithoutSigningKey);
            }
        }
        let tls = [&self.tls_ca, &self.tls_cert, &self.tls_key];
        if tls.iter().any(|f| f.is_some()) && !tls.iter().all(|f| f.is_some()) {
            return Err(ConfigError::PartialTls);
        }
        if self.database_max_connections == 0 {
            return Err(ConfigError::Zero("KEEL_DATABASE_MAX_CONNECTIONS"));
        }
        if self.max_concurrent_calls == 0 {
            return Err(ConfigError::Zero("KEEL_MAX_CONCURRENT_CALLS"));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::Zero("KEEL_MAX_MESSAGE_BYTES"));
        }
        if self.wallet_currency.len() != 3
            || !self.wallet_currency.bytes().all(|b| b.is_ascii_uppercase())
        {
            return Err(ConfigError::Currency(self.wallet_currency.clone()));
        }
        if self.max_concurrent_hashes == Some(0) {
            return Err(ConfigError::Zero("KEEL_MAX_CONCURRENT_HASHES"));
        }
        if self.connections_per_endpoint == 0 {
            return Err(ConfigError::Zero("KEEL_CONNECTIONS_PER_ENDPOINT"));
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(ConfigError::Replicas(self.replicas));
        }
        Ok(())
    }

    /// Where `service` lives when it is not (only) in this process.
    pub fn endpoints(&self, service: ServiceName) -> Option<&Target> {
        match service {
            ServiceName::Identity => self.identity_endpoints.as_ref(),
            ServiceName::Todos => self.todos_endpoints.as_ref(),
            ServiceName::Catalog => self.catalog_endpoints.as_ref(),
            ServiceName::Payments => self.payments_endpoints.as_ref(),
        }
    }

    /// The mTLS files, when all three are set.
    pub fn tls(&self) -> Option<keel_mesh::tls::TlsFiles> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(keel_mesh::tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    /// Settings as the defaults and the environment make them, with no command line: what
    /// tests start from.
    pub fn from_env() -> Self {
        Cli::parse_from(["keel"]).settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keel").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_serve_the_embedded_mode() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        let s = cli.settings;
        assert_eq!(s.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.admin_addr.to_string(), "127.0.0.1:9090");
        assert_eq!(s.data_dir, PathBuf::from("./.keel"));
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.access_token_ttl, Duration::from_secs(15 * 60));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn flags_work_after_the_subcommand() {
        let cli = parse(&[
            "serve",
            "identity",
            "--grpc-addr",
            "0.0.0.0:7000",
            "--admin-emails",
            "a@x.io,b@x.io",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Serve {
                service: Served::Identity
            })
        ));
        assert_eq!(cli.settings.grpc_addr.to_string(), "0.0.0.0:7000");
        assert_eq!(cli.settings.admin_emails, vec!["a@x.io", "b@x.io"]);
    }

    #[test]
    fn production_refuses_embedded_stores_and_generated_keys() {
        let base = ["--env", "production"];
        let s = parse(&base).unwrap().settings;
        assert!(matches!(
            s.validate(),
            Err(ConfigError::ProductionWithoutDatabase)
        ));
        let s = parse(
            &[
                &base[..],
                &[
                    "--database-url",
                    "postgres://x/y",
                    "--redis-url",
                    "redis://x",
                ],
            ]
            .concat(),
        )
        .unwrap()
        .settings;
        assert!(matches!(
            s.validate(),
            Err(ConfigError::ProductionWithoutSigningKey)
        ));
    }

    #[test]
    fn peers_and_replicas_are_flags() {
        let cli = parse(&[
            "serve",
            "gateway",
            "--identity-endpoints",
            "127.0.0.1:7001,127.0.0.1:7002",
            "--catalog-endpoints",
            "dns:///catalog:50051",
            "--replicas",
            "3",
            "--connections-per-endpoint",
            "2",
        ])
        .unwrap();
        let s = &cli.settings;
        assert_eq!(
            s.endpoints(ServiceName::Identity),
            Some(&Target::Static(vec![
                "127.0.0.1:7001".into(),
                "127.0.0.1:7002".into()
            ]))
        );
        assert_eq!(
            s.endpoints(ServiceName::Catalog),
            Some(&Target::Dns("catalog:50051".into()))
        );
        assert_eq!(s.endpoints(ServiceName::Todos), None);
        assert_eq!(s.replicas, 3);
        assert_eq!(s.connections_per_endpoint, 2);
        assert!(s.validate().is_ok());
        let zero = parse(&["--replicas", "0"]).unwrap().settings;
        assert!(matches!(zero.validate(), Err(ConfigError::Replicas(0))));
        let none = parse(&["--connections-per-endpoint", "0"])
            .unwrap()
            .settings;
        assert!(matches!(none.validate(), Err(ConfigError::Zero(_))));
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        assert!(parse(&["--catalog-endpoints", "catalog"]).is_err());
        assert!(parse(&["--shutdown-grace", "soon"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["--grpc-addr", "nowhere"]).is_err());
        assert!(parse(&["serve", "billing"]).is_err());
    }
}
