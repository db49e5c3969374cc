//! Connecting the stores: PostgreSQL when a URL is given, else an embedded SQLite file; Redis
//! when a URL is given, else an in-process cache. The same code runs on both pairs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_cache::{Cache, MemoryCache, NearCache, RedisCache};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr, SqlErr};

use crate::config::StoreSettings;

/// How long one Redis command may take before the cache counts as failed and the database
/// answers instead.
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_millis(250);

/// How long PostgreSQL lets a session sit idle inside a transaction before it ends the session:
/// a process frozen mid-transaction (a stopped VM, a long pause) releases its row locks after
/// this instead of holding every other process's claims and writes until it wakes.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

/// How long a pooled connection may have sat idle and still be handed out without a ping.
const TRUSTED_IDLE: Duration = Duration::from_millis(500);

/// The database URL to use: the configured one, or the embedded SQLite file.
pub fn database_url(settings: &StoreSettings) -> anyhow::Result<String> {
    if let Some(url) = &settings.database_url {
        return Ok(url.clone());
    }
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("create data dir {}", settings.data_dir.display()))?;
    let path = settings.data_dir.join("keel.db");
    Ok(format!("sqlite://{}?mode=rwc", path.display()))
}

/// Connects to the database and checks that it answers.
pub async fn connect_database(settings: &StoreSettings) -> anyhow::Result<DatabaseConnection> {
    let url = database_url(settings)?;
    let sqlite = url.starts_with("sqlite:");
    let mut options = ConnectOptions::new(url.clone());
    options
        .max_connections(if sqlite {
            8
        } else {
            settings.database_max_connections
        })
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    if !sqlite {
        options.map_sqlx_postgres_opts(|o| {
            o.options([(
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT,
            )])
        });
        // A connection used within the last half second is handed out as it is (HikariCP's
        // alive-bypass window); one idle longer is pinged first, and replaced if it does not
        // answer (a database restarted, a network that dropped it). sqlx pings every connection
        // it is given back, which reads what a cancelled call left unread, and since 0.9.1 a
        // `begin()` cancelled once its BEGIN went out rolls it back (transact-rs/sqlx#4393; on
        // 0.9.0 the next borrower's writes ran in that transaction and were lost). The check
        // of every borrowed session that stood in for the fix was a third of the statements
        // PostgreSQL ran for an order.
        options.test_before_acquire(false);
        options.map_sqlx_postgres_before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < TRUSTED_IDLE {
                    return Ok(true);
                }
                // An error closes it without a goodbye, as sqlx's own test does.
                sea_orm::sqlx::Connection::ping(conn).await.map(|()| true)
            })
        });
    }
    if sqlite {
        // WAL lets readers run beside the one writer; the busy timeout queues writers instead of
        // failing them.
        options.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    }
    let db = if sqlite {
        Database::connect(options)
            .await
            .context("connect to the database")?
    } else {
        connect_postgres(&url, options, settings.database_wait).await?
    };
    db.ping().await.context("the database does not answer")?;
    Ok(db)
}

/// How often each read replica's progress is read: a replica that went down or fell behind is
/// left out within this.
const REPLICA_LOOK: Duration = Duration::from_secs(1);

/// How long one read on a replica may take before the primary answers it instead.
const REPLICA_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Where reads that may lag go: the read replicas configured beside `primary`, each session's
/// floor in Redis when there is one (else in this process, which holds read-your-writes only
/// for the calls it serves itself), or the primary alone.
pub async fn connect_reads(
    settings: &StoreSettings,
    primary: &DatabaseConnection,
    registry: &prometheus::Registry,
) -> anyhow::Result<keel_replicas::Reads> {
    let urls = settings.read_urls();
    if urls.is_empty() {
        return Ok(keel_replicas::Reads::primary_only(primary.clone()));
    }
    let floors = match &settings.redis_url {
        Some(url) => keel_replicas::Floors::redis(url, &settings.redis_prefix)
            .await
            .context("connect the read floors to Redis")?,
        None => {
            tracing::warn!(
                "read replicas without Redis: a caller reads its own writes only from the \
                 process that served them"
            );
            keel_replicas::Floors::local()
        }
    };
    let replicas = keel_replicas::ReplicaSettings {
        interval: REPLICA_LOOK,
        max_lag: settings.database_read_max_lag,
        read_timeout: REPLICA_READ_TIMEOUT,
        max_connections: settings.database_max_connections,
    };
    Ok(
        keel_replicas::Reads::with_replicas(primary.clone(), &urls, floors, replicas, registry)
            .await?,
    )
}

