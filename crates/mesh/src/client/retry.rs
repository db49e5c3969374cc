//! Retries that can never multiply an outage. A call is sent again only when that is safe:
//! - its method is marked NO_SIDE_EFFECTS or IDEMPOTENT, or it carries its idempotency key, and
//!   it failed with UNAVAILABLE or its connection failed; or
//! - whatever the method, the server provably never processed it (gRPC's transparent retry).
//!
//! Each attempt goes to an endpoint the call has not tried while there is one; at most a few
//! attempts, all within Linkerd's budget (20% of requests plus 10 per second over a 10 s window),
//! never sooner than the server's `grpc-retry-pushback-ms` (negative: do not retry), never past
//! the call's deadline, and DEADLINE_EXCEEDED is never retried. What still fails below gRPC
//! reaches the caller as UNAVAILABLE. With hedging on, a NO_SIDE_EFFECTS call slower than its
//! method's recent p95 is also sent to another endpoint (see `hedge`), within the same budget.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{Service, ServiceExt as _};

use super::failure::{describe, never_processed, timed_out};
use super::{ClientOptions, Elsewhere, MeshError, Methods, Tried};
use crate::series::CallSeries;
use crate::stats::MethodTable;

/// Attempts per call at most, the first included.
const MAX_ATTEMPTS: usize = 3;

type ResponseFuture =
    Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, MeshError>> + Send>>;

/// The retry policy shared by every clone of a channel.
#[derive(Debug)]
pub(super) struct RetryPolicy {
    methods: Methods,
    budget: TpsBudget,
    /// Hedged reads, when on.
    hedger: Option<super::hedge::Hedger>,
    default_timeout: Option<Duration>,
    peer: String,
    metrics: Option<super::ClientMetrics>,
    /// Each method's call series, by path.
    series: MethodTable<CallSeries>,
    /// How many endpoints the balancer holds, and discovery's look again.
    discovered: super::endpoints::Discovered,
    /// How long a call waits for one when there are none.
    fail_fast: Duration,
}

impl RetryPolicy {
    /// The policy of `options`, over a balancer whose endpoints are `discovered`.
    pub(super) fn new(options: ClientOptions, discovered: super::endpoints::Discovered) -> Self {
        if let Some(metrics) = &options.metrics {
            metrics.announce_peer(&options.peer);
        }
        Self {
            methods: options.methods,
            budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
            hedger: options.hedging.map(super::hedge::Hedger::new),
            default_timeout: options.default_timeout,
            peer: options.peer,
            metrics: options.metrics,
            series: MethodTable::default(),
            discovered,
            fail_fast: options.fail_fast,
        }
    }

    /// Takes a retry from the budget; counts it when the budget is spent.
    fn withdraw(&self) -> bool {
        let withdrawn = self.budget.withdraw();
        if !withdrawn && let Some(metrics) = &self.metrics {
            let exhausted = metrics
                .budget_exhausted
                .with_label_values(&[self.peer.as_str()]);
            exhausted.inc();
        }
        withdrawn
    }

    /// Counts a call of `path` in the series `which` picks (labelled peer, service, method).
    fn count(
        &self,
        which: impl FnOnce(&super::ClientMetrics) -> &prometheus::IntCounterVec,
        path: &str,
    ) {
        if let Some(metrics) = &self.metrics {
            let (service, method) = crate::status::split_path(path);
            let labels = [self.peer.as_str(), service, method];
            which(metrics).with_label_values(&labels).inc();
        }
    }

    /// Counts a hedge of `path` that `budget` refused.
    fn count_refused_hedge(&self, path: &str, budget: &str) {
        if let Some(metrics) = &self.metrics {
            let (service, method) = crate::status::split_path(path);
            let labels = [self.peer.as_str(), service, method, budget];
            metrics.hedges_refused.with_label_values(&labels).inc();
        }
    }

    /// The series of `path` in this channel's metrics (none without metrics), resolved on the
    /// method's first call; its retries (and hedges) then read zero until the first one.
    fn series(&self, path: &str) -> Option<Arc<CallSeries>> {
        let metrics = self.metrics.as_ref()?;
        let make = || {
            let (service, method) = crate::status::split_path(path);
            let labels = [self.peer.as_str(), service, method];
            metrics.retries.with_label_values(&labels);
            if self.hedges(path) {
                metrics.hedges.with_label_values(&labels);
                for budget in ["hedge", "retry"] {
                    let [peer, service, method] = labels;
                    let refused = [peer, service, method, budget];
                    metrics.hedges_refused.with_label_values(&refused);
                }
            }
            CallSeries::new(&metrics.calls, labels)
        };
        // Past the table's bound (paths no service has), a series made for the call alone.
        Some(
            self.series
                .of_with(path, make)
                .unwrap_or_else(|| Arc::new(make())),
        )
    }

