//! The REST gateway of a process: every service that has a peer channel, transcoded.

use std::sync::Arc;

use anyhow::Context as _;
use keel_auth::TokenVerifier;

use crate::config::Settings;
use crate::peers::Peers;
use crate::proto::FILE_DESCRIPTOR_SET;

/// The gateway over `peers`: a service this process serves is called `in_process` when given
/// (one replica: nothing to balance), on its lane (a `keel_gateway::lane::Lane`), every other
/// through its balanced channel, carrying the client's address vouched for with `hop_secret`.
pub fn build(
    settings: &Settings,
    peers: &Peers,
    in_process: Option<impl keel_gateway::Transport>,
    verifier: Arc<TokenVerifier>,
    limiter: Arc<keel_guard::RateLimiter>,
    hop_secret: Arc<str>,
    metrics: keel_gateway::HttpMetrics,
) -> anyhow::Result<Arc<keel_gateway::Gateway>> {
    let mut backends = keel_gateway::Backends::default();
    let mut services = Vec::new();
    for (service, channel) in peers.services() {
        for name in service.grpc_names {
            backends = match &in_process {
                Some(local) if peers.is_local(service.name) => {
                    backends.on_lane(name, local.clone())
                }
                _ => backends.with(name, channel.clone()),
            };
            services.push((*name).to_owned());
        }
    }
    let config = keel_gateway::GatewayConfig {
        services,
        max_body_bytes: settings.limits.max_message_bytes,
        cors_origins: settings.edge.cors_origins.clone(),
        quota: settings.edge.rate_limit.0,
        proxies: settings.edge.proxies(),
        hop_secret: Some(hop_secret),
        title: "keel".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        docs: settings.edge.docs(settings.operations.environment),
        field_rules: crate::registry::DOMAINS
            .iter()
            .flat_map(|domain| (domain.openapi_rules)(settings))
            .map(|(field, rules)| (field.to_owned(), rules))
            .collect(),
        max_streams_per_address: settings.edge.max_streams_per_address,
    };
    let gateway = keel_gateway::Gateway::new(
        FILE_DESCRIPTOR_SET,
        backends,
        limiter,
        Some(verifier),
        metrics,
        config,
    )
    .context("build the REST gateway")?
    .rendering_with(crate::proto::json::renderer)
    .parsing_with(crate::proto::json::read::parser);
    Ok(Arc::new(gateway))
}
