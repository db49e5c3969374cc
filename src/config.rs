//! The operator surface: every setting is a flag and a `KEEL_*` variable (API.md), grouped by
//! concern, with defaults that serve the embedded mode and checks that stop a bad start with one
//! clear line.

mod peers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use keel_server::telemetry::LogFormat;

pub use peers::PeerEndpoints;

use crate::domain::{self, Domain};

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
        #[arg(value_parser = served())]
        service: Served,
    },
    /// Applies every service's database migrations and exits.
    Migrate,
    /// Runs jobs only (no gRPC, no REST): any number of these, on any machine, share the queue.
    Worker,
    /// Lists, rotates or removes the keys that sign access tokens (in KEEL_SIGNING_KEY when it
    /// is a directory, else the development keys under the data dir).
    Keys {
        /// What to do with them.
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Acts on user accounts as the operator, outside the API.
    Users {
        /// What to do.
        #[command(subcommand)]
        action: UsersAction,
    },
    /// Writes a development CA and a certificate per service for mTLS, then exits.
    #[cfg(feature = "dev-certs")]
    DevCerts {
        /// Where to write the PEM files.
        #[arg(long, default_value = "./.keel/certs")]
        out: PathBuf,
    },
}

/// What `keel keys` does.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysAction {
    /// Every live key, oldest first; the last signs.
    List,
    /// Adds a new key that signs from identity's next reload; the others keep verifying.
    Rotate,
    /// Removes a key: tokens it signed stop verifying once verifiers refresh their key set.
    Remove {
        /// The key id (`kid`) to remove. A thumbprint may begin with `-`; it is still the id.
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

/// What `keel users` does.
#[derive(Debug, Clone, Subcommand)]
pub enum UsersAction {
    /// Makes the user registered with `email` an admin: how a production deploy gets its first
    /// one (no one becomes an admin by registering first there).
    GrantAdmin {
        /// The e-mail the user registered with (matched without regard to case).
        email: String,
        /// Grant it even though the address was never confirmed with its mailed code: anyone
        /// can register any address, so only when you know whose account it is.
        #[arg(long)]
        unconfirmed: bool,
    },
}

/// What `keel serve` runs: one registered service, or the gateway alone.
#[derive(Clone, Copy)]
pub enum Served {
    /// One service of [`domain::DOMAINS`].
    Domain(&'static Domain),
    /// The REST gateway only, calling the services at their `--<service>-endpoints`.
    Gateway,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Served {
    /// The services this process runs itself (none for the gateway alone).
    pub fn domains(self) -> Vec<&'static Domain> {
        match self {
            Served::Domain(domain) => vec![domain],
            Served::Gateway => Vec::new(),
        }
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Served::Domain(domain) => domain.name,
            Served::Gateway => "gateway",
        }
    }
}

/// `keel serve`'s argument: a registered service's name, or `gateway`.
fn served() -> impl clap::builder::TypedValueParser<Value = Served> {
    let names = domain::DOMAINS
        .iter()
        .map(|d| PossibleValue::new(d.name).help(d.about))
        .chain([PossibleValue::new("gateway")
            .help("The REST gateway only, calling the services at their --<service>-endpoints")]);
    PossibleValuesParser::new(names).map(|name| match domain::named(&name) {
        Some(domain) => Served::Domain(domain),
        None => Served::Gateway,
    })
}

/// Development (generated keys and embedded stores allowed) or production (refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    /// Generated keys, embedded SQLite and in-process cache are fine.
    Development,
    /// Requires a real signing key and a database URL.
    Production,
}

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
    pub identity: crate::identity::IdentitySettings,
    /// payments' policy.
    #[command(flatten)]
    pub payments: crate::payments::PaymentSettings,
    /// orders' reconciler.
    #[command(flatten)]
    pub orders: crate::orders::OrderSettings,
    /// How jobs run.
    #[command(flatten)]
    pub workers: WorkerSettings,
    /// The jobs API.
    #[command(flatten)]
    pub jobs: crate::jobs::JobSettings,
    /// Where e-mail goes.
    #[command(flatten)]
    pub mail: crate::mail::MailSettings,
}

