//! Assembling a keel process: stores and migrations, the services asked for, one gRPC server
//! with the standard stack, the admin port, and the drain that ends them in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_cache::{CacheAside, CacheMetrics};
use keel_mesh::auth::{AuthLayer, TokenVerifier};
use keel_mesh::drain::Ended;
use keel_mesh::metrics::GrpcServerMetrics;
use keel_mesh::{Drain, Health};
use prometheus::Registry;
use sea_orm::DatabaseConnection;
use sea_orm_migration::MigratorTrait as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::config::{Environment, ServiceName, Settings};
use crate::identity::{self, IdentityConfig, IdentityService, LocalKeys, SigningKeys};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::keel::catalog::v1::catalog_service_server::CatalogServiceServer;
use crate::proto::keel::catalog::v1::inventory_service_server::InventoryServiceServer;
use crate::proto::keel::identity::v1::identity_service_server::IdentityServiceServer;
use crate::proto::keel::payments::v1::ledger_service_server::LedgerServiceServer;
use crate::proto::keel::payments::v1::payment_service_server::PaymentServiceServer;
use crate::proto::keel::todos::v1::todo_service_server::TodoServiceServer;
use crate::{catalog, payments, store, todos};

impl ServiceName {
    /// The fully-qualified gRPC services it serves, as health and reflection report them.
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
    /// gRPC.
    pub grpc: TcpListener,
    /// The REST gateway.
    pub http: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `settings`.
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("bind gRPC address {}", settings.grpc_addr))?;
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
    /// Where gRPC is served.
    pub grpc_addr: SocketAddr,
    /// Where the REST gateway is served.
    pub http_addr: SocketAddr,
    /// Where the admin endpoints are served.
    pub admin_addr: SocketAddr,
    stop: Arc<Notify>,
    task: JoinHandle<anyhow::Result<Ended>>,
}

impl Running {
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

/// Applies the migrations of `services`.
pub async fn migrate(db: &DatabaseConnection, services: &[ServiceName]) -> anyhow::Result<()> {
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

/// Starts `services` on `listeners`; drains when `shutdown` resolves or [`Running::shutdown`]
/// is called. Returns once every service reports SERVING.
pub async fn start(
    settings: &Settings,
    services: &[ServiceName],
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    settings.validate()?;
    let registry = Registry::new();
    let db = store::connect_database(settings).await?;
    migrate(&db, services).await?;
    let cache = store::connect_cache(settings).await?;
    let cache_metrics = CacheMetrics::register(&registry)?;

    let drain = Drain::new();
    let served = grpc_names(services);
    let (health, health_service) = Health::new(served.iter().copied(), drain.clone()).await;
    let (reflection_v1, reflection_v1alpha) =
        keel_mesh::server::reflection(&[FILE_DESCRIPTOR_SET], &served)
            .context("build reflection")?;
    let descriptor_sets: Vec<&[u8]> = std::iter::once(FILE_DESCRIPTOR_SET)
        .chain(keel_mesh::server::STANDARD_DESCRIPTOR_SETS.iter().copied())
        .collect();
    let grpc_metrics = Arc::new(GrpcServerMetrics::register(&registry, &descriptor_sets)?);
    let http_metrics = keel_gateway::HttpMetrics::register(&registry)?;

    let keys = Arc::new(match &settings.signing_key {
        Some(path) => SigningKeys::load(path)?,
        None => SigningKeys::development(&settings.data_dir)?,
    });
    let verifier = Arc::new(TokenVerifier::new(Arc::new(LocalKeys(keys.clone()))));

    let identity = if services.contains(&ServiceName::Identity) {
        // Half the cores by default: argon2 may take that much CPU, the rest stays for reads.
        let hashes = settings.max_concurrent_hashes.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
            (cores / 2).max(1)
        });
        let service = IdentityService::new(
            identity::Directory::new(db.clone()),
            identity::Passwords::new(hashes)?,
            keys.clone(),
            CacheAside::new(
                cache.clone(),
                "identity.users",
                settings.cache_ttl,
                cache_metrics.clone(),
            ),
            IdentityConfig {
                access_token_ttl: settings.access_token_ttl,
                refresh_token_ttl: settings.refresh_token_ttl,
                admin_emails: settings
                    .admin_emails
                    .iter()
                    .map(|e| e.trim().to_lowercase())
                    .collect(),
            },
        );
        Some(
            IdentityServiceServer::new(service)
                .max_decoding_message_size(settings.max_message_bytes),
        )
    } else {
        None
    };

