//! A closed-loop gRPC load generator for keel's benchmarks: N workers, each calling as fast as
//! its answers come, for a fixed time, recording every latency.

#![allow(dead_code)]

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

/// A release `keel` process for a benchmark.
pub struct Keel {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub endpoint: String,
    rest: String,
    _data_dir: tempfile::TempDir,
}

impl Keel {
    /// Starts the release binary with `args` and `env` on a loopback port; waits for its banner.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let data_dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--log",
                "warn",
            ])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn keel");
        let pid = child.id().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut endpoint, mut rest) = (None, None);
        while let Some(line) = lines.next_line().await.unwrap() {
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("gRPC") {
                endpoint = Some(format!("http://{}", addr.trim()));
            }
            if let Some(addr) = line.strip_prefix("REST   http://") {
                rest = addr.split('/').next().map(|a| format!("http://{a}"));
            }
            if endpoint.is_some() && rest.is_some() {
                break;
            }
        }
        Self {
            child,
            pid,
            endpoint: endpoint.expect("keel printed its banner"),
            rest: rest.expect("keel printed its REST address"),
            _data_dir: data_dir,
        }
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
