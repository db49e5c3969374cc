//! A service that works like a machine with `PARALLEL` cores, behind keel's deadline and
//! shedding layers, and an open-loop load against it: shared by the overload tests and the
//! overload benchmark. Up to `PARALLEL` calls in flight each take `COST`; beyond it they share
//! the cores, each taking `COST` times its share, so the capacity is `PARALLEL / COST` calls per
//! second however many are in flight; more in flight only makes each one slower.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_mesh::deadline::DeadlineLayer;
use keel_server::shed::{Concurrency, ShedLayer};
use tonic::{Code, Request, Response, Status};

use super::replica::{Raw, RawUnary};

/// A call's work on one core.
pub const COST: Duration = Duration::from_millis(64);

/// Calls that run side by side without slowing each other: with `COST`, 250 calls per second.
pub const PARALLEL: f64 = 16.0;

/// Every call's deadline.
pub const DEADLINE: Duration = Duration::from_millis(200);

const PATH: &str = "/test.Work/Do";

/// The capacity the model gives, in calls per second.
pub fn capacity() -> f64 {
    PARALLEL / COST.as_secs_f64()
}

/// The service sharing its cores among the calls in flight.
#[derive(Clone, Default)]
struct Work {
    in_flight: Arc<AtomicUsize>,
}

impl tonic::server::NamedService for Work {
    const NAME: &'static str = "test.Work";
}

/// Gives a call's place back however it ends (answered, or dropped at its deadline).
struct Leaving(Arc<AtomicUsize>);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tonic::server::UnaryService<Bytes> for Work {
    type Response = Bytes;
    type Future = futures::future::BoxFuture<'static, Result<Response<Bytes>, Status>>;
    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        let sharing = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let leaving = Leaving(self.in_flight.clone());
        Box::pin(async move {
            // The simulated work, slower once more calls than cores share the capacity.
            tokio::time::sleep(COST.mul_f64((sharing as f64 / PARALLEL).max(1.0))).await;
            drop(leaving);
            Ok(Response::new(Bytes::new()))
        })
    }
}

/// A server of the model behind keel's deadline and shedding layers; its URL and the shedding
/// layer (to read the limit).
pub async fn serve(concurrency: Concurrency) -> (String, ShedLayer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shed = ShedLayer::new(["test.Work"], concurrency, Duration::from_millis(50));
    let layers = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::default())
        .layer(shed.clone())
        .into_inner();
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(4096))
            .layer(layers)
            .add_service(RawUnary(Work::default()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), shed)
}

/// What became of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered within its deadline.
    Answered,
    /// Refused at once: RESOURCE_EXHAUSTED.
    Refused,
    /// Ended at its deadline, by the server (DEADLINE_EXCEEDED) or the client (CANCELLED).
    Late,
}

/// One call of a run.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub critical: bool,
    pub outcome: Outcome,
    /// From when the call was due to its answer.
    pub latency: Duration,
}

/// `calls` calls at `rate` per second to the server at `url` (an open loop: each is sent when
/// due, whether or not earlier ones answered), the `n`th with the criticality `of(n)`; what
/// became of each.
pub async fn offer(
    url: &str,
    calls: usize,
    rate: f64,
    of: impl Fn(usize) -> &'static str,
) -> Vec<Call> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut sent = Vec::with_capacity(calls);
    for n in 0..calls {
        tick.tick().await;
        let due = Instant::now();
        let criticality = of(n);
        let channel = channel.clone();
        sent.push(tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let mut request = Request::new(Bytes::new());
            request.set_timeout(DEADLINE);
            request
                .metadata_mut()
                .insert("keel-criticality", criticality.parse().unwrap());
            let path = http::uri::PathAndQuery::from_static(PATH);
            let answer = grpc.unary(request, path, Raw).await;
            let outcome = match answer.map_err(|s| s.code()) {
                Ok(_) => Outcome::Answered,
                Err(Code::ResourceExhausted) => Outcome::Refused,
                Err(Code::DeadlineExceeded | Code::Cancelled) => Outcome::Late,
                Err(other) => panic!("unexpected {other:?}"),
            };
            Call {
                critical: criticality == "critical",
                outcome,
                latency: due.elapsed(),
            }
        }));
    }
    let mut done = Vec::with_capacity(calls);
    for call in sent {
        done.push(call.await.unwrap());
    }
    done
}

/// How many of `calls` (critical ones, or the others) ended as `outcome`.
pub fn count(calls: &[Call], critical: Option<bool>, outcome: Outcome) -> usize {
    calls
        .iter()
        .filter(|c| critical.is_none_or(|k| c.critical == k) && c.outcome == outcome)
        .count()
}
