//! Real stores and plumbing for integration tests: an ephemeral PostgreSQL (with a streaming
//! replica), Redis and Redis Cluster started once per test run, a fresh database and Redis key prefix per test, an SMTP server that can go down,
//! loopback listeners, a small HTTP client and polling with a deadline. Knows nothing of keel's domain.
//!
//! Once per run: when `KEEL_TEST_POSTGRES_URL` / `KEEL_TEST_REDIS_URL` are set (the test command
//! sets them with the `keel-testkit` binary before running the suite), every test process shares
//! those servers; otherwise each test process starts its own on first use.

#![forbid(unsafe_code)]

mod cluster;
pub mod http;
pub mod poll;
pub mod postgres;
pub mod redis;
pub mod smtp;
mod watchdog;

pub use cluster::RedisCluster;
pub use poll::eventually;
pub use postgres::{Postgres, fresh_database, fresh_replicated_database};
pub use redis::{Redis, fresh_prefix};
pub use smtp::SmtpSink;

/// A loopback port that nothing listens on now.
pub fn free_port() -> u16 {
    watchdog::free_port().expect("a free port")
}

/// A TCP listener on 127.0.0.1 with a port the kernel chose.
pub async fn loopback_listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}
