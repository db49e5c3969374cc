//! The adaptive limit's arithmetic (AIMD, in the style of Netflix's concurrency-limits): grow by
//! one per window of calls while latency stays within twice the lowest recently seen (and a
//! slack), shrink by a tenth when it does not or when calls of the window were dropped before
//! they answered.

use std::time::Duration;

/// Calls per window of latency samples.
pub(super) const WINDOW: u32 = 20;

/// Latency above this multiple of the lowest recent one (and [`SLACK`] more) means the service
/// is queueing.
const TOLERANCE: f64 = 2.0;

/// Latency within this of twice the floor is never taken for queueing, whatever the ratio. A
/// handler that answers from memory in tens of microseconds takes three times that whenever the
/// machine is busy without any call waiting for a place: on the ratio alone, the scenarios
/// bench's open loops at half of GetProduct's peak drove catalog's limit to its minimum (20)
/// and refused calls (RESOURCE_EXHAUSTED) on both store pairs. Two milliseconds of queueing is
/// no danger to any caller's deadline, and a queue that keeps growing passes it soon.
const SLACK: Duration = Duration::from_millis(2);

/// How fast the lowest latency seen is forgotten, per window (so that it follows real change:
/// doubling takes about 700 windows).
const FLOOR_DRIFT: f64 = 1.001;

/// The AIMD limit of one service.
#[derive(Debug)]
pub(super) struct Aimd {
    limit: f64,
    min: f64,
    max: f64,
    /// The lowest average of a window without drops, drifting up slowly.
    floor: Option<f64>,
    sum: f64,
    count: u32,
    /// Calls of the window dropped before they answered (their deadline passed, or their
    /// caller left): the plainest sign of queueing.
    dropped: u32,
    /// The most calls in flight during the window: a limit is only raised when it was used.
    busiest: usize,
}

impl Aimd {
    pub(super) fn new(limit: f64, min: f64, max: f64) -> Self {
        Self {
            limit,
            min,
            max,
            floor: None,
            sum: 0.0,
            count: 0,
            dropped: 0,
            busiest: 0,
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
        self.sum += took.as_secs_f64();
        self.count += 1;
        self.dropped += u32::from(dropped);
        self.busiest = self.busiest.max(in_flight);
        if self.count < WINDOW {
            return None;
        }
        let average = self.sum / f64::from(self.count);
        let (busiest, dropped) = (self.busiest, self.dropped);
        (self.sum, self.count, self.dropped, self.busiest) = (0.0, 0, 0, 0);
        // A window with drops says nothing of the latency the service can give.
        let floor = match (self.floor, dropped) {
            (None, 0) => Some(average),
            (Some(f), 0) => Some((f * FLOOR_DRIFT).min(average)),
            (f, _) => f.map(|f| f * FLOOR_DRIFT),
        };
        self.floor = floor;
        // Only a limit that was used is judged: with few calls in flight, slowness or drops
        // are not this limit's doing (a busy machine, a caller's short deadline).
        if (busiest as f64) < self.limit / 2.0 {
            return Some(self.limit);
        }
        let queueing = dropped > WINDOW / 10
            || floor.is_some_and(|f| average > TOLERANCE * f + SLACK.as_secs_f64());
        self.limit = if queueing {
            (self.limit * 0.9).max(self.min)
        } else {
            (self.limit + 1.0).min(self.max)
        };
        Some(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aimd(limit: f64) -> Aimd {
        Aimd::new(limit, 20.0, 1000.0)
    }

    fn window(aimd: &mut Aimd, took: Duration, in_flight: usize) -> f64 {
        let mut limit = None;
        for _ in 0..WINDOW {
            limit = aimd.sample(took, in_flight, false);
        }
        limit.expect("a window ended")
    }

    #[test]
    fn the_limit_grows_while_used_and_latency_holds_and_shrinks_when_latency_climbs() {
        let ms = Duration::from_millis;
        let mut limit = aimd(100.0);
        assert_eq!(
            window(&mut limit, ms(10), 60),
            101.0,
            "used and fast: one more"
        );
        assert_eq!(
            window(&mut limit, ms(10), 10),
            101.0,
            "barely used: unchanged"
        );
        assert_eq!(
            window(&mut limit, ms(500), 10),
            101.0,
            "slow but barely used: unchanged"
        );
        assert_eq!(
            window(&mut limit, ms(19), 90),
            102.0,
            "within twice the floor"
        );
        let shrunk = window(&mut limit, ms(30), 90);
        assert!((shrunk - 91.8).abs() < 1e-9, "{shrunk}");
        for _ in 0..100 {
            window(&mut limit, ms(500), 90);
        }
        assert_eq!(limit.limit, 20.0, "never below the floor");
    }

    #[test]
    fn a_handler_of_microseconds_slowed_by_a_busy_machine_keeps_its_limit() {
        let us = Duration::from_micros;
        let mut limit = aimd(100.0);
        window(&mut limit, us(30), 60);
        assert_eq!(
            window(&mut limit, us(120), 90),
            102.0,
            "four times the floor, but a tenth of a millisecond: not queueing"
        );
        let shrunk = window(&mut limit, Duration::from_millis(5), 90);
        assert!(shrunk < 102.0, "milliseconds of waiting are: {shrunk}");
    }

    #[test]
    fn calls_dropped_before_they_answer_shrink_the_limit_whatever_the_latency() {
        let mut limit = aimd(100.0);
        let mut last = None;
        for _ in 0..WINDOW {
            last = limit.sample(Duration::from_millis(200), 100, true);
        }
        assert_eq!(last, Some(90.0));
        assert_eq!(
            limit.floor, None,
            "a window of drops is no measure of the service"
        );
    }

    #[test]
    fn the_lowest_latency_is_forgotten_slowly_so_a_slower_service_is_followed() {
        let ms = Duration::from_millis;
        let mut limit = aimd(100.0);
        window(&mut limit, ms(10), 60);
        // The work became five times slower for good: the limit falls at first, then the
        // floor catches up and it grows again.
        let mut low = f64::MAX;
        let mut last = 0.0;
        for _ in 0..1500 {
            last = window(&mut limit, ms(50), 1000);
            low = low.min(last);
        }
        assert!(low < 100.0 && last > low, "fell to {low}, back to {last}");
    }
}
