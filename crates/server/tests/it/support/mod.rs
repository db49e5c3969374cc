//! Shared test harness.

pub mod replica;
pub mod work;
