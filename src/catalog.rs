//! catalog: products (anyone reads, admins write; cached with single flight) and the internal
//! inventory that reserves stock for orders without ever going below zero.

mod entity;
mod error;
mod inventory;
mod migration;
mod products;
mod query;
mod service;

use tonic::service::RoutesBuilder;
use uuid::Uuid;

pub use error::CatalogError;
pub use inventory::Inventory;
pub use products::ProductStore;
pub use service::CatalogService;

use crate::domain::{Domain, Migrator, Parts};
use crate::proto::keel::catalog::v1::catalog_service_server::CatalogServiceServer;
use crate::proto::keel::catalog::v1::inventory_service_server::InventoryServiceServer;

/// The fully-qualified gRPC names, as health and reflection list them.
pub const SERVICE_NAME: &str = "keel.catalog.v1.CatalogService";
/// The internal stock service.
pub const INVENTORY_SERVICE_NAME: &str = "keel.catalog.v1.InventoryService";

/// catalog in the registry.
pub static DOMAIN: Domain = Domain {
    name: "catalog",
    about: "Products and stock",
    grpc_names: &[SERVICE_NAME, INVENTORY_SERVICE_NAME],
    guarded: &[],
    migrations: &Migrator::<migration::Migrator>::new(),
    build,
    jobs: crate::domain::no_jobs,
    openapi_rules: crate::domain::no_openapi_rules,
};

fn build(parts: &Parts<'_>, routes: &mut RoutesBuilder) -> anyhow::Result<()> {
    let service = CatalogService::new(
        ProductStore::new(parts.reads.clone()),
        Inventory::new(parts.db.clone()),
        parts.cache("catalog.product"),
    );
    let max = parts.max_message_bytes();
    routes
        .add_service(CatalogServiceServer::new(service.clone()).max_decoding_message_size(max))
        .add_service(InventoryServiceServer::new(service).max_decoding_message_size(max));
    Ok(())
}

/// `products/{id}`.
pub fn product_name(id: Uuid) -> String {
    format!("products/{id}")
}
