//! mTLS between services with rustls: server and client configurations from a CA, a certificate
//! and a key (PEM files), such as those `keel dev-certs` writes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The three files of a process's mTLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signs every peer (PEM).
    pub ca: PathBuf,
    /// This process's certificate (PEM).
    pub cert: PathBuf,
    /// This process's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    fn read(&self) -> anyhow::Result<(Certificate, Identity)> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let ca = Certificate::from_pem(read(&self.ca)?);
        let identity = Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        Ok((ca, identity))
    }

    /// A server that presents this identity and accepts only clients whose certificate the CA
    /// signed.
    pub fn server(&self) -> anyhow::Result<ServerTlsConfig> {
        let (ca, identity) = self.read()?;
        Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
    }

    /// A client that presents this identity and trusts servers that the CA signed for `domain`.
    pub fn client(&self, domain: &str) -> anyhow::Result<ClientTlsConfig> {
        let (ca, identity) = self.read()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(identity)
            .domain_name(domain))
    }
}

/// The files `keel dev-certs` wrote for `name` in `dir`.
pub fn dev_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    }
}
