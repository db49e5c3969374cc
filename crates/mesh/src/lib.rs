//! The client side of keel's mesh: one balanced channel per peer service (discovery, health,
//! P2C over PeakEWMA, retries within a budget, outlier ejection, backpressure), deadlines and
//! criticality carried from call to call, mTLS, and the gRPC status helpers both sides share.

#![forbid(unsafe_code)]

pub mod client;
pub mod criticality;
pub mod deadline;
pub mod series;
pub mod stats;
pub mod status;
pub mod tls;
pub mod trailers;
