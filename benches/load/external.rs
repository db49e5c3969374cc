//! Closed-loop load from generators cheaper than the servers they drive: h2load (nghttp2) for
//! gRPC and HTTP/2, wrk for HTTP/1.1. Each runs as a process of its own; its report is parsed.

use std::time::Duration;

/// What a generator measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub per_second: f64,
    /// Calls not answered 2xx (or not answered at all).
    pub errors: u64,
    /// Latency percentiles in ms, when the generator gives them (wrk does, h2load does not).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
}

impl From<&super::Report> for Measured {
    fn from(report: &super::Report) -> Self {
        Self {
            per_second: report.per_second(),
            errors: report.errors as u64,
            p50_ms: Some(report.percentile_ms(50.0)),
            p99_ms: Some(report.percentile_ms(99.0)),
            p999_ms: Some(report.percentile_ms(99.9)),
        }
    }
}

/// One closed-loop run: `connections` connections, `in_flight` calls in flight in all, `warmup`
/// unrecorded, then `duration` recorded.
pub struct Closed<'a> {
    pub url: &'a str,
    pub headers: &'a [String],
    pub connections: usize,
    pub in_flight: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// h2load over HTTP/2 (prior knowledge); `body` makes it a POST of those bytes (a gRPC frame).
pub async fn h2load(run: &Closed<'_>, body: Option<&[u8]>) -> Measured {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut command = tokio::process::Command::new("h2load");
    command
        .args(["-t", "1", "-c", &run.connections.to_string()])
        .args(["-m", &(run.in_flight / run.connections).to_string()])
        .arg(format!("--warm-up-time={}", run.warmup.as_secs_f64()))
        .args(["-D", &run.duration.as_secs().to_string()]);
    if let Some(body) = body {
        let file = dir.path().join("body");
        std::fs::write(&file, body).expect("write the request body");
        command.arg("-d").arg(file);
    }
    for header in run.headers {
        command.args(["-H", header]);
    }
    let report = output(command.arg(run.url)).await;
    let number = |line: &str, before: &str| -> f64 {
        field(&report, line, before).unwrap_or_else(|| panic!("h2load said:\n{report}"))
    };
    let succeeded = number("status codes:", "2xx");
    let done = number("requests:", "total");
    Measured {
        per_second: number("finished in", "req/s"),
        errors: (done - succeeded).max(0.0) as u64,
        p50_ms: None,
        p99_ms: None,
        p999_ms: None,
    }
}

/// wrk over HTTP/1.1 keep-alive connections, one per call in flight; a first run of `warmup`
/// is not recorded.
pub async fn wrk(run: &Closed<'_>) -> Measured {
    let command = |seconds: f64| {
        let mut command = tokio::process::Command::new("wrk");
        command
            .args(["-t", "1", "-c", &run.in_flight.to_string()])
            .arg(format!("-d{seconds}s"))
            .arg("--latency");
        for header in run.headers {
            command.args(["-H", header]);
        }
        command.arg(run.url);
        command
    };
    output(&mut command(run.warmup.as_secs_f64().max(1.0))).await;
    let report = output(&mut command(run.duration.as_secs_f64())).await;
    let per_second =
        field(&report, "Requests/sec:", "").unwrap_or_else(|| panic!("wrk said:\n{report}"));
    let non_2xx = field(&report, "Non-2xx or 3xx responses:", "").unwrap_or(0.0);
    let socket = report
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
        .map_or(0.0, |l| {
            l.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<f64>().ok())
                .sum()
        });
    Measured {
        per_second,
        errors: (non_2xx + socket) as u64,
        p50_ms: percentile(&report, "50%"),
        p99_ms: percentile(&report, "99%"),
        p999_ms: None,
    }
}

async fn output(command: &mut tokio::process::Command) -> String {
    let output = command
        .output()
        .await
        .expect("the load generator runs (h2load: nghttp2-client; wrk)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The number just before `before` (or the first number, when `before` is empty) on the line
/// that starts with `line`.
fn field(report: &str, line: &str, before: &str) -> Option<f64> {
    let text = report.lines().find(|l| l.trim_start().starts_with(line))?;
    let text = text.trim_start().strip_prefix(line)?;
    let words: Vec<&str> = text.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let at = if before.is_empty() {
        0
    } else {
        words.iter().position(|w| *w == before)?.checked_sub(1)?
    };
    words[at..]
        .iter()
        .find_map(|w| w.trim_end_matches('s').parse().ok())
}

/// wrk's latency distribution line `  99%    4.10ms`, in ms.
fn percentile(report: &str, which: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.trim_start().starts_with(which))?;
    let value = line.split_whitespace().nth(1)?;
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1e3)
    } else {
        (value, 1.0)
    };
    Some(number.parse::<f64>().ok()? * scale)
}
