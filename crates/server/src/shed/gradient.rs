//! The adaptive limit's arithmetic (a gradient with a queue allowance, in the style of Netflix's
//! Gradient2): latency is judged against its own long-term average, not the lowest ever seen,
//! so a steady queue at capacity is accepted and only a queue that grows, calls dropped before
//! they answered, or latency past half the callers' deadlines shrink the limit.

use std::time::Duration;

/// Calls per window of latency samples.
pub(super) const WINDOW: u32 = 20;

/// Windows the long-term average spans (an exponential moving average): at 1,000 calls a second,
/// about ten seconds. Queueing that settles is folded into it within that time and accepted.
const LONG: f64 = 500.0;

/// Windows averaged plainly before the long-term average becomes a moving one.
const WARM_UP: u32 = 10;

/// Latency up to this multiple of the long-term average (and [`SLACK`] more) is not a growing
/// queue (Gradient2's default).
const TOLERANCE: f64 = 1.5;

/// Latency within this of the tolerated is never taken for a growing queue, whatever the ratio.
/// A handler that answers from memory in tens of microseconds takes three times that whenever
/// the machine is busy without any call waiting for a place: on the ratio alone, the scenarios
/// bench's open loops at half of GetProduct's peak drove catalog's limit to its minimum (20)
/// and refused calls (RESOURCE_EXHAUSTED). Two milliseconds of queueing is no danger to any
/// caller's deadline, and a queue that keeps growing passes it soon.
const SLACK: Duration = Duration::from_millis(2);

/// How much of the limit a window's judgement moves (Gradient2's smoothing).
const SMOOTHING: f64 = 0.2;

/// The budget a call without a deadline counts as: it may wait a second for a place
/// ([`super::gate::MAX_WAIT`]) and be answered within another.
const NO_DEADLINE: Duration = Duration::from_secs(2);

/// The adaptive limit of one service.
#[derive(Debug)]
pub(super) struct Gradient {
    limit: f64,
    min: f64,
    max: f64,
    /// The long-term average latency of windows (seconds) and how many windows it holds.
    long: f64,
    windows: u32,
    window: Window,
}

/// The calls of the window being filled.
#[derive(Debug, Default)]
struct Window {
    /// Their latencies, summed (seconds).
    took: f64,
    /// Their callers' deadlines as they arrived, summed (seconds).
    budget: f64,
    calls: u32,
    /// Calls dropped before they answered (their deadline passed, or their caller left): the
    /// plainest sign of queueing.
    dropped: u32,
    /// The most calls in flight: a limit is only judged when it was used.
    busiest: usize,
}

impl Gradient {
    pub(super) fn new(limit: f64, min: f64, max: f64) -> Self {
        Self {
            limit,
            min,
            max,
            long: 0.0,
            windows: 0,
            window: Window::default(),
        }
    }

    /// A call whose caller gave it `budget` (none: no deadline) took `took` with `in_flight`
    /// calls in flight (and was `dropped` before it answered); the new limit when a window
    /// ends.
    pub(super) fn sample(
        &mut self,
        took: Duration,
        budget: Option<Duration>,
        in_flight: usize,
        dropped: bool,
    ) -> Option<f64> {
        let window = &mut self.window;
        window.took += took.as_secs_f64();
        window.budget += budget.unwrap_or(NO_DEADLINE).as_secs_f64();
        window.calls += 1;
        window.dropped += u32::from(dropped);
        window.busiest = window.busiest.max(in_flight);
        if window.calls < WINDOW {
            return None;
        }
        let window = std::mem::take(&mut self.window);
        let short = window.took / f64::from(window.calls);
        let budget = window.budget / f64::from(window.calls);
        let long = self.lengthen(short);
        // Only a limit that was used is judged: with few calls in flight, slowness or drops
        // are not this limit's doing (a busy machine, a caller's short deadline).
        if (window.busiest as f64) < self.limit / 2.0 {
            return Some(self.limit);
        }
        let gradient = if window.dropped > WINDOW / 10 {
            0.5
        } else {
            // Latency within the tolerance of its long-term average, and within half of what
            // callers allow, is no growing queue.
            let tolerated = (TOLERANCE * long + SLACK.as_secs_f64()).min(budget / 2.0);
            (tolerated / short).clamp(0.5, 1.0)
        };
        // The queue allowance only while nothing is wrong: added under a gradient below one,
        // it lets the limit creep up through a modest overload for good (Netflix
        // concurrency-limits #134).
        let queue = if gradient >= 1.0 {
            self.limit.sqrt()
        } else {
            0.0
        };
        let judged = self.limit * gradient + queue;
        self.limit =
            (self.limit * (1.0 - SMOOTHING) + judged * SMOOTHING).clamp(self.min, self.max);
        Some(self.limit)
    }