/// How long the first connection attempt is waited for before a fresh one replaces it: an
/// attempt whose lookup or handshake got no answer (a DNS answer lost while podman's DNS server
/// reloaded kept one lookup waiting 30 s) would otherwise spend the whole wait. Each attempt
/// that runs out of time gives the next twice as long, so that a path that is always slow (a
/// lookup that needs glibc's retry after 5 s) still connects.
const FIRST_ATTEMPT: Duration = Duration::from_secs(5);

/// The least any attempt is given, whatever is left of the wait.
const SHORTEST_ATTEMPT: Duration = Duration::from_secs(1);

/// The pool on PostgreSQL at `url`, once PostgreSQL accepts a connection: attempts, with a
/// growing pause between them, for at most `wait`, each failure logged with its cause. A pool's
/// own first connection hides the cause of a failure behind "pool timed out" after 5 s (it
/// retries a refusal or "too many clients" silently until then), and a process that gave up
/// there — or a `keel users` run beside replicas that are all connecting at once — failed where
/// waiting a little would have done. A direct connection says why; errors no wait cures (a wrong
/// password, an unknown database) end the wait at once.
async fn connect_postgres(
    url: &str,
    options: ConnectOptions,
    wait: Duration,
) -> anyhow::Result<DatabaseConnection> {
    use sea_orm::sqlx::{ConnectOptions as _, Connection as _};
    let direct: sea_orm::sqlx::postgres::PgConnectOptions =
        url.parse().context("the database URL")?;
    let at = format!("{}:{}", direct.get_host(), direct.get_port());
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(100);
    let mut attempt = FIRST_ATTEMPT;
    loop {
        let limit = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(attempt)
            .max(SHORTEST_ATTEMPT);
        let cause = match tokio::time::timeout(limit, direct.connect()).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                match Database::connect(options.clone()).await {
                    Ok(db) => return Ok(db),
                    Err(e) => e.to_string(),
                }
            }
            Ok(Err(e)) if !cured_by_waiting(&e) => {
                return Err(e).with_context(|| format!("connect to the database at {at}"));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => {
                attempt *= 2;
                let limit = Duration::from_millis(limit.as_millis().try_into().unwrap_or(u64::MAX));
                format!("no answer within {limit:?}")
            }
        };
        if tokio::time::Instant::now() + pause >= deadline {
            anyhow::bail!(
                "connect to the database at {at}: still failing after {}s: {cause}",
                wait.as_secs()
            );
        }
        tracing::warn!(database = %at, %cause, "waiting for the database");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Whether a failed connection may succeed later: the OS's errors (refused, unreachable, a name
/// not resolved yet) and PostgreSQL's "too many clients" and "starting up"; not a wrong password,
/// an unknown database or a malformed URL.
fn cured_by_waiting(error: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error;
    match error {
        Error::Database(e) => matches!(e.code().as_deref(), Some("53300" | "57P03")),
        Error::Configuration(_) => false,
        _ => true,
    }
}

/// What a process's database did: `keel_db_statements_total` by result (`ok`, `error`) and
/// `keel_db_statement_duration_seconds`, from sea-orm's per-statement callback.
#[derive(Clone, Debug)]
pub struct DatabaseMetrics {
    statements: prometheus::IntCounterVec,
    seconds: prometheus::Histogram,
}

impl DatabaseMetrics {
    /// Creates the series and registers them with `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let statements = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "keel_db_statements_total",
                "Statements this process ran against its database, by result (ok, error).",
            ),
            &["result"],
        )?;
        let seconds = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new(
            "keel_db_statement_duration_seconds",
            "How long this process's database statements took.",
        ))?;
        registry.register(Box::new(statements.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(Self {
            statements,
            seconds,
        })
    }

    /// Counts every statement `db` runs from now on (set it before cloning the connection: a
    /// clone made earlier keeps no callback).
    pub fn observe(&self, db: &mut DatabaseConnection) {
        let metrics = self.clone();
        db.set_metric_callback(move |info| {
            let result = if info.failed { "error" } else { "ok" };
            metrics.statements.with_label_values(&[result]).inc();
            metrics.seconds.observe(info.elapsed.as_secs_f64());
        });
    }
}

