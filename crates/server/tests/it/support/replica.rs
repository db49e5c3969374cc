//! Test replicas for the mesh client: raw gRPC echo servers on runtimes of their own, with
//! keel's health and drain, whose latency, failures and received deadlines a test controls.
//! Shared by the client tests and the balancer benchmark.

#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf as _, BufMut as _, Bytes};
use keel_mesh::client::{MeshChannel, Resolver};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

#[derive(Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A replica of `test.Echo`: counts calls, answers after `delay_ms`, fails with UNAVAILABLE
/// while `failing`, or refuses at once for overload (RESOURCE_EXHAUSTED with a 50 ms pushback)
/// while `refusing`.
#[derive(Clone)]
pub struct Echo {
    pub calls: Arc<AtomicUsize>,
    pub delay_ms: Arc<AtomicU64>,
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    pub refusing: Arc<std::sync::atomic::AtomicBool>,
    /// Calls whose work ran to the end, and calls dropped before it did.
    pub completed: Arc<AtomicUsize>,
    pub cancelled: Arc<AtomicUsize>,
    /// The `grpc-timeout` of the last call.
    pub last_timeout: Arc<Mutex<Option<String>>>,
    /// When set, each call is answered by calling this channel (a second hop).
    pub forward: Option<MeshChannel>,
    /// The client addresses calls came from: one per connection.
    pub peers: Arc<Mutex<HashSet<SocketAddr>>>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl tonic::server::UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future = futures::future::BoxFuture<'static, Result<Response<Bytes>, Status>>;
    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(peer) = request.remote_addr() {
            self.peers.lock().unwrap().insert(peer);
        }
        *self.last_timeout.lock().unwrap() = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(next) = self.forward.clone() {
            return Box::pin(async move { call(next).await.map(|()| Response::new(Bytes::new())) });
        }
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst));
        let failing = self.failing.load(Ordering::SeqCst);
        if self.refusing.load(Ordering::SeqCst) {
            let mut refused = Status::resource_exhausted("this replica is overloaded");
            refused
                .metadata_mut()
                .insert("grpc-retry-pushback-ms", "50".parse().unwrap());
            return Box::pin(async move { Err(refused) });
        }
        let unfinished = Unfinished(Some(self.cancelled.clone()));
        let completed = self.completed.clone();
        Box::pin(async move {
            if failing {
                return Err(Status::unavailable("this replica is failing"));
            }
            if !delay.is_zero() {
                // The replica's simulated work, not a test waiting for something.
                tokio::time::sleep(delay).await;
            }
            unfinished.finish();
            completed.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(request.into_inner()))
        })
    }
}

/// Counts a call's work as cancelled if it is dropped before it finishes.
struct Unfinished(Option<Arc<AtomicUsize>>);

impl Unfinished {
    fn finish(mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(cancelled) = self.0.take() {
            cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A unary service of raw bytes, as the tower service tonic's router takes.
#[derive(Clone)]
pub struct RawUnary<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for RawUnary<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for RawUnary<S>
where
    S: tonic::server::UnaryService<Bytes, Response = Bytes> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { Ok(tonic::server::Grpc::new(Raw).unary(service, request).await) })
    }
}

/// Answers of `S` cut off after their headers while `cutting` is set: the stream is reset
/// where its message and trailers should be, as when a replica dies mid-answer.
#[derive(Clone)]
pub struct Cutting<S> {
    pub inner: S,
    pub cutting: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Cutting<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Cutting<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let cutting = self.cutting.load(Ordering::SeqCst);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            if !cutting {
                return Ok(answer);
            }
            // The start of a message (its 5-byte prefix promises 100 bytes), then, once the
            // headers are out (the replica's simulated death comes a moment later), a reset.
            let start = Ok(http_body::Frame::data(Bytes::from_static(&[
                0, 0, 0, 0, 100,
            ])));
            let death = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(Status::internal("cut off"))
            };
            let cut = futures::StreamExt::chain(
                futures::stream::iter([start]),
                futures::stream::once(death),
            );
            let body = tonic::body::Body::new(http_body_util::StreamBody::new(cut));
            Ok(answer.map(|_| body))
        })
    }
}

