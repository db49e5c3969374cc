//! Where the gateway sends each gRPC service's calls: one channel per service (a balanced mesh
//! channel in keel), or one for everything.

use std::collections::HashMap;

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

/// The backend of each fully-qualified gRPC service.
#[derive(Clone, Default)]
pub struct Backends {
    by_service: HashMap<String, Backend>,
    /// The backend of every service not named in `by_service`.
    fallback: Option<Backend>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("services", &self.by_service.keys().collect::<Vec<_>>())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

fn boxed<S>(service: S) -> Backend
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(service.map_err(|e| BackendError(e.into())))
}

impl Backends {
    /// Every service on one transport (a single server, as in tests).
    pub fn all<S>(service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        Self {
            by_service: HashMap::new(),
            fallback: Some(boxed(service)),
        }
    }

    /// Adds the transport of `grpc_service` (`package.Service`).
    #[must_use]
    pub fn with<S>(mut self, grpc_service: &str, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.by_service
            .insert(grpc_service.to_owned(), boxed(service));
        self
    }

    /// The transport of `grpc_service`, if it has one.
    pub fn get(&self, grpc_service: &str) -> Option<&Backend> {
        self.by_service.get(grpc_service).or(self.fallback.as_ref())
    }
}
