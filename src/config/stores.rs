//! Where a process listens, and its stores: the database and the cache.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse_duration;

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

    /// How long a starting process or a command waits for PostgreSQL to accept a connection
    /// (refused, unreachable, too many clients, still starting) before it gives up; a wrong
    /// password or an unknown database fails at once. `0s`: one attempt.
    #[arg(long, env = "KEEL_DATABASE_WAIT", default_value = "30s", value_parser = parse_duration, global = true)]
    pub database_wait: Duration,

    /// PostgreSQL read replicas (`postgres://…`, comma-separated): reads that may lag go to one
    /// that has replayed the caller's own last write, the rest to the primary. Connected
    /// read-only; a replica that is down or lags past `KEEL_DATABASE_READ_MAX_LAG` is left out.
    #[arg(
        long,
        env = "KEEL_DATABASE_READ_URLS",
        value_delimiter = ',',
        global = true,
        hide_env_values = true
    )]
    pub database_read_urls: Vec<String>,

    /// How far behind the primary a read replica may fall before reads leave it.
    #[arg(long, env = "KEEL_DATABASE_READ_MAX_LAG", default_value = "5s", value_parser = parse_duration, global = true)]
    pub database_read_max_lag: Duration,

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

    /// How much of this process's memory cached values may take, keys and bookkeeping counted:
    /// the whole cache without Redis, the near tier in front of it with Redis. Past it the
    /// least used are evicted.
    #[arg(long, env = "KEEL_CACHE_MEMORY_BYTES", default_value_t = 32 * 1024 * 1024, global = true)]
    pub cache_memory_bytes: u64,

    /// How long a value read from Redis may be served from this process's memory: the safety net
    /// behind Redis's invalidations (client tracking), which drop it as soon as it changes.
    /// `0s` turns the near tier off.
    #[arg(long, env = "KEEL_NEAR_CACHE_TTL", default_value = "30s", value_parser = parse_duration, global = true)]
    pub near_cache_ttl: Duration,
}

impl StoreSettings {
    /// The read replicas' URLs. A blank one is none: an empty `KEEL_DATABASE_READ_URLS` is how
    /// compose and Kubernetes templates say "no replica".
    pub fn read_urls(&self) -> Vec<String> {
        let urls = self.database_read_urls.iter().map(|url| url.trim());
        urls.filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("data_dir", &self.data_dir)
            .field("database_url", &self.database_url.as_deref().map(redacted))
            .field("database_max_connections", &self.database_max_connections)
            .field("database_wait", &self.database_wait)
            .field(
                "database_read_urls",
                &self
                    .database_read_urls
                    .iter()
                    .map(|u| redacted(u))
                    .collect::<Vec<_>>(),
            )
            .field("database_read_max_lag", &self.database_read_max_lag)
            .field("redis_url", &self.redis_url.as_deref().map(redacted))
            .field("redis_prefix", &self.redis_prefix)
            .field("cache_ttl", &self.cache_ttl)
            .field("near_cache_ttl", &self.near_cache_ttl)
            .field("cache_memory_bytes", &self.cache_memory_bytes)
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
