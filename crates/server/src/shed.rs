//! Server-side protection: a concurrency limit per gRPC service that follows measured latency
//! (AIMD, in the style of Netflix's concurrency-limits), with the static limit as its ceiling,
//! and admission by criticality. Above the limit, calls are refused at once with
//! RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms` instead of queueing without bound; sheddable
//! calls go first, then default ones, critical ones last. Health and reflection are never shed.
//!
//! The limit needs no probe that refuses calls (Envoy's minRTT probe does): it grows by one per
//! window of calls while latency stays within twice the lowest recently seen, and shrinks by a
//! tenth when it does not, or when calls of the window were dropped before they answered (their
//! deadline passed). The lowest latency is observed passively and forgotten slowly, so a real
//! change in the work is followed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};
use tonic::body::Body;
use tower::{Layer, Service};

use keel_mesh::criticality::{self, Criticality};
use keel_mesh::trailers::OnTrailers;

/// Calls per window of latency samples.
const WINDOW: u32 = 20;

/// Latency above this multiple of the lowest recent one means the service is queueing.
const TOLERANCE: f64 = 2.0;

/// How fast the lowest latency seen is forgotten, per window (so that it follows real change:
/// doubling takes about 700 windows).
const FLOOR_DRIFT: f64 = 1.001;

/// How a service's concurrency limit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// A fixed number of calls in flight.
    Static(usize),
    /// A limit that follows latency, from `initial`, never below `min` nor above `max`.
    Adaptive {
        /// The limit's floor.
        min: usize,
        /// Where it starts.
        initial: usize,
        /// The ceiling: the static limit.
        max: usize,
    },
}

impl Concurrency {
    /// The adaptive limit under the static ceiling `max`: from 100 (or `max`), never below 20.
    pub fn adaptive(max: usize) -> Self {
        let max = max.max(1);
        Self::Adaptive {
            min: 20.min(max),
            initial: 100.min(max),
            max,
        }
    }
}

