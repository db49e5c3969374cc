//! Retries that can never multiply an outage: only methods whose proto says they are safe to
//! retry (`idempotency_level` NO_SIDE_EFFECTS or IDEMPOTENT) or that carry their idempotency
//! key, only on UNAVAILABLE or a broken connection (never DEADLINE_EXCEEDED), each on an endpoint
//! the call has not tried while there is one, at most a few attempts, all within Linkerd's budget
//! (20% of requests plus 10 per second over a 10 s window), and never sooner than the server's
//! `grpc-retry-pushback-ms` (a negative pushback means "do not retry").

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use prost::Message as _;
use tokio::sync::watch;
use tonic::Code;
use tonic::body::Body;
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{Service, ServiceExt as _};

use super::{MeshError, Tried};

/// Attempts per call at most, the first included.
const MAX_ATTEMPTS: usize = 3;

/// The `/package.Service/Method` paths that are safe to retry, from encoded descriptor sets.
pub fn idempotent_methods(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    use prost_types::method_options::IdempotencyLevel;
    let mut paths = HashSet::new();
    for bytes in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
            continue;
        };
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let level = method.options.as_ref().map(|o| o.idempotency_level());
                    if matches!(
                        level,
                        Some(IdempotencyLevel::NoSideEffects | IdempotencyLevel::Idempotent)
                    ) {
                        paths.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
    }
    paths
}

/// The retry policy shared by every clone of a channel.
#[derive(Debug)]
pub struct RetryPolicy {
    idempotent: HashSet<String>,
    budget: TpsBudget,
    default_timeout: Option<Duration>,
    peer: String,
    metrics: Option<super::ClientMetrics>,
    /// Paths retried only when their request sets the key field (number).
    pub(super) keyed: std::collections::HashMap<String, u32>,
    /// How many endpoints the balancer holds.
    pub(super) admitted: watch::Receiver<usize>,
    /// How long a call waits for one when there are none.
    pub(super) fail_fast: Duration,
}

impl RetryPolicy {
    /// Retries `idempotent` paths within Linkerd's default budget; calls without a deadline get
    /// `default_timeout`.
    pub fn new(
        idempotent: HashSet<String>,
        default_timeout: Option<Duration>,
        peer: String,
        metrics: Option<super::ClientMetrics>,
    ) -> Self {
        Self {
            idempotent,
            budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
            default_timeout,
            peer,
            metrics,
            keyed: std::collections::HashMap::new(),
            // Without a balancer to watch: always an endpoint.
            admitted: watch::channel(1).1,
            fail_fast: Duration::from_secs(3),
        }
    }

    /// Waits up to the fail-fast time for the balancer to hold an endpoint; when none comes,
    /// the UNAVAILABLE answer to give instead of queueing the call until its deadline.
    async fn no_endpoint(&self) -> Option<Response<Body>> {
        let mut admitted = self.admitted.clone();
        if *admitted.borrow() > 0 {
            return None;
        }
        match tokio::time::timeout(self.fail_fast, admitted.wait_for(|n| *n > 0)).await {
            Ok(Ok(_)) => None,
            _ => Some(
                tonic::Status::unavailable(format!("no endpoint of {} is serving", self.peer))
                    .into_http(),
            ),
        }
    }
}

/// A status a response carries in its headers (a trailers-only response), if any.
pub(super) fn header_status(response: &Response<Body>) -> Option<Code> {
    crate::status::grpc_status(response.headers())
}

/// Whether the server gave up on the call's deadline (tonic's CANCELLED "Timeout expired").
fn server_timed_out(response: &Response<Body>) -> bool {
    header_status(response) == Some(Code::Cancelled)
        && response
            .headers()
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains("Timeout expired"))
}

/// Whether a transport error is tonic's client-side `TimeoutExpired`.
fn timed_out(error: &MeshError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn pushback(response: &Response<Body>) -> Option<Duration> {
    let value: i64 = response
        .headers()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    // Negative: the server asks not to retry at all; signalled as an absurdly long wait.
    Some(u64::try_from(value).map_or(Duration::MAX, Duration::from_millis))
}

/// Wraps a balanced service with retries.
#[derive(Clone)]
pub struct Retrying<S> {
    pub(super) inner: S,
    pub(super) policy: Arc<RetryPolicy>,
}

impl<S> Service<Request<Body>> for Retrying<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = MeshError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = MeshError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, MeshError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), MeshError>> {
        // Readiness is checked per attempt, on a clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(metrics) = self.policy.metrics.clone() else {
            return self.deadline_bound(request);
        };
        let peer = self.policy.peer.clone();
        let (service, method) = super::metrics::split(request.uri().path());
        let labels = [peer, service.to_owned(), method.to_owned()];
        metrics.started.with_label_values(&labels).inc();
        let started = std::time::Instant::now();
        let future = self.deadline_bound(request);
        Box::pin(async move {
            let result = future.await;
            let record = move |code: Code| {
                let [peer, service, method] = &labels;
                metrics
                    .handled
                    .with_label_values(&[
                        peer.as_str(),
                        service,
                        method,
                        crate::status::code_name(code),
                    ])
                    .inc();
                metrics
                    .handling
                    .with_label_values(&labels)
                    .observe(started.elapsed().as_secs_f64());
            };
            match result {
                Ok(response) => match header_status(&response) {
                    Some(code) => {
                        record(code);
                        Ok(response)
                    }
                    None => Ok(response.map(|body| {
                        crate::trailers::OnTrailers::wrap(body, move |trailers| {
                            let code = trailers
                                .and_then(|t| crate::status::grpc_status(t))
                                .unwrap_or(Code::Unknown);
                            record(code);
                        })
                    })),
                },
                Err(e) => {
                    record(Code::Unavailable);
                    Err(e)
                }
            }
        })
    }
}

