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

/// An endpoint's connections, taken in turn, reporting every outcome to its [`Outlier`].
#[derive(Debug, Clone)]
pub struct Observed {
    /// Handles on the endpoint's connections: each clone of `Observed` holds its own, so
    /// that the readiness `poll_ready` gains stays with the handle that is then called.
    pub(super) connections: Vec<Channel>,
    /// The connection that the next call goes on (the one `poll_ready` made ready).
    pub(super) next: usize,
    pub(super) outlier: Arc<Outlier>,
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
        let future = self.connection().call(request);
        self.next = (self.next + 1) % self.connections.len();
        let (outlier, metrics) = (self.outlier.clone(), self.metrics.clone());
        Box::pin(async move {
            let result = future.await;
            let ok = match &result {
                Ok(response) => {
                    let failed = super::retry::header_status(response) == Some(Code::Unavailable);
                    outlier.record(failed);
                    !failed
                }
                Err(e) if super::failure::connection_lost(e) => {
                    outlier.down();
                    false
                }
                Err(_) => {
                    outlier.record(true);
                    false
                }
            };
            if let Some(metrics) = metrics {
                metrics.attempt(ok);
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
