//! todos: a user's todo list — CRUD, pagination, a `completed` filter, cache-aside reads.

mod entity;
mod error;
mod migration;
mod service;
mod store;

pub use error::TodoError;
pub use migration::Migrator;
pub use service::TodoService;
pub use store::TodoStore;

/// The fully-qualified gRPC name, as health and reflection list it.
pub const SERVICE_NAME: &str = "keel.todos.v1.TodoService";
