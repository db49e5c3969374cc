//! The admin port: `/healthz` (the process is alive), `/readyz` (it should get traffic, and
//! what it is doing without) and `/metrics` (Prometheus text).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder as _, Registry, TextEncoder};

use crate::Health;

#[derive(Clone)]
struct AdminState {
    health: Health,
    registry: Registry,
}

/// The admin routes over `health` and `registry`.
pub fn router(health: Health, registry: Registry) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { health, registry })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if !state.health.is_ready() {
        let body = match state.health.waiting()[..] {
            [] => "not ready\n".to_owned(),
            ref waiting => format!("not ready: waiting for {}\n", waiting.join(", ")),
        };
        return (StatusCode::SERVICE_UNAVAILABLE, body);
    }
    match state.health.degraded()[..] {
        [] => (StatusCode::OK, "ready\n".to_owned()),
        ref without => (
            StatusCode::OK,
            format!("ready, degraded: without {}\n", without.join(", ")),
        ),
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admission: std::sync::Arc<crate::conn::Admission>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        crate::conn::AdmittedListener::new(listener, admission),
        router,
    )
    .with_graceful_shutdown(shutdown)
    .await
}
