//! PostgreSQL read replicas: a read that may lag goes to a replica that has replayed what its
//! caller must see (the session's own last write, or a consistency token it sent), chosen from
//! the healthy ones by two random choices; every other read, and every read when no replica
//! qualifies or one fails, goes to the primary.

#![forbid(unsafe_code)]

mod floors;
mod layer;
mod lsn;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng as _;
use sea_orm::{
    ConnectOptions, ConnectionTrait as _, Database, DatabaseConnection, DbErr, Statement,
};

pub use floors::{Floors, Unavailable};
pub use layer::{CONSISTENCY_TOKEN, ConsistencyLayer, ConsistencyService};
pub use lsn::Lsn;
pub use watch::ReplicaMetrics;

tokio::task_local! {
    static NEED: Need;
}

/// A read, as [`Reads::read`] runs it on the connection it chose: `|db| Box::pin(query.clone().one(db))`.
pub type Query<'a, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, DbErr>> + Send + 'a>>;

/// What a read in the current task must see.
#[derive(Debug, Clone)]
enum Need {
    /// The primary's latest: a value that goes into a shared cache, or a decision.
    Latest,
    /// At least the session's last write and the token, either of which may be absent.
    AtLeast {
        session: Option<Arc<str>>,
        token: Option<Lsn>,
    },
}

/// Runs `work` with every read in it served by the primary: for a value that other callers
/// will be served from a shared cache, which a lagging replica would fill with an old value
/// for all of them until it expires.
pub async fn latest<F: Future>(work: F) -> F::Output {
    NEED.scope(Need::Latest, work).await
}

/// How replicas are watched and used.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaSettings {
    /// How often each replica's progress is read.
    pub interval: Duration,
    /// How far behind the primary a replica may fall before it is taken out.
    pub max_lag: Duration,
    /// How long one read on a replica may take before it is asked of the primary instead.
    pub read_timeout: Duration,
    /// Connections per replica.
    pub max_connections: u32,
}

impl ReplicaSettings {
    /// How long a session's floor is kept: by then every replica in service has passed it.
    pub fn floor_ttl(&self) -> Duration {
        self.max_lag * 2 + self.interval
    }
}

/// Where this process's reads go.
#[derive(Debug, Clone)]
pub struct Reads {
    primary: DatabaseConnection,
    pool: Option<Arc<Pool>>,
}

#[derive(Debug)]
struct Pool {
    replicas: Vec<Replica>,
    floors: Floors,
    metrics: ReplicaMetrics,
    settings: ReplicaSettings,
}

/// One replica and what the watch last saw of it.
#[derive(Debug)]
struct Replica {
    name: String,
    db: DatabaseConnection,
    /// How far it had replayed at the last look.
    replayed: AtomicU64,
    /// In service: it answered the last look within the lag bound and no read failed since.
    up: AtomicBool,
    in_flight: AtomicUsize,
}

impl Replica {
    fn serves(&self, need: Lsn) -> bool {
        self.up.load(Ordering::Acquire) && Lsn(self.replayed.load(Ordering::Acquire)) >= need
    }
}

impl Reads {
    /// Every read on `primary`: no replicas configured.
    pub fn primary_only(primary: DatabaseConnection) -> Self {
        Self {
            primary,
            pool: None,
        }
    }

    /// Reads spread over the replicas at `urls` (connected lazily, read-only), watched every
    /// `settings.interval` by a task that lives as long as the returned value's clones.
    pub async fn with_replicas(
        primary: DatabaseConnection,
        urls: &[String],
        floors: Floors,
        settings: ReplicaSettings,
        registry: &prometheus::Registry,
    ) -> Result<Self, ReplicaError> {
        if urls.is_empty() {
            return Ok(Self::primary_only(primary));
        }
        let metrics = ReplicaMetrics::register(registry)?;
        let mut replicas = Vec::with_capacity(urls.len());
        for url in urls {
            let name = address(url);
            let mut options = ConnectOptions::new(url.clone());
            options
                .max_connections(settings.max_connections)
                .min_connections(0)
                .connect_timeout(settings.read_timeout)
                .acquire_timeout(settings.read_timeout)
                .connect_lazy(true)
                .sqlx_logging(false)
                .map_sqlx_postgres_opts(|o| o.options([("default_transaction_read_only", "on")]));
            let db = Database::connect(options)
                .await
                .map_err(|e| ReplicaError::Url(name.clone(), e.to_string()))?;
            replicas.push(Replica {
                name,
                db,
                replayed: AtomicU64::new(0),
                up: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
            });
        }
        let pool = Arc::new(Pool {
            replicas,
            floors,
            metrics,
            settings,
        });
        watch::spawn(primary.clone(), Arc::downgrade(&pool));
        Ok(Self {
            primary,
            pool: Some(pool),
        })
    }

    /// The primary, for writes, transactions and reads that decide a write.
    pub fn primary(&self) -> &DatabaseConnection {
        &self.primary
    }

