//! The client side of the mesh: one cloneable channel per peer service that resolves its
//! endpoints, watches each endpoint's gRPC health, and balances calls over the healthy ones
//! with power of two choices over PeakEWMA (tower's `ReadyCache` and `PeakEwma`; a retry is
//! steered away from the endpoints its call already tried; an endpoint that pushes back leaves
//! the pick for its pushback and weighs heaviest after it).
//! Around the balancer: deadlines carried from the incoming call, retries of the calls that are
//! safe to send again within a budget, hedged reads (optional), outlier ejection, fail-fast when no endpoint serves, mTLS
//! and metrics. A service of the caller's own process is called in process (`in_process`):
//! the same deadlines, retries and metrics, without the socket.

mod balance;
mod endpoints;
mod failure;
mod hedge;
mod in_process;
mod keyed;
mod methods;
mod metrics;
mod outlier;
mod pushback;
mod retry;
mod target;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tonic::body::Body;
use tower::BoxError;
use tower::ServiceExt as _;
use tower::buffer::Buffer;
use tower::util::BoxCloneSyncService;

pub use hedge::Hedging;
pub use in_process::{Answering, Served, in_process};
pub use methods::Methods;
pub use metrics::{ClientMetrics, endpoint_digest};
pub use outlier::Ejection;
pub use target::{Resolver, Target, TargetError};

use balance::{Elsewhere, Tried};

/// A balanced channel to every healthy endpoint of one service; clone it freely.
pub type MeshChannel = BoxCloneSyncService<Request<Body>, Response<Body>, MeshError>;

/// A failure below gRPC: the balancer or a connection gave up. tonic reports it as a status.
#[derive(Debug)]
pub struct MeshError(pub BoxError);

impl std::fmt::Display for MeshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mesh: {}", self.0)
    }
}

impl std::error::Error for MeshError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// How a mesh channel finds, watches and weighs its endpoints.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The peer's name in metrics and logs (`catalog`).
    pub peer: String,
    /// Where to count calls, attempts and ejections.
    pub metrics: Option<ClientMetrics>,
    /// The gRPC service name whose health each endpoint reports (`""` for the whole server).
    pub health_service: String,
    /// How often the target is resolved again.
    pub resolve_interval: Duration,
    /// How long a lookup is waited for before a fresh one starts beside it (the wait doubling
    /// for each further one, up to four times this; four lookups, then the resolution gives
    /// up): a lost answer does not hold discovery back, and a DNS that is always slow is still
    /// heard.
    pub resolve_patience: Duration,
    /// Connection timeout per endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 connections to each endpoint; calls to an endpoint take them in turn.
    pub connections_per_endpoint: usize,
    /// HTTP/2 keepalive ping interval.
    pub keepalive: Duration,
    /// First and longest wait before watching an endpoint's health again after it broke.
    pub backoff: (Duration, Duration),
    /// PeakEWMA's assumed round-trip time for an endpoint with no history.
    pub default_rtt: Duration,
    /// PeakEWMA's decay window.
    pub decay: Duration,
    /// Requests queued for the balancer before callers wait.
    pub buffer: usize,
    /// Which methods may be sent again, and why (see [`Methods::from_descriptors`]).
    pub methods: Methods,
    /// When a failing endpoint leaves the balancer, and for how long.
    pub ejection: Ejection,
    /// The deadline of calls made outside any incoming call's deadline.
    pub default_timeout: Option<Duration>,
    /// mTLS to every endpoint; plaintext when `None`.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// How long a call waits for some endpoint to be admitted before it fails with UNAVAILABLE
    /// (Linkerd's fail-fast): a service that is down answers at once, not at the deadline.
    pub fail_fast: Duration,
    /// Hedged reads (NO_SIDE_EFFECTS methods sent again to another endpoint after their recent
    /// p95); off when `None`.
    pub hedging: Option<Hedging>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            peer: "peer".into(),
            metrics: None,
            health_service: String::new(),
            resolve_interval: Duration::from_secs(5),
            resolve_patience: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            connections_per_endpoint: 1,
            keepalive: Duration::from_secs(20),
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            buffer: 1024,
            methods: Methods::default(),
            ejection: Ejection::default(),
            default_timeout: Some(Duration::from_secs(10)),
            tls: None,
            fail_fast: Duration::from_secs(3),
            hedging: None,
        }
    }
}

/// A channel over the endpoints that `resolver` finds. Must be called inside a tokio runtime:
/// it spawns the discovery task and the balancer's worker, which stop when every clone of the
/// channel is dropped.
pub fn balanced(resolver: Arc<dyn Resolver>, options: ClientOptions) -> MeshChannel {
    let (changes, discovered) = endpoints::discover(resolver, options.clone());
    let (rtt, decay) = (options.default_rtt, options.decay);
    let weighed = futures::StreamExt::map(changes, move |change| {
        change.map(|change| match change {
            tower::discover::Change::Insert(addr, endpoint) => {
                let pressure = endpoint.pressure.clone();
                let weighed = pushback::Weighed::new(endpoint, pressure, rtt, decay);
                tower::discover::Change::Insert(addr, weighed)
            }
            tower::discover::Change::Remove(addr) => tower::discover::Change::Remove(addr),
        })
    });
    let balance: balance::Balance<_, Body> = balance::Balance::new(weighed);
    let balanced = Buffer::new(balance, options.buffer).map_err(MeshError);
    let policy = Arc::new(retry::RetryPolicy::new(options, discovered));
    BoxCloneSyncService::new(retry::Retrying {
        inner: balanced,
        policy,
    })
}

/// A channel for `target` (`host:port,host:port` or `dns:///name:port`).
pub fn connect(target: &str, options: ClientOptions) -> Result<MeshChannel, TargetError> {
    let target: Target = target.parse()?;
    Ok(balanced(Arc::new(target), options))
}
