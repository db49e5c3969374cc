//! The edge: who the client is (trusted proxies), TLS of the REST port, and rate limits.

use std::path::PathBuf;

use clap::Args;

use super::{Environment, Switch};

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
