//! Deadlines across hops: the server records each call's deadline (from its `grpc-timeout`) for
//! the handler's task, refuses at once a call whose deadline is shorter than its method usually
//! takes here, and drops the handler when the deadline passes; the mesh client sends what is
//! left of it on every call the handler makes, so that a chain of calls never outlives the
//! caller's patience and no capacity goes to work nobody waits for.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request};
use prometheus::IntCounterVec;
use tokio::time::Instant;
use tower::{Layer, Service};

// A task-local: it rides with the task that serves the call, and `tokio::spawn` does not
// carry it. Work spawned for a call that must keep the call's deadline takes it along
// explicitly (read it with `current()` and scope the spawned future again).
tokio::task_local! {
    static DEADLINE: Instant;
}

/// The deadline of the call this task is serving, if its caller set one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// The deadline a call carries in its `grpc-timeout` header, if any (and well-formed).
pub fn timeout_of(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `timeout`, in the finest unit that fits in 8 digits.
pub fn format_grpc_timeout(timeout: Duration) -> HeaderValue {
    let micros = timeout.as_micros();
    let value = if micros < 100_000_000 {
        format!("{micros}u")
    } else if timeout.as_millis() < 100_000_000 {
        format!("{}m", timeout.as_millis())
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&value).expect("digits and a unit")
}

/// Calls a method must have answered here before its typical time is trusted.
const WARM_UP: u64 = 10;

/// Records each incoming call's deadline for the task that serves it; refuses at once, with
/// DEADLINE_EXCEEDED, a call whose deadline is shorter than its method's typical time here
/// (it would use capacity and still be late); and ends a call with DEADLINE_EXCEEDED when its
/// deadline passes: the handler's future is dropped, and with it the calls it was making.
/// (tonic's transport does the last for calls read from a socket; this also holds for calls
/// made in process.)
#[derive(Clone, Debug, Default)]
pub struct DeadlineLayer {
    times: Arc<crate::stats::MethodTable>,
    refused: Option<IntCounterVec>,
}

impl DeadlineLayer {
    /// Counts refused calls in `refused`, labelled `grpc_service`, `grpc_method` and `reason`
    /// (`deadline`).
    pub fn counted(mut self, refused: IntCounterVec) -> Self {
        self.refused = Some(refused);
        self
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    layer: DeadlineLayer,
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = http::Response<tonic::body::Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let timeout = timeout_of(request.headers());
        let typical = self.layer.times.of(request.uri().path());
        let usual = typical
            .as_ref()
            .filter(|t| t.answered() >= WARM_UP)
            .and_then(|t| t.typical());
        if let (Some(timeout), Some(usual)) = (timeout, usual)
            && timeout < usual
        {
            if let Some(refused) = &self.layer.refused {
                let (service, method) = crate::status::split_path(request.uri().path());
                refused
                    .with_label_values(&[service, method, "deadline"])
                    .inc();
            }
            let status = tonic::Status::deadline_exceeded(format!(
                "the deadline ({} ms) is shorter than this method takes ({} ms): not started",
                timeout.as_millis(),
                usual.as_millis()
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let started = Instant::now();
        let future = self.inner.call(request);
        let answered = move |answer: &Result<S::Response, S::Error>| {
            if let (Ok(_), Some(typical)) = (answer, typical) {
                typical.record(started.elapsed());
            }
        };
        let Some(timeout) = timeout else {
            return Box::pin(async move {
                let answer = future.await;
                answered(&answer);
                answer
            });
        };
        let deadline = started + timeout;
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, DEADLINE.scope(deadline, future)).await {
                Ok(answer) => {
                    answered(&answer);
                    answer
                }
                Err(_) => Ok(tonic::Status::deadline_exceeded("deadline exceeded").into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn timeouts_round_trip() {
        for timeout in [
            Duration::from_millis(1),
            Duration::from_millis(2500),
            Duration::from_secs(3600),
        ] {
            let value = format_grpc_timeout(timeout);
            assert_eq!(
                parse_grpc_timeout(value.to_str().unwrap()),
                Some(timeout),
                "{value:?}"
            );
        }
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("1x"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_deadline_passes_is_dropped_and_answered_deadline_exceeded() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::ServiceExt as _;
        let finished = Arc::new(AtomicUsize::new(0));
        let handler = {
            let finished = finished.clone();
            tower::service_fn(move |_: Request<()>| {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        tonic::body::Body::empty(),
                    ))
                }
            })
        };
        let layer = DeadlineLayer::default();
        let call = |timeout: &'static str| {
            layer.layer(handler.clone()).oneshot(
                Request::builder()
                    .header("grpc-timeout", timeout)
                    .body(())
                    .unwrap(),
            )
        };

        let answer = call("10m").await.unwrap();
        assert_eq!(answer.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            finished.load(Ordering::SeqCst),
            0,
            "the handler was dropped"
        );

        let answer = call("100m").await.unwrap();
        assert!(answer.headers().get("grpc-status").is_none());
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shorter_than_the_method_usually_takes_is_refused_without_running() {
        use std::sync::atomic::AtomicUsize;
        use tower::ServiceExt as _;
        let started = Arc::new(AtomicUsize::new(0));
        let handler = {
            let started = started.clone();
            tower::service_fn(move |_: Request<()>| {
                started.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        tonic::body::Body::empty(),
                    ))
                }
            })
        };
        let refused = IntCounterVec::new(
            prometheus::Opts::new("refused", "refused"),
            &["grpc_service", "grpc_method", "reason"],
        )
        .unwrap();
        let layer = DeadlineLayer::default().counted(refused.clone());
        let call = |timeout: Option<&'static str>| {
            let mut request = Request::builder().uri("/test.Echo/Call");
            if let Some(timeout) = timeout {
                request = request.header("grpc-timeout", timeout);
            }
            layer
                .layer(handler.clone())
                .oneshot(request.body(()).unwrap())
        };

        // Until the method has a history, any deadline is tried.
        for _ in 0..WARM_UP {
            let answer = call(None).await.unwrap();
            assert!(answer.headers().get("grpc-status").is_none());
        }
        assert_eq!(started.load(Ordering::SeqCst), WARM_UP as usize);

        let answer = call(Some("10m")).await.unwrap();
        assert_eq!(answer.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
        assert_eq!(
            started.load(Ordering::SeqCst),
            WARM_UP as usize,
            "not started"
        );
        let counted = refused
            .with_label_values(&["test.Echo", "Call", "deadline"])
            .get();
        assert_eq!(counted, 1);

        let answer = call(Some("100m")).await.unwrap();
        assert!(
            answer.headers().get("grpc-status").is_none(),
            "time enough: it runs"
        );
        assert_eq!(started.load(Ordering::SeqCst), WARM_UP as usize + 1);
    }

    #[tokio::test]
    async fn a_scoped_deadline_is_visible_to_the_task() {
        assert!(current().is_none());
        let deadline = Instant::now() + Duration::from_secs(1);
        let seen = DEADLINE.scope(deadline, async { current() }).await;
        assert_eq!(seen, Some(deadline));
    }
}