/// The AIMD limit of one service.
#[derive(Debug)]
struct Aimd {
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
    fn new(limit: f64, min: f64, max: f64) -> Self {
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
    fn sample(&mut self, took: Duration, in_flight: usize, dropped: bool) -> Option<f64> {
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
        let queueing = dropped > WINDOW / 10 || floor.is_some_and(|f| average > TOLERANCE * f);
        self.limit = if queueing {
            (self.limit * 0.9).max(self.min)
        } else {
            (self.limit + 1.0).min(self.max)
        };
        Some(self.limit)
    }
}

/// One service's admission: calls in flight against the current limit.
#[derive(Debug)]
struct Gate {
    in_flight: AtomicUsize,
    /// The current limit, as f64 bits, for lock-free reads.
    limit: AtomicU64,
    /// The static ceiling.
    ceiling: usize,
    adaptive: Option<Mutex<Aimd>>,
    /// The most calls in flight at once since the process started.
    peak: AtomicUsize,
    gauges: Option<Gauges>,
    /// Server streams open now: they hold no place among the calls in flight, under a
    /// bound of their own.
    streams: AtomicUsize,
}

/// One service's series: its current limit and the most calls it had in flight at once.
#[derive(Debug)]
struct Gauges {
    limit: IntGauge,
    peak: IntGauge,
}

/// Where [`ShedLayer::with_gauges`] shows each service's limit and peak (labelled
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
struct Open(Arc<Gate>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotAdmitted {
    /// The service is at its limit.
    Limit,
    /// Below the limit, but too close to it for this call's criticality.
    Criticality,
}

impl Gate {
    fn limit(&self) -> f64 {
        f64::from_bits(self.limit.load(Ordering::Relaxed))
    }

    /// Admits a call of `criticality`: sheddable calls while under three quarters of the
    /// limit, default ones under the limit, critical ones up to half as much again (never past
    /// the ceiling).
    fn admit(self: &Arc<Self>, criticality: Criticality) -> Result<Ticket, NotAdmitted> {
        let limit = self.limit();
        let allowed = match criticality {
            Criticality::Sheddable => limit * 0.75,
            Criticality::Default => limit,
            Criticality::Critical => (limit * 1.5).min(self.ceiling as f64),
        };
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before as f64 >= allowed.max(1.0) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
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
            answered: false,
        })
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

    fn sampled(&self, took: Duration, in_flight: usize, dropped: bool) {
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        let limit = adaptive
            .lock()
            .expect("limit lock")
            .sample(took, in_flight, dropped);
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
struct Ticket {
    gate: Arc<Gate>,
    in_flight: usize,
    started: Instant,
    answered: bool,
}

impl Ticket {
    fn answered(&mut self) {
        self.answered = true;
        self.gate
            .sampled(self.started.elapsed(), self.in_flight, false);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.answered {
            self.gate
                .sampled(self.started.elapsed(), self.in_flight, true);
        }
        self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-service concurrency limits.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    gates: Arc<HashMap<String, Arc<Gate>>>,
    pushback: Duration,
    refused: Option<IntCounterVec>,
    /// Who may claim `critical`; without it, anyone.
    believed: Option<keel_guard::Callers>,
    /// The paths of server-streaming methods (`/package.Service/Method`).
    streaming: Arc<std::collections::HashSet<String>>,
}

impl ShedLayer {
    /// A limit set by `concurrency` for each of `services` (fully-qualified gRPC names);
    /// refused calls are told to retry after `pushback`.
    pub fn new<'a>(
        services: impl IntoIterator<Item = &'a str>,
        concurrency: Concurrency,
        pushback: Duration,
    ) -> Self {
        Self::build(services, concurrency, pushback, None)
    }

    /// As [`ShedLayer::new`], showing each service's current limit and its peak of calls in
    /// flight in `gauges`.
    pub fn with_gauges<'a>(
        services: impl IntoIterator<Item = &'a str>,
        concurrency: Concurrency,
        pushback: Duration,
        gauges: ShedGauges,
    ) -> Self {
        Self::build(services, concurrency, pushback, Some(gauges))
    }

    fn build<'a>(
        services: impl IntoIterator<Item = &'a str>,
        concurrency: Concurrency,
        pushback: Duration,
        gauges: Option<ShedGauges>,
    ) -> Self {
        let gates = services
            .into_iter()
            .map(|service| {
                let (initial, ceiling, adaptive) = match concurrency {
                    Concurrency::Static(limit) => (limit.max(1), limit.max(1), None),
                    Concurrency::Adaptive { min, initial, max } => {
                        let aimd = Aimd::new(initial as f64, min.max(1) as f64, max.max(1) as f64);
                        (initial.max(1), max.max(1), Some(Mutex::new(aimd)))
                    }
                };
                let gauges = gauges.as_ref().map(|g| Gauges {
                    limit: g.limits.with_label_values(&[service]),
                    peak: g.peaks.with_label_values(&[service]),
                });
                if let Some(gauges) = &gauges {
                    gauges.limit.set(initial as i64);
                }
                let gate = Gate {
                    in_flight: AtomicUsize::new(0),
                    limit: AtomicU64::new((initial as f64).to_bits()),
                    ceiling,
                    adaptive,
                    peak: AtomicUsize::new(0),
                    gauges,
                    streams: AtomicUsize::new(0),
                };
                (service.to_owned(), Arc::new(gate))
            })
            .collect();
        Self {
            gates: Arc::new(gates),
            pushback,
            refused: None,
            believed: None,
            streaming: Arc::default(),
        }
    }

    /// Treats the calls of `paths` (server-streaming methods) as streams: admitted under the
    /// limit like any call, but holding no place among the calls in flight once the stream is
    /// open — a watch that waits for minutes must not starve the unary calls — and bounded by
    /// [`MAX_OPEN_STREAMS`] per service instead.
    #[must_use]
    pub fn streaming(mut self, paths: impl IntoIterator<Item = String>) -> Self {
        self.streaming = Arc::new(paths.into_iter().collect());
        self
    }

    /// Believes a call's `critical` only when `callers` vouch for it (in process, a trusted
    /// proxy, mTLS): anyone else's is `default`. Asking to be shed first is believed of anyone.
    #[must_use]
    pub fn believing(mut self, callers: keel_guard::Callers) -> Self {
        self.believed = Some(callers);
        self
    }

    /// Counts refused calls in `refused`, labelled `grpc_service`, `grpc_method` and `reason`
    /// (`limit`, `criticality`).
    pub fn counted(mut self, refused: IntCounterVec) -> Self {
        self.refused = Some(refused);
        self
    }

    /// The current limit of `service`, if it is limited.
    pub fn limit(&self, service: &str) -> Option<f64> {
        self.gates.get(service).map(|gate| gate.limit())
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ShedLayer`].
#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

impl<S, B> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (service, method) = keel_mesh::status::split_path(request.uri().path());
        let Some(gate) = self.layer.gates.get(service) else {
            return Box::pin(self.inner.call(request));
        };
        let criticality = match criticality::of(request.headers()) {
            Criticality::Critical
                if self
                    .layer
                    .believed
                    .as_ref()
                    .is_some_and(|callers| !callers.vouched(&request)) =>
            {
                Criticality::Default
            }
            claimed => claimed,
        };
        let mut ticket = match gate.admit(criticality) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                let reason = match refusal {
                    NotAdmitted::Limit => "limit",
                    NotAdmitted::Criticality => "criticality",
                };
                if let Some(refused) = &self.layer.refused {
                    refused.with_label_values(&[service, method, reason]).inc();
                }
                let status = tonic::Status::resource_exhausted(format!(
                    "{service} is at capacity; retry after the pushback"
                ));
                let mut response = status.into_http::<Body>();
                let pushback = self.layer.pushback.as_millis().to_string();
                if let Ok(value) = HeaderValue::from_str(&pushback) {
                    response
                        .headers_mut()
                        .insert("grpc-retry-pushback-ms", value);
                }
                return Box::pin(async move { Ok(response) });
            }
        };
        let stream = if self.layer.streaming.contains(request.uri().path()) {
            let before = gate.streams.fetch_add(1, Ordering::AcqRel);
            let open = Open(gate.clone());
            if before >= MAX_OPEN_STREAMS {
                drop((open, ticket));
                let status = tonic::Status::resource_exhausted(format!(
                    "{service} holds as many open streams as it may"
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            }
            Some(open)
        } else {
            None
        };
        let future = criticality::scope(criticality, self.inner.call(request));
        Box::pin(async move {
            let response = future.await?;
            ticket.answered();
            match stream {
                // A stream gives its place back once it is open, and keeps its place among the
                // open streams until its last frame.
                Some(open) => {
                    drop(ticket);
                    Ok(response.map(|body| OnTrailers::wrap(body, move |_| drop(open))))
                }
                // A unary call holds its place until its last frame.
                None => Ok(response.map(|body| OnTrailers::wrap(body, move |_| drop(ticket)))),
            }
        })
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

    /// A plain client that claims `critical` to get past a full service gets what any caller
    /// gets; the same claim from a vouched caller (this process's gateway) is believed.
    #[tokio::test]
    async fn a_critical_claim_is_believed_only_from_a_vouched_caller() {
        use std::sync::atomic::AtomicUsize;
        let reached = Arc::new(AtomicUsize::new(0));
        let inner = tower::service_fn({
            let reached = reached.clone();
            move |_: Request<Body>| {
                reached.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<Response<Body>, std::convert::Infallible>>()
            }
        });
        let layer = ShedLayer::new(["s"], Concurrency::adaptive(1000), Duration::ZERO)
            .believing(keel_guard::Callers::default());
        let mut service = layer.layer(inner);
        let request = |critical: bool, vouched: bool| {
            let mut request = Request::builder().uri("/s/M");
            if critical {
                request = request.header(criticality::HEADER, "critical");
            }
            let mut request = request.body(Body::empty()).unwrap();
            if vouched {
                request
                    .extensions_mut()
                    .insert(keel_guard::ClientAddr([127, 0, 0, 1].into()));
            }
            request
        };
        // The service is full: its adaptive limit starts at 100.
        let held: Vec<_> = (0..100)
            .map(|_| service.call(request(false, false)))
            .collect();
        assert_eq!(reached.load(Ordering::SeqCst), 100);
        let claimed = service.call(request(true, false)).await.unwrap();
        assert_eq!(
            tonic::Status::from_header_map(claimed.headers()).map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        assert_eq!(
            reached.load(Ordering::SeqCst),
            100,
            "refused before the handler"
        );
        let _believed = service.call(request(true, true));
        assert_eq!(
            reached.load(Ordering::SeqCst),
            101,
            "a vouched critical call gets in"
        );
        drop(held);
    }
}
