//! A closed-loop gRPC load generator for keel's benchmarks: N workers, each calling as fast as
//! its answers come, for a fixed time, recording every latency.

#![allow(dead_code)]

pub mod ceiling;
pub mod external;
pub mod jobs;
pub mod shop;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub calls: usize,
    pub errors: usize,
    pub elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        self.latencies_us[rank] as f64 / 1000.0
    }
}

/// Runs `workers` loops of `call(worker index)` for `duration` (after `warmup`, which is not
/// recorded) and reports throughput and latency.
pub async fn run<F, Fut>(workers: usize, warmup: Duration, duration: Duration, call: F) -> Report
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let record_from = start + warmup;
    let stop_at = record_from + duration;
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            loop {
                let began = Instant::now();
                if began >= stop_at {
                    break;
                }
                let ok = call(worker).await;
                if began >= record_from {
                    latencies.push(began.elapsed().as_micros() as u64);
                    if !ok {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.expect("worker");
        latencies_us.extend(l);
        errors += e;
    }
    latencies_us.sort_unstable();
    Report {
        calls: latencies_us.len(),
        errors,
        elapsed: duration,
        latencies_us,
    }
}

/// Calls `call(n)` open loop: the n-th call is due at `n / rate` seconds whether or not earlier
/// ones have answered, and its latency counts from when it was due, so that a server that stalls
/// is charged for every call it held up (no coordinated omission). Calls due in `warmup` are not
/// recorded; a call that would exceed `max_in_flight` is not sent and counts as an error.
pub async fn run_at<F, Fut>(
    rate: f64,
    max_in_flight: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> Report
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let call = Arc::new(call);
    let runtime = tokio::runtime::Handle::current();
    let in_flight = Arc::new(AtomicUsize::new(0));
    // A thread of its own paces the calls: the runtime's timer ticks in milliseconds.
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        let record_from = start + warmup;
        let total = ((warmup + duration).as_secs_f64() * rate) as usize;
        let mut calls = Vec::with_capacity(total);
        for n in 0..total {
            let due = start + Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let recorded = due >= record_from;
            if in_flight.fetch_add(1, Ordering::SeqCst) >= max_in_flight {
                in_flight.fetch_sub(1, Ordering::SeqCst);
                calls.push(runtime.spawn(async move { recorded.then_some((0, false)) }));
                continue;
            }
            let (call, in_flight) = (call.clone(), in_flight.clone());
            calls.push(runtime.spawn(async move {
                let ok = call(n).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                recorded.then(|| (due.elapsed().as_micros() as u64, ok))
            }));
        }
        calls
    });
    let calls = tokio::task::spawn_blocking(move || pacer.join().expect("pacer"))
        .await
        .expect("pacer");
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for call in calls {
        if let Some((latency, ok)) = call.await.expect("call") {
            if ok {
                latencies_us.push(latency);
            } else {
                errors += 1;
            }
        }
    }
    latencies_us.sort_unstable();
    Report {
        calls: latencies_us.len() + errors,
        errors,
        elapsed: duration,
        latencies_us,
    }
}

/// Resident set size of process `pid` in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The release `keel` binary with `leading` arguments (a command, its addresses), an admin port
/// and a data dir of its own, quiet logs, the benchmarks' service secret, then `args` and `env`.
/// Passes keel's warnings and errors (it logs at `warn`) on to the bench's stderr: a retried
/// job or a refused call explains a number.
async fn echo_warnings(
    mut lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("keel: {line}");
    }
}

fn spawn(
    leading: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> (tokio::process::Child, tempfile::TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(leading)
        .args(["--admin-addr", "127.0.0.1:0", "--log", "warn"])
        .arg("--data-dir")
        .arg(data_dir.path())
        .args(args)
        .env("KEEL_SERVICE_SECRET", SERVICE_SECRET)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn keel");
    (child, data_dir)
}

/// Ephemeral PostgreSQL and Redis from the test kit: a fresh database and key prefix.
pub struct Stores {
    pub database: String,
    pub redis: String,
    pub prefix: String,
}

impl Stores {
    pub async fn fresh() -> Self {
        let database = keel_testkit::fresh_database().await;
        let (redis, prefix) = keel_testkit::fresh_prefix().await;
        Self {
            database,
            redis,
            prefix,
        }
    }

    /// The environment that points keel at them.
    pub fn env(&self) -> [(&'static str, &str); 3] {
        [
            ("KEEL_DATABASE_URL", self.database.as_str()),
            ("KEEL_REDIS_URL", self.redis.as_str()),
            ("KEEL_REDIS_PREFIX", self.prefix.as_str()),
        ]
    }
}

/// `units` euro cents.
pub fn eur(units: i64) -> Option<keel::proto::keel::r#type::v1::Money> {
    Some(keel::proto::keel::r#type::v1::Money {
        currency_code: "EUR".into(),
        units,
    })
}

