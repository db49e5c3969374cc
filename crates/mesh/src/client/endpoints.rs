//! Endpoint discovery with health: the resolver says which endpoints exist; one task per
//! endpoint watches its gRPC health and admits it to the balancer only while it reports SERVING.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::Stream;
use rand::Rng as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::discover::Change;

use super::outlier::{Observed, Outlier};
use super::{ClientOptions, Resolver};

type Changes = mpsc::UnboundedSender<Change<SocketAddr, Observed>>;

/// The stream of balancer changes for the endpoints `resolver` finds. The background tasks end
/// when the stream (the balancer) is dropped.
/// With it, what callers see of discovery.
pub fn discover(
    resolver: Arc<dyn Resolver>,
    options: ClientOptions,
) -> (
    impl Stream<Item = Result<Change<SocketAddr, Observed>, Infallible>> + Send + Unpin + 'static,
    Discovered,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let census = Arc::new(Census::default());
    let discovered = Discovered {
        admitted: census.admitted.subscribe(),
        look: census.look.clone(),
    };
    tokio::spawn(resolve_loop(resolver, options, tx, census));
    (UnboundedReceiverStream::new(rx).map(Ok), discovered)
}

/// What a caller sees of discovery: how many endpoints the balancer holds, and a way to have
/// it look again at once when it holds none.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// How many endpoints are admitted.
    pub admitted: watch::Receiver<usize>,
    /// Cuts discovery's pauses short.
    pub look: Arc<LookNow>,
}

impl Discovered {
    /// What a caller sees of `admitted` endpoints that never change: a channel with no
    /// discovery (one in process).
    pub fn fixed(admitted: usize) -> Self {
        let (_census, admitted) = watch::channel(admitted);
        Self {
            admitted,
            look: Arc::default(),
        }
    }
}

/// The most often an ask makes discovery look again: each look costs a lookup, or a connection
/// attempt per endpoint not admitted, which a down peer under load must not turn into a storm.
const LOOK_AT_MOST_EVERY: Duration = Duration::from_millis(250);

/// A call that finds no endpoint asks discovery to look again now (gRPC's `ResolveNow`, and
/// its reset of connection backoff): a fresh lookup, and every endpoint's health watch that
/// waits out its backoff tried at once. Without it, a peer that came up while discovery backed
/// off (a compose project starting: its name found nothing, its replicas refused) is reached
/// only after the pause, up to the longest backoff, while calls fail fast meanwhile.
#[derive(Debug)]
pub struct LookNow {
    /// Bumped by each ask; every pause has a receiver of its own, so that an ask made while
    /// its owner was busy (not pausing) ends its next pause: none is missed.
    asked: watch::Sender<()>,
}

impl Default for LookNow {
    fn default() -> Self {
        Self {
            asked: watch::Sender::new(()),
        }
    }
}

impl LookNow {
    /// Asks every pause of discovery to end now (or [`LOOK_AT_MOST_EVERY`] after its last
    /// look, when that is later).
    pub fn ask(&self) {
        self.asked.send_modify(|()| {});
    }

    /// What one pauser hears of the asks from now on.
    fn heard(&self) -> watch::Receiver<()> {
        self.asked.subscribe()
    }
}

/// Sleeps for `pause`, or, when a look is asked for (since `asks` last heard one), until
/// [`LOOK_AT_MOST_EVERY`] after the last look began (`looked`) if that comes sooner.
async fn pause(asks: &mut watch::Receiver<()>, pause: Duration, looked: tokio::time::Instant) {
    let natural = tokio::time::Instant::now() + pause;
    tokio::select! {
        () = tokio::time::sleep_until(natural) => {}
        _ = asks.changed() => {
            tokio::time::sleep_until(natural.min(looked + LOOK_AT_MOST_EVERY)).await;
        }
    }
}

/// How many endpoints exist, how many are admitted and how many are ejected: at most half may
/// be, so that a failure everywhere degrades to retries within budget, never to an empty
/// balancer.
#[derive(Debug, Default)]
struct Census {
    total: AtomicUsize,
    ejected: AtomicUsize,
    admitted: watch::Sender<usize>,
    look: Arc<LookNow>,
}

