//! What a job is: its kind and payload, where it is in its life, and how long to wait before
//! trying it again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng as _;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for a worker (due at `run_after`).
    Queued,
    /// A worker holds it under a lease.
    Running,
    /// Done.
    Succeeded,
    /// Its last attempt failed; it will be tried again at `run_after`.
    Failed,
    /// Every attempt failed, or it failed for good.
    Dead,
}

impl State {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "QUEUED",
            State::Running => "RUNNING",
            State::Succeeded => "SUCCEEDED",
            State::Failed => "FAILED",
            State::Dead => "DEAD",
        }
    }

    /// From its stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "QUEUED" => State::Queued,
            "RUNNING" => State::Running,
            "SUCCEEDED" => State::Succeeded,
            "FAILED" => State::Failed,
            "DEAD" => State::Dead,
            _ => return None,
        })
    }

    /// Whether nothing more will happen to it (but a retry of a dead job).
    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Dead)
    }

    /// Every state.
    pub const ALL: [State; 5] = [
        State::Queued,
        State::Running,
        State::Succeeded,
        State::Failed,
        State::Dead,
    ];
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// A UUIDv7: creation order.
    pub id: String,
    /// What to do (`email.send`): picks the handler.
    pub kind: String,
    /// The handler's arguments.
    pub payload: serde_json::Value,
    /// Where it is.
    pub state: State,
    /// Attempts so far (a claim counts as one).
    pub attempts: i32,
    /// Attempts before it is dead.
    pub max_attempts: i32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// A second job with this key, while this one lives, is this one.
    pub unique_key: Option<String>,
    /// Who asked for it (`users/{id}`, or a service).
    pub creator: String,
    /// Not before this (milliseconds since the epoch).
    pub run_after: i64,
    /// When it was written.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// When its latest attempt started.
    pub started_at: Option<i64>,
    /// When it last finished an attempt (succeeded, failed or died).
    pub finished_at: Option<i64>,
    /// When it was last put in the queue: written, or retried by hand after it died.
    pub queued_at: i64,
}

impl Job {
    /// The fencing token of this attempt: writes made under it commit only while this attempt
    /// still holds the job ([`crate::hold`]).
    pub fn fence(&self) -> Fence {
        Fence {
            job: self.id.clone(),
            attempt: self.attempts,
        }
    }
}

/// An attempt's claim on its job: the job and the attempt's number, which every claim
/// increments. A worker whose lease ran out and whose job another worker claimed holds an old
/// fence, and whatever it writes under it is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The job.
    pub job: String,
    /// The attempt that holds it.
    pub attempt: i32,
}

impl Fence {
    /// The error of a write refused because this attempt no longer holds its job.
    pub fn lost(&self) -> crate::QueueError {
        crate::QueueError::LeaseLost {
            job: self.job.clone(),
            attempt: self.attempt,
        }
    }
}

/// A job to write.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    /// What to do.
    pub kind: String,
    /// The handler's arguments.
    pub payload: serde_json::Value,
    /// Who asks.
    pub creator: String,
    /// At most one live job per key.
    pub unique_key: Option<String>,
    /// Not before this (milliseconds since the epoch); now when `None`.
    pub run_after: Option<i64>,
    /// Attempts before it is dead; the queue's default when `None`.
    pub max_attempts: Option<i32>,
    /// An AIP-155 request id and the request's fingerprint: a retry returns the first job.
    pub request: Option<(String, String)>,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `d` in whole milliseconds.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `wait`, or less if `at` (milliseconds since the epoch, when something comes due) is sooner:
/// until just past it, so that what looks then sees it due.
pub(crate) fn at_most_until(wait: Duration, at: Option<i64>) -> Duration {
    at.map_or(wait, |at| {
        let left = u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0);
        wait.min(Duration::from_millis(left.saturating_add(1)))
    })
}

/// How long to wait before another attempt: doubling from `base` up to `max`, with jitter so
/// that jobs that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (1 for the first): between half and all of
    /// `base · 2^(attempt-1)`, capped at `max`.
    pub fn delay(&self, attempt: i32) -> Duration {
        let exponent = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(0)
            .min(30);
        let full = self.base.saturating_mul(1 << exponent).min(self.max);
        full.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let first = backoff.delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff.delay(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            assert!(backoff.delay(40) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn states_round_trip() {
        for state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
        }
        assert!(State::Dead.is_final() && !State::Failed.is_final());
    }
}
