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

/// The health of every service a process serves. Services start NOT_SERVING and are SERVING
/// once the caller says the process is up and it waits for nothing (a store a probe finds
/// down, a start-up step), until it is stopped or drained.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Arc<Vec<String>>,
    ready: Arc<AtomicBool>,
    degraded: Arc<Mutex<BTreeSet<&'static str>>>,
    /// What the process waits for before it is ready; empty when it is.
    waiting: Arc<Mutex<BTreeSet<&'static str>>>,
    /// Held while a change is applied, so that the statuses set are those of the last change.
    applying: Arc<tokio::sync::Mutex<()>>,
    drain: Drain,
}

/// What a process waits for until the caller says it is up.
const STARTING: &str = "start-up";
/// What a stopped process waits for: being started again.
const STOPPED: &str = "a start (stopped)";

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
            waiting: Arc::new(Mutex::new(BTreeSet::from([STARTING]))),
            applying: Arc::default(),
            drain,
        };
        (health, server)
    }

    /// The process is up: every service SERVING and the process ready, unless it waits for
    /// something else or a drain has started.
    pub async fn serving(&self) {
        self.update(|waiting| {
            waiting.remove(STARTING);
            waiting.remove(STOPPED);
        })
        .await;
    }

    /// The process stops: every service NOT_SERVING and the process not ready, whatever a probe
    /// reports later, until [`Health::serving`] again.
    pub async fn not_serving(&self) {
        self.update(|waiting| {
            waiting.insert(STOPPED);
        })
        .await;
    }

    /// Records whether the process waits for `what` (a dependency it cannot serve without, a
    /// start-up step) before it is ready.
    pub async fn waiting_for(&self, what: &'static str, waiting: bool) {
        self.update(|set| {
            if waiting {
                set.insert(what);
            } else {
                set.remove(what);
            }
        })
        .await;
    }

    /// What the process waits for before it is ready.
    pub fn waiting(&self) -> Vec<&'static str> {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.iter().copied().collect()
    }

    /// Applies `change` to what the process waits for, then the statuses that follow from it:
    /// one change at a time, so that two reporters racing cannot leave the statuses of the
    /// earlier change.
    async fn update(&self, change: impl FnOnce(&mut BTreeSet<&'static str>)) {
        let _one_at_a_time = self.applying.lock().await;
        let nothing_awaited = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            change(&mut waiting);
            waiting.is_empty()
        };
        let ready = nothing_awaited && !self.drain.is_draining();
        if !ready {
            self.ready.store(false, Ordering::SeqCst);
        }
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.set_all(status).await;
        if ready {
            self.ready.store(true, Ordering::SeqCst);
        }
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
        let answer = self.inner.check(request).await?;
        if self.drain.is_draining() {
            // Whatever a last update said: a draining server is leaving.
            return Ok(Response::new(HealthCheckResponse {
                status: tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
            }));
        }
        Ok(answer)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_is_ready_only_while_it_waits_for_nothing() {
        let (health, _) = Health::new(["keel.todos.v1.TodoService"], Drain::new()).await;
        health.waiting_for("the token key set", true).await;
        health.serving().await;
        assert!(!health.is_ready(), "up, but without its key set");
        // The database probe finds it down before the key set arrives...
        health.waiting_for("the database", true).await;
        health.waiting_for("the token key set", false).await;
        assert!(!health.is_ready(), "the key set is not the database");
        assert_eq!(health.waiting(), ["the database"]);
        health.waiting_for("the database", false).await;
        assert!(health.is_ready());
    }

    #[tokio::test]
    async fn a_stopped_process_stays_stopped_whatever_a_probe_reports() {
        let drain = Drain::new();
        let (health, _) = Health::new(["keel.todos.v1.TodoService"], drain.clone()).await;
        let server = DrainingHealth {
            inner: HealthService::from_health_reporter(health.reporter.clone()),
            drain: drain.clone(),
        };
        health.serving().await;
        assert!(health.is_ready());
        health.not_serving().await;
        drain.start();
        health.waiting_for("the database", false).await;
        assert!(!health.is_ready());
        let answer = server
            .check(Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.status,
            tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
        );
    }
}
