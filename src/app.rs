//! Assembling a keel process: stores and migrations, the services asked for as one or more
//! replicas (each a gRPC server with the standard stack), the mesh channels every internal
//! client uses, the REST gateway, the admin port, and the drain that ends them in order.

mod gateway;
mod peers;
mod replica;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_cache::{CacheAside, CacheMetrics};
use keel_mesh::auth::{KeySource, TokenVerifier};
use keel_mesh::client::ClientMetrics;
use keel_mesh::drain::Ended;
use keel_mesh::metrics::GrpcServerMetrics;
use keel_mesh::{Drain, Health};
use prometheus::Registry;
use sea_orm::DatabaseConnection;
use sea_orm_migration::MigratorTrait as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub use peers::{Peers, RemoteKeys};
pub use replica::{Replica, Services, Stack};

use crate::config::{Environment, ServiceName, Settings};
use crate::identity::{self, IdentityConfig, IdentityService, LocalKeys, SigningKeys};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::{catalog, payments, store, todos};

impl ServiceName {
    /// The fully-qualified gRPC services it serves, as health and reflection report them; the
    /// first is the one its health is watched under.
    pub fn grpc_names(self) -> &'static [&'static str] {
        match self {
            ServiceName::Identity => &[identity::SERVICE_NAME],
            ServiceName::Todos => &[todos::SERVICE_NAME],
            ServiceName::Catalog => &[catalog::SERVICE_NAME, catalog::INVENTORY_SERVICE_NAME],
            ServiceName::Payments => &[payments::SERVICE_NAME, payments::LEDGER_SERVICE_NAME],
        }
    }
}

/// Every gRPC service name of `services`.
pub fn grpc_names(services: &[ServiceName]) -> Vec<&'static str> {
    services
        .iter()
        .flat_map(|s| s.grpc_names().iter().copied())
        .collect()
}

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
        let grpc = if grpc {
            Some(
                TcpListener::bind(settings.grpc_addr)
                    .await
                    .with_context(|| format!("bind gRPC address {}", settings.grpc_addr))?,
            )
        } else {
            None
        };
        let http = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("bind REST address {}", settings.http_addr))?;
        let admin = TcpListener::bind(settings.admin_addr)
            .await
            .with_context(|| format!("bind admin address {}", settings.admin_addr))?;
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

/// Any fixed number: the PostgreSQL advisory lock that keel's migrations take.
const MIGRATION_LOCK: i64 = 0x006b_6565_6c6d_6967; // "keelmig" in ASCII

/// Applies the migrations of `services`. On PostgreSQL they run in one transaction that first
/// takes an advisory lock, so that processes starting together (the replicas of a Deployment)
/// take turns: the first applies them, the others find them applied; and a failure leaves the
/// schema as it was. On the embedded SQLite, processes sharing a data dir should not start
/// together on a fresh file: `keel migrate` first (the README's multi-process walkthrough does).
pub async fn migrate(db: &DatabaseConnection, services: &[ServiceName]) -> anyhow::Result<()> {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return apply_migrations(db, services).await;
    }
    let transaction = db.begin().await.context("begin the migrations")?;
    transaction
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        .await
        .context("take the migration lock")?;
    apply_migrations(&transaction, services).await?;
    transaction.commit().await.context("commit the migrations")
}

async fn apply_migrations<'c, C>(db: C, services: &[ServiceName]) -> anyhow::Result<()>
where
    C: sea_orm_migration::IntoSchemaManagerConnection<'c> + Copy,
{
    for service in services {
        match service {
            ServiceName::Identity => identity::Migrator::up(db, None).await,
            ServiceName::Todos => todos::Migrator::up(db, None).await,
            ServiceName::Catalog => catalog::Migrator::up(db, None).await,
            ServiceName::Payments => payments::Migrator::up(db, None).await,
        }
        .with_context(|| format!("migrate {service:?}"))?;
    }
    Ok(())
}

/// The signing keys: the provisioned file, else the development key under the data dir.
fn signing_keys(settings: &Settings) -> anyhow::Result<Arc<SigningKeys>> {
    Ok(Arc::new(match &settings.signing_key {
        Some(path) => SigningKeys::load(path)?,
        None => SigningKeys::development(&settings.data_dir)?,
    }))
}

