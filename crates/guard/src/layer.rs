//! Strict limits on the RPCs that guard secrets (sign-in), applied by the gRPC server itself to
//! every caller, keyed by the client's address: a REST call through the gateway and a direct
//! gRPC call are counted alike, whatever the REST path's spelling, because the server sees the
//! method, not the path.

use std::collections::HashSet;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;
use tower::{Layer, Service};

use crate::{Quota, RateLimiter, TrustedProxies};

/// The metadata by which a process's own gateway vouches for the client address it forwards in
/// `x-forwarded-for`: a secret made at start-up, shared in memory only.
pub const HOP_HEADER: &str = "keel-forwarded-by";

/// The client address of a call made inside this process by a caller that already worked it out
/// (the gateway calling a service in process). Only code in the process can attach it: a request
/// read from the network starts with no extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// How a gRPC server tells who its caller is.
#[derive(Clone, Debug, Default)]
pub struct Callers {
    /// Peers whose forwarding headers are believed.
    pub proxies: TrustedProxies,
    /// The secret this process's gateway sends with the address it forwards.
    pub hop_secret: Option<Arc<str>>,
}

impl Callers {
    /// The client of a call from `peer` carrying `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let vouched = self.hop_secret.as_deref().is_some_and(|secret| {
            headers
                .get(HOP_HEADER)
                .is_some_and(|v| v.as_bytes() == secret.as_bytes())
        });
        if vouched
            && let Some(ip) = headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        {
            return ip;
        }
        self.proxies.client(peer, headers)
    }

    /// Whether what `request` says about itself beyond its credentials (its criticality, say)
    /// may be believed: it was made in this process (the gateway calling a service), vouched for
    /// with the hop secret, sent by a trusted proxy, or over mTLS with a client certificate (a
    /// service). A request from anyone else speaks only for itself.
    pub fn vouched<B>(&self, request: &Request<B>) -> bool {
        let extensions = request.extensions();
        if extensions.get::<ClientAddr>().is_some() {
            return true;
        }
        let hop = self.hop_secret.as_deref().is_some_and(|secret| {
            request
                .headers()
                .get(HOP_HEADER)
                .is_some_and(|v| v.as_bytes() == secret.as_bytes())
        });
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let certified = tls.is_some_and(|tls| tls.peer_certs().is_some_and(|c| !c.is_empty()));
        let peer = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| tls.and_then(|tls| tls.get_ref().remote_addr()));
        hop || certified || peer.is_some_and(|peer| self.proxies.contains(peer.ip()))
    }

    /// The client of `request`: as an in-process caller vouched for it, else from its
    /// connection and headers.
    pub fn of<B>(&self, request: &Request<B>) -> Option<IpAddr> {
        let extensions = request.extensions();
        if let Some(ClientAddr(ip)) = extensions.get::<ClientAddr>() {
            return Some(*ip);
        }
        let peer = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|tls| tls.get_ref().remote_addr())
            })?;
        Some(self.client(peer.ip(), request.headers()))
    }
}

/// Limits each client address to `quota` calls of `methods` (`/package.Service/Method`).
#[derive(Clone)]
pub struct GuardLayer {
    methods: Arc<HashSet<String>>,
    quota: Quota,
    limiter: Arc<RateLimiter>,
    callers: Callers,
}

impl std::fmt::Debug for GuardLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardLayer")
            .field("methods", &self.methods)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

impl GuardLayer {
    /// Guards `methods` with `quota` per client, in `limiter`'s buckets.
    pub fn new(
        methods: impl IntoIterator<Item = String>,
        quota: Quota,
        limiter: Arc<RateLimiter>,
        callers: Callers,
    ) -> Self {
        Self {
            methods: Arc::new(methods.into_iter().collect()),
            quota,
            limiter,
            callers,
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`GuardLayer`].
#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

impl<S, B> Service<Request<B>> for Guard<S>
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
        if !self.layer.methods.contains(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let client = self.layer.callers.of(&request);
        let key = format!(
            "guard:{}:{}",
            request.uri().path(),
            client.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
        );
        // The service that was made ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (limiter, quota) = (self.layer.limiter.clone(), self.layer.quota);
        Box::pin(async move {
            match limiter.check(&key, quota).await {
                Ok(()) => inner.call(request).await,
                Err(wait) => {
                    tracing::info!(%key, ?wait, "strict limit: refused");
                    Ok(
                        throttled("too many attempts from this address; retry later", wait)
                            .into_http(),
                    )
                }
            }
        })
    }
}

/// RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` saying how long to wait (the gateway turns it
/// into 429 and `Retry-After`).
pub fn throttled(message: &str, wait: std::time::Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        tonic_types::ErrorDetails::with_retry_info(Some(wait)),
    )
}
