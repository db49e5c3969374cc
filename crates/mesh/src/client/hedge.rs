//! Hedged reads: a call of a method with no side effects that has not answered by the method's
//! recent 95th percentile is sent a second time, to another endpoint, and the first answer
//! wins (the other attempt is dropped, which cancels it). One slow replica, or a pause in one,
//! then costs a caller the p95, not the stall. Hedges draw on a budget of their own (a share of
//! calls, as retries do) and on the retry budget, so that they never double the load.

use std::sync::Arc;
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

/// One channel's hedging: the settings, the budget and each method's recent latencies.
#[derive(Debug)]
pub(super) struct Hedger {
    hedging: Hedging,
    budget: TpsBudget,
    recent: crate::stats::MethodTable,
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
            recent: crate::stats::MethodTable::default(),
        }
    }

    /// A call of `path` is starting: how long to wait before hedging it, once the method's
    /// latency is known.
    pub(super) fn delay(&self, path: &str) -> Option<Duration> {
        self.budget.deposit();
        let recent = self.recent.get(path)?;
        let warm = recent.answered() >= self.hedging.warm_up as u64;
        warm.then(|| recent.p95()).flatten()
    }

    /// Whether a hedge may be sent now.
    pub(super) fn allowed(&self) -> bool {
        self.budget.withdraw()
    }

    /// A call of `path` answered after `took`.
    pub(super) fn answered(&self, path: &str, took: Duration) {
        if let Some(method) = self.recent.of(path) {
            method.record(took);
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
        let within = |d: Option<Duration>, ms: u64| {
            let ms = Duration::from_millis(ms);
            d.is_some_and(|d| d >= ms && d <= ms.mul_f64(1.25))
        };
        let delay = hedger.delay(path);
        assert!(
            within(delay, 96),
            "the p95 (the 96th of 100), to a bucket: {delay:?}"
        );
        // The oldest samples make way: a method that became fast is hedged sooner.
        for _ in 0..crate::stats::DECAY_EVERY * 6 {
            hedger.answered(path, Duration::from_millis(2));
        }
        let delay = hedger.delay(path);
        assert!(within(delay, 2), "{delay:?}");
    }
}
