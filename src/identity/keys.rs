//! The Ed25519 key that signs access tokens, and the JWKS that publishes its public half.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keel_auth::{AccessClaims, VerificationKey};
use sha2::{Digest as _, Sha256};

use crate::proto::keel::identity::v1::JsonWebKey;

/// The RFC 8410 PKCS#8 v1 prefix of an Ed25519 private key; the 32-byte seed follows.
const PKCS8_V1_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Where the development key lives under the data dir.
const DEV_KEY_FILE: &str = "identity-signing-key.pem";

/// The signing key, its key id and where it came from.
pub struct SigningKeys {
    kid: String,
    x: String,
    encoding: EncodingKey,
    /// Whether this key was generated for development rather than provisioned.
    pub generated: bool,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("kid", &self.kid)
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

impl SigningKeys {
    /// The provisioned key at `path` (PKCS#8, PEM or DER).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("read signing key {}", path.display()))?;
        let key = match std::str::from_utf8(&bytes) {
            Ok(pem) if pem.contains("-----BEGIN") => SigningKey::from_pkcs8_pem(pem),
            _ => SigningKey::from_pkcs8_der(&bytes),
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "signing key {} is not a PKCS#8 Ed25519 key: {e}",
                path.display()
            )
        })?;
        Ok(Self::from_key(&key, false))
    }

    /// The development key under `data_dir`, generated on first use and kept so that tokens
    /// survive restarts. Processes that share the data dir and start together agree on one key:
    /// the file appears whole or not at all, and a process that loses the race loads the
    /// winner's.
    pub fn development(data_dir: &Path) -> anyhow::Result<Self> {
        let path: PathBuf = data_dir.join(DEV_KEY_FILE);
        if !path.exists() {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("create data dir {}", data_dir.display()))?;
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let pem = key
                .to_pkcs8_pem(Default::default())
                .map_err(|e| anyhow::anyhow!("encode the signing key: {e}"))?;
            publish_private(&path, pem.as_bytes())?;
        }
        let mut keys = Self::load(&path)?;
        keys.generated = true;
        Ok(keys)
    }

    fn from_key(key: &SigningKey, generated: bool) -> Self {
        let mut der = PKCS8_V1_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&key.to_bytes());
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        Self {
            kid: thumbprint(&x),
            x,
            encoding: EncodingKey::from_ed_der(&der),
            generated,
        }
    }

    /// A compact JWS of `claims`, with this key's `kid`.
    pub fn sign(&self, claims: &AccessClaims) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).context("sign an access token")
    }

    /// The public keys, as GetJwks returns them.
    pub fn jwks(&self) -> Vec<JsonWebKey> {
        vec![JsonWebKey {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: self.x.clone(),
            kid: self.kid.clone(),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }]
    }

    /// The public keys, as the token verifier takes them.
    pub fn verification_keys(&self) -> Vec<VerificationKey> {
        vec![VerificationKey {
            kid: self.kid.clone(),
            x: self.x.clone(),
        }]
    }
}

/// The RFC 7638 JWK thumbprint of an Ed25519 public key: a stable, content-derived key id.
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Writes `bytes` to `path`, readable by the owner only, unless `path` exists already: written
/// beside it first, then linked into place (a link never replaces a file), so that no reader
/// sees it half-written.
fn publish_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let staged = path.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let written = options
        .open(&staged)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .with_context(|| format!("write {}", staged.display()));
    let linked = written.and_then(|()| match std::fs::hard_link(&staged, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("create {}", path.display()))
        }
        _ => Ok(()),
    });
    let _ = std::fs::remove_file(&staged);
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_development_key_is_kept_across_restarts() {
        let dir = std::env::temp_dir().join(format!("keel-keys-{}", uuid::Uuid::new_v4()));
        let first = SigningKeys::development(&dir).unwrap();
        let second = SigningKeys::development(&dir).unwrap();
        assert_eq!(first.kid, second.kid);
        assert!(second.generated);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn processes_starting_together_agree_on_one_development_key() {
        let dir = std::env::temp_dir().join(format!("keel-keys-{}", uuid::Uuid::new_v4()));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (dir, barrier) = (dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    SigningKeys::development(&dir).map(|k| k.kid)
                })
            })
            .collect();
        let kids: std::collections::HashSet<String> = racers
            .into_iter()
            .map(|r| r.join().unwrap().expect("every racer gets the key"))
            .collect();
        assert_eq!(kids.len(), 1, "one key for all: {kids:?}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no staged files left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_signed_token_verifies_with_the_published_key() {
        let dir = std::env::temp_dir().join(format!("keel-keys-{}", uuid::Uuid::new_v4()));
        let keys = SigningKeys::development(&dir).unwrap();
        let claims = AccessClaims {
            sub: "s".into(),
            role: "user".into(),
            iss: "keel".into(),
            aud: "keel".into(),
            iat: 0,
            exp: 4_000_000_000,
            jti: "j".into(),
        };
        let token = keys.sign(&claims).unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&keys.jwks()[0].x).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["keel"]);
        let decoded = jsonwebtoken::decode::<AccessClaims>(
            &token,
            &jsonwebtoken::DecodingKey::from_ed_der(&raw),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims, claims);
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(),
            Some(keys.kid.as_str())
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
