//! One service's admission: calls in flight against its current limit, by criticality, and the
//! line of calls that wait for a place (queueing is not overload: a call waits while the line
//! is short and the calls ahead of it drain within its deadline, and is refused at once when
//! not); the peak of calls in flight; the places of open streams.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntGauge, IntGaugeVec};
use tokio::sync::Notify;

use keel_mesh::criticality::Criticality;

use super::gradient::Gradient;

/// How many calls may wait for a place, as a multiple of the limit: a closed loop of clients a
/// few times the limit waits its turn; an open loop past capacity fills the line and is refused.
///
/// Not longer for fast calls: a line of up to 100 ms of work (thousands of GetProduct calls
/// behind a limit of 20) was measured in the scenarios bench (RESULTS.md, 2026-12-06, 4710d13)
/// and made its open loops at half the peak worse, not better: p99 from ~35 ms to 300–800 ms,
/// more calls refused or abandoned, RSS past 80 MiB. Those open loops are overload on two
/// shared cores (the generator costs what the server does), and a short line says so soonest.
const LINE: f64 = 4.0;

/// The longest a call without a deadline waits for a place.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(1);

/// One service's admission: calls in flight against the current limit.
#[derive(Debug)]
pub(super) struct Gate {
    in_flight: AtomicUsize,
    /// The current limit, as f64 bits, for lock-free reads.
    limit: AtomicU64,
    /// The static ceiling.
    ceiling: usize,
    adaptive: Option<Mutex<Gradient>>,
    /// The most calls in flight at once since the process started.
    peak: AtomicUsize,
    gauges: Option<Gauges>,
    /// Calls waiting for a place now.
    waiting: AtomicUsize,
    /// Told of each place given back while calls wait.
    freed: Notify,
    /// How long answered calls take, a moving average (f64 seconds as bits): a call waits
    /// only while what is left of its deadline still holds twice that.
    typical: AtomicU64,
    /// Server streams open now: they hold no place among the calls in flight, under a
    /// bound of their own.
    pub(super) streams: AtomicUsize,
    /// A call was turned away or made to wait since the last sample: the limit was reached.
    turned_away: AtomicBool,
}

/// One service's series: its current limit and the most calls it had in flight at once.
#[derive(Debug)]
pub(super) struct Gauges {
    pub(super) limit: IntGauge,
    pub(super) peak: IntGauge,
}

/// Where [`super::ShedLayer::with_gauges`] shows each service's limit and peak (labelled
/// `grpc_service`).
#[derive(Debug, Clone)]
pub struct ShedGauges {
    /// `keel_server_concurrency_limit`.
    pub limits: IntGaugeVec,
    /// `keel_server_peak_in_flight`.
    pub peaks: IntGaugeVec,
}

/// Most server streams one service holds open at once (per process).
pub const MAX_OPEN_STREAMS: usize = 10_000;

/// A stream's place among its service's open streams, given back when it ends.
pub(super) struct Open(pub(super) Arc<Gate>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotAdmitted {
    /// The service is at its limit.
    Limit,
    /// Below the limit, but too close to it for this call's criticality.
    Criticality,
    /// The line of calls waiting for a place is full, or the call waited as long as it may.
    Line,
}

/// A call's place in the line, given up when it leaves (admitted or not).
struct InLine<'a>(&'a Gate);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        let gate = self.0;
        gate.waiting.fetch_sub(1, Ordering::SeqCst);
        // Those behind waited to be told of a place: one that is free now is theirs.
        if gate.waiting.load(Ordering::SeqCst) > 0
            && (gate.in_flight.load(Ordering::SeqCst) as f64) < gate.limit()
        {
            gate.freed.notify_one();
        }
    }
}

