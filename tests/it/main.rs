//! The integration suite, one binary: each module is what one file of tests/ used to be, over
//! the shared `support` kit. One binary links the whole application once instead of once per
//! file, which was most of a cold test run.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

#[macro_use]
mod support;

mod allocations;
mod binary;
mod catalog;
mod clients;
mod deploy;
mod docs;
mod fuzz;
mod gateway;
mod ghz;
mod identity;
mod job_batches;
mod jobs;
mod kubernetes;
mod mesh;
mod near_cache;
mod observability;
mod openapi;
mod orders;
mod parity;
mod payments;
mod protection;
mod registry;
mod replicas;
mod saga;
mod security;
mod todos;
mod topology;
mod tracing;
mod workers;
