//! What one call may cost: message sizes, concurrency, timeouts.

use std::time::Duration;

use clap::Args;

use super::parse_duration;

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