/// Connects the cache: Redis under the configured prefix, or an in-process cache. The near
/// tier's hits are counted in `near_hits`.
pub async fn connect_cache(
    settings: &StoreSettings,
    near_hits: prometheus::IntCounter,
) -> anyhow::Result<Arc<dyn Cache>> {
    Ok(match &settings.redis_url {
        Some(url) if !settings.near_cache_ttl.is_zero() => Arc::new(
            NearCache::connect(
                url,
                &settings.redis_prefix,
                REDIS_COMMAND_TIMEOUT,
                settings.cache_memory_bytes,
                settings.near_cache_ttl,
            )
            .await
            .context("connect to Redis")?
            .counting(near_hits),
        ),
        Some(url) => Arc::new(
            RedisCache::connect(url, &settings.redis_prefix, REDIS_COMMAND_TIMEOUT)
                .await
                .context("connect to Redis")?,
        ),
        None => Arc::new(MemoryCache::new(settings.cache_memory_bytes)),
    })
}

/// UNAVAILABLE when the database cannot be reached (worth a retry), INTERNAL otherwise; never
/// with SQL in the message (the detail is logged).
pub fn database_status(db: &DbErr) -> tonic::Status {
    match db {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => {
            tracing::warn!(error = %db, "database unavailable");
            tonic::Status::unavailable("database unavailable")
        }
        _ => {
            tracing::error!(error = %db, "database error");
            tonic::Status::internal("internal error")
        }
    }
}

