//! orders: an order placed once whatever the retries, confirmed or rejected by a saga across
//! catalog (stock) and payments (wallet) that every crash leaves resumable, its history readable
//! by the buyer, its changes streamed to watchers in any process.

mod changes;
mod entity;
mod error;
mod lifecycle;
mod migration;
mod notice;
mod reconcile;
mod saga;
mod service;

mod store;
mod watch;

use std::sync::Arc;

use anyhow::Context as _;
use uuid::Uuid;

pub use crate::config::OrderSettings;
pub use error::OrderError;
pub use service::OrderService;
pub use store::{NOTICE, OrderStore, SAGA};

/// The periodic job kind that drives orders whose saga stopped.
pub const RECONCILE: &str = "order.reconcile";

/// Sagas one worker runs at once, in slots of their own: a saga spends its time waiting on
/// PostgreSQL and on two peers, so the CPU-sized shared slots would leave the cores idle
/// (measured in benches/RESULTS.md, 2026-12-05); `KEEL_JOB_CONCURRENCY` changes it.
pub const SAGA_SLOTS: usize = 32;

use crate::credentials::ServiceCredentials;
use crate::domain::{Domain, Migrator, Parts, Services};
use crate::proto::keel::orders::v1::order_service_server::OrderServiceServer;
use crate::proto::lane;

/// The fully-qualified gRPC name, as health and reflection list it.
pub const SERVICE_NAME: &str = "keel.orders.v1.OrderService";

/// orders in the registry.
pub static DOMAIN: Domain = Domain {
    name: "orders",
    about: "Orders and their saga across catalog and payments",
    grpc_names: &[SERVICE_NAME],
    guarded: &[],
    migrations: &Migrator::<migration::Migrator>::new(),
    build,
    jobs,
    openapi_rules: crate::domain::no_openapi_rules,
};

/// `users/{user}/orders/{order}`.
pub fn order_name(user: Uuid, id: Uuid) -> String {
    format!("{}/orders/{id}", crate::principal::user_name(user))
}

/// The mesh channel to `peer`, which orders cannot do without.
fn peer(parts: &Parts<'_>, peer: &str) -> anyhow::Result<keel_mesh::client::MeshChannel> {
    parts.peers.get(peer).cloned().with_context(|| {
        format!("orders calls {peer}: serve it in this process or give --{peer}-endpoints")
    })
}

fn build(parts: &Parts<'_>, services: &mut Services) -> anyhow::Result<()> {
    let settings = &parts.settings.orders;
    let service = OrderService::new(
        OrderStore::new(parts.db.clone()),
        peer(parts, "catalog")?,
        peer(parts, "identity")?,
        parts.queue.clone(),
        watch::Watches::new(
            settings.order_watches_per_caller,
            settings.order_watch_lifetime,
        ),
    );
    let service = Arc::new(service);
    services.add(
        OrderServiceServer::from_arc(service.clone())
            .max_decoding_message_size(parts.max_message_bytes()),
        lane::order_service(&service),
    );
    Ok(())
}

fn jobs(parts: &Parts<'_>) -> anyhow::Result<Vec<keel_queue::Kind>> {
    let settings = &parts.settings.orders;
    let credentials = ServiceCredentials::new(
        peer(parts, "identity")?,
        "orders",
        crate::credentials::service_secret(parts.settings)?,
    );
    let store = OrderStore::new(parts.db.clone());
    let saga = saga::Saga::new(
        store.clone(),
        parts.queue.clone(),
        peer(parts, "catalog")?,
        peer(parts, "payments")?,
        Arc::new(credentials),
    );
    let postman = crate::mail::Postman::new(
        &parts.settings.mail,
        &parts.settings.stores.data_dir,
        parts.db.clone(),
    )?;
    let reconciler =
        reconcile::Reconciler::new(store.clone(), settings.order_stuck_after, parts.metrics)?;
    Ok(vec![
        keel_queue::Kind::new(SAGA, Arc::new(saga)).concurrent(Some(SAGA_SLOTS)),
        keel_queue::Kind::new(NOTICE, Arc::new(notice::Notices::new(store, postman)))
            .retried_for(crate::mail::RETRY_WINDOW),
        keel_queue::Kind::new(RECONCILE, Arc::new(reconciler))
            .every(settings.order_reconcile_every),
    ])
}
