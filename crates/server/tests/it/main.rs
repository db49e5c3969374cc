//! keel-server's integration tests, one binary: each module is what one file of tests/ used to
//! be, over the shared `support` kit. Each test binary links the dependency graph again; one a
//! crate keeps a cold build short.

mod mesh_client;
mod overload;
mod support;
mod tls;