impl Gate {
    /// A gate starting at `initial` under `ceiling`, following `adaptive` when set.
    pub(super) fn new(
        initial: usize,
        ceiling: usize,
        adaptive: Option<Gradient>,
        gauges: Option<Gauges>,
    ) -> Self {
        if let Some(gauges) = &gauges {
            gauges.limit.set(initial as i64);
        }
        Self {
            in_flight: AtomicUsize::new(0),
            limit: AtomicU64::new((initial as f64).to_bits()),
            ceiling,
            adaptive: adaptive.map(Mutex::new),
            peak: AtomicUsize::new(0),
            gauges,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            typical: AtomicU64::new(0f64.to_bits()),
            streams: AtomicUsize::new(0),
            turned_away: AtomicBool::new(false),
        }
    }

    pub(super) fn limit(&self) -> f64 {
        f64::from_bits(self.limit.load(Ordering::Relaxed))
    }

    /// Admits a call of `criticality` at once, or says why not.
    pub(super) fn admit(self: &Arc<Self>, criticality: Criticality) -> Result<Ticket, NotAdmitted> {
        // Those waiting go first: a call that arrives does not pass the line.
        if criticality != Criticality::Critical && self.waiting.load(Ordering::SeqCst) > 0 {
            self.turned_away.store(true, Ordering::Relaxed);
            return Err(NotAdmitted::Limit);
        }
        self.try_admit(criticality)
    }

    /// Admits a call of `criticality` when a place frees before `until`, if the line has room
    /// for it and the calls ahead of it drain before `until`: a call whose turn would come too
    /// late is refused at once rather than left to wait in vain. Sheddable calls never wait.
    pub(super) async fn wait(
        self: &Arc<Self>,
        criticality: Criticality,
        until: Instant,
    ) -> Result<Ticket, NotAdmitted> {
        if criticality == Criticality::Sheddable {
            return Err(NotAdmitted::Criticality);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        // However it leaves the line, refused at once included, the next call is told of a
        // place that is free.
        let _in_line = InLine(self);
        if ahead as f64 >= (self.limit() * LINE).max(1.0) {
            return Err(NotAdmitted::Line);
        }
        let deadline = tokio::time::Instant::from_std(until);
        // Behind others, a call waits to be told of a place: a place given back goes to the
        // call that has waited longest (the notifications are first come, first served).
        let mut told = ahead == 0;
        let mut first = true;
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if told && let Ok(ticket) = self.try_admit(criticality) {
                return Ok(ticket);
            }
            // Not in at once: a call whose turn would come after its deadline, by the calls
            // ahead of it, is told so now.
            if std::mem::take(&mut first)
                && self.drains(ahead + 1) > until.saturating_duration_since(Instant::now())
            {
                return Err(NotAdmitted::Line);
            }
            tokio::select! {
                () = freed => told = true,
                () = tokio::time::sleep_until(deadline) => return Err(NotAdmitted::Line),
            }
        }
    }

    /// About how long a line of `calls` takes until its last has a place: a place frees every
    /// typical call's time over the limit (Little's law).
    fn drains(&self, calls: usize) -> Duration {
        self.typical().mul_f64(calls as f64 / self.limit().max(1.0))
    }

    /// How long an answered call typically takes, from admission.
    fn typical(&self) -> Duration {
        Duration::from_secs_f64(f64::from_bits(self.typical.load(Ordering::Relaxed)))
    }

    /// Sheddable calls while under three quarters of the limit, default ones under the limit,
    /// critical ones up to half as much again (never past the ceiling).
    fn try_admit(self: &Arc<Self>, criticality: Criticality) -> Result<Ticket, NotAdmitted> {
        let limit = self.limit();
        let allowed = match criticality {
            Criticality::Sheddable => limit * 0.75,
            Criticality::Default => limit,
            Criticality::Critical => (limit * 1.5).min(self.ceiling as f64),
        };
        let before = self.in_flight.fetch_add(1, Ordering::SeqCst);
        if before as f64 >= allowed.max(1.0) {
            self.turned_away.store(true, Ordering::Relaxed);
            // Not a place given back, unless this attempt's own count kept a waiting call out
            // of one that is free.
            let now = self.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
            if (now as f64) < limit && self.waiting.load(Ordering::SeqCst) > 0 {
                self.freed.notify_one();
            }
            return Err(if before as f64 >= limit {
                NotAdmitted::Limit
            } else {
                NotAdmitted::Criticality
            });
        }
        self.reached(before + 1);
        Ok(Ticket {
            gate: self.clone(),
            in_flight: before + 1,
            started: Instant::now(),
            budget: None,
            answered: false,
        })
    }