/// One endpoint's place in the admitted count; given back when its watcher ends or is
/// aborted (the endpoint left discovery).
struct Admission {
    census: Arc<Census>,
    admitted: bool,
}

impl Admission {
    fn set(&mut self, admitted: bool) {
        if admitted != self.admitted {
            self.admitted = admitted;
            self.census.admitted.send_modify(|n| {
                *n = if admitted {
                    *n + 1
                } else {
                    n.saturating_sub(1)
                };
            });
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.set(false);
    }
}

impl Census {
    fn try_eject(&self) -> bool {
        let total = self.total.load(Ordering::SeqCst);
        self.ejected
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |ejected| {
                ((ejected + 1) * 2 <= total).then_some(ejected + 1)
            })
            .is_ok()
    }

    fn readmit(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| {
                Some(e.saturating_sub(1))
            });
    }
}

/// Lookups one resolution starts at most before it gives up: a fresh one each time those in
/// flight outlast the patience.
const LOOKUPS_PER_RESOLUTION: u32 = 4;

/// One resolution of `resolver`: a lookup, then a fresh one each time those in flight outlast
/// `patience` (which doubles, up to four times the first), the first answer taken. A lookup
/// whose answer was lost can wait for glibc's retries on the same socket for 30 s (one did,
/// while podman's DNS server reloaded for starting containers) where a fresh one answers at
/// once; and a lookup that is merely slow (a dead first nameserver) is not given up when a
/// fresh one starts, so a DNS that is always slow is still heard. Past the last lookup's
/// patience the resolution gives up; those still in flight are dropped.
async fn resolution(
    resolver: &Arc<dyn Resolver>,
    first_patience: Duration,
) -> std::io::Result<Vec<SocketAddr>> {
    let lookup = || {
        let resolver = resolver.clone();
        async move { resolver.resolve().await }
    };
    let mut in_flight = futures::stream::FuturesUnordered::new();
    in_flight.push(lookup());
    let (mut started, mut patience) = (1, first_patience);
    let mut fresh_at = tokio::time::Instant::now() + patience;
    let mut waited = patience;
    loop {
        tokio::select! {
            answer = in_flight.next() => match answer {
                Some(Ok(addrs)) => return Ok(addrs),
                Some(Err(e)) if in_flight.is_empty() => return Err(e),
                // Another lookup may still answer.
                Some(Err(_)) | None => {}
            },
            () = tokio::time::sleep_until(fresh_at) => {
                if started == LOOKUPS_PER_RESOLUTION {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {waited:?}"),
                    ));
                }
                in_flight.push(lookup());
                started += 1;
                patience = (patience * 2).min(first_patience * 4);
                fresh_at += patience;
                waited += patience;
            }
        }
    }
}

async fn resolve_loop(
    resolver: Arc<dyn Resolver>,
    options: ClientOptions,
    tx: Changes,
    census: Arc<Census>,
) {
    let mut watchers: HashMap<SocketAddr, JoinHandle<()>> = HashMap::new();
    // While discovery knows no endpoint (a failed lookup, or a name that finds none yet: the
    // peers of a compose project that starts all at once), it looks again after a short,
    // growing pause instead of a whole interval.
    let mut quick_look = options.backoff.0;
    let mut asks = census.look.heard();
    loop {
        let looked = tokio::time::Instant::now();
        let resolved = resolution(&resolver, options.resolve_patience).await;
        match resolved {
            Ok(addrs) => follow(&mut watchers, &addrs, (&options, &tx, &census)),
            // Keep the endpoints we had: a resolver hiccup is no reason to drop healthy peers.
            Err(e) => {
                tracing::warn!(
                    peer = %options.peer,
                    error = %e,
                    "endpoint resolution failed; keeping the last set"
                );
            }
        }
        let pause = if watchers.is_empty() {
            let pause = quick_look.min(options.resolve_interval);
            quick_look = (quick_look * 2).min(options.resolve_interval);
            pause
        } else {
            quick_look = options.backoff.0;
            options.resolve_interval
        };
        tokio::select! {
            () = self::pause(&mut asks, pause, looked) => {}
            () = tx.closed() => break,
        }
    }
    for (_, watcher) in watchers {
        watcher.abort();
    }
}

