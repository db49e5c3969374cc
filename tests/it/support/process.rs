//! The real `keel` binary as a child process: started on port 0, its addresses read from the
//! banner, its logs kept for assertions, killed if a test forgets it.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::proto::keel::jobs::v1::job_service_client::JobServiceClient;
use keel::proto::keel::jobs::v1::{CreateJobRequest, GetJobRequest, Job, job};
use keel::proto::keel::orders::v1::order_service_client::OrderServiceClient;
use keel::proto::keel::orders::v1::{GetOrderRequest, Order};
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

/// A signing key written by `keel keys rotate` into `dir/keys`, a directory that does not exist
/// yet (as deploy/README.md has a user make it); the key directory.
pub async fn rotated_keys(dir: &std::path::Path) -> std::path::PathBuf {
    let keys = dir.join("keys");
    let rotated = keel_command(dir)
        .env("KEEL_SIGNING_KEY", &keys)
        .args(["keys", "rotate"])
        .output()
        .await
        .unwrap();
    assert!(rotated.status.success(), "keel keys rotate: {rotated:?}");
    keys
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

/// A keel that runs no worker of its own, over PostgreSQL and Redis or over the embedded stores,
/// and the `keel worker` processes a test starts beside it.
pub struct Fleet {
    pub keel: KeelProcess,
    /// The stores' settings (and any `env` it was started with), which its workers share.
    pub env: Vec<(String, String)>,
    /// An admin's access token.
    pub admin: String,
    /// A buyer's access token.
    pub ada: String,
}

impl Fleet {
    /// Over PostgreSQL and Redis (`postgres`) or the embedded stores, with `env` for the keel and
    /// every worker.
    pub async fn start(postgres: bool, env: &[(&str, &str)]) -> Self {
        let mut stores = if postgres {
            shared_stores().await
        } else {
            Vec::new()
        };
        stores.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let keel = KeelProcess::start_with_env(
            &[
                "dev",
                "--worker-concurrency",
                "0",
                "--auth-rate-limit",
                "off",
                "--rate-limit",
                "off",
            ],
            &stores,
        )
        .await;
        let admin = register_over_rest(keel.http_addr, "admin@example.com").await;
        let ada = register_over_rest(keel.http_addr, "ada@example.com").await;
        Self {
            keel,
            env: stores,
            admin,
            ada,
        }
    }

    /// A fleet around a keel already started (over the stores of its environment), with
    /// `admin`'s token.
    pub fn alongside(keel: KeelProcess, admin: String) -> Self {
        Self {
            keel,
            env: Vec::new(),
            ada: admin.clone(),
            admin,
        }
    }

    /// A `keel worker` over the same stores and data dir, reaching the keel's services, with
    /// short leases and `extra` settings.
    pub async fn worker(&self, extra: &[(&str, &str)]) -> WorkerProcess {
        let mut env = self.env.clone();
        env.extend(peers_at(self.keel.grpc_addr()));
        env.push(("KEEL_JOB_LEASE".into(), "1s".into()));
        env.push(("KEEL_JOB_POLL".into(), "20ms".into()));
        env.push(("KEEL_JOB_BACKOFF".into(), "100ms".into()));
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        WorkerProcess::start(self.keel.data_dir.path(), &env).await
    }

    /// The database both share.
    pub async fn db(&self) -> sea_orm::DatabaseConnection {
        let url = match self.env.iter().find(|(k, _)| k == "KEEL_DATABASE_URL") {
            Some((_, url)) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rw",
                self.keel.data_dir.path().join("keel.db").display()
            ),
        };
        sea_orm::Database::connect(url).await.unwrap()
    }

    /// A job of `kind` made by the admin.
    pub async fn job(&self, kind: &str, payload: serde_json::Value) -> Job {
        JobServiceClient::new(self.keel.channel().await)
            .create_job(super::authed(
                CreateJobRequest {
                    job: Some(Job {
                        r#type: kind.into(),
                        payload: Some(keel::proto::json_to_struct(&payload)),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
                &self.admin,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// Job `name` once it is in `state`.
    pub async fn until_job(&self, name: &str, state: job::State) -> Job {
        let client = JobServiceClient::new(self.keel.channel().await);
        keel_testkit::eventually(Duration::from_secs(60), "the job's state", || {
            let (mut client, name) = (client.clone(), name.to_owned());
            async move {
                let found = client
                    .get_job(super::authed(GetJobRequest { name }, &self.admin))
                    .await
                    .unwrap()
                    .into_inner();
                (found.state() == state).then_some(found)
            }
        })
        .await
    }

    /// Order `name` as `buyer` sees it.
    pub async fn order_of(&self, name: &str, buyer: &str) -> Order {
        OrderServiceClient::new(self.keel.channel().await)
            .get_order(super::authed(GetOrderRequest { name: name.into() }, buyer))
            .await
            .unwrap()
            .into_inner()
    }
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
        let arms_faults = env.iter().any(|(k, _)| k.as_ref() == "KEEL_FAULT_POINTS");
        assert!(
            !arms_faults || cfg!(feature = "fault-injection"),
            "fault points need the fault-injection feature: run the suite as ./scripts/test does"
        );
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

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the worker is running")
    }

    /// Waits (bounded) until the process halted at a fault point — stopped itself (SIGSTOP) or
    /// exited (killed itself) — (`true`), or until `settled` says there is nothing left to wait
    /// for (`false`).
    pub async fn halted_or<F, Fut>(&self, settled: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let pid = self.pid();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match process_state(pid) {
                Some('T' | 'Z') | None => return true,
                Some(_) if settled().await => return false,
                Some(_) => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker neither halted nor settled in 60 s; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGCONT: a worker stopped at a fault point goes on from there.
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Sends SIGKILL.
    pub fn kill(&self) {
        signal(self.pid(), "-KILL");
    }

    /// One sample of its `/metrics`.
    pub async fn metric(&self, series: &str) -> f64 {
        let (status, body) =
            keel_testkit::http::get(&format!("http://{}/metrics", self.admin_addr))
                .await
                .expect("GET /metrics");
        assert_eq!(status, 200);
        keel_testkit::http::metric(&body, series)
    }

    /// The sum of every sample of `name` (over its labels) in its `/metrics`.
    pub async fn metrics_sum(&self, name: &str) -> f64 {
        let (_, body) = keel_testkit::http::get(&format!("http://{}/metrics", self.admin_addr))
            .await
            .expect("GET /metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Waits (bounded) until the process has exited, and says how.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the worker to exit")
            .expect("wait for the worker")
    }
}

/// The state letter of process `pid` (`R`, `S`, `T` when stopped), if it is still there.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: the state follows the last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// The environment that points a process at the gRPC services at `grpc` for every peer.
pub fn peers_at(grpc: SocketAddr) -> Vec<(String, String)> {
    keel::registry::DOMAINS
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