    /// Runs `query` on a replica that has replayed what the current task must see, else on the
    /// primary; a replica that fails or does not answer in time is taken out until its next
    /// look, and the primary answers instead. Outside a call (no scope) it reads the primary.
    pub async fn read<T>(
        &self,
        query: impl for<'a> Fn(&'a DatabaseConnection) -> Query<'a, T>,
    ) -> Result<T, DbErr> {
        let Some(pool) = &self.pool else {
            return query(&self.primary).await;
        };
        let need = match NEED.try_with(Clone::clone) {
            Ok(Need::AtLeast { session, token }) => {
                let mut need = token.unwrap_or(Lsn::ZERO);
                if let Some(session) = session {
                    match pool.floors.get(&session).await {
                        Ok(floor) => need = need.max(floor.unwrap_or(Lsn::ZERO)),
                        Err(e) => {
                            tracing::debug!(error = %e, "session floor unknown; reading the primary");
                            return pool
                                .metrics
                                .on_primary("floor_unknown", query(&self.primary))
                                .await;
                        }
                    }
                }
                need
            }
            Ok(Need::Latest) => {
                return pool
                    .metrics
                    .on_primary("latest", query(&self.primary))
                    .await;
            }
            Err(_) => {
                return pool
                    .metrics
                    .on_primary("outside_a_call", query(&self.primary))
                    .await;
            }
        };
        let Some(replica) = pool.pick(need) else {
            return pool
                .metrics
                .on_primary("no_replica", query(&self.primary))
                .await;
        };
        replica.in_flight.fetch_add(1, Ordering::AcqRel);
        let answer = tokio::time::timeout(pool.settings.read_timeout, query(&replica.db)).await;
        replica.in_flight.fetch_sub(1, Ordering::AcqRel);
        match answer {
            Ok(Ok(value)) => {
                pool.metrics
                    .reads
                    .with_label_values(&["replica", "ok"])
                    .inc();
                Ok(value)
            }
            Ok(Err(e)) => {
                if lost(&e) {
                    pool.take_out(replica, &e.to_string());
                }
                pool.metrics
                    .on_primary("replica_failed", query(&self.primary))
                    .await
            }
            Err(_) => {
                pool.take_out(replica, "no answer in time");
                pool.metrics
                    .on_primary("replica_failed", query(&self.primary))
                    .await
            }
        }
    }

    /// The primary's current WAL position: what a session that just wrote must see.
    pub async fn written(&self) -> Result<Lsn, DbErr> {
        watch::insert_position(&self.primary)
            .await
            .map(Lsn::settled)
    }

    /// Raises `session`'s floor to `lsn`; a no-op without replicas.
    pub async fn remember(&self, session: &str, lsn: Lsn) -> Result<(), Unavailable> {
        match &self.pool {
            Some(pool) => {
                pool.floors
                    .raise(session, lsn, pool.settings.floor_ttl())
                    .await
            }
            None => Ok(()),
        }
    }

    /// Whether replicas are configured.
    pub fn has_replicas(&self) -> bool {
        self.pool.is_some()
    }
}

impl Pool {
    /// Of the replicas that serve `need`, the less busy of two picked at random.
    fn pick(&self, need: Lsn) -> Option<&Replica> {
        let eligible: Vec<&Replica> = self.replicas.iter().filter(|r| r.serves(need)).collect();
        match eligible.len() {
            0 => None,
            1 => Some(eligible[0]),
            n => {
                let mut rng = rand::thread_rng();
                let a = rng.gen_range(0..n);
                let b = (a + rng.gen_range(1..n)) % n;
                let (a, b) = (eligible[a], eligible[b]);
                Some(
                    if b.in_flight.load(Ordering::Acquire) < a.in_flight.load(Ordering::Acquire) {
                        b
                    } else {
                        a
                    },
                )
            }
        }
    }

    fn take_out(&self, replica: &Replica, why: &str) {
        if replica.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(replica = %replica.name, why, "read replica taken out until its next look");
            self.metrics.up.with_label_values(&[&replica.name]).set(0);
        }
    }
}

/// An error that says the replica, not the query, failed: its pool or connection.
fn lost(e: &DbErr) -> bool {
    matches!(e, DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
        || e.to_string().to_ascii_lowercase().contains("connection")
        || matches!(e, DbErr::Query(sea_orm::RuntimeErr::SqlxError(inner)) | DbErr::Exec(sea_orm::RuntimeErr::SqlxError(inner))
            if matches!(**inner, sea_orm::sqlx::Error::Io(_) | sea_orm::sqlx::Error::PoolTimedOut | sea_orm::sqlx::Error::PoolClosed | sea_orm::sqlx::Error::Protocol(_)))
}

/// `host:port` of a database URL, for logs and labels (never its credentials).
fn address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// Why the replicas could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A URL sea-orm does not accept.
    #[error("read replica {0}: {1}")]
    Url(String, String),
    /// The metrics did not register.
    #[error("replica metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Runs `sql` (one text column named `v`) on `db`.
async fn text(db: &DatabaseConnection, sql: &str) -> Result<Option<String>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?;
    match row {
        Some(row) => row.try_get::<Option<String>>("", "v"),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_replica_is_named_by_its_address_without_credentials() {
        assert_eq!(
            super::address("postgres://keel:secret@db-replica:5432/keel?sslmode=require"),
            "db-replica:5432"
        );
        assert_eq!(super::address("postgres://10.0.0.7/keel"), "10.0.0.7");
    }
}
