//! The `keel` binary: `keel` / `keel dev`, `keel serve <service>`, `keel migrate`.

#![forbid(unsafe_code)]

use clap::Parser as _;
use keel::app::{self, Listeners};
use keel::cli::{Cli, Command, KeysAction, UsersAction};
use keel::config::Settings;
use keel::domain::{self, Domain};
use keel::registry::DOMAINS;
use keel_server::drain::{Ended, Termination};

/// jemalloc, by measurement: the `jemalloc` feature in Cargo.toml says why.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long the exit waits for work still on the runtime's blocking threads once everything that
/// matters (calls, jobs, the stores) has drained: a DNS lookup for a peer (`getaddrinfo` cannot be
/// cancelled) or a key reload stuck on a slow file must not hold a stopped process for seconds,
/// until its supervisor kills it.
const BLOCKING_AT_EXIT: std::time::Duration = std::time::Duration::from_millis(500);

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keel: start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(keel_main());
    runtime.shutdown_timeout(BLOCKING_AT_EXIT);
    code
}

async fn keel_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("keel: {e}");
        return std::process::ExitCode::from(2);
    }
    // A health check every few seconds in every container: no logging or tracing set up for it.
    if let Some(Command::Probe) = cli.command {
        return match probe(cli.settings.listen.admin_addr).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let service_name = match &cli.command {
        Some(Command::Serve { service }) => format!("keel-{}", service.name()),
        _ => "keel".to_owned(),
    };
    let operations = &cli.settings.operations;
    let guard = match keel_server::telemetry::subscriber(
        operations.log_format,
        &operations.log,
        &service_name,
    )
    .and_then(|(subscriber, guard)| keel_server::telemetry::install(subscriber).map(|()| guard))
    {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("keel: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing::debug!(settings = ?cli.settings, "settings");
    let result = run(cli).await;
    drop(guard);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.settings;
    match cli.command.unwrap_or(Command::Dev) {
        Command::Dev => serve(&settings, DOMAINS).await,
        Command::Serve { service } => serve(&settings, &service.domains()).await,
        #[cfg(feature = "dev-certs")]
        Command::DevCerts { out } => {
            let names: Vec<&str> = DOMAINS
                .iter()
                .map(|d| d.name)
                .chain(["gateway", "client"])
                .collect();
            keel_devcerts::write_all(&out, &names)?;
            let dir = out.display();
            say(&format!(
                "keel: development CA and certificates for {} written to {dir}\n  KEEL_TLS_CA={dir}/ca.pem KEEL_TLS_CERT={dir}/identity.pem KEEL_TLS_KEY={dir}/identity-key.pem keel serve identity",
                names.join(", ")
            ));
            Ok(())
        }
        Command::Keys { action } => keys(&settings, action),
        Command::Users { action } => users(&settings, action).await,
        Command::Probe => probe(settings.listen.admin_addr).await,
        Command::Worker => {
            let termination = Termination::listen();
            let admin = tokio::net::TcpListener::bind(settings.listen.admin_addr).await?;
            let working = app::work(&settings, admin, termination.received());
            let Some(working) = unless_terminated(&termination, working).await? else {
                return Ok(());
            };
            say(&format!(
                "keel worker is running {}\n  admin  http://{}/healthz /readyz /metrics\n  try    curl http://{}/metrics",
                working.kinds.join(", "),
                working.admin_addr,
                working.admin_addr
            ));
            working.wait().await.map(|_| ())
        }
        Command::Migrate => {
            let db = keel::store::connect_database(&settings.stores).await?;
            let applied = app::migrate(&db, DOMAINS).await?;
            say(&match applied {
                0 => format!("keel: {} is up to date", describe_database(&settings)),
                n => format!(
                    "keel: {n} migrations applied to {}",
                    describe_database(&settings)
                ),
            });
            Ok(())
        }
    }
}

/// `keel keys`: the key directory of KEEL_SIGNING_KEY, or the development one.
fn keys(settings: &Settings, action: KeysAction) -> anyhow::Result<()> {
    use keel::identity::keys;
    let dir = match &settings.identity.signing_key {
        // A directory, or none yet: `keel keys rotate` makes it (the quick start's first step).
        Some(path) if path.is_dir() || !path.exists() => path.clone(),
        Some(path) => anyhow::bail!(
            "KEEL_SIGNING_KEY ({}) is one file: give it a directory of keys to rotate them",
            path.display()
        ),
        None => {
            keel::identity::SigningKeys::development(&settings.stores.data_dir)?;
            keys::development_dir(&settings.stores.data_dir)
        }
    };
    match action {
        KeysAction::List => {
            let all = keys::list(&dir)?;
            for (n, (kid, file)) in all.iter().enumerate() {
                let role = if n + 1 == all.len() {
                    "signs"
                } else {
                    "verifies"
                };
                say(&format!("{kid}  {role:8}  {}", file.display()));
            }
        }
        KeysAction::Rotate => {
            let kid = keys::rotate(&dir)?;
            say(&format!("keel: new signing key {kid} in {}", dir.display()));
        }
        KeysAction::Remove { kid } => {
            keys::remove(&dir, &kid)?;
            say(&format!("keel: removed key {kid} from {}", dir.display()));
        }
    }
    Ok(())
}

/// `keel users`: straight on the database (migrated first), and the user's cached entry dropped.
async fn users(settings: &Settings, action: UsersAction) -> anyhow::Result<()> {
    let db = keel::store::connect_database(&settings.stores).await?;
    app::migrate(&db, DOMAINS).await?;
    match action {
        UsersAction::GrantAdmin { email, unconfirmed } => {
            let email = email.trim().to_lowercase();
            let directory = keel::identity::Directory::new(db.clone());
            let Some(found) = directory.find_by_email(&email).await? else {
                anyhow::bail!("no user registered with {email}");
            };
            if found.email_confirmed_at.is_none() && !unconfirmed {
                anyhow::bail!(
                    "{email} was never confirmed (anyone can register any address): confirm it \
                     with the code its welcome e-mail carries, or pass --unconfirmed if you know \
                     whose account users/{} is",
                    found.id
                );
            }
            let Some(user) = directory.grant_admin(&email).await? else {
                anyhow::bail!("no user registered with {email}");
            };
            // Their cached entry and token generation: tokens signed before now are refused.
            // One Redis refuses is queued, as the servers queue theirs, for a worker to retry.
            let registry = prometheus::Registry::new();
            let metrics = keel_cache::CacheMetrics::register(&registry)?;
            let queue =
                keel_queue::Queue::table(db, keel_queue::QueueMetrics::register(&registry)?);
            let later = std::sync::Arc::new(keel::store::QueuedInvalidations(queue));
            let cache =
                keel::store::connect_cache(&settings.stores, metrics.near_hits.clone()).await?;
            let ttl = settings.stores.cache_ttl;
            let mut everywhere = true;
            for name in ["identity.users", keel::identity::GENERATIONS] {
                let invalidation =
                    keel_cache::CacheAside::new(cache.clone(), name, ttl, metrics.clone())
                        .with_retry(later.clone())
                        .invalidation(&user.id.to_string())
                        .await;
                everywhere &= invalidation == keel_cache::Invalidation::Done;
            }
            let (id, ttl) = (user.id, ttl.as_secs());
            say(&if everywhere {
                format!(
                    "keel: users/{id} ({email}) is an admin; their tokens so far are revoked, the next sign-in carries the role"
                )
            } else {
                format!(
                    "keel: users/{id} ({email}) is an admin; the cache did not answer, so servers may accept their earlier tokens until a worker drops the cached entry (queued) — at most {ttl} s"
                )
            });
        }
    }
    Ok(())
}

async fn serve(settings: &Settings, services: &[&'static Domain]) -> anyhow::Result<()> {
    let termination = Termination::listen();
    let listeners = Listeners::bind(settings, !services.is_empty()).await?;
    let running = app::start(settings, services, listeners, termination.received());
    let Some(running) = unless_terminated(&termination, running).await? else {
        return Ok(());
    };
    print_banner(settings, services, &running);
    match running.wait().await? {
        Ended::Drained => Ok(()),
        Ended::GraceElapsed => {
            tracing::warn!("exited with calls still in flight after the grace period");
            Ok(())
        }
    }
}

/// What `start` comes to, or `None` when a signal came first: a process told to stop while
/// it starts (waiting for its database, say) stops there, with nothing yet to drain.
async fn unless_terminated<T>(
    termination: &Termination,
    start: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    tokio::select! {
        started = start => started.map(Some),
        () = termination.received() => {
            tracing::info!("stopped while starting");
            Ok(None)
        }
    }
}

fn describe_database(settings: &Settings) -> String {
    match &settings.stores.database_url {
        Some(url) => url
            .split('@')
            .next_back()
            .unwrap_or("PostgreSQL")
            .to_owned(),
        None => format!(
            "SQLite at {}",
            settings.stores.data_dir.join("keel.db").display()
        ),
    }
}

fn print_banner(settings: &Settings, services: &[&Domain], running: &app::Running) {
    let cache = if settings.stores.redis_url.is_some() {
        "Redis"
    } else {
        "in-process"
    };
    let mut banner = if services.is_empty() {
        "keel is serving the REST gateway alone\n".to_owned()
    } else {
        format!(
            "keel is serving {}\n",
            domain::grpc_names(services).join(", ")
        )
    };
    if let Some(first) = running.grpc_addr() {
        banner += &format!("  gRPC   {first}\n");
    }
    if running.replicas.len() > 1 {
        let all: Vec<String> = running
            .replicas
            .iter()
            .map(|r| r.addr.to_string())
            .collect();
        banner += &format!("  replicas {} ({})\n", all.len(), all.join(", "));
    }
    let docs = if settings.edge.docs(settings.operations.environment) {
        ", docs at /docs"
    } else {
        ""
    };
    let scheme = if settings.edge.http_tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    banner += &format!(
        "  REST   {scheme}://{}/v1/... (OpenAPI at /openapi.json{docs})\n  admin  http://{}/healthz /readyz /metrics\n",
        running.http_addr, running.admin_addr
    );
    let remote: Vec<String> = settings
        .mesh
        .endpoints
        .iter()
        .map(|(name, target)| format!("{name} at {target}"))
        .collect();
    if !remote.is_empty() {
        banner += &format!("  peers  {}\n", remote.join(", "));
    }
    if !services.is_empty() {
        banner += &format!("  store  {}, cache {cache}\n", describe_database(settings));
    }
    match running.grpc_addr() {
        Some(addr) => banner += &format!("  try    grpcurl -plaintext {addr} list"),
        None => banner += &format!("  try    curl http://{}/openapi.json", running.http_addr),
    }
    say(&banner);
}

/// `keel probe`: `GET /readyz` on the admin port of the keel beside it (an unspecified listen
/// address is asked on loopback), bounded by two seconds; an error unless it answers 200.
async fn probe(admin: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut addr = admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.0\r\nHost: keel\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(2), ask)
        .await
        .map_err(|_| anyhow::anyhow!("http://{addr}/readyz did not answer in 2 s"))?
        .map_err(|e| anyhow::anyhow!("http://{addr}/readyz: {e}"))?;
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(
        status.split(' ').nth(1) == Some("200"),
        "http://{addr}/readyz: not ready ({status})"
    );
    Ok(())
}

/// Prints a line for the person at the terminal. A closed stdout (a supervisor that discards it,
/// `keel keys list | head -1`) is no reason to stop: the line is dropped, never a panic.
fn say(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}
