//! catalog: products (anyone reads, admins write; cached with single flight) and the internal
//! inventory that reserves stock for orders without ever going below zero.

mod entity;
mod error;
mod inventory;
mod migration;
mod products;
mod query;
mod service;

use std::sync::Arc;

use uuid::Uuid;

pub use error::CatalogError;
pub use inventory::Inventory;
pub use products::ProductStore;
pub use service::CatalogService;

use crate::domain::{Domain, Migrator, Parts, Services};
use crate::proto::keel::catalog::v1::catalog_service_server::CatalogServiceServer;
use crate::proto::keel::catalog::v1::inventory_service_server::InventoryServiceServer;
use crate::proto::lane;

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

fn build(parts: &Parts<'_>, services: &mut Services) -> anyhow::Result<()> {
    let service = CatalogService::new(
        ProductStore::new(parts.reads.clone()),
        Inventory::new(parts.db.clone()),
        parts.cache("catalog.product"),
    );
    let max = parts.max_message_bytes();
    let service = Arc::new(service);
    services
        .add(
            CatalogServiceServer::from_arc(service.clone()).max_decoding_message_size(max),
            lane::catalog_service(&service),
        )
        .add(
            InventoryServiceServer::from_arc(service.clone()).max_decoding_message_size(max),
            lane::inventory_service(&service),
        );
    Ok(())
}

/// `products/{id}`.
pub fn product_name(id: Uuid) -> String {
    format!("products/{id}")
}
