//! `keel worker`: a process that runs the jobs of every registered service, with no gRPC or
//! REST of its own; its admin port serves health and metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_server::drain::Ended;
use keel_server::{Drain, Health};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Stores, Telemetry, jobs, probe};
use crate::config::Settings;
use crate::peers::Peers;
use crate::registry::DOMAINS;

/// A started `keel worker`.
#[derive(Debug)]
pub struct Working {
    /// Where the admin endpoints are served.
    pub admin_addr: SocketAddr,
    /// The kinds of job it runs.
    pub kinds: Vec<String>,
    task: JoinHandle<anyhow::Result<Ended>>,
}

impl Working {
    /// Waits until it has drained (after its shutdown future resolved).
    pub async fn wait(self) -> anyhow::Result<Ended> {
        self.task.await.context("worker task panicked")?
    }
}

/// `keel worker`: the jobs of every registered service, without gRPC or REST; `admin` serves
/// health and metrics. On `shutdown` it stops claiming and lets the jobs it holds finish,
/// bounded by the grace period.
pub async fn work(
    settings: &Settings,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Working> {
    settings.validate()?;
    let telemetry = Telemetry::register(settings)?;
    let all: Vec<_> = DOMAINS.iter().map(|d| d.peer()).collect();
    let peers = Peers::connect(settings, &all, &[], &[], &telemetry.client)?;
    // Jobs do not sign in anyone: no signing keys, and a limiter of their own.
    let limiter = Arc::new(keel_guard::RateLimiter::local());
    let stores = Stores::open(settings, DOMAINS, &telemetry).await?;
    let parts = stores.parts(settings, &telemetry, &peers, None, &limiter);
    let kinds = jobs::kinds(&parts, DOMAINS)?;
    let names = kinds.iter().map(|k| k.name.clone()).collect();
    let drain = Drain::new();
    let worker = jobs::worker(settings, &stores.queue, kinds).spawn(drain.started());
    stores.spawn_queue_tasks(settings, &drain);
    let (health, _) = Health::new(std::iter::empty::<&str>(), drain.clone()).await;
    health.serving().await;
    if let Some(url) = &settings.stores.redis_url {
        tokio::spawn(probe::redis(
            url.clone(),
            vec![health.clone()],
            telemetry.redis_up.clone(),
            drain.clone(),
            settings.operations.health_probe_interval,
        ));
    }
    let admin_addr = admin.local_addr()?;
    let admin_stop = Arc::new(Notify::new());
    let admin = tokio::spawn(keel_server::admin::serve(
        admin,
        telemetry.admission(settings),
        keel_server::admin::router(health.clone(), telemetry.registry),
        {
            let admin_stop = admin_stop.clone();
            async move { admin_stop.notified().await }
        },
    ));
    tokio::spawn({
        let drain = drain.clone();
        async move {
            shutdown.await;
            health.not_serving().await;
            drain.start();
        }
    });
    let grace = settings.operations.shutdown_grace;
    let task = tokio::spawn(async move {
        let running = async move { worker.await.context("worker task") };
        let ended = keel_server::drain::bounded(running, &drain, grace).await?;
        admin_stop.notify_one();
        let _ = admin.await;
        let _ = stores.db.close().await;
        tracing::info!(?ended, "worker stopped");
        Ok(ended)
    });
    Ok(Working {
        admin_addr,
        kinds: names,
        task,
    })
}
