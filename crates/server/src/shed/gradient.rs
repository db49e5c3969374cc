//! The adaptive limit's arithmetic (a gradient with a queue allowance, in the style of Netflix's
//! Gradient2): latency is judged against its long-term average while the limit was not reached,
//! not against the lowest ever seen, so the pace a service keeps at the load it is given is
//! accepted, and a queue the limit itself lets grow is not.

use std::time::Duration;

/// Calls per window of latency samples.
pub(super) const WINDOW: u32 = 20;

/// Windows the long-term average spans (an exponential moving average): at 1,000 calls a second,
/// about ten seconds.
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

/// The adaptive limit of one service.
#[derive(Debug)]
pub(super) struct Gradient {
    limit: f64,
    min: f64,
    max: f64,
    /// The long-term average latency of windows (seconds), and how many windows it holds.
    long: f64,
    windows: u32,
    window: Window,
}

/// The calls of the window being filled.
#[derive(Debug, Default)]
struct Window {
    /// Their latencies, summed (seconds).
    took: f64,
    calls: u32,
    /// Calls dropped before they answered (their deadline passed, or their caller left): the
    /// plainest sign of queueing.
    dropped: u32,
    /// The most calls in flight.
    busiest: usize,
}

impl Gradient {
    /// A limit from `limit`, never below `min` nor above `max` (`min` past `max` is `max`).
    pub(super) fn new(limit: f64, min: f64, max: f64) -> Self {
        Self {
            limit,
            min: min.min(max),
            max,
            long: 0.0,
            windows: 0,
            window: Window::default(),
        }
    }

