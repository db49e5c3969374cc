//! Rate limits with GCRA (the generic cell rate algorithm): in process, or in Redis so that every
//! replica shares the buckets. Besides admitting requests, a bucket can be looked at without
//! counting (is this account throttled?) and charged for an event that already happened (a
//! failed login), with the wait that builds up bounded. A Redis failure lets the request through.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::*;

/// `count` requests per `period`, all of them usable at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period (and the burst).
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl Quota {
    /// Time between requests at the sustained rate.
    fn emission_interval(&self) -> Duration {
        self.period / self.count.max(1)
    }

    /// How far ahead of now the theoretical arrival time may run.
    fn tolerance(&self) -> Duration {
        self.period.saturating_sub(self.emission_interval())
    }
}

impl FromStr for Quota {
    type Err = String;

    /// `10/60s`, `100/1s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, period) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: use COUNT/PERIOD, e.g. 10/60s"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: COUNT must be a whole number"))?;
        let period = humantime::parse_duration(period.trim()).map_err(|e| format!("{s:?}: {e}"))?;
        if count == 0 || period.is_zero() {
            return Err(format!("{s:?}: COUNT and PERIOD must be positive"));
        }
        Ok(Self { count, period })
    }
}

/// Where the buckets live.
pub enum RateLimiter {
    /// In this process.
    Local(Mutex<HashMap<String, Instant>>),
    /// In Redis, under a key prefix.
    Redis {
        /// The client.
        client: Client,
        /// Key prefix.
        prefix: String,
    },
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RateLimiter::Local(_) => "RateLimiter::Local",
            RateLimiter::Redis { .. } => "RateLimiter::Redis",
        })
    }
}

/// How long one Redis command may take before the limiter admits without it.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(250);

/// What an operation on a bucket does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Admit and count, or refuse with the wait.
    Check,
    /// Say whether it would admit, counting nothing.
    Peek,
    /// Count, admitted or not; the wait stays within one period.
    Charge,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Check => "check",
            Op::Peek => "peek",
            Op::Charge => "charge",
        }
    }
}

/// The theoretical arrival time after `op` on a bucket at `tat` (already no earlier than `now`),
/// and the wait it answers (zero to admit). All in one unit of time.
fn gcra(op: Op, now: u128, tat: u128, quota: Quota) -> (Option<u128>, u128) {
    let interval = quota.emission_interval().as_millis();
    let tolerance = quota.tolerance().as_millis();
    let wait = (tat - now).saturating_sub(tolerance);
    match op {
        Op::Peek => (None, wait),
        Op::Check if wait > 0 => (None, wait),
        Op::Check => (Some(tat + interval), 0),
        Op::Charge => {
            let ceiling = now + tolerance + quota.period.as_millis();
            (Some((tat + interval).min(ceiling)), 0)
        }
    }
}

/// GCRA in Redis with the server's clock (the same arithmetic as [`gcra`]): returns 0 to
/// admit, else the wait in milliseconds.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local op = ARGV[3]
local period = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now - tolerance
if wait < 0 then wait = 0 end
if op == 'peek' then return wait end
local next = tat + interval
if op == 'check' then
  if wait > 0 then return wait end
else
  next = math.min(next, now + tolerance + period)
end
redis.call('SET', KEYS[1], next, 'PX', next - now + 1)
return 0
"#;

impl RateLimiter {
    /// Buckets in this process.
    pub fn local() -> Self {
        RateLimiter::Local(Mutex::new(HashMap::new()))
    }

    /// Buckets in Redis at `url`, under `prefix`, connecting in the background: until Redis
    /// answers, every request is admitted.
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, fred::error::Error> {
        let client = keel_redis::client(url, COMMAND_TIMEOUT, keel_redis::Protocol::Resp2).await?;
        Ok(RateLimiter::Redis {
            client,
            prefix: prefix.to_owned(),
        })
    }

    /// Admits one request of `key` under `quota` and counts it, or says how long to wait.
    pub async fn check(&self, key: &str, quota: Quota) -> Result<(), Duration> {
        self.apply(Op::Check, key, quota).await
    }

    /// Whether `key` would be admitted now under `quota`, counting nothing.
    pub async fn peek(&self, key: &str, quota: Quota) -> Result<(), Duration> {
        self.apply(Op::Peek, key, quota).await
    }

    /// Counts an event of `key` (a failed login, say) whether or not it would be admitted. The
    /// wait it builds up never exceeds one `quota.period`, and drains at the quota's rate.
    pub async fn charge(&self, key: &str, quota: Quota) {
        let _ = self.apply(Op::Charge, key, quota).await;
    }

