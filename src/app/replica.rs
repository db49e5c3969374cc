//! One replica: a gRPC server on its own port serving the process's services with the standard
//! stack, its own health (so that it can drain alone) and its own concurrency limit (shared
//! with the gateway's in-process lane and the process's calls to itself when it is the only
//! one).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_auth::{AuthLayer, TokenVerifier};
use keel_server::metrics::GrpcServerMetrics;
use keel_server::quiesce::Arrivals;
use keel_server::server::Layers;
use keel_server::shed::ShedLayer;
use keel_server::{Drain, Health};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::ServerTlsConfig;

use crate::config::Settings;
use crate::proto::FILE_DESCRIPTOR_SET;

/// What every replica of a process shares: metrics, token verification, limits, TLS.
#[derive(Clone)]
pub struct ServerStack {
    /// gRPC server metrics of the process.
    pub metrics: Arc<GrpcServerMetrics>,
    /// Verifies bearer tokens.
    pub verifier: Arc<TokenVerifier>,
    /// How many calls in flight per service and replica are admitted.
    pub concurrency: keel_server::shed::Concurrency,
    /// The strict limit on the RPCs that guard secrets, when one is set.
    pub guard: Option<keel_guard::GuardLayer>,
    /// Who the process believes about a caller beyond its credentials.
    pub callers: keel_guard::Callers,
    /// The per-caller limit on writes over gRPC, when one is set.
    pub writes: Option<keel_server::writes::WriteLimitLayer>,
    /// The services server reflection lists (of those served; health and reflection always).
    pub reflected: Vec<&'static str>,
    /// Which connections the process holds, and for how long without a byte.
    pub admission: Arc<keel_server::conn::Admission>,
    /// How long a connection may go without a byte.
    pub idle: std::time::Duration,
    /// mTLS, when configured.
    pub tls: Option<ServerTlsConfig>,
    /// What each call's reads must see, when reads may go to PostgreSQL replicas.
    pub consistency: Option<keel_replicas::ConsistencyLayer>,
    /// With one replica, the concurrency limits it shares with the in-process lane: one
    /// budget per process, whichever way a call comes in.
    pub shared_limit: Option<ShedLayer>,
}

