//! Assembling a keel process: stores and migrations, the services asked for as one or more
//! replicas (each a gRPC server with the standard stack), the mesh channels every internal
//! client uses, the REST gateway, the admin port, and the drain that ends them in order.

mod gateway;
mod jobs;
mod migrate;
mod peers;
mod probe;
mod replica;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_auth::{KeySource, TokenVerifier};
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
use tonic::service::{Routes, RoutesBuilder};

pub use jobs::QueuedInvalidations;
pub use migrate::migrate;
pub use peers::{Peers, RemoteKeys};
pub use replica::{Replica, Stack};

use crate::config::Settings;
use crate::domain::{self, Domain, Parts};
use crate::identity::{self, LocalKeys, SigningKeys};
use crate::proto::FILE_DESCRIPTOR_SET;
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
        Ok(Self { db, cache, queue })
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
            cache: &self.cache,
            cache_metrics: &telemetry.cache,
            peers,
            signing_keys,
            limiter,
            queue: &self.queue,
            metrics: &telemetry.registry,
        }
    }

    /// The relay to Redis and the queue's metrics, until `drain` starts.
    fn spawn_queue_tasks(&self, settings: &Settings, drain: &Drain) {
        self.queue
            .spawn_relay(settings.workers.job_lease * 2, drain.started());
        self.queue
            .spawn_sampler(std::time::Duration::from_secs(5), drain.started());
    }
}

