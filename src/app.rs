//! Assembling a keel process: stores and migrations, the services asked for as one or more
//! replicas (each a gRPC server with the standard stack), the mesh channels every internal
//! client uses, the REST gateway, the admin port, and the drain that ends them in order.

mod edges;
mod gateway;
mod jobs;
mod migrate;
mod probe;
mod replica;
mod tokens;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_auth::TokenVerifier;
use keel_cache::{Cache, CacheMetrics};
use keel_mesh::client::ClientMetrics;
use keel_server::drain::Ended;
use keel_server::metrics::GrpcServerMetrics;
use keel_server::{Drain, Health};
use prometheus::Registry;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::service::Routes;

pub use crate::peers::Peers;
pub use crate::store::QueuedInvalidations;
pub use migrate::migrate;
pub use replica::{Replica, ServerStack};
pub use tokens::{RemoteKeys, signs_tokens};
pub use worker::{Working, work};

use edges::Edges;
use tokens::{checking_revocations, key_set_awaited, reload_keys, token_verification};

use crate::config::Settings;
use crate::domain::{self, Domain, Parts, Services};
use crate::identity::SigningKeys;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::registry::DOMAINS;
use crate::store;

/// The sockets a process serves on, bound before start so that callers (and tests binding
/// port 0) know the addresses.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC of the first replica (further replicas bind free ports beside it); `None` for the
    /// gateway alone.
    pub grpc: Option<TcpListener>,
    /// The REST gateway.
    pub http: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `settings`; the gRPC one only when `grpc`.
    pub async fn bind(settings: &Settings, grpc: bool) -> anyhow::Result<Self> {
        let listen = &settings.listen;
        let grpc = if grpc {
            Some(
                TcpListener::bind(listen.grpc_addr)
                    .await
                    .with_context(|| format!("bind gRPC address {}", listen.grpc_addr))?,
            )
        } else {
            None
        };
        let http = TcpListener::bind(listen.http_addr)
            .await
            .with_context(|| format!("bind REST address {}", listen.http_addr))?;
        let admin = TcpListener::bind(listen.admin_addr)
            .await
            .with_context(|| format!("bind admin address {}", listen.admin_addr))?;
        Ok(Self { grpc, http, admin })
    }
}

/// A started process.
#[derive(Debug)]
pub struct Running {
    /// Its replicas, the first on the configured gRPC address (none for the gateway alone).
    pub replicas: Vec<Replica>,
    /// Where the REST gateway is served.
    pub http_addr: SocketAddr,
    /// Where the admin endpoints are served.
    pub admin_addr: SocketAddr,
    /// The services reached through the mesh, by name, with their targets.
    pub peers: Peers,
    stop: Arc<Notify>,
    task: JoinHandle<anyhow::Result<Ended>>,
}

impl Running {
    /// Where the first replica serves gRPC.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.replicas.first().map(|r| r.addr)
    }

    /// Drains (health NOT_SERVING, stop accepting, finish in-flight calls) and waits.
    pub async fn shutdown(self) -> anyhow::Result<Ended> {
        self.stop.notify_one();
        self.wait().await
    }

    /// Waits until the process has drained (after its shutdown future resolved).
    pub async fn wait(self) -> anyhow::Result<Ended> {
        self.task.await.context("server task panicked")?
    }
}

/// The metrics every part of a process registers in one registry.
struct Telemetry {
    registry: Registry,
    grpc: Arc<GrpcServerMetrics>,
    http: keel_gateway::HttpMetrics,
    client: ClientMetrics,
    cache: CacheMetrics,
    queue: keel_queue::QueueMetrics,
    db: store::DatabaseMetrics,
    redis_up: prometheus::IntGauge,
    connections_refused: prometheus::IntCounter,
}

impl Telemetry {
    /// Which connections the process's listeners hold, under its settings.
    fn admission(&self, settings: &Settings) -> Arc<keel_server::conn::Admission> {
        keel_server::conn::Admission::new(
            settings.limits.connections(settings.edge.proxies()),
            Some(self.connections_refused.clone()),
        )
    }