impl ServerStack {
    /// The stack of a process with `settings` serving `served`: its metrics and verifier, the
    /// guard and write limits over `limiter`, believing its own gateway by `hop_secret`.
    pub fn new(
        settings: &Settings,
        metrics: &Arc<GrpcServerMetrics>,
        verifier: &Arc<TokenVerifier>,
        limiter: &Arc<keel_guard::RateLimiter>,
        hop_secret: &Arc<str>,
        admission: &Arc<keel_server::conn::Admission>,
        served: &[&'static str],
    ) -> anyhow::Result<Self> {
        let callers = keel_guard::Callers {
            proxies: settings.edge.proxies(),
            hop_secret: Some(hop_secret.clone()),
        };
        Ok(Self {
            metrics: metrics.clone(),
            verifier: verifier.clone(),
            concurrency: settings.limits.concurrency(),
            guard: settings.edge.auth_rate_limit.0.map(|quota| {
                let guarded = crate::registry::DOMAINS
                    .iter()
                    .flat_map(|d| d.guarded.iter().map(|m| (*m).to_owned()));
                keel_guard::GuardLayer::new(guarded, quota, limiter.clone(), callers.clone())
            }),
            writes: settings.edge.rate_limit.0.map(|quota| {
                let writes = writes();
                keel_server::writes::WriteLimitLayer::new(
                    writes,
                    quota,
                    limiter.clone(),
                    callers.clone(),
                )
            }),
            callers,
            reflected: reflected(settings, served)?,
            admission: admission.clone(),
            idle: settings.limits.idle_timeout,
            tls: settings.mesh.tls().map(|tls| tls.server()).transpose()?,
            consistency: None,
            shared_limit: None,
        })
    }

    /// Reads through `reads`: when it has replicas, each call's reads see at least its
    /// caller's last write and the consistency token it sent.
    pub fn reading(&mut self, reads: &keel_replicas::Reads) {
        self.consistency = reads.has_replicas().then(|| {
            keel_replicas::ConsistencyLayer::new(reads.clone(), writes(), |extensions| {
                extensions
                    .get::<keel_auth::Caller>()
                    .map(|caller| caller.subject.clone())
            })
        });
    }

    /// Concurrency limits of their own for `names`.
    pub fn limits(&self, names: &[&'static str]) -> ShedLayer {
        ShedLayer::with_gauges(
            names.iter().copied(),
            self.concurrency,
            std::time::Duration::from_millis(50),
            self.metrics.gauges.clone(),
        )
        .believing(self.callers.clone())
        .streaming(keel_server::metrics::server_streaming(&[
            FILE_DESCRIPTOR_SET,
        ]))
    }

    /// The standard layers for `names`, with the shared concurrency limits or limits of their
    /// own, reporting each call's arrival to `arrivals`.
    fn layers(&self, names: &[&'static str], arrivals: Arrivals) -> Layers {
        let shed = self
            .shared_limit
            .clone()
            .unwrap_or_else(|| self.limits(names));
        keel_server::server::layers(
            arrivals,
            self.metrics.clone(),
            shed,
            self.guard.clone(),
            Some(AuthLayer::new(self.verifier.clone())),
            self.writes.clone(),
            self.consistency.clone(),
        )
    }

    /// `lane` (the process's services) behind the same layers as a replica, for this process's
    /// gateway to call without a socket: no HTTP/2 framing, no loopback, and the caller it
    /// verified passes as is.
    pub fn in_process(
        &self,
        lane: keel_gateway::lane::Lane<Routes>,
        names: &[&'static str],
    ) -> impl keel_gateway::Transport {
        tower::Layer::layer(&self.layers(names, Arrivals::default()), lane)
    }

    /// [`Self::in_process`] as what answers this process's mesh calls to its own services (a
    /// saga's to catalog and payments). It adds nothing to the request: like a call from
    /// loopback over plaintext, it is not vouched for, and the callers' tokens say who they are.
    pub fn answering_own_calls(
        &self,
        lane: keel_gateway::lane::Lane<Routes>,
        names: &[&'static str],
    ) -> keel_mesh::client::Answering {
        let stack = self.in_process(lane, names);
        tower::util::BoxCloneSyncService::new(tower::ServiceExt::map_err(
            stack,
            |error| -> tower::BoxError { error.into() },
        ))
    }
}

/// A started replica.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its health, as its Watch streams report it.
    pub health: Health,
    /// Its drain.
    pub drain: Drain,
}

impl Replica {
    /// Serves `routes` (the process's services, whose gRPC names are `names`) on `listener`
    /// until its drain or the process's `process_drain` starts; the task ends once it drained.
    /// It reports NOT_SERVING until [`Health::serving`].
    pub async fn start(
        routes: &Routes,
        names: &[&'static str],
        listener: TcpListener,
        stack: &ServerStack,
        process_drain: &Drain,
    ) -> anyhow::Result<(Self, JoinHandle<Result<(), tonic::transport::Error>>)> {
        let drain = Drain::new();
        let (health, health_service) = Health::new(names.iter().copied(), drain.clone()).await;
        let listed: Vec<&'static str> = names
            .iter()
            .copied()
            .filter(|name| stack.reflected.contains(name))
            .collect();
        let (reflection_v1, reflection_v1alpha) =
            keel_server::server::reflection(&[FILE_DESCRIPTOR_SET], &listed)
                .context("build reflection")?;
        let arrivals = Arrivals::default();
        let mut server =
            keel_server::server::builder(stack.layers(names, arrivals.clone()), stack.idle);
        if let Some(tls) = &stack.tls {
            server = server
                .tls_config(tls.clone())
                .context("mTLS server configuration")?;
        }
        let router = server
            .add_routes(routes.clone())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let addr = listener.local_addr()?;
        let stopped = {
            let (own, process) = (drain.started(), process_drain.started());
            async move {
                tokio::select! {
                    () = own => {}
                    () = process => {}
                }
            }
        };
        // At the drain the listener closes; GOAWAY follows once the callers on open
        // connections have gone quiet.
        let (incoming, shutdown) =
            keel_server::quiesce::phases(listener, stopped, arrivals, stack.admission.clone());
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown));
        Ok((
            Self {
                addr,
                health,
                drain,
            },
            task,
        ))
    }

    /// Drains it alone: NOT_SERVING first, so that watchers leave before connections close.
    pub async fn stop(&self) {
        self.health.not_serving().await;
        self.drain.start();
    }
}

/// The methods that write (one request message, not marked free of side effects): the ones the
/// per-caller write limit counts.
fn writes() -> Vec<String> {
    let methods =
        keel_mesh::client::Methods::from_descriptors(&[FILE_DESCRIPTOR_SET], "request_id");
    methods
        .single_request
        .difference(&methods.no_side_effects)
        .cloned()
        .collect()
}

/// The services of `served` that reflection lists: every one, or (in production, unless asked
/// for all) those meant for clients.
fn reflected(settings: &Settings, served: &[&'static str]) -> anyhow::Result<Vec<&'static str>> {
    if settings.operations.reflects_all() {
        return Ok(served.to_vec());
    }
    let public = keel_gateway::routed_services(FILE_DESCRIPTOR_SET)?;
    Ok(served
        .iter()
        .copied()
        .filter(|name| public.contains(*name))
        .collect())
}