/// Starts `domains` on `listeners` (`--replicas` replicas of them, or the gateway alone when
/// there are none); drains when `shutdown` resolves or [`Running::shutdown`] is called. Returns
/// once every replica reports SERVING.
pub async fn start(
    settings: &Settings,
    domains: &[&'static Domain],
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    settings.validate()?;
    let telemetry = Telemetry::register(settings)?;
    let admission = telemetry.admission(settings);
    let served = domain::grpc_names(domains);

    let grpc_listeners = replica_listeners(listeners.grpc, settings.mesh.replicas).await?;
    let local: Vec<SocketAddr> = grpc_listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    let peers = Peers::connect(settings, domains, &local, &telemetry.client)?;
    if domains.is_empty() && peers.services().next().is_none() {
        anyhow::bail!(
            "the gateway alone needs the endpoints of at least one service ({})",
            domain::DOMAINS
                .iter()
                .map(|d| format!("--{}-endpoints", d.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (signing_keys, verifier) = token_verification(settings, domains, &peers)?;
    let limiter = Arc::new(match &settings.stores.redis_url {
        Some(url) => keel_guard::RateLimiter::redis(url, &settings.stores.redis_prefix)
            .await
            .context("connect the rate limiter to Redis")?,
        None => keel_guard::RateLimiter::local(),
    });
    // The secret with which this process's gateway vouches for the client address it forwards
    // to this process's replicas; it never leaves memory.
    let hop_secret: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();

    let process_drain = Drain::new();
    let (health, _) = Health::new(served.iter().copied(), process_drain.clone()).await;
    let stores = if domains.is_empty() {
        None
    } else {
        Some(Stores::open(settings, domains, &telemetry).await?)
    };
    let parts = stores.as_ref().map(|stores| {
        stores.parts(
            settings,
            &telemetry,
            &peers,
            signing_keys.as_ref(),
            &limiter,
        )
    });
    let verifier = checking_revocations(verifier, parts.as_ref());
    let mut replicas = Vec::new();
    let mut replica_tasks = Vec::new();
    let mut in_process = None;
    let mut workers = Vec::new();
    if let (Some(stores), Some(parts)) = (&stores, parts) {
        let routes = build_routes(&parts, domains)?;
        if settings.workers.concurrency() > 0 {
            let kinds = jobs::kinds(&parts, domains)?;
            workers
                .push(jobs::worker(settings, &stores.queue, kinds).spawn(process_drain.started()));
        }
        stores.spawn_queue_tasks(settings, &process_drain);
        let callers = keel_guard::Callers {
            proxies: settings.edge.proxies(),
            hop_secret: Some(hop_secret.clone()),
        };
        let mut stack = Stack {
            metrics: telemetry.grpc.clone(),
            verifier: verifier.clone(),
            concurrency: settings.limits.concurrency(),
            guard: settings.edge.auth_rate_limit.0.map(|quota| {
                keel_guard::GuardLayer::new(
                    domain::DOMAINS
                        .iter()
                        .flat_map(|d| d.guarded.iter().map(|m| (*m).to_owned())),
                    quota,
                    limiter.clone(),
                    callers.clone(),
                )
            }),
            writes: settings.edge.rate_limit.0.map(|quota| {
                let methods = keel_mesh::client::Methods::from_descriptors(
                    &[FILE_DESCRIPTOR_SET],
                    "request_id",
                );
                let writes = methods
                    .single_request
                    .difference(&methods.no_side_effects)
                    .cloned()
                    .collect::<Vec<_>>();
                keel_server::writes::WriteLimitLayer::new(
                    writes,
                    quota,
                    limiter.clone(),
                    callers.clone(),
                )
            }),
            callers,
            reflected: reflected(settings, &served)?,
            admission: admission.clone(),
            idle: settings.limits.idle_timeout,
            tls: settings.mesh.tls().map(|tls| tls.server()).transpose()?,
            shared_limit: None,
        };
        // Several replicas are there to be balanced over (the mesh tried in one process); one
        // is called without a socket, under the same limits as its socket.
        if settings.mesh.replicas == 1 {
            stack.shared_limit = Some(stack.limits(&served));
            in_process = Some(stack.in_process(&routes, &served));
        }
        for listener in grpc_listeners {
            let (replica, task) =
                Replica::start(&routes, &served, listener, &stack, &process_drain).await?;
            replicas.push(replica);
            replica_tasks.push(task);
        }
    }

    let gateway = gateway::build(
        settings,
        &peers,
        in_process,
        verifier,
        limiter,
        hop_secret,
        telemetry.http.clone(),
    )?;
    let http_addr = listeners.http.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let app = gateway.router(keel_server::admin::router(
        health.clone(),
        telemetry.registry.clone(),
    ));
    let rest = serve_rest(
        settings,
        listeners.http,
        admission.clone(),
        app,
        process_drain.started(),
    )?;
    let admin_stop = Arc::new(Notify::new());
    let admin = tokio::spawn(keel_server::admin::serve(
        listeners.admin,
        admission,
        keel_server::admin::router(health.clone(), telemetry.registry),
        {
            let admin_stop = admin_stop.clone();
            async move { admin_stop.notified().await }
        },
    ));

    // Stores answered (connect pinged them) and migrations ran: ready for traffic.
    let healths: Vec<Health> = std::iter::once(health.clone())
        .chain(replicas.iter().map(|r| r.health.clone()))
        .collect();
    for h in &healths {
        h.serving().await;
    }
    if let Some(keys) = &signing_keys {
        tokio::spawn(reload_keys(
            keys.clone(),
            settings.identity.signing_key_reload,
            process_drain.clone(),
        ));
    }
    if let Some(url) = &settings.stores.redis_url {
        tokio::spawn(probe::redis(
            url.clone(),
            healths.clone(),
            telemetry.redis_up.clone(),
            process_drain.clone(),
            settings.operations.health_probe_interval,
        ));
    }
    if let Some(stores) = &stores {
        tokio::spawn(probe::database(
            stores.db.clone(),
            healths,
            process_drain.clone(),
            settings.operations.health_probe_interval,
        ));
    }

    let stop = Arc::new(Notify::new());
    tokio::spawn(drain_on(
        shutdown,
        stop.clone(),
        health,
        replicas.clone(),
        process_drain.clone(),
    ));
    let grace = settings.operations.shutdown_grace;
    let task = tokio::spawn(async move {
        let all = async move {
            let (grpc, rest, workers) = tokio::join!(
                futures::future::join_all(replica_tasks),
                rest,
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
        let ended = keel_server::drain::bounded(all, &process_drain, grace).await?;
        admin_stop.notify_one();
        let _ = admin.await;
        if let Some(stores) = stores {
            let _ = stores.db.close().await;
        }
        tracing::info!(?ended, "stopped");
        Ok(ended)
    });

    Ok(Running {
        replicas,
        http_addr,
        admin_addr,
        peers,
        stop,
        task,
    })
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

/// The REST port: plaintext (HTTP/1.1 and h2c), or HTTPS with HTTP/2 and HTTP/1.1 by ALPN
/// when a certificate is configured; until `stopped`.
fn serve_rest(
    settings: &Settings,
    listener: TcpListener,
    admission: Arc<keel_server::conn::Admission>,
    app: axum::Router,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<futures::future::BoxFuture<'static, std::io::Result<()>>> {
    use axum::serve::ListenerExt as _;
    use futures::FutureExt as _;
    // Without TCP_NODELAY an HTTP/2 response (HEADERS, then DATA) waits out the client's
    // delayed ACK: 40 ms at p50 for a list, where HTTP/1.1 writes both at once.
    let nodelay = |tcp: &tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on a REST connection");
        }
    };
    let edge = &settings.edge;
    let (Some(cert), Some(key)) = (&edge.http_tls_cert, &edge.http_tls_key) else {
        // Admitted first; the tap outermost, which is what gives axum the peer's address.
        let listener = keel_server::conn::AdmittedListener::new(listener, admission)
            .tap_io(move |kept| nodelay(kept.get_ref()));
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        return Ok(axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .into_future()
            .boxed());
    };
    let config = keel_gateway::tls::server_config(cert, key).context("the REST certificate")?;
    let listener = keel_gateway::tls::TlsListener::new(listener, config)?;
    let listener = keel_server::conn::AdmittedListener::new(listener, admission)
        .tap_io(move |kept| nodelay(kept.get_ref().get_ref().0));
    let app = app
        .layer(axum::Extension(keel_gateway::tls::ServedOverTls))
        .into_make_service_with_connect_info::<SocketAddr>();
    Ok(axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .into_future()
        .boxed())
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

/// How this process verifies access tokens, and the keys it signs them with when it does: identity
/// signs them here, or publishes its key set at its endpoints; without either (development),
/// the signing key file or the development key verifies them.
fn token_verification(
    settings: &Settings,
    domains: &[&Domain],
    peers: &Peers,
) -> anyhow::Result<(Option<Arc<SigningKeys>>, TokenVerifier)> {
    let identity_here = domains.contains(&&identity::DOMAIN);
    let identity_elsewhere = settings.mesh.endpoints.get(identity::DOMAIN.name).is_some();
    let signing = if identity_here || !identity_elsewhere {
        let identity = &settings.identity;
        Some(Arc::new(match &identity.signing_key {
            Some(path) => SigningKeys::load(path)?,
            None => SigningKeys::development(&settings.stores.data_dir)?,
        }))
    } else {
        None
    };
    let source: Arc<dyn KeySource> = match &signing {
        Some(keys) => Arc::new(LocalKeys(keys.clone())),
        None => Arc::new(RemoteKeys(
            peers
                .get(identity::DOMAIN.name)
                .context("identity's channel")?
                .clone(),
        )),
    };
    Ok((
        signing,
        TokenVerifier::with_refresh(source, settings.identity.key_set_refresh),
    ))
}

/// `verifier`, also checking tokens against their subject's generation where the stores are
/// (`parts`); the gateway alone leaves that to the services it calls.
fn checking_revocations(verifier: TokenVerifier, parts: Option<&Parts<'_>>) -> Arc<TokenVerifier> {
    Arc::new(match parts {
        Some(parts) => verifier.with_revocations(Arc::new(Generations {
            cache: parts.cache(identity::GENERATIONS),
            directory: identity::Directory::new(parts.db.clone()),
        })),
        None => verifier,
    })
}

/// Token generations as identity keeps them, read through the shared cache: what makes a
/// revoked token fail in every process.
struct Generations {
    cache: keel_cache::CacheAside,
    directory: identity::Directory,
}

#[async_trait::async_trait]
impl keel_auth::Revocations for Generations {
    async fn generation(&self, subject: &str) -> Option<u64> {
        identity::generation(&self.cache, &self.directory, subject).await
    }
}

/// Reads the signing keys again every `every` until the drain starts, so that a rotated key
/// signs and a removed one is no longer published.
async fn reload_keys(keys: Arc<SigningKeys>, every: std::time::Duration, drain: Drain) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = drain.started() => return,
        }
        let keys = keys.clone();
        match tokio::task::spawn_blocking(move || keys.reload()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reload the signing keys")
            }
            Err(e) => tracing::warn!(error = %e, "signing key reload panicked"),
        }
    }
}

/// Every service of `domains`, built once and shared by the replicas.
fn build_routes(parts: &Parts<'_>, domains: &[&Domain]) -> anyhow::Result<Routes> {
    let mut routes = RoutesBuilder::default();
    for domain in domains {
        (domain.build)(parts, &mut routes).with_context(|| format!("build {}", domain.name))?;
    }
    Ok(routes.routes())
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

/// A started `keel worker`.
#[derive(Debug)]
pub struct Working {
    /// Where the admin endpoints are served.
    pub admin_addr: SocketAddr,
    /// The kinds of job it runs.
    pub kinds: Vec<String>,
    task: JoinHandle<anyhow::Result<Ended>>,
}

impl Working {
    /// Waits until it has drained (after its shutdown future resolved).
    pub async fn wait(self) -> anyhow::Result<Ended> {
        self.task.await.context("worker task panicked")?
    }
}

/// `keel worker`: the jobs of every registered service, without gRPC or REST; `admin` serves
/// health and metrics. On `shutdown` it stops claiming and lets the jobs it holds finish,
/// bounded by the grace period.
pub async fn work(
    settings: &Settings,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Working> {
    settings.validate()?;
    let telemetry = Telemetry::register(settings)?;
    let peers = Peers::connect(settings, &[], &[], &telemetry.client)?;
    // Jobs do not sign in anyone: no signing keys, and a limiter of their own.
    let limiter = Arc::new(keel_guard::RateLimiter::local());
    let stores = Stores::open(settings, domain::DOMAINS, &telemetry).await?;
    let parts = stores.parts(settings, &telemetry, &peers, None, &limiter);
    let kinds = jobs::kinds(&parts, domain::DOMAINS)?;
    let names = kinds.iter().map(|k| k.name.clone()).collect();
    let drain = Drain::new();
    let worker = jobs::worker(settings, &stores.queue, kinds).spawn(drain.started());
    stores.spawn_queue_tasks(settings, &drain);
    let (health, _) = Health::new(std::iter::empty::<&str>(), drain.clone()).await;
    health.serving().await;
    if let Some(url) = &settings.stores.redis_url {
        tokio::spawn(probe::redis(
            url.clone(),
            vec![health.clone()],
            telemetry.redis_up.clone(),
            drain.clone(),
            settings.operations.health_probe_interval,
        ));
    }
    let admin_addr = admin.local_addr()?;
    let admin_stop = Arc::new(Notify::new());
    let admin = tokio::spawn(keel_server::admin::serve(
        admin,
        telemetry.admission(settings),
        keel_server::admin::router(health.clone(), telemetry.registry),
        {
            let admin_stop = admin_stop.clone();
            async move { admin_stop.notified().await }
        },
    ));
    tokio::spawn({
        let drain = drain.clone();
        async move {
            shutdown.await;
            health.not_serving().await;
            drain.start();
        }
    });
    let grace = settings.operations.shutdown_grace;
    let task = tokio::spawn(async move {
        let running = async move { worker.await.context("worker task") };
        let ended = keel_server::drain::bounded(running, &drain, grace).await?;
        admin_stop.notify_one();
        let _ = admin.await;
        let _ = stores.db.close().await;
        tracing::info!(?ended, "worker stopped");
        Ok(ended)
    });
    Ok(Working {
        admin_addr,
        kinds: names,
        task,
    })
}