/// Makes `watchers` the endpoints of `addrs`: a watcher for each new one, and each that left
/// aborted and removed from the balancer.
fn follow(
    watchers: &mut HashMap<SocketAddr, JoinHandle<()>>,
    addrs: &[SocketAddr],
    (options, tx, census): (&ClientOptions, &Changes, &Arc<Census>),
) {
    for addr in addrs {
        watchers.entry(*addr).or_insert_with(|| {
            tokio::spawn(watch(*addr, options.clone(), tx.clone(), census.clone()))
        });
    }
    let gone: Vec<SocketAddr> = watchers
        .keys()
        .filter(|a| !addrs.contains(a))
        .copied()
        .collect();
    for addr in gone {
        if let Some(watcher) = watchers.remove(&addr) {
            watcher.abort();
        }
        // Calls in flight keep their clone of the channel and finish.
        let _ = tx.send(Change::Remove(addr));
        tracing::info!(%addr, "endpoint left discovery");
    }
    census.total.store(watchers.len(), Ordering::SeqCst);
}

/// Admits `addr` while its health stream says SERVING and it is not ejected; on NOT_SERVING, an
/// error or a broken stream, removes it and watches again after a growing, jittered wait.
async fn watch(addr: SocketAddr, options: ClientOptions, tx: Changes, census: Arc<Census>) {
    let Some(endpoint) = endpoint(addr, &options) else {
        return;
    };
    // Each lazily connected channel is a connection of its own; health rides on the first.
    let connections: Vec<Channel> = (0..options.connections_per_endpoint.max(1))
        .map(|_| endpoint.connect_lazy())
        .collect();
    let channel = connections[0].clone();
    let outlier = Outlier::new(options.ejection.consecutive_failures);
    let metrics =
        super::metrics::EndpointMetrics::new(options.metrics.as_ref(), &options.peer, addr);
    let mut watched = Watched {
        addr,
        observed: Observed {
            connections,
            next: 0,
            outlier: outlier.clone(),
            pressure: Arc::default(),
            metrics: metrics.clone(),
        },
        admission: Admission {
            census: census.clone(),
            admitted: false,
        },
        census,
        tx,
        metrics,
        ejection: options.ejection,
        admitted: false,
        counted: None,
        ejections: 0,
        ejected_until: None,
    };
    let (min, max) = options.backoff;
    let mut backoff = min;
    let mut asks = watched.census.look.heard();
    loop {
        let looked = tokio::time::Instant::now();
        let request = HealthCheckRequest {
            service: options.health_service.clone(),
        };
        match HealthClient::new(channel.clone()).watch(request).await {
            Ok(stream) => {
                if watched.follow(stream.into_inner(), &outlier).await {
                    backoff = min;
                }
            }
            Err(status) => tracing::debug!(%addr, %status, "health watch refused"),
        }
        watched.settle(false);
        if watched.tx.is_closed() {
            if let Some(metrics) = &watched.metrics {
                metrics.transition(watched.counted, None);
            }
            return;
        }
        let jitter = rand::thread_rng().gen_range(0.5..=1.5);
        pause(&mut asks, backoff.mul_f64(jitter), looked).await;
        backoff = (backoff * 2).min(max);
    }
}

/// The channel settings for `addr`: TLS when configured, keepalive, no Nagle.
fn endpoint(addr: SocketAddr, options: &ClientOptions) -> Option<Endpoint> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).and_then(|endpoint| {
        match &options.tls {
            Some(tls) => endpoint.tls_config(tls.clone()),
            None => Ok(endpoint),
        }
    });
    match endpoint {
        Ok(endpoint) => Some(
            endpoint
                .connect_timeout(options.connect_timeout)
                .http2_keep_alive_interval(options.keepalive)
                .keep_alive_timeout(options.keepalive / 2)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true),
        ),
        Err(e) => {
            tracing::error!(%addr, error = %e, "unusable endpoint address");
            None
        }
    }
}

