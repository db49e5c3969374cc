//! The server side of keel: what every gRPC service gets by construction — one layer stack
//! (metrics and tracing, deadlines, load shedding, token verification), health, reflection, an
//! admin port, telemetry and a graceful drain.

#![forbid(unsafe_code)]

pub mod admin;
pub mod conn;
pub mod drain;
pub mod health;
pub mod metrics;
pub mod quiesce;
pub mod server;
pub mod shed;
pub mod status_fix;
pub mod telemetry;
pub mod writes;

pub use drain::Drain;
pub use health::Health;
