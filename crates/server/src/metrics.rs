//! Server-side gRPC metrics with go-grpc-prometheus names, and the request span that carries the
//! caller's W3C trace context.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use prost::Message as _;
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument as _;

use keel_mesh::series::{CallSeries, CallVecs};
use keel_mesh::status::{grpc_status, split_path};
use keel_mesh::trailers::OnTrailers;

/// Latency buckets in seconds: sub-millisecond cache hits up to slow writes.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `grpc_server_started_total`, `grpc_server_handled_total` and `grpc_server_handling_seconds`,
/// labelled like go-grpc-prometheus (`grpc_type`, `grpc_service`, `grpc_method`, `grpc_code`).
#[derive(Debug)]
pub struct GrpcServerMetrics {
    calls: CallVecs,
    /// `keel_server_shed_total`: calls refused before their handler ran, by reason.
    pub shed: IntCounterVec,
    /// `keel_server_concurrency_limit` and `keel_server_peak_in_flight`: each service's
    /// current concurrency limit, and the most calls it had in flight at once.
    pub gauges: crate::shed::ShedGauges,
    /// Each method's series by path, resolved once: a call records without building a label.
    methods: HashMap<String, Arc<CallSeries>>,
    /// The series of every path no descriptor names, made when one is first called.
    unknown: OnceLock<Arc<CallSeries>>,
}

impl GrpcServerMetrics {
    /// Registers the metrics; `descriptor_sets` (encoded `FileDescriptorSet`s) tell each
    /// method's `grpc_type` (unary, server_stream, client_stream, bidi_stream).
    pub fn register(registry: &Registry, descriptor_sets: &[&[u8]]) -> prometheus::Result<Self> {
        let calls = call_vecs(registry)?;
        let shed = IntCounterVec::new(
            Opts::new(
                "keel_server_shed_total",
                "Calls refused before their handler ran, by reason: limit (too many in flight), \
                 criticality (too close to the limit for the call's criticality), deadline \
                 (shorter than the method takes).",
            ),
            &["grpc_service", "grpc_method", "reason"],
        )?;
        let limits = IntGaugeVec::new(
            Opts::new(
                "keel_server_concurrency_limit",
                "Each service's current concurrency limit (adaptive, or the static one).",
            ),
            &["grpc_service"],
        )?;
        let peaks = IntGaugeVec::new(
            Opts::new(
                "keel_server_peak_in_flight",
                "The most calls each service had in flight at once since the process started.",
            ),
            &["grpc_service"],
        )?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(limits.clone()))?;
        registry.register(Box::new(peaks.clone()))?;
        let kinds = method_kinds(descriptor_sets);
        // Every method's refusals read zero from the start.
        for path in kinds.keys() {
            let (service, method) = split_path(path);
            for reason in ["limit", "criticality", "line", "deadline"] {
                shed.with_label_values(&[service, method, reason]);
            }
        }
        let methods = kinds
            .into_iter()
            .map(|(path, kind)| {
                let (service, method) = split_path(&path);
                let series = CallSeries::new(&calls, [kind, service, method]);
                (path, Arc::new(series))
            })
            .collect();
        Ok(Self {
            calls,
            shed,
            gauges: crate::shed::ShedGauges { limits, peaks },
            methods,
            unknown: OnceLock::new(),
        })
    }

    /// The series of a path no descriptor names.
    fn unknown(&self) -> &Arc<CallSeries> {
        self.unknown.get_or_init(|| {
            Arc::new(CallSeries::new(
                &self.calls,
                ["unary", "unknown", "unknown"],
            ))
        })
    }
}