/// Creates a row once per AIP-155 request id: `earlier` finds the row an earlier call with the
/// same id created (none without an id; a refusal when that call had another body), and
/// `insert` writes a new one. A concurrent call that wins the insert is answered as it was.
pub async fn insert_once<M, E, Earlier, Insert>(
    earlier: impl Fn() -> Earlier,
    insert: impl FnOnce() -> Insert,
) -> Result<M, E>
where
    Earlier: std::future::Future<Output = Result<Option<M>, E>>,
    Insert: std::future::Future<Output = Result<M, DbErr>>,
    E: From<DbErr>,
{
    if let Some(existing) = earlier().await? {
        return Ok(existing);
    }
    match insert().await {
        Ok(created) => Ok(created),
        Err(e) if is_unique_violation(&e) => earlier().await?.ok_or_else(|| e.into()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `e` is a unique-constraint violation (a duplicate key).
pub fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// The kind that invalidates a cache key again.
pub const CACHE_INVALIDATE: &str = "cache.invalidate";

/// Failed invalidations, written as jobs (one live job per key).
#[derive(Debug, Clone)]
pub struct QueuedInvalidations(pub keel_queue::Queue);

#[async_trait::async_trait]
impl keel_cache::InvalidateLater for QueuedInvalidations {
    async fn invalidate_later(&self, key: &str) {
        let job = keel_queue::NewJob {
            kind: CACHE_INVALIDATE.into(),
            payload: serde_json::json!({ "key": key }),
            creator: "cache".into(),
            unique_key: Some(format!("{CACHE_INVALIDATE}:{key}")),
            max_attempts: Some(20),
            ..keel_queue::NewJob::default()
        };
        match self.0.store().enqueue(job).await {
            Ok(_) => self.0.wake(),
            Err(e) => tracing::error!(%key, error = %e, "cannot queue a cache invalidation"),
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait as _;

    use super::*;

    /// keel's pool of one connection on a fresh PostgreSQL database, and the database's URL.
    async fn pool_of_one() -> (DatabaseConnection, String) {
        let url = keel_testkit::fresh_database().await;
        let mut settings = crate::config::Settings::defaults().stores;
        settings.database_url = Some(url.clone());
        settings.database_max_connections = 1;
        (connect_database(&settings).await.unwrap(), url)
    }

    /// The check before a connection is handed out passes a healthy one: the pool keeps its
    /// session (a check that failed every connection made a new session per acquire, and cut
    /// the saga's throughput by fifteen).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_outside_any_transaction_is_reused() {
        let (db, _) = pool_of_one().await;
        let session = || async {
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT pg_backend_pid() AS pid",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i32>("", "pid")
            .unwrap()
        };
        let first = session().await;
        for _ in 0..3 {
            assert_eq!(session().await, first, "a healthy connection was replaced");
        }
    }

    /// A process that stands still inside a transaction (a stopped VM, a long pause) holds its
    /// row locks only until PostgreSQL ends its session (`idle_in_transaction_session_timeout`):
    /// a writer that waits for the row gets it, without the frozen side moving again, and the
    /// frozen transaction commits nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_frozen_inside_a_transaction_lets_its_rows_go() {
        use sea_orm::TransactionTrait as _;
        let (db, url) = pool_of_one().await;
        db.execute_unprepared("CREATE TABLE held (n INT PRIMARY KEY); INSERT INTO held VALUES (1)")
            .await
            .unwrap();
        let frozen = db.begin().await.unwrap();
        frozen
            .execute_unprepared("UPDATE held SET n = 2 WHERE n = 1")
            .await
            .unwrap();
        // Another process's writer, on a session of its own without the bound.
        let other = sea_orm::Database::connect(&url).await.unwrap();
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            other.execute_unprepared("UPDATE held SET n = 3 WHERE n = 1"),
        )
        .await;
        let took = waited.expect("the writer got the row").unwrap();
        assert_eq!(took.rows_affected(), 1, "the frozen update was rolled back");
        assert!(
            frozen.commit().await.is_err(),
            "the frozen session's commit went through"
        );
    }

    /// A `begin()` given up on while its BEGIN is on the wire (a deadline passed, a caller
    /// gone) leaves no transaction on the pooled connection: a write after it commits. On sqlx
    /// 0.9.0 it left the session inside a transaction nothing tracked (transact-rs/sqlx#4393),
    /// and the next borrower's write ran in it and was lost. The session's backend is stopped
    /// (SIGSTOP) while the BEGIN is sent, so the answer cannot come before the call gives up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_begin_given_up_on_leaves_no_transaction_behind() {
        use sea_orm::TransactionTrait as _;
        let (db, url) = pool_of_one().await;
        db.execute_unprepared("CREATE TABLE written (n INT)")
            .await
            .unwrap();
        let count = |db: DatabaseConnection, sql: &'static str| async move {
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                sql,
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i32>("", "n")
            .unwrap()
        };
        let backend = count(db.clone(), "SELECT pg_backend_pid() AS n").await;
        let signal = |name: &str| {
            let sent = std::process::Command::new("kill")
                .args([format!("-{name}"), backend.to_string()])
                .status()
                .unwrap();
            assert!(sent.success(), "kill -{name} {backend}");
        };
        /// Sends SIGCONT to the stopped backend however the test ends: the server is shared.
        struct Resumed(String);
        impl Drop for Resumed {
            fn drop(&mut self) {
                drop(
                    std::process::Command::new("kill")
                        .args(["-CONT", &self.0])
                        .status(),
                );
            }
        }
        signal("STOP");
        let resumed = Resumed(backend.to_string());
        let begun = tokio::time::timeout(Duration::from_millis(200), db.begin()).await;
        drop(resumed);
        assert!(begun.is_err(), "a stopped backend answered BEGIN");
        db.execute_unprepared("INSERT INTO written VALUES (1)")
            .await
            .unwrap();
        let other = Database::connect(url).await.unwrap();
        assert_eq!(
            count(other, "SELECT COUNT(*)::int AS n FROM written").await,
            1,
            "the write ran inside a stale transaction and was lost"
        );
    }
}
