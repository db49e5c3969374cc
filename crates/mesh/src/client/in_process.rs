//! A channel to services of this very process, called without a socket: the call passes the
//! process's own server stack as a socket's call would, with no HTTP/2 framing, no loopback
//! and no hop between tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::body::Body;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt as _};

use super::{ClientOptions, MeshChannel, MeshError};

/// What answers a process's calls to itself: its server stack over its services.
pub type Answering = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// Where the in-process channels of one process send their calls, given once the process
/// serves: the services that call through such a channel are built before the stack that
/// serves them. Until then a call fails as UNAVAILABLE, as a peer that does not serve yet.
#[derive(Clone, Default)]
pub struct Served(Arc<OnceLock<Answering>>);

impl Served {
    /// Sends every call of this process's in-process channels to `answering` from now on;
    /// false (and nothing changed) when it was given one already.
    #[must_use]
    pub fn serve(&self, answering: Answering) -> bool {
        self.0.set(answering).is_ok()
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("serving", &self.0.get().is_some())
            .finish()
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, MeshError>> + Send>>;

impl Service<Request<Body>> for Served {
    type Response = Response<Body>;
    type Error = MeshError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), MeshError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Answer {
        let answering = self.0.get().cloned();
        Box::pin(async move {
            match answering {
                Some(answering) => answering.oneshot(request).await.map_err(MeshError),
                None => Err(MeshError("this process does not serve yet".into())),
            }
        })
    }
}

/// A channel to the services `served` will answer for, in this process: the call's deadline,
/// retries and metrics as [`super::balanced`]'s; no discovery, health watching or balancing,
/// since one process answers (a retry goes to it again, within the same budget).
pub fn in_process(served: &Served, options: ClientOptions) -> MeshChannel {
    if let Some(metrics) = &options.metrics {
        metrics.in_process(&options.peer);
    }
    let discovered = super::endpoints::Discovered::fixed(1);
    let policy = Arc::new(super::retry::RetryPolicy::new(options, discovered));
    BoxCloneSyncService::new(super::retry::Retrying {
        inner: served.clone(),
        policy,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic::Code;

    use super::*;

    const PATH: &str = "/keel.test.v1.Test/Get";

    fn call() -> Request<Body> {
        Request::builder()
            .method("POST")
            .uri(format!("http://peer{PATH}"))
            .body(Body::empty())
            .unwrap()
    }

    fn code(response: &Response<Body>) -> Option<Code> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(Code::from)
    }

    /// Before the process serves, a call is UNAVAILABLE, as a peer not up yet; once it
    /// serves, every channel built earlier reaches it, and it hears the call's deadline.
    #[tokio::test]
    async fn a_channel_made_before_the_process_serves_reaches_it_once_it_does() {
        let served = Served::default();
        let channel = in_process(&served, ClientOptions::default());
        let before = channel.clone().oneshot(call()).await.unwrap();
        assert_eq!(code(&before), Some(Code::Unavailable));

        let heard = Arc::new(AtomicUsize::new(0));
        let answering = tower::service_fn({
            let heard = heard.clone();
            move |request: Request<Body>| {
                let heard = heard.clone();
                async move {
                    if request.headers().contains_key("grpc-timeout") {
                        heard.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok::<_, BoxError>(tonic::Status::ok("").into_http())
                }
            }
        });
        assert!(
            served.serve(BoxCloneSyncService::new(answering)),
            "the first"
        );
        assert!(!served.serve(BoxCloneSyncService::new(tower::service_fn(
            |_: Request<Body>| async { Ok::<_, BoxError>(Response::new(Body::empty())) }
        ))));
        let after = channel.oneshot(call()).await.unwrap();
        assert_eq!(code(&after), Some(Code::Ok));
        assert_eq!(
            heard.load(Ordering::SeqCst),
            1,
            "the call carried its deadline"
        );
    }
}