    /// A place is given back: the first call in line, if any, is told.
    fn given_back(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }

    /// `in_flight` calls are in flight now: a new peak is shown. The gauge is set from the
    /// atomic peak until they agree, so racing admissions leave it at the highest.
    fn reached(&self, in_flight: usize) {
        if self.peak.fetch_max(in_flight, Ordering::AcqRel) >= in_flight {
            return;
        }
        let Some(gauges) = &self.gauges else { return };
        loop {
            let peak = self.peak.load(Ordering::Acquire);
            gauges.peak.set(peak as i64);
            if self.peak.load(Ordering::Acquire) == peak {
                return;
            }
        }
    }

    /// How long a call whose deadline is `timeout` away (none: [`MAX_WAIT`]) may wait for a
    /// place: until twice the typical call's time is all that is left of it.
    pub(super) fn patience(&self, timeout: Option<Duration>) -> Duration {
        let typical = self.typical();
        timeout.map_or(MAX_WAIT, |timeout| {
            timeout.saturating_sub(typical * 2).min(MAX_WAIT)
        })
    }

    fn sampled(&self, took: Duration, budget: Option<Duration>, in_flight: usize, dropped: bool) {
        if !dropped {
            // A moving average over about the last twenty answers (racing updates may lose
            // one; it is an estimate).
            let before = f64::from_bits(self.typical.load(Ordering::Relaxed));
            let now = if before == 0.0 {
                took.as_secs_f64()
            } else {
                before + (took.as_secs_f64() - before) / 20.0
            };
            self.typical.store(now.to_bits(), Ordering::Relaxed);
        }
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        let reached = self.turned_away.swap(false, Ordering::Relaxed);
        let limit = adaptive
            .lock()
            .expect("limit lock")
            .sample(took, budget, in_flight, dropped, reached);
        if let Some(limit) = limit {
            self.limit.store(limit.to_bits(), Ordering::Relaxed);
            if let Some(gauges) = &self.gauges {
                gauges.limit.set(limit as i64);
            }
        }
    }
}

/// An admitted call's place: it samples the latency when the handler answers (or when the call
/// is dropped before it does) and gives the place back when the response's last frame is sent.
#[derive(Debug)]
pub(super) struct Ticket {
    gate: Arc<Gate>,
    in_flight: usize,
    started: Instant,
    /// The call's deadline as it arrived (none: it has none).
    budget: Option<Duration>,
    answered: bool,
}

impl Ticket {
    /// The place of a call whose caller allowed it `budget` (none: no deadline).
    pub(super) fn allowing(mut self, budget: Option<Duration>) -> Self {
        self.budget = budget;
        self
    }

