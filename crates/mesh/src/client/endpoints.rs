//! Endpoint discovery with health: the resolver says which endpoints exist; one task per
//! endpoint watches its gRPC health and admits it to the balancer only while it reports SERVING.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::Stream;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::discover::Change;

use super::{ClientOptions, Resolver};

type Changes = mpsc::UnboundedSender<Change<SocketAddr, Channel>>;

/// The stream of balancer changes for the endpoints `resolver` finds. The background tasks end
/// when the stream (the balancer) is dropped.
pub fn discover(
    resolver: Arc<dyn Resolver>,
    options: ClientOptions,
) -> impl Stream<Item = Result<Change<SocketAddr, Channel>, Infallible>> + Send + Unpin + 'static {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(resolve_loop(resolver, options, tx));
    UnboundedReceiverStream::new(rx).map(Ok)
}

async fn resolve_loop(resolver: Arc<dyn Resolver>, options: ClientOptions, tx: Changes) {
    let mut watchers: HashMap<SocketAddr, JoinHandle<()>> = HashMap::new();
    loop {
        match resolver.resolve().await {
            Ok(addrs) => {
                for addr in &addrs {
                    watchers
                        .entry(*addr)
                        .or_insert_with(|| tokio::spawn(watch(*addr, options.clone(), tx.clone())));
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
            }
            // Keep the endpoints we had: a resolver hiccup is no reason to drop healthy peers.
            Err(e) => {
                tracing::warn!(error = %e, "endpoint resolution failed; keeping the last set")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(options.resolve_interval) => {}
            () = tx.closed() => break,
        }
    }
    for (_, watcher) in watchers {
        watcher.abort();
    }
}

/// Admits `addr` while its health stream says SERVING; on NOT_SERVING, an error or a broken
/// stream, removes it and watches again after a growing, jittered wait.
async fn watch(addr: SocketAddr, options: ClientOptions, tx: Changes) {
    let channel = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => endpoint
            .connect_timeout(options.connect_timeout)
            .http2_keep_alive_interval(options.keepalive)
            .keep_alive_timeout(options.keepalive / 2)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy(),
        Err(e) => {
            tracing::error!(%addr, error = %e, "unusable endpoint address");
            return;
        }
    };
    let (min, max) = options.backoff;
    let mut backoff = min;
    loop {
        let mut admitted = false;
        let request = HealthCheckRequest {
            service: options.health_service.clone(),
        };
        match HealthClient::new(channel.clone()).watch(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    let serving = update.status == ServingStatus::Serving as i32;
                    if serving && !admitted {
                        tracing::debug!(%addr, "endpoint serving");
                        let _ = tx.send(Change::Insert(addr, channel.clone()));
                        backoff = min;
                    } else if !serving && admitted {
                        tracing::info!(%addr, "endpoint not serving");
                        let _ = tx.send(Change::Remove(addr));
                    }
                    admitted = serving;
                }
            }
            Err(status) => tracing::debug!(%addr, %status, "health watch refused"),
        }
        if admitted {
            let _ = tx.send(Change::Remove(addr));
        }
        if tx.is_closed() {
            return;
        }
        let jitter = rand::thread_rng().gen_range(0.5..=1.5);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(max);
    }
}
