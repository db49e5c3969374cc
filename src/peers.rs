//! The mesh as keel uses it: one balanced channel per peer service, found at its
//! `--<service>-endpoints` or, when it runs here, at this process's own replicas — or, with
//! one replica, in process, through the replica's own stack without its socket.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use keel_mesh::client::{
    Answering, ClientMetrics, ClientOptions, MeshChannel, Methods, Served, Target,
};

use crate::config::Settings;
use crate::proto::FILE_DESCRIPTOR_SET;

/// A balanced channel to each peer service that has somewhere to go.
#[derive(Clone, Default)]
pub struct Peers {
    channels: HashMap<&'static str, Peer>,
    /// The services in registry order.
    order: Vec<&'static str>,
    /// Where the channels to services of this process send their calls, when they are called
    /// in process (one replica); `None` when none is.
    own: Option<Served>,
}

/// A service as the mesh sees it: its name, and its gRPC services (the first is the one whose
/// health the mesh watches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerService {
    /// Its name in `--<name>-endpoints`, logs and metrics.
    pub name: &'static str,
    /// The fully-qualified gRPC services it serves.
    pub grpc_names: &'static [&'static str],
}

#[derive(Clone)]
struct Peer {
    service: PeerService,
    channel: MeshChannel,
    /// Whether the channel leads to this process's own replicas (or is in process).
    local: bool,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.channels.keys()).finish()
    }
}

/// Where to dial a replica bound to `addr`: a wildcard listen address is dialled on loopback.
fn dialable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

impl Peers {
    /// A channel for every service of `all` (the registry): at its configured endpoints, else
    /// at `local` (this process's replicas) when it is one of `served` — in process when there
    /// is one replica: a saga's three calls to catalog and payments spent a quarter of its time
    /// between the mesh's client and the server's handler, over loopback and HTTP/2, which a
    /// call in process skips (benches/RESULTS.md, 2026-12-07). Several replicas are there to be
    /// balanced over (the mesh tried in one process), so those are dialled. Services with
    /// neither are left out; [`Peers::serve`] gives the in-process channels their stack.
    pub fn connect(
        settings: &Settings,
        all: &[PeerService],
        served: &[&str],
        local: &[SocketAddr],
        metrics: &ClientMetrics,
    ) -> anyhow::Result<Self> {
        let methods = Methods::from_descriptors(&[FILE_DESCRIPTOR_SET], "request_id");
        let mut channels = HashMap::new();
        let own = Served::default();
        let one_replica = settings.mesh.replicas == 1;
        let mut in_process = false;
        for &service in all {
            let (target, domain, is_local) = match settings.mesh.endpoints.get(service.name) {
                Some(target) => (target.clone(), service.name, false),
                None if served.contains(&service.name) => (
                    Target::Static(local.iter().map(|a| dialable(*a).to_string()).collect()),
                    // Development certificates name localhost as well as the service.
                    "localhost",
                    true,
                ),
                None => continue,
            };
            let tls = match settings.mesh.tls() {
                Some(files) => Some(files.client(domain)?),
                None => None,
            };
            let options = ClientOptions {
                peer: service.name.to_owned(),
                metrics: Some(metrics.clone()),
                health_service: service.grpc_names[0].to_owned(),
                methods: methods.clone(),
                connections_per_endpoint: settings.mesh.connections_per_endpoint,
                tls,
                hedging: settings
                    .mesh
                    .hedged_reads
                    .then(keel_mesh::client::Hedging::default),
                ..ClientOptions::default()
            };
            let channel = if is_local && one_replica {
                in_process = true;
                // One process answers: hedging a read would only ask it twice.
                let options = ClientOptions {
                    hedging: None,
                    ..options
                };
                keel_mesh::client::in_process(&own, options)
            } else {
                keel_mesh::client::balanced(Arc::new(target), options)
            };
            channels.insert(
                service.name,
                Peer {
                    service,
                    channel,
                    local: is_local,
                },
            );
        }
        let order = all.iter().map(|d| d.name).collect();
        Ok(Self {
            channels,
            order,
            own: in_process.then_some(own),
        })
    }

    /// Whether some channel calls this process in process, and waits for [`Peers::serve`].
    pub fn in_process(&self) -> bool {
        self.own.is_some()
    }

    /// Sends the calls of the in-process channels to `answering` (this process's stack over
    /// its services) from now on; until then they fail as UNAVAILABLE. Once only: false when
    /// it was given one already, or no channel is in process.
    #[must_use]
    pub fn serve(&self, answering: Answering) -> bool {
        self.own.as_ref().is_some_and(|own| own.serve(answering))
    }

    /// The channel to the service called `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<&MeshChannel> {
        self.channels.get(name).map(|peer| &peer.channel)
    }

    /// Every service with a channel, in registry order.
    pub fn services(&self) -> impl Iterator<Item = (PeerService, &MeshChannel)> {
        self.order
            .iter()
            .filter_map(|name| self.channels.get(name).map(|p| (p.service, &p.channel)))
    }

    /// Whether the service called `name` is served by this process's own replicas.
    pub fn is_local(&self, name: &str) -> bool {
        self.channels.get(name).is_some_and(|peer| peer.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_keel_may_send_again_comes_from_its_protos() {
        let methods = Methods::from_descriptors(&[FILE_DESCRIPTOR_SET], "request_id");
        for path in [
            "/keel.payments.v1.PaymentService/TopUpWallet",
            "/keel.todos.v1.TodoService/CreateTodo",
            "/keel.catalog.v1.CatalogService/CreateProduct",
        ] {
            assert!(
                methods.keyed.contains_key(path),
                "{path} carries a request_id"
            );
        }
        // Register has no key: a retried Register could answer ALREADY_EXISTS to its own write.
        // It is still sent again when the server provably never saw it.
        let register = "/keel.identity.v1.IdentityService/Register";
        assert!(!methods.keyed.contains_key(register));
        assert!(!methods.idempotent.contains(register));
        assert!(methods.single_request.contains(register));
        assert!(
            methods
                .idempotent
                .contains("/keel.payments.v1.PaymentService/GetWallet")
        );
    }
}