    pub(super) fn answered(&mut self) {
        self.answered = true;
        self.gate
            .sampled(self.started.elapsed(), self.budget, self.in_flight, false);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.answered {
            self.gate
                .sampled(self.started.elapsed(), self.budget, self.in_flight, true);
        }
        self.gate.given_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shed::{Concurrency, ShedLayer};

    #[test]
    fn sheddable_calls_are_refused_first_and_critical_ones_last() {
        let layer = ShedLayer::new(["s"], Concurrency::Static(8), Duration::ZERO);
        let gate = layer.gates["s"].clone();
        let mut held = Vec::new();
        let mut admit = |c| gate.admit(c).map(|t| held.push(t));
        for _ in 0..6 {
            admit(Criticality::Default).unwrap();
        }
        assert_eq!(admit(Criticality::Sheddable), Err(NotAdmitted::Criticality));
        admit(Criticality::Default).unwrap();
        admit(Criticality::Default).unwrap();
        assert_eq!(admit(Criticality::Default), Err(NotAdmitted::Limit));
        // The static ceiling holds critical calls too.
        assert_eq!(admit(Criticality::Critical), Err(NotAdmitted::Limit));
        drop(held);
        assert_eq!(gate.in_flight.load(Ordering::SeqCst), 0);

        let adaptive = ShedLayer::new(["s"], Concurrency::adaptive(1000), Duration::ZERO);
        let gate = adaptive.gates["s"].clone();
        let held: Vec<Ticket> = (0..100)
            .map(|_| gate.admit(Criticality::Default).unwrap())
            .collect();
        assert_eq!(
            gate.admit(Criticality::Default).err(),
            Some(NotAdmitted::Limit)
        );
        let critical: Vec<Ticket> = (0..50)
            .map(|_| gate.admit(Criticality::Critical).unwrap())
            .collect();
        assert_eq!(
            gate.admit(Criticality::Critical).err(),
            Some(NotAdmitted::Limit)
        );
        drop((held, critical));
    }

    #[test]
    fn the_peak_shows_the_most_calls_ever_in_flight_at_once() {
        let gauge =
            |name: &str| IntGaugeVec::new(prometheus::Opts::new(name, "-"), &["s"]).unwrap();
        let gauges = ShedGauges {
            limits: gauge("limits"),
            peaks: gauge("peaks"),
        };
        let layer = ShedLayer::with_gauges(
            ["s"],
            Concurrency::Static(8),
            Duration::ZERO,
            gauges.clone(),
        );
        let gate = layer.gates["s"].clone();
        let peak = || gauges.peaks.with_label_values(&["s"]).get();
        assert_eq!(peak(), 0);
        let three: Vec<Ticket> = (0..3)
            .map(|_| gate.admit(Criticality::Default).unwrap())
            .collect();
        drop(three);
        let one = gate.admit(Criticality::Default).unwrap();
        assert_eq!(peak(), 3, "one call now, three at once before");
        drop(one);
    }

    fn gate(limit: usize) -> Arc<Gate> {
        ShedLayer::new(["s"], Concurrency::Static(limit), Duration::ZERO).gates["s"].clone()
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn a_call_past_the_limit_waits_and_takes_the_first_place_given_back() {
        let gate = gate(2);
        let (first, second) = (
            gate.admit(Criticality::Default).unwrap(),
            gate.admit(Criticality::Default).unwrap(),
        );
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait(Criticality::Default, later()).await }
        });
        keel_testkit::eventually(Duration::from_secs(10), "a call in line", || async {
            (gate.waiting.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        drop(first);
        // The place is the waiting call's: one that arrives now does not pass it.
        assert_eq!(
            gate.admit(Criticality::Default).err(),
            Some(NotAdmitted::Limit)
        );
        let admitted = waiting.await.unwrap().expect("the freed place");
        assert_eq!(gate.in_flight.load(Ordering::SeqCst), 2);
        drop((admitted, second));
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
    }

    /// `gate` answered calls of `typical` each, over a window.
    fn typically(gate: &Gate, typical: Duration) {
        for _ in 0..super::super::gradient::WINDOW {
            gate.sampled(typical, None, 1, false);
        }
    }

    /// Whether a default call that must have its place by `until` is refused at once
    /// (`Some`), or waits (`None`, and leaves the line again).
    fn refused_at_once(gate: &Arc<Gate>, until: Instant) -> Option<NotAdmitted> {
        use futures::FutureExt as _;
        match gate.wait(Criticality::Default, until).now_or_never() {
            Some(Err(why)) => Some(why),
            Some(Ok(_)) => panic!("a full gate admitted a call"),
            None => None,
        }
    }

    /// `calls` more calls waiting in line, until they have their places or are aborted.
    async fn line_of(gate: &Arc<Gate>, calls: usize) -> Vec<tokio::task::JoinHandle<()>> {
        let before = gate.waiting.load(Ordering::SeqCst);
        let line: Vec<_> = (0..calls)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _ = gate.wait(Criticality::Default, later()).await;
                })
            })
            .collect();
        keel_testkit::eventually(Duration::from_secs(10), "the calls in line", || async {
            (gate.waiting.load(Ordering::SeqCst) == before + calls).then_some(())
        })
        .await;
        line
    }

    /// A gate of two places, both taken, whose calls typically take 100 ms.
    fn full_of_slow_calls() -> (Arc<Gate>, [Ticket; 2]) {
        let gate = gate(2);
        typically(&gate, Duration::from_millis(100));
        let held = [(); 2].map(|()| gate.admit(Criticality::Default).unwrap());
        (gate, held)
    }

    #[tokio::test]
    async fn a_line_of_slow_calls_holds_four_times_the_limit_and_no_call_waits_past_its_time() {
        let (gate, held) = full_of_slow_calls();
        // Eight calls behind two places: four times the limit.
        let line = line_of(&gate, 8).await;
        assert_eq!(
            refused_at_once(&gate, later()),
            Some(NotAdmitted::Line),
            "the line is full"
        );
        for waiting in &line {
            waiting.abort();
        }
        for waiting in line {
            let _ = waiting.await;
        }
        assert_eq!(
            gate.waiting.load(Ordering::SeqCst),
            0,
            "an abandoned wait leaves"
        );
        let now = gate.wait(Criticality::Default, Instant::now()).await;
        assert_eq!(now.err(), Some(NotAdmitted::Line), "no time to wait");
        // With no call measured yet, the line's time is unknown: such a call waits until its
        // deadline, which has passed.
        let fresh = self::gate(1);
        let _one = fresh.admit(Criticality::Default).unwrap();
        let late = fresh.wait(Criticality::Default, Instant::now()).await;
        assert_eq!(late.err(), Some(NotAdmitted::Line), "its deadline came");
        let shed = gate.wait(Criticality::Sheddable, later()).await;
        assert_eq!(
            shed.err(),
            Some(NotAdmitted::Criticality),
            "sheddable calls never wait"
        );
        drop(held);
    }

    #[tokio::test]
    async fn a_call_whose_deadline_comes_before_its_turn_is_refused_at_once() {
        let (gate, held) = full_of_slow_calls();
        let line = line_of(&gate, 4).await;
        // Five calls of 100 ms behind two places: its turn comes in about 250 ms (the four
        // ahead of it alone would be in by 200).
        let soon = Instant::now() + Duration::from_millis(225);
        assert_eq!(refused_at_once(&gate, soon), Some(NotAdmitted::Line));
        let in_time = Instant::now() + Duration::from_secs(60);
        assert_eq!(refused_at_once(&gate, in_time), None);
        for waiting in line {
            waiting.abort();
        }
        drop(held);
    }

    /// `gate`'s limit after `batches` of calls at three quarters of it at once (used, not
    /// reached), each call `allowed` its deadline and answered `took` after admission.
    fn answered_in_batches(
        gate: &Arc<Gate>,
        batches: usize,
        took: Duration,
        allowed: Option<Duration>,
    ) -> f64 {
        for _ in 0..batches {
            let held: Vec<Ticket> = (0..(gate.limit() * 0.75) as usize)
                .map(|_| {
                    let mut ticket = gate.admit(Criticality::Default).unwrap().allowing(allowed);
                    ticket.started -= took;
                    ticket
                })
                .collect();
            for mut ticket in held {
                ticket.answered();
            }
        }
        gate.limit()
    }

    #[test]
    fn a_call_carries_its_deadline_to_the_limit() {
        let adaptive = || {
            ShedLayer::new(["s"], Concurrency::adaptive(1000), Duration::ZERO).gates["s"].clone()
        };
        let ms = Duration::from_millis;
        // A pace of 100 ms; then 130 ms, within half as much again of it, but past half of a
        // 100 ms deadline.
        let without = adaptive();
        answered_in_batches(&without, 4, ms(100), None);
        let before = without.limit();
        assert!(answered_in_batches(&without, 5, ms(130), None) > before);
        let with = adaptive();
        answered_in_batches(&with, 4, ms(100), Some(ms(100)));
        let before = with.limit();
        assert!(answered_in_batches(&with, 5, ms(130), Some(ms(100))) < before);
    }
}
