//! Protection at every door, knowing nothing of users: who the client is behind trusted
//! proxies, GCRA rate limits in process or in Redis, and the gRPC server layer that holds the
//! RPCs guarding secrets to a strict limit per client address.

#![forbid(unsafe_code)]

mod client;
mod layer;
mod limiter;

pub use client::{Network, TrustedProxies};
pub use layer::{Callers, ClientAddr, Guard, GuardLayer, HOP_HEADER, throttled};
pub use limiter::{Quota, RateLimiter};
