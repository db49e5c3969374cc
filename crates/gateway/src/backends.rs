//! Where the gateway sends each gRPC service's calls: one channel per service (a balanced mesh
//! channel in keel), or one for everything.

use std::collections::{HashMap, HashSet};

use tonic::body::Body;
use tower::BoxError;
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

/// A gRPC transport: anything tonic can call through.
pub type Backend = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BackendError>;

/// A transport failure below gRPC (a concrete type: tonic's bounds do not take a bare
/// `BoxError` in a `Send` future).
#[derive(Debug)]
pub struct BackendError(pub BoxError);

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// What a backend can be: a tower service that tonic can call through.
pub trait Transport:
    tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Transport for S where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// The backend of each fully-qualified gRPC service.
#[derive(Clone, Default)]
pub struct Backends {
    by_service: HashMap<String, Backend>,
    /// The backend of every service not named in `by_service`.
    fallback: Option<Backend>,
    /// The services whose backend is a [`crate::lane::Lane`] of this process.
    on_lane: HashSet<String>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("services", &self.by_service.keys().collect::<Vec<_>>())
            .field("fallback", &self.fallback.is_some())
            .field("on_lane", &self.on_lane)
            .finish()
    }
}

fn boxed(service: impl Transport) -> Backend {
    BoxCloneSyncService::new(service.map_err(|e| BackendError(e.into())))
}

impl Backends {
    /// Every service on one transport (a single server, as in tests).
    pub fn all(service: impl Transport) -> Self {
        Self {
            fallback: Some(boxed(service)),
            ..Self::default()
        }
    }

    /// Adds the transport of `grpc_service` (`package.Service`), off the lane if it was on it.
    #[must_use]
    pub fn with(mut self, grpc_service: &str, service: impl Transport) -> Self {
        self.on_lane.remove(grpc_service);
        self.by_service
            .insert(grpc_service.to_owned(), boxed(service));
        self
    }

    /// Adds `grpc_service` served in this process by `lane` (a [`crate::lane::Lane`]): its
    /// unary calls go on the lane, typed; its streams through the lane's routes.
    #[must_use]
    pub fn on_lane(self, grpc_service: &str, lane: impl Transport) -> Self {
        let mut backends = self.with(grpc_service, lane);
        backends.on_lane.insert(grpc_service.to_owned());
        backends
    }

    /// Whether `grpc_service` is served on the in-process lane.
    pub fn is_on_lane(&self, grpc_service: &str) -> bool {
        self.on_lane.contains(grpc_service)
    }

    /// The transport of `grpc_service`, if it has one.
    pub fn get(&self, grpc_service: &str) -> Option<&Backend> {
        self.by_service.get(grpc_service).or(self.fallback.as_ref())
    }
}