/// `grpc_server_started_total`, `grpc_server_handled_total` and `grpc_server_handling_seconds`,
/// registered with `registry`.
fn call_vecs(registry: &Registry) -> prometheus::Result<CallVecs> {
    let started = IntCounterVec::new(
        Opts::new(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
        ),
        &["grpc_type", "grpc_service", "grpc_method"],
    )?;
    let handled = IntCounterVec::new(
        Opts::new(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
        ),
        &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    )?;
    let handling = HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            )
            .buckets(BUCKETS.to_vec()),
            &["grpc_type", "grpc_service", "grpc_method"],
        )?;
    registry.register(Box::new(started.clone()))?;
    registry.register(Box::new(handled.clone()))?;
    registry.register(Box::new(handling.clone()))?;
    Ok(CallVecs {
        started,
        handled,
        handling,
    })
}

/// The paths (`/package.Service/Method`) of the server-streaming methods `descriptor_sets`
/// describe.
pub fn server_streaming(descriptor_sets: &[&[u8]]) -> Vec<String> {
    method_kinds(descriptor_sets)
        .into_iter()
        .filter(|(_, kind)| *kind == "server_stream")
        .map(|(path, _)| path)
        .collect()
}

fn method_kinds(descriptor_sets: &[&[u8]]) -> HashMap<String, &'static str> {
    let mut kinds = HashMap::new();
    for bytes in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
            continue;
        };
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => "unary",
                        (false, true) => "server_stream",
                        (true, false) => "client_stream",
                        (true, true) => "bidi_stream",
                    };
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    kinds.insert(path, kind);
                }
            }
        }
    }
    kinds
}

/// Counts, times and traces every call.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcServerMetrics>,
}

impl GrpcMetricsLayer {
    /// A layer that records into `metrics`.
    pub fn new(metrics: Arc<GrpcServerMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcServerMetrics>,
}

impl<S, B> Service<Request<B>> for GrpcMetricsService<S>
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
        let path = request.uri().path();
        // A path no descriptor names is no method: it is labelled `unknown` (an anonymous
        // caller must not mint series) and refused here, before any per-method state.
        let known = self.metrics.methods.get(path);
        let series = match known {
            Some(series) => series.clone(),
            None => self.metrics.unknown().clone(),
        };
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %series.labels()[1],
            rpc.method = %series.labels()[2],
            rpc.grpc.status_code = tracing::field::Empty,
        );
        crate::telemetry::set_remote_parent(&span, request.headers());
        series.start();
        let observation = Observation {
            series,
            start: Instant::now(),
            span: span.clone(),
            finished: false,
        };
        if known.is_none() {
            let status = tonic::Status::unimplemented("no such method");
            return Box::pin(async move { Ok(observe(status.into_http(), observation)) });
        }
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let response = future.await?;
                Ok(observe(response, observation))
            }
            .instrument(span),
        )
    }
}

fn observe(response: Response<Body>, mut observation: Observation) -> Response<Body> {
    // Trailers-only responses (most errors) carry the status in the headers.
    if let Some(code) = grpc_status(response.headers()) {
        observation.finish(code);
        return response;
    }
    response.map(|body| {
        // Dropped before its end (the client went away): the observation's drop records it.
        OnTrailers::wrap(body, move |trailers| {
            observation.finish(
                trailers
                    .and_then(|t| grpc_status(t))
                    .unwrap_or(Code::Unknown),
            );
        })
    })
}

struct Observation {
    series: Arc<CallSeries>,
    start: Instant,
    span: tracing::Span,
    finished: bool,
}

impl Observation {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.series.finish(code, self.start.elapsed());
        self.span.record("rpc.grpc.status_code", code as i32);
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        // The response body was dropped before its trailers: the client went away.
        self.finish(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/keel.identity.v1.IdentityService/GetUser"),
            ("keel.identity.v1.IdentityService", "GetUser")
        );
        assert_eq!(split_path("/weird"), ("weird", ""));
    }

    #[test]
    fn method_kinds_come_from_descriptors() {
        let kinds = method_kinds(&[tonic_health::pb::FILE_DESCRIPTOR_SET]);
        assert_eq!(kinds["/grpc.health.v1.Health/Check"], "unary");
        assert_eq!(kinds["/grpc.health.v1.Health/Watch"], "server_stream");
    }
}