    /// A call took `took` with `in_flight` calls in flight (and was `dropped` before it
    /// answered); the new limit when a window ends.
    pub(super) fn sample(
        &mut self,
        took: Duration,
        in_flight: usize,
        dropped: bool,
    ) -> Option<f64> {
        let window = &mut self.window;
        window.took += took.as_secs_f64();
        window.calls += 1;
        window.dropped += u32::from(dropped);
        window.busiest = window.busiest.max(in_flight);
        if window.calls < WINDOW {
            return None;
        }
        let window = std::mem::take(&mut self.window);
        // Never zero: a window of calls answered within the clock's resolution.
        let short = (window.took / f64::from(window.calls)).max(1e-9);
        let busiest = window.busiest as f64;
        let long = self.lengthen(short, busiest + 1.0 > self.limit);
        // Only a limit that was used is judged: with few calls in flight, slowness or drops
        // are not this limit's doing (a busy machine, a caller's short deadline).
        if busiest < self.limit / 2.0 {
            return Some(self.limit);
        }
        let gradient = if window.dropped > WINDOW / 10 {
            0.5
        } else {
            ((TOLERANCE * long + SLACK.as_secs_f64()) / short).clamp(0.5, 1.0)
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
        let limit = self.limit * (1.0 - SMOOTHING) + judged * SMOOTHING;
        self.limit = limit.max(self.min).min(self.max);
        Some(self.limit)
    }

    /// Folds a window's average latency `short` into the long-term average; the average. A
    /// window that reached the limit (`at_limit`) may only lower it: its latency is partly the
    /// limit's own doing, and folding it in would let an overload raise the bar it is judged
    /// by, window after window, until only the callers' deadlines stopped it.
    fn lengthen(&mut self, short: f64, at_limit: bool) -> f64 {
        self.windows = self.windows.saturating_add(1);
        if self.windows <= WARM_UP {
            self.long += (short - self.long) / f64::from(self.windows);
        } else if !at_limit || short < self.long {
            self.long += (short - self.long) * 2.0 / (LONG + 1.0);
        }
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

    fn gradient(limit: f64) -> Gradient {
        Gradient::new(limit, 20.0, 1000.0)
    }

    /// A window of calls that took `took` each, with `in_flight` in flight; the limit after it.
    fn window(limit: &mut Gradient, took: Duration, in_flight: usize) -> f64 {
        let mut after = None;
        for _ in 0..WINDOW {
            after = limit.sample(took, in_flight, false);
        }
        after.expect("a window ended")
    }

    /// A window of calls that took `took` each, with four fifths of the limit in flight: used,
    /// but not reached.
    fn used(limit: &mut Gradient, took: Duration) -> f64 {
        let in_flight = (limit.limit * 0.8) as usize;
        window(limit, took, in_flight)
    }

    #[test]
    fn the_limit_grows_while_used_and_latency_holds_and_shrinks_when_latency_climbs() {
        let ms = Duration::from_millis;
        let mut limit = gradient(100.0);
        assert_eq!(
            used(&mut limit, ms(10)),
            102.0,
            "used and steady: a fifth of the queue allowance of ten more"
        );
        for _ in 1..WARM_UP {
            used(&mut limit, ms(10));
        }
        let before = limit.limit;
        assert_eq!(
            window(&mut limit, ms(10), 10),
            before,
            "barely used: unchanged"
        );
        let held = used(&mut limit, ms(14));
        assert!(held > before, "within half as much again: {held}");
        let shrunk = used(&mut limit, ms(40));
        assert!(shrunk < held, "latency climbing past it: {shrunk}");
        for _ in 0..100 {
            used(&mut limit, ms(900));
        }
        assert_eq!(limit.limit, 20.0, "never below the floor");
    }

    #[test]
    fn a_service_slower_under_more_load_than_it_was_idle_keeps_its_limit_once_the_pace_holds() {
        let ms = Duration::from_millis;
        let mut limit = gradient(100.0);
        for _ in 0..WARM_UP {
            used(&mut limit, ms(10));
        }
        // Busier now, each call takes three times the lowest latency ever seen, and that
        // holds. At first it is taken for a growing queue...
        let before = limit.limit;
        let after: Vec<f64> = (0..1_000).map(|_| used(&mut limit, ms(30))).collect();
        assert!(after[0] < before, "{before} then {}", after[0]);
        // ...but a pace that holds below the limit is folded into the long-term average within
        // a few hundred windows, and the limit grows again: judged against twice the lowest
        // latency (plus a drift of a thousandth a window), it would still be shrinking.
        assert!(
            after[299] > after[199],
            "{} then {}",
            after[199],
            after[299]
        );
        assert_eq!(after[999], 1000.0, "up to the ceiling");
    }

    #[test]
    fn a_queue_the_limit_itself_lets_grow_is_never_folded_in() {
        let ms = Duration::from_millis;
        let mut limit = gradient(100.0);
        for _ in 0..WARM_UP {
            used(&mut limit, ms(50));
        }
        // Past capacity: every place is taken, and each call in flight slows the others
        // (a millisecond each, say); more places only make the queue longer. No deadline
        // stops it.
        for _ in 0..20_000 {
            let reached = limit.limit.ceil() as usize;
            window(&mut limit, ms(reached as u64), reached);
        }
        assert!(
            limit.limit < 80.0,
            "latency held near half as much again as before the overload: {}",
            limit.limit
        );
    }

    #[test]
    fn a_handler_of_microseconds_slowed_by_a_busy_machine_keeps_its_limit() {
        let us = Duration::from_micros;
        let mut limit = gradient(100.0);
        used(&mut limit, us(30));
        let grown = used(&mut limit, us(120));
        assert!(
            grown > 100.0,
            "four times the average, but a tenth of a millisecond: not queueing ({grown})"
        );
        let shrunk = used(&mut limit, Duration::from_millis(5));
        assert!(shrunk < grown, "milliseconds of waiting are: {shrunk}");
        let mut instant = gradient(100.0);
        for _ in 0..100 {
            used(&mut instant, Duration::ZERO);
        }
        assert!(instant.limit > 100.0, "calls of no time: {}", instant.limit);
    }

    #[test]
    fn calls_dropped_before_they_answer_shrink_the_limit_whatever_the_latency() {
        let mut limit = gradient(100.0);
        let mut last = None;
        for _ in 0..WINDOW {
            last = limit.sample(Duration::from_millis(1), 100, true);
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

    #[test]
    fn a_floor_past_the_ceiling_is_the_ceiling() {
        let mut limit = Gradient::new(50.0, 100.0, 50.0);
        for _ in 0..10 {
            used(&mut limit, Duration::from_millis(900));
        }
        assert_eq!(limit.limit, 50.0);
    }
}