/// The domain services of `services` over the stores.
fn build_services(
    settings: &Settings,
    services: &[ServiceName],
    db: &DatabaseConnection,
    cache: &Arc<dyn keel_cache::Cache>,
    cache_metrics: &CacheMetrics,
    keys: Option<&Arc<SigningKeys>>,
) -> anyhow::Result<Services> {
    let cached = |name: &'static str| {
        CacheAside::new(
            cache.clone(),
            name,
            settings.cache_ttl,
            cache_metrics.clone(),
        )
    };
    let identity = match keys {
        Some(keys) if services.contains(&ServiceName::Identity) => {
            // Half the cores by default: argon2 may take that much CPU, the rest stays for reads.
            let hashes = settings.max_concurrent_hashes.unwrap_or_else(|| {
                let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
                (cores / 2).max(1)
            });
            Some(IdentityService::new(
                identity::Directory::new(db.clone()),
                identity::Passwords::new(hashes)?,
                keys.clone(),
                cached("identity.users"),
                IdentityConfig {
                    access_token_ttl: settings.access_token_ttl,
                    refresh_token_ttl: settings.refresh_token_ttl,
                    admin_emails: settings
                        .admin_emails
                        .iter()
                        .map(|e| e.trim().to_lowercase())
                        .collect(),
                },
            ))
        }
        _ => None,
    };
    Ok(Services {
        identity,
        todos: services.contains(&ServiceName::Todos).then(|| {
            todos::TodoService::new(
                todos::TodoStore::new(db.clone()),
                cached("todos.todo"),
                cached("todos.first_page"),
            )
        }),
        catalog: services.contains(&ServiceName::Catalog).then(|| {
            catalog::CatalogService::new(
                catalog::ProductStore::new(db.clone()),
                catalog::Inventory::new(db.clone()),
                cached("catalog.product"),
            )
        }),
        payments: services.contains(&ServiceName::Payments).then(|| {
            payments::PaymentService::new(
                payments::Ledger::new(db.clone(), settings.wallet_currency.clone()),
                settings.environment == Environment::Development,
            )
        }),
    })
}