impl<S> Retrying<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = MeshError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// The call with its deadline applied.
    fn deadline_bound(
        &self,
        mut request: Request<Body>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, MeshError>> + Send>> {
        let policy = self.policy.clone();
        policy.budget.deposit();
        // The deadline: the caller's own grpc-timeout, else what is left of the call this task
        // serves, else the per-service default.
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::deadline::parse_grpc_timeout)
            .or_else(|| {
                crate::deadline::current()
                    .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
            })
            .or(policy.default_timeout);
        let Some(timeout) = timeout else {
            return Box::pin(self.attempts(request));
        };
        if timeout.is_zero() {
            let expired =
                tonic::Status::deadline_exceeded("the caller's deadline passed before this call");
            return Box::pin(async move { Ok(expired.into_http()) });
        }
        request.headers_mut().insert(
            "grpc-timeout",
            crate::deadline::format_grpc_timeout(timeout),
        );
        let attempts = self.attempts(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, attempts).await {
                // A tonic server that runs out of the call's time answers CANCELLED "Timeout
                // expired"; to the caller that is its deadline passing, as grpc-go reports it.
                Ok(Ok(response)) if server_timed_out(&response) => {
                    Ok(tonic::Status::deadline_exceeded("deadline exceeded").into_http())
                }
                // The same from tonic's own client-side timeout.
                Ok(Err(e)) if timed_out(&e) => {
                    Ok(tonic::Status::deadline_exceeded("deadline exceeded").into_http())
                }
                Ok(result) => result,
                // Never retried: the time is gone.
                Err(_) => Ok(tonic::Status::deadline_exceeded("deadline exceeded").into_http()),
            }
        })
    }
}

impl<S> Retrying<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = MeshError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    fn attempts(
        &self,
        request: Request<Body>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, MeshError>> + Send>> {
        let (inner, policy) = (self.inner.clone(), self.policy.clone());
        let idempotent = policy.idempotent.contains(request.uri().path());
        let key_field = policy.keyed.get(request.uri().path()).copied();
        if !idempotent && key_field.is_none() {
            // Never sent twice: whatever happens, one attempt.
            return Box::pin(async move {
                if let Some(unavailable) = policy.no_endpoint().await {
                    return Ok(unavailable);
                }
                inner.oneshot(request).await
            });
        }
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body: Bytes = body
                .collect()
                .await
                .map_err(|e| MeshError(format!("reading the request body: {e}").into()))?
                .to_bytes();
            // A call that carries its idempotency key is deduplicated by the server.
            let retryable =
                idempotent || key_field.is_some_and(|f| super::keyed::sets_key(&body, f));
            // The endpoints this call's attempts went to: the balancer sends a retry elsewhere.
            let tried = Tried::<std::net::SocketAddr>::default();
            let attempt = |parts: &http::request::Parts| {
                let mut request = Request::new(Body::new(
                    http_body_util::Full::new(body.clone()).map_err(|never| match never {}),
                ));
                *request.method_mut() = parts.method.clone();
                *request.uri_mut() = parts.uri.clone();
                *request.version_mut() = parts.version;
                *request.headers_mut() = parts.headers.clone();
                request.extensions_mut().insert(tried.clone());
                request
            };
            let mut attempts = 0;
            loop {
                if let Some(unavailable) = policy.no_endpoint().await {
                    return Ok(unavailable);
                }
                attempts += 1;
                let result = inner.clone().oneshot(attempt(&parts)).await;
                let wait = match &result {
                    Ok(response) if header_status(response) == Some(Code::Unavailable) => {
                        pushback(response).unwrap_or_default()
                    }
                    Ok(_) => return result,
                    // The connection failed or broke: safe to try again for these methods.
                    Err(_) => Duration::ZERO,
                };
                if !retryable
                    || attempts >= MAX_ATTEMPTS
                    || wait == Duration::MAX
                    || !policy.budget.withdraw()
                {
                    return result;
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
                }
                tracing::debug!(path = %parts.uri.path(), attempts, "retrying");
                if let Some(metrics) = &policy.metrics {
                    let (service, method) = super::metrics::split(parts.uri.path());
                    metrics
                        .retries
                        .with_label_values(&[policy.peer.as_str(), service, method])
                        .inc();
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_comes_from_the_descriptors() {
        let paths = idempotent_methods(&[tonic_health::pb::FILE_DESCRIPTOR_SET]);
        // grpc.health.v1 declares no idempotency levels, so nothing is retried by default.
        assert!(paths.is_empty());
    }
}
