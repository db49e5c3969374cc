//! The ceilings a benchmark measures keel against: a bare tonic server and a bare axum handler
//! answering fixed bytes, in a process of their own started from the benchmark's executable.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use keel_gateway::call::RawCodec;

/// Set (to a directory holding the replies) in the environment of the ceiling process.
const ENV: &str = "KEEL_BENCH_CEILING";

/// The one method of the gRPC ceiling.
pub const GRPC_PATH: &str = "/keel.bench.v1.Ceiling/Call";

/// A running ceiling process.
pub struct Ceiling {
    _child: tokio::process::Child,
    _replies: tempfile::TempDir,
    pub pid: u32,
    /// `http://addr` of the gRPC ceiling.
    pub grpc: String,
    /// `http://addr` of the REST ceiling.
    pub rest: String,
}

impl Ceiling {
    /// Starts this executable again as the ceiling: gRPC answers every call with `grpc_reply`
    /// (an encoded message), REST every request with `json_reply`.
    pub async fn start(grpc_reply: &[u8], json_reply: &[u8]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let replies = tempfile::tempdir().unwrap();
        std::fs::write(replies.path().join("grpc"), grpc_reply).unwrap();
        std::fs::write(replies.path().join("json"), json_reply).unwrap();
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .env(ENV, replies.path())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the ceiling");
        let pid = child.id().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut grpc, mut rest) = (None, None);
        while let Some(line) = lines.next_line().await.unwrap() {
            match line.split_once(' ') {
                Some(("grpc", addr)) => grpc = Some(format!("http://{addr}")),
                Some(("rest", addr)) => rest = Some(format!("http://{addr}")),
                _ => {}
            }
            if grpc.is_some() && rest.is_some() {
                break;
            }
        }
        Self {
            _child: child,
            _replies: replies,
            pid,
            grpc: grpc.expect("the ceiling's gRPC address"),
            rest: rest.expect("the ceiling's REST address"),
        }
    }
}

/// When this process was started as a ceiling, serves until killed; otherwise returns at once.
/// Call it first in `main`, before any runtime exists.
pub fn serve_if_asked() {
    let Some(dir) = std::env::var_os(ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let grpc = Bytes::from(std::fs::read(dir.join("grpc")).unwrap());
    let json = Bytes::from(std::fs::read(dir.join("json")).unwrap());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(serve(grpc, json));
    std::process::exit(0);
}

async fn serve(grpc_reply: Bytes, json_reply: Bytes) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("grpc {}", grpc.local_addr().unwrap());
    println!("rest {}", rest.local_addr().unwrap());
    // (Server::tcp_nodelay only applies to sockets tonic binds itself.)
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    let grpc = tonic::transport::Server::builder()
        .add_service(FixedReply(grpc_reply))
        .serve_with_incoming(incoming);
    let app = axum::Router::new().fallback(move || {
        let body = json_reply.clone();
        async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
    });
    let rest = axum::serve::ListenerExt::tap_io(rest, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let rest = axum::serve(rest, app);
    let (grpc, rest) = tokio::join!(grpc, rest);
    grpc.unwrap();
    rest.unwrap();
}

/// A gRPC service answering every call with the same message, as generated code would.
#[derive(Clone)]
struct FixedReply(Bytes);

impl tonic::server::NamedService for FixedReply {
    const NAME: &'static str = "keel.bench.v1.Ceiling";
}

impl tonic::server::UnaryService<Bytes> for FixedReply {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, tonic::Status>>;

    fn call(&mut self, _: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(self.0.clone())))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for FixedReply {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let reply = self.clone();
        Box::pin(async move {
            Ok(tonic::server::Grpc::new(RawCodec)
                .unary(reply, request)
                .await)
        })
    }
}