    /// Whether calls of `path` are hedged: hedging is on and the method has no side effects.
    fn hedges(&self, path: &str) -> bool {
        self.hedger.is_some() && self.methods.no_side_effects.contains(path)
    }

    /// Waits up to the fail-fast time for the balancer to hold an endpoint, discovery asked to
    /// look again now; when none comes, the UNAVAILABLE answer to give instead of queueing the
    /// call until its deadline.
    async fn no_endpoint(&self) -> Option<Response<Body>> {
        let mut admitted = self.discovered.admitted.clone();
        if *admitted.borrow() > 0 {
            return None;
        }
        self.discovered.look.ask();
        match tokio::time::timeout(self.fail_fast, admitted.wait_for(|n| *n > 0)).await {
            Ok(Ok(_)) => None,
            _ => Some(
                Status::unavailable(format!("no endpoint of {} is serving", self.peer)).into_http(),
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

/// The gRPC answer for what happened below gRPC: the caller's deadline passing, or the peer
/// being unreachable (grpc-go's UNAVAILABLE, not tonic's CANCELLED or INTERNAL).
fn settle(peer: &str, result: Result<Response<Body>, MeshError>) -> Response<Body> {
    match result {
        // A tonic server that runs out of the call's time answers CANCELLED "Timeout expired";
        // to the caller that is its deadline passing, as grpc-go reports it.
        Ok(response) if server_timed_out(&response) => {
            Status::deadline_exceeded("deadline exceeded").into_http()
        }
        Ok(response) => response,
        Err(e) if timed_out(&e) => Status::deadline_exceeded("deadline exceeded").into_http(),
        Err(e) => {
            let cause = describe(e.0.as_ref());
            tracing::debug!(peer, error = %cause, "call failed below gRPC");
            Status::unavailable(format!("{peer}: {cause}")).into_http()
        }
    }
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
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), MeshError>> {
        // Readiness is checked per attempt, on a clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(series) = self.policy.series(request.uri().path()) else {
            return self.deadline_bound(request);
        };
        series.start();
        let started = std::time::Instant::now();
        let future = self.deadline_bound(request);
        Box::pin(async move {
            let response = future.await?;
            let record = move |code: Code| series.finish(code, started.elapsed());
            Ok(match header_status(&response) {
                Some(code) => {
                    record(code);
                    response
                }
                None => response.map(|body| {
                    crate::trailers::OnTrailers::wrap(body, move |trailers| {
                        let code = trailers
                            .and_then(|t| crate::status::grpc_status(t))
                            .unwrap_or(Code::Unknown);
                        record(code);
                    })
                }),
            })
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
    /// The call with its deadline applied; whatever happens, a gRPC response.
    fn deadline_bound(&self, mut request: Request<Body>) -> ResponseFuture {
        let policy = self.policy.clone();
        policy.budget.deposit();
        // The deadline: the caller's own grpc-timeout, else what is left of the call this task
        // serves, else the per-service default.
        let timeout = crate::deadline::timeout_of(request.headers())
            .or_else(|| {
                crate::deadline::current()
                    .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
            })
            .or(policy.default_timeout);
        if timeout.is_some_and(|t| t.is_zero()) {
            let expired =
                Status::deadline_exceeded("the caller's deadline passed before this call");
            return Box::pin(async move { Ok(expired.into_http()) });
        }
        if let Some(timeout) = timeout {
            request.headers_mut().insert(
                "grpc-timeout",
                crate::deadline::format_grpc_timeout(timeout),
            );
        }
        crate::criticality::propagate(request.headers_mut());
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let attempts = self.attempts(request, deadline);
        Box::pin(async move {
            let result = match timeout {
                Some(timeout) => match tokio::time::timeout(timeout, attempts).await {
                    Ok(result) => result,
                    // Never retried: the time is gone.
                    Err(_) => Ok(Status::deadline_exceeded("deadline exceeded").into_http()),
                },
                None => attempts.await,
            };
            Ok(settle(&policy.peer, result))
        })
    }

    /// Sends `request` once, or again while it may be retried and `deadline` has not passed;
    /// each retry carries what is left of the deadline, not the whole of it.
    fn attempts(
        &self,
        request: Request<Body>,
        deadline: Option<tokio::time::Instant>,
    ) -> ResponseFuture {
        let (inner, policy) = (self.inner.clone(), self.policy.clone());
        if !policy.methods.resendable(request.uri().path()) {
            // A request that is not one message is streamed as it comes: sent once.
            return Box::pin(async move {
                if let Some(unavailable) = policy.no_endpoint().await {
                    return Ok(unavailable);
                }
                inner.oneshot(request).await
            });
        }
        Box::pin(async move {
            let resend = Resend::buffer(request, deadline, &policy).await?;
            let path = resend.parts.uri.path();
            // A read is hedged once its method's p95 is known, with somewhere else to go.
            let hedger = policy
                .hedger
                .as_ref()
                .filter(|_| resend.tried.is_some() && policy.hedges(path));
            let mut attempts = 0;
            loop {
                if let Some(unavailable) = policy.no_endpoint().await {
                    return Ok(unavailable);
                }
                // Checked here too, not only by the timer around the attempts: when the two
                // fire in one tick, the attempts are polled first and would send again.
                if attempts > 0 && deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Ok(Status::deadline_exceeded("deadline exceeded").into_http());
                }
                attempts += 1;
                let result = match send(inner.clone(), &policy, &resend, hedger, attempts > 1).await
                {
                    Ok(response) if resend.read_whole => whole(response).await,
                    sent => sent,
                };
                let Some(wait) = retry_after(&result, resend.retryable) else {
                    return result;
                };
                if attempts >= MAX_ATTEMPTS || wait == Duration::MAX || !policy.withdraw() {
                    return result;
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
                }
                tracing::debug!(path, attempts, "retrying");
                policy.count(|m| &m.retries, path);
            }
        })
    }
}

/// A call buffered so that it can be sent again.
struct Resend {
    parts: http::request::Parts,
    body: Bytes,
    /// Safe to send again even after the server saw it: idempotent, or deduplicated by the
    /// server on the key the call carries.
    retryable: bool,
    /// Retryable, with an answer of one message: read whole before it is handed on.
    read_whole: bool,
    deadline: Option<tokio::time::Instant>,
    /// The endpoints its attempts went to: the balancer sends a retry elsewhere. With a single
    /// endpoint there is nowhere else to go, and nothing to record.
    tried: Option<Tried<std::net::SocketAddr>>,
}

impl Resend {
    async fn buffer(
        request: Request<Body>,
        deadline: Option<tokio::time::Instant>,
        policy: &RetryPolicy,
    ) -> Result<Self, MeshError> {
        let path = request.uri().path();
        let idempotent = policy.methods.idempotent.contains(path);
        let key_field = policy.methods.keyed.get(path).copied();
        let (parts, body) = request.into_parts();
        let body: Bytes = body
            .collect()
            .await
            .map_err(|e| MeshError(format!("reading the request body: {e}").into()))?
            .to_bytes();
        let retryable = idempotent || key_field.is_some_and(|f| super::keyed::sets_key(&body, f));
        let read_whole = retryable && policy.methods.single_response.contains(parts.uri.path());
        let tried =
            (*policy.discovered.admitted.borrow() > 1).then(Tried::<std::net::SocketAddr>::default);
        Ok(Self {
            parts,
            body,
            retryable,
            read_whole,
            deadline,
            tried,
        })
    }

    /// Whether an endpoint is admitted that no attempt of the call went to yet.
    fn untried_admitted(&self, policy: &RetryPolicy) -> bool {
        self.tried
            .as_ref()
            .is_some_and(|tried| tried.len() < *policy.discovered.admitted.borrow())
    }

    /// One attempt: the first carries the deadline as set; a retry or a hedge (`again`) what
    /// is left of it.
    fn attempt(&self, again: bool) -> Request<Body> {
        let body = http_body_util::Full::new(self.body.clone()).map_err(|never| match never {});
        let mut request = Request::new(Body::new(body));
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = self.parts.uri.clone();
        *request.version_mut() = self.parts.version;
        *request.headers_mut() = self.parts.headers.clone();
        if let Some(deadline) = self.deadline.filter(|_| again) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let timeout = crate::deadline::format_grpc_timeout(left);
            request.headers_mut().insert("grpc-timeout", timeout);
        }
        if let Some(tried) = &self.tried {
            request.extensions_mut().insert(tried.clone());
        }
        request
    }
}

/// Sends one attempt of `resend` through `inner`, hedged by `hedger` when it has the method's
/// p95: a second attempt elsewhere if the first has not answered by then.
async fn send<S>(
    inner: S,
    policy: &RetryPolicy,
    resend: &Resend,
    hedger: Option<&super::hedge::Hedger>,
    again: bool,
) -> Result<Response<Body>, MeshError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = MeshError> + Clone,
{
    let path = resend.parts.uri.path();
    let started = std::time::Instant::now();
    let abandoned = super::hedge::Abandoned::default();
    let mut first_request = resend.attempt(again);
    if hedger.is_some() {
        first_request.extensions_mut().insert(abandoned.clone());
    }
    let first = inner.clone().oneshot(first_request);
    let result = match hedger.and_then(|h| h.delay(path)) {
        None => first.await,
        Some(p95) => {
            let second = inner;
            let hedge = move || {
                // Nowhere to go but an endpoint an attempt of this call is on or failed on (a
                // retry's hedge, once the others were tried): no hedge, no budget spent.
                if !resend.untried_admitted(policy) {
                    return None;
                }
                // Hedges' own budget first: when the retry budget then refuses, the hedge token
                // is spent for nothing, but no retry token ever is.
                let refused_by = if !hedger.is_some_and(|h| h.allowed()) {
                    Some("hedge")
                } else if !policy.budget.withdraw() {
                    Some("retry")
                } else {
                    None
                };
                if let Some(budget) = refused_by {
                    policy.count_refused_hedge(path, budget);
                    return None;
                }
                policy.count(|m| &m.hedges, path);
                let mut hedge = resend.attempt(true);
                hedge.extensions_mut().insert(Elsewhere);
                Some(second.oneshot(hedge))
            };
            first_of(first, p95, hedge, answers, || abandoned.set()).await
        }
    };
    if let (Some(hedger), Ok(response)) = (hedger, &result)
        && header_status(response).is_none_or(|c| c == Code::Ok)
    {
        hedger.answered(path, started.elapsed());
    }
    result
}

/// The most of an answer read whole: tonic's default limit on a decoded message (4 MiB), and
/// its 5-byte prefix.
const MOST_READ_WHOLE: usize = 4 * 1024 * 1024 + 5;

/// `response` read to its end (its message and trailers), then handed on as read: an answer
/// cut off mid-way (its connection lost after the headers) is an error the call is retried
/// on, where streamed on it would reach the caller as a failed call (INTERNAL or UNKNOWN).
async fn whole(response: Response<Body>) -> Result<Response<Body>, MeshError> {
    if header_status(&response).is_some() {
        // Trailers-only: the status is in hand, and there is no body to lose.
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    // Its frames as they came (a message and the trailers, usually), kept as they are: no copy
    // of the data, no clone of the trailers.
    let mut body = std::pin::pin!(http_body_util::Limited::new(body, MOST_READ_WHOLE));
    let mut frames = Vec::with_capacity(2);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => frames.push(Ok::<_, std::convert::Infallible>(frame)),
            // The caller's decoder would refuse it too; sending the call again would not help.
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let limit = MOST_READ_WHOLE / (1024 * 1024);
                let refused = format!("the answer is larger than {limit} MiB");
                return Ok(Status::resource_exhausted(refused).into_http());
            }
            Err(broken) => return Err(MeshError(broken)),
        }
    }
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// How long to wait before sending `result`'s call again, or `None` when it is final.
fn retry_after(result: &Result<Response<Body>, MeshError>, retryable: bool) -> Option<Duration> {
    match result {
        Ok(response) if retryable && header_status(response) == Some(Code::Unavailable) => {
            Some(pushback(response).unwrap_or_default())
        }
        Ok(_) => None,
        // The attempt's own timer (tonic's, on the same deadline): the time is gone, and
        // DEADLINE_EXCEEDED is never retried.
        Err(e) if timed_out(e.0.as_ref()) => None,
        Err(e) if retryable || never_processed(e) => Some(Duration::ZERO),
        // The connection broke under a call the server may have acted on.
        Err(_) => None,
    }
}

/// Whether an attempt's `result` answers its call, as a hedge race counts: a failure of the
/// endpoint it went to (no connection, UNAVAILABLE, a refusal for overload, a hedge with
/// nowhere else to go) does not, while the other attempt, accepted elsewhere, may still answer.
fn answers(result: &Result<Response<Body>, MeshError>) -> bool {
    result.as_ref().is_ok_and(|response| {
        !matches!(
            header_status(response),
            Some(Code::Unavailable | Code::ResourceExhausted)
        )
    })
}

/// The first attempt's answer, unless it has not come after `delay` and `hedge` sends a second
/// attempt: then whichever `answers` first (the other is dropped, which cancels it), or, when
/// neither does, the first attempt's failure. When the second wins over a first attempt still
/// running, `lost` runs before the first is dropped.
async fn first_of<F>(
    first: F,
    delay: Duration,
    hedge: impl FnOnce() -> Option<F>,
    answers: impl Fn(&F::Output) -> bool,
    lost: impl FnOnce(),
) -> F::Output
where
    F: std::future::Future,
{
    tokio::pin!(first);
    tokio::select! {
        answer = &mut first => return answer,
        () = tokio::time::sleep(delay) => {}
    }
    let Some(second) = hedge() else {
        return first.await;
    };
    tokio::pin!(second);
    tokio::select! {
        answer = &mut first => {
            if answers(&answer) {
                return answer;
            }
            match second.await {
                hedged if answers(&hedged) => hedged,
                _ => answer,
            }
        }
        answer = &mut second => {
            if answers(&answer) {
                lost();
                return answer;
            }
            first.await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt as _;

    use super::*;

    const PATH: &str = "/test.Echo/Call";

    type Attempt = Pin<Box<dyn std::future::Future<Output = Result<&'static str, ()>> + Send>>;

    /// An attempt that ends after `ms` with `outcome`.
    fn attempt(ms: u64, outcome: Result<&'static str, ()>) -> Attempt {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            outcome
        })
    }

    /// A hedge race between a first attempt and a hedge sent after 10 ms; its result and whether
    /// the first attempt was given up as the slow one.
    async fn race(first: Attempt, hedge: Attempt) -> (Result<&'static str, ()>, bool) {
        let mut lost = false;
        let result = first_of(
            first,
            Duration::from_millis(10),
            || Some(hedge),
            Result::is_ok,
            || {
                lost = true;
            },
        )
        .await;
        (result, lost)
    }

    /// A hedge that fails at once (its endpoint refuses, or there is nowhere else to send it)
    /// is no answer: the first attempt, still running where it was accepted, answers the call.
    #[tokio::test(start_paused = true)]
    async fn a_hedge_that_fails_leaves_the_call_to_the_first_attempt() {
        let (result, lost) = race(attempt(100, Ok("first")), attempt(0, Err(()))).await;
        assert_eq!(result, Ok("first"));
        assert!(!lost, "the first attempt was not given up");
    }

    /// A first attempt that fails while its hedge runs leaves the call to the hedge; when both
    /// fail, the call has the first one's failure.
    #[tokio::test(start_paused = true)]
    async fn a_first_attempt_that_fails_after_its_hedge_went_leaves_the_call_to_the_hedge() {
        let (result, lost) = race(attempt(20, Err(())), attempt(30, Ok("hedge"))).await;
        assert_eq!((result, lost), (Ok("hedge"), false));
        let (result, _) = race(attempt(20, Err(())), attempt(5, Err(()))).await;
        assert_eq!(result, Err(()));
        let (result, lost) = race(attempt(100, Ok("first")), attempt(5, Ok("hedge"))).await;
        assert_eq!(
            (result, lost),
            (Ok("hedge"), true),
            "the faster answer wins"
        );
    }

    /// An attempt that ran out of its own timer is never sent again, even though the timer
    /// around the attempts fires in the same tick and is polled after them.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_timed_out_is_never_sent_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = tower::service_fn({
            let calls = calls.clone();
            move |request: Request<Body>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let left = request
                    .headers()
                    .get("grpc-timeout")
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::deadline::parse_grpc_timeout)
                    .expect("every attempt carries its deadline");
                async move {
                    tokio::time::sleep(left).await;
                    Err::<Response<Body>, _>(MeshError(Box::new(tonic::TimeoutExpired(()))))
                }
            }
        });
        let mut options = ClientOptions::default();
        options.methods.idempotent.insert(PATH.to_owned());
        options.methods.single_request.insert(PATH.to_owned());
        let discovered = super::super::endpoints::Discovered::fixed(1);
        let retrying = Retrying {
            inner,
            policy: Arc::new(RetryPolicy::new(options, discovered)),
        };
        let request = Request::builder()
            .method("POST")
            .uri(format!("http://peer{PATH}"))
            .header("grpc-timeout", "50m")
            .body(Body::empty())
            .unwrap();
        let response = retrying.oneshot(request).await.unwrap();
        assert_eq!(header_status(&response), Some(Code::DeadlineExceeded));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "sent once");
    }
}
