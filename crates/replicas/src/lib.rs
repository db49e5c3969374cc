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
    /// How long a session's floor is kept: by then every replica in service has passed it
    /// (twice the lag bound and a look), and at least a minute, which costs a key per recent
    /// writer and covers looks that ran late.
    pub fn floor_ttl(&self) -> Duration {
        (self.max_lag.saturating_mul(2).saturating_add(self.interval)).max(Duration::from_secs(60))
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
    /// Sessions whose floor could not be raised where every process sees it: read from the
    /// primary by this process until the floor's time is up (a floor nothing passes).
    pinned: Floors,
    metrics: ReplicaMetrics,
    settings: ReplicaSettings,
}

/// One replica and what the watch last saw of it.
#[derive(Debug)]
struct Replica {
    name: String,
    db: DatabaseConnection,
    /// The watch's own connection.
    watch: DatabaseConnection,
    /// How far it had replayed at the last look (shared with its pool's connection check).
    replayed: Arc<AtomicU64>,
    /// In service: it answered the last look within the lag bound and no read failed since
    /// (shared with its pool's connection check).
    up: Arc<AtomicBool>,
    in_flight: AtomicUsize,
}

impl Replica {
    fn in_service(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn serves(&self, need: Lsn) -> bool {
        self.in_service() && Lsn(self.replayed.load(Ordering::Acquire)) >= need
    }
}

/// One read in flight on a replica, for as long as it lives (a cancelled read included).
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn on(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
        for (n, url) in urls.iter().enumerate() {
            let parsed: sea_orm::sqlx::postgres::PgConnectOptions =
                url.parse().map_err(|_| ReplicaError::Url(n + 1))?;
            let name = format!("{}:{}", parsed.get_host(), parsed.get_port());
            let replayed = Arc::new(AtomicU64::new(0));
            let up = Arc::new(AtomicBool::new(false));
            let gauge = metrics.up.with_label_values(&[&name]);
            // Reads wait for a connection a quarter of their time: a busy replica sends the
            // read to the primary without being taken out. The watch has a connection of its
            // own, so that a busy pool does not look like a dead replica.
            let pool = |connections: u32, acquire: Duration, checked: bool| {
                let mut options = ConnectOptions::new(url.clone());
                if checked {
                    let behind = Behind {
                        seen: replayed.clone(),
                        up: up.clone(),
                        gauge: gauge.clone(),
                    };
                    options.map_sqlx_postgres_pool_opts(move |pool| {
                        let behind = behind.clone();
                        pool.after_connect(move |connection, _| {
                            Box::pin(behind.clone().check(connection))
                        })
                    });
                }
                options
                    .max_connections(connections)
                    .min_connections(0)
                    .connect_timeout(settings.read_timeout)
                    .acquire_timeout(acquire)
                    .connect_lazy(true)
                    .sqlx_logging(false)
                    .map_sqlx_postgres_opts(|o| {
                        o.options([("default_transaction_read_only", "on")])
                    });
                Database::connect(options)
            };
            let db = pool(settings.max_connections, settings.read_timeout / 4, true)
                .await
                .map_err(|_| ReplicaError::Url(n + 1))?;
            let watch = pool(1, settings.read_timeout, false)
                .await
                .map_err(|_| ReplicaError::Url(n + 1))?;
            replicas.push(Replica {
                name,
                db,
                watch,
                replayed,
                up,
                in_flight: AtomicUsize::new(0),
            });
        }
        let pool = Arc::new(Pool {
            replicas,
            floors,
            pinned: Floors::local(),
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
        let (session, token) = match NEED.try_with(Clone::clone) {
            Ok(Need::AtLeast { session, token }) => (session, token),
            Ok(Need::Latest) => {
                return pool
                    .metrics
                    .on_primary("latest", query(&self.primary))
                    .await;
            }
            Err(_) => {
                let read = query(&self.primary);
                return pool.metrics.on_primary("outside_a_call", read).await;
            }
        };
        if !pool.replicas.iter().any(Replica::in_service) {
            return pool
                .metrics
                .on_primary("no_replica", query(&self.primary))
                .await;
        }
        let need = match pool.need(session.as_deref(), token).await {
            Ok(need) => need,
            Err(reason) => return pool.metrics.on_primary(reason, query(&self.primary)).await,
        };
        let Some(replica) = pool.pick(need) else {
            return pool
                .metrics
                .on_primary("no_replica", query(&self.primary))
                .await;
        };
        let answer = {
            let _busy = Busy::on(&replica.in_flight);
            tokio::time::timeout(pool.settings.read_timeout, query(&replica.db)).await
        };
        match answer {
            Ok(Ok(value)) => {
                let served = pool.metrics.reads.with_label_values(&["replica", "ok"]);
                served.inc();
                Ok(value)
            }
            Ok(Err(e)) => {
                if lost(&e) || unreachable(&e, replica) {
                    pool.take_out(replica, &e.to_string());
                }
                let read = query(&self.primary);
                pool.metrics.on_primary("replica_failed", read).await
            }
            Err(_) => {
                pool.take_out(replica, "no answer in time");
                let read = query(&self.primary);
                pool.metrics.on_primary("replica_failed", read).await
            }
        }
    }

    /// The primary's current WAL position: what a session that just wrote must see.
    pub async fn written(&self) -> Result<Lsn, DbErr> {
        watch::insert_position(&self.primary)
            .await
            .map(Lsn::settled)
    }

    /// Raises `session`'s floor to `lsn` (`None`: a write whose position is unknown); where
    /// that fails, this process reads the session's calls from the primary for the floor's
    /// time. A no-op without replicas.
    pub async fn remember(&self, session: &str, lsn: Option<Lsn>) {
        let Some(pool) = &self.pool else { return };
        let ttl = pool.settings.floor_ttl();
        let raised = match lsn {
            Some(lsn) => pool.floors.raise(session, lsn, ttl).await,
            None => Err(Unavailable("the write's WAL position is unknown".into())),
        };
        if let Err(e) = raised {
            tracing::warn!(error = %e, "a session's floor was not raised: its reads here go to the primary");
            // In this process's memory, which does not fail.
            let _ = pool.pinned.raise(session, Lsn(u64::MAX), ttl).await;
        }
    }

    /// Raises `session`'s floor to the primary's position now: for a write made on its behalf by
    /// another caller (a service), which its own later reads must see. A no-op without replicas.
    pub async fn wrote_for(&self, session: &str) {
        if self.pool.is_some() {
            let lsn = self.written().await.ok();
            self.remember(session, lsn).await;
        }
    }

    /// Whether replicas are configured.
    pub fn has_replicas(&self) -> bool {
        self.pool.is_some()
    }
}

impl Pool {
    /// What a read of `session` that sent `token` must see; the reason to read the primary
    /// instead when that is unknown.
    async fn need(&self, session: Option<&str>, token: Option<Lsn>) -> Result<Lsn, &'static str> {
        let mut need = token.unwrap_or(Lsn::ZERO);
        let Some(session) = session else {
            return Ok(need);
        };
        if let Ok(Some(_)) = self.pinned.get(session).await {
            return Err("floor_unknown");
        }
        match self.floors.get(session).await {
            Ok(floor) => need = need.max(floor.unwrap_or(Lsn::ZERO)),
            Err(e) => {
                tracing::debug!(error = %e, "session floor unknown; reading the primary");
                return Err("floor_unknown");
            }
        }
        Ok(need)
    }

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

/// The check of each new read connection: a server that has replayed less than the watch saw
/// at its last look (the replica restarted behind, or a URL that sends new connections to
/// another server) is refused and the replica taken out until the watch has looked again.
/// Connections opened before such a switch are not checked again: one server per URL. Reads chosen by that
/// look would miss writes it promised; refused, they go to the primary. (sqlx tries a refused
/// connection again until the read's acquire timeout, so the read that met it waits that long.)
#[derive(Clone)]
struct Behind {
    seen: Arc<AtomicU64>,
    up: Arc<AtomicBool>,
    gauge: prometheus::IntGauge,
}

impl Behind {
    async fn check(
        self,
        connection: &mut sea_orm::sqlx::PgConnection,
    ) -> Result<(), sea_orm::sqlx::Error> {
        use sea_orm::sqlx::Row as _;
        let row = sea_orm::sqlx::raw_sql("SELECT pg_last_wal_replay_lsn()::text AS v")
            .fetch_one(connection)
            .await?;
        let replayed = row
            .try_get::<Option<String>, _>("v")?
            .and_then(|text| text.parse::<Lsn>().ok())
            .unwrap_or(Lsn::ZERO);
        let seen = Lsn(self.seen.load(Ordering::Acquire));
        if replayed < seen {
            if self.up.swap(false, Ordering::AcqRel) {
                tracing::warn!(%replayed, %seen, "read replica behind what it had replayed: taken out");
                self.gauge.set(0);
            }
            return Err(sea_orm::sqlx::Error::Protocol(format!(
                "the replica has replayed {replayed}, behind the {seen} it had"
            )));
        }
        Ok(())
    }
}

/// An error that says the replica, not the query, failed: its connection. A pool that had no
/// connection free in time is busy, not lost: that read goes to the primary, the replica stays.
fn lost(e: &DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    match e {
        DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::ConnectionClosed)
        | DbErr::Conn(_) => true,
        DbErr::Query(sea_orm::RuntimeErr::SqlxError(inner))
        | DbErr::Exec(sea_orm::RuntimeErr::SqlxError(inner)) => {
            matches!(
                **inner,
                Sqlx::Io(_) | Sqlx::PoolClosed | Sqlx::Protocol(_) | Sqlx::Tls(_)
            )
        }
        _ => false,
    }
}

/// A wait for a connection that ran out while the pool had room: the time went into
/// connecting (sqlx tries a refused, starting or full server again until the deadline), not
/// into waiting for a busy connection to come back.
fn unreachable(e: &DbErr, replica: &Replica) -> bool {
    let timed_out = matches!(
        e,
        DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout)
    );
    let pool = replica.db.get_postgres_connection_pool();
    timed_out && pool.size() < pool.options().get_max_connections()
}

/// Why the replicas could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A URL that is not PostgreSQL's (its text is not repeated: it may hold a password).
    #[error("KEEL_DATABASE_READ_URLS: URL {0} is not a PostgreSQL URL (postgres://…)")]
    Url(usize),
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