/// Where this process listens.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Listen")]
pub struct Listen {
    /// gRPC listen address.
    #[arg(
        long,
        env = "KEEL_GRPC_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub grpc_addr: SocketAddr,

    /// REST gateway listen address.
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
}

/// The database and the cache. Its `Debug` hides the URLs' credentials.
#[derive(Clone, Args)]
#[command(next_help_heading = "Stores")]
pub struct StoreSettings {
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

    /// How long a value read from Redis may be served from this process's memory: the safety net
    /// behind Redis's invalidations (client tracking), which drop it as soon as it changes.
    /// `0s` turns the near tier off.
    #[arg(long, env = "KEEL_NEAR_CACHE_TTL", default_value = "30s", value_parser = parse_duration, global = true)]
    pub near_cache_ttl: Duration,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("data_dir", &self.data_dir)
            .field("database_url", &self.database_url.as_deref().map(redacted))
            .field("database_max_connections", &self.database_max_connections)
            .field("redis_url", &self.redis_url.as_deref().map(redacted))
            .field("redis_prefix", &self.redis_prefix)
            .field("cache_ttl", &self.cache_ttl)
            .field("near_cache_ttl", &self.near_cache_ttl)
            .finish()
    }
}

/// `url` with its password (in the user info or a `password=` parameter) replaced by `***`.
pub fn redacted(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = rest..rest + at;
            if let Some(colon) = out[userinfo.clone()].find(':') {
                out.replace_range(rest + colon + 1..rest + at, "***");
            }
        }
    }
    if let Some(query) = out.find('?') {
        let (head, params) = out.split_at(query + 1);
        let params: Vec<String> = params
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out = format!("{head}{}", params.join("&"));
    }
    out
}

/// Environment, logs, health and drain.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Operations")]
pub struct Operations {
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

    /// What gRPC server reflection lists: `public` (the services with REST bindings, health,
    /// reflection) or `all` (keel's internal services too). Unset: `public` in production,
    /// `all` in development.
    #[arg(long, env = "KEEL_REFLECTION", value_enum, global = true)]
    pub reflection: Option<Reflection>,

    /// Name mesh endpoints by their addresses in `/metrics` (`true`), instead of by a stable
    /// digest of them: the address of every service is then visible to whoever reads metrics.
    #[arg(
        long,
        env = "KEEL_METRICS_ENDPOINT_ADDRESSES",
        default_value_t = false,
        global = true
    )]
    pub metrics_endpoint_addresses: bool,
}

/// What gRPC server reflection lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reflection {
    /// The services meant for clients (with REST bindings), health and reflection.
    Public,
    /// Every service the process serves, keel's internal ones included.
    All,
}

impl Operations {
    /// Whether reflection lists internal services.
    pub fn reflects_all(&self) -> bool {
        match self.reflection {
            Some(reflection) => reflection == Reflection::All,
            None => self.environment == Environment::Development,
        }
    }
}

/// What one call may cost.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Limits")]
pub struct Limits {
    /// gRPC calls in flight per service before new ones are refused with RESOURCE_EXHAUSTED:
    /// the ceiling of the adaptive limit, or the limit itself when it is static.
    #[arg(
        long,
        env = "KEEL_MAX_CONCURRENT_CALLS",
        default_value_t = 1000,
        global = true
    )]
    pub max_concurrent_calls: usize,

    /// How each service's concurrency limit is set: `adaptive` follows latency (from 100,
    /// never below 20 nor above KEEL_MAX_CONCURRENT_CALLS); `static` is that ceiling alone.
    #[arg(
        long,
        env = "KEEL_CONCURRENCY_LIMIT",
        value_enum,
        default_value_t = ConcurrencyLimit::Adaptive,
        global = true
    )]
    pub concurrency_limit: ConcurrencyLimit,

    /// Largest gRPC request message (and REST body) accepted, in bytes.
    #[arg(long, env = "KEEL_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, global = true)]
    pub max_message_bytes: usize,

    /// A connection (gRPC, REST or admin) with no byte read or written for this long is
    /// closed. gRPC connections ping every third of it, so a quiet stream is not idle.
    #[arg(long, env = "KEEL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration, global = true)]
    pub idle_timeout: Duration,

    /// Most connections one client address holds at once, all ports together (trusted proxies
    /// excepted): past it, a new connection is closed as it is accepted.
    #[arg(
        long,
        env = "KEEL_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256,
        global = true
    )]
    pub max_connections_per_address: usize,

    /// Most connections the process holds at once; unset, three quarters of its open-files
    /// limit, so that descriptors never run out before connections do.
    #[arg(long, env = "KEEL_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
}

