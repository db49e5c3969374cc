//! An ephemeral PostgreSQL: initdb into a temp dir, started on a free loopback port with
//! durability off (tests need speed, not crash safety), shared by every test of a run; and
//! streaming replicas of one (`pg_basebackup -R`), optionally applying the stream late.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

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
static SHARED_REPLICA: OnceLock<Result<Postgres, String>> = OnceLock::new();

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

    /// The streaming replica of [`Postgres::shared`] this test run shares:
    /// `KEEL_TEST_POSTGRES_REPLICA_URL` if set, else one started (once per process) for this
    /// process. Every database created on the primary appears on it.
    pub fn shared_replica() -> Result<Postgres, String> {
        SHARED_REPLICA
            .get_or_init(|| match std::env::var("KEEL_TEST_POSTGRES_REPLICA_URL") {
                Ok(url) => Ok(Postgres {
                    base_url: url.trim_end_matches('/').to_owned(),
                    dir: None,
                }),
                Err(_) => Postgres::shared().and_then(|primary| {
                    primary
                        .replica(std::process::id(), None)
                        .map_err(|e| format!("{e:#}"))
                }),
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
        let settings = "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=64MB";
        serve(&postgres, dir, settings, watch_pid, user)
    }

    /// A hot standby of this server that lives as long as process `watch_pid`: a base backup
    /// (`pg_basebackup -R`, which writes the standby's connection to this one) started on a
    /// free port, replaying the stream `apply_delay` after each commit when one is given
    /// (`recovery_min_apply_delay`).
    pub fn replica(
        &self,
        watch_pid: u32,
        apply_delay: Option<Duration>,
    ) -> anyhow::Result<Postgres> {
        let bin_dirs = postgres_bin_dirs();
        let missing = || anyhow::anyhow!("pg_basebackup not found: apt-get install -y postgresql");
        let basebackup = watchdog::find_binary("pg_basebackup", &bin_dirs).ok_or_else(missing)?;
        let postgres = watchdog::find_binary("postgres", &bin_dirs).ok_or_else(missing)?;
        let primary = self
            .base_url
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .ok_or_else(|| anyhow::anyhow!("no port in {}", self.base_url))?;
        let dir = watchdog::temp_dir("pg-replica")?;
        let data = dir.join("data");
        let user = watchdog::is_root().then_some("postgres");
        give(&dir, user)?;
        let port = primary.to_string();
        // PostgreSQL 15's pg_basebackup can lose a race between its WAL stream and the copy
        // of the data directory ("could not create archive status file"), and then removes
        // what it copied: a second attempt starts clean. Once (CI at 77ce86e) it reported
        // success and the replica then found no postgresql.conf in the copy: a copy without
        // its configuration is taken for a failed one too, removed and made again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let output = as_user(&basebackup, user)
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D"])
                .arg(&data)
                .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"])
                .output()?;
            let copied = data.join("postgresql.conf").is_file();
            if output.status.success() && copied {
                break;
            }
            if output.status.success() {
                let _ = std::fs::remove_dir_all(&data);
            }
            anyhow::ensure!(
                attempts < 3,
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let delay = apply_delay.map_or(0, |d| d.as_millis());
        let settings = format!(
            "-c shared_buffers=32MB -c hot_standby=on -c recovery_min_apply_delay={delay}ms \
             -c wal_receiver_status_interval=1s"
        );
        serve(&postgres, dir, &settings, watch_pid, user)
    }

    /// Stops the server's process (SIGSTOP): it holds its connections and answers nothing, as a
    /// machine that froze would, until [`Postgres::resume`].
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a [`Postgres::pause`]d server run again.
    pub fn resume(&self) {
        self.signal("CONT");
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
        self.signal("KILL");
    }

    fn signal(&self, signal: &str) {
        let dir = self
            .dir
            .as_ref()
            .expect("only a server this process started can be signalled");
        let pid = std::fs::read_to_string(dir.join("server.pid")).expect("server.pid");
        let pid = pid.trim();
        // The postmaster and its backends: a session is served by a process of its own.
        let _ = Command::new("pkill")
            .arg(format!("-{signal}"))
            .args(["-P", pid])
            .status();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid)
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} postgres {pid}");
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

/// A new, empty database on the shared server and the URL of the same database on its shared
/// replica, once the replica has it: `(primary, replica)`. Its commits return once the replica
/// has applied them (`synchronous_commit = remote_apply`), so that any reader, not only the
/// writer, finds a write on the replica: tests written for one server hold on this pair, and
/// lag is tested on a replica of its own ([`Postgres::replica`] with a delay).
pub async fn fresh_replicated_database() -> (String, String) {
    let primary = fresh_database().await;
    let name = primary
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_owned();
    let server = primary.trim_end_matches(&format!("/{name}")).to_owned();
    let admin = Database::connect(format!("{server}/postgres"))
        .await
        .expect("connect to the test PostgreSQL");
    for statement in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
        format!("ALTER DATABASE \"{name}\" SET synchronous_commit = remote_apply"),
    ] {
        admin
            .execute_unprepared(&statement)
            .await
            .expect("make the replica synchronous");
    }
    let _ = admin.close().await;
    let replica = tokio::task::spawn_blocking(Postgres::shared_replica)
        .await
        .expect("start the PostgreSQL replica")
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("{}/{name}", replica.base_url);
    crate::eventually(
        Duration::from_secs(30),
        "the replica to have the database",
        || {
            let url = url.clone();
            async move {
                let db = Database::connect(url).await.ok()?;
                let _ = db.close().await;
                Some(())
            }
        },
    )
    .await;
    (primary, url)
}

/// Starts `postgres` on the cluster in `dir`/data on a free loopback port, with `settings`
/// beside the test kit's own (no fsync, many connections), for as long as `watch_pid` lives;
/// returns once it accepts connections.
fn serve(
    postgres: &std::path::Path,
    dir: PathBuf,
    settings: &str,
    watch_pid: u32,
    user: Option<&str>,
) -> anyhow::Result<Postgres> {
    serve_on(
        postgres,
        dir,
        settings,
        watch_pid,
        user,
        watchdog::free_port,
    )
}

/// [`serve`] on the ports `port` gives, one per attempt.
fn serve_on(
    postgres: &std::path::Path,
    dir: PathBuf,
    settings: &str,
    watch_pid: u32,
    user: Option<&str>,
    mut port: impl FnMut() -> anyhow::Result<u16>,
) -> anyhow::Result<Postgres> {
    let pg_isready = watchdog::find_binary("pg_isready", &postgres_bin_dirs());
    // A port free a moment ago may be taken before the server binds it (by another test's
    // server, or as the local end of any connection): that start is tried again on another.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let port = port()?;
        let command = format!(
            "{} -D '{}' -p {port} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=off \
             -c max_connections=400 {settings}",
            postgres.display(),
            dir.join("data").display(),
            dir.display(),
        );
        watchdog::spawn(&command, &dir, watch_pid, "INT", user)?;
        let ready = || match pg_isready.as_deref() {
            Some(bin) => Command::new(bin)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .output()
                .is_ok_and(|o| o.status.success()),
            None => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        };
        match watchdog::until_ready(&dir, Duration::from_secs(60), ready) {
            Ok(()) => {
                return Ok(Postgres {
                    base_url: format!("postgres://postgres@127.0.0.1:{port}"),
                    dir: Some(dir),
                });
            }
            Err(why) if attempts < 3 && why.port_taken() => {}
            Err(why) => return Err(anyhow::Error::new(why).context("PostgreSQL did not start")),
        }
    }
}

