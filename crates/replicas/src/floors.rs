//! Each session's floor — the WAL position of its last write — kept where every process sees it
//! (Redis) or, with no Redis, in this process; forgotten after a time by which every replica in
//! service has passed it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::*;

use crate::Lsn;

/// How long one Redis command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(250);

/// Raises a session's floor, never lowers it: two processes recording writes of one session
/// at once leave the higher position. Tokens are fixed-width hex, so strings order as positions.
const RAISE: &str = r"
local current = redis.call('GET', KEYS[1])
if (not current) or current < ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
";

/// Where floors are kept.
pub enum Floors {
    /// In this process: read-your-writes holds for calls this process serves.
    Local(Mutex<HashMap<String, (Lsn, Instant)>>),
    /// In Redis, under a key prefix: for every process.
    Redis {
        /// The client.
        client: Client,
        /// Key prefix.
        prefix: String,
    },
}

impl std::fmt::Debug for Floors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Floors::Local(_) => "Floors::Local",
            Floors::Redis { .. } => "Floors::Redis",
        })
    }
}

/// A floor could not be kept or read: Redis did not answer, or answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("a session's floor is unavailable: {0}")]
pub struct Unavailable(pub(crate) String);

impl Floors {
    /// Floors in this process.
    pub fn local() -> Self {
        Floors::Local(Mutex::new(HashMap::new()))
    }

    /// Floors in the Redis at `url`, under `prefix`.
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, fred::error::Error> {
        let client = keel_redis::client(url, COMMAND_TIMEOUT, keel_redis::Protocol::Resp2).await?;
        Ok(Floors::Redis {
            client,
            prefix: prefix.to_owned(),
        })
    }

    /// Raises `session`'s floor to `lsn`, kept for `ttl`.
    pub async fn raise(&self, session: &str, lsn: Lsn, ttl: Duration) -> Result<(), Unavailable> {
        match self {
            Floors::Local(floors) => {
                let now = Instant::now();
                let mut floors = floors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if floors.len() > 10_000 {
                    floors.retain(|_, (_, until)| *until > now);
                }
                let entry = floors.entry(session.to_owned()).or_insert((lsn, now));
                entry.0 = entry.0.max(lsn);
                entry.1 = now + ttl;
                Ok(())
            }
            Floors::Redis { client, prefix } => {
                let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                let client = client.with_options(&keel_redis::fail_fast(COMMAND_TIMEOUT));
                let raised = client.eval::<i64, _, _, _>(
                    RAISE,
                    vec![key(prefix, session)],
                    vec![lsn.token(), millis.to_string()],
                );
                match tokio::time::timeout(COMMAND_TIMEOUT, raised).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Unavailable(e.to_string())),
                    Err(_) => Err(Unavailable("no answer".into())),
                }
            }
        }
    }

    /// `session`'s floor, if it wrote within the floors' time.
    pub async fn get(&self, session: &str) -> Result<Option<Lsn>, Unavailable> {
        match self {
            Floors::Local(floors) => {
                let floors = floors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(floors
                    .get(session)
                    .filter(|(_, until)| *until > Instant::now())
                    .map(|(lsn, _)| *lsn))
            }
            Floors::Redis { client, prefix } => {
                let client = client.with_options(&keel_redis::fail_fast(COMMAND_TIMEOUT));
                let read = client.get::<Option<String>, _>(key(prefix, session));
                match tokio::time::timeout(COMMAND_TIMEOUT, read).await {
                    Ok(Ok(None)) => Ok(None),
                    Ok(Ok(Some(token))) => Lsn::from_token(&token).map(Some).ok_or_else(|| {
                        Unavailable(format!("a floor that is no position: {token:?}"))
                    }),
                    Ok(Err(e)) => Err(Unavailable(e.to_string())),
                    Err(_) => Err(Unavailable("no answer".into())),
                }
            }
        }
    }
}

/// One key per session, its own slot on a cluster.
fn key(prefix: &str, session: &str) -> String {
    format!("{prefix}floor:{{{session}}}")
}
