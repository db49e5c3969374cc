//! Operations: the environment, logs, health and the drain.

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::parse_duration;
use keel_server::telemetry::LogFormat;

/// Development (generated keys and embedded stores allowed) or production (refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    /// Generated keys, embedded SQLite and in-process cache are fine.
    Development,
    /// Requires a real signing key and a database URL.
    Production,
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
