//! The edges of a process: the REST port (the gateway, plaintext or TLS) and the admin port
//! (health, readiness, metrics), each admitting its connections.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_server::Health;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Process;
use crate::config::Settings;

/// The REST port and the admin port, serving until the drain (REST) or `admin_stop` (admin,
/// which outlives the drain so that probes see it through).
pub(super) struct Edges {
    pub(super) rest: futures::future::BoxFuture<'static, std::io::Result<()>>,
    pub(super) admin: JoinHandle<std::io::Result<()>>,
    pub(super) admin_stop: Arc<Notify>,
}

impl Edges {
    pub(super) fn start(
        process: &Process<'_>,
        gateway: Arc<keel_gateway::Gateway>,
        (http, admin): (TcpListener, TcpListener),
        health: &Health,
    ) -> anyhow::Result<Self> {
        let registry = process.telemetry.registry.clone();
        let app = gateway.router(keel_server::admin::router(health.clone(), registry.clone()));
        let admission = process.admission.clone();
        let rest = serve_rest(
            process.settings,
            http,
            admission,
            app,
            process.drain.started(),
        )?;
        let admin_stop = Arc::new(Notify::new());
        let stopped = {
            let admin_stop = admin_stop.clone();
            async move { admin_stop.notified().await }
        };
        let router = keel_server::admin::router(health.clone(), registry);
        let admin = keel_server::admin::serve(admin, process.admission.clone(), router, stopped);
        Ok(Self {
            rest,
            admin: tokio::spawn(admin),
            admin_stop,
        })
    }
}

/// The REST port: plaintext (HTTP/1.1 and h2c), or HTTPS with HTTP/2 and HTTP/1.1 by ALPN
/// when a certificate is configured; until `stopped`.
fn serve_rest(
    settings: &Settings,
    listener: TcpListener,
    admission: Arc<keel_server::conn::Admission>,
    app: axum::Router,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<futures::future::BoxFuture<'static, std::io::Result<()>>> {
    use axum::serve::ListenerExt as _;
    use futures::FutureExt as _;
    // Without TCP_NODELAY an HTTP/2 response (HEADERS, then DATA) waits out the client's
    // delayed ACK: 40 ms at p50 for a list, where HTTP/1.1 writes both at once.
    let nodelay = |tcp: &tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on a REST connection");
        }
    };
    let edge = &settings.edge;
    let (Some(cert), Some(key)) = (&edge.http_tls_cert, &edge.http_tls_key) else {
        // Admitted first; the tap outermost, which is what gives axum the peer's address.
        let listener = keel_server::conn::AdmittedListener::new(listener, admission)
            .tap_io(move |kept| nodelay(kept.get_ref()));
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        return Ok(axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .into_future()
            .boxed());
    };
    let config = keel_gateway::tls::server_config(cert, key).context("the REST certificate")?;
    let listener = keel_gateway::tls::TlsListener::new(listener, config)?;
    let listener = keel_server::conn::AdmittedListener::new(listener, admission)
        .tap_io(move |kept| nodelay(kept.get_ref().get_ref().0));
    let app = app
        .layer(axum::Extension(keel_gateway::tls::ServedOverTls))
        .into_make_service_with_connect_info::<SocketAddr>();
    Ok(axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .into_future()
        .boxed())
}
