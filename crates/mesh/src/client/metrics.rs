//! Client-side metrics with go-grpc-prometheus names (`grpc_client_started_total`,
//! `grpc_client_handled_total`, `grpc_client_handling_seconds`) plus the mesh's own: retries,
//! retries the budget refused, hedges and the hedges a budget refused, attempts per endpoint,
//! ejections, and endpoints by state. Every series carries the peer.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The states `keel_mesh_endpoints` counts endpoints in.
pub(super) const ENDPOINT_STATES: [&str; 3] = ["admitted", "ejected", "not_serving"];

/// The mesh client's metrics, shared by every channel of a process.
#[derive(Debug, Clone)]
pub struct ClientMetrics {
    /// `grpc_client_started_total`, `grpc_client_handled_total`, `grpc_client_handling_seconds`.
    pub(super) calls: crate::series::CallVecs,
    pub(super) retries: IntCounterVec,
    pub(super) attempts: IntCounterVec,
    pub(super) ejections: IntCounterVec,
    pub(super) budget_exhausted: IntCounterVec,
    pub(super) hedges: IntCounterVec,
    pub(super) hedges_refused: IntCounterVec,
    pub(super) endpoints: IntGaugeVec,
    /// Whether series name an endpoint by its address (else by a stable digest of it).
    addresses: bool,
}

impl ClientMetrics {
    /// Names endpoints by their addresses in every series (off by default: `/metrics` then
    /// tells no one where the services live, and each endpoint keeps a stable label of its own).
    #[must_use]
    pub fn naming_addresses(mut self, addresses: bool) -> Self {
        self.addresses = addresses;
        self
    }

    /// Every series of `peer` at zero from the start: a process that never admitted an endpoint
    /// of it reads "0 admitted" (and alerts), not nothing.
    pub(super) fn announce_peer(&self, peer: &str) {
        self.budget_exhausted.with_label_values(&[peer]);
        for state in ENDPOINT_STATES {
            self.endpoints.with_label_values(&[peer, state]);
        }
    }

    /// `peer` answered in process: one endpoint admitted for good (the process itself), so that
    /// "no endpoint admitted" still means what it says.
    pub(super) fn in_process(&self, peer: &str) {
        self.endpoints.with_label_values(&[peer, "admitted"]).set(1);
    }

    /// The `endpoint` label of `address`.
    fn endpoint_label(&self, address: std::net::SocketAddr) -> String {
        if self.addresses {
            address.to_string()
        } else {
            endpoint_digest(address)
        }
    }

    /// Creates the metrics and registers them with `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let call = ["peer", "grpc_service", "grpc_method"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(counter)
        };
        let handling = HistogramVec::new(
            HistogramOpts::new(
                "grpc_client_handling_seconds",
                "RPC latency seen by the client, retries included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &call,
        )?;
        registry.register(Box::new(handling.clone()))?;
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "keel_mesh_endpoints",
                "Endpoints by state: admitted, ejected, not_serving.",
            ),
            &["peer", "state"],
        )?;
        registry.register(Box::new(endpoints.clone()))?;
        Ok(Self {
            calls: crate::series::CallVecs {
                started: counter(
                    "grpc_client_started_total",
                    "RPCs started by the client.",
                    &call,
                )?,
                handled: counter(
                    "grpc_client_handled_total",
                    "RPCs completed by the client, by code.",
                    &["peer", "grpc_service", "grpc_method", "grpc_code"],
                )?,
                handling,
            },
            retries: counter(
                "keel_mesh_retries_total",
                "Retried attempts, by method.",
                &call,
            )?,
            attempts: counter(
                "keel_mesh_endpoint_attempts_total",
                "Attempts sent to each endpoint, by outcome (ok, failed, refused for overload).",
                &["peer", "endpoint", "outcome"],
            )?,
            ejections: counter(
                "keel_mesh_ejections_total",
                "Endpoints ejected for consecutive failures.",
                &["peer", "endpoint"],
            )?,
            budget_exhausted: counter(
                "keel_mesh_retry_budget_exhausted_total",
                "Retries not sent because the peer's retry budget was spent.",
                &["peer"],
            )?,
            hedges: counter(
                "keel_mesh_hedges_total",
                "Second attempts sent to another endpoint because the first was slower than the \
                 method's recent p95, by method.",
                &call,
            )?,
            hedges_refused: counter(
                "keel_mesh_hedges_refused_total",
                "Hedges not sent though the first attempt was slower than the method's recent \
                 p95, by method and by the budget that refused them: hedge (hedges' own share of \
                 calls) or retry (the peer's retry budget, which hedges share).",
                &["peer", "grpc_service", "grpc_method", "budget"],
            )?,
            endpoints,
            addresses: false,
        })
    }
}

/// The label an endpoint has in `/metrics` unless addresses were asked for: `ep-` and eight hex
/// digits of a digest of its address (FNV-1a, the same in every process and after restarts).
pub fn endpoint_digest(address: std::net::SocketAddr) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    address.hash(&mut hash);
    format!("ep-{:08x}", hash.finish() as u32)
}

/// FNV-1a, for labels that must be the same in every process.
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// One endpoint's series.
#[derive(Debug, Clone)]
pub(super) struct EndpointMetrics {
    metrics: ClientMetrics,
    peer: String,
    endpoint: String,
}

impl EndpointMetrics {
    pub(super) fn new(
        metrics: Option<&ClientMetrics>,
        peer: &str,
        endpoint: std::net::SocketAddr,
    ) -> Option<Self> {
        metrics.map(|metrics| {
            let endpoint = metrics.endpoint_label(endpoint);
            // Every series reads zero from the start, so that rates and alerts see 0, not
            // nothing, before the first failure.
            for outcome in super::outlier::Attempt::ALL {
                metrics
                    .attempts
                    .with_label_values(&[peer, &endpoint, outcome.label()]);
            }
            metrics.ejections.with_label_values(&[peer, &endpoint]);
            Self {
                metrics: metrics.clone(),
                peer: peer.to_owned(),
                endpoint,
            }
        })
    }

    pub(super) fn attempt(&self, outcome: super::outlier::Attempt) {
        self.metrics
            .attempts
            .with_label_values(&[self.peer.as_str(), &self.endpoint, outcome.label()])
            .inc();
    }

    pub(super) fn ejected(&self) {
        self.metrics
            .ejections
            .with_label_values(&[self.peer.as_str(), &self.endpoint])
            .inc();
    }

    /// Moves the endpoint from one state's count to another's (`None` for "not counted").
    pub(super) fn transition(&self, from: Option<&str>, to: Option<&str>) {
        if from == to {
            return;
        }
        if let Some(from) = from {
            self.metrics
                .endpoints
                .with_label_values(&[self.peer.as_str(), from])
                .dec();
        }
        if let Some(to) = to {
            self.metrics
                .endpoints
                .with_label_values(&[self.peer.as_str(), to])
                .inc();
        }
    }
}
