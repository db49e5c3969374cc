//! Assembling a tonic server the same way for every service: one layer stack (metrics and
//! tracing, status fixes, shedding, strict limits, token verification), keepalives, and
//! reflection v1 + v1alpha.

use std::sync::Arc;
use std::time::Duration;

use keel_auth::AuthLayer;
use keel_guard::GuardLayer;
use keel_mesh::deadline::DeadlineLayer;
use keel_replicas::ConsistencyLayer;
use tonic::transport::Server;
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower::util::Either;

use crate::metrics::{GrpcMetricsLayer, GrpcServerMetrics};
use crate::quiesce::Arrivals;
use crate::shed::ShedLayer;
use crate::status_fix::StatusFixLayer;
use crate::writes::WriteLimitLayer;

/// The middleware every keel gRPC server runs, outermost first: the arrival of each call (for
/// the drain's quiet period), metrics and the request span, the status fixes, the call's
/// deadline (refused at once if shorter than the method takes, passed on to outgoing calls,
/// enforced), load shedding per service, strict limits on the RPCs that guard
/// secrets (when any are configured), bearer-token verification (when the process verifies
/// tokens), the per-caller limit on writes (when one is set), and, innermost, what each call's reads
/// must see when reads may go to PostgreSQL replicas.
pub type Layers = Stack<
    Either<ConsistencyLayer, Identity>,
    Stack<
        Either<WriteLimitLayer, Identity>,
        Stack<
            Either<AuthLayer, Identity>,
            Stack<
                Either<GuardLayer, Identity>,
                Stack<
                    ShedLayer,
                    Stack<
                        DeadlineLayer,
                        Stack<StatusFixLayer, Stack<GrpcMetricsLayer, Stack<Arrivals, Identity>>>,
                    >,
                >,
            >,
        >,
    >,
>;

/// The standard layer stack.
pub fn layers(
    arrivals: Arrivals,
    metrics: Arc<GrpcServerMetrics>,
    shed: ShedLayer,
    guard: Option<GuardLayer>,
    auth: Option<AuthLayer>,
    writes: Option<WriteLimitLayer>,
    consistency: Option<ConsistencyLayer>,
) -> Layers {
    ServiceBuilder::new()
        .layer(arrivals)
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        .layer(StatusFixLayer)
        .layer(DeadlineLayer::default().counted(metrics.shed.clone()))
        .layer(shed.counted(metrics.shed.clone()))
        .option_layer(guard)
        .option_layer(auth)
        .option_layer(writes)
        .option_layer(consistency)
        .into_inner()
}

/// A tonic server with keel's transport settings and `layers`, its connections closed after
/// `idle` without a byte (by the admission that hands them over).
pub fn builder(layers: Layers, idle: Duration) -> Server<Stack<Layers, Identity>> {
    // Pings three times per idle period: a connection whose streams are quiet is not idle.
    let ping = (idle / 3).max(Duration::from_millis(100));
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping.min(Duration::from_secs(10))))
        .layer(layers)
}

/// The encoded descriptor sets that the standard services (health, reflection) add to a
/// server, for metrics and reflection.
pub const STANDARD_DESCRIPTOR_SETS: &[&[u8]] = &[
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// Reflection v1 and v1alpha (grpcurl 1.8 speaks only the latter) over `descriptor_sets`,
/// listing `services` (fully-qualified names) plus health and reflection: a process lists what
/// it serves, not every service its descriptors describe.
#[allow(clippy::type_complexity)]
pub fn reflection(
    descriptor_sets: &[&'static [u8]],
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let configure = || {
        // Both reflection versions, in both services: each lists the other, so each must
        // resolve it (`buf curl --list-methods` asks v1 for v1alpha's descriptor). tonic adds only
        // a service's own version.
        let builder = descriptor_sets.iter().fold(
            tonic_reflection::server::Builder::configure()
                .include_reflection_service(false)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        );
        services
            .iter()
            .chain(&[
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ])
            .fold(builder, |builder, name| builder.with_service_name(*name))
    };
    Ok((configure().build_v1()?, configure().build_v1alpha()?))
}
