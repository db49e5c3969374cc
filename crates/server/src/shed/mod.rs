//! Server-side protection: a concurrency limit per gRPC service that follows measured latency
//! (a gradient with a queue allowance, in the style of Netflix's Gradient2), with the static
//! limit as its ceiling, and admission by criticality. Past the limit a call waits in a line a
//! few times the limit long, for as long as its deadline allows (queueing is not overload); past
//! the line, or when its turn would come after its deadline, it is refused at once with
//! RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms` instead of queueing without bound; sheddable
//! calls go first and never wait, then default ones, critical ones last. Health and reflection
//! are never shed.
//!
//! The limit needs no probe that refuses calls (Envoy's minRTT probe does). Per window of twenty
//! calls in which at least half the limit was in use, it grows by a share of its square root (the
//! queue a busy service may keep) while latency stays within half as much again as the service's
//! pace and 2 ms more, and shrinks in proportion when latency climbs past that (but not below the
//! calls in flight the service last ran with without reaching the limit, unless the pace is past
//! what is trusted: a queue, not a pace); it shrinks too, to its minimum if need
//! be, when the calls that have a deadline take more than half of it and more than the pace, and
//! by a tenth when more than two of the twenty were dropped before they answered. The pace is the
//! long-term average latency, trusted up to eight times the lowest recent one: not the lowest ever
//! seen, since a real service is slower with more calls in flight long before its cores are full.
//! After a warm-up of ten windows, it takes in latency only at as many calls in flight as the
//! service last ran with without reaching the limit (or the limit's minimum): a queue the limit
//! itself lets grow is not accepted as the new pace. A call's time in line is not its latency: it
//! is measured from admission.

mod gate;
mod gradient;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use prometheus::IntCounterVec;
use tonic::body::Body;
use tower::{Layer, Service};

use keel_mesh::criticality::{self, Criticality};
use keel_mesh::trailers::OnTrailers;

use gate::{Gate, Gauges, NotAdmitted, Open, Ticket};
pub use gate::{MAX_OPEN_STREAMS, ShedGauges};
use gradient::Gradient;

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
                        let gradient =
                            Gradient::new(initial as f64, min.max(1) as f64, max.max(1) as f64);
                        (initial.max(1), max.max(1), Some(gradient))
                    }
                };
                let gauges = gauges.as_ref().map(|g| Gauges {
                    limit: g.limits.with_label_values(&[service]),
                    peak: g.peaks.with_label_values(&[service]),
                });
                let gate = Gate::new(initial, ceiling, adaptive, gauges);
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
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    B: Send + 'static,
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
        let Some(gate) = self.layer.gates.get(service).cloned() else {
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
        let stream = self.layer.streaming.contains(request.uri().path());
        let (service, method) = (service.to_owned(), method.to_owned());
        let timeout = keel_mesh::deadline::timeout_of(request.headers());
        match gate.admit(criticality) {
            Ok(ticket) => match Admitted::new(&gate, ticket.allowing(timeout), stream) {
                Some(admitted) => Box::pin(admitted.call(&mut self.inner, request, criticality)),
                None => {
                    let refused = streams_full(&service);
                    Box::pin(async move { Ok(refused) })
                }
            },
            Err(NotAdmitted::Limit) => {
                // The service is full: the call waits in line, with the service that was
                // made ready for it (a clone stays behind for the next call).
                let ready = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, ready);
                let layer = self.layer.clone();
                let until = Instant::now() + gate.patience(timeout);
                Box::pin(async move {
                    let ticket = match gate.wait(criticality, until).await {
                        Ok(ticket) => ticket.allowing(timeout),
                        Err(why) => return Ok(layer.refusal(&service, &method, why)),
                    };
                    match Admitted::new(&gate, ticket, stream) {
                        Some(admitted) => admitted.call(&mut inner, request, criticality).await,
                        None => Ok(streams_full(&service)),
                    }
                })
            }
            Err(why) => {
                let refused = self.layer.refusal(&service, &method, why);
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}

/// The answer to a stream `service` has no place for.
fn streams_full(service: &str) -> Response<Body> {
    let status = tonic::Status::resource_exhausted(format!(
        "{service} holds as many open streams as it may"
    ));
    status.into_http()
}

/// A call that has its place: and, for a server stream, its place among the open streams.
struct Admitted {
    ticket: Ticket,
    open: Option<Open>,
}

impl Admitted {
    /// `ticket`'s call; a stream (`stream`) also takes a place among the gate's open streams:
    /// `None` when there is none.
    fn new(gate: &Arc<Gate>, ticket: Ticket, stream: bool) -> Option<Self> {
        if !stream {
            return Some(Self { ticket, open: None });
        }
        let before = gate.streams.fetch_add(1, Ordering::AcqRel);
        let open = Open(gate.clone());
        if before >= MAX_OPEN_STREAMS {
            drop((open, ticket));
            return None;
        }
        Some(Self {
            ticket,
            open: Some(open),
        })
    }

    /// Calls `inner`: a unary call holds its place until its last frame; a stream gives its
    /// place back once it is open and keeps its place among the open streams until its last.
    fn call<S, B>(
        self,
        inner: &mut S,
        request: Request<B>,
        criticality: Criticality,
    ) -> impl std::future::Future<Output = Result<Response<Body>, S::Error>> + Send + 'static
    where
        S: Service<Request<B>, Response = Response<Body>>,
        S::Future: Send + 'static,
    {
        let future = criticality::scope(criticality, inner.call(request));
        let Self { mut ticket, open } = self;
        async move {
            let response = future.await?;
            ticket.answered();
            Ok(match open {
                Some(open) => {
                    drop(ticket);
                    response.map(|body| OnTrailers::wrap(body, move |_| drop(open)))
                }
                None => response.map(|body| OnTrailers::wrap(body, move |_| drop(ticket))),
            })
        }
    }
}

impl ShedLayer {
    /// The answer to a call of `service`'s `method` refused for `why`, counted: RESOURCE_EXHAUSTED
    /// with the pushback.
    fn refusal(&self, service: &str, method: &str, why: NotAdmitted) -> Response<Body> {
        let reason = match why {
            NotAdmitted::Limit => "limit",
            NotAdmitted::Criticality => "criticality",
            NotAdmitted::Line => "line",
        };
        if let Some(refused) = &self.refused {
            refused.with_label_values(&[service, method, reason]).inc();
        }
        let status = tonic::Status::resource_exhausted(format!(
            "{service} is at capacity; retry after the pushback"
        ));
        let mut response = status.into_http::<Body>();
        let pushback = self.pushback.as_millis().to_string();
        if let Ok(value) = HeaderValue::from_str(&pushback) {
            response
                .headers_mut()
                .insert("grpc-retry-pushback-ms", value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                // A deadline too short to wait for a place.
                request = request
                    .header(criticality::HEADER, "critical")
                    .header("grpc-timeout", "1u");
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
