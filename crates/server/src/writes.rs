//! Writes over gRPC are limited per caller as REST requests are: every call of a method that is
//! not NO_SIDE_EFFECTS spends its caller's budget (the verified token's subject, else the client
//! address), RESOURCE_EXHAUSTED with RetryInfo past it. A call the process's own gateway makes
//! was limited at the edge already, and keel's services calling each other are not limited.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use keel_auth::Caller;
use keel_guard::{Callers, ClientAddr, Quota, RateLimiter};
use tonic::body::Body;
use tower::{Layer, Service};

/// See the module documentation.
#[derive(Clone)]
pub struct WriteLimitLayer {
    writes: Arc<HashSet<String>>,
    quota: Quota,
    limiter: Arc<RateLimiter>,
    callers: Callers,
}

impl std::fmt::Debug for WriteLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLimitLayer")
            .field("writes", &self.writes.len())
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

impl WriteLimitLayer {
    /// Limits the calls of `writes` (`/package.Service/Method`) to `quota` per caller, in
    /// `limiter`'s buckets; `callers` tells the address of an anonymous one.
    pub fn new(
        writes: impl IntoIterator<Item = String>,
        quota: Quota,
        limiter: Arc<RateLimiter>,
        callers: Callers,
    ) -> Self {
        Self {
            writes: Arc::new(writes.into_iter().collect()),
            quota,
            limiter,
            callers,
        }
    }

    /// The bucket `request` spends, if it spends one.
    fn bucket<B>(&self, request: &Request<B>) -> Option<String> {
        if !self.writes.contains(request.uri().path()) {
            return None;
        }
        let extensions = request.extensions();
        if extensions.get::<ClientAddr>().is_some() {
            // This process's gateway: limited at the edge, by the same caller.
            return None;
        }
        match extensions.get::<Caller>() {
            Some(caller) if caller.role == "service" => None,
            Some(caller) => Some(format!("grpc-writes:{}", caller.subject)),
            None => Some(format!("grpc-writes:{}", self.callers.of(request)?)),
        }
    }
}

impl<S> Layer<S> for WriteLimitLayer {
    type Service = WriteLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WriteLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`WriteLimitLayer`].
#[derive(Clone, Debug)]
pub struct WriteLimit<S> {
    inner: S,
    layer: WriteLimitLayer,
}

impl<S, B> Service<Request<B>> for WriteLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(bucket) = self.layer.bucket(&request) else {
            return Box::pin(self.inner.call(request));
        };
        // The service that was polled ready serves this call; a fresh clone waits its turn.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (limiter, quota) = (self.layer.limiter.clone(), self.layer.quota);
        Box::pin(async move {
            if let Err(wait) = limiter.check(&bucket, quota).await {
                let status = keel_guard::throttled("too many writes; retry later", wait);
                return Ok(status.into_http());
            }
            inner.call(request).await
        })
    }
}