    /// Folds a window's average latency `short` into the long-term average; the average.
    fn lengthen(&mut self, short: f64) -> f64 {
        self.windows = self.windows.saturating_add(1);
        self.long = if self.windows <= WARM_UP {
            self.long + (short - self.long) / f64::from(self.windows)
        } else {
            self.long + (short - self.long) * 2.0 / (LONG + 1.0)
        };
        // Latency far below the average: the overload it remembers is over, and the average
        // comes down faster than the moving average alone would bring it.
        if self.long > 2.0 * short {
            self.long *= 0.95;
        }
        self.long
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Option<Duration> = Some(Duration::from_secs(1));

    fn gradient(limit: f64) -> Gradient {
        Gradient::new(limit, 20.0, 1000.0)
    }

    /// A window of calls that took `took` each with `in_flight` in flight, and a deadline of a
    /// second; the limit after it.
    fn window(limit: &mut Gradient, took: Duration, in_flight: usize) -> f64 {
        let mut after = None;
        for _ in 0..WINDOW {
            after = limit.sample(took, SECOND, in_flight, false);
        }
        after.expect("a window ended")
    }

    #[test]
    fn the_limit_grows_while_used_and_latency_holds_and_shrinks_when_latency_climbs() {
        let ms = Duration::from_millis;
        let mut limit = gradient(100.0);
        assert_eq!(
            window(&mut limit, ms(10), 60),
            102.0,
            "used and steady: a fifth of the queue allowance of ten more"
        );
        for _ in 1..WARM_UP {
            window(&mut limit, ms(10), 60);
        }
        let before = limit.limit;
        assert_eq!(
            window(&mut limit, ms(10), 10),
            before,
            "barely used: unchanged"
        );
        let held = window(&mut limit, ms(14), 90);
        assert!(held > before, "within half as much again: {held}");
        let shrunk = window(&mut limit, ms(40), 90);
        assert!(shrunk < held, "latency climbing past it: {shrunk}");
        for _ in 0..100 {
            window(&mut limit, ms(900), 90);
        }
        assert_eq!(limit.limit, 20.0, "never below the floor");
    }

    #[test]
    fn a_queue_that_holds_steady_is_folded_into_the_average_and_accepted() {
        let ms = Duration::from_millis;
        let mut limit = gradient(100.0);
        for _ in 0..WARM_UP {
            window(&mut limit, ms(10), 60);
        }
        // Calls now wait behind each other: three times the lowest latency ever seen, and it
        // stays there. At first that is a growing queue...
        let before = limit.limit;
        let mut after = Vec::new();
        for _ in 0..1_000 {
            after.push(window(&mut limit, ms(30), 1000));
        }
        assert!(after[0] < before, "{before} then {}", after[0]);
        // ...but one that holds still is folded into the long-term average within a few
        // hundred windows, and the limit grows again: judged against twice the lowest latency
        // (plus a drift of a thousandth a window), it would still be shrinking.
        assert!(
            after[299] > after[199],
            "{} then {}",
            after[199],
            after[299]
        );
        assert_eq!(after[999], 1000.0, "up to the ceiling");
    }

    #[test]
    fn latency_past_half_of_the_callers_deadlines_shrinks_the_limit_however_steady() {
        let ms = Duration::from_millis;
        let mut limit = gradient(500.0);
        // Steady for long enough to be the long-term average, but 600 ms of a second's
        // deadline: a call that waits in line as well would miss it.
        for _ in 0..2_000 {
            window(&mut limit, ms(600), 1000);
        }
        assert_eq!(limit.limit, 20.0);
        // Without a deadline, a call counts as having two seconds.
        let mut unbounded = gradient(500.0);
        for _ in 0..2_000 {
            for _ in 0..WINDOW {
                unbounded.sample(ms(600), None, 1000, false);
            }
        }
        assert_eq!(unbounded.limit, 1000.0);
        for _ in 0..200 {
            for _ in 0..WINDOW {
                unbounded.sample(ms(1100), None, 1000, false);
            }
        }
        assert!(unbounded.limit < 1000.0, "{}", unbounded.limit);
    }

    #[test]
    fn a_handler_of_microseconds_slowed_by_a_busy_machine_keeps_its_limit() {
        let us = Duration::from_micros;
        let mut limit = gradient(100.0);
        window(&mut limit, us(30), 60);
        let grown = window(&mut limit, us(120), 90);
        assert!(
            grown > 100.0,
            "four times the average, but a tenth of a millisecond: not queueing ({grown})"
        );
        let shrunk = window(&mut limit, Duration::from_millis(5), 90);
        assert!(shrunk < grown, "milliseconds of waiting are: {shrunk}");
    }

    #[test]
    fn calls_dropped_before_they_answer_shrink_the_limit_whatever_the_latency() {
        let mut limit = gradient(100.0);
        let mut last = None;
        for _ in 0..WINDOW {
            last = limit.sample(Duration::from_millis(1), SECOND, 100, true);
        }
        assert_eq!(last, Some(90.0), "halved, a fifth of the way");
    }

    #[test]
    fn after_an_overload_the_long_term_average_comes_down_quickly() {
        let ms = Duration::from_millis;
        let mut limit = gradient(100.0);
        for _ in 0..1_000 {
            window(&mut limit, ms(100), 10);
        }
        // The overload is over: calls take 10 ms again. The moving average alone would take
        // hundreds of windows to forget 100 ms; falling by a twentieth a window, it is within
        // twice the new latency in tens, and a limit judged against it grows again.
        for _ in 0..60 {
            window(&mut limit, ms(10), 10);
        }
        assert!(
            limit.long < 0.0205,
            "within twice the latency now: {}",
            limit.long
        );
    }
}
