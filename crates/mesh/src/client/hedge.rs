//! Hedged reads: a call of a method with no side effects that has not answered by the method's
//! recent 95th percentile is sent a second time, to another endpoint, and the first answer
//! wins (the other attempt is dropped, which cancels it). One slow replica, or a pause in one,
//! then costs a caller the p95, not the stall. Hedges draw on a budget of their own (a share of
//! calls, as retries do) and on the retry budget, so that they never double the load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tower::retry::budget::{Budget as _, TpsBudget};

/// When to hedge, if at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hedging {
    /// Hedges as a share of calls (over a 10 s window, plus `per_second`).
    pub ratio: f32,
    /// Hedges allowed per second whatever the ratio.
    pub per_second: u32,
    /// Answered calls of a method before its p95 is trusted.
    pub warm_up: usize,
}

impl Default for Hedging {
    fn default() -> Self {
        Self {
            ratio: 0.1,
            per_second: 10,
            warm_up: 20,
        }
    }
}

/// Set on a call's first attempt when a hedge answered first: the endpoint that attempt went
/// to was the slow one. Dropping (cancelling) the attempt would otherwise hide that from its
/// load estimate, which measures an attempt until it ends.
#[derive(Debug, Clone, Default)]
pub struct Abandoned(Arc<AtomicBool>);

impl Abandoned {
    pub(super) fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub(super) fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Latencies kept per method for its p95.
const SAMPLES: usize = 100;

/// The recent latencies of one method, newest overwriting oldest.
#[derive(Debug, Default)]
struct Recent {
    samples: Vec<Duration>,
    next: usize,
    seen: usize,
}

impl Recent {
    fn record(&mut self, took: Duration) {
        if self.samples.len() < SAMPLES {
            self.samples.push(took);
        } else {
            self.samples[self.next] = took;
        }
        self.next = (self.next + 1) % SAMPLES;
        self.seen += 1;
    }

    fn p95(&self) -> Duration {
        let mut sorted = self.samples.clone();
        let at = (sorted.len() * 95 / 100).min(sorted.len().saturating_sub(1));
        *sorted.select_nth_unstable(at).1
    }
}

/// One channel's hedging: the settings, the budget and each method's recent latencies.
#[derive(Debug)]
pub(super) struct Hedger {
    hedging: Hedging,
    budget: TpsBudget,
    recent: Mutex<HashMap<String, Recent>>,
}

impl Hedger {
    pub(super) fn new(hedging: Hedging) -> Self {
        Self {
            hedging,
            budget: TpsBudget::new(
                Duration::from_secs(10),
                hedging.per_second,
                hedging.ratio.clamp(0.0, 1000.0),
            ),
            recent: Mutex::default(),
        }
    }

    /// A call of `path` is starting: how long to wait before hedging it, once the method's
    /// latency is known.
    pub(super) fn delay(&self, path: &str) -> Option<Duration> {
        self.budget.deposit();
        let recent = self.recent.lock().expect("hedge lock");
        let recent = recent.get(path)?;
        (recent.seen >= self.hedging.warm_up).then(|| recent.p95())
    }

    /// Whether a hedge may be sent now.
    pub(super) fn allowed(&self) -> bool {
        self.budget.withdraw()
    }

    /// A call of `path` answered after `took`.
    pub(super) fn answered(&self, path: &str, took: Duration) {
        let mut recent = self.recent.lock().expect("hedge lock");
        if let Some(method) = recent.get_mut(path) {
            method.record(took);
        } else {
            let mut method = Recent::default();
            method.record(took);
            recent.insert(path.to_owned(), method);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_is_the_recent_p95_once_the_method_has_a_history() {
        let hedger = Hedger::new(Hedging {
            warm_up: 20,
            ..Hedging::default()
        });
        let path = "/test.Echo/Call";
        assert_eq!(hedger.delay(path), None);
        for ms in 1..=19 {
            hedger.answered(path, Duration::from_millis(ms));
        }
        assert_eq!(hedger.delay(path), None, "not yet warm");
        for ms in 20..=100 {
            hedger.answered(path, Duration::from_millis(ms));
        }
        assert_eq!(hedger.delay(path), Some(Duration::from_millis(96)));
        // The oldest samples make way: a method that became fast is hedged sooner.
        for _ in 0..SAMPLES {
            hedger.answered(path, Duration::from_millis(2));
        }
        assert_eq!(hedger.delay(path), Some(Duration::from_millis(2)));
    }
}
