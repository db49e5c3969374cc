//! One replica: a gRPC server on its own port serving the process's services with the standard
//! stack, its own health (so that it can drain alone) and its own concurrency limit.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use keel_mesh::auth::{AuthLayer, TokenVerifier};
use keel_mesh::metrics::GrpcServerMetrics;
use keel_mesh::{Drain, Health};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::ServerTlsConfig;

use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::keel::catalog::v1::catalog_service_server::CatalogServiceServer;
use crate::proto::keel::catalog::v1::inventory_service_server::InventoryServiceServer;
use crate::proto::keel::identity::v1::identity_service_server::IdentityServiceServer;
use crate::proto::keel::payments::v1::ledger_service_server::LedgerServiceServer;
use crate::proto::keel::payments::v1::payment_service_server::PaymentServiceServer;
use crate::proto::keel::todos::v1::todo_service_server::TodoServiceServer;
use crate::{catalog, identity, payments, todos};

/// The domain services of a process, built once over its stores and shared by its replicas.
#[derive(Clone, Default)]
pub struct Services {
    /// identity, when served here.
    pub identity: Option<identity::IdentityService>,
    /// todos, when served here.
    pub todos: Option<todos::TodoService>,
    /// catalog and inventory, when served here.
    pub catalog: Option<catalog::CatalogService>,
    /// payments and the ledger, when served here.
    pub payments: Option<payments::PaymentService>,
}

/// What every replica of a process shares: metrics, token verification, limits, TLS.
#[derive(Clone)]
pub struct Stack {
    /// gRPC server metrics of the process.
    pub metrics: Arc<GrpcServerMetrics>,
    /// Verifies bearer tokens.
    pub verifier: Arc<TokenVerifier>,
    /// Calls in flight per service and replica before shedding.
    pub max_concurrent_calls: usize,
    /// Largest request message.
    pub max_message_bytes: usize,
    /// mTLS, when configured.
    pub tls: Option<ServerTlsConfig>,
}

/// A started replica.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its health, as its Watch streams report it.
    pub health: Health,
    /// Its drain.
    pub drain: Drain,
}

impl Replica {
    /// Serves `services` (whose gRPC names are `names`) on `listener` until its drain or the
    /// process's `process_drain` starts; the task ends once it drained. It reports NOT_SERVING
    /// until [`Health::serving`].
    pub async fn start(
        services: &Services,
        names: &[&'static str],
        listener: TcpListener,
        stack: &Stack,
        process_drain: &Drain,
    ) -> anyhow::Result<(Self, JoinHandle<Result<(), tonic::transport::Error>>)> {
        let drain = Drain::new();
        let (health, health_service) = Health::new(names.iter().copied(), drain.clone()).await;
        let (reflection_v1, reflection_v1alpha) =
            keel_mesh::server::reflection(&[FILE_DESCRIPTOR_SET], names)
                .context("build reflection")?;
        let shed = keel_mesh::shed::ShedLayer::new(
            names.iter().copied(),
            stack.max_concurrent_calls,
            std::time::Duration::from_millis(50),
        );
        let arrivals = keel_mesh::quiesce::Arrivals::default();
        let mut server = keel_mesh::server::builder(keel_mesh::server::layers(
            arrivals.clone(),
            stack.metrics.clone(),
            shed,
            Some(AuthLayer::new(stack.verifier.clone())),
        ));
        if let Some(tls) = &stack.tls {
            server = server
                .tls_config(tls.clone())
                .context("mTLS server configuration")?;
        }
        let max = stack.max_message_bytes;
        let router = server
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_optional_service(
                services
                    .identity
                    .clone()
                    .map(|s| IdentityServiceServer::new(s).max_decoding_message_size(max)),
            )
            .add_optional_service(
                services
                    .todos
                    .clone()
                    .map(|s| TodoServiceServer::new(s).max_decoding_message_size(max)),
            )
            .add_optional_service(
                services
                    .catalog
                    .clone()
                    .map(|s| CatalogServiceServer::new(s).max_decoding_message_size(max)),
            )
            .add_optional_service(
                services
                    .catalog
                    .clone()
                    .map(|s| InventoryServiceServer::new(s).max_decoding_message_size(max)),
            )
            .add_optional_service(
                services
                    .payments
                    .clone()
                    .map(|s| PaymentServiceServer::new(s).max_decoding_message_size(max)),
            )
            .add_optional_service(
                services
                    .payments
                    .clone()
                    .map(|s| LedgerServiceServer::new(s).max_decoding_message_size(max)),
            );
        let addr = listener.local_addr()?;
        let stopped = {
            let (own, process) = (drain.started(), process_drain.started());
            async move {
                tokio::select! {
                    () = own => {}
                    () = process => {}
                }
            }
        };
        // At the drain the listener closes; GOAWAY follows once the callers on open
        // connections have gone quiet.
        let (incoming, shutdown) = keel_mesh::quiesce::phases(listener, stopped, arrivals);
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown));
        Ok((
            Self {
                addr,
                health,
                drain,
            },
            task,
        ))
    }

    /// Drains it alone: NOT_SERVING first, so that watchers leave before connections close.
    pub async fn stop(&self) {
        self.health.not_serving().await;
        self.drain.start();
    }
}
