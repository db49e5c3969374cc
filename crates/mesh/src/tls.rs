//! mTLS between services with rustls: server and client configurations from a CA, a certificate
//! and a key (PEM files), and the development CA that `keel dev-certs` writes. Every certificate
//! it issues is valid for `localhost`, `127.0.0.1` and its service name, for both server and
//! client authentication, so one file pair serves a process in both roles.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
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

/// Writes a development CA (`ca.pem`, `ca-key.pem`) and a certificate and key per name
/// (`NAME.pem`, `NAME-key.pem`) into `dir`.
pub fn write_dev_certs(dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keel development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    write(&dir.join("ca.pem"), ca.pem().as_bytes(), false)?;
    write(&dir.join("ca-key.pem"), ca_key_pem.as_bytes(), true)?;
    for name in names {
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            (*name).to_owned(),
        ])?;
        params.distinguished_name.push(DnType::CommonName, *name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        write(
            &dir.join(format!("{name}.pem")),
            cert.pem().as_bytes(),
            false,
        )?;
        write(
            &dir.join(format!("{name}-key.pem")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("write {}", path.display()))
}

/// The files `keel dev-certs` wrote for `name` in `dir`.
pub fn dev_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    }
}