/// How each service's concurrency limit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConcurrencyLimit {
    /// Follows measured latency, under the static ceiling.
    Adaptive,
    /// The ceiling alone.
    Static,
}

impl Limits {
    /// The bounds every listener of the process admits connections under.
    pub fn connections(&self, proxies: keel_guard::TrustedProxies) -> keel_server::conn::Limits {
        let total = self.max_connections.unwrap_or_else(|| {
            keel_server::conn::open_files_limit().map_or(4096, |files| files / 4 * 3)
        });
        keel_server::conn::Limits {
            per_address: self.max_connections_per_address,
            total,
            idle: self.idle_timeout,
            proxies,
        }
    }

    /// The concurrency limit each service's calls are admitted under.
    pub fn concurrency(&self) -> keel_server::shed::Concurrency {
        match self.concurrency_limit {
            ConcurrencyLimit::Adaptive => {
                keel_server::shed::Concurrency::adaptive(self.max_concurrent_calls)
            }
            ConcurrencyLimit::Static => {
                keel_server::shed::Concurrency::Static(self.max_concurrent_calls)
            }
        }
    }
}

/// Who the client is and how much it may ask, over REST and gRPC.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Edge")]
pub struct EdgeSettings {
    /// Origins the REST gateway allows cross-origin (comma-separated; `*` for any).
    #[arg(long, env = "KEEL_CORS_ORIGINS", value_delimiter = ',', global = true)]
    pub cors_origins: Vec<String>,

    /// Server streams over REST (Server-Sent Events, NDJSON) one client address holds open at
    /// once (429 past it).
    #[arg(
        long,
        env = "KEEL_MAX_STREAMS_PER_ADDRESS",
        default_value_t = 16,
        global = true
    )]
    pub max_streams_per_address: usize,

    /// REST requests per client (token subject, else address) as COUNT/PERIOD, or `off`.
    #[arg(long, env = "KEEL_RATE_LIMIT", default_value = "100/1s", global = true)]
    pub rate_limit: RateLimit,

    /// Calls of the RPCs that guard secrets (Register, Login) per client address, over REST and
    /// gRPC alike, as COUNT/PERIOD, or `off`.
    #[arg(
        long,
        env = "KEEL_AUTH_RATE_LIMIT",
        default_value = "10/60s",
        global = true
    )]
    pub auth_rate_limit: RateLimit,

    /// Proxies (CIDRs or addresses, comma-separated) whose `Forwarded` / `X-Forwarded-For` name
    /// the client; without them the socket peer is the client. List keel's own gateway here
    /// when it runs apart (`keel serve gateway`).
    #[arg(
        long,
        env = "KEEL_TRUSTED_PROXIES",
        value_delimiter = ',',
        global = true
    )]
    pub trusted_proxies: Vec<keel_guard::Network>,

    /// The API docs page at `/docs` on the REST port: `on` or `off`. On by default in
    /// development, off in production unless turned on here.
    #[arg(long, env = "KEEL_DOCS", value_enum, global = true)]
    pub docs: Option<Switch>,

    /// Certificate chain (PEM) the REST port presents; with --http-tls-key it serves HTTPS
    /// (HTTP/2 and HTTP/1.1 by ALPN) instead of plaintext.
    #[arg(long, env = "KEEL_HTTP_TLS_CERT", global = true)]
    pub http_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --http-tls-cert.
    #[arg(long, env = "KEEL_HTTP_TLS_KEY", global = true)]
    pub http_tls_key: Option<PathBuf>,
}

