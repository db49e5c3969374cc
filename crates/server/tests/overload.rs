//! Overload at three times a service's capacity, against keel's server layers (deadline
//! admission and the concurrency limit) over real gRPC: the adaptive limit keeps goodput (calls
//! answered within their deadline) where the static limit of 1000 lets every call slow down
//! past its deadline, and it settles between its bounds; critical calls get through while
//! sheddable ones are refused first. Outcomes are counted, not timed.
//!
//! The service works like a machine with `PARALLEL` cores: up to that many calls in flight
//! each take `COST`; beyond it they share the cores, each taking `COST` times its share. Its
//! capacity is `PARALLEL / COST` calls per second however many are in flight; more in flight
//! only makes each one slower.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keel_mesh::deadline::DeadlineLayer;
use keel_server::shed::{Concurrency, ShedLayer};
use support::replica::Raw;
use tonic::{Code, Request, Response, Status};

/// A call's work on one core.
const COST: Duration = Duration::from_millis(64);

/// Calls that run side by side without slowing each other: with `COST`, 250 calls per second.
const PARALLEL: f64 = 16.0;

/// Every call's deadline.
const DEADLINE: Duration = Duration::from_millis(200);

const PATH: &str = "/test.Work/Do";

/// The service sharing its capacity among the calls in flight.
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

impl tower::Service<http::Request<tonic::body::Body>> for Work {
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
        let work = self.clone();
        Box::pin(async move { Ok(tonic::server::Grpc::new(Raw).unary(work, request).await) })
    }
}

/// A server of [`Work`] behind keel's deadline and shedding layers; its address and the layer
/// (to read the limit).
async fn serve(concurrency: Concurrency) -> (String, ShedLayer) {
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
            .add_service(Work::default())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), shed)
}

/// What became of a run's calls.
#[derive(Debug, Default)]
struct Outcomes {
    answered: AtomicUsize,
    refused: AtomicUsize,
    late: AtomicUsize,
}

impl Outcomes {
    fn count(&self, result: Result<(), Status>) {
        let counter = match result.map_err(|s| s.code()) {
            Ok(()) => &self.answered,
            Err(Code::ResourceExhausted) => &self.refused,
            // The server ended it at the deadline, or the client gave up waiting (Cancelled).
            Err(Code::DeadlineExceeded | Code::Cancelled) => &self.late,
            Err(other) => panic!("unexpected {other:?}"),
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    fn get(&self) -> (usize, usize, usize) {
        (
            self.answered.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
            self.late.load(Ordering::SeqCst),
        )
    }
}

/// `calls` calls at `rate` per second to the server at `url` (an open loop: each is sent when
/// due, whether or not earlier ones answered), the `n`th with the criticality `of(n)`; waits
/// for them all.
async fn offer(
    url: &str,
    calls: usize,
    rate: f64,
    of: impl Fn(usize) -> &'static str,
    outcomes: [&Arc<Outcomes>; 2],
) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut sent = Vec::with_capacity(calls);
    for n in 0..calls {
        tick.tick().await;
        let criticality = of(n);
        let outcome = outcomes[usize::from(criticality == "critical")].clone();
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
            outcome.count(
                grpc.unary(request, path, Raw)
                    .await
                    .map(|_: Response<Bytes>| ()),
            );
        }));
    }
    for call in sent {
        call.await.unwrap();
    }
}

/// Three times the capacity.
fn overload() -> f64 {
    3.0 * PARALLEL / COST.as_secs_f64()
}

/// Runs `calls` at three times capacity after `settle` calls that are not counted; the
/// outcomes of the counted calls and the limit at the end.
async fn overloaded(
    concurrency: Concurrency,
    settle: usize,
    calls: usize,
) -> ((usize, usize, usize), f64) {
    let (url, shed) = serve(concurrency).await;
    let ignored = Arc::new(Outcomes::default());
    offer(
        &url,
        settle,
        overload(),
        |_| "default",
        [&ignored, &ignored],
    )
    .await;
    let counted = Arc::new(Outcomes::default());
    offer(&url, calls, overload(), |_| "default", [&counted, &counted]).await;
    (counted.get(), shed.limit("test.Work").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_three_times_capacity_the_adaptive_limit_keeps_goodput_the_static_one_loses() {
    let (static_outcomes, _) = overloaded(Concurrency::Static(1000), 300, 900).await;
    let adaptive = Concurrency::adaptive(1000);
    let (adaptive_outcomes, limit) = overloaded(adaptive, 300, 900).await;
    let (good_static, _, _) = static_outcomes;
    let (good_adaptive, refused, _) = adaptive_outcomes;
    assert!(
        good_adaptive > good_static * 2,
        "answered within the deadline: adaptive {adaptive_outcomes:?}, static {static_outcomes:?}"
    );
    assert!(
        refused > 0,
        "the excess was refused at once: {adaptive_outcomes:?}"
    );
    let Concurrency::Adaptive { min, max, .. } = adaptive else {
        unreachable!()
    };
    assert!(
        limit > min as f64 && limit < max as f64,
        "the limit settled between its bounds ({min}..{max}): {limit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_overload_critical_calls_get_through_and_sheddable_ones_are_refused_first() {
    let (url, _) = serve(Concurrency::adaptive(1000)).await;
    // One call in six is critical: half the capacity. The rest is sheddable.
    let mix = |n: usize| {
        if n.is_multiple_of(6) {
            "critical"
        } else {
            "sheddable"
        }
    };
    let ignored = Arc::new(Outcomes::default());
    offer(&url, 300, overload(), mix, [&ignored, &ignored]).await;
    let (sheddable, critical) = (Arc::new(Outcomes::default()), Arc::new(Outcomes::default()));
    offer(&url, 1200, overload(), mix, [&sheddable, &critical]).await;
    let (critical_ok, critical_refused, critical_late) = critical.get();
    let critical_total = critical_ok + critical_refused + critical_late;
    assert!(
        critical_ok * 100 >= critical_total * 99,
        "critical: {:?} of {critical_total}",
        critical.get()
    );
    let (_, sheddable_refused, _) = sheddable.get();
    assert!(
        sheddable_refused > critical_refused * 10 && sheddable_refused > 0,
        "sheddable refused first: sheddable {:?}, critical {:?}",
        sheddable.get(),
        critical.get()
    );
}
