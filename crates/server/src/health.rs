//! gRPC health (grpc.health.v1) whose Watch streams end when the drain starts, plus the
//! readiness that `/readyz` reports: ready or not, and, while ready, what it does without (a
//! dependency it can serve without, such as a cache, being away: degraded, not down).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthApi, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::Drain;

/// The health of every service a process serves. Services start NOT_SERVING and are flipped to
/// SERVING by the caller once their migrations ran and their stores answer.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Arc<Vec<String>>,
    ready: Arc<AtomicBool>,
    degraded: Arc<Mutex<BTreeSet<&'static str>>>,
    drain: Drain,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("services", &self.services)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Health {
    /// Health for `services` (fully-qualified gRPC names) plus the server as a whole (`""`),
    /// all NOT_SERVING, and the gRPC service that answers for them.
    pub async fn new(
        services: impl IntoIterator<Item = impl Into<String>>,
        drain: Drain,
    ) -> (Self, HealthServer<impl HealthApi>) {
        let reporter = HealthReporter::new();
        let mut names: Vec<String> = services.into_iter().map(Into::into).collect();
        names.push(String::new());
        for name in &names {
            reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let server = HealthServer::new(DrainingHealth {
            inner: HealthService::from_health_reporter(reporter.clone()),
            drain: drain.clone(),
        });
        let health = Self {
            reporter,
            services: Arc::new(names),
            ready: Arc::new(AtomicBool::new(false)),
            degraded: Arc::default(),
            drain,
        };
        (health, server)
    }

    /// Marks every service SERVING and the process ready, unless a drain has started.
    pub async fn serving(&self) {
        if self.drain.is_draining() {
            return;
        }
        self.set_all(ServingStatus::Serving).await;
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Marks every service NOT_SERVING and the process not ready.
    pub async fn not_serving(&self) {
        self.ready.store(false, Ordering::SeqCst);
        self.set_all(ServingStatus::NotServing).await;
    }

    /// Whether `/readyz` should answer 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.drain.is_draining()
    }

    /// Records whether the process is doing without `dependency` (it serves all the same).
    pub fn doing_without(&self, dependency: &'static str, without: bool) {
        let mut degraded = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        if without {
            degraded.insert(dependency);
        } else {
            degraded.remove(dependency);
        }
    }

    /// The dependencies the process is doing without now.
    pub fn degraded(&self) -> Vec<&'static str> {
        let degraded = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        degraded.iter().copied().collect()
    }

    async fn set_all(&self, status: ServingStatus) {
        for name in self.services.iter() {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// tonic-health's service, with Watch streams cut at the drain so that they do not hold the
/// server open for the whole grace period.
struct DrainingHealth {
    inner: HealthService,
    drain: Drain,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HealthApi for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = self.inner.watch(request).await?.into_inner();
        let drained = self.drain.started();
        // At the drain, say NOT_SERVING one last time (the update may not have been polled
        // yet), then end the stream.
        let last = HealthCheckResponse {
            status: tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
        };
        let stream = stream
            .take_until(drained)
            .chain(futures::stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(stream)))
    }
}