    fn register(settings: &Settings) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let descriptor_sets: Vec<&[u8]> = std::iter::once(FILE_DESCRIPTOR_SET)
            .chain(
                keel_server::server::STANDARD_DESCRIPTOR_SETS
                    .iter()
                    .copied(),
            )
            .collect();
        Ok(Self {
            grpc: Arc::new(GrpcServerMetrics::register(&registry, &descriptor_sets)?),
            http: keel_gateway::HttpMetrics::register(&registry)?,
            client: ClientMetrics::register(&registry)?
                .naming_addresses(settings.operations.metrics_endpoint_addresses),
            cache: CacheMetrics::register(&registry)?,
            queue: keel_queue::QueueMetrics::register(&registry)?,
            db: store::DatabaseMetrics::register(&registry)?,
            connections_refused: {
                let refused = prometheus::IntCounter::new(
                    "keel_connections_refused_total",
                    "Connections closed as they were accepted: their address, or the process, \
                     held as many as it may.",
                )?;
                registry.register(Box::new(refused.clone()))?;
                refused
            },
            redis_up: {
                let up = prometheus::IntGauge::new(
                    "keel_redis_up",
                    "1 while this process's Redis answers its probe; 0 while the process serves \
                     without it (cache reads from the database, jobs from the table) or has none.",
                )?;
                registry.register(Box::new(up.clone()))?;
                up
            },
            registry,
        })
    }
}

/// The database, cache and job queue of a process that serves services or runs jobs.
struct Stores {
    db: DatabaseConnection,
    reads: keel_replicas::Reads,
    cache: Arc<dyn Cache>,
    queue: keel_queue::Queue,
}

impl Stores {
    /// Connects them and applies the migrations of `domains`.
    async fn open(
        settings: &Settings,
        domains: &[&Domain],
        telemetry: &Telemetry,
    ) -> anyhow::Result<Self> {
        let metrics = &telemetry.queue;
        let mut db = store::connect_database(&settings.stores).await?;
        telemetry.db.observe(&mut db);
        migrate(&db, domains).await?;
        let reads = store::connect_reads(&settings.stores, &db, &telemetry.registry).await?;
        let cache =
            store::connect_cache(&settings.stores, telemetry.cache.near_hits.clone()).await?;
        let stores = &settings.stores;
        let queue = match &stores.redis_url {
            Some(url) => {
                keel_queue::Queue::streams(db.clone(), url, &stores.redis_prefix, metrics.clone())
                    .await
                    .context("connect the job queue to Redis")?
            }
            None => keel_queue::Queue::table(db.clone(), metrics.clone()),
        };
        Ok(Self {
            db,
            reads,
            cache,
            queue,
        })
    }

    /// What services and jobs are built from.
    fn parts<'a>(
        &'a self,
        settings: &'a Settings,
        telemetry: &'a Telemetry,
        peers: &'a Peers,
        signing_keys: Option<&'a Arc<SigningKeys>>,
        limiter: &'a Arc<keel_guard::RateLimiter>,
    ) -> Parts<'a> {
        Parts {
            settings,
            db: &self.db,
            reads: &self.reads,
            cache: &self.cache,
            cache_metrics: &telemetry.cache,
            peers,
            signing_keys,
            limiter,
            queue: &self.queue,
            metrics: &telemetry.registry,
        }
    }

    /// The relay to Redis, the pruner of finished jobs and the queue's metrics, until `drain`
    /// starts.
    fn spawn_queue_tasks(&self, settings: &Settings, drain: &Drain) {
        // The relay is woken by this process's writes of jobs and when the next one comes due.
        // Another process's writes reach it only if this process listens (it runs workers);
        // an API process that runs none does not, so it looks again at least every 50 ms.
        let idle = settings
            .workers
            .job_poll
            .min(std::time::Duration::from_millis(50));
        self.queue.spawn_relay(idle, drain.started());
        self.queue.spawn_pruner(
            settings.workers.retention(),
            std::time::Duration::from_secs(60),
            drain.started(),
        );
        self.queue
            .spawn_sampler(std::time::Duration::from_secs(5), drain.started());
    }
}