impl EdgeSettings {
    /// The proxies whose forwarding headers are believed.
    pub fn proxies(&self) -> keel_guard::TrustedProxies {
        keel_guard::TrustedProxies::new(self.trusted_proxies.iter().copied())
    }

    /// Whether `/docs` is served in `environment`.
    pub fn docs(&self, environment: Environment) -> bool {
        match self.docs {
            Some(switch) => switch == Switch::On,
            None => environment == Environment::Development,
        }
    }
}

/// A feature turned `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Peers, replicas and mTLS.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Mesh")]
pub struct MeshSettings {
    /// Where each peer service lives when it is not (only) in this process.
    #[command(flatten)]
    pub endpoints: PeerEndpoints,

    /// HTTP/2 connections the mesh client keeps to each endpoint of a peer service.
    #[arg(
        long,
        env = "KEEL_CONNECTIONS_PER_ENDPOINT",
        default_value_t = 1,
        global = true
    )]
    pub connections_per_endpoint: usize,

    /// Hedged reads: a call of a NO_SIDE_EFFECTS method slower than its recent p95 is also sent
    /// to another endpoint (within 10% of calls and the retry budget); the first answer wins.
    #[arg(
        long,
        env = "KEEL_HEDGED_READS",
        default_value_t = false,
        global = true
    )]
    pub hedged_reads: bool,

    /// Replicas of each service this process runs, each a gRPC server on its own port (the
    /// first on --grpc-addr, the others on free ports) behind the mesh client.
    #[arg(long, env = "KEEL_REPLICAS", default_value_t = 1, global = true)]
    pub replicas: usize,

    /// CA that signs every peer (PEM); with --tls-cert and --tls-key, gRPC requires mTLS.
    #[arg(long, env = "KEEL_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// This process's certificate (PEM), for mTLS.
    #[arg(long, env = "KEEL_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// This process's private key (PEM), for mTLS.
    #[arg(long, env = "KEEL_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
}

impl MeshSettings {
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
}

/// How jobs run: in `keel dev` beside the services, and in `keel worker` alone. Its `Debug`
/// hides the service secret.
#[derive(Clone, Args)]
#[command(next_help_heading = "Workers")]
pub struct WorkerSettings {
    /// Jobs one process runs at once; the CPUs when unset. `0` runs no worker in `keel dev` and
    /// `keel serve` (the jobs wait for a `keel worker`).
    #[arg(long, env = "KEEL_WORKER_CONCURRENCY", global = true)]
    pub worker_concurrency: Option<usize>,

    /// How long a claimed job is held without a heartbeat before another worker may take it up
    /// (the visibility timeout; running jobs renew it every third of it).
    #[arg(long, env = "KEEL_JOB_LEASE", default_value = "30s", value_parser = parse_duration, global = true)]
    pub job_lease: Duration,

    /// How long an idle worker waits before it looks for work again.
    #[arg(long, env = "KEEL_JOB_POLL", default_value = "100ms", value_parser = parse_duration, global = true)]
    pub job_poll: Duration,

    /// The first wait before a failed job is tried again; it doubles, with jitter, up to
    /// `KEEL_JOB_BACKOFF_MAX`.
    #[arg(long, env = "KEEL_JOB_BACKOFF", default_value = "1s", value_parser = parse_duration, global = true)]
    pub job_backoff: Duration,

    /// The longest wait between two attempts of a failed job: how late a job notices that what
    /// it waited for (SMTP, a peer) is back.
    #[arg(long, env = "KEEL_JOB_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration, global = true)]
    pub job_backoff_max: Duration,

    /// Most jobs of a kind that run at once across every worker, as `kind=N` (comma-separated),
    /// e.g. `email.send=4`.
    #[arg(long, env = "KEEL_JOB_LIMITS", value_delimiter = ',', value_parser = parse_limit, global = true)]
    pub job_limits: Vec<(String, usize)>,

