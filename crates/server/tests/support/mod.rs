//! Shared test harness.

pub mod replica;
