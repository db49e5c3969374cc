//! todos: a user's todo list — CRUD, pagination, a `completed` filter, cache-aside reads.

mod entity;
mod error;
mod migration;
mod service;
mod store;

pub use error::TodoError;
pub use service::TodoService;
pub use store::TodoStore;

use std::sync::Arc;

use crate::domain::{Domain, Migrator, Parts, Services};
use crate::proto::keel::todos::v1::todo_service_server::TodoServiceServer;
use crate::proto::lane;

/// The fully-qualified gRPC name, as health and reflection list it.
pub const SERVICE_NAME: &str = "keel.todos.v1.TodoService";

/// todos in the registry.
pub static DOMAIN: Domain = Domain {
    name: "todos",
    about: "Todo lists",
    grpc_names: &[SERVICE_NAME],
    guarded: &[],
    migrations: &Migrator::<migration::Migrator>::new(),
    build,
    jobs: crate::domain::no_jobs,
    openapi_rules: crate::domain::no_openapi_rules,
};

fn build(parts: &Parts<'_>, services: &mut Services) -> anyhow::Result<()> {
    let service = TodoService::new(
        TodoStore::new(parts.reads.clone()),
        parts.cache("todos.todo"),
        parts.cache("todos.first_page"),
    );
    let service = Arc::new(service);
    services.add(
        TodoServiceServer::from_arc(service.clone())
            .max_decoding_message_size(parts.max_message_bytes()),
        lane::todo_service(&service),
    );
    Ok(())
}