    /// The secret keel's own services present to identity for a service token (the internal
    /// APIs accept nothing else). In development it is generated under the data dir; production
    /// refuses to start without it.
    #[arg(
        long,
        env = "KEEL_SERVICE_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub service_secret: Option<String>,
}

impl std::fmt::Debug for WorkerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSettings")
            .field("worker_concurrency", &self.worker_concurrency)
            .field("job_lease", &self.job_lease)
            .field("job_poll", &self.job_poll)
            .field("job_backoff", &self.job_backoff)
            .field("job_backoff_max", &self.job_backoff_max)
            .field("job_limits", &self.job_limits)
            .field(
                "service_secret",
                &self.service_secret.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl WorkerSettings {
    /// Jobs one process runs at once.
    pub fn concurrency(&self) -> usize {
        self.worker_concurrency.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
        })
    }

    /// The limit of `kind`, if one is set.
    pub fn limit(&self, kind: &str) -> Option<usize> {
        self.job_limits
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, n)| *n)
    }
}

fn parse_limit(s: &str) -> Result<(String, usize), String> {
    let (kind, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use kind=N, e.g. email.send=4"))?;
    let n: usize = n
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: N must be a positive whole number"))?;
    Ok((kind.trim().to_owned(), n))
}

/// A rate limit: `COUNT/PERIOD` (`10/60s`) or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit(pub Option<keel_guard::Quota>);

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
    /// Checks what clap cannot: the production rules and sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.operations.environment == Environment::Production {
            if self.stores.database_url.is_none() {
                return Err(ConfigError::ProductionWithoutDatabase);
            }
            if self.stores.redis_url.is_none() {
                return Err(ConfigError::ProductionWithoutRedis);
            }
            if self.identity.signing_key.is_none() {
                return Err(ConfigError::ProductionWithoutSigningKey);
            }
            if self.workers.service_secret.is_none() {
                return Err(ConfigError::ProductionWithoutServiceSecret);
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
        positive(
            mesh.connections_per_endpoint,
            "KEEL_CONNECTIONS_PER_ENDPOINT",
        )?;
        if !(1..=MAX_REPLICAS).contains(&mesh.replicas) {
            return Err(ConfigError::Replicas(mesh.replicas));
        }
        self.identity.validate()?;
        self.jobs.validate()?;
        self.mail.validate()?;
        self.orders.validate()?;
        self.payments.validate()
    }

    /// The defaults alone, as `keel` with no flags and no `KEEL_*` variables would have them:
    /// what tests start from, whatever the developer's environment holds.
    pub fn defaults() -> Self {
        let command = Cli::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(["keel"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults are settings")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_mesh::client::Target;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keel").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_serve_the_embedded_mode() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        let s = Settings::defaults();
        assert_eq!(s.listen.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(s.listen.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.listen.admin_addr.to_string(), "127.0.0.1:9090");
        assert_eq!(s.stores.data_dir, PathBuf::from("./.keel"));
        assert_eq!(s.operations.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.identity.access_token_ttl, Duration::from_secs(15 * 60));
        assert!(s.validate().is_ok());
    }

    /// A key id is a base64url thumbprint, which may begin with `-`: it is still the id, not a
    /// flag (one in sixty-four keys could not be removed).
    #[test]
    fn a_key_id_that_begins_with_a_hyphen_is_a_key_id() {
        let cli = parse(&["keys", "remove", "-6Qm0"]).unwrap();
        let Some(Command::Keys {
            action: KeysAction::Remove { kid },
        }) = cli.command
        else {
            panic!("not keys remove: {:?}", cli.command);
        };
        assert_eq!(kid, "-6Qm0");
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
        let Some(Command::Serve { service }) = cli.command else {
            panic!("serve identity");
        };
        assert_eq!(service.name(), "identity");
        assert_eq!(cli.settings.listen.grpc_addr.to_string(), "0.0.0.0:7000");
        assert_eq!(cli.settings.identity.admin_emails, vec!["a@x.io", "b@x.io"]);
    }

    #[test]
    fn every_registered_service_can_be_served_alone() {
        for domain in domain::DOMAINS {
            let cli = parse(&["serve", domain.name]).unwrap();
            let Some(Command::Serve { service }) = cli.command else {
                panic!("serve {}", domain.name);
            };
            assert_eq!(service.domains(), vec![*domain]);
        }
        let gateway = parse(&["serve", "gateway"]).unwrap();
        assert!(matches!(
            gateway.command,
            Some(Command::Serve {
                service: Served::Gateway
            })
        ));
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
    fn https_on_the_rest_port_needs_both_files() {
        let cert = parse(&["--http-tls-cert", "rest.pem"]).unwrap().settings;
        assert!(matches!(cert.validate(), Err(ConfigError::PartialHttpTls)));
        let key = parse(&["--http-tls-key", "rest-key.pem"]).unwrap().settings;
        assert!(matches!(key.validate(), Err(ConfigError::PartialHttpTls)));
        let both = [
            "--http-tls-cert",
            "rest.pem",
            "--http-tls-key",
            "rest-key.pem",
        ];
        assert!(parse(&both).unwrap().settings.validate().is_ok());
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
        let mesh = &cli.settings.mesh;
        assert_eq!(
            mesh.endpoints.get("identity"),
            Some(&Target::Static(vec![
                "127.0.0.1:7001".into(),
                "127.0.0.1:7002".into()
            ]))
        );
        assert_eq!(
            mesh.endpoints.get("catalog"),
            Some(&Target::Dns("catalog:50051".into()))
        );
        assert_eq!(mesh.endpoints.get("todos"), None);
        assert_eq!(mesh.replicas, 3);
        assert_eq!(mesh.connections_per_endpoint, 2);
        assert!(cli.settings.validate().is_ok());
        let zero = parse(&["--replicas", "0"]).unwrap().settings;
        assert!(matches!(zero.validate(), Err(ConfigError::Replicas(0))));
        let none = parse(&["--connections-per-endpoint", "0"])
            .unwrap()
            .settings;
        assert!(matches!(none.validate(), Err(ConfigError::Zero(_))));
    }

    #[test]
    fn every_registered_service_has_a_peer_flag_and_variable() {
        let command = Cli::command();
        for domain in domain::DOMAINS {
            let id = format!("{}_endpoints", domain.name);
            let arg = command
                .get_arguments()
                .find(|a| a.get_id().as_str() == id)
                .unwrap_or_else(|| panic!("no --{}-endpoints", domain.name));
            assert_eq!(
                arg.get_long(),
                Some(format!("{}-endpoints", domain.name).as_str())
            );
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(format!("KEEL_{}_ENDPOINTS", domain.name.to_uppercase()).as_str())
            );
        }
    }

    #[test]
    fn store_credentials_never_print() {
        let cli = parse(&[
            "--database-url",
            "postgres://keel:pg-s3cret@db:5432/keel?sslmode=require&password=other-s3cret",
            "--redis-url",
            "redis://:redis-s3cret@cache:6379/0",
        ])
        .unwrap();
        let printed = format!("{:?}", cli.settings);
        for secret in ["pg-s3cret", "other-s3cret", "redis-s3cret"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("postgres://keel:***@db:5432/keel?sslmode=require&password=***"));
        assert!(printed.contains("redis://:***@cache:6379/0"));
        assert_eq!(redacted("postgres://db/keel"), "postgres://db/keel");
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        assert!(parse(&["--catalog-endpoints", "catalog"]).is_err());
        assert!(parse(&["--shutdown-grace", "soon"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["--grpc-addr", "nowhere"]).is_err());
        assert!(parse(&["serve", "billing"]).is_err());
    }

    #[test]
    fn reflection_lists_internal_services_only_where_asked() {
        let mut s = Settings::defaults();
        assert!(s.operations.reflects_all(), "development lists all");
        s.operations.environment = Environment::Production;
        assert!(
            !s.operations.reflects_all(),
            "production lists the public ones"
        );
        s.operations.reflection = Some(Reflection::All);
        assert!(s.operations.reflects_all(), "unless asked");
    }
}
