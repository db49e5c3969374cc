//! The quiet period of a drain. When a replica stops, its listener closes at once (new callers
//! go elsewhere) but its open connections keep being served until their callers have gone quiet;
//! only then does the server send GOAWAY. A client that still had streams queued when it heard
//! NOT_SERVING sends them, and they are served: a GOAWAY that raced them would close the
//! connection under them, and the caller could not tell whether they had been processed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{FutureExt as _, Stream, StreamExt as _};
use http::Request;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::conn::{Admission, Kept};

/// No call for this long: the callers on open connections have moved on.
pub const QUIET: Duration = Duration::from_millis(100);

/// The longest a drain waits for quiet before it sends GOAWAY anyway.
pub const AT_MOST: Duration = Duration::from_secs(2);

/// When the latest call arrived; health checks (a prober's, a watcher's) do not count.
#[derive(Clone, Debug)]
pub struct Arrivals {
    origin: Instant,
    /// Nanoseconds after `origin`.
    latest: Arc<AtomicU64>,
}

impl Default for Arrivals {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            latest: Arc::default(),
        }
    }
}

impl Arrivals {
    fn note(&self) {
        let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.latest.fetch_max(since, Ordering::Relaxed);
    }

    fn latest(&self) -> Instant {
        self.origin + Duration::from_nanos(self.latest.load(Ordering::Relaxed))
    }

    /// Resolves once no call has arrived for `quiet`, or after `at_most`.
    pub async fn quiet(&self, quiet: Duration, at_most: Duration) {
        let give_up = Instant::now() + at_most;
        loop {
            let quiet_at = self.latest() + quiet;
            if quiet_at <= Instant::now() || give_up <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(quiet_at.min(give_up)).await;
        }
    }
}

impl<S> Layer<S> for Arrivals {
    type Service = Noted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Noted {
            inner,
            arrivals: self.clone(),
        }
    }
}

/// See [`Arrivals`].
#[derive(Clone, Debug)]
pub struct Noted<S> {
    inner: S,
    arrivals: Arrivals,
}

impl<S, B> Service<Request<B>> for Noted<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !request.uri().path().starts_with("/grpc.health.v1.Health/") {
            self.arrivals.note();
        }
        self.inner.call(request)
    }
}

/// The connections a stopping server takes, and when it shuts them down, for tonic's
/// `serve_with_incoming_shutdown`: connections from `listener` that `admission` admits, until
/// `stop` resolves (then the listener closes), and the shutdown (GOAWAY, then in-flight calls finish) once `arrivals` have
/// been quiet for [`QUIET`], at most [`AT_MOST`] after `stop`.
pub fn phases(
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
    arrivals: Arrivals,
    admission: Arc<Admission>,
) -> (
    impl Stream<Item = io::Result<Kept<TcpStream>>> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let stop = stop.boxed().shared();
    let accepting = {
        let stop = stop.clone();
        futures::stream::unfold(Some(listener), move |listener| {
            let (stop, admission) = (stop.clone(), admission.clone());
            async move {
                let listener = listener?;
                tokio::select! {
                    accepted = listener.accept() => {
                        // A connection the process cannot hold is dropped (closed) here.
                        let kept = match accepted {
                            Ok((stream, peer)) => {
                                let _ = stream.set_nodelay(true);
                                admission.admit(stream, peer).map(Ok)
                            }
                            Err(e) => Some(Err(e)),
                        };
                        Some((kept, Some(listener)))
                    }
                    // Drop the listener: new connections are refused from here on.
                    () = stop => Some((None, None)),
                }
            }
        })
        .filter_map(futures::future::ready)
        // The stream must not end: an ended incoming makes tonic shut down at once.
        .chain(futures::stream::pending())
    };
    let shutdown = async move {
        stop.await;
        arrivals.quiet(QUIET, AT_MOST).await;
    };
    (
        Box::pin(accepting) as Pin<Box<dyn Stream<Item = _> + Send>>,
        shutdown,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_comes_a_quiet_period_after_the_latest_call() {
        let arrivals = Arrivals::default();
        arrivals.note();
        let started = Instant::now();
        arrivals.quiet(QUIET, AT_MOST).await;
        assert_eq!(started.elapsed(), QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_keep_coming_hold_the_drain_at_most_so_long() {
        let arrivals = Arrivals::default();
        let busy = {
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                loop {
                    arrivals.note();
                    tokio::time::sleep(QUIET / 2).await;
                }
            })
        };
        let started = Instant::now();
        arrivals.quiet(QUIET, AT_MOST).await;
        assert_eq!(started.elapsed(), AT_MOST);
        busy.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_calls_the_drain_does_not_wait() {
        let arrivals = Arrivals::default();
        tokio::time::advance(QUIET).await;
        let started = Instant::now();
        arrivals.quiet(QUIET, AT_MOST).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
