//! keel-queue's integration tests, one binary: each module is what one file of tests/ used to
//! be. Each test binary links the dependency graph again; one a crate keeps a cold build short.

mod fencing;
mod queue;
