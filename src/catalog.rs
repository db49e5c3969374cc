//! catalog: products (anyone reads, admins write; cached with single flight) and the internal
//! inventory that reserves stock for orders without ever going below zero.

mod entity;
mod error;
mod inventory;
mod migration;
mod products;
mod query;
mod service;

use uuid::Uuid;

pub use error::CatalogError;
pub use inventory::Inventory;
pub use migration::Migrator;
pub use products::ProductStore;
pub use service::{CatalogService, SERVICE_ROLE};

/// The fully-qualified gRPC names, as health and reflection list them.
pub const SERVICE_NAME: &str = "keel.catalog.v1.CatalogService";
/// The internal stock service.
pub const INVENTORY_SERVICE_NAME: &str = "keel.catalog.v1.InventoryService";

/// `products/{id}`.
pub fn product_name(id: Uuid) -> String {
    format!("products/{id}")
}
