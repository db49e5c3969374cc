//! Redis clients, built one way for all of keel: from a URL, with every command bounded in time
//! and a reconnect policy that never gives up — connecting in the background, so that a process
//! starts and serves while Redis is away and uses it from the moment it answers. What a caller
//! does without Redis (read the database, claim jobs from the table, admit requests) is its own.

#![forbid(unsafe_code)]

use std::time::Duration;

use fred::prelude::{Builder, Client, ClientLike as _, Config, Options, ReconnectPolicy};
use fred::types::RespVersion;

/// Which protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// RESP2, for plain commands.
    Resp2,
    /// RESP3, for client tracking (server-assisted invalidation).
    Resp3,
}

/// A client of the Redis at `url` whose connections and commands each take at most `timeout`,
/// connecting in the background (and again after every loss, for ever). Waits at most
/// `timeout` for the first connection, so that a Redis that is up is used from the first
/// command; one that is down delays nothing further.
pub async fn client(
    url: &str,
    timeout: Duration,
    protocol: Protocol,
) -> Result<Client, fred::error::Error> {
    let mut config = Config::from_url(url)?;
    if protocol == Protocol::Resp3 {
        config.version = RespVersion::RESP3;
    }
    // The first connection retries under the policy too, instead of failing the process.
    config.fail_fast = false;
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
        })
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .build()?;
    drop(client.connect());
    let _ = tokio::time::timeout(timeout, client.wait_for_connect()).await;
    Ok(client)
}

/// How a command is sent that must fail at once when Redis does not answer, instead of waiting
/// for it to come back: not queued while the client reconnects, given at most `timeout` in all.
/// It may be written up to three times, which on a Redis Cluster is the first write and a
/// redirection or two (`MOVED` after a reshard or a failover, `ASK` during one): with one,
/// the first command to a moved slot fails, and its caller falls back for nothing.
pub fn fail_fast(timeout: Duration) -> Options {
    Options {
        fail_fast: true,
        timeout: Some(timeout),
        max_attempts: Some(3),
        ..Options::default()
    }
}
