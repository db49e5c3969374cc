//! What a service is to keel: a [`Domain`] (its names, schema, how it is built), the [`Parts`] of
//! a process it is built from, and its [`Migrations`]. The list of services is the registry
//! ([`crate::registry`]); this module sits below every service and points at none of them.

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use keel_cache::{Cache, CacheAside, CacheMetrics};
use sea_orm::{DatabaseConnection, DatabaseExecutor, DbErr};
use sea_orm_migration::MigratorTrait;
use tonic::service::{Routes, RoutesBuilder};

use crate::config::Settings;
use crate::keys::SigningKeys;
use crate::peers::Peers;

/// One service: its names, its schema, and how it is built.
pub struct Domain {
    /// Its name in `keel serve <name>`, `--<name>-endpoints`, logs and metrics.
    pub name: &'static str,
    /// One line for `keel serve --help`.
    pub about: &'static str,
    /// The fully-qualified gRPC services it serves; the first is the one whose health the mesh
    /// watches.
    pub grpc_names: &'static [&'static str],
    /// Its RPCs that guard secrets (`/package.Service/Method`): every gRPC server holds each
    /// client address to the strict limit on them (`--auth-rate-limit`).
    pub guarded: &'static [&'static str],
    /// Its migrations, tracked in its own table.
    pub migrations: &'static dyn Migrations,
    /// Builds its gRPC services over the process's parts and adds them to `services`.
    pub build: fn(&Parts<'_>, &mut Services) -> anyhow::Result<()>,
    /// The kinds of job it runs, for the workers of a process (`keel dev`, `keel worker`).
    pub jobs: fn(&Parts<'_>) -> anyhow::Result<Vec<keel_queue::Kind>>,
    /// What its settings add to the OpenAPI document: JSON Schema keywords by
    /// `package.Message.field`, for rules that are the deployment's rather than the proto's.
    pub openapi_rules: fn(&Settings) -> Vec<(&'static str, serde_json::Value)>,
}

/// For a service whose settings add nothing to the OpenAPI document.
pub fn no_openapi_rules(_: &Settings) -> Vec<(&'static str, serde_json::Value)> {
    Vec::new()
}

/// For a service that runs no jobs.
pub fn no_jobs(_: &Parts<'_>) -> anyhow::Result<Vec<keel_queue::Kind>> {
    Ok(Vec::new())
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for Domain {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Domain {}

impl Domain {
    /// The service as the mesh sees it.
    pub fn peer(&self) -> crate::peers::PeerService {
        crate::peers::PeerService {
            name: self.name,
            grpc_names: self.grpc_names,
        }
    }
}

/// The gRPC services of a process: tonic's routes for its sockets, and the same implementations'
/// unary methods on its gateway's in-process lane.
#[derive(Default)]
pub struct Services {
    routes: RoutesBuilder,
    lane: Vec<keel_gateway::lane::Method>,
}

impl Services {
    /// Adds `server` and `lane`, its unary methods on the lane over the same implementation
    /// (`crate::proto::lane`'s function of the service).
    pub fn add<S>(&mut self, server: S, lane: Vec<keel_gateway::lane::Method>) -> &mut Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(server);
        self.lane.extend(lane);
        self
    }

    /// The routes and the lane's methods.
    pub fn finish(self) -> (Routes, Vec<keel_gateway::lane::Method>) {
        (self.routes.routes(), self.lane)
    }
}

/// Every gRPC service name of `domains`.
pub fn grpc_names(domains: &[&Domain]) -> Vec<&'static str> {
    domains
        .iter()
        .flat_map(|d| d.grpc_names.iter().copied())
        .collect()
}

/// A service's schema migrations, as the registry runs them.
#[async_trait]
pub trait Migrations: Send + Sync {
    /// Applies those not yet applied; answers how many that was.
    async fn apply(&self, db: DatabaseExecutor<'_>) -> Result<usize, DbErr>;
    /// How many are not yet applied.
    async fn pending(&self, db: &DatabaseConnection) -> Result<usize, DbErr>;
    /// How many there are, applied or not.
    fn count(&self) -> usize;
}

/// The [`Migrations`] of a sea-orm-migration migrator.
pub struct Migrator<M>(PhantomData<fn() -> M>);

impl<M> Migrator<M> {
    /// `M`'s migrations.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<M> Default for Migrator<M> {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl<M: MigratorTrait> Migrations for Migrator<M> {
    async fn apply(&self, db: DatabaseExecutor<'_>) -> Result<usize, DbErr> {
        let pending = M::get_pending_migrations(&db).await?.len();
        M::up(db, None).await?;
        Ok(pending)
    }

    async fn pending(&self, db: &DatabaseConnection) -> Result<usize, DbErr> {
        Ok(M::get_pending_migrations(db).await?.len())
    }

    fn count(&self) -> usize {
        M::migrations().len()
    }
}

/// What a service is built from: the process's settings, stores and peers.
pub struct Parts<'a> {
    /// Every setting.
    pub settings: &'a Settings,
    /// The database.
    pub db: &'a DatabaseConnection,
    /// Where reads that may lag go: a read replica that has what the caller must see, else
    /// the primary (`db`).
    pub reads: &'a keel_replicas::Reads,
    /// The cache every [`CacheAside`] shares.
    pub cache: &'a Arc<dyn Cache>,
    /// Hits, misses and errors of every cache.
    pub cache_metrics: &'a CacheMetrics,
    /// The mesh channel to each peer service.
    pub peers: &'a Peers,
    /// The keys that sign access tokens, when this process signs them.
    pub signing_keys: Option<&'a Arc<SigningKeys>>,
    /// The rate limiter every part of the process shares (in Redis when it is configured).
    pub limiter: &'a Arc<keel_guard::RateLimiter>,
    /// The job queue (its table is in `db`).
    pub queue: &'a keel_queue::Queue,
    /// The process's metrics, for a service's own series.
    pub metrics: &'a prometheus::Registry,
}

impl Parts<'_> {
    /// A cache-aside view named `name` (`catalog.product`) over the process's cache.
    pub fn cache(&self, name: &'static str) -> CacheAside {
        CacheAside::new(
            self.cache.clone(),
            name,
            self.settings.stores.cache_ttl,
            self.cache_metrics.clone(),
        )
        .with_retry(Arc::new(crate::store::QueuedInvalidations(
            self.queue.clone(),
        )))
    }

    /// The largest request message a service decodes.
    pub fn max_message_bytes(&self) -> usize {
        self.settings.limits.max_message_bytes
    }
}

/// A service's sea-orm migrator: its migrations, in order, tracked in `<service>_migrations`.
///
/// `migrator!("todos", [CreateTodos]);` defines `pub struct Migrator` in the calling module.
#[macro_export]
macro_rules! migrator {
    ($service:literal, [$($migration:expr),+ $(,)?]) => {
        #[doc = concat!("Applies ", $service, "'s migrations, tracked in `", $service, "_migrations`.")]
        #[derive(Debug)]
        pub struct Migrator;

        #[async_trait::async_trait]
        impl sea_orm_migration::MigratorTrait for Migrator {
            fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
                vec![$(Box::new($migration)),+]
            }

            fn migration_table_name() -> sea_orm_migration::sea_orm::DynIden {
                use sea_orm_migration::sea_query::IntoIden as _;
                sea_orm_migration::sea_query::Alias::new(concat!($service, "_migrations")).into_iden()
            }
        }
    };
}
