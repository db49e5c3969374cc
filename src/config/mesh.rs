//! The mesh: peers, replicas and mTLS between services.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::PeerEndpoints;

/// A feature turned `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Peers, replicas and mTLS.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Mesh")]
pub struct MeshSettings {
    /// Where each peer service lives when it is not (only) in this process.
    #[command(flatten)]
    pub endpoints: PeerEndpoints,

    /// HTTP/2 connections the mesh client keeps to each endpoint of a peer service.
    #[arg(
        long,
        env = "KEEL_CONNECTIONS_PER_ENDPOINT",
        default_value_t = 1,
        global = true
    )]
    pub connections_per_endpoint: usize,

    /// Hedged reads: a call of a NO_SIDE_EFFECTS method slower than its recent p95 is also sent
    /// to another endpoint (within 10% of calls and the retry budget); the first answer wins.
    #[arg(
        long,
        env = "KEEL_HEDGED_READS",
        default_value_t = false,
        global = true
    )]
    pub hedged_reads: bool,

    /// Replicas of each service this process runs, each a gRPC server on its own port (the
    /// first on --grpc-addr, the others on free ports) behind the mesh client.
    #[arg(long, env = "KEEL_REPLICAS", default_value_t = 1, global = true)]
    pub replicas: usize,

    /// CA that signs every peer (PEM); with --tls-cert and --tls-key, gRPC requires mTLS.
    #[arg(long, env = "KEEL_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// This process's certificate (PEM), for mTLS.
    #[arg(long, env = "KEEL_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// This process's private key (PEM), for mTLS.
    #[arg(long, env = "KEEL_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
}

impl MeshSettings {
    /// The mTLS files, when all three are set.
    pub fn tls(&self) -> Option<keel_mesh::tls::TlsFiles> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(keel_mesh::tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}
