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
