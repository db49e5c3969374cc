//! Backpressure in the pick. An endpoint that refuses a call for overload (RESOURCE_EXHAUSTED,
//! or UNAVAILABLE with `grpc-retry-pushback-ms`) answers fast because it did no work; PeakEWMA
//! alone reads that as an idle endpoint and sends it more (as Linkerd documents of plain EWMA).
//! Here a refusal keeps the endpoint out of the pick for its pushback, then weighs it as the
//! most loaded endpoint for as long again, so that traffic returns to it gradually.

use std::future::Future as _;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::{Instant, Sleep};
use tonic::Code;
use tonic::body::Body;
use tower::Service;
use tower::load::peak_ewma::{Cost, PeakEwma};
use tower::load::{CompleteOnResponse, Load};

/// How long a RESOURCE_EXHAUSTED without a pushback keeps its endpoint out of the pick.
pub const DEFAULT_PAUSE: Duration = Duration::from_millis(100);

/// The longest pause a server's pushback can ask for.
const MAX_PAUSE: Duration = Duration::from_secs(10);

/// The pause an answer asks for, if it is an overload refusal: its `grpc-retry-pushback-ms`, or
/// [`DEFAULT_PAUSE`] for a RESOURCE_EXHAUSTED without one (or with one that is not a count of
/// milliseconds: gRPC reads that as "do not retry", which says nothing of the endpoint).
pub fn refusal(response: &Response<Body>) -> Option<Duration> {
    let pushback = response
        .headers()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    match super::retry::header_status(response)? {
        Code::ResourceExhausted => Some(pushback.unwrap_or(DEFAULT_PAUSE).min(MAX_PAUSE)),
        Code::Unavailable => pushback.map(|p| p.min(MAX_PAUSE)),
        _ => None,
    }
}

/// One endpoint's last refusal, shared by its connections' handles and its place in the pick.
#[derive(Debug, Default)]
pub struct Pressure {
    /// Out of the pick until the first instant, weighed heaviest until the second.
    until: Mutex<Option<(Instant, Instant)>>,
}

impl Pressure {
    /// The endpoint refused a call and asked for `pause`.
    pub fn refused(&self, pause: Duration) {
        let now = Instant::now();
        let mut until = self.until.lock().expect("pressure lock");
        let (paused, heavy) = (now + pause, now + pause * 2);
        *until = Some(match *until {
            Some((p, h)) => (p.max(paused), h.max(heavy)),
            None => (paused, heavy),
        });
    }

    /// When the endpoint may be picked again, if not yet.
    fn paused_until(&self) -> Option<Instant> {
        let until = *self.until.lock().expect("pressure lock");
        until
            .map(|(paused, _)| paused)
            .filter(|&p| p > Instant::now())
    }

    /// Whether a refusal is recent enough to weigh the endpoint heaviest.
    fn heavy(&self) -> bool {
        let until = *self.until.lock().expect("pressure lock");
        until.is_some_and(|(_, heavy)| heavy > Instant::now())
    }
}

/// What an endpoint weighs in the pick: its PeakEWMA cost, or the most there is while it
/// refuses calls.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub enum Weight {
    /// Latency times calls in flight, as PeakEWMA measures it.
    Measured(Cost),
    /// It refused a call lately: heavier than any measured cost.
    Refusing,
}

/// An endpoint as the balancer weighs it: PeakEWMA, unless it pushes back.
pub struct Weighed<S> {
    inner: PeakEwma<S>,
    pressure: std::sync::Arc<Pressure>,
    pause: Option<std::pin::Pin<Box<Sleep>>>,
}

impl<S> Weighed<S> {
    /// `service`, weighed by PeakEWMA with `default_rtt` and `decay`, and by `pressure`.
    pub fn new(
        service: S,
        pressure: std::sync::Arc<Pressure>,
        default_rtt: Duration,
        decay: Duration,
    ) -> Self {
        let decay_ns = (decay.as_nanos() as f64).max(1.0);
        Self {
            inner: PeakEwma::new(
                service,
                default_rtt,
                decay_ns,
                CompleteOnResponse::default(),
            ),
            pressure,
            pause: None,
        }
    }
}

impl<S> Load for Weighed<S> {
    type Metric = Weight;

    fn load(&self) -> Weight {
        if self.pressure.heavy() {
            Weight::Refusing
        } else {
            Weight::Measured(self.inner.load())
        }
    }
}

impl<S> Service<Request<Body>> for Weighed<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = <PeakEwma<S> as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Not ready while pushed back: the balancer picks among the others and comes back
        // when the pause ends.
        while let Some(until) = self.pressure.paused_until() {
            let pause = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if pause.deadline() != until {
                pause.as_mut().reset(until);
            }
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.pause = None;
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: Code, pushback: Option<&str>) -> Response<Body> {
        let mut response = tonic::Status::new(code, "").into_http::<Body>();
        if let Some(ms) = pushback {
            response
                .headers_mut()
                .insert("grpc-retry-pushback-ms", ms.parse().unwrap());
        }
        response
    }

    #[test]
    fn overload_refusals_ask_for_a_pause_and_other_answers_do_not() {
        let ms = Duration::from_millis;
        assert_eq!(
            refusal(&answer(Code::ResourceExhausted, Some("250"))),
            Some(ms(250))
        );
        assert_eq!(
            refusal(&answer(Code::ResourceExhausted, None)),
            Some(DEFAULT_PAUSE)
        );
        assert_eq!(
            refusal(&answer(Code::ResourceExhausted, Some("-1"))),
            Some(DEFAULT_PAUSE)
        );
        assert_eq!(
            refusal(&answer(Code::Unavailable, Some("40"))),
            Some(ms(40))
        );
        assert_eq!(refusal(&answer(Code::Unavailable, None)), None);
        assert_eq!(refusal(&answer(Code::Internal, Some("40"))), None);
        assert_eq!(
            refusal(&answer(Code::ResourceExhausted, Some("999999"))),
            Some(MAX_PAUSE)
        );
        assert_eq!(refusal(&answer(Code::Ok, None)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_pauses_for_its_pushback_then_weighs_heaviest_as_long_again() {
        let pressure = Pressure::default();
        assert!(pressure.paused_until().is_none() && !pressure.heavy());
        pressure.refused(Duration::from_millis(100));
        assert!(pressure.paused_until().is_some() && pressure.heavy());
        tokio::time::advance(Duration::from_millis(101)).await;
        assert!(pressure.paused_until().is_none() && pressure.heavy());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(pressure.paused_until().is_none() && !pressure.heavy());
        let slow = PeakEwma::new(
            (),
            Duration::from_secs(5),
            1e9,
            CompleteOnResponse::default(),
        );
        let measured = Weight::Measured(slow.load());
        assert!(Weight::Refusing > measured);
    }
}