/// Hands `dir` to `user` (when running as root).
fn give(dir: &std::path::Path, user: Option<&str>) -> anyhow::Result<()> {
    if let Some(user) = user {
        let status = Command::new("chown").args(["-R", user]).arg(dir).status()?;
        anyhow::ensure!(
            status.success(),
            "chown {} to {user} failed (does the `postgres` system user exist?)",
            dir.display()
        );
    }
    Ok(())
}

/// `program`, run as `user` when one is given.
fn as_user(program: &std::path::Path, user: Option<&str>) -> Command {
    match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A fresh cluster in `data` (under `dir`, owned by `user` when running as root): trust auth,
/// no fsync, UTF-8 with the C locale.
fn init_cluster(
    initdb: &std::path::Path,
    dir: &std::path::Path,
    data: &std::path::Path,
    user: Option<&str>,
) -> anyhow::Result<()> {
    give(dir, user)?;
    let output = as_user(initdb, user)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory ready to serve, and the binaries.
    fn cluster() -> (PathBuf, PathBuf, Option<&'static str>) {
        let bin_dirs = postgres_bin_dirs();
        let initdb = watchdog::find_binary("initdb", &bin_dirs).expect("initdb");
        let postgres = watchdog::find_binary("postgres", &bin_dirs).expect("postgres");
        let dir = watchdog::temp_dir("pg").unwrap();
        let user = watchdog::is_root().then_some("postgres");
        init_cluster(&initdb, &dir, &dir.join("data"), user).unwrap();
        (postgres, dir, user)
    }

    #[test]
    fn a_server_that_cannot_start_says_why_at_once() {
        let (postgres, dir, user) = cluster();
        let failed = serve(
            &postgres,
            dir,
            "-c shared_buffers=plenty",
            std::process::id(),
            user,
        );
        let Err(failed) = failed else {
            panic!("it started with a bad setting")
        };
        let why = format!("{failed:#}");
        assert!(
            why.contains("exited at start") && why.contains("shared_buffers"),
            "its own log, not a 60 s wait: {why}"
        );
    }

    #[test]
    fn a_port_taken_before_the_server_binds_it_is_tried_again_on_another() {
        let (postgres, dir, user) = cluster();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ports = vec![
            watchdog::free_port().unwrap(),
            taken.local_addr().unwrap().port(),
        ];
        let server = serve_on(&postgres, dir, "", std::process::id(), user, || {
            Ok(ports.pop().expect("a port"))
        })
        .unwrap();
        assert!(ports.is_empty(), "the second port was asked for");
        assert!(
            !server
                .base_url
                .ends_with(&format!(":{}", taken.local_addr().unwrap().port()))
        );
    }
}