/// Starts `domains` on `listeners` (`--replicas` replicas of them, or the gateway alone when
/// there are none); drains when `shutdown` resolves or [`Running::shutdown`] is called. Returns
/// once every replica is up: SERVING, or (identity elsewhere) waiting for its token key set.
pub async fn start(
    settings: &Settings,
    domains: &[&'static Domain],
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    settings.validate()?;
    settings.validate_signing(signs_tokens(settings, domains))?;
    let telemetry = Telemetry::register(settings)?;
    let grpc_listeners = replica_listeners(listeners.grpc, settings.mesh.replicas).await?;
    let peers = connect_peers(settings, domains, &grpc_listeners, &telemetry)?;
    let (signing_keys, verifier) = token_verification(settings, domains, &peers)?;
    let process = Process::new(settings, &telemetry, domains).await?;
    let (health, _) = Health::new(process.served.iter().copied(), process.drain.clone()).await;
    let stores = match domains.is_empty() {
        true => None,
        false => Some(Stores::open(settings, domains, &telemetry).await?),
    };
    let parts = stores.as_ref().map(|stores| {
        let keys = signing_keys.as_ref();
        stores.parts(settings, &telemetry, &peers, keys, &process.limiter)
    });
    let verifier = checking_revocations(verifier, parts.as_ref());
    let grpc = match (&stores, &parts) {
        (Some(stores), Some(parts)) => {
            Some(Grpc::start(&process, domains, stores, parts, &verifier, grpc_listeners).await?)
        }
        _ => None,
    };
    let in_process = grpc.as_ref().and_then(|g| g.in_process(&process));
    let remote_keys = signing_keys.is_none().then(|| verifier.clone());
    let gateway = gateway::build(
        settings,
        &peers,
        in_process,
        verifier,
        process.limiter.clone(),
        process.hop_secret.clone(),
        telemetry.http.clone(),
    )?;
    let (http_addr, admin_addr) = (listeners.http.local_addr()?, listeners.admin.local_addr()?);
    let edges = Edges::start(
        &process,
        gateway,
        (listeners.http, listeners.admin),
        &health,
    )?;

    // Stores answered (connect pinged them) and migrations ran: ready for traffic, once tokens
    // can be verified.
    let replicas = grpc
        .as_ref()
        .map(|g| g.replicas.clone())
        .unwrap_or_default();
    let healths = serving(&health, &replicas, remote_keys, settings).await;
    spawn_background(&process, signing_keys.as_ref(), healths, stores.as_ref());

    let stop = Arc::new(Notify::new());
    let drain = process.drain.clone();
    tokio::spawn(drain_on(
        shutdown,
        stop.clone(),
        health,
        replicas.clone(),
        drain.clone(),
    ));
    let grace = settings.operations.shutdown_grace;
    let task = tokio::spawn(supervise(grpc, edges, stores, drain, grace));
    Ok(Running {
        replicas,
        http_addr,
        admin_addr,
        peers,
        stop,
        task,
    })
}

/// Reports the process and every replica up; when tokens are verified with the key set identity
/// publishes (`remote_keys`), they wait for that set too (at most `KEEL_KEY_SET_WAIT`). Answers
/// their healths.
async fn serving(
    health: &Health,
    replicas: &[Replica],
    remote_keys: Option<Arc<TokenVerifier>>,
    settings: &Settings,
) -> Vec<Health> {
    let healths: Vec<Health> = std::iter::once(health.clone())
        .chain(replicas.iter().map(|r| r.health.clone()))
        .collect();
    let wait = settings.identity.key_set_wait;
    let remote_keys = remote_keys.filter(|_| !wait.is_zero());
    for h in &healths {
        if remote_keys.is_some() {
            h.waiting_for(tokens::KEY_SET, true).await;
        }
        h.serving().await;
    }
    if let Some(verifier) = remote_keys {
        tokio::spawn(key_set_awaited(verifier, healths.clone(), wait));
    }
    healths
}

/// What every part of a starting process shares.
struct Process<'a> {
    settings: &'a Settings,
    telemetry: &'a Telemetry,
    /// Which connections the process holds.
    admission: Arc<keel_server::conn::Admission>,
    /// The gRPC names of the services it serves.
    served: Vec<&'static str>,
    limiter: Arc<keel_guard::RateLimiter>,
    /// How its gateway vouches for the client address it forwards to its own replicas.
    hop_secret: Arc<str>,
    /// The process's drain.
    drain: Drain,
}

