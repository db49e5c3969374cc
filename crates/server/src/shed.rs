//! Server-side protection: at most N calls in flight per gRPC service; beyond that, calls are
//! refused at once with RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms` instead of queueing
//! without bound. Health and reflection are never shed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service};

use keel_mesh::trailers::OnTrailers;

/// Per-service concurrency limits.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    limits: Arc<HashMap<String, Arc<Semaphore>>>,
    pushback: Duration,
    refused: Option<prometheus::IntCounterVec>,
}

impl ShedLayer {
    /// `limit` calls in flight for each of `services` (fully-qualified gRPC names); refused calls
    /// are told to retry after `pushback`.
    pub fn new<'a>(
        services: impl IntoIterator<Item = &'a str>,
        limit: usize,
        pushback: Duration,
    ) -> Self {
        let limits = services
            .into_iter()
            .map(|s| (s.to_owned(), Arc::new(Semaphore::new(limit.max(1)))))
            .collect();
        Self {
            limits: Arc::new(limits),
            pushback,
            refused: None,
        }
    }

    /// Counts refused calls in `refused`, labelled `grpc_service`, `grpc_method` and `reason`
    /// (`limit`).
    pub fn counted(mut self, refused: prometheus::IntCounterVec) -> Self {
        self.refused = Some(refused);
        self
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ShedLayer`].
#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

impl<S, B> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let service = request
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let Some(limit) = self.layer.limits.get(service) else {
            return Box::pin(self.inner.call(request));
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            if let Some(refused) = &self.layer.refused {
                let (_, method) = keel_mesh::status::split_path(request.uri().path());
                refused.with_label_values(&[service, method, "limit"]).inc();
            }
            let status = tonic::Status::resource_exhausted(format!(
                "{service} is at capacity; retry after the pushback"
            ));
            let mut response = status.into_http::<Body>();
            let pushback = self.layer.pushback.as_millis().to_string();
            if let Ok(value) = HeaderValue::from_str(&pushback) {
                response
                    .headers_mut()
                    .insert("grpc-retry-pushback-ms", value);
            }
            return Box::pin(async move { Ok(response) });
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // The call holds its place until its last frame: streams count while they stream.
            Ok(response.map(|body| OnTrailers::wrap(body, move |_| drop(permit))))
        })
    }
}
