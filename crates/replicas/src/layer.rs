//! The layer that gives each call what it must read: it scopes the call with the caller's
//! session and the consistency token it sent, and after a write it raises the session's floor
//! to the primary's position and answers that position as the call's consistency token.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use crate::{Lsn, NEED, Need, Reads};

/// The metadata (request and response header) that carries a consistency token: the WAL
/// position a write left the primary at, which a read that sends it is served at least as new as.
pub const CONSISTENCY_TOKEN: &str = "keel-consistency-token";

/// Who a call's session is, from its request's extensions (the verified caller).
pub type SessionOf = fn(&http::Extensions) -> Option<String>;

/// See the module documentation.
#[derive(Clone)]
pub struct ConsistencyLayer {
    reads: Reads,
    writes: Arc<HashSet<String>>,
    session: SessionOf,
}

impl std::fmt::Debug for ConsistencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsistencyLayer")
            .field("writes", &self.writes.len())
            .finish_non_exhaustive()
    }
}

impl ConsistencyLayer {
    /// Reads through `reads`; the calls of `writes` (`/package.Service/Method`) raise the floor
    /// of the session `session` names.
    pub fn new(reads: Reads, writes: impl IntoIterator<Item = String>, session: SessionOf) -> Self {
        Self {
            reads,
            writes: Arc::new(writes.into_iter().collect()),
            session,
        }
    }
}

impl<S> Layer<S> for ConsistencyLayer {
    type Service = ConsistencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConsistencyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct ConsistencyService<S> {
    inner: S,
    layer: ConsistencyLayer,
}

impl<S> std::fmt::Debug for ConsistencyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.layer.fmt(f)
    }
}

impl<S, B, R> Service<Request<B>> for ConsistencyService<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let write = layer.writes.contains(request.uri().path());
        let token = match request.headers().get(CONSISTENCY_TOKEN) {
            None => None,
            Some(sent) => match sent.to_str().ok().and_then(Lsn::from_token) {
                Some(lsn) => Some(lsn),
                None => return Box::pin(async { Ok(not_a_token()) }),
            },
        };
        let session: Option<Arc<str>> = (layer.session)(request.extensions()).map(Into::into);
        // A write reads what it decides on, and what it answers after writing, from the
        // primary: its own write is not on any replica yet.
        let need = if write {
            Need::Latest
        } else {
            Need::AtLeast {
                session: session.clone(),
                token,
            }
        };
        Box::pin(async move {
            let mut response = NEED.scope(need, inner.call(request)).await?;
            if write && !refused(&response) {
                layer.wrote(session.as_deref(), &mut response).await;
            }
            Ok(response)
        })
    }
}

impl ConsistencyLayer {
    /// After a write: the session's floor raised to the primary's position, which the response
    /// carries as its token. A failure here fails nothing (the write is done): the session's
    /// reads in this process go to the primary for the floor's time instead.
    async fn wrote<R>(&self, session: Option<&str>, response: &mut Response<R>) {
        let lsn = match self.reads.written().await {
            Ok(lsn) => Some(lsn),
            Err(e) => {
                tracing::warn!(error = %e, "the primary's WAL position after a write is unknown");
                None
            }
        };
        if let Some(session) = session {
            self.reads.remember(session, lsn).await;
        }
        if let Some(value) = lsn.and_then(|lsn| HeaderValue::from_str(&lsn.token()).ok()) {
            response.headers_mut().insert(CONSISTENCY_TOKEN, value);
        }
    }
}

/// INVALID_ARGUMENT, as a trailers-only answer, for a consistency token that is not one a
/// write answered: a client's bug is told, not read past.
fn not_a_token<R: Default>() -> Response<R> {
    let mut response = Response::new(R::default());
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from_static("3"));
    headers.insert(
        "grpc-message",
        HeaderValue::from_static(
            "keel-consistency-token: not a token a write answered (16 hex digits)",
        ),
    );
    response
}

/// A trailers-only error answer (its status in the headers): nothing was written.
fn refused<R>(response: &Response<R>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status != "0")
}
