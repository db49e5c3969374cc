//! Power of two choices over PeakEWMA that a retry can steer. It is tower's `p2c::Balance`
//! (a `ReadyCache` of `PeakEwma` endpoints fed by discovery, two random ready endpoints, the
//! less loaded one wins) with one addition tower cannot offer: a call's [`Tried`] endpoints are
//! passed over while an endpoint it has not tried is ready, so that a retry lands elsewhere
//! (Envoy's `previous_hosts` retry predicate).

use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::TryFutureExt as _;
use http::Request;
use rand::Rng as _;
use tower::discover::{Change, Discover};
use tower::load::Load;
use tower::ready_cache::ReadyCache;
use tower::{BoxError, Service};

/// The endpoints the attempts of one call went to, shared by its attempts through the request
/// extensions. The balancer adds each endpoint it picks.
#[derive(Debug)]
pub struct Tried<K>(Arc<Mutex<Vec<K>>>);

impl<K> Clone for Tried<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K> Default for Tried<K> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<K: PartialEq + Clone> Tried<K> {
    fn contains(&self, key: &K) -> bool {
        self.0.lock().is_ok_and(|tried| tried.contains(key))
    }

    fn add(&self, key: &K) {
        if let Ok(mut tried) = self.0.lock() {
            tried.push(key.clone());
        }
    }
}

/// The balancer: discovery's endpoints, p2c by load, [`Tried`] endpoints last.
pub struct Balance<D: Discover, B>
where
    D::Key: Hash,
{
    discover: D,
    endpoints: ReadyCache<D::Key, D::Service, Request<B>>,
    /// The ready endpoint `poll_ready` chose, used by `call` unless the call tried it already.
    chosen: Option<usize>,
}

impl<D: Discover, B> Balance<D, B>
where
    D::Key: Hash,
    D::Service: Service<Request<B>>,
{
    /// A balancer over the endpoints `discover` inserts and removes.
    pub fn new(discover: D) -> Self {
        Self {
            discover,
            endpoints: ReadyCache::default(),
            chosen: None,
        }
    }
}

impl<D, B> Balance<D, B>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + PartialEq + Send + 'static,
    D::Error: Into<BoxError>,
    D::Service: Service<Request<B>> + Load,
    <D::Service as Load>::Metric: PartialOrd,
    <D::Service as Service<Request<B>>>::Error: Into<BoxError>,
{
    /// Applies every change discovery has ready.
    fn follow_discovery(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        loop {
            match Pin::new(&mut self.discover).poll_discover(cx) {
                Poll::Ready(Some(Ok(Change::Insert(key, endpoint)))) => {
                    self.endpoints.push(key, endpoint);
                }
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    self.endpoints.evict(&key);
                }
                Poll::Ready(Some(Err(e))) => return Err(e.into()),
                // Discovery ended (the channel is being dropped) or has nothing new.
                Poll::Ready(None) | Poll::Pending => return Ok(()),
            }
        }
    }

    /// Moves endpoints that became ready into the ready set; failed ones are dropped (their
    /// watcher re-admits them when their health says so).
    fn promote_ready(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Err(error)) = self.endpoints.poll_pending(cx) {
            tracing::debug!(%error, "dropping a failed endpoint");
        }
    }

    /// P2C among `n` ready endpoints, the `i`th of which is at ready index `index(i)`.
    fn p2c(&self, n: usize, index: impl Fn(usize) -> usize) -> Option<usize> {
        match n {
            0 => None,
            1 => Some(index(0)),
            _ => {
                let mut rng = rand::thread_rng();
                let a = rng.gen_range(0..n);
                let mut b = rng.gen_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (index(a), index(b));
                Some(if self.load(a) <= self.load(b) { a } else { b })
            }
        }
    }

    fn load(&self, index: usize) -> Option<<D::Service as Load>::Metric> {
        self.endpoints
            .get_ready_index(index)
            .map(|(_, endpoint)| endpoint.load())
    }
}

impl<D, B> Service<Request<B>> for Balance<D, B>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + PartialEq + Send + 'static,
    D::Error: Into<BoxError>,
    D::Service: Service<Request<B>> + Load,
    <D::Service as Load>::Metric: PartialOrd,
    <D::Service as Service<Request<B>>>::Error: Into<BoxError>,
{
    type Response = <D::Service as Service<Request<B>>>::Response;
    type Error = BoxError;
    type Future = futures::future::MapErr<
        <D::Service as Service<Request<B>>>::Future,
        fn(<D::Service as Service<Request<B>>>::Error) -> BoxError,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.follow_discovery(cx)?;
        self.promote_ready(cx);
        loop {
            if let Some(index) = self.chosen.take() {
                match self.endpoints.check_ready_index(cx, index) {
                    Ok(true) => {
                        self.chosen = Some(index);
                        return Poll::Ready(Ok(()));
                    }
                    Ok(false) => {}
                    Err(error) => tracing::debug!(%error, "endpoint failed"),
                }
            }
            self.chosen = self.p2c(self.endpoints.ready_len(), |i| i);
            if self.chosen.is_none() {
                // Nothing ready: discovery or a pending endpoint wakes this task.
                return Poll::Pending;
            }
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut index = self.chosen.take().expect("called before poll_ready");
        if let Some(tried) = request.extensions().get::<Tried<D::Key>>().cloned() {
            let key = |endpoints: &ReadyCache<D::Key, D::Service, Request<B>>, i| {
                endpoints.get_ready_index(i).map(|(k, _)| k.clone())
            };
            if key(&self.endpoints, index).is_some_and(|k| tried.contains(&k)) {
                let untried: Vec<usize> = (0..self.endpoints.ready_len())
                    .filter(|&i| key(&self.endpoints, i).is_some_and(|k| !tried.contains(&k)))
                    .collect();
                // Every ready endpoint holds its readiness until called: any of them may be.
                if let Some(other) = self.p2c(untried.len(), |i| untried[i]) {
                    index = other;
                }
            }
            if let Some(k) = key(&self.endpoints, index) {
                tried.add(&k);
            }
        }
        self.endpoints
            .call_ready_index(index, request)
            .map_err(Into::into)
    }
}
