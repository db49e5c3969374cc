//! The REST gateway of a process: every service that has a peer channel, transcoded.

use std::sync::Arc;

use anyhow::Context as _;
use keel_auth::TokenVerifier;

use super::peers::Peers;
use crate::config::Settings;
use crate::proto::FILE_DESCRIPTOR_SET;

/// The gateway over `peers`: each service's calls go through its balanced channel.
pub async fn build(
    settings: &Settings,
    peers: &Peers,
    verifier: Arc<TokenVerifier>,
    metrics: keel_gateway::HttpMetrics,
) -> anyhow::Result<Arc<keel_gateway::Gateway>> {
    let mut backends = keel_gateway::Backends::default();
    let mut services = Vec::new();
    for (service, channel) in peers.services() {
        for name in service.grpc_names {
            backends = backends.with(name, channel.clone());
            services.push((*name).to_owned());
        }
    }
    let limiter = match &settings.stores.redis_url {
        Some(url) => keel_gateway::RateLimiter::redis(url, &settings.stores.redis_prefix)
            .await
            .context("connect the rate limiter to Redis")?,
        None => keel_gateway::RateLimiter::local(),
    };
    let config = keel_gateway::GatewayConfig {
        services,
        max_body_bytes: settings.limits.max_message_bytes,
        cors_origins: settings.gateway.cors_origins.clone(),
        quota: settings.gateway.rate_limit.0,
        strict_quota: settings.gateway.auth_rate_limit.0,
        strict_paths: vec!["/v1/auth:login".into(), "/v1/auth:register".into()],
        title: "keel".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let gateway = keel_gateway::Gateway::new(
        FILE_DESCRIPTOR_SET,
        backends,
        limiter,
        Some(verifier),
        metrics,
        config,
    )
    .context("build the REST gateway")?;
    Ok(Arc::new(gateway))
}