/// A replica on a runtime of its own, so that [`Replica::kill`] drops every connection at
/// once, as a crash would; [`Replica::drain`] stops it the way keel does on SIGTERM.
pub struct Replica {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    pub delay_ms: Arc<AtomicU64>,
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    pub refusing: Arc<std::sync::atomic::AtomicBool>,
    /// While set, its answers are cut off after their headers.
    pub cutting: Arc<std::sync::atomic::AtomicBool>,
    pub completed: Arc<AtomicUsize>,
    pub cancelled: Arc<AtomicUsize>,
    pub last_timeout: Arc<Mutex<Option<String>>>,
    pub peers: Arc<Mutex<HashSet<SocketAddr>>>,
    pub health: keel_server::Health,
    pub drain: keel_server::Drain,
    pub server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    pub runtime: Option<tokio::runtime::Runtime>,
}

impl Replica {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::start_with(addr, None).await
    }

    /// A replica that answers by calling `forward`.
    pub async fn front(forward: MeshChannel) -> Self {
        Self::start_with("127.0.0.1:0".parse().unwrap(), Some(forward)).await
    }

    pub async fn start_with(addr: SocketAddr, forward: Option<MeshChannel>) -> Self {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = keel_server::Drain::new();
        let (health, health_service) = keel_server::Health::new(["test.Echo"], drain.clone()).await;
        health.serving().await;
        let echo = Echo {
            calls: Arc::default(),
            delay_ms: Arc::default(),
            failing: Arc::default(),
            refusing: Arc::default(),
            completed: Arc::default(),
            cancelled: Arc::default(),
            last_timeout: Arc::default(),
            forward,
            peers: Arc::default(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (server_echo, stopped) = (echo.clone(), drain.started());
        let cutting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server_cutting = cutting.clone();
        let server = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            // keel's drain: the listener closes at once, GOAWAY follows the callers' quiet.
            let arrivals = keel_server::quiesce::Arrivals::default();
            let (incoming, shutdown) = keel_server::quiesce::phases(
                listener,
                stopped,
                arrivals.clone(),
                keel_server::conn::Admission::unlimited(),
            );
            // keel's deadline layer: a forwarding replica passes the rest of its deadline on.
            tonic::transport::Server::builder()
                .layer(arrivals)
                .layer(keel_mesh::deadline::DeadlineLayer::default())
                .add_service(health_service)
                .add_service(Cutting {
                    inner: RawUnary(server_echo),
                    cutting: server_cutting,
                })
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        });
        Self {
            addr,
            calls: echo.calls,
            delay_ms: echo.delay_ms,
            failing: echo.failing,
            refusing: echo.refusing,
            cutting,
            completed: echo.completed,
            cancelled: echo.cancelled,
            last_timeout: echo.last_timeout,
            peers: echo.peers,
            health,
            drain,
            server: Some(server),
            runtime: Some(runtime),
        }
    }

    /// NOT_SERVING first, then stop accepting and let in-flight calls finish.
    pub async fn drain(&mut self) {
        self.health.not_serving().await;
        self.drain.start();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        self.kill();
    }

    /// Stops the replica abruptly: listener and connections gone, in-flight calls cut.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Discovery the test controls, counting how often it was asked.
#[derive(Default)]
pub struct Endpoints {
    addrs: Mutex<Vec<SocketAddr>>,
    resolutions: AtomicUsize,
}

impl Endpoints {
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Arc<Self> {
        Arc::new(Self {
            addrs: Mutex::new(addrs.into_iter().collect()),
            resolutions: AtomicUsize::new(0),
        })
    }

    pub fn add(&self, addr: SocketAddr) {
        self.addrs.lock().unwrap().push(addr);
    }

    pub fn remove(&self, addr: SocketAddr) {
        self.addrs.lock().unwrap().retain(|a| *a != addr);
    }

    /// How many times the mesh resolved the target so far.
    pub fn resolutions(&self) -> usize {
        self.resolutions.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Resolver for Endpoints {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let addrs = self.addrs.lock().unwrap().clone();
        self.resolutions.fetch_add(1, Ordering::SeqCst);
        Ok(addrs)
    }
}

/// Safe to retry.
pub const IDEMPOTENT: &str = "/test.Echo/Call";
/// Not safe to retry.
pub const WRITE: &str = "/test.Echo/Write";

pub async fn call_path(channel: MeshChannel, path: &'static str) -> Result<(), Status> {
    call_with_body(channel, path, Bytes::from_static(b"hi")).await
}

pub async fn call_with_body(
    channel: MeshChannel,
    path: &'static str,
    body: Bytes,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(|_| ())
}

pub async fn call(channel: MeshChannel) -> Result<(), Status> {
    call_path(channel, IDEMPOTENT).await
}