impl<'a> Process<'a> {
    async fn new(
        settings: &'a Settings,
        telemetry: &'a Telemetry,
        domains: &[&'static Domain],
    ) -> anyhow::Result<Self> {
        Ok(Self {
            settings,
            admission: telemetry.admission(settings),
            telemetry,
            served: domain::grpc_names(domains),
            limiter: rate_limiter(settings).await?,
            // The secret with which this process's gateway vouches for the client address it
            // forwards to this process's replicas; it never leaves memory.
            hop_secret: uuid::Uuid::new_v4().simple().to_string().into(),
            drain: Drain::new(),
        })
    }
}

/// The mesh channels to the services this process calls; the gateway alone needs at least one.
fn connect_peers(
    settings: &Settings,
    domains: &[&'static Domain],
    grpc_listeners: &[TcpListener],
    telemetry: &Telemetry,
) -> anyhow::Result<Peers> {
    let local: Vec<SocketAddr> = grpc_listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    let all: Vec<_> = DOMAINS.iter().map(|d| d.peer()).collect();
    let served: Vec<&str> = domains.iter().map(|d| d.name).collect();
    let peers = Peers::connect(settings, &all, &served, &local, &telemetry.client)?;
    if domains.is_empty() && peers.services().next().is_none() {
        anyhow::bail!(
            "the gateway alone needs the endpoints of at least one service ({})",
            DOMAINS
                .iter()
                .map(|d| format!("--{}-endpoints", d.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(peers)
}

/// The process's rate limiter: shared in Redis, or this process's own.
async fn rate_limiter(settings: &Settings) -> anyhow::Result<Arc<keel_guard::RateLimiter>> {
    Ok(Arc::new(match &settings.stores.redis_url {
        Some(url) => keel_guard::RateLimiter::redis(url, &settings.stores.redis_prefix)
            .await
            .context("connect the rate limiter to Redis")?,
        None => keel_guard::RateLimiter::local(),
    }))
}

/// The gRPC side of a process: its services' routes behind the standard stack, the replicas
/// that serve them, and the worker that runs their jobs.
struct Grpc {
    routes: Routes,
    /// The same services' unary methods on the gateway's in-process lane.
    lane: Vec<keel_gateway::lane::Method>,
    stack: ServerStack,
    replicas: Vec<Replica>,
    tasks: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Grpc {
    /// Builds `domains` over `parts`, starts their worker and the queue's tasks, and serves
    /// them on each of `listeners` (one replica each) behind the standard stack.
    async fn start(
        process: &Process<'_>,
        domains: &[&'static Domain],
        stores: &Stores,
        parts: &Parts<'_>,
        verifier: &Arc<TokenVerifier>,
        listeners: Vec<TcpListener>,
    ) -> anyhow::Result<Self> {
        let (settings, served, drain) = (process.settings, &process.served[..], &process.drain);
        let (routes, lane) = build_services(parts, domains)?;
        let mut stack = ServerStack::new(
            settings,
            &process.telemetry.grpc,
            verifier,
            &process.limiter,
            &process.hop_secret,
            &process.admission,
            served,
        )?;
        stack.reading(&stores.reads);
        // Several replicas are there to be balanced over (the mesh tried in one process); one
        // is called without a socket, under the same limits as its socket.
        if settings.mesh.replicas == 1 {
            stack.shared_limit = Some(stack.limits(served));
        }
        // The mesh's calls to services of this process (one replica: Peers::connect) go to the
        // same stack in process, from now on.
        if parts.peers.in_process() {
            let max = settings.limits.max_message_bytes;
            let own = keel_gateway::lane::Lane::new(lane.clone(), routes.clone(), max);
            let first = parts.peers.serve(stack.answering_own_calls(own, served));
            debug_assert!(first, "a process serves its own calls once");
        }
        // The worker after that: a saga's first call finds its peers served.
        let mut workers = Vec::new();
        if settings.workers.concurrency() > 0 {
            let kinds = jobs::kinds(parts, domains)?;
            workers.push(jobs::worker(settings, &stores.queue, kinds).spawn(drain.started()));
        }
        stores.spawn_queue_tasks(settings, drain);
        let (mut replicas, mut tasks) = (Vec::new(), Vec::new());
        for listener in listeners {
            let (replica, task) = Replica::start(&routes, served, listener, &stack, drain).await?;
            replicas.push(replica);
            tasks.push(task);
        }
        Ok(Self {
            routes,
            lane,
            stack,
            replicas,
            tasks,
            workers,
        })
    }

    /// The services without a socket, for this process's gateway: only with one replica.
    fn in_process(&self, process: &Process<'_>) -> Option<impl keel_gateway::Transport> {
        (process.settings.mesh.replicas == 1).then(|| {
            let max = process.settings.limits.max_message_bytes;
            let lane = keel_gateway::lane::Lane::new(self.lane.clone(), self.routes.clone(), max);
            self.stack.in_process(lane, &process.served)
        })
    }
}

/// What runs beside the servers until the drain: the signing keys' reload, and the probes of
/// Redis and the database that every health in `healths` follows.
fn spawn_background(
    process: &Process<'_>,
    signing_keys: Option<&Arc<SigningKeys>>,
    healths: Vec<Health>,
    stores: Option<&Stores>,
) {
    let (settings, drain) = (process.settings, &process.drain);
    let every = settings.operations.health_probe_interval;
    if let Some(keys) = signing_keys {
        let reload = settings.identity.signing_key_reload;
        tokio::spawn(reload_keys(keys.clone(), reload, drain.clone()));
    }
    if let Some(url) = &settings.stores.redis_url {
        let up = process.telemetry.redis_up.clone();
        let probe = probe::redis(url.clone(), healths.clone(), up, drain.clone(), every);
        tokio::spawn(probe);
    }
    if let Some(stores) = stores {
        tokio::spawn(probe::database(
            stores.db.clone(),
            healths,
            drain.clone(),
            every,
        ));
    }
}

/// Waits for every server and worker to end once the drain started (at most `grace` more),
/// then closes the admin port and the database.
async fn supervise(
    grpc: Option<Grpc>,
    edges: Edges,
    stores: Option<Stores>,
    drain: Drain,
    grace: std::time::Duration,
) -> anyhow::Result<Ended> {
    let (tasks, workers) = grpc.map(|g| (g.tasks, g.workers)).unwrap_or_default();
    let all = async move {
        let (grpc, rest, workers) = tokio::join!(
            futures::future::join_all(tasks),
            edges.rest,
            futures::future::join_all(workers)
        );
        for served in grpc {
            served.context("replica task")?.context("gRPC server")?;
        }
        rest.context("REST gateway")?;
        for worker in workers {
            worker.context("worker task")?;
        }
        anyhow::Ok(())
    };
    let ended = keel_server::drain::bounded(all, &drain, grace).await?;
    edges.admin_stop.notify_one();
    let _ = edges.admin.await;
    if let Some(stores) = stores {
        let _ = stores.db.close().await;
    }
    tracing::info!(?ended, "stopped");
    Ok(ended)
}

/// The replicas' sockets: the first as configured, the others on free ports beside it. None
/// for the gateway alone.
async fn replica_listeners(
    first: Option<TcpListener>,
    replicas: usize,
) -> anyhow::Result<Vec<TcpListener>> {
    let Some(first) = first else {
        return Ok(Vec::new());
    };
    let ip = first.local_addr()?.ip();
    let mut listeners = vec![first];
    for _ in 1..replicas {
        listeners.push(
            TcpListener::bind((ip, 0))
                .await
                .context("bind a replica's gRPC port")?,
        );
    }
    Ok(listeners)
}

/// Every service of `domains`, built once and shared by the replicas and the in-process lane.
fn build_services(
    parts: &Parts<'_>,
    domains: &[&Domain],
) -> anyhow::Result<(Routes, Vec<keel_gateway::lane::Method>)> {
    let mut services = Services::default();
    for domain in domains {
        (domain.build)(parts, &mut services).with_context(|| format!("build {}", domain.name))?;
    }
    Ok(services.finish())
}

/// Waits for `shutdown` or `stop`, then drains in order: watchers hear NOT_SERVING before
/// connections are told to go away.
async fn drain_on(
    shutdown: impl Future<Output = ()>,
    stop: Arc<Notify>,
    health: Health,
    replicas: Vec<Replica>,
    drain: Drain,
) {
    tokio::select! {
        () = shutdown => {}
        () = stop.notified() => {}
    }
    health.not_serving().await;
    for replica in &replicas {
        replica.stop().await;
    }
    drain.start();
}
