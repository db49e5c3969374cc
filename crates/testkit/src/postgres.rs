//! An ephemeral PostgreSQL: initdb into a temp dir, started on a free loopback port with
//! durability off (tests need speed, not crash safety), shared by every test of a run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait as _, Database};

use crate::watchdog;

/// A running PostgreSQL that tests may create databases in.
#[derive(Debug, Clone)]
pub struct Postgres {
    /// `postgres://postgres@127.0.0.1:<port>` — no database name.
    pub base_url: String,
    dir: Option<PathBuf>,
}

static SHARED: OnceLock<Result<Postgres, String>> = OnceLock::new();

impl Postgres {
    /// The server this test run shares: `KEEL_TEST_POSTGRES_URL` if set, else one started (once
    /// per process) for this process.
    pub fn shared() -> Result<Postgres, String> {
        SHARED
            .get_or_init(|| match std::env::var("KEEL_TEST_POSTGRES_URL") {
                Ok(url) => Ok(Postgres {
                    base_url: url.trim_end_matches('/').to_owned(),
                    dir: None,
                }),
                Err(_) => Postgres::start(std::process::id()).map_err(|e| format!("{e:#}")),
            })
            .clone()
    }

    /// Starts a server that lives as long as process `watch_pid`.
    pub fn start(watch_pid: u32) -> anyhow::Result<Postgres> {
        let bin_dirs = postgres_bin_dirs();
        let missing = || {
            anyhow::anyhow!(
                "PostgreSQL server binaries (initdb, postgres) not found on PATH or under \
                 /usr/lib/postgresql/*/bin: apt-get install -y postgresql"
            )
        };
        let initdb = watchdog::find_binary("initdb", &bin_dirs).ok_or_else(missing)?;
        let postgres = watchdog::find_binary("postgres", &bin_dirs).ok_or_else(missing)?;
        let dir = watchdog::temp_dir("pg")?;
        let data = dir.join("data");
        let user = watchdog::is_root().then_some("postgres");
        init_cluster(&initdb, &dir, &data, user)?;
        let port = watchdog::free_port()?;
        let command = format!(
            "{} -D '{}' -p {port} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 \
             -c shared_buffers=64MB",
            postgres.display(),
            data.display(),
            dir.display(),
        );
        watchdog::spawn(&command, &dir, watch_pid, "INT", user)?;
        let pg_isready = watchdog::find_binary("pg_isready", &bin_dirs);
        until_ready(pg_isready.as_deref(), port, &dir)?;
        Ok(Postgres {
            base_url: format!("postgres://postgres@127.0.0.1:{port}"),
            dir: Some(dir),
        })
    }

    /// A server for one test alone, which it may [`Postgres::kill`]; returns it and the URL of
    /// a database on it.
    pub async fn dedicated() -> (Postgres, String) {
        let server = tokio::task::spawn_blocking(|| Postgres::start(std::process::id()))
            .await
            .expect("start PostgreSQL")
            .unwrap_or_else(|e| panic!("{e:#}"));
        let url = format!("{}/postgres", server.base_url);
        (server, url)
    }

    /// Kills the server with SIGKILL, as a crash would. Only for servers this process started.
    pub fn kill(&self) {
        let dir = self
            .dir
            .as_ref()
            .expect("only a server this process started can be killed");
        let pid = std::fs::read_to_string(dir.join("server.pid")).expect("server.pid");
        let status = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill postgres {pid}");
    }
}

fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.reverse();
    dirs
}

/// A new, empty database on the shared server; returns its URL. Panics with the install hint
/// when PostgreSQL cannot be started.
pub async fn fresh_database() -> String {
    let server = tokio::task::spawn_blocking(Postgres::shared)
        .await
        .expect("start PostgreSQL")
        .unwrap_or_else(|e| panic!("{e}"));
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = Database::connect(format!("{}/postgres", server.base_url))
        .await
        .expect("connect to the test PostgreSQL");
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    format!("{}/{name}", server.base_url)
}

/// A fresh cluster in `data` (under `dir`, owned by `user` when running as root): trust auth,
/// no fsync, UTF-8 with the C locale.
fn init_cluster(
    initdb: &std::path::Path,
    dir: &std::path::Path,
    data: &std::path::Path,
    user: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(user) = user {
        let status = Command::new("chown").args(["-R", user]).arg(dir).status()?;
        anyhow::ensure!(
            status.success(),
            "chown {} to {user} failed (does the `postgres` system user exist?)",
            dir.display()
        );
    }
    let mut init = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(initdb);
            c
        }
        None => Command::new(initdb),
    };
    let output = init
        .arg("-D")
        .arg(data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Waits (polling, up to 60 s) until the server on `port` accepts connections; its log in
/// `dir` says why when it does not.
fn until_ready(
    pg_isready: Option<&std::path::Path>,
    port: u16,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = match pg_isready {
            Some(bin) => Command::new(bin)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .output()
                .is_ok_and(|o| o.status.success()),
            None => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        };
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            anyhow::bail!("PostgreSQL did not start within 60 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
