//! Power of two choices over PeakEWMA that a retry can steer. It is tower's `p2c::Balance`
//! (a `ReadyCache` of `PeakEwma` endpoints fed by discovery, two random ready endpoints, the
//! less loaded one wins) with one addition tower cannot offer: a call's [`Tried`] endpoints are
//! passed over while an endpoint it has not tried is ready, so that a retry lands elsewhere
//! (Envoy's `previous_hosts` retry predicate), and a hedge ([`Elsewhere`]) goes nowhere else.

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
        if let Ok(mut tried) = self.0.lock()
            && !tried.contains(key)
        {
            tried.push(key.clone());
        }
    }

    /// How many endpoints the call's attempts went to (each once).
    pub(super) fn len(&self) -> usize {
        self.0.lock().map_or(0, |tried| tried.len())
    }
}

/// Marks an attempt that only an endpoint its call has not [`Tried`] may take (a hedge: sent
/// to the endpoint the slow attempt is on, it would wait behind the same stall and double that
/// endpoint's load). With none of those ready, the attempt fails at once with
/// [`NowhereElse`], which is no answer to the call.
#[derive(Debug, Clone, Copy)]
pub struct Elsewhere;

/// Why an [`Elsewhere`] attempt was not sent.
#[derive(Debug, thiserror::Error)]
#[error("no endpoint this call has not tried is ready")]
pub struct NowhereElse;

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
    type Future = futures::future::Either<
        futures::future::MapErr<
            <D::Service as Service<Request<B>>>::Future,
            fn(<D::Service as Service<Request<B>>>::Error) -> BoxError,
        >,
        futures::future::Ready<Result<Self::Response, BoxError>>,
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
                match self.p2c(untried.len(), |i| untried[i]) {
                    Some(other) => index = other,
                    // The chosen endpoint keeps its readiness, for whichever call is next.
                    None if request.extensions().get::<Elsewhere>().is_some() => {
                        return futures::future::Either::Right(futures::future::ready(Err(
                            NowhereElse.into(),
                        )));
                    }
                    None => {}
                }
            }
            if let Some(k) = key(&self.endpoints, index) {
                tried.add(&k);
            }
        }
        futures::future::Either::Left(
            self.endpoints
                .call_ready_index(index, request)
                .map_err(Into::into),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tower::discover::ServiceList;

    use super::*;

    /// An endpoint that answers its own number, ready while `ready` is set.
    #[derive(Clone)]
    struct Numbered {
        number: usize,
        ready: Arc<AtomicBool>,
    }

    impl Service<Request<()>> for Numbered {
        type Response = usize;
        type Error = BoxError;
        type Future = futures::future::Ready<Result<usize, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(Ok(()))
            } else {
                // Woken by the test's next poll of the balancer.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            futures::future::ready(Ok(self.number))
        }
    }

    impl Load for Numbered {
        type Metric = usize;

        fn load(&self) -> usize {
            0
        }
    }

    /// A request of the call whose attempts went to `tried`, a hedge if `hedge`.
    fn attempt(tried: &Tried<usize>, hedge: bool) -> Request<()> {
        let mut request = Request::new(());
        request.extensions_mut().insert(tried.clone());
        if hedge {
            request.extensions_mut().insert(Elsewhere);
        }
        request
    }

    /// Sends `request` through `balance` once it is ready (bounded: the endpoints are ready or
    /// not at once).
    fn send<S>(
        balance: &mut S,
        request: Request<()>,
    ) -> impl Future<Output = Result<usize, BoxError>>
    where
        S: Service<Request<()>, Response = usize, Error = BoxError>,
    {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(
            matches!(balance.poll_ready(&mut cx), Poll::Ready(Ok(()))),
            "an endpoint is ready"
        );
        balance.call(request)
    }

    /// A hedge goes only to an endpoint its call has not tried: with the other one not ready,
    /// it fails at once, where a retry of the same call goes to the tried one.
    #[tokio::test]
    async fn a_hedge_never_lands_on_an_endpoint_its_call_tried() {
        let ready = [
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
        ];
        let endpoints = ready.iter().enumerate().map(|(number, ready)| Numbered {
            number,
            ready: ready.clone(),
        });
        let mut balance = Balance::new(ServiceList::new::<Request<()>>(endpoints));
        let tried = Tried::default();
        assert_eq!(send(&mut balance, attempt(&tried, false)).await.unwrap(), 0);
        let declined = send(&mut balance, attempt(&tried, true)).await.unwrap_err();
        assert!(declined.is::<NowhereElse>(), "{declined}");
        assert_eq!(send(&mut balance, attempt(&tried, false)).await.unwrap(), 0);
        assert_eq!(tried.len(), 1, "each endpoint counted once");

        ready[1].store(true, Ordering::SeqCst);
        assert_eq!(send(&mut balance, attempt(&tried, true)).await.unwrap(), 1);
        assert_eq!(tried.len(), 2);
    }
}