    async fn apply(&self, op: Op, key: &str, quota: Quota) -> Result<(), Duration> {
        match self {
            RateLimiter::Local(buckets) => {
                let now = Instant::now();
                let mut buckets = buckets.lock().unwrap_or_else(|e| e.into_inner());
                if buckets.len() > 100_000 {
                    buckets.retain(|_, tat| *tat > now);
                }
                let tat = buckets
                    .get(key)
                    .copied()
                    .filter(|tat| *tat > now)
                    .unwrap_or(now);
                let ahead = (tat - now).as_millis();
                let (next, wait) = gcra(op, 0, ahead, quota);
                if let Some(next) = next {
                    let next = Duration::from_millis(u64::try_from(next).unwrap_or(u64::MAX));
                    buckets.insert(key.to_owned(), now + next);
                }
                refusal(wait)
            }
            RateLimiter::Redis { client, prefix } => {
                let options = keel_redis::fail_fast(COMMAND_TIMEOUT);
                let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                let options = client.with_options(&options);
                let wait = options.eval::<i64, _, _, _>(
                    GCRA,
                    vec![format!("{prefix}ratelimit:{key}")],
                    vec![
                        millis(quota.emission_interval()).to_string(),
                        millis(quota.tolerance()).to_string(),
                        op.name().to_owned(),
                        millis(quota.period).to_string(),
                    ],
                );
                // A Redis that went away must not hold a request: fred's own timeout does not
                // cover a command queued while it reconnects.
                match tokio::time::timeout(COMMAND_TIMEOUT, wait).await {
                    Ok(Ok(ms)) => refusal(u128::try_from(ms).unwrap_or(0)),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "rate limiter unavailable; admitting");
                        Ok(())
                    }
                    Err(_) => {
                        tracing::warn!("rate limiter did not answer; admitting");
                        Ok(())
                    }
                }
            }
        }
    }
}

fn refusal(wait_ms: u128) -> Result<(), Duration> {
    if wait_ms == 0 {
        Ok(())
    } else {
        Err(Duration::from_millis(
            u64::try_from(wait_ms).unwrap_or(u64::MAX),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse() {
        assert_eq!(
            "10/60s".parse::<Quota>().unwrap(),
            Quota {
                count: 10,
                period: Duration::from_secs(60)
            }
        );
        assert!("10".parse::<Quota>().is_err());
        assert!("0/1s".parse::<Quota>().is_err());
        assert!("x/1s".parse::<Quota>().is_err());
    }

    /// Ten requests a minute, then a wait, for one client; another unaffected: in process, in
    /// Redis, and on a Redis Cluster, where the clients' buckets fall on different primaries.
    async fn the_eleventh_request_in_the_window_waits(limiter: RateLimiter) {
        let quota = Quota {
            count: 10,
            period: Duration::from_secs(60),
        };
        for _ in 0..10 {
            limiter.check("a", quota).await.unwrap();
        }
        let wait = limiter.check("a", quota).await.unwrap_err();
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(6),
            "{wait:?}"
        );
        limiter
            .check("b", quota)
            .await
            .expect("other clients are unaffected");
    }

    #[tokio::test]
    async fn the_eleventh_request_in_the_window_waits_in_process() {
        the_eleventh_request_in_the_window_waits(RateLimiter::local()).await;
    }

    #[tokio::test]
    async fn the_eleventh_request_in_the_window_waits_in_redis() {
        let (url, prefix) = keel_testkit::fresh_prefix().await;
        let limiter = RateLimiter::redis(&url, &prefix).await.unwrap();
        the_eleventh_request_in_the_window_waits(limiter).await;
    }

    #[tokio::test]
    async fn the_eleventh_request_in_the_window_waits_on_a_redis_cluster() {
        let cluster = keel_testkit::RedisCluster::running().await;
        let (_, prefix) = keel_testkit::fresh_prefix().await;
        let limiter = RateLimiter::redis(&cluster.url, &prefix).await.unwrap();
        the_eleventh_request_in_the_window_waits(limiter).await;
    }

    #[tokio::test]
    async fn peeking_counts_nothing_and_charges_build_a_bounded_wait() {
        let limiter = RateLimiter::local();
        let quota = Quota {
            count: 3,
            period: Duration::from_secs(60),
        };
        for _ in 0..10 {
            limiter.peek("a", quota).await.unwrap();
        }
        for _ in 0..3 {
            limiter.charge("a", quota).await;
        }
        let wait = limiter.peek("a", quota).await.unwrap_err();
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        for _ in 0..100 {
            limiter.charge("a", quota).await;
        }
        let wait = limiter.peek("a", quota).await.unwrap_err();
        assert!(
            wait <= quota.period,
            "a hundred failures wait at most one period: {wait:?}"
        );
        assert!(wait > Duration::from_secs(50), "{wait:?}");
    }
}