    let cached = |name: &'static str| {
        CacheAside::new(
            cache.clone(),
            name,
            settings.cache_ttl,
            cache_metrics.clone(),
        )
    };
    let max_message = settings.max_message_bytes;
    let todos = services.contains(&ServiceName::Todos).then(|| {
        let service = todos::TodoService::new(
            todos::TodoStore::new(db.clone()),
            cached("todos.todo"),
            cached("todos.first_page"),
        );
        TodoServiceServer::new(service).max_decoding_message_size(max_message)
    });
    let catalog = services.contains(&ServiceName::Catalog).then(|| {
        catalog::CatalogService::new(
            catalog::ProductStore::new(db.clone()),
            catalog::Inventory::new(db.clone()),
            cached("catalog.product"),
        )
    });
    let payments = services.contains(&ServiceName::Payments).then(|| {
        payments::PaymentService::new(
            payments::Ledger::new(db.clone(), settings.wallet_currency.clone()),
            settings.environment == Environment::Development,
        )
    });

    let shed = keel_mesh::shed::ShedLayer::new(
        served.iter().copied(),
        settings.max_concurrent_calls,
        std::time::Duration::from_millis(50),
    );
    let mut server = keel_mesh::server::builder(keel_mesh::server::layers(
        grpc_metrics,
        shed,
        Some(AuthLayer::new(verifier.clone())),
    ));
    if let Some(tls) = settings.tls() {
        server = server
            .tls_config(tls.server()?)
            .context("mTLS server configuration")?;
    }
    let router = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(identity)
        .add_optional_service(todos)
        .add_optional_service(
            catalog
                .clone()
                .map(|s| CatalogServiceServer::new(s).max_decoding_message_size(max_message)),
        )
        .add_optional_service(
            catalog.map(|s| InventoryServiceServer::new(s).max_decoding_message_size(max_message)),
        )
        .add_optional_service(
            payments
                .clone()
                .map(|s| PaymentServiceServer::new(s).max_decoding_message_size(max_message)),
        )
        .add_optional_service(
            payments.map(|s| LedgerServiceServer::new(s).max_decoding_message_size(max_message)),
        );

    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = listeners.http.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    let serve = router.serve_with_incoming_shutdown(incoming, drain.started());

    let gateway = gateway(settings, &served, grpc_addr, verifier.clone(), http_metrics).await?;
    let rest = axum::serve(
        listeners.http,
        gateway
            .router(keel_mesh::admin::router(health.clone(), registry.clone()))
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(drain.started());

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
    health.serving().await;
    tokio::spawn(probe_database(
        db.clone(),
        health.clone(),
        drain.clone(),
        settings.health_probe_interval,
    ));

    let stop = Arc::new(Notify::new());
    tokio::spawn({
        let (health, drain, stop) = (health.clone(), drain.clone(), stop.clone());
        async move {
            tokio::select! {
                () = shutdown => {}
                () = stop.notified() => {}
            }
            // Order matters: watchers hear NOT_SERVING before connections are told to go away.
            health.not_serving().await;
            drain.start();
        }
    });

    let grace = settings.shutdown_grace;
    let task = tokio::spawn(async move {
        let both = async move {
            let (grpc, rest) = tokio::join!(serve, rest);
            grpc.context("gRPC server")?;
            rest.context("REST gateway")?;
            anyhow::Ok(())
        };
        let ended = keel_mesh::drain::bounded(both, &drain, grace).await?;
        admin_stop.notify_one();
        let _ = admin.await;
        let _ = db.close().await;
        tracing::info!(?ended, "stopped");
        Ok(ended)
    });

    Ok(Running {
        grpc_addr,
        http_addr,
        admin_addr,
        stop,
        task,
    })
}

/// The REST gateway for `served`, calling this process's gRPC port.
async fn gateway(
    settings: &Settings,
    served: &[&str],
    grpc_addr: SocketAddr,
    verifier: Arc<TokenVerifier>,
    metrics: keel_gateway::HttpMetrics,
) -> anyhow::Result<Arc<keel_gateway::Gateway>> {
    // The gateway calls this process's gRPC port: over mTLS when the port requires it.
    let backend = match settings.tls() {
        Some(tls) => tonic::transport::Channel::from_shared(format!("https://{grpc_addr}"))
            .context("gateway backend address")?
            .tls_config(tls.client("localhost")?)
            .context("mTLS client configuration")?
            .connect_lazy(),
        None => tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
            .context("gateway backend address")?
            .connect_lazy(),
    };
    let limiter = match &settings.redis_url {
        Some(url) => keel_gateway::RateLimiter::redis(url, &settings.redis_prefix)
            .await
            .context("connect the rate limiter to Redis")?,
        None => keel_gateway::RateLimiter::local(),
    };
    let config = keel_gateway::GatewayConfig {
        services: served.iter().map(|s| (*s).to_owned()).collect(),
        max_body_bytes: settings.max_message_bytes,
        cors_origins: settings.cors_origins.clone(),
        quota: settings.rate_limit.0,
        strict_quota: settings.auth_rate_limit.0,
        strict_paths: vec!["/v1/auth:login".into(), "/v1/auth:register".into()],
        title: "keel".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let gateway = keel_gateway::Gateway::new(
        FILE_DESCRIPTOR_SET,
        backend,
        limiter,
        Some(verifier),
        metrics,
        config,
    )
    .context("build the REST gateway")?;
    Ok(Arc::new(gateway))
}

/// Keeps health honest after start-up: NOT_SERVING while the database does not answer, SERVING
/// again when it does. (A cache outage does not count: reads fall through to the database.)
async fn probe_database(
    db: DatabaseConnection,
    health: Health,
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
                health.serving().await;
            } else {
                tracing::error!("the database does not answer; not serving");
                health.not_serving().await;
            }
        }
    }
}