/// Starts `services` on `listeners` (`settings.replicas` replicas of them, or the gateway
/// alone when there are none); drains when `shutdown` resolves or [`Running::shutdown`] is
/// called. Returns once every replica reports SERVING.
pub async fn start(
    settings: &Settings,
    services: &[ServiceName],
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    settings.validate()?;
    let registry = Registry::new();
    let served = grpc_names(services);
    let descriptor_sets: Vec<&[u8]> = std::iter::once(FILE_DESCRIPTOR_SET)
        .chain(keel_mesh::server::STANDARD_DESCRIPTOR_SETS.iter().copied())
        .collect();
    let grpc_metrics = Arc::new(GrpcServerMetrics::register(&registry, &descriptor_sets)?);
    let http_metrics = keel_gateway::HttpMetrics::register(&registry)?;
    let client_metrics = ClientMetrics::register(&registry)?;

    // The replicas' sockets: the first as configured, the others on free ports beside it.
    let mut grpc_listeners = Vec::new();
    if !services.is_empty() {
        let first = listeners.grpc.context("services need a gRPC listener")?;
        let ip = first.local_addr()?.ip();
        grpc_listeners.push(first);
        for _ in 1..settings.replicas {
            grpc_listeners.push(
                TcpListener::bind((ip, 0))
                    .await
                    .context("bind a replica's gRPC port")?,
            );
        }
    }
    let local: Vec<SocketAddr> = grpc_listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    let peers = Peers::connect(settings, services, &local, &client_metrics)?;
    if services.is_empty() && peers.services().next().is_none() {
        anyhow::bail!(
            "the gateway alone needs the endpoints of at least one service (--identity-endpoints, --todos-endpoints, --catalog-endpoints, --payments-endpoints)"
        );
    }

    // Tokens: identity signs them here, or publishes its key set at its endpoints; without
    // either (development), the signing key file or the development key verifies them.
    let signing = if services.contains(&ServiceName::Identity)
        || settings.endpoints(ServiceName::Identity).is_none()
    {
        Some(signing_keys(settings)?)
    } else {
        None
    };
    let key_source: Arc<dyn KeySource> = match &signing {
        Some(keys) => Arc::new(LocalKeys(keys.clone())),
        None => Arc::new(RemoteKeys(
            peers
                .get(ServiceName::Identity)
                .context("identity's channel")?
                .clone(),
        )),
    };
    let verifier = Arc::new(TokenVerifier::new(key_source));

    let process_drain = Drain::new();
    let (health, _) = Health::new(served.iter().copied(), process_drain.clone()).await;
    let stores = if services.is_empty() {
        None
    } else {
        let db = store::connect_database(settings).await?;
        migrate(&db, services).await?;
        let cache = store::connect_cache(settings).await?;
        Some((db, cache))
    };
    let mut replicas = Vec::new();
    let mut replica_tasks = Vec::new();
    if let Some((db, cache)) = &stores {
        let cache_metrics = CacheMetrics::register(&registry)?;
        let built = build_services(
            settings,
            services,
            db,
            cache,
            &cache_metrics,
            signing.as_ref(),
        )?;
        let stack = Stack {
            metrics: grpc_metrics,
            verifier: verifier.clone(),
            max_concurrent_calls: settings.max_concurrent_calls,
            max_message_bytes: settings.max_message_bytes,
            tls: settings.tls().map(|tls| tls.server()).transpose()?,
        };
        for listener in grpc_listeners {
            let (replica, task) =
                Replica::start(&built, &served, listener, &stack, &process_drain).await?;
            replicas.push(replica);
            replica_tasks.push(task);
        }
    }

    let gateway = gateway::build(settings, &peers, verifier.clone(), http_metrics).await?;
    let http_addr = listeners.http.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let rest = axum::serve(
        listeners.http,
        gateway
            .router(keel_mesh::admin::router(health.clone(), registry.clone()))
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(process_drain.started());

    let admin_stop = Arc::new(Notify::new());
    let admin = tokio::spawn(keel_mesh::admin::serve(
        listeners.admin,
        keel_mesh::admin::router(health.clone(), registry),
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
    if let Some((db, _)) = &stores {
        tokio::spawn(probe_database(
            db.clone(),
            healths,
            process_drain.clone(),
            settings.health_probe_interval,
        ));
    }

    let stop = Arc::new(Notify::new());
    tokio::spawn({
        let (health, drain, stop) = (health.clone(), process_drain.clone(), stop.clone());
        let replicas = replicas.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = stop.notified() => {}
            }
            // Order matters: watchers hear NOT_SERVING before connections are told to go away.
            health.not_serving().await;
            for replica in &replicas {
                replica.stop().await;
            }
            drain.start();
        }
    });

    let grace = settings.shutdown_grace;
    let task = tokio::spawn(async move {
        let all = async move {
            let (grpc, rest) = tokio::join!(futures::future::join_all(replica_tasks), rest);
            for served in grpc {
                served.context("replica task")?.context("gRPC server")?;
            }
            rest.context("REST gateway")?;
            anyhow::Ok(())
        };
        let ended = keel_mesh::drain::bounded(all, &process_drain, grace).await?;
        admin_stop.notify_one();
        let _ = admin.await;
        if let Some((db, _)) = stores {
            let _ = db.close().await;
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

/// Keeps health honest after start-up: NOT_SERVING while the database does not answer, SERVING
/// again when it does. (A cache outage does not count: reads fall through to the database.)
async fn probe_database(
    db: DatabaseConnection,
    healths: Vec<Health>,
    drain: Drain,
    every: std::time::Duration,
) {
    let mut answering = true;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = drain.started() => return,
        }
        let ok = matches!(
            tokio::time::timeout(every.max(std::time::Duration::from_secs(1)), db.ping()).await,
            Ok(Ok(()))
        );
        if ok != answering {
            answering = ok;
            if ok {
                tracing::info!("the database answers again; serving");
                for health in &healths {
                    health.serving().await;
                }
            } else {
                tracing::error!("the database does not answer; not serving");
                for health in &healths {
                    health.not_serving().await;
                }
            }
        }
    }
}