/// Registers `email` with identity behind `channel`; its access token.
pub async fn register(channel: tonic::transport::Channel, email: &str) -> String {
    use keel::proto::keel::identity::v1::RegisterRequest;
    use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
    IdentityServiceClient::new(channel)
        .register(RegisterRequest {
            email: email.into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .expect("register")
        .into_inner()
        .access_token
}

/// The password of every user a benchmark registers.
const PASSWORD: &str = "correct horse battery";

/// Logs `email` (registered by [`register`]) in again: a fresh access token, for a run that
/// outlasts one (they live 15 minutes).
pub async fn login(channel: tonic::transport::Channel, email: &str) -> String {
    use keel::proto::keel::identity::v1::LoginRequest;
    use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
    IdentityServiceClient::new(channel)
        .login(LoginRequest {
            email: email.into(),
            password: PASSWORD.into(),
            device_token: String::new(),
        })
        .await
        .expect("login")
        .into_inner()
        .access_token
}

/// A release `keel` process for a benchmark.
pub struct Keel {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub endpoint: String,
    rest: String,
    admin: String,
    _data_dir: tempfile::TempDir,
}

impl Keel {
    /// Starts the release binary with `args` and `env` on a loopback port; waits for its banner.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let loopback = ["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
        let (mut child, data_dir) = spawn(&loopback, args, env);
        let pid = child.id().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut endpoint, mut rest, mut admin) = (None, None, None);
        while let Some(line) = lines.next_line().await.unwrap() {
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("gRPC") {
                endpoint = Some(format!("http://{}", addr.trim()));
            }
            if let Some(addr) = line.strip_prefix("REST   http://") {
                rest = addr.split('/').next().map(|a| format!("http://{a}"));
            }
            if let Some(addr) = line.strip_prefix("admin  http://") {
                admin = addr.split('/').next().map(|a| format!("http://{a}"));
            }
            if endpoint.is_some() && rest.is_some() && admin.is_some() {
                break;
            }
        }
        tokio::spawn(echo_warnings(lines));
        Self {
            child,
            pid,
            endpoint: endpoint.expect("keel printed its banner"),
            rest: rest.expect("keel printed its REST address"),
            admin: admin.expect("keel printed its admin address"),
            _data_dir: data_dir,
        }
    }

    /// One sample of its `/metrics`, or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric(&self.admin, series).await
    }

    /// Its admin port's base URL (`/metrics`, `/readyz`).
    pub fn admin(&self) -> &str {
        &self.admin
    }

    /// The environment that points another process (a `keel worker`) at this one's services.
    pub fn peers(&self) -> Vec<(String, String)> {
        let address = self.endpoint.trim_start_matches("http://");
        keel::registry::DOMAINS
            .iter()
            .map(|d| {
                let name = format!("KEEL_{}_ENDPOINTS", d.name.to_uppercase());
                (name, address.to_owned())
            })
            .collect()
    }

    /// The REST gateway's base URL.
    pub fn rest_endpoint(&self) -> &str {
        &self.rest
    }

    /// `n` separate HTTP/2 connections to it.
    pub async fn connections(&self, n: usize) -> Vec<tonic::transport::Channel> {
        let mut channels = Vec::new();
        for _ in 0..n {
            let channel = tonic::transport::Channel::from_shared(self.endpoint.clone()).unwrap();
            channels.push(channel.connect().await.expect("connect"));
        }
        channels
    }
}

/// The service secret every benchmark process shares.
pub const SERVICE_SECRET: &str = "keel-benchmarks-service-secret-0123456789";

/// A service token for the internal APIs, from identity behind `channel`.
pub async fn service_token(channel: tonic::transport::Channel) -> String {
    use keel::proto::keel::identity::v1::IssueServiceTokenRequest;
    use keel::proto::keel::identity::v1::service_token_service_client::ServiceTokenServiceClient;
    ServiceTokenServiceClient::new(channel)
        .issue_service_token(IssueServiceTokenRequest {
            service: "benchmarks".into(),
            secret: SERVICE_SECRET.into(),
        })
        .await
        .expect("a service token")
        .into_inner()
        .access_token
}

/// A release `keel worker` process: jobs only, metrics on its admin port.
pub struct Worker {
    pub child: tokio::process::Child,
    pub admin: String,
    _data_dir: tempfile::TempDir,
}

impl Worker {
    /// Starts `keel worker` with `args` and `env`; waits for its banner.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let (mut child, data_dir) = spawn(&["worker"], args, env);
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut admin = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.trim().strip_prefix("admin  http://") {
                admin = addr.split('/').next().map(|a| format!("http://{a}"));
                break;
            }
        }
        tokio::spawn(echo_warnings(lines));
        Self {
            child,
            admin: admin.expect("keel worker printed its admin address"),
            _data_dir: data_dir,
        }
    }

    /// One sample of its `/metrics`, or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric(&self.admin, series).await
    }
}

/// One sample of `series` from the `/metrics` of the admin port at `admin`, or 0.
async fn metric(admin: &str, series: &str) -> f64 {
    match keel_testkit::http::get(&format!("{admin}/metrics")).await {
        Ok((200, text)) => keel_testkit::http::metric(&text, series),
        _ => 0.0,
    }
}

/// `message` with `authorization: Bearer token`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// One Markdown table row.
pub fn row(scenario: &str, report: &Report) -> String {
    format!(
        "| {scenario} | {:.0} | {:.2} | {:.2} | {} |",
        report.per_second(),
        report.percentile_ms(50.0),
        report.percentile_ms(99.0),
        report.errors
    )
}