/// One endpoint as its watcher sees it: in the balancer or not, ejected until when, and the
/// state its metrics last counted.
struct Watched {
    addr: SocketAddr,
    tx: Changes,
    census: Arc<Census>,
    observed: Observed,
    admission: Admission,
    metrics: Option<super::metrics::EndpointMetrics>,
    ejection: super::outlier::Ejection,
    admitted: bool,
    counted: Option<&'static str>,
    ejections: u32,
    ejected_until: Option<tokio::time::Instant>,
}

impl Watched {
    /// Follows one health stream until it ends, ejecting and readmitting on the way; whether
    /// the endpoint was admitted during it.
    async fn follow(
        &mut self,
        mut stream: tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
        outlier: &Outlier,
    ) -> bool {
        // A fresh health stream is a fresh start (a restarted endpoint, say): forget an
        // ejection and any eject signal left over from the previous incarnation.
        let _ = futures::FutureExt::now_or_never(outlier.eject.notified());
        if self.ejected_until.take().is_some() {
            self.census.readmit();
        }
        let (mut serving, mut admitted_once) = (false, false);
        loop {
            let ejected_until = self.ejected_until;
            let readmit = async {
                match ejected_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                update = stream.message() => match update {
                    Ok(Some(update)) => serving = update.status == ServingStatus::Serving as i32,
                    _ => return admitted_once,
                },
                () = outlier.eject.notified(), if ejected_until.is_none() => self.eject(),
                () = readmit => self.readmit(),
            }
            admitted_once |= self.settle(serving);
        }
    }

    /// Ejects the endpoint for a length that doubles with each ejection, unless half the
    /// endpoints are ejected already.
    fn eject(&mut self) {
        let addr = self.addr;
        if !self.census.try_eject() {
            tracing::warn!(%addr, "endpoint failing, but half the endpoints are ejected already");
            return;
        }
        self.ejections = self.ejections.saturating_add(1);
        let length = self
            .ejection
            .base
            .saturating_mul(1 << (self.ejections - 1).min(16))
            .min(self.ejection.max);
        tracing::warn!(%addr, ?length, "endpoint ejected after consecutive failures");
        if let Some(metrics) = &self.metrics {
            metrics.ejected();
        }
        self.ejected_until = Some(tokio::time::Instant::now() + length);
    }

    fn readmit(&mut self) {
        tracing::info!(addr = %self.addr, "ejection over");
        self.ejected_until = None;
        self.census.readmit();
    }

    /// Puts the endpoint in the balancer while it is `serving` and not ejected, takes it out
    /// otherwise, and counts its state; whether it was just admitted.
    fn settle(&mut self, serving: bool) -> bool {
        let addr = self.addr;
        let wanted = serving && self.ejected_until.is_none();
        let admitting = wanted && !self.admitted;
        if admitting {
            tracing::debug!(%addr, "endpoint admitted");
            let _ = self.tx.send(Change::Insert(addr, self.observed.clone()));
            self.admission.set(true);
        } else if !wanted && self.admitted {
            tracing::info!(%addr, serving, "endpoint leaves the balancer");
            let _ = self.tx.send(Change::Remove(addr));
            self.admission.set(false);
        }
        self.admitted = wanted;
        let [admitted, ejected, not_serving] = super::metrics::ENDPOINT_STATES;
        let now = match (self.admitted, self.ejected_until.is_some()) {
            (true, _) => Some(admitted),
            (false, true) => Some(ejected),
            (false, false) => Some(not_serving),
        };
        if let Some(metrics) = &self.metrics {
            metrics.transition(self.counted, now);
        }
        self.counted = now;
        admitting
    }
}
