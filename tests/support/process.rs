//! The real `keel` binary as a child process: started on port 0, its addresses read from the
//! banner, its logs kept for assertions, killed if a test forgets it.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// A running `keel` process.
pub struct KeelProcess {
    pub child: Child,
    /// The first replica's gRPC address; `None` for the gateway alone.
    pub grpc: Option<SocketAddr>,
    /// Every replica's gRPC address.
    pub replicas: Vec<SocketAddr>,
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub data_dir: tempfile::TempDir,
    logs: Arc<Mutex<String>>,
}

/// A `keel` command with no inherited `KEEL_*` settings and a fresh data dir.
pub fn keel_command(data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    for (key, _) in std::env::vars() {
        if key.starts_with("KEEL_") {
            command.env_remove(key);
        }
    }
    command
        .env("KEEL_DATA_DIR", data_dir)
        .env("KEEL_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

impl KeelProcess {
    /// Starts `keel` with `args` on loopback port 0 and waits for its banner.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_with_env::<&str, &str>(args, &[]).await
    }

    /// Starts `keel` with `args` and extra environment `env`.
    pub async fn start_with_env<K, V>(args: &[&str], env: &[(K, V)]) -> Self
    where
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut command = keel_command(data_dir.path());
        command
            .env("KEEL_GRPC_ADDR", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["--admin-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(args);
        let mut child = command.spawn().expect("spawn keel");

        let logs = collect_logs(child.stderr.take().expect("stderr"));

        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut grpc, mut http, mut admin, mut replicas) = (None, None, None, Vec::new());
        let mut ended = false;
        let banner = async {
            while let Ok(Some(line)) = lines.next_line().await {
                let line = line.trim();
                if let Some(addr) = line.strip_prefix("gRPC") {
                    grpc = addr.trim().parse().ok();
                }
                if let Some(rest) = line.strip_prefix("replicas") {
                    replicas = rest
                        .split(['(', ')', ','])
                        .filter_map(|a| a.trim().parse().ok())
                        .collect();
                }
                if let Some(rest) = line.strip_prefix("admin  http://") {
                    admin = rest.split('/').next().and_then(|a| a.parse().ok());
                }
                if let Some(rest) = line.strip_prefix("REST   http://") {
                    http = rest.split('/').next().and_then(|a| a.parse().ok());
                }
                if line.starts_with("try ") {
                    ended = true;
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), banner)
            .await
            .is_err()
        {
            panic!(
                "keel printed no banner within 60 s; logs:\n{}",
                logs.lock().unwrap()
            );
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (true, Some(http_addr), Some(admin_addr)) = (ended, http, admin) else {
            panic!(
                "keel exited before its banner; logs:\n{}",
                logs.lock().unwrap()
            );
        };
        if replicas.is_empty() {
            replicas.extend(grpc);
        }
        Self {
            child,
            grpc,
            replicas,
            http_addr,
            admin_addr,
            data_dir,
            logs,
        }
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Sends SIGTERM, as an orchestrator does.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("keel is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// The first replica's gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.expect("this keel serves gRPC")
    }

    /// A channel to the process.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.grpc_addr()))
            .unwrap()
            .connect()
            .await
            .expect("connect to keel")
    }
}

/// A fresh PostgreSQL database and Redis key prefix, as the environment of `keel` processes
/// that share them.
pub async fn shared_stores() -> Vec<(String, String)> {
    let database = keel_testkit::fresh_database().await;
    let (redis, prefix) = keel_testkit::fresh_prefix().await;
    vec![
        ("KEEL_DATABASE_URL".into(), database),
        ("KEEL_REDIS_URL".into(), redis),
        ("KEEL_REDIS_PREFIX".into(), prefix),
    ]
}

/// Registers `email` (with [`super::PASSWORD`]) through the REST gateway at `http`; the access
/// token.
pub async fn register_over_rest(http: SocketAddr, email: &str) -> String {
    let registered: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{http}/v1/auth:register"))
        .json(&serde_json::json!({"email": email, "password": super::PASSWORD}))
        .send()
        .await
        .expect("POST /v1/auth:register")
        .json()
        .await
        .expect("a JSON body");
    registered["accessToken"]
        .as_str()
        .unwrap_or_else(|| panic!("registered {email}: {registered}"))
        .to_owned()
}

/// A running `keel worker`: jobs only, health and metrics on its admin port.
pub struct WorkerProcess {
    pub child: Child,
    pub admin_addr: SocketAddr,
    logs: Arc<Mutex<String>>,
}

impl WorkerProcess {
    /// Starts `keel worker` over the data dir `data_dir` (shared with the process whose jobs it
    /// runs) with extra environment `env`, and waits for its banner.
    pub async fn start<K, V>(data_dir: &std::path::Path, env: &[(K, V)]) -> Self
    where
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        let mut command = keel_command(data_dir);
        command.envs(env.iter().map(|(k, v)| (k, v))).args([
            "worker",
            "--admin-addr",
            "127.0.0.1:0",
        ]);
        let mut child = command.spawn().expect("spawn keel worker");
        let logs = collect_logs(child.stderr.take().expect("stderr"));
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut admin = None;
        let banner = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.trim().strip_prefix("admin  http://") {
                    admin = rest.split('/').next().and_then(|a| a.parse().ok());
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(60), banner).await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let Some(admin_addr) = admin else {
            panic!(
                "keel worker printed no banner; logs:\n{}",
                logs.lock().unwrap()
            );
        };
        Self {
            child,
            admin_addr,
            logs,
        }
    }

    /// Everything the worker logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits (bounded) until the process has exited, and says how.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the worker to exit")
            .expect("wait for the worker")
    }
}

/// The environment that points a process at the gRPC services at `grpc` for every peer.
pub fn peers_at(grpc: SocketAddr) -> Vec<(String, String)> {
    keel::domain::DOMAINS
        .iter()
        .map(|d| {
            (
                format!("KEEL_{}_ENDPOINTS", d.name.to_uppercase()),
                grpc.to_string(),
            )
        })
        .collect()
}

/// Everything a child writes to `stderr` (its log), gathered as it comes.
fn collect_logs(stderr: tokio::process::ChildStderr) -> Arc<Mutex<String>> {
    let logs = Arc::new(Mutex::new(String::new()));
    tokio::spawn({
        let logs = logs.clone();
        async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut logs = logs.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        }
    });
    logs
}
