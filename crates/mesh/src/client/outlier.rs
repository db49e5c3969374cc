//! Outlier ejection (Envoy's, simplified): an endpoint whose calls fail several times in a row
//! leaves the balancer for an interval that doubles with every ejection, even while its health
//! stream still says SERVING. A fast-failing endpoint would otherwise attract traffic: PeakEWMA
//! sees its quick answers as low load.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::Notify;
use tonic::Code;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::Service;

/// When to eject and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one doubles it.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_secs(10),
            max: Duration::from_secs(120),
        }
    }
}

/// One endpoint's failure streak, shared by its service and its watcher.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: AtomicU32,
    threshold: AtomicU32,
    /// Signalled when the streak reaches the threshold.
    pub eject: Notify,
}

impl Outlier {
    /// A tracker that ejects after `threshold` failures in a row.
    pub fn new(threshold: u32) -> Arc<Self> {
        Arc::new(Self {
            consecutive: AtomicU32::new(0),
            threshold: AtomicU32::new(threshold.max(1)),
            eject: Notify::new(),
        })
    }

    /// Ejects at once: the endpoint refused or dropped the connection.
    fn down(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.eject.notify_one();
    }

    fn record(&self, failed: bool) {
        if !failed {
            self.consecutive.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= self.threshold.load(Ordering::Relaxed) {
            self.consecutive.store(0, Ordering::Relaxed);
            self.eject.notify_one();
        }
    }
}

/// Puts the endpoint under pressure (as a refusal does) when an attempt is dropped unanswered
/// because a hedge answered first.
struct SlowIfAbandoned(Option<(super::hedge::Abandoned, Arc<super::pushback::Pressure>)>);

impl SlowIfAbandoned {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for SlowIfAbandoned {
    fn drop(&mut self) {
        if let Some((abandoned, pressure)) = self.0.take()
            && abandoned.is_set()
        {
            pressure.refused(super::pushback::DEFAULT_PAUSE);
        }
    }
}

/// How an attempt on an endpoint went, as its metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Answered (with any status but UNAVAILABLE and an overload refusal).
    Ok,
    /// UNAVAILABLE, or the connection failed.
    Failed,
    /// Refused for overload: RESOURCE_EXHAUSTED, or UNAVAILABLE with a pushback.
    Refused,
}

impl Attempt {
    /// Every outcome, as the metric's `outcome` label.
    pub const ALL: [Attempt; 3] = [Attempt::Ok, Attempt::Failed, Attempt::Refused];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Attempt::Ok => "ok",
            Attempt::Failed => "failed",
            Attempt::Refused => "refused",
        }
    }
}

/// An endpoint's connections, taken in turn, reporting every outcome to its [`Outlier`].
#[derive(Debug, Clone)]
pub struct Observed {
    /// Handles on the endpoint's connections: each clone of `Observed` holds its own, so
    /// that the readiness `poll_ready` gains stays with the handle that is then called.
    pub(super) connections: Vec<Channel>,
    /// The connection that the next call goes on (the one `poll_ready` made ready).
    pub(super) next: usize,
    pub(super) outlier: Arc<Outlier>,
    /// Its overload refusals, which keep it out of the pick for their pushback.
    pub(super) pressure: Arc<super::pushback::Pressure>,
    pub(super) metrics: Option<super::metrics::EndpointMetrics>,
}

impl Service<Request<Body>> for Observed {
    type Response = Response<Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connection().poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let request_abandoned = request
            .extensions()
            .get::<super::hedge::Abandoned>()
            .cloned();
        let future = self.connection().call(request);
        self.next = (self.next + 1) % self.connections.len();
        let (outlier, metrics) = (self.outlier.clone(), self.metrics.clone());
        let pressure = self.pressure.clone();
        // A first attempt abandoned for a hedge that answered sooner: this endpoint was slow,
        // and the cancellation must not make it look fast.
        let slow =
            SlowIfAbandoned(request_abandoned.map(|abandoned| (abandoned, self.pressure.clone())));
        Box::pin(async move {
            let result = future.await;
            slow.answered();
            let outcome = match &result {
                Ok(response) => {
                    let failed = super::retry::header_status(response) == Some(Code::Unavailable);
                    outlier.record(failed);
                    if let Some(pause) = super::pushback::refusal(response) {
                        pressure.refused(pause);
                        Attempt::Refused
                    } else if failed {
                        Attempt::Failed
                    } else {
                        Attempt::Ok
                    }
                }
                Err(e) if super::failure::connection_lost(e) => {
                    outlier.down();
                    Attempt::Failed
                }
                Err(_) => {
                    outlier.record(true);
                    Attempt::Failed
                }
            };
            if let Some(metrics) = metrics {
                metrics.attempt(outcome);
            }
            result
        })
    }
}

impl Observed {
    fn connection(&mut self) -> &mut Channel {
        &mut self.connections[self.next]
    }
}
