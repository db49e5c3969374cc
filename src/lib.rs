//! keel: the domain services (one folder each), their assembly into a process, and the
//! operator surface. Generic machinery lives in `crates/`.

#![forbid(unsafe_code)]

pub mod app;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod domain;
pub mod fault;
pub mod identity;
pub mod input;
pub mod jobs;
pub mod keys;
pub mod mail;
pub mod money;
pub mod names;
pub mod orders;
pub mod payments;
pub mod peers;
pub mod principal;
pub mod proto;
pub mod refusal;
pub mod registry;
pub mod store;
pub mod todos;
