//! The server side of keel's mesh: what every gRPC service gets by construction — health,
//! reflection, metrics, tracing, an admin port, token verification and a graceful drain.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod client;
pub mod deadline;
pub mod drain;
pub mod health;
pub mod metrics;
pub mod oversize;
pub mod quiesce;
pub mod server;
pub mod shed;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod trailers;

pub use drain::Drain;
pub use health::Health;
